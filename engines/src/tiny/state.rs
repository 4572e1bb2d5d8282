//! The tiny engine's books: every live sequence, the waiting queue, the running batch,
//! and what each step feeds the model.
//!
//! Owns the bookkeeping and the per-token decisions (stop, EOS, length), under one
//! mutex held by the engine. Must not compute, await or call back into tether while
//! the lock is held: [`State::plan`] says what the scheduler should compute (and which
//! requests to tell they were scheduled), and [`State::apply`] takes the results and
//! hands back what must be done outside the lock (KV caches to free, terminals to send,
//! first-token hints).
//!
//! A sequence that ends (terminal, error, abort, dropped stream) leaves the books at
//! once, so nothing can send on its channel after its end. Its terminal is sent only
//! after its KV cache was freed, so a consumer that read the end sees the gauges back.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_channel::{Receiver, Sender};
use tether_core::engine::GenerateContext;
use tether_core::error::{BackendError, EngineError, ErrorKind};
use tether_core::protocol::{Chunk, FinishReason, Request, Usage};

use super::config::TinyConfig;
use super::sampler::{Decoding, Draw, Sampler};
use crate::ends::Ends;
use crate::util::{shutdown_error, splitmix64, LoopControl};

pub(crate) use crate::stream::Item;

/// A sequence's last item, to send once its KV cache is gone.
pub(crate) type Outgoing = (Sender<Item>, Item);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In the queue: no KV cache.
    Waiting,
    /// In the batch: holds a KV cache (or is about to get one in this step).
    Running,
}

struct Seq {
    request_id: Arc<str>,
    phase: Phase,
    tx: Sender<Item>,
    /// For the scheduling signal (at its first prefill chunk) and the first-token hint
    /// (when the config asks for it); dropped once no longer needed.
    gctx: Option<GenerateContext>,
    prompt: Vec<u32>,
    /// Prompt tokens already in the KV cache.
    prefilled: usize,
    /// The last token emitted: the next decode step's input.
    last: Option<u32>,
    kv_rows: usize,
    emitted: u32,
    ends: Ends,
    /// `None`: greedy.
    sampler: Option<Sampler>,
}

impl Seq {
    /// How the token after `emitted` ones is chosen (`None`: the argmax).
    fn draw(&self) -> Option<Draw> {
        self.sampler.map(|sampler| Draw {
            sampler,
            index: u64::from(self.emitted),
        })
    }

    fn usage(&self) -> Usage {
        Usage::new(
            u32::try_from(self.prompt.len()).unwrap_or(u32::MAX),
            self.emitted,
        )
    }
}

/// One sequence's work in a step.
#[derive(Clone, Debug)]
pub(crate) struct Work {
    pub(crate) seq: u64,
    pub(crate) tokens: Vec<u32>,
    pub(crate) pos0: usize,
    /// Whether the step's output for it is its next token (false for a prefill chunk
    /// that does not finish the prompt).
    pub(crate) emits: bool,
    /// How that token is chosen, when it emits one (`None`: the argmax).
    pub(crate) sample: Option<Draw>,
}

/// What the scheduler computes next: KV caches to allocate (`(seq, rows)`), then one
/// forward step over `work`; before that, the requests whose prefill starts in this
/// step are told they were scheduled (`scheduled`).
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) admit: Vec<(u64, usize)>,
    pub(crate) work: Vec<Work>,
    pub(crate) scheduled: Vec<GenerateContext>,
}

/// What must happen outside the lock after a step or an abort.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Sequences whose KV cache must be freed.
    pub(crate) release: Vec<u64>,
    /// Last items to send, after the release.
    pub(crate) outgoing: Vec<Outgoing>,
    /// Contexts owed a first-token hint.
    pub(crate) hints: Vec<GenerateContext>,
}

impl Effects {
    fn end(&mut self, seq: u64, tx: Sender<Item>, item: Item) {
        self.release.push(seq);
        self.outgoing.push((tx, item));
    }
}

/// A snapshot of the tiny engine's gauges and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TinyGauges {
    /// Sequences in the running batch (each holds a KV cache).
    pub live_sequences: usize,
    /// Requests waiting for a place in the batch.
    pub queue_len: usize,
    /// Bytes of KV cache held now (on the model's device).
    pub kv_bytes: usize,
    /// Requests accepted by `generate` since the engine was created.
    pub accepted: u64,
    /// `abort` calls received.
    pub aborts_received: u64,
    /// Aborts that found a live sequence (and ended it with `Cancelled`).
    pub aborts_live: u64,
    /// Forward steps run.
    pub steps: u64,
    /// Tokens emitted, over all sequences.
    pub tokens_emitted: u64,
}

