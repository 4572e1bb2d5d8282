//! The engine's thread: it owns the llama.cpp context, and is the only code that calls
//! into it. One loop: remove the cells of ended sequences (`seq_rm`) and send their
//! last items, plan the next step under the books' lock, decode it in one batch (every
//! decoding sequence's token and the prompt chunks) outside the lock, sample each
//! emitting sequence with its own sampler, hand the tokens to the books. It sleeps on
//! the condition variable when there is nothing to do, so an idle engine costs
//! nothing, and it never runs on (or blocks) an async runtime's threads.

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_channel::Sender;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tether_core::error::{BackendError, EngineError, ErrorKind};

use super::books::{Effects, Limits, Removal, Run, Step};
use super::{backend, send_all, LlamaCppConfig, Shared};

/// Everything the thread needs, moved onto it.
pub(crate) struct Thread {
    pub(crate) shared: Arc<Shared>,
    pub(crate) model: Arc<LlamaModel>,
    pub(crate) config: LlamaCppConfig,
    pub(crate) epoch: u64,
    /// Dropped when the context exists (or could not be made).
    pub(crate) started: Sender<()>,
    /// Dropped when the thread ends.
    pub(crate) exited: Sender<()>,
}

impl Thread {
    pub(crate) fn run(self) {
        let Thread {
            shared,
            model,
            config,
            epoch,
            started,
            exited,
        } = self;
        let ctx = match context(&model, &config) {
            Ok(ctx) => ctx,
            Err(error) => {
                let mut books = shared.lock();
                if books.is_current(epoch) {
                    books.run = Run::Stopped;
                    books.start_error = Some(error);
                }
                drop(books);
                drop(started);
                drop(exited);
                return;
            }
        };
        {
            let mut books = shared.lock();
            if books.is_current(epoch) {
                books.run = Run::Running { epoch };
            }
        }
        drop(started);
        let mut serving = Loop {
            shared: &shared,
            ctx,
            samplers: (0..config.max_sequences).map(|_| None).collect(),
            batch: LlamaBatch::new(config.batch_tokens, 1),
            limits: Limits {
                n_ctx: config.n_ctx as usize,
                batch_tokens: config.batch_tokens,
            },
            n_vocab: model.n_vocab(),
            epoch,
        };
        // A panic on this thread must not leave a stream without an end.
        let panicked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serving.run())).is_err();
        // The context (and with it every cell) is gone before anything is told.
        drop(serving);
        shared.kv_cells.store(0, Ordering::Release);
        shared.kv_sequences.store(0, Ordering::Release);
        if panicked {
            let error = backend_error("the llama.cpp engine's thread panicked".to_owned());
            let outgoing = {
                let mut books = shared.lock();
                if books.is_current(epoch) {
                    books.start_error = Some(error.clone());
                    books.fail(&error)
                } else {
                    Vec::new()
                }
            };
            send_all(outgoing);
        }
        drop(exited);
    }
}

/// The one context: `n_ctx` cells shared by all sequences (a unified KV cache, so a
/// single sequence may use them all), a batch of up to `batch_tokens`.
fn context<'m>(
    model: &'m LlamaModel,
    config: &LlamaCppConfig,
) -> Result<LlamaContext<'m>, EngineError> {
    let batch = u32::try_from(config.batch_tokens).unwrap_or(u32::MAX);
    let threads = config.thread_count();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.n_ctx))
        .with_n_batch(batch)
        .with_n_ubatch(batch)
        .with_n_seq_max(u32::try_from(config.max_sequences).unwrap_or(u32::MAX))
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    model.new_context(backend()?, params).map_err(|e| {
        EngineError::new(
            ErrorKind::ResourceExhausted,
            format!("llama.cpp context: {e}"),
        )
    })
}

struct Loop<'a, 'm> {
    shared: &'a Shared,
    ctx: LlamaContext<'m>,
    /// One sampler per sequence id, made when a sequence is admitted to it.
    samplers: Vec<Option<LlamaSampler>>,
    batch: LlamaBatch<'static>,
    limits: Limits,
    n_vocab: i32,
    epoch: u64,
}

