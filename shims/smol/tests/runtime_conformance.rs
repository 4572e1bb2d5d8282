//! `SmolRuntime` against tether's runtime contract
//! ([`tether_core::run_runtime_conformance`]), on smol's global executor and on a private
//! one; and the bare one-shot async-io timer the shim used to wrap, which fails it, as do
//! runtimes with other single flaws (each named by its typed failure).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tether_core::drive::{
    AsyncTimer, RuntimeCheckFailure, RuntimeCheckReport, SpawnFuture, RUNTIME_CHECKS,
    RUNTIME_CHECK_GUARD,
};
use tether_core::{run_runtime_conformance, Runtime};
use tether_smol::SmolRuntime;

const PASSED: RuntimeCheckReport = RuntimeCheckReport {
    checks: RUNTIME_CHECKS,
};

#[test]
fn global_executor_passes() {
    assert_eq!(
        smol::block_on(tether_smol::run_runtime_conformance()),
        Ok(PASSED)
    );
}

#[test]
fn private_executor_passes() {
    let executor = Arc::new(smol::Executor::new());
    let runtime = SmolRuntime::with_executor(executor.clone());
    // The kit's spawned task goes to `executor`, so the kit runs inside it.
    let report = smol::block_on(executor.run(run_runtime_conformance(&runtime)));
    assert_eq!(report, Ok(PASSED));
}

/// `SmolRuntime` as it was: a bare `async_io::Timer::at`, which after firing is
/// pending forever (registering no waker) until `set_at`.
#[derive(Debug)]
struct OneShotRuntime;

impl Runtime for OneShotRuntime {
    fn spawn(&self, future: SpawnFuture) {
        smol::spawn(future).detach();
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(OneShotTimer {
            timer: async_io::Timer::at(deadline),
        })
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[derive(Debug)]
struct OneShotTimer {
    timer: async_io::Timer,
}

impl AsyncTimer for OneShotTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().timer.set_at(deadline);
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.get_mut().timer).poll(cx).map(|_| ())
    }
}

#[test]
fn one_shot_async_io_timer_is_not_ready_after_firing() {
    let failure = smol::block_on(run_runtime_conformance(&OneShotRuntime));
    assert_eq!(
        failure,
        Err(RuntimeCheckFailure::NotReadyAfterFiring {
            check: "stays_ready_after_firing"
        })
    );
}

/// One way to break the contract, on top of an otherwise correct smol runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// Timers are ready whenever polled, deadline or not.
    ReadyAtOnce,
    /// A timer that has fired stays ready through any later reset.
    StaysFiredThroughReset,
    /// `spawn` drops smol's `Task` instead of detaching it, which cancels the future.
    SpawnCancelsOnDrop,
}

#[derive(Debug)]
struct FlawedRuntime(Flaw);

impl Runtime for FlawedRuntime {
    fn spawn(&self, future: SpawnFuture) {
        let task = smol::spawn(future);
        if self.0 != Flaw::SpawnCancelsOnDrop {
            task.detach();
        }
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(FlawedTimer {
            flaw: self.0,
            inner: SmolRuntime::global().sleep_until(deadline),
            fired: false,
        })
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[derive(Debug)]
struct FlawedTimer {
    flaw: Flaw,
    inner: Pin<Box<dyn AsyncTimer>>,
    fired: bool,
}

impl AsyncTimer for FlawedTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().inner.as_mut().reset(deadline);
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.flaw {
            Flaw::ReadyAtOnce => Poll::Ready(()),
            Flaw::StaysFiredThroughReset if this.fired => Poll::Ready(()),
            _ => {
                let polled = this.inner.as_mut().poll(cx);
                this.fired |= polled.is_ready();
                polled
            }
        }
    }
}

/// The kit's near deadline: how early a timer that ignores it fires, at most.
const SHORT: Duration = Duration::from_millis(10);

#[test]
fn timer_ready_before_its_deadline_fires_early() {
    let failure = smol::block_on(run_runtime_conformance(&FlawedRuntime(Flaw::ReadyAtOnce)));
    let Err(RuntimeCheckFailure::FiredEarly { check, early_by }) = failure else {
        panic!("expected FiredEarly, got {failure:?}");
    };
    assert_eq!(check, "fires_at_deadline");
    // The guard is polled first, so the first early timer seen is the guard itself, a
    // whole guard (less the microseconds the kit took) before its deadline.
    assert!(
        early_by > RUNTIME_CHECK_GUARD / 2 && early_by <= RUNTIME_CHECK_GUARD,
        "{early_by:?}"
    );
}

#[test]
fn timer_that_stays_fired_through_a_reset_ignores_it() {
    let flawed = FlawedRuntime(Flaw::StaysFiredThroughReset);
    let failure = smol::block_on(run_runtime_conformance(&flawed));
    let Err(RuntimeCheckFailure::ResetAfterFiringIgnored { check, early_by }) = failure else {
        panic!("expected ResetAfterFiringIgnored, got {failure:?}");
    };
    assert_eq!(check, "reset_after_firing_later");
    assert!(
        early_by > Duration::ZERO && early_by <= SHORT,
        "{early_by:?}"
    );
}

#[test]
fn spawn_that_cancels_on_drop_is_not_detached() {
    let flawed = FlawedRuntime(Flaw::SpawnCancelsOnDrop);
    assert_eq!(
        smol::block_on(run_runtime_conformance(&flawed)),
        Err(RuntimeCheckFailure::SpawnNotDetached {
            check: "spawn_detached"
        })
    );
}
