//! The harness's side of each op: apply it to the real stream, context and clock, move
//! the ghost the way the rules say, and run the watchdog's turn.

use std::sync::atomic::Ordering;
use std::task::Context as TaskContext;
use std::time::Instant;

use futures_core::Stream;
use tether_core::{Annotated, Chunk, FinishReason, Mode, Outcome, Runtime};

use super::super::engine::Did;
use super::super::{lock, EngineStep, Op, DEFERRAL};
use super::{cancelled, fail, Cancel, Check, Harness, Owed};

impl Harness {
    fn aborts(&self) -> u32 {
        lock(&self.track).aborts
    }

    pub(super) fn wakes(&self) -> usize {
        self.wake.0.load(Ordering::SeqCst)
    }

    pub(super) fn now(&self) -> Instant {
        self.rt.now()
    }

    /// The watchdog is needed: spawned the first time (it then runs inline once).
    fn need_watchdog(&mut self) {
        if !self.g.watchdog {
            self.g.watchdog = true;
            self.g.spawns_allowed += 1;
        }
    }

    /// The abort the rules call for when a cancellation lands on a request that has
    /// none yet: now, or deferred (arming the deferral deadline off the consumer's
    /// path) in decode mode before the first token.
    fn request_abort(&mut self) -> bool {
        if self.g.aborted || self.g.deferred || self.g.discarded || self.g.engine_ended {
            return false;
        }
        if self.g.mode == Mode::Decode && !self.g.first_token {
            self.g.deferred = true;
            self.g.deferral_due = Some(self.now() + DEFERRAL);
            self.need_watchdog();
            false
        } else {
            self.abort_now()
        }
    }

    /// The abort goes out through the adapter's abort task: spawned at the first abort.
    fn abort_now(&mut self) -> bool {
        self.g.deferred = false;
        self.g.aborted = true;
        if !self.g.abort_task {
            self.g.abort_task = true;
            self.g.spawns_allowed += 1;
        }
        true
    }

    /// A first-token hint or a non-empty chunk: releases a deferred abort.
    pub(super) fn saw_first_token(&mut self) -> bool {
        self.g.first_token = true;
        if self.g.deferred {
            self.abort_now()
        } else {
            false
        }
    }

    /// The engine's own end: a deferred abort is discarded for good.
    pub(super) fn engine_end(&mut self) {
        self.g.engine_ended = true;
        if self.g.deferred {
            self.g.deferred = false;
            self.g.discarded = true;
        }
    }

    /// A kill-like cancellation owes the consumer `owed` and asks for the abort.
    pub(super) fn force(&mut self, owed: Owed) -> bool {
        self.g.cancel = Cancel::Kill;
        self.g.pending_terminal = Some(owed);
        self.request_abort()
    }

    pub(super) fn op(&mut self, op: Op) -> Check {
        let aborts_before = self.aborts();
        let wakes_before = self.wakes();
        if wakes_before != self.wakes_at_pending {
            // Woken since its last `Pending` (perhaps spuriously): an executor would
            // poll it again, so it no longer counts as waiting.
            self.g.waiting = false;
        }
        let mut expect_abort = false;
        let mut expect_wake = false;
        match op {
            Op::Poll => {
                if self.stream.is_none() {
                    return Ok(());
                }
                lock(&self.track).log.clear();
                let mut cx = TaskContext::from_waker(&self.waker);
                let Some(stream) = self.stream.as_mut() else {
                    return Ok(());
                };
                let polled = stream.as_mut().poll_next(&mut cx);
                expect_abort = self.check_poll(&polled)?;
            }
            Op::Stop | Op::Kill => {
                let was = self.g.cancel;
                if op == Op::Stop {
                    self.ctx.stop();
                } else {
                    self.ctx.kill();
                }
                let raises = match op {
                    Op::Stop => was == Cancel::None,
                    _ => was != Cancel::Kill,
                };
                if self.g.live && raises && !self.g.engine_ended {
                    if op == Op::Kill {
                        expect_abort = self.force(cancelled());
                        expect_wake = self.g.waiting;
                        self.g.grace_due = None;
                    } else {
                        self.g.cancel = Cancel::Stop;
                        expect_abort = self.request_abort();
                        if let Some(grace) = self.cfg_grace {
                            // Timed by the abort task's own timer when the stop sent
                            // the abort (no task of its own), by the watchdog the
                            // deferral started otherwise.
                            self.g.grace_due = Some(self.now() + grace);
                            if !expect_abort {
                                self.need_watchdog();
                            }
                        }
                    }
                } else if raises && !self.g.live {
                    // The context moves on; the request is over and ignores it.
                }
                if raises {
                    self.g.cancel = self.g.cancel.max_with(op);
                }
            }
            Op::Drop => {
                if self.stream.take().is_none() {
                    return Ok(());
                }
                if self.g.live {
                    self.g.live = false;
                    self.g.pending_terminal = None;
                    self.g.outcome = Some(Outcome::Dropped);
                    expect_abort = self.request_abort();
                    if self.g.deferred && !self.g.engine_ended {
                        self.g.handed_over = true;
                    }
                    let t = lock(&self.track);
                    if t.records.len() != 1 {
                        return fail("rule 4: a drop before the terminal was not recorded");
                    }
                }
                self.g.waiting = false;
            }
            Op::Hint => {
                let gctx = lock(&self.track).gctx.clone();
                lock(&self.track).first_evidence = true;
                if let Some(gctx) = gctx {
                    gctx.notify_first_token();
                }
                if !self.g.first_token {
                    expect_abort = self.saw_first_token();
                }
            }
            Op::Advance(by) => {
                self.rt.advance(by);
                let now = self.now();
                expect_wake = self.g.waiting && self.g.timer_wait.is_some_and(|at| at <= now);
                self.update_deadline_passed();
                let (aborted, woken) = self.run_watchdog()?;
                expect_abort = aborted;
                expect_wake |= woken;
            }
            Op::RunSpawned => {
                let (aborted, woken) = self.run_watchdog()?;
                expect_abort = aborted;
                expect_wake = woken;
            }
            Op::Finish => {
                let Some(stream) = self.stream.as_mut() else {
                    return Ok(());
                };
                let took = stream.as_mut().get_mut().finish(FinishReason::Stop);
                let expected = self.g.live && self.g.pending_terminal.is_none();
                if took != expected {
                    return fail(format!("rule 12: finish said {took}, expected {expected}"));
                }
                if took {
                    self.g.live = false;
                    self.g.outcome = Some(Outcome::Finished(FinishReason::Stop));
                    self.g.stashed =
                        Some(Annotated::from_data(Chunk::terminal(FinishReason::Stop)));
                    expect_abort = self.request_abort();
                    if self.g.deferred && !self.g.engine_ended {
                        self.g.handed_over = true;
                    }
                    if lock(&self.track).records.len() != 1 {
                        return fail("rule 12: an early finish was not recorded at once");
                    }
                }
            }
        }
        let aborts_after = self.aborts();
        let got = aborts_after - aborts_before;
        if got != u32::from(expect_abort) {
            return fail(format!(
                "rule 1/2/4: expected {} abort(s) in this step, got {got}",
                u32::from(expect_abort)
            ));
        }
        if expect_wake && self.wakes() == wakes_before {
            return fail("lost wake-up: the waiting consumer was not woken");
        }
        if expect_wake {
            self.g.waiting = false;
        }
        Ok(())
    }

