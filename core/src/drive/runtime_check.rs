//! The runtime conformance kit: checks a [`Runtime`] (its timers, its clock, its
//! `spawn`) against the contract the driver relies on, and names the first broken
//! clause with a typed [`RuntimeCheckFailure`].
//!
//! This module owns only the checks. It must not touch the lifecycle machine or the
//! driver: it talks to the runtime through the [`Runtime`] and [`AsyncTimer`] traits,
//! exactly as the driver does, so what passes here is what the driver gets.
//!
//! The checks themselves, and what they cost, are documented on
//! [`run_runtime_conformance`], the module's only entry point.

use std::future::poll_fn;
use std::pin::Pin;
// Plain std, not `crate::sync`: the kit runs against real runtimes, never inside a loom
// model, and loom's types panic when used outside one.
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use super::{AsyncTimer, Runtime};

/// How many checks [`run_runtime_conformance`] runs.
pub const RUNTIME_CHECKS: usize = 9;

/// How long the kit waits for any one timer (or spawned task) before it fails the
/// check. A timer of the runtime under test measures it.
pub const RUNTIME_CHECK_GUARD: Duration = Duration::from_secs(5);

/// The near deadline the checks wait for.
const SHORT: Duration = Duration::from_millis(10);

/// How much later than its original deadline a timer is moved by
/// `reset_later_before_firing`: wide enough that a timer which ignores the reset is seen
/// firing early even when the kit's task is scheduled late.
const LATER_BY: Duration = Duration::from_millis(50);

/// The far deadline ("never", as far as the kit is concerned).
const FAR: Duration = Duration::from_secs(3600);

/// How many consecutive `now()` readings `clock_monotonic` compares.
const CLOCK_READINGS: usize = 1_000;

const CHECK_FIRES: &str = "fires_at_deadline";
const CHECK_STAYS_READY: &str = "stays_ready_after_firing";
const CHECK_RESET_EARLIER: &str = "reset_earlier_before_firing";
const CHECK_RESET_LATER: &str = "reset_later_before_firing";
const CHECK_RESET_AFTER_FIRING_LATER: &str = "reset_after_firing_later";
const CHECK_RESET_AFTER_FIRING_PAST: &str = "reset_after_firing_past";
const CHECK_SEVERAL_RESETS: &str = "several_resets";
const CHECK_CLOCK: &str = "clock_monotonic";
const CHECK_SPAWN: &str = "spawn_detached";

/// What a passing runtime went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeCheckReport {
    /// How many checks passed (all of them: [`RUNTIME_CHECKS`]).
    pub checks: usize,
}

/// The first clause of the runtime contract a [`Runtime`] broke. `check` is the name of
/// the check that saw it (listed on [`run_runtime_conformance`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeCheckFailure {
    /// A timer was ready while `now()` was still `early_by` short of its deadline.
    #[error("check `{check}`: a timer fired {early_by:?} before its deadline")]
    FiredEarly {
        /// The check that saw it.
        check: &'static str,
        /// How far `now()` was from the deadline when the timer was ready.
        early_by: Duration,
    },
    /// A fired timer was pending when polled again, with no reset in between.
    #[error(
        "check `{check}`: a fired timer must stay ready until reset, but the next poll was pending"
    )]
    NotReadyAfterFiring {
        /// The check that saw it.
        check: &'static str,
    },
    /// A timer reset to an earlier deadline did not fire within the guard after it (it
    /// kept waiting for its original, 1 hour away).
    #[error("check `{check}`: a timer reset to an earlier deadline did not fire within {guard:?}")]
    ResetEarlierIgnored {
        /// The check that saw it.
        check: &'static str,
        /// How long the kit waited ([`RUNTIME_CHECK_GUARD`]).
        guard: Duration,
    },
    /// A timer reset to a later deadline fired `early_by` before it (at its original).
    #[error("check `{check}`: a timer reset to a later deadline fired {early_by:?} before it")]
    ResetLaterIgnored {
        /// The check that saw it.
        check: &'static str,
        /// How far `now()` was from the new deadline when the timer was ready.
        early_by: Duration,
    },
    /// A fired timer reset to a later deadline was still ready `early_by` before it.
    #[error(
        "check `{check}`: a fired timer reset to a later deadline was ready {early_by:?} before it"
    )]
    ResetAfterFiringIgnored {
        /// The check that saw it.
        check: &'static str,
        /// How far `now()` was from the new deadline when the timer was ready.
        early_by: Duration,
    },
    /// A fired timer reset to a deadline already passed did not become ready again
    /// within the guard.
    #[error("check `{check}`: a fired timer reset to a passed deadline did not fire again within {guard:?}")]
    ResetToPastIgnored {
        /// The check that saw it.
        check: &'static str,
        /// How long the kit waited ([`RUNTIME_CHECK_GUARD`]).
        guard: Duration,
    },
    /// `now()` returned an instant `by` earlier than a previous reading.
    #[error("check `{check}`: the runtime's clock went backwards by {by:?}")]
    ClockWentBackwards {
        /// The check that saw it.
        check: &'static str,
        /// How far back the clock went.
        by: Duration,
    },
    /// A spawned future was dropped before it completed: the runtime cancelled it
    /// (as smol does when a `Task` is dropped without `detach`).
    #[error("check `{check}`: a spawned task was dropped before it completed (spawn must detach)")]
    SpawnNotDetached {
        /// The check that saw it.
        check: &'static str,
    },
    /// A spawned future was never polled within the guard (nothing runs the executor
    /// it went to).
    #[error("check `{check}`: a spawned task did not start within {guard:?}")]
    SpawnedTaskNeverRan {
        /// The check that saw it.
        check: &'static str,
        /// How long the kit waited ([`RUNTIME_CHECK_GUARD`]).
        guard: Duration,
    },
    /// A timer (or a started spawned task waiting on one) was not ready within the
    /// guard.
    #[error("check `{check}`: timed out after {after:?} waiting for a timer")]
    TimedOut {
        /// The check that saw it.
        check: &'static str,
        /// How long the kit waited, by the runtime's clock.
        after: Duration,
    },
}

