//! The harness's judgement: each consumer poll against the ghost, the tracker against
//! the ghost after every op, and what must hold once the script is over.

use std::task::Poll;
use tether_core::AbortStatus;

use tether_core::{Annotated, BackendError, Chunk, EngineError, ErrorKind, FinishReason, Outcome};

use super::super::engine::Did;
use super::super::{lock, EngineStep, Op, DEFERRAL};
use super::{fail, Cancel, Check, Harness, Owed};

impl Harness {
    /// Judge one consumer poll against the ghost. Returns whether it must have aborted.
    pub(super) fn check_poll(
        &mut self,
        polled: &Poll<Option<Annotated<Chunk>>>,
    ) -> Result<bool, String> {
        let now = self.now();
        if let Some(item) = self.g.stashed.take() {
            // Rule 12: the early finish's terminal, then the end.
            if *polled != Poll::Ready(Some(item)) {
                return fail(format!(
                    "rule 12: {polled:?} instead of the finish terminal"
                ));
            }
            self.g.terminal_seen = true;
            return Ok(false);
        }
        if !self.g.live {
            if *polled != Poll::Ready(None) {
                return fail(format!("rule 6: {polled:?} after the end"));
            }
            if !self.g.terminal_seen {
                return fail("rule 6: the stream ended without a terminal");
            }
            return Ok(false);
        }
        // 1. An owed terminal comes first.
        if let Some(owed) = self.g.pending_terminal.take() {
            return self
                .expect_terminal(polled, &owed.item, owed.outcome)
                .map(|()| false);
        }
        // 2. The engine, as its log says.
        let mut aborted = false;
        let log = std::mem::take(&mut lock(&self.track).log);
        let Some((last, hints)) = log.split_last() else {
            return fail("the engine was not polled");
        };
        for did in hints {
            if *did != Did::Hint {
                return fail(format!("the engine was polled on after {did:?}"));
            }
            if !self.g.first_token {
                aborted |= self.saw_first_token();
            }
        }
        match last {
            Did::Hint => fail("the engine's poll ended on a hint"),
            Did::Pending => {
                // 3. The engine is silent while the consumer waits: the limits run.
                if self.g.first_token {
                    self.g.seen_token_or_hint();
                }
                let limit = if self.g.seen_token {
                    self.cfg_itl
                } else {
                    self.cfg_ttft
                };
                let due = match limit {
                    Some(limit) if !self.g.silence_fired => {
                        let since = *self.g.silence_since.get_or_insert(now);
                        Some(since + limit)
                    }
                    _ => None,
                };
                if due.is_some_and(|at| at <= now) {
                    self.g.silence_fired = true;
                    let item = if self.g.seen_token {
                        EngineError::inter_token_timeout(self.cfg_itl.unwrap_or_default())
                    } else {
                        EngineError::first_token_timeout(self.cfg_ttft.unwrap_or_default())
                    };
                    aborted |= self.force(Owed {
                        item: Annotated::from_error(item),
                        outcome: Outcome::TimedOut,
                    });
                    let owed = self.g.pending_terminal.take().expect("just forced");
                    self.expect_terminal(polled, &owed.item, owed.outcome)?;
                    return Ok(aborted);
                }
                if polled.is_ready() {
                    return fail(format!(
                        "the engine was pending but the consumer got {polled:?}"
                    ));
                }
                self.g.waiting = true;
                self.wakes_at_pending = self.wakes();
                self.g.timer_wait = due;
                Ok(aborted)
            }
            Did::Yield(step) => Ok(aborted | self.engine_item(step, polled)?),
        }
    }

    fn engine_item(
        &mut self,
        step: &EngineStep,
        polled: &Poll<Option<Annotated<Chunk>>>,
    ) -> Result<bool, String> {
        match step {
            EngineStep::Tokens(n) => {
                let aborted = if self.g.first_token {
                    false
                } else {
                    self.saw_first_token()
                };
                let ids: Vec<u32> = (0..u32::from(*n)).map(|i| self.g.tokens + i).collect();
                let want = Annotated::from_data(Chunk::tokens(ids));
                if !matches!(polled, Poll::Ready(Some(got)) if *got == want) {
                    return fail(format!("rule 6: expected {want:?}, got {polled:?}"));
                }
                self.items += 1;
                self.g.tokens += u32::from(*n);
                self.g.seen_token = true;
                self.g.silence_since = None;
                self.g.waiting = false;
                Ok(aborted)
            }
            EngineStep::Tokenless => {
                let want = Annotated::from_data(Chunk::default());
                if !matches!(polled, Poll::Ready(Some(got)) if *got == want) {
                    return fail(format!("rule 3: expected {want:?}, got {polled:?}"));
                }
                self.items += 1;
                self.g.waiting = false;
                Ok(false)
            }
            EngineStep::Terminal(reason) => {
                self.engine_end();
                let outcome = if *reason == FinishReason::Cancelled {
                    Outcome::Cancelled
                } else {
                    Outcome::Finished(reason.clone())
                };
                let want = Annotated::from_data(Chunk::terminal(reason.clone()));
                self.expect_terminal(polled, &want, outcome).map(|()| false)
            }
            EngineStep::Error(kind) => {
                self.engine_end();
                let want = Annotated::from_error(EngineError::new(*kind, "scripted error"));
                self.expect_terminal(polled, &want, Outcome::Failed(*kind))
                    .map(|()| false)
            }
            EngineStep::End => {
                self.engine_end();
                let (want, outcome) = if self.g.cancel == Cancel::None {
                    (
                        Annotated::from_error(EngineError::stream_incomplete()),
                        Outcome::Failed(ErrorKind::Backend(BackendError::StreamIncomplete)),
                    )
                } else {
                    (
                        Annotated::from_data(Chunk::terminal(FinishReason::Cancelled)),
                        Outcome::Cancelled,
                    )
                };
                self.expect_terminal(polled, &want, outcome).map(|()| false)
            }
            EngineStep::Panic => {
                self.engine_end();
                let kind = ErrorKind::Backend(BackendError::Unknown);
                let ok = matches!(
                    polled,
                    Poll::Ready(Some(item)) if item.is_error()
                        && item.error.as_ref().is_some_and(|e| e.kind() == kind
                            && e.message().starts_with("engine panicked"))
                );
                if !ok {
                    return fail(format!("rule 6: a panic became {polled:?}"));
                }
                let Poll::Ready(Some(item)) = polled else {
                    return fail("unreachable");
                };
                self.expect_terminal(polled, item, Outcome::Failed(kind))
                    .map(|()| false)
            }
            other => fail(format!("unexpected engine step {other:?}")),
        }
    }