    fn update_deadline_passed(&mut self) {
        let now = self.now();
        if self.g.deferral_due.is_some_and(|at| at <= now) {
            lock(&self.track).deadline_passed = true;
        }
    }

    /// The spawned tasks run: the watchdog drains a handed-over engine, then fires the
    /// deadlines that passed; the parked abort task fires a grace it times. Returns
    /// whether they must have aborted and whether they must have woken the consumer.
    fn run_watchdog(&mut self) -> Result<(bool, bool), String> {
        lock(&self.track).log.clear();
        self.rt.run_spawned();
        let log = std::mem::take(&mut lock(&self.track).log);
        let mut aborted = false;
        let mut woken = false;
        if !self.g.watchdog {
            if !log.is_empty() {
                return fail(format!(
                    "the engine was polled with nobody reading: {log:?}"
                ));
            }
            // A grace is still timed by the abort task (a stop that sent the abort).
            return Ok(self.grace_passed());
        }
        // 1. Draining: only while the consumer is over and the abort is still deferred.
        let mut polls = log.into_iter();
        if self.g.handed_over {
            // One drain poll is any number of hints, then `Pending` or an item.
            let mut poll_starts = true;
            for did in polls.by_ref() {
                if poll_starts && (!self.g.deferred || self.g.engine_ended) {
                    return fail(format!("the engine was drained after the abort: {did:?}"));
                }
                poll_starts = false;
                match did {
                    Did::Hint => {
                        if !self.g.first_token {
                            aborted |= self.saw_first_token();
                        }
                        continue;
                    }
                    Did::Pending => break,
                    Did::Yield(EngineStep::Tokens(_)) => {
                        if !self.g.first_token {
                            aborted |= self.saw_first_token();
                        }
                    }
                    Did::Yield(EngineStep::Tokenless) => {}
                    Did::Yield(_) => self.engine_end(),
                }
                poll_starts = true;
                if !self.g.deferred {
                    break;
                }
            }
        }
        // 2. Deadlines, deferral first.
        let now = self.now();
        if self.g.deferred && self.g.deferral_due.is_some_and(|at| at <= now) {
            // (The engine's rule-2 check was told the deadline passed when the clock
            // moved: `update_deadline_passed`.)
            aborted |= self.abort_now();
        }
        let (forced, woken_by_grace) = self.grace_passed();
        aborted |= forced;
        woken |= woken_by_grace;
        // 3. It ends once nothing it owns matters.
        let grace_left = self.g.live
            && self.g.cancel == Cancel::Stop
            && self.g.pending_terminal.is_none()
            && self.g.grace_due.is_some();
        if !self.g.deferred && !grace_left {
            self.g.watchdog = false;
            self.g.handed_over = false;
        }
        Ok((aborted, woken))
    }

    /// The cancel grace, if it passed while it still matters: the request is forced.
    /// Returns whether that must have aborted and woken the waiting consumer.
    fn grace_passed(&mut self) -> (bool, bool) {
        let grace_pending =
            self.g.live && self.g.cancel == Cancel::Stop && self.g.pending_terminal.is_none();
        if grace_pending && self.g.grace_due.is_some_and(|at| at <= self.now()) {
            return (self.force(cancelled()), self.g.waiting);
        }
        (false, false)
    }
}
