//! The llama.cpp engine's books: every live sequence, the queue, the batch, the
//! sequence ids (slots) and KV cells each holds, and the removals the engine's thread
//! owes llama.cpp.
//!
//! Owns the bookkeeping and the per-token decisions (stop, EOS, length) under one
//! mutex; never calls llama.cpp (only the engine's thread does, outside the lock).
//! [`Books::plan`] says what the next step decodes, [`Books::apply`] takes what it
//! sampled, and a sequence that ends leaves the books at once: if it holds a slot, a
//! [`Removal`] is queued and its last item (terminal or error) is sent only after the
//! thread removed its cells from llama.cpp's memory (`seq_rm`) and gave the slot back,
//! so a consumer that read the end sees the gauges back. A queued sequence never held
//! cells: its end is sent at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_channel::{Receiver, Sender};
use tether_core::engine::GenerateContext;
use tether_core::error::EngineError;
use tether_core::protocol::{Chunk, FinishReason, Request, Usage};

use super::sampling::Sampling;
use crate::ends::Ends;
use crate::util::{shutdown_error, splitmix64};

pub(crate) use crate::stream::Item;

/// A sequence's last item and where it goes.
pub(crate) type Outgoing = (Sender<Item>, Item);

/// Whether the engine's thread runs, and which one.
#[derive(Debug)]
pub(crate) enum Run {
    /// No thread (never started, cleaned up, or its start failed).
    Stopped,
    /// A thread is creating its context; `done` closes when it finished (either way).
    Starting { epoch: u64, done: Receiver<()> },
    /// The thread of `epoch` serves requests.
    Running { epoch: u64 },
}

/// A request that passed validation.
#[derive(Clone, Debug)]
pub(crate) struct Admission {
    pub(crate) max_tokens: u32,
    /// KV cells to reserve: prompt plus output, at most the context.
    pub(crate) cells: usize,
    pub(crate) sampling: Sampling,
    /// Tokens that end the output with `Eos` (the request's and the model's own).
    pub(crate) eos: Vec<u32>,
}

struct Seq {
    request_id: Arc<str>,
    tx: Sender<Item>,
    /// For the scheduling signal and the first-token hint; dropped after the hint.
    gctx: Option<GenerateContext>,
    prompt: Vec<u32>,
    prefilled: usize,
    /// The last token emitted: the next decode step's input.
    last: Option<u32>,
    emitted: u32,
    cells: usize,
    ends: Ends,
    sampling: Sampling,
    /// The llama.cpp sequence id it holds, once admitted into the batch.
    slot: Option<i32>,
}

impl Seq {
    fn usage(&self) -> Usage {
        Usage::new(
            u32::try_from(self.prompt.len()).unwrap_or(u32::MAX),
            self.emitted,
        )
    }
}

/// One sequence's tokens in a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Work {
    pub(crate) seq: u64,
    pub(crate) slot: i32,
    pub(crate) tokens: Vec<u32>,
    /// The position of `tokens[0]`.
    pub(crate) pos0: usize,
    /// Whether the step's output for its last token is its next token.
    pub(crate) emits: bool,
}

/// What the next step does: give the `admitted` slots fresh samplers, tell the
/// `scheduled` requests their prefill starts, then decode `work` in one batch.
#[derive(Debug, Default)]
pub(crate) struct Step {
    pub(crate) work: Vec<Work>,
    pub(crate) admitted: Vec<(i32, Sampling)>,
    pub(crate) scheduled: Vec<GenerateContext>,
}

/// A slot whose cells the thread must remove, and the item to send once it has.
#[derive(Debug)]
pub(crate) struct Removal {
    pub(crate) slot: i32,
    cells: usize,
    last: Option<Outgoing>,
}

/// What must happen outside the lock.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Last items of sequences that held no cells, to send now.
    pub(crate) outgoing: Vec<Outgoing>,
    /// Contexts owed a first-token hint.
    pub(crate) hints: Vec<GenerateContext>,
    /// Whether the thread must wake up (a removal was queued).
    pub(crate) wake: bool,
}

