//! The simulator's books: every sequence it knows, the waiting queue, the running
//! batch, the KV-block pool, and the counters behind [`SimGauges`].
//!
//! Owns all bookkeeping and the per-step token decisions, under one mutex held by the
//! engine. Must not await, sleep or spawn: the scheduler loop ([`super::scheduler`])
//! owns time, and nothing here calls back into tether while the lock is held (the
//! scheduling signals an admission produces and the first-token hints a step produces
//! are returned to the caller to deliver).
//!
//! # Why ended requests linger
//! An abort is *decided* by tether before it sees the engine's end, but it *runs* later,
//! on a task. So an abort can legitimately arrive after the sequence finished, when its
//! terminal was still in the channel, or read while the request was already being
//! cancelled, or when the stream was dropped unread. Such a sequence is kept as
//! [`Phase::Lingering`] (bounded by `linger_capacity`) so that its abort is answered
//! [`AbortReceipt::AfterEnd`]. Only an abort for a sequence whose end tether read while
//! nobody was cancelling it, for an unknown id, or a second abort, is
//! [`AbortReceipt::Late`]: tether promised never to send those.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_channel::{Receiver, Sender};
use tether_core::engine::GenerateContext;
use tether_core::error::{BackendError, EngineError, ErrorKind};
use tether_core::protocol::{Chunk, FinishReason, Request, Usage};

use super::chaos::Chaos;
use super::config::SimConfig;
use super::rng::Rng;
use crate::abort::AbortReceipt;
use crate::util::{shutdown_error, LoopControl};

/// What flows through a request's channel to its stream.
pub(crate) type Item = Result<Chunk, EngineError>;

/// A snapshot of the engine's gauges and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimGauges {
    /// Sequences holding a batch slot (running or hung).
    pub live_slots: usize,
    /// KV blocks reserved by those sequences.
    pub kv_blocks_used: usize,
    /// Requests waiting for a slot or KV blocks.
    pub queue_len: usize,
    /// Running sequences that hang (chaos) until aborted or dropped.
    pub hung: usize,
    /// Ended requests remembered because an abort may still arrive for them.
    pub lingering: usize,
    /// Requests accepted by `generate` since the engine was created.
    pub accepted: u64,
    /// `abort` calls received, late ones included.
    pub aborts_received: u64,
    /// Aborts that found nothing to abort ([`AbortReceipt::Late`]).
    pub late_aborts: u64,
}

/// Where a sequence is in the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In the queue: no slot, no blocks.
    Waiting,
    /// In the batch: holds a slot and its blocks.
    Running,
    /// In the batch, never producing again (chaos).
    Hung,
    /// Ended by the engine (terminal or error sent); its stream has not read it yet.
    Ended,
    /// Over; kept only to recognize an abort that may still arrive.
    Lingering,
}

impl Phase {
    fn is_live(self) -> bool {
        matches!(self, Phase::Waiting | Phase::Running | Phase::Hung)
    }
}

struct Seq {
    request_id: Arc<str>,
    phase: Phase,
    /// `None` once the engine's end was sent (the channel then closes after it).
    tx: Option<Sender<Item>>,
    /// For the scheduling signal (while waiting) and the first-token hint (when the
    /// config asks for it); dropped once it is no longer needed.
    gctx: Option<GenerateContext>,
    prompt_tokens: u32,
    blocks: usize,
    max_tokens: u32,
    emitted: u32,
    rng: Rng,
    stop_token_ids: Vec<u32>,
    eos_token_ids: Vec<u32>,
    min_tokens: u32,
    chaos: Option<Chaos>,
    /// [`ECHO_ANNOTATION`](super::ECHO_ANNOTATION): the prompt, emitted again in a loop.
    echo: Option<Box<[u32]>>,
}

impl Seq {
    fn usage(&self) -> Usage {
        Usage::new(self.prompt_tokens, self.emitted)
    }
}

/// What one step does to one running sequence.
enum Advance {
    Token(u32, Option<FinishReason>),
    Error,
    Hang,
}