    /// The poll must yield `want`, a terminal, and end the request with `outcome`.
    fn expect_terminal(
        &mut self,
        polled: &Poll<Option<Annotated<Chunk>>>,
        want: &Annotated<Chunk>,
        outcome: Outcome,
    ) -> Check {
        if !matches!(polled, Poll::Ready(Some(got)) if got == want) {
            return fail(format!("rule 5/6/8: expected {want:?}, got {polled:?}"));
        }
        if !want.is_terminal() {
            return fail("the expected item is not a terminal");
        }
        self.items += 1;
        self.g.terminal_seen = true;
        self.g.live = false;
        self.g.waiting = false;
        self.g.pending_terminal = None;
        self.g.outcome = Some(outcome);
        if self.g.deferred && !self.g.engine_ended {
            // The consumer has its terminal; the abort still waits for the first token,
            // so the engine goes to the watchdog, which drains it (rule 2).
            self.g.handed_over = true;
        }
        Ok(())
    }

    /// The tracker agrees with the ghost after every op.
    pub(super) fn consistent(&self) -> Check {
        let t = lock(&self.track);
        if let Some(v) = t.violations.first() {
            return fail(v.clone());
        }
        if t.aborts != t.on_aborts {
            return fail("the observer did not hear of every abort");
        }
        if t.aborts != u32::from(self.g.aborted) {
            return fail(format!(
                "rule 1: {} abort(s), the rules say {}",
                t.aborts, self.g.aborted
            ));
        }
        match (t.records.as_slice(), &self.g.outcome) {
            ([], None) => {}
            ([(rec, aborts_then)], Some(outcome)) => {
                if rec.outcome != *outcome {
                    return fail(format!(
                        "rule 9: recorded {:?}, expected {outcome:?}",
                        rec.outcome
                    ));
                }
                if rec.output_tokens != self.g.tokens || rec.ttft.is_some() != (self.g.tokens > 0) {
                    return fail(format!(
                        "record {rec:?} disagrees with {} tokens",
                        self.g.tokens
                    ));
                }
                if (rec.abort == AbortStatus::Sent) != (*aborts_then == 1) {
                    return fail(format!(
                        "record says abort {:?} with {aborts_then} abort(s) issued",
                        rec.abort
                    ));
                }
                if *rec.id != *"script" {
                    return fail("record for the wrong request");
                }
            }
            (recs, want) => return fail(format!("rule 9: records {recs:?}, expected {want:?}")),
        }
        let spawns = self.rt.spawns();
        if spawns != self.g.spawns_allowed {
            return fail(format!(
                "{spawns} task(s) spawned, the rules allow {}",
                self.g.spawns_allowed
            ));
        }
        let allowed = usize::from(self.g.watchdog) + usize::from(self.g.abort_task);
        if self.rt.pending() != allowed {
            return fail(format!(
                "{} spawned task(s) pending, the rules allow {allowed}",
                self.rt.pending(),
            ));
        }
        Ok(())
    }

    /// Drop the stream if the script did not, let every deadline pass, and check that
    /// nothing is left owed.
    pub(super) fn finish(&mut self) -> Check {
        self.op(Op::Drop)?;
        self.consistent()?;
        self.op(Op::RunSpawned)?;
        self.consistent()?;
        self.op(Op::Advance(DEFERRAL * 2))?;
        self.op(Op::RunSpawned)?;
        if self.g.deferred {
            return fail("rule 2: a deferred abort was never released nor discarded");
        }
        if self.rt.pending() != usize::from(self.g.abort_task) {
            return fail("a spawned task is still pending after every deadline passed");
        }
        if lock(&self.track).records.len() != 1 {
            return fail("rule 9: not exactly one record");
        }
        // What the context still holds must not keep the request alive.
        drop(self.ctx.clone());
        Ok(())
    }
}
