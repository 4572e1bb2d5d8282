//! The invariant oracle: an independent observer of a request's event sequence that
//! checks every rule of SPEC.md section 4 that a pure model can express, after each step.
//!
//! It is written from the rules, not from [`super::step`]: it keeps its own record of
//! what was seen (aborts issued, terminals delivered, outcomes recorded, first-token
//! evidence, what is owed) and judges each step's [`Actions`] *exactly*: an action that
//! is missing is as much a violation as one that is wrong. The reachable-state proof,
//! the property tests and the fuzz targets all use it, so a rule is stated once.
//!
//! Its memory is finite ([`OracleState`]: flags and saturating counters), so the pairs
//! (machine state, oracle state) reachable from a fresh request can be enumerated: that
//! is what proves the rules for event sequences of every length.
//!
//! The rules it checks, by SPEC.md number:
//! - 1: at most one abort, never after the engine's own terminal, error or end;
//! - 2: a cancellation before the end aborts at once, or, in decode mode before the
//!   first token, defers the abort (and says to arm the deferral deadline); a deferred
//!   abort is sent at the first non-empty chunk (also one drained after the consumer's
//!   end), the hint or the deadline, and discarded only by the engine's own end;
//!   `Discarded` is final;
//! - 3: token-less chunks are no first-token evidence;
//! - 4: a drop before a terminal records `Dropped` and aborts (same deferral);
//! - 5: kill and an expired grace owe a `Cancelled` terminal (and wake the consumer),
//!   delivered at its next poll or engine event; a stop arms the grace, keeps chunks
//!   flowing, and an engine end after it is `Cancelled`;
//! - 6: every non-terminal chunk is forwarded while no terminal is owed; exactly one
//!   terminal reaches the consumer; nothing after it;
//! - 7: a setup error (an engine error while pending) is forwarded with no abort;
//! - 8: timeouts owe their error terminal and abort like a kill;
//! - 9: exactly one outcome, matching the end;
//! - 10: a kill or drop during setup is the same event as after it (nothing to add);
//! - 11: the deferral deadline and the cancel grace act in their own step, without a
//!   consumer poll;
//! - 12: an early finish while live and nothing owed ends the request with the caller's
//!   terminal (neither forwarded nor synthesized by the machine), records `Finished`
//!   and aborts like a drop (same deferral).

use super::{Abort, Actions, Cancel, Event, OutcomeKind, State, Synthesized, Timeout};
use crate::protocol::Mode;

/// A broken rule, with the rule's number in SPEC.md section 4.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule} broken at step {step} ({event:?}): {what}")]
pub struct Violation {
    /// The rule number (1 to 12).
    pub rule: u8,
    /// The index of the offending event in the sequence.
    pub step: usize,
    /// The offending event.
    pub event: Event,
    /// What went wrong.
    pub what: &'static str,
}

/// What the oracle remembers of a request: finite, so reachable pairs can be enumerated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OracleState {
    mode: Mode,
    /// Aborts issued (saturating: a second one is already a violation).
    aborts: u8,
    /// The abort is deferred, waiting for the first token, the hint or the deadline.
    deferred: bool,
    /// The deferred abort was discarded (the engine ended first). Final.
    discarded: bool,
    /// Terminals delivered to the consumer (saturating).
    terminals: u8,
    /// Outcomes recorded (saturating).
    finishes: u8,
    /// The engine's own end (terminal, error, end of stream) was seen.
    engine_done: bool,
    /// A non-empty chunk or the hint was seen.
    first: bool,
    /// A synthesized terminal is owed and not yet delivered.
    pending_terminal: Option<Synthesized>,
    /// The strongest cancellation seen while live.
    cancel: Cancel,
}

/// Follows one request; feed it every `(event, actions)` pair in order, then [`close`].
///
/// [`close`]: Oracle::close
#[derive(Clone, Debug)]
pub struct Oracle {
    step: usize,
    st: OracleState,
}

impl Oracle {
    /// A fresh request in `mode`.
    pub fn new(mode: Mode) -> Oracle {
        Oracle {
            step: 0,
            st: OracleState {
                mode,
                aborts: 0,
                deferred: false,
                discarded: false,
                terminals: 0,
                finishes: 0,
                engine_done: false,
                first: false,
                pending_terminal: None,
                cancel: Cancel::None,
            },
        }
    }

    /// What the oracle remembers (for the reachable-state proof).
    pub fn state(&self) -> OracleState {
        self.st
    }

    /// How many aborts were issued.
    pub fn aborts(&self) -> u32 {
        u32::from(self.st.aborts)
    }

    /// Judge one step: `event` was applied and `acts` came out; `after` is the state
    /// it moved to (checked for agreement with what the oracle saw).
    pub fn observe(&mut self, event: Event, acts: Actions, after: State) -> Result<(), Violation> {
        let r = judge(&mut self.st, event, acts, after);
        let step = self.step;
        self.step += 1;
        r.map_err(|(rule, what)| Violation {
            rule,
            step,
            event,
            what,
        })
    }

