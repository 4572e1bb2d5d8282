//! The lifecycle machine: a pure transition function over a small `Copy` state.
//!
//! This module owns the *decisions* of a request's life (when to forward, when to
//! abort the engine, when to synthesize a terminal, when to record the outcome) and
//! nothing else: no I/O, no clock, no runtime, no allocation. [`step`] maps a
//! [`State`] and an [`Event`] to the next state and the [`Actions`] the caller must
//! carry out. The driver ([`crate::drive`]) keeps the shared copy of the state in one
//! atomic word ([`SharedState`]) and every actor (the stream poller, the context listener,
//! `Drop`, the first-token hint) applies `step` with a compare-exchange, so exactly one
//! of them wins each decision.
//!
//! The rules of SPEC.md section 4, as this machine implements them:
//!
//! 1. `abort` at most once per request ([`Abort`] moves forward only), never once the
//!    engine's own terminal, error or end was seen (`engine_done`).
//! 2. Stop/kill before a terminal aborts at once, except in [`Mode::Decode`] before the
//!    first token: the abort is [`Abort::Deferred`] until the first non-empty chunk, a
//!    first-token hint or the deferral deadline ([`Actions::arm_deferral`] tells the
//!    driver to start that deadline). A deferred abort is [`Abort::Discarded`] only when
//!    the engine ends by itself first; `Discarded` is final.
//! 3. Token-less chunks never count as the first token.
//! 4. A consumer drop before a terminal records [`OutcomeKind::Dropped`] and aborts,
//!    with the same deferral rule: in decode mode before the first token the abort is
//!    deferred, and the engine's stream is still *drained* ([`State::drains_engine`]):
//!    its first non-empty chunk releases the abort, its end discards it.
//! 5. Kill (and an expired cancel grace after a stop) owes the consumer a synthesized
//!    `Cancelled` terminal, delivered at its next poll ([`Event::ConsumerPoll`]);
//!    [`Actions::wake`] says the consumer must be woken for it. A stop arms the cancel
//!    grace ([`Actions::arm_grace`]).
//! 6. Exactly one terminal reaches the consumer, and every non-terminal chunk before it
//!    is forwarded unless a synthesized terminal is owed; the phase leaves the live
//!    phases once.
//! 7. A setup error is [`Event::EngineError`] while pending: forwarded (returned to the
//!    caller), no abort.
//! 8. Timeouts kill the request and owe a timeout error terminal.
//! 9. Exactly one [`Actions::record`] per request.
//! 10. Setup is just the pending phase: a kill or a drop during setup is the same event
//!     as after it.
//! 11. The deferral deadline and the cancel grace are events that need no consumer poll:
//!     the abort is released, or the terminal owed, by the event itself.
//! 12. An early finish ([`Event::EarlyFinish`]) ends the request as
//!     [`OutcomeKind::Finished`] with the caller's terminal and asks for the abort under
//!     rules 1 and 2, unless a synthesized terminal is already owed.
//!
//! A synthesized terminal is not the engine's terminal: after a decode-mode kill before
//! the first token the consumer gets `Cancelled` at once while the abort stays owed, to
//! be released by the first token, the hint or the deadline even after the consumer has
//! its terminal or is gone.
#![cfg_attr(not(any(feature = "internals", tether_loom)), allow(unreachable_pub))]

mod shared_state;
mod state;

pub use shared_state::{SharedState, StepCache};
pub use state::{Abort, Cancel, Phase, State, Synthesized};

use crate::protocol::Mode;

/// Which optional timer fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timeout {
    /// No token within the time-to-first-token limit.
    FirstToken,
    /// No token within the inter-token limit after the previous one.
    InterToken,
}