/// Check `runtime` against the runtime contract; stop at the first failure.
///
/// The contract (SPEC §6): a timer is never ready before [`Runtime::now`] reaches its
/// deadline; once ready, it stays ready until reset; `reset` to an earlier or later
/// deadline works any number of times, before or after firing. `now()` never goes
/// backwards, and `spawn` runs its future to completion with no handle kept.
///
/// The checks, in order (each `check` field of a failure is one of these names):
///
/// 1. `fires_at_deadline`: a timer is pending before its deadline, and when it is ready
///    `now()` has reached the deadline;
/// 2. `stays_ready_after_firing`: a fired timer polled again (with a no-op waker) is
///    still ready. A one-shot timer (async-io's `Timer::at`) fails here: after firing it
///    is pending forever and registers no waker;
/// 3. `reset_earlier_before_firing`: a timer 1 hour away, reset to a near deadline,
///    fires at the near one;
/// 4. `reset_later_before_firing`: a timer reset to a later deadline does not fire at its
///    original one;
/// 5. `reset_after_firing_later`: a fired timer reset to a later deadline is pending
///    again, then ready at the new deadline;
/// 6. `reset_after_firing_past`: a fired timer reset to a deadline already passed is
///    ready without waiting for any new deadline; so is one that, fired, was moved 1
///    hour away (and seen pending) and then back to a passed deadline;
/// 7. `several_resets`: a timer moved earlier and later several times, polled in
///    between, fires at the last deadline only; then, fired, it is reset twice in a row
///    and fires at the second;
/// 8. `clock_monotonic`: a run of `now()` readings never goes backwards, and a timer
///    whose deadline is `now()` is ready;
/// 9. `spawn_detached`: a spawned future that waits on a timer runs to completion,
///    although `spawn` keeps no handle.
///
/// Every reading of `now()` in every check is also checked against the previous one
/// ([`RuntimeCheckFailure::ClockWentBackwards`]), and every ready timer against the
/// clock ([`RuntimeCheckFailure::FiredEarly`] and its reset-specific forms).
///
/// # Time
///
/// The deadlines are short (10 ms from `now()`, 60 ms at most), so on a real clock a
/// passing runtime goes through the whole kit in well under a second (about 160 ms on
/// smol), and under a paused clock (tokio's `start_paused`) in no real time at all. Every wait races a guard timer of
/// [`RUNTIME_CHECK_GUARD`] from the same runtime; the guard is polled first, so a
/// guard that fires is always a failure ([`RuntimeCheckFailure::TimedOut`] or a
/// reset-specific form), never a pass. A runtime whose timers never fire at all never
/// fires the guard either and can hang the kit: wrap it in a timeout of your own (a
/// thread, another runtime's timer) when checking a runtime you do not trust.
///
/// # Example
///
/// The shims wrap it with their own runtime (`tether_tokio::run_runtime_conformance`,
/// `tether_smol::run_runtime_conformance`); a runtime of your own is checked directly:
///
/// ```no_run
/// use tether_core::drive::{RuntimeCheckReport, RUNTIME_CHECKS};
/// use tether_core::{run_runtime_conformance, Runtime};
///
/// async fn check(runtime: &dyn Runtime) {
///     match run_runtime_conformance(runtime).await {
///         Ok(RuntimeCheckReport { checks }) => assert_eq!(checks, RUNTIME_CHECKS),
///         Err(failure) => panic!("runtime breaks the timer contract: {failure}"),
///     }
/// }
/// ```
pub async fn run_runtime_conformance<R: Runtime + ?Sized>(
    runtime: &R,
) -> Result<RuntimeCheckReport, RuntimeCheckFailure> {
    let mut kit = Kit {
        runtime,
        last_now: None,
    };
    let mut checks = 0;
    kit.fires_at_deadline().await?;
    checks += 1;
    kit.stays_ready_after_firing().await?;
    checks += 1;
    kit.reset_earlier_before_firing().await?;
    checks += 1;
    kit.reset_later_before_firing().await?;
    checks += 1;
    kit.reset_after_firing_later().await?;
    checks += 1;
    kit.reset_after_firing_past().await?;
    checks += 1;
    kit.several_resets().await?;
    checks += 1;
    kit.clock_monotonic().await?;
    checks += 1;
    kit.spawn_detached().await?;
    checks += 1;
    debug_assert_eq!(checks, RUNTIME_CHECKS);
    Ok(RuntimeCheckReport { checks })
}