/// A snapshot of the llama.cpp engine's gauges and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LlamaCppGauges {
    /// Sequences in the batch (each holds a llama.cpp sequence id).
    pub live_sequences: usize,
    /// Requests waiting for a place in the batch.
    pub queue_len: usize,
    /// KV cells reserved for the sequences in the batch.
    pub reserved_cells: usize,
    /// KV cells llama.cpp's memory holds, over all sequence ids, as llama.cpp reports
    /// it (read by the engine's thread after each step and each removal).
    pub kv_cells: usize,
    /// llama.cpp sequence ids holding at least one cell, as llama.cpp reports it.
    pub kv_sequences: usize,
    /// Removals queued for the engine's thread (cells still held).
    pub pending_removals: usize,
    /// Requests accepted by `generate` since the engine was created.
    pub accepted: u64,
    /// `abort` calls received.
    pub aborts_received: u64,
    /// Aborts that ended a sequence in the batch.
    pub aborts_running: u64,
    /// Aborts that ended a queued sequence (never prefilled).
    pub aborts_queued: u64,
    /// Steps decoded.
    pub steps: u64,
    /// Prompt tokens decoded, over all sequences (a chunk whose sequence ended while
    /// its step was decoding is not counted).
    pub prefill_tokens: u64,
    /// Tokens emitted, over all sequences.
    pub tokens_emitted: u64,
}

/// The books (see the module docs).
pub(crate) struct Books {
    pub(crate) run: Run,
    /// Why the last start failed.
    pub(crate) start_error: Option<EngineError>,
    /// Closes when the last thread started has exited.
    pub(crate) exited: Option<Receiver<()>>,
    next_epoch: u64,
    next_seq: u64,
    seqs: HashMap<u64, Seq>,
    ids: HashMap<Arc<str>, Vec<u64>>,
    waiting: VecDeque<u64>,
    running: Vec<u64>,
    free_slots: Vec<i32>,
    reserved: usize,
    removals: Vec<Removal>,
    accepted: u64,
    aborts_received: u64,
    aborts_running: u64,
    aborts_queued: u64,
    steps: u64,
    prefill_tokens: u64,
    tokens_emitted: u64,
    seed_base: u64,
}

/// The batching limits [`Books::plan`] works within.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) n_ctx: usize,
    pub(crate) batch_tokens: usize,
}