/// Everything that can happen to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// The engine yielded a non-terminal chunk with at least one token.
    Chunk,
    /// The engine yielded a non-terminal chunk without tokens (a handshake).
    TokenlessChunk,
    /// The engine yielded a terminal chunk (a finish reason).
    TerminalChunk,
    /// The engine yielded a typed error, or panicked.
    EngineError,
    /// The engine stream ended (`None`) without a terminal.
    EngineEnded,
    /// The engine said, out of band, that the first token exists.
    FirstTokenHint,
    /// `Context::stop`.
    Stop,
    /// `Context::kill`.
    Kill,
    /// The consumer dropped the stream.
    ConsumerDropped,
    /// The deferral deadline of a deferred abort passed.
    DeferralDeadline,
    /// A stopped request did not end within the cancel grace: force it like a kill.
    CancelGraceExpired,
    /// A configured timeout fired.
    Timeout(Timeout),
    /// The consumer polls: deliver any terminal that is owed.
    ConsumerPoll,
    /// The serving side ends the stream itself with a finish reason of its choosing
    /// (a stop string matched, `ResponseStream::finish`): rule 12.
    EarlyFinish,
}

impl Event {
    #[cfg(any(test, feature = "internals", tether_loom))]
    /// Every event, for exhaustive tests and fuzzers.
    pub const ALL: [Event; 15] = [
        Event::Chunk,
        Event::TokenlessChunk,
        Event::TerminalChunk,
        Event::EngineError,
        Event::EngineEnded,
        Event::FirstTokenHint,
        Event::Stop,
        Event::Kill,
        Event::ConsumerDropped,
        Event::DeferralDeadline,
        Event::Timeout(Timeout::FirstToken),
        Event::Timeout(Timeout::InterToken),
        Event::CancelGraceExpired,
        Event::ConsumerPoll,
        Event::EarlyFinish,
    ];

    /// Whether this event comes from the engine's stream (only the poller produces it,
    /// and only while [`State::polls_engine`] holds).
    pub fn is_engine_event(self) -> bool {
        matches!(
            self,
            Event::Chunk
                | Event::TokenlessChunk
                | Event::TerminalChunk
                | Event::EngineError
                | Event::EngineEnded
        )
    }
}

/// How a request ended, as the machine decides it (the driver adds the details: the
/// finish reason, the error kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// The engine's own terminal chunk reached the consumer.
    Finished,
    /// A synthesized `Cancelled` terminal reached the consumer.
    Cancelled,
    /// An engine error (or a synthesized incomplete-stream error) reached the consumer.
    Failed,
    /// The consumer went away before a terminal.
    Dropped,
    /// A timeout error terminal reached the consumer.
    TimedOut,
}

/// What reaches the consumer in one step: at most one thing, and a step that ends the
/// request says how (the outcome to record, exactly once per request). Combinations no
/// rule allows (forwarding and synthesizing at once, an end without an outcome) cannot
/// be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// Nothing for the consumer.
    #[default]
    Nothing,
    /// Pass the engine's non-terminal chunk on.
    Forward,
    /// Pass the engine's terminal or error on: it is the last item, and the request
    /// ends with this outcome ([`OutcomeKind::Finished`] or [`OutcomeKind::Failed`]).
    ForwardLast(OutcomeKind),
    /// Deliver this synthesized terminal instead of any engine item: it is the last
    /// item, and its outcome follows from it.
    Synthesize(Synthesized),
    /// Nothing is delivered by the machine, yet the request is over for the consumer
    /// with this outcome: [`OutcomeKind::Dropped`], or [`OutcomeKind::Finished`] for an
    /// early finish (whose terminal is the caller's).
    End(OutcomeKind),
}

/// What the caller of [`step`] must do. Plain data; `Default` is "nothing".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[must_use = "actions returned by the lifecycle machine must be carried out"]
pub struct Actions {
    /// What reaches the consumer, and whether the request ends.
    pub deliver: Delivery,
    /// Call `LlmEngine::abort` now (exactly once per request: this is set at most once).
    pub abort: bool,
    /// Wake the consumer's poller: a synthesized terminal is newly owed to it.
    pub wake: bool,
    /// The abort was just deferred: start the deferral deadline now, off the consumer's
    /// path (it must fire whether or not the consumer polls).
    pub arm_deferral: bool,
    /// A stop just landed: start the cancel grace now, off the consumer's path.
    pub arm_grace: bool,
}

impl Actions {
    #[cfg(any(test, feature = "internals", tether_loom))]
    /// Whether nothing is to be done.
    pub fn is_empty(&self) -> bool {
        *self == Actions::default()
    }