impl Loop<'_, '_> {
    fn run(&mut self) {
        loop {
            // Wait for work; take the removals owed.
            let removals = {
                let mut books = self.shared.lock();
                loop {
                    if !books.is_current(self.epoch) {
                        return;
                    }
                    if !books.is_idle(self.limits) {
                        break books.take_removals();
                    }
                    books = self
                        .shared
                        .wake
                        .wait(books)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            };
            self.remove(&removals);
            let (step, outgoing) = {
                let mut books = self.shared.lock();
                if !books.is_current(self.epoch) {
                    return;
                }
                let outgoing = books.released(removals);
                (books.plan(self.limits), outgoing)
            };
            send_all(outgoing);
            let Some(step) = step else {
                continue;
            };
            let sampled = self.step(&step);
            // Published before any token of this step goes out.
            self.count_cells();
            let mut fx = Effects::default();
            {
                let mut books = self.shared.lock();
                if !books.is_current(self.epoch) {
                    return;
                }
                books.apply(&step.work, sampled, self.limits, &mut fx);
            }
            send_all(fx.outgoing);
            for gctx in fx.hints {
                gctx.notify_first_token();
            }
        }
    }

    /// Remove the ended sequences' cells from llama.cpp's memory, forget their
    /// samplers, and publish llama.cpp's counts (before their last items go out).
    fn remove(&mut self, removals: &[Removal]) {
        if removals.is_empty() {
            return;
        }
        for r in removals {
            // Only fails for positions above `i32::MAX`; none are given.
            let _ = self.ctx.kv_cache_seq_rm(r.slot, None, None);
            if let Some(sampler) = usize::try_from(r.slot)
                .ok()
                .and_then(|s| self.samplers.get_mut(s))
            {
                *sampler = None;
            }
        }
        self.count_cells();
    }

    /// Read llama.cpp's own counts of the cells and sequence ids its memory holds.
    fn count_cells(&self) {
        let (mut cells, mut seqs) = (0usize, 0usize);
        for slot in 0..self.samplers.len() {
            let slot = i32::try_from(slot).unwrap_or(i32::MAX);
            let max = self.ctx.kv_cache_seq_pos_max(slot);
            if max >= 0 {
                let min = self.ctx.kv_cache_seq_pos_min(slot);
                cells += usize::try_from(max - min + 1).unwrap_or(0);
                seqs += 1;
            }
        }
        self.shared.kv_cells.store(cells, Ordering::Release);
        self.shared.kv_sequences.store(seqs, Ordering::Release);
    }

    /// Run one step: new samplers, the scheduling signals, one decode, the samples.
    fn step(&mut self, step: &Step) -> Result<Vec<Option<u32>>, EngineError> {
        for &(slot, sampling) in &step.admitted {
            if let Some(s) = usize::try_from(slot)
                .ok()
                .and_then(|s| self.samplers.get_mut(s))
            {
                *s = Some(sampling.build(self.n_vocab));
            }
        }
        for gctx in &step.scheduled {
            gctx.notify_scheduled();
        }
        self.batch.clear();
        // For each work item that emits, where its logits are in the batch.
        let mut logits_at = Vec::with_capacity(step.work.len());
        for w in &step.work {
            let last = w.tokens.len() - 1;
            for (i, &token) in w.tokens.iter().enumerate() {
                let pos = i32::try_from(w.pos0 + i).unwrap_or(i32::MAX);
                let emits = w.emits && i == last;
                #[allow(clippy::cast_possible_wrap)] // ids were checked below n_vocab
                self.batch
                    .add(LlamaToken(token as i32), pos, &[w.slot], emits)
                    .map_err(|e| backend_error(format!("llama.cpp batch: {e}")))?;
            }
            logits_at.push(w.emits.then(|| self.batch.n_tokens() - 1));
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| backend_error(format!("llama.cpp decode: {e}")))?;
        let mut out = Vec::with_capacity(step.work.len());
        for (w, at) in step.work.iter().zip(logits_at) {
            let token = match (
                at,
                usize::try_from(w.slot)
                    .ok()
                    .and_then(|s| self.samplers.get_mut(s)),
            ) {
                (Some(at), Some(Some(sampler))) => {
                    let LlamaToken(t) = sampler.sample(&self.ctx, at);
                    u32::try_from(t).ok()
                }
                _ => None,
            };
            out.push(token);
        }
        Ok(out)
    }
}

fn backend_error(message: String) -> EngineError {
    EngineError::new(ErrorKind::Backend(BackendError::Unknown), message)
}
