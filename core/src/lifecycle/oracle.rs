//! The invariant oracle: an independent observer of a request's event sequence that
//! checks every rule of SPEC.md section 4 after each step.
//!
//! It is written from the rules, not from [`super::step`]: it keeps its own record of
//! what was seen (aborts issued, terminals delivered, outcomes recorded, first-token
//! evidence) and judges each step's [`Actions`]. The exhaustive test, the property
//! tests and the fuzz targets all use it, so a rule is stated once.

use super::{Actions, Event, OutcomeKind, State, Synth, Timeout};
use crate::protocol::Mode;

/// A broken rule, with the rule's number in SPEC.md section 4.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule} broken at step {step} ({event:?}): {what}")]
pub struct Violation {
    /// The rule number (1 to 9).
    pub rule: u8,
    /// The index of the offending event in the sequence.
    pub step: usize,
    /// The offending event.
    pub event: Event,
    /// What went wrong.
    pub what: &'static str,
}

/// Follows one request; feed it every `(event, actions)` pair in order, then [`close`].
///
/// [`close`]: Oracle::close
#[derive(Clone, Debug)]
pub struct Oracle {
    mode: Mode,
    step: usize,
    aborts: u32,
    terminals: u32,
    finishes: u32,
    /// The engine's own end (terminal, error, end of stream) was seen.
    engine_done: bool,
    /// A non-empty chunk or the hint was seen.
    first_evidence: bool,
    /// A synthesized terminal is owed (kill, grace, timeout) and not yet delivered.
    owed: Option<Synth>,
    /// Stop, kill or a timeout was seen while live.
    cancelled: bool,
    /// An abort is due but deferred (decode mode before the first token).
    abort_deferred: bool,
    /// The consumer dropped the stream.
    dropped: bool,
}

impl Oracle {
    /// A fresh request in `mode`.
    pub fn new(mode: Mode) -> Oracle {
        Oracle {
            mode,
            step: 0,
            aborts: 0,
            terminals: 0,
            finishes: 0,
            engine_done: false,
            first_evidence: false,
            owed: None,
            cancelled: false,
            abort_deferred: false,
            dropped: false,
        }
    }

    fn live(&self) -> bool {
        self.finishes == 0
    }

    fn fail(&self, rule: u8, event: Event, what: &'static str) -> Result<(), Violation> {
        Err(Violation {
            rule,
            step: self.step,
            event,
            what,
        })
    }

    /// Judge one step: `event` was applied and `acts` came out; `after` is the state
    /// it moved to (checked for consistency with what the oracle saw).
    pub fn observe(&mut self, event: Event, acts: Actions, after: State) -> Result<(), Violation> {
        let r = self.judge(event, acts, after);
        self.step += 1;
        r
    }