    /// The steady state of a stream: a non-terminal chunk to pass on, and nothing else
    /// to do.
    #[inline]
    pub fn is_steady(&self) -> bool {
        self.deliver == Delivery::Forward && !self.abort
    }

    /// Whether the engine's item goes to the consumer.
    pub fn forward(&self) -> bool {
        matches!(self.deliver, Delivery::Forward | Delivery::ForwardLast(_))
    }

    /// The synthesized terminal delivered instead of any engine item, if any.
    #[cfg(any(test, feature = "internals", tether_loom))]
    pub fn emit(&self) -> Option<Synthesized> {
        match self.deliver {
            Delivery::Synthesize(synth) => Some(synth),
            _ => None,
        }
    }

    /// The outcome to record, if this step ends the request (once per request).
    pub fn record(&self) -> Option<OutcomeKind> {
        match self.deliver {
            Delivery::ForwardLast(kind) | Delivery::End(kind) => Some(kind),
            Delivery::Synthesize(synth) => Some(outcome_of(synth)),
            Delivery::Nothing | Delivery::Forward => None,
        }
    }
}

/// The transitions' building blocks: each one a rule of SPEC.md section 4.
impl State {
    /// Ask for the engine abort (rules 1 and 2). Idempotent: an abort already deferred,
    /// sent or discarded is left as it is.
    fn request_abort(&mut self, acts: &mut Actions) {
        if self.abort != Abort::None || self.engine_done {
            return;
        }
        if self.mode == Mode::Decode && !self.first_token {
            // A decode worker before its first token may be mid KV-cache transfer:
            // aborting now can corrupt the transfer, so hold the abort back.
            self.abort = Abort::Deferred;
            acts.arm_deferral = true;
        } else {
            self.abort = Abort::Sent;
            acts.abort = true;
        }
    }

    fn release_deferred(&mut self, acts: &mut Actions) {
        if self.abort == Abort::Deferred {
            self.abort = Abort::Sent;
            acts.abort = true;
        }
    }

    fn discard_deferred(&mut self) {
        if self.abort == Abort::Deferred {
            self.abort = Abort::Discarded;
        }
    }

    fn saw_first_token(&mut self, acts: &mut Actions) {
        self.first_token = true;
        if self.phase == Phase::Pending {
            self.phase = Phase::Streaming;
        }
        self.release_deferred(acts);
    }

    /// Deliver the owed synthesized terminal: the request is over for the consumer.
    fn deliver_pending(&mut self, acts: &mut Actions) {
        if let Some(synth) = self.pending_terminal.take() {
            self.phase = Phase::Terminal;
            acts.deliver = Delivery::Synthesize(synth);
        }
    }

    /// Kill-like cancellation: owe `synth`, ask for the abort.
    fn force(&mut self, synth: Synthesized, acts: &mut Actions) {
        self.cancel = Cancel::Kill;
        self.phase = Phase::Cancelling;
        self.pending_terminal = Some(synth);
        self.request_abort(acts);
        acts.wake = true; // the consumer must come and take its terminal
    }

    /// An engine event after the consumer's end: it only matters to a deferred abort,
    /// which the drained engine releases (first token) or discards (its own end).
    fn drained(&mut self, event: Event, acts: &mut Actions) {
        if !self.drains_engine() {
            return;
        }
        match event {
            Event::Chunk => {
                self.first_token = true;
                self.release_deferred(acts);
            }
            Event::TerminalChunk | Event::EngineError | Event::EngineEnded => {
                self.engine_done = true;
                self.discard_deferred();
            }
            _ => {}
        }
    }

    fn is_live(&self) -> bool {
        !self.is_over()
    }
}

fn outcome_of(synth: Synthesized) -> OutcomeKind {
    match synth {
        Synthesized::Cancelled => OutcomeKind::Cancelled,
        Synthesized::FirstTokenTimeout | Synthesized::InterTokenTimeout => OutcomeKind::TimedOut,
        Synthesized::Incomplete => OutcomeKind::Failed,
    }
}