/// A request that passed validation.
#[derive(Clone, Copy)]
pub(crate) struct Admission {
    pub(crate) max_tokens: u32,
    pub(crate) kv_rows: usize,
    pub(crate) decoding: Decoding,
}

/// The engine's books (see the module docs).
pub(crate) struct State {
    /// Started or not, and the scheduler loop's epoch and kicks.
    pub(crate) control: LoopControl,
    next_seq: u64,
    seqs: HashMap<u64, Seq>,
    ids: HashMap<Arc<str>, Vec<u64>>,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    accepted: u64,
    aborts_received: u64,
    aborts_live: u64,
    steps: u64,
    tokens_emitted: u64,
    /// Where the seeds of sampling requests that set none come from: random per
    /// engine, so two engines (or two runs) do not repeat each other.
    seed_base: u64,
}

impl State {
    pub(crate) fn new() -> State {
        State {
            control: LoopControl::default(),
            next_seq: 0,
            seqs: HashMap::new(),
            ids: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            accepted: 0,
            aborts_received: 0,
            aborts_live: 0,
            steps: 0,
            tokens_emitted: 0,
            seed_base: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                0u64,
            ),
        }
    }

    /// A seed for sequence `seq` of a request that sampled without one: distinct for
    /// every sequence of this engine (splitmix64 maps distinct states to distinct
    /// values).
    fn fresh_seed(&self, seq: u64) -> u64 {
        let mut state = self.seed_base.wrapping_add(seq);
        splitmix64(&mut state)
    }

    /// The gauges, with `kv_bytes` as the model reports it.
    pub(crate) fn gauges(&self, kv_bytes: usize) -> TinyGauges {
        TinyGauges {
            live_sequences: self.running.len(),
            queue_len: self.waiting.len(),
            kv_bytes,
            accepted: self.accepted,
            aborts_received: self.aborts_received,
            aborts_live: self.aborts_live,
            steps: self.steps,
            tokens_emitted: self.tokens_emitted,
        }
    }

    /// Queue `request`; returns its sequence number and its channel's receiving end. A
    /// request with `max_tokens = 0` ends at once with `Length`.
    pub(crate) fn insert(
        &mut self,
        mut request: Request,
        admission: Admission,
        gctx: GenerateContext,
    ) -> (u64, Receiver<Item>) {
        let (tx, rx) = async_channel::unbounded();
        let eos = std::mem::take(&mut request.eos_token_ids);
        let ends = Ends::of(&mut request, admission.max_tokens, eos);
        let id = self.next_seq;
        self.next_seq += 1;
        self.accepted += 1;
        let seq = Seq {
            request_id: Arc::from(request.id.as_str()),
            phase: Phase::Waiting,
            tx,
            gctx: Some(gctx),
            prompt: request.token_ids,
            prefilled: 0,
            last: None,
            kv_rows: admission.kv_rows,
            emitted: 0,
            ends,
            sampler: admission.decoding.sampler(|| self.fresh_seed(id)),
        };
        if admission.max_tokens == 0 {
            // Never queued, never holds a cache: its only item is the terminal.
            let usage = seq.usage();
            let _ = seq
                .tx
                .try_send(Ok(Chunk::terminal(FinishReason::Length).with_usage(usage)));
            return (id, rx);
        }
        self.ids.entry(seq.request_id.clone()).or_default().push(id);
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        self.control.kick();
        (id, rx)
    }

    /// Admit waiting sequences (FIFO, while the batch has room) and say what the next
    /// step computes: one token for every decoding sequence, and prompt chunks for the
    /// prefilling ones within `prefill_tokens_per_step`; a sequence whose first prompt
    /// chunk is in the step is owed the scheduling signal (its queue time ends where its
    /// prefill starts). `None` when nothing can run.
    pub(crate) fn plan(&mut self, cfg: &TinyConfig) -> Option<Plan> {
        let mut plan = Plan::default();
        while self.running.len() < cfg.max_sequences {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            seq.phase = Phase::Running;
            self.running.push(id);
            plan.admit.push((id, seq.kv_rows));
        }
        let mut budget = cfg.prefill_tokens_per_step;
        for &id in &self.running {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if let Some(last) = seq.last {
                let pos = seq.prompt.len() + seq.emitted as usize - 1;
                plan.work.push(Work {
                    seq: id,
                    tokens: vec![last],
                    pos0: pos,
                    emits: true,
                    sample: seq.draw(),
                });
            } else if budget > 0 {
                if seq.prefilled == 0 {
                    // Kept for the first-token hint only if the config asks for one.
                    let gctx = if cfg.first_token_hint {
                        seq.gctx.clone()
                    } else {
                        seq.gctx.take()
                    };
                    plan.scheduled.extend(gctx);
                }
                let end = seq.prompt.len().min(seq.prefilled + budget);
                budget -= end - seq.prefilled;
                let emits = end == seq.prompt.len();
                plan.work.push(Work {
                    seq: id,
                    tokens: seq.prompt[seq.prefilled..end].to_vec(),
                    pos0: seq.prefilled,
                    emits,
                    sample: seq.draw().filter(|_| emits),
                });
            }
        }
        (!plan.work.is_empty() || !plan.admit.is_empty()).then_some(plan)
    }

    /// End the sequences whose KV cache could not be allocated.
    pub(crate) fn fail_admissions(&mut self, failed: Vec<(u64, EngineError)>, fx: &mut Effects) {
        for (id, error) in failed {
            self.end(id, Err(error), fx);
        }
    }

    /// Take a step's results: `next[i]` is the model's output for `work[i]` (`Err`: the
    /// whole step failed). Sequences that left the books meanwhile (aborted, dropped)
    /// only get their caches freed.
    pub(crate) fn apply(
        &mut self,
        work: &[Work],
        next: Result<Vec<Option<u32>>, EngineError>,
        fx: &mut Effects,
    ) {
        self.steps += 1;
        let next = match next {
            Ok(next) => next,
            Err(error) => {
                for w in work {
                    if self.seqs.contains_key(&w.seq) {
                        self.end(w.seq, Err(error.clone()), fx);
                    } else {
                        fx.release.push(w.seq);
                    }
                }
                return;
            }
        };
        for (w, out) in work.iter().zip(next) {
            let Some(seq) = self.seqs.get_mut(&w.seq) else {
                fx.release.push(w.seq);
                continue;
            };
            let Some(token) = out else {
                let error = EngineError::new(
                    ErrorKind::Backend(BackendError::Unknown),
                    "the model skipped a sequence it should have run",
                );
                self.end(w.seq, Err(error), fx);
                continue;
            };
            if seq.last.is_none() {
                seq.prefilled += w.tokens.len();
            }
            if !w.emits {
                continue;
            }
            seq.emitted += 1;
            seq.last = Some(token);
            self.tokens_emitted += 1;
            let _ = seq.tx.try_send(Ok(Chunk::tokens(vec![token])));
            if seq.emitted == 1 {
                fx.hints.extend(seq.gctx.take());
            }
            // Its reserved KV rows are its context: prompt plus output never exceed them.
            let context_full = seq.prompt.len() + seq.emitted as usize >= seq.kv_rows;
            if let Some(reason) = seq.ends.reason(seq.emitted, token, context_full) {
                let usage = seq.usage();
                self.end(w.seq, Ok(Chunk::terminal(reason).with_usage(usage)), fx);
            }
        }
    }

    /// Abort the (oldest live) request `request_id`: it ends with `Cancelled` and the
    /// usage so far. Nothing happens when no live sequence has that id. Returns whether
    /// one had it.
    pub(crate) fn abort(&mut self, request_id: &str, fx: &mut Effects) -> bool {
        self.aborts_received += 1;
        let Some(&id) = self.ids.get(request_id).and_then(|ids| ids.first()) else {
            return false;
        };
        let Some(usage) = self.seqs.get(&id).map(Seq::usage) else {
            return false;
        };
        self.aborts_live += 1;
        self.end(
            id,
            Ok(Chunk::terminal(FinishReason::Cancelled).with_usage(usage)),
            fx,
        );
        true
    }

    /// The stream of sequence `id` was dropped before its end: forget the sequence.
    pub(crate) fn detach(&mut self, id: u64, fx: &mut Effects) {
        if self.remove(id).is_some() {
            fx.release.push(id);
        }
    }

    /// Stop the scheduler loop, end every sequence with an `EngineShutdown` error and
    /// forget everything.
    pub(crate) fn shutdown(&mut self, fx: &mut Effects) {
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        for id in ids {
            self.end(id, Err(shutdown_error()), fx);
        }
        self.control.stop();
    }

    /// Sequence `id` ends with `item`: it leaves the books, its cache is to be freed and
    /// `item` sent after that.
    fn end(&mut self, id: u64, item: Item, fx: &mut Effects) {
        if let Some(seq) = self.remove(id) {
            fx.end(id, seq.tx, item);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Seq> {
        let seq = self.seqs.remove(&id)?;
        match seq.phase {
            Phase::Waiting => self.waiting.retain(|&w| w != id),
            Phase::Running => {
                self.running.retain(|&r| r != id);
                // Room in the batch: a queued request may run now.
                self.control.kick();
            }
        }
        if let Some(ids) = self.ids.get_mut(&seq.request_id) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.ids.remove(&seq.request_id);
            }
        }
        Some(seq)
    }
}