    fn judge(&mut self, event: Event, acts: Actions, after: State) -> Result<(), Violation> {
        let was_live = self.live();
        let engine_polled = was_live && !self.engine_done && self.owed.is_none();
        let delivers = acts.emit.is_some()
            || (acts.forward && matches!(event, Event::TerminalChunk | Event::EngineError));

        // What the event means, before judging the actions.
        let mut first_now = false;
        match event {
            Event::Chunk if was_live && !self.engine_done => first_now = true,
            Event::FirstTokenHint => first_now = true,
            _ => {}
        }
        let first_before = self.first_evidence;
        if first_now {
            self.first_evidence = true;
        }

        // Rule 6: nothing reaches the consumer after a terminal; only engine items are forwarded.
        if acts.forward && (!engine_polled || !event.is_engine_event()) {
            return self.fail(6, event, "an item was forwarded when none may be");
        }
        if (acts.forward || acts.emit.is_some()) && !was_live {
            return self.fail(6, event, "something reached the consumer after the end");
        }
        if acts.forward && event == Event::EngineEnded {
            return self.fail(6, event, "the end of the engine stream was forwarded");
        }

        // Rule 1: at most one abort, never after the engine's own end.
        if acts.abort {
            self.aborts += 1;
            if self.aborts > 1 {
                return self.fail(1, event, "abort issued twice");
            }
            if self.engine_done {
                return self.fail(1, event, "abort issued after the engine's terminal");
            }
            // Rule 2: a decode worker is not aborted before its first token, unless the
            // deferral deadline passed.
            if self.mode == Mode::Decode && !self.first_evidence && event != Event::DeferralDeadline
            {
                return self.fail(2, event, "decode abort before the first token");
            }
        }

        // Rules 2 and 4: cancellation before the end asks for the abort.
        let cancels = matches!(
            event,
            Event::Stop
                | Event::Kill
                | Event::ConsumerDropped
                | Event::Timeout(Timeout::FirstToken)
                | Event::Timeout(Timeout::InterToken)
        );
        let newly_cancels = match event {
            Event::Stop | Event::Kill => was_live && !self.cancelled,
            Event::ConsumerDropped => was_live,
            Event::Timeout(Timeout::FirstToken) => {
                was_live && !first_before && self.owed.is_none() && !self.engine_done
            }
            Event::Timeout(Timeout::InterToken) => {
                was_live && first_before && self.owed.is_none() && !self.engine_done
            }
            _ => false,
        };
        if cancels && newly_cancels && !self.engine_done && self.aborts == 0 && !self.abort_deferred
        {
            let must_defer = self.mode == Mode::Decode && !self.first_evidence;
            if must_defer {
                if acts.abort {
                    return self.fail(2, event, "decode abort not deferred");
                }
                // A drop discards the deferred abort at once: no one is left to release it.
                self.abort_deferred = event != Event::ConsumerDropped;
            } else if !acts.abort {
                return self.fail(
                    if event == Event::ConsumerDropped {
                        4
                    } else {
                        2
                    },
                    event,
                    "cancellation before the end did not abort",
                );
            }
        }
        // A deferred abort is released by the first token or the deadline...
        if self.abort_deferred
            && !self.engine_done
            && (first_now || event == Event::DeferralDeadline)
            && event != Event::ConsumerDropped
        {
            if !acts.abort {
                return self.fail(2, event, "deferred abort not released");
            }
            self.abort_deferred = false;
        }
        if acts.abort {
            self.abort_deferred = false;
        }

        // Rule 5, 8: what a kill, an expired grace or a timeout owes the consumer.
        if was_live && self.owed.is_none() && !self.engine_done {
            match event {
                Event::Kill => self.owed = Some(Synth::Cancelled),
                Event::Timeout(Timeout::CancelGrace) if self.cancelled => {
                    self.owed = Some(Synth::Cancelled);
                }
                Event::Timeout(Timeout::FirstToken) if !first_before => {
                    self.owed = Some(Synth::FirstTokenTimeout);
                }
                Event::Timeout(Timeout::InterToken) if first_before => {
                    self.owed = Some(Synth::InterTokenTimeout);
                }
                _ => {}
            }
        }
        if was_live && matches!(event, Event::Stop | Event::Kill) {
            self.cancelled = true;
        }
        if matches!(
            event,
            Event::Timeout(Timeout::FirstToken | Timeout::InterToken)
        ) && self.owed.is_some()
        {
            self.cancelled = true;
        }

        // Rule 5, 6, 8: which terminal, if any, this step must deliver.
        let expected: Option<Option<Synth>> = if !was_live {
            None
        } else if self.owed.is_some()
            && (event == Event::ConsumerPoll || (engine_polled_after_owed(event, self.engine_done)))
        {
            Some(self.owed)
        } else if event == Event::EngineEnded && !self.engine_done {
            Some(Some(if self.cancelled {
                Synth::Cancelled
            } else {
                Synth::Incomplete
            }))
        } else if matches!(event, Event::TerminalChunk | Event::EngineError) && !self.engine_done {
            Some(None) // the engine's own terminal is forwarded
        } else {
            None
        };
        match expected {
            Some(Some(synth)) => {
                if acts.emit != Some(synth) {
                    return self.fail(
                        if synth == Synth::Incomplete { 6 } else { 5 },
                        event,
                        "the owed terminal was not delivered",
                    );
                }
            }
            Some(None) => {
                if !acts.forward {
                    return self.fail(6, event, "the engine's terminal was not forwarded");
                }
            }
            None => {
                if delivers {
                    return self.fail(6, event, "a terminal was delivered when none was due");
                }
            }
        }
        if delivers {
            self.terminals += 1;
            self.owed = None;
            if self.terminals > 1 {
                return self.fail(6, event, "two terminals delivered");
            }
        }
        if matches!(
            event,
            Event::TerminalChunk | Event::EngineError | Event::EngineEnded
        ) && was_live
        {
            if !self.engine_done {
                self.abort_deferred = false; // the engine ended by itself: discarded
            }
            self.engine_done = true;
        }

        // Rule 9: exactly one outcome, with the end that caused it.
        if let Some(kind) = acts.finish {
            self.finishes += 1;
            if self.finishes > 1 {
                return self.fail(9, event, "outcome recorded twice");
            }
            let dropped_now = event == Event::ConsumerDropped;
            if dropped_now != (kind == OutcomeKind::Dropped) {
                return self.fail(9, event, "the outcome does not match the end");
            }
            if !dropped_now && !delivers {
                return self.fail(9, event, "outcome recorded without a terminal");
            }
        } else if delivers || (was_live && event == Event::ConsumerDropped) {
            return self.fail(9, event, "the request ended without an outcome");
        }
        if event == Event::ConsumerDropped && was_live {
            self.dropped = true;
            self.abort_deferred = false; // rule 2: discarded when the stream is dropped first
        }

        // The machine's own view must agree with what was observed.
        if after.is_finished() == self.live() {
            return self.fail(9, event, "the state's phase disagrees with the outcome");
        }
        if after.abort_deferred() != self.abort_deferred {
            return self.fail(
                2,
                event,
                "the state's deferred abort disagrees with the rules",
            );
        }
        Ok(())
    }

    /// The sequence is over: the consumer dropped the stream (feed
    /// [`Event::ConsumerDropped`] first if it had not). Exactly one outcome must exist.
    pub fn close(&self) -> Result<(), Violation> {
        if self.finishes != 1 {
            return Err(Violation {
                rule: 9,
                step: self.step,
                event: Event::ConsumerDropped,
                what: "a finished request must have exactly one outcome",
            });
        }
        Ok(())
    }

    /// How many aborts were issued.
    pub fn aborts(&self) -> u32 {
        self.aborts
    }
}

/// An engine event while a synthesized terminal is owed delivers that terminal (the
/// kill won the race against the poll that produced the event).
fn engine_polled_after_owed(event: Event, engine_done: bool) -> bool {
    event.is_engine_event() && !engine_done
}

/// Run `events` from a fresh state through [`super::step`] with the oracle watching,
/// then close with a consumer drop. Returns the final state.
pub fn check_sequence(mode: Mode, events: &[Event]) -> Result<State, Violation> {
    let mut state = State::new(mode);
    let mut oracle = Oracle::new(mode);
    for &event in events {
        let (next, acts) = super::step(state, event);
        oracle.observe(event, acts, next)?;
        state = next;
    }
    let (next, acts) = super::step(state, Event::ConsumerDropped);
    oracle.observe(Event::ConsumerDropped, acts, next)?;
    oracle.close()?;
    Ok(next)
}