/// A request that passed validation, ready to be queued.
#[derive(Clone, Copy)]
pub(crate) struct Admission {
    pub(crate) max_tokens: u32,
    pub(crate) blocks: usize,
    pub(crate) chaos: Option<Chaos>,
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
    hung: usize,
    blocks_used: usize,
    linger: VecDeque<u64>,
    lingering: usize,
    accepted: u64,
    aborts_received: u64,
    late_aborts: u64,
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
            hung: 0,
            blocks_used: 0,
            linger: VecDeque::new(),
            lingering: 0,
            accepted: 0,
            aborts_received: 0,
            late_aborts: 0,
        }
    }

    pub(crate) fn gauges(&self) -> SimGauges {
        SimGauges {
            live_slots: self.running.len(),
            kv_blocks_used: self.blocks_used,
            queue_len: self.waiting.len(),
            hung: self.hung,
            lingering: self.lingering,
            accepted: self.accepted,
            aborts_received: self.aborts_received,
            late_aborts: self.late_aborts,
        }
    }

    /// Queue `request`; returns its sequence number and the receiving end of its
    /// channel. A request with `max_tokens = 0` ends at once with `Length`.
    pub(crate) fn insert(
        &mut self,
        cfg: &SimConfig,
        request: Request,
        admission: Admission,
        gctx: GenerateContext,
    ) -> (u64, Receiver<Item>) {
        let (tx, rx) = async_channel::unbounded();
        let id = self.next_seq;
        self.next_seq += 1;
        self.accepted += 1;
        let request_id: Arc<str> = Arc::from(request.id.as_str());
        let seq = Seq {
            request_id: request_id.clone(),
            phase: Phase::Waiting,
            tx: Some(tx),
            gctx: Some(gctx),
            prompt_tokens: u32::try_from(request.token_ids.len()).unwrap_or(u32::MAX),
            blocks: admission.blocks,
            max_tokens: admission.max_tokens,
            emitted: 0,
            rng: Rng::for_prompt(cfg.seed, request.sampling.seed, &request.token_ids),
            stop_token_ids: request.stop.stop_token_ids,
            eos_token_ids: if request.stop.ignore_eos {
                Vec::new()
            } else {
                request.eos_token_ids
            },
            min_tokens: request.stop.min_tokens.unwrap_or(0),
            chaos: admission.chaos,
            echo: (request
                .annotations
                .iter()
                .any(|a| a == super::ECHO_ANNOTATION)
                && !request.token_ids.is_empty())
            .then(|| request.token_ids.into()),
        };
        self.seqs.insert(id, seq);
        self.ids.entry(request_id).or_default().push(id);
        if admission.max_tokens == 0 {
            let usage = self.seqs[&id].usage();
            self.end(
                id,
                Ok(Chunk::terminal(FinishReason::Length).with_usage(usage)),
            );
        } else {
            self.waiting.push_back(id);
            self.control.kick();
        }
        (id, rx)
    }

    /// Admit waiting sequences (FIFO, while a slot and their blocks are free), adding
    /// the context of each admitted one to `scheduled` (owed the scheduling signal);
    /// returns how long the next step takes, or `None` when no sequence can produce.
    pub(crate) fn admit(
        &mut self,
        cfg: &SimConfig,
        scheduled: &mut Vec<GenerateContext>,
    ) -> Option<std::time::Duration> {
        let mut prefill = 0usize;
        while let Some(&id) = self.waiting.front() {
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if self.running.len() >= cfg.max_sequences
                || self.blocks_used + seq.blocks > cfg.kv_blocks
            {
                break;
            }
            self.waiting.pop_front();
            seq.phase = Phase::Running;
            // Kept for the first-token hint only if the config asks for one.
            let gctx = if cfg.first_token_hint {
                seq.gctx.clone()
            } else {
                seq.gctx.take()
            };
            scheduled.extend(gctx);
            self.blocks_used += seq.blocks;
            self.running.push(id);
            prefill += seq.prompt_tokens as usize;
        }
        let active = self.running.len() - self.hung;
        (active > 0).then(|| cfg.step_cost(active, prefill))
    }

    /// One decode step over the running batch: each producing sequence emits one token
    /// (or its chaos). Returns the contexts owed a first-token hint.
    pub(crate) fn step(&mut self, cfg: &SimConfig) -> Vec<GenerateContext> {
        let mut hints = Vec::new();
        let batch: Vec<u64> = self.running.clone();
        for id in batch {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if seq.phase != Phase::Running {
                continue;
            }
            let step = seq.emitted;
            match advance(seq, cfg.vocab_size) {
                Advance::Error => {
                    let err = EngineError::new(
                        ErrorKind::Backend(BackendError::Unknown),
                        format!("injected engine error at step {step}"),
                    );
                    self.end(id, Err(err));
                }
                Advance::Hang => {
                    seq.phase = Phase::Hung;
                    self.hung += 1;
                }
                Advance::Token(token, finish) => {
                    if let Some(tx) = &seq.tx {
                        let _ = tx.try_send(Ok(Chunk::tokens(vec![token])));
                    }
                    if step == 0 {
                        hints.extend(seq.gctx.take());
                    }
                    if let Some(reason) = finish {
                        let usage = seq.usage();
                        self.end(id, Ok(Chunk::terminal(reason).with_usage(usage)));
                    }
                }
            }
        }
        hints
    }

    /// The engine ends sequence `id` with `item` (its terminal or error): the item is
    /// sent, the channel closes behind it, the slot and blocks are freed.
    fn end(&mut self, id: u64, item: Item) {
        self.release(id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            if let Some(tx) = seq.tx.take() {
                // Unbounded: only fails when the stream is gone, and then nobody cares.
                let _ = tx.try_send(item);
            }
            seq.gctx = None;
            seq.phase = Phase::Ended;
        }
    }

    /// Free whatever sequence `id` holds (queue place, slot, blocks).
    fn release(&mut self, id: u64) {
        let Some(seq) = self.seqs.get(&id) else {
            return;
        };
        match seq.phase {
            Phase::Waiting => self.waiting.retain(|&w| w != id),
            Phase::Running | Phase::Hung => {
                if seq.phase == Phase::Hung {
                    self.hung -= 1;
                }
                self.blocks_used -= seq.blocks;
                if let Some(pos) = self.running.iter().position(|&r| r == id) {
                    self.running.remove(pos);
                }
                // Capacity came back: queued requests may fit now.
                self.control.kick();
            }
            Phase::Ended | Phase::Lingering => {}
        }
    }

    /// The stream read its sequence's end; `cancelling` says whether the request's
    /// context was stopped or killed by then (an abort may be on its way).
    pub(crate) fn read_end(&mut self, cfg: &SimConfig, id: u64, cancelling: bool) {
        match self.seqs.get(&id).map(|s| s.phase) {
            Some(Phase::Ended) if cancelling => self.linger(cfg, id),
            Some(Phase::Ended) => self.remove(id),
            _ => {}
        }
    }

    /// The stream was dropped before it read its end. A panicked stream's end is the
    /// panic, which tether saw: no abort may follow, so nothing lingers.
    pub(crate) fn detach(&mut self, cfg: &SimConfig, id: u64, panicked: bool) {
        let Some(phase) = self.seqs.get(&id).map(|s| s.phase) else {
            return;
        };
        if phase == Phase::Lingering {
            return;
        }
        self.release(id);
        if panicked {
            self.remove(id);
        } else {
            self.linger(cfg, id);
        }
    }

    /// Abort the request `request_id` (see [`AbortReceipt`]).
    pub(crate) fn abort(&mut self, request_id: &str) -> AbortReceipt {
        self.aborts_received += 1;
        let target = self.ids.get(request_id).and_then(|ids| {
            // Ids may repeat: prefer a live sequence, then the oldest one.
            ids.iter()
                .copied()
                .find(|id| self.seqs.get(id).is_some_and(|s| s.phase.is_live()))
                .or_else(|| ids.first().copied())
        });
        let Some(id) = target else {
            self.late_aborts += 1;
            return AbortReceipt::Late;
        };
        let live = self.seqs.get(&id).map(|s| (s.phase.is_live(), s.usage()));
        let receipt = match live {
            Some((true, usage)) => {
                self.end(
                    id,
                    Ok(Chunk::terminal(FinishReason::Cancelled).with_usage(usage)),
                );
                AbortReceipt::Live
            }
            _ => AbortReceipt::AfterEnd,
        };
        self.remove(id);
        receipt
    }

    /// Stop the scheduler loop, end every sequence with an `EngineShutdown` error and
    /// forget everything.
    pub(crate) fn shutdown(&mut self) {
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        for id in ids {
            if self.seqs.get(&id).is_some_and(|s| s.phase.is_live()) {
                self.end(id, Err(shutdown_error()));
            }
        }
        self.seqs.clear();
        self.ids.clear();
        self.waiting.clear();
        self.running.clear();
        self.linger.clear();
        self.hung = 0;
        self.blocks_used = 0;
        self.lingering = 0;
        self.control.stop();
    }

    fn linger(&mut self, cfg: &SimConfig, id: u64) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        seq.phase = Phase::Lingering;
        seq.tx = None;
        seq.gctx = None;
        seq.stop_token_ids = Vec::new();
        seq.eos_token_ids = Vec::new();
        self.lingering += 1;
        self.linger.push_back(id);
        while self.linger.len() > cfg.linger_capacity {
            let Some(old) = self.linger.pop_front() else {
                break;
            };
            if self
                .seqs
                .get(&old)
                .is_some_and(|s| s.phase == Phase::Lingering)
            {
                self.remove(old);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        if seq.phase == Phase::Lingering {
            self.lingering -= 1;
        }
        if let Some(ids) = self.ids.get_mut(&seq.request_id) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.ids.remove(&seq.request_id);
            }
        }
    }
}

/// Decide sequence `seq`'s next step (chaos first, then a token and whether it ends).
fn advance(seq: &mut Seq, vocab_size: u32) -> Advance {
    let step = seq.emitted;
    match seq.chaos {
        Some(Chaos::Error(k)) if k == step => return Advance::Error,
        Some(Chaos::Hang(k)) if k == step => return Advance::Hang,
        _ => {}
    }
    let token = match &seq.echo {
        // The prompt is not empty (checked at admission); the index wraps around it.
        Some(prompt) => prompt[seq.emitted as usize % prompt.len()],
        None => (seq.rng.next_u64() % u64::from(vocab_size.max(1))) as u32,
    };
    seq.emitted += 1;
    let may_stop = seq.emitted >= seq.min_tokens;
    let finish = if may_stop && seq.stop_token_ids.contains(&token) {
        Some(FinishReason::Stop)
    } else if may_stop && seq.eos_token_ids.contains(&token) {
        Some(FinishReason::Eos)
    } else if seq.emitted >= seq.max_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    Advance::Token(token, finish)
}