type Timer = Pin<Box<dyn AsyncTimer>>;

/// The runtime under test and the last clock reading (to catch a clock going back).
struct Kit<'r, R: ?Sized> {
    runtime: &'r R,
    last_now: Option<Instant>,
}

impl<R: Runtime + ?Sized> Kit<'_, R> {
    async fn fires_at_deadline(&mut self) -> Result<(), RuntimeCheckFailure> {
        let check = CHECK_FIRES;
        let deadline = self.now(check)? + SHORT;
        let mut timer = self.runtime.sleep_until(deadline);
        self.wait(check, &mut timer, deadline, fired_early).await
    }

    async fn stays_ready_after_firing(&mut self) -> Result<(), RuntimeCheckFailure> {
        let check = CHECK_STAYS_READY;
        let deadline = self.now(check)? + SHORT;
        let mut timer = self.runtime.sleep_until(deadline);
        self.wait(check, &mut timer, deadline, fired_early).await?;
        // Twice, with a waker that does nothing: a timer that is ready only once (and
        // relies on a wake to be ready again) is caught on either poll.
        for _ in 0..2 {
            if poll_noop(&mut timer).is_pending() {
                return Err(RuntimeCheckFailure::NotReadyAfterFiring { check });
            }
        }
        Ok(())
    }

    async fn reset_earlier_before_firing(&mut self) -> Result<(), RuntimeCheckFailure> {
        let check = CHECK_RESET_EARLIER;
        let start = self.now(check)?;
        let mut timer = self.runtime.sleep_until(start + FAR);
        // Poll first, so the runtime registers the far deadline before it moves.
        self.poll_pending(check, &mut timer, start + FAR).await?;
        let deadline = self.now(check)? + SHORT;
        timer.as_mut().reset(deadline);
        match self.wait(check, &mut timer, deadline, fired_early).await {
            Err(RuntimeCheckFailure::TimedOut { .. }) => {
                Err(RuntimeCheckFailure::ResetEarlierIgnored {
                    check,
                    guard: RUNTIME_CHECK_GUARD,
                })
            }
            outcome => outcome,
        }
    }

    async fn reset_later_before_firing(&mut self) -> Result<(), RuntimeCheckFailure> {
        let check = CHECK_RESET_LATER;
        let original = self.now(check)? + SHORT;
        let mut timer = self.runtime.sleep_until(original);
        self.poll_pending(check, &mut timer, original).await?;
        let deadline = original + LATER_BY;
        timer.as_mut().reset(deadline);
        let ignored = |check, early_by| RuntimeCheckFailure::ResetLaterIgnored { check, early_by };
        self.wait(check, &mut timer, deadline, ignored).await
    }

    async fn reset_after_firing_later(&mut self) -> Result<(), RuntimeCheckFailure> {
        let check = CHECK_RESET_AFTER_FIRING_LATER;
        let first = self.now(check)? + SHORT;
        let mut timer = self.runtime.sleep_until(first);
        self.wait(check, &mut timer, first, fired_early).await?;
        let deadline = self.now(check)? + SHORT;
        timer.as_mut().reset(deadline);
        let ignored =
            |check, early_by| RuntimeCheckFailure::ResetAfterFiringIgnored { check, early_by };
        self.wait(check, &mut timer, deadline, ignored).await
    }

    async fn reset_after_firing_past(&mut self) -> Result<(), RuntimeCheckFailure> {
        let check = CHECK_RESET_AFTER_FIRING_PAST;
        let start = self.now(check)?;
        let first = start + SHORT;
        let mut timer = self.runtime.sleep_until(first);
        self.wait(check, &mut timer, first, fired_early).await?;
        timer.as_mut().reset(start);
        self.wait_past(check, &mut timer, start).await?;
        // Again after moving it far off (and seeing it pending): a timer that only
        // remembers "fired" would pass the reset above without really re-arming.
        let far = self.now(check)? + FAR;
        timer.as_mut().reset(far);
        self.poll_pending(check, &mut timer, far).await?;
        timer.as_mut().reset(start);
        self.wait_past(check, &mut timer, start).await
    }

    /// [`Kit::wait`] for a timer reset to a passed deadline.
    async fn wait_past(
        &mut self,
        check: &'static str,
        timer: &mut Timer,
        deadline: Instant,
    ) -> Result<(), RuntimeCheckFailure> {
        match self.wait(check, timer, deadline, fired_early).await {
            Err(RuntimeCheckFailure::TimedOut { .. }) => {
                Err(RuntimeCheckFailure::ResetToPastIgnored {
                    check,
                    guard: RUNTIME_CHECK_GUARD,
                })
            }
            outcome => outcome,
        }
    }

    async fn several_resets(&mut self) -> Result<(), RuntimeCheckFailure> {
        let check = CHECK_SEVERAL_RESETS;
        let start = self.now(check)?;
        let mut timer = self.runtime.sleep_until(start + FAR);
        self.poll_pending(check, &mut timer, start + FAR).await?;
        // Earlier, later, later, earlier: each one polled, so each is registered.
        for deadline in [start + SHORT, start + FAR, start + 3 * SHORT] {
            timer.as_mut().reset(deadline);
            self.poll_pending(check, &mut timer, deadline).await?;
        }
        let deadline = start + 2 * SHORT;
        timer.as_mut().reset(deadline);
        self.wait(check, &mut timer, deadline, fired_early).await?;
        // Fired: two resets in a row, only the second counts.
        let now = self.now(check)?;
        timer.as_mut().reset(now);
        let deadline = now + SHORT;
        timer.as_mut().reset(deadline);
        self.wait(check, &mut timer, deadline, fired_early).await?;
        if poll_noop(&mut timer).is_pending() {
            return Err(RuntimeCheckFailure::NotReadyAfterFiring { check });
        }
        Ok(())
    }

    async fn clock_monotonic(&mut self) -> Result<(), RuntimeCheckFailure> {
        let check = CHECK_CLOCK;
        for _ in 0..CLOCK_READINGS {
            self.now(check)?;
        }
        let deadline = self.now(check)?;
        let mut timer = self.runtime.sleep_until(deadline);
        self.wait(check, &mut timer, deadline, fired_early).await
    }

    async fn spawn_detached(&mut self) -> Result<(), RuntimeCheckFailure> {
        let check = CHECK_SPAWN;
        let deadline = self.now(check)? + SHORT;
        // Created here, moved into the task: the task must be `'static`, the runtime is
        // only borrowed. Waiting on it makes the task suspend at least once (the case a
        // cancel-on-drop handle would cut short).
        let mut timer = self.runtime.sleep_until(deadline);
        let state = Arc::new(Mutex::new(SpawnState::default()));
        let mut witness = Witness {
            state: state.clone(),
        };
        self.runtime.spawn(Box::pin(async move {
            witness.update(|st| st.started = true);
            poll_fn(|cx| timer.as_mut().poll(cx)).await;
            witness.update(|st| st.completed = true);
        }));

        let started = self.now(check)?;
        let guard_deadline = started + RUNTIME_CHECK_GUARD;
        let mut guard = self.runtime.sleep_until(guard_deadline);
        let outcome = poll_fn(|cx| {
            if guard.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(()));
            }
            let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
            if st.completed || st.dropped {
                return Poll::Ready(Ok(()));
            }
            st.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let st = state.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(()) if st.completed => Ok(()),
            Ok(()) => Err(RuntimeCheckFailure::SpawnNotDetached { check }),
            Err(()) if !st.started => {
                drop(st);
                match self.guard_fired(check, started, guard_deadline) {
                    RuntimeCheckFailure::TimedOut { .. } => {
                        Err(RuntimeCheckFailure::SpawnedTaskNeverRan {
                            check,
                            guard: RUNTIME_CHECK_GUARD,
                        })
                    }
                    early => Err(early),
                }
            }
            Err(()) => {
                drop(st);
                Err(self.guard_fired(check, started, guard_deadline))
            }
        }
    }

    /// The runtime's clock, checked against the previous reading.
    fn now(&mut self, check: &'static str) -> Result<Instant, RuntimeCheckFailure> {
        let now = self.runtime.now();
        if let Some(last) = self.last_now {
            if now < last {
                return Err(RuntimeCheckFailure::ClockWentBackwards {
                    check,
                    by: last - now,
                });
            }
        }
        self.last_now = Some(now);
        Ok(now)
    }

    /// A ready timer must have `now() >= deadline`; `early` names the failure if not.
    fn check_ready(
        &mut self,
        check: &'static str,
        deadline: Instant,
        early: Early,
    ) -> Result<(), RuntimeCheckFailure> {
        let now = self.now(check)?;
        if now < deadline {
            return Err(early(check, deadline - now));
        }
        Ok(())
    }

    /// What a fired guard (armed at `started`, due at `deadline`) means: the wait timed
    /// out, or, when the clock has not reached it yet, the guard itself fired early.
    fn guard_fired(
        &mut self,
        check: &'static str,
        started: Instant,
        deadline: Instant,
    ) -> RuntimeCheckFailure {
        match self.now(check) {
            Ok(now) if now < deadline => fired_early(check, deadline - now),
            Ok(now) => RuntimeCheckFailure::TimedOut {
                check,
                after: now - started,
            },
            Err(backwards) => backwards,
        }
    }

    /// Wait until `timer` (due at `deadline`) is ready, racing the guard. A timer ready
    /// before `deadline` is the failure `early` makes; a guard that fires is
    /// [`RuntimeCheckFailure::TimedOut`] (or [`RuntimeCheckFailure::FiredEarly`], when the
    /// guard itself fired early).
    async fn wait(
        &mut self,
        check: &'static str,
        timer: &mut Timer,
        deadline: Instant,
        early: Early,
    ) -> Result<(), RuntimeCheckFailure> {
        let started = self.now(check)?;
        let guard_deadline = started + RUNTIME_CHECK_GUARD;
        let mut guard = self.runtime.sleep_until(guard_deadline);
        let ready = poll_fn(|cx| {
            // The guard goes first: had the timer under test been polled first, a guard
            // firing at the same moment would let a broken timer pass.
            if guard.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            timer.as_mut().poll(cx).map(|()| true)
        })
        .await;
        if ready {
            self.check_ready(check, deadline, early)
        } else {
            Err(self.guard_fired(check, started, guard_deadline))
        }
    }

    /// Poll `timer` once with the task's waker (so the runtime registers its deadline);
    /// ready is only allowed once `deadline` has passed, which for the deadlines used
    /// here is never.
    async fn poll_pending(
        &mut self,
        check: &'static str,
        timer: &mut Timer,
        deadline: Instant,
    ) -> Result<(), RuntimeCheckFailure> {
        let polled = poll_fn(|cx| Poll::Ready(timer.as_mut().poll(cx))).await;
        match polled {
            Poll::Pending => Ok(()),
            Poll::Ready(()) => self.check_ready(check, deadline, fired_early),
        }
    }
}

/// The failure a timer ready `early_by` before its deadline is, in a given check.
type Early = fn(&'static str, Duration) -> RuntimeCheckFailure;

/// The plain [`Early`]: [`RuntimeCheckFailure::FiredEarly`].
fn fired_early(check: &'static str, early_by: Duration) -> RuntimeCheckFailure {
    RuntimeCheckFailure::FiredEarly { check, early_by }
}

/// Poll `timer` with a waker that does nothing.
fn poll_noop(timer: &mut Timer) -> Poll<()> {
    timer
        .as_mut()
        .poll(&mut TaskContext::from_waker(Waker::noop()))
}

/// What the spawned task of `spawn_detached` got through, and who to wake about it.
#[derive(Debug, Default)]
struct SpawnState {
    started: bool,
    completed: bool,
    dropped: bool,
    waker: Option<Waker>,
}

/// Owned by the spawned future: records its progress and, when the future is dropped
/// unfinished (cancelled), says so.
struct Witness {
    state: Arc<Mutex<SpawnState>>,
}

impl Witness {
    fn update(&mut self, change: impl FnOnce(&mut SpawnState)) {
        let waker = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            change(&mut st);
            st.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.update(|st| st.dropped = true);
    }
}