    /// The sequence is over: the consumer dropped the stream (feed
    /// [`Event::ConsumerDropped`] first if it had not). Exactly one outcome must exist.
    pub fn close(&self) -> Result<(), Violation> {
        if self.st.finishes != 1 {
            return Err(Violation {
                rule: 9,
                step: self.step,
                event: Event::ConsumerDropped,
                what: "a finished request must have exactly one outcome",
            });
        }
        Ok(())
    }
}

type Broken = (u8, &'static str);

fn fail<T>(rule: u8, what: &'static str) -> Result<T, Broken> {
    Err((rule, what))
}

/// The whole judgement of one step. `o` is updated to what the rules say happened.
fn judge(o: &mut OracleState, event: Event, acts: Actions, after: State) -> Result<(), Broken> {
    let live = o.finishes == 0;
    // The consumer's poller is still reading the engine: live, engine running, no
    // synthesized terminal owed (an owed one is delivered instead of engine items).
    let consumer_reads_engine = live && !o.engine_done && o.pending_terminal.is_none();
    // The engine's stream is still read: by the consumer, or drained after the
    // consumer's end while a deferred abort is owed (rule 2).
    let engine_item = event.is_engine_event() && !o.engine_done && (live || o.deferred);
    let engine_end = engine_item
        && matches!(
            event,
            Event::TerminalChunk | Event::EngineError | Event::EngineEnded
        );
    let first_now =
        !o.first && ((event == Event::Chunk && engine_item) || event == Event::FirstTokenHint);
    let first_before = o.first;
    // Rule 12: the caller ends the stream with its own terminal.
    let early = live && event == Event::EarlyFinish && o.pending_terminal.is_none();

    // ---- what this event owes the consumer (rules 5, 8) ----
    let newly_owed = if live && o.pending_terminal.is_none() && !o.engine_done {
        match event {
            Event::Kill if o.cancel != Cancel::Kill => Some(Synthesized::Cancelled),
            Event::CancelGraceExpired if o.cancel == Cancel::Stop => Some(Synthesized::Cancelled),
            Event::Timeout(Timeout::FirstToken) if !first_before => {
                Some(Synthesized::FirstTokenTimeout)
            }
            Event::Timeout(Timeout::InterToken) if first_before => {
                Some(Synthesized::InterTokenTimeout)
            }
            _ => None,
        }
    } else {
        None
    };
    if acts.wake != newly_owed.is_some() {
        return fail(
            5,
            if acts.wake {
                "the consumer was woken with nothing owed"
            } else {
                "a terminal became owed without waking the consumer"
            },
        );
    }
    // A request cancels (asks for the abort) on stop, kill, timeouts and a drop.
    let cancels_now = live
        && !o.engine_done
        && match event {
            Event::Stop => o.cancel == Cancel::None,
            Event::ConsumerDropped => true,
            Event::EarlyFinish => early,
            _ => newly_owed.is_some(),
        };
    let arms_grace = live && event == Event::Stop && o.cancel == Cancel::None;
    if acts.arm_grace != arms_grace {
        return fail(5, "the cancel grace is armed exactly when a stop lands");
    }
    if let Some(synth) = newly_owed {
        o.pending_terminal = Some(synth);
        o.cancel = Cancel::Kill;
    } else if arms_grace {
        o.cancel = Cancel::Stop;
    }

    // ---- rule 6 and 5: what reaches the consumer ----
    let expected_delivery: Option<Option<Synthesized>> = if !live {
        None
    } else if o.pending_terminal.is_some() && (event == Event::ConsumerPoll || engine_item) {
        Some(o.pending_terminal)
    } else if consumer_reads_engine && event == Event::EngineEnded {
        Some(Some(if o.cancel == Cancel::None {
            Synthesized::Incomplete
        } else {
            Synthesized::Cancelled
        }))
    } else if consumer_reads_engine && matches!(event, Event::TerminalChunk | Event::EngineError) {
        Some(None) // the engine's own terminal is forwarded
    } else {
        None
    };
    let must_forward_chunk = consumer_reads_engine
        && matches!(event, Event::Chunk | Event::TokenlessChunk)
        && newly_owed.is_none();
    let forwards_terminal =
        acts.forward() && matches!(event, Event::TerminalChunk | Event::EngineError);
    if acts.forward() && !(consumer_reads_engine && engine_item && event != Event::EngineEnded) {
        return fail(6, "an item was forwarded when none may be");
    }
    if must_forward_chunk && !acts.forward() {
        return fail(6, "a non-terminal chunk was not forwarded");
    }
    match expected_delivery {
        Some(Some(synth)) => {
            if acts.emit() != Some(synth) || acts.forward() {
                return fail(
                    if synth == Synthesized::Incomplete {
                        6
                    } else {
                        5
                    },
                    "the owed terminal was not delivered",
                );
            }
        }
        Some(None) => {
            if !forwards_terminal || acts.emit().is_some() {
                return fail(6, "the engine's terminal was not forwarded");
            }
        }
        None => {
            if acts.emit().is_some() || forwards_terminal {
                return fail(6, "a terminal was delivered when none was due");
            }
        }
    }
    let delivers = expected_delivery.is_some() || early;
    if delivers {
        o.terminals = o.terminals.saturating_add(1);
        o.pending_terminal = None;
    }

    // ---- rules 1, 2, 4: the abort ----
    let requested_before = o.aborts > 0 || o.deferred || o.discarded;
    if acts.abort {
        if o.aborts > 0 {
            return fail(1, "abort issued twice");
        }
        if o.engine_done || engine_end {
            return fail(1, "abort issued after the engine's own end");
        }
        if o.discarded {
            return fail(2, "a discarded abort was sent");
        }
        if o.mode == Mode::Decode && !o.first && !first_now && event != Event::DeferralDeadline {
            return fail(2, "decode abort before the first token");
        }
        o.aborts = 1;
    }
    let must_defer = o.mode == Mode::Decode && !o.first;
    let newly_defers = cancels_now && !requested_before && must_defer;
    if acts.arm_deferral != newly_defers {
        return fail(
            2,
            "the deferral deadline is armed exactly when an abort is deferred",
        );
    }
    if cancels_now && !requested_before {
        // The first cancellation: abort now, or defer it.
        if must_defer && acts.abort {
            return fail(2, "decode abort not deferred");
        }
        if !must_defer && !acts.abort {
            return fail(
                if event == Event::ConsumerDropped {
                    4
                } else {
                    2
                },
                "cancellation before the end did not abort",
            );
        }
        o.deferred = must_defer;
    } else if o.deferred {
        if engine_end {
            o.deferred = false;
            o.discarded = true;
        } else if first_now || event == Event::DeferralDeadline {
            if !acts.abort {
                return fail(
                    if event == Event::DeferralDeadline {
                        11
                    } else {
                        2
                    },
                    "deferred abort not released",
                );
            }
            o.deferred = false;
        } else if acts.abort {
            return fail(
                2,
                "deferred abort released without the first token or deadline",
            );
        }
    } else if acts.abort {
        return fail(1, "abort issued without a cancellation");
    }

    // ---- facts the event establishes ----
    if first_now {
        o.first = true;
    }
    if engine_end {
        o.engine_done = true;
    }

    // ---- rule 9: exactly one outcome, matching the end ----
    let dropped_now = live && event == Event::ConsumerDropped;
    if dropped_now {
        o.pending_terminal = None;
    }
    match acts.record() {
        Some(kind) => {
            o.finishes = o.finishes.saturating_add(1);
            if o.finishes > 1 {
                return fail(9, "outcome recorded twice");
            }
            let expected = if dropped_now {
                Some(OutcomeKind::Dropped)
            } else {
                match (acts.emit(), event) {
                    (Some(Synthesized::Cancelled), _) => Some(OutcomeKind::Cancelled),
                    (Some(Synthesized::Incomplete), _) => Some(OutcomeKind::Failed),
                    (Some(Synthesized::FirstTokenTimeout | Synthesized::InterTokenTimeout), _) => {
                        Some(OutcomeKind::TimedOut)
                    }
                    (None, Event::TerminalChunk) if delivers => Some(OutcomeKind::Finished),
                    (None, Event::EngineError) if delivers => Some(OutcomeKind::Failed),
                    (None, Event::EarlyFinish) if early => Some(OutcomeKind::Finished),
                    _ => None,
                }
            };
            if expected != Some(kind) {
                return fail(9, "the outcome does not match the end");
            }
        }
        None if delivers || dropped_now => {
            return fail(9, "the request ended without an outcome");
        }
        None => {}
    }
    if o.terminals > 1 {
        return fail(6, "two terminals delivered");
    }

    // ---- the machine's own view must agree with what was observed ----
    if after.is_over() != (o.finishes > 0) {
        return fail(9, "the state's phase disagrees with the outcome");
    }
    if after.pending_terminal() != o.pending_terminal {
        return fail(5, "the state's owed terminal disagrees with the rules");
    }
    let abort = match (o.deferred, o.discarded, o.aborts > 0) {
        (true, _, _) => Abort::Deferred,
        (_, true, _) => Abort::Discarded,
        (_, _, true) => Abort::Sent,
        _ => Abort::None,
    };
    if after.abort() != abort {
        return fail(2, "the state's abort disagrees with the rules");
    }
    if after.first_token() != o.first || after.engine_done() != o.engine_done {
        return fail(3, "the state's first-token or engine-end flag disagrees");
    }
    if after.cancel() != o.cancel {
        return fail(5, "the state's cancellation disagrees with the rules");
    }
    if after.drains_engine() != (o.finishes > 0 && o.deferred && !o.engine_done) {
        return fail(
            2,
            "the engine is not drained while a deferred abort is owed",
        );
    }
    let live_after = o.finishes == 0;
    if after.polls_engine() != (live_after && !o.engine_done && o.pending_terminal.is_none()) {
        return fail(6, "the state's engine polling disagrees with the rules");
    }
    if after.is_terminal() != (o.terminals > 0)
        || after.is_cancelling() != (live_after && o.cancel != Cancel::None)
        || after.mode() != o.mode
    {
        return fail(9, "the state's phase or mode disagrees with the rules");
    }
    Ok(())
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