impl Books {
    pub(crate) fn new() -> Books {
        Books {
            run: Run::Stopped,
            start_error: None,
            exited: None,
            next_epoch: 0,
            next_seq: 0,
            seqs: HashMap::new(),
            ids: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            free_slots: Vec::new(),
            reserved: 0,
            removals: Vec::new(),
            accepted: 0,
            aborts_received: 0,
            aborts_running: 0,
            aborts_queued: 0,
            steps: 0,
            prefill_tokens: 0,
            tokens_emitted: 0,
            seed_base: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                0u64,
            ),
        }
    }

    /// Whether the thread of `epoch` is the one that should run.
    pub(crate) fn is_current(&self, epoch: u64) -> bool {
        match self.run {
            Run::Starting { epoch: e, .. } | Run::Running { epoch: e } => e == epoch,
            Run::Stopped => false,
        }
    }

    /// Whether `generate` may queue requests.
    pub(crate) fn is_running(&self) -> bool {
        matches!(self.run, Run::Running { .. })
    }

    /// Begin a start: a new epoch with `slots` free sequence ids. Returns the epoch.
    pub(crate) fn begin_start(&mut self, slots: usize, done: Receiver<()>) -> u64 {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let slots = i32::try_from(slots).unwrap_or(i32::MAX);
        self.free_slots = (0..slots).rev().collect();
        self.reserved = 0;
        self.start_error = None;
        self.run = Run::Starting { epoch, done };
        epoch
    }

    /// The gauges, with llama.cpp's own counts `kv_cells` and `kv_sequences`.
    pub(crate) fn gauges(&self, kv_cells: usize, kv_sequences: usize) -> LlamaCppGauges {
        LlamaCppGauges {
            live_sequences: self.running.len(),
            queue_len: self.waiting.len(),
            reserved_cells: self.reserved,
            kv_cells,
            kv_sequences,
            pending_removals: self.removals.len(),
            accepted: self.accepted,
            aborts_received: self.aborts_received,
            aborts_running: self.aborts_running,
            aborts_queued: self.aborts_queued,
            steps: self.steps,
            prefill_tokens: self.prefill_tokens,
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
        let ends = Ends::of(&mut request, admission.max_tokens, admission.eos);
        let id = self.next_seq;
        self.next_seq += 1;
        self.accepted += 1;
        let sampling = if admission.sampling.needs_seed() {
            let mut state = self.seed_base.wrapping_add(id);
            admission.sampling.or_seed(splitmix64(&mut state))
        } else {
            admission.sampling
        };
        let seq = Seq {
            request_id: Arc::from(request.id.as_str()),
            tx,
            gctx: Some(gctx),
            prompt: request.token_ids,
            prefilled: 0,
            last: None,
            emitted: 0,
            cells: admission.cells,
            ends,
            sampling,
            slot: None,
        };
        if admission.max_tokens == 0 {
            // Never queued, never holds cells: its only item is the terminal.
            let usage = seq.usage();
            let _ = seq
                .tx
                .try_send(Ok(Chunk::terminal(FinishReason::Length).with_usage(usage)));
            return (id, rx);
        }
        self.ids.entry(seq.request_id.clone()).or_default().push(id);
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        (id, rx)
    }

    /// Whether the thread has nothing to do: no removal owed and no step to run.
    pub(crate) fn is_idle(&self, limits: Limits) -> bool {
        self.removals.is_empty() && self.running.is_empty() && !self.can_admit(limits)
    }

    fn can_admit(&self, limits: Limits) -> bool {
        self.waiting.front().is_some_and(|id| {
            self.seqs.get(id).is_some_and(|s| {
                !self.free_slots.is_empty() && self.reserved + s.cells <= limits.n_ctx
            })
        })
    }

    /// The removals the thread owes llama.cpp now.
    pub(crate) fn take_removals(&mut self) -> Vec<Removal> {
        std::mem::take(&mut self.removals)
    }

    /// The thread removed these slots' cells: give the slots and cells back, and
    /// return the last items to send.
    pub(crate) fn released(&mut self, removals: Vec<Removal>) -> Vec<Outgoing> {
        let mut out = Vec::with_capacity(removals.len());
        for r in removals {
            self.free_slots.push(r.slot);
            self.reserved -= r.cells;
            out.extend(r.last);
        }
        out
    }

    /// Admit queued sequences (in order, while a slot and their cells are free) and
    /// say what the next step decodes: one token for every decoding sequence, then
    /// prompt chunks in admission order within the step's remaining tokens. `None`
    /// when nothing can run.
    pub(crate) fn plan(&mut self, limits: Limits) -> Option<Step> {
        let mut step = Step::default();
        while self.can_admit(limits) {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            let (Some(seq), Some(slot)) = (self.seqs.get_mut(&id), self.free_slots.pop()) else {
                continue;
            };
            seq.slot = Some(slot);
            self.reserved += seq.cells;
            self.running.push(id);
            step.admitted.push((slot, seq.sampling));
        }
        let mut budget = limits.batch_tokens;
        for &id in &self.running {
            let Some(seq) = self.seqs.get(&id) else {
                continue;
            };
            if let (Some(last), Some(slot)) = (seq.last, seq.slot) {
                step.work.push(Work {
                    seq: id,
                    slot,
                    tokens: vec![last],
                    pos0: seq.prompt.len() + seq.emitted as usize - 1,
                    emits: true,
                });
                budget -= 1;
            }
        }
        for &id in &self.running {
            if budget == 0 {
                break;
            }
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            let Some(slot) = seq.slot.filter(|_| seq.last.is_none()) else {
                continue;
            };
            if seq.prefilled == 0 {
                // Kept for the first-token hint.
                step.scheduled.extend(seq.gctx.clone());
            }
            let end = seq.prompt.len().min(seq.prefilled + budget);
            budget -= end - seq.prefilled;
            step.work.push(Work {
                seq: id,
                slot,
                tokens: seq.prompt[seq.prefilled..end].to_vec(),
                pos0: seq.prefilled,
                emits: end == seq.prompt.len(),
            });
        }
        (!step.work.is_empty()).then_some(step)
    }

    /// Take a step's results: `sampled[i]` is the token sampled for `work[i]` when it
    /// emits (`Err`: the step failed, and every sequence in it ends with that error).
    /// Sequences that left the books meanwhile are skipped: their removal is queued.
    pub(crate) fn apply(
        &mut self,
        work: &[Work],
        sampled: Result<Vec<Option<u32>>, EngineError>,
        limits: Limits,
        fx: &mut Effects,
    ) {
        self.steps += 1;
        let sampled = match sampled {
            Ok(sampled) => sampled,
            Err(error) => {
                for w in work {
                    self.end(w.seq, Some(Err(error.clone())), fx);
                }
                return;
            }
        };
        for (w, token) in work.iter().zip(sampled) {
            let Some(seq) = self.seqs.get_mut(&w.seq) else {
                continue;
            };
            if seq.last.is_none() {
                seq.prefilled += w.tokens.len();
                self.prefill_tokens += w.tokens.len() as u64;
            }
            let Some(token) = token.filter(|_| w.emits) else {
                continue;
            };
            seq.emitted += 1;
            seq.last = Some(token);
            self.tokens_emitted += 1;
            let _ = seq.tx.try_send(Ok(Chunk::tokens(vec![token])));
            if seq.emitted == 1 {
                fx.hints.extend(seq.gctx.take());
            }
            let context_full = seq.prompt.len() + seq.emitted as usize >= limits.n_ctx;
            if let Some(reason) = seq.ends.reason(seq.emitted, token, context_full) {
                let usage = seq.usage();
                let item = Ok(Chunk::terminal(reason).with_usage(usage));
                self.end(w.seq, Some(item), fx);
            }
        }
    }

    /// Abort the (oldest live) request `request_id`: it ends with `Cancelled` and the
    /// usage so far. Returns whether one was live.
    pub(crate) fn abort(&mut self, request_id: &str, fx: &mut Effects) -> bool {
        self.aborts_received += 1;
        let Some(&id) = self.ids.get(request_id).and_then(|ids| ids.first()) else {
            return false;
        };
        let Some(seq) = self.seqs.get(&id) else {
            return false;
        };
        if seq.slot.is_some() {
            self.aborts_running += 1;
        } else {
            self.aborts_queued += 1;
        }
        let item = Ok(Chunk::terminal(FinishReason::Cancelled).with_usage(seq.usage()));
        self.end(id, Some(item), fx);
        true
    }

    /// The stream of sequence `id` was dropped before its end: forget the sequence.
    pub(crate) fn detach(&mut self, id: u64, fx: &mut Effects) {
        self.end(id, None, fx);
    }

    /// The engine is cleaned up: every live sequence ends with the shutdown error, every
    /// removal's item goes out, and no thread is current. The cells go with the
    /// thread's context.
    pub(crate) fn shutdown(&mut self) -> Vec<Outgoing> {
        self.fail(&shutdown_error())
    }

    /// No thread serves any more (cleaned up, or the thread died): every live sequence
    /// ends with `error`, every removal's item goes out as it was decided.
    pub(crate) fn fail(&mut self, error: &EngineError) -> Vec<Outgoing> {
        self.run = Run::Stopped;
        let mut out: Vec<Outgoing> = self.removals.drain(..).filter_map(|r| r.last).collect();
        for (_, seq) in self.seqs.drain() {
            out.push((seq.tx, Err(error.clone())));
        }
        self.ids.clear();
        self.waiting.clear();
        self.running.clear();
        self.free_slots.clear();
        self.reserved = 0;
        out
    }

    /// End sequence `id` with `item` (`None`: its stream is gone).
    fn end(&mut self, id: u64, item: Option<Item>, fx: &mut Effects) {
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        if let Some(ids) = self.ids.get_mut(&seq.request_id) {
            ids.retain(|&s| s != id);
            if ids.is_empty() {
                self.ids.remove(&seq.request_id);
            }
        }
        let last = item.map(|item| (seq.tx, item));
        match seq.slot {
            Some(slot) => {
                self.running.retain(|&s| s != id);
                self.removals.push(Removal {
                    slot,
                    cells: seq.cells,
                    last,
                });
                fx.wake = true;
            }
            None => {
                self.waiting.retain(|&s| s != id);
                fx.outgoing.extend(last);
            }
        }
    }
}

#[cfg(test)]
mod tests;