/// The transition function: the whole lifecycle policy. Pure and total: every
/// `(state, event)` pair has an answer, events that no longer matter are ignored.
pub fn step(state: State, event: Event) -> (State, Actions) {
    let mut s = state;
    let mut acts = Actions::default();
    match event {
        _ if event.is_engine_event() && (!s.is_live() || s.engine_done) => {
            // Nothing reaches the consumer after its end; an engine still drained for a
            // deferred abort can only release or discard it.
            s.drained(event, &mut acts);
        }
        Event::Chunk => {
            s.saw_first_token(&mut acts);
            if s.pending_terminal.is_some() {
                // A kill (or timeout) won the race against this chunk: the consumer
                // gets the synthesized terminal instead.
                s.deliver_pending(&mut acts);
            } else {
                acts.deliver = Delivery::Forward;
            }
        }
        Event::TokenlessChunk => {
            if s.pending_terminal.is_some() {
                s.deliver_pending(&mut acts);
            } else {
                acts.deliver = Delivery::Forward;
            }
        }
        Event::TerminalChunk | Event::EngineError => {
            s.engine_done = true;
            s.discard_deferred();
            if s.pending_terminal.is_some() {
                s.deliver_pending(&mut acts);
            } else {
                s.phase = Phase::Terminal;
                acts.deliver = Delivery::ForwardLast(if event == Event::TerminalChunk {
                    OutcomeKind::Finished
                } else {
                    OutcomeKind::Failed
                });
            }
        }
        Event::EngineEnded => {
            s.engine_done = true;
            s.discard_deferred();
            if s.pending_terminal.is_none() {
                s.pending_terminal = Some(if s.cancel == Cancel::None {
                    Synthesized::Incomplete
                } else {
                    Synthesized::Cancelled
                });
            }
            s.deliver_pending(&mut acts);
        }
        Event::FirstTokenHint => {
            if !s.first_token {
                if s.is_live() {
                    s.saw_first_token(&mut acts);
                } else {
                    // After the end the hint can only release an owed abort.
                    s.first_token = true;
                    s.release_deferred(&mut acts);
                }
            }
        }
        Event::Stop => {
            if s.is_live() && s.cancel == Cancel::None {
                s.cancel = Cancel::Stop;
                s.phase = Phase::Cancelling;
                s.request_abort(&mut acts);
                acts.arm_grace = true;
            }
        }
        Event::Kill => {
            if s.is_live() && s.cancel != Cancel::Kill {
                s.force(Synthesized::Cancelled, &mut acts);
            }
        }
        Event::ConsumerDropped => {
            if s.is_live() {
                s.phase = Phase::Dropped;
                s.pending_terminal = None;
                acts.deliver = Delivery::End(OutcomeKind::Dropped);
                // Rule 4: the work must not leak, with rule 2's deferral; a deferred
                // abort stays owed and the driver drains the engine until it is settled.
                s.request_abort(&mut acts);
            }
        }
        Event::DeferralDeadline => s.release_deferred(&mut acts),
        Event::CancelGraceExpired => {
            if s.is_live() && s.cancel == Cancel::Stop && s.pending_terminal.is_none() {
                s.force(Synthesized::Cancelled, &mut acts);
            }
        }
        Event::Timeout(Timeout::FirstToken) => {
            if s.is_live() && !s.first_token && s.pending_terminal.is_none() && !s.engine_done {
                s.force(Synthesized::FirstTokenTimeout, &mut acts);
            }
        }
        Event::Timeout(Timeout::InterToken) => {
            if s.is_live() && s.first_token && s.pending_terminal.is_none() && !s.engine_done {
                s.force(Synthesized::InterTokenTimeout, &mut acts);
            }
        }
        Event::ConsumerPoll => {
            if s.is_live() {
                s.deliver_pending(&mut acts);
            }
        }
        Event::EarlyFinish => {
            // Rule 12: the caller's terminal ends the stream, unless a kill or timeout
            // already owes one (it won the race). The engine is aborted like for a drop.
            if s.is_live() && s.pending_terminal.is_none() {
                s.phase = Phase::Terminal;
                acts.deliver = Delivery::End(OutcomeKind::Finished);
                s.request_abort(&mut acts);
            }
        }
    }
    (s, acts)
}

pub mod deadlines;
#[cfg(any(test, feature = "internals", tether_loom))]
pub mod oracle;

#[cfg(all(test, not(tether_loom)))]
mod tests;
