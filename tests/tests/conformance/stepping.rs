//! The kit on a bare `Runtime` that cannot spawn, whose clock moves only when a pending
//! timer is polled.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use tether_core::conformance::{
    run_conformance_on, ConformanceFailure, ConformanceReport, CANCEL_WITHIN, CHECK_TIMEOUT,
};
use tether_core::drive::{AsyncTimer, SpawnFuture};
use tether_core::Runtime;

use crate::engine::Flaw;
use crate::{factory, passed};

// ---- on a bare Runtime: no spawn, a clock that only moves when a timer is polled ---

/// How far the stepping clock moves per poll of a pending timer.
const STEP: Duration = Duration::from_millis(10);

/// A [`Runtime`] whose clock moves only when a pending timer is polled, so deadlines
/// pass in a few thousand polls of real time, even against an always-ready stream.
#[derive(Debug, Clone)]
struct SteppingRuntime {
    clock: Arc<Mutex<Instant>>,
}

impl SteppingRuntime {
    fn new() -> SteppingRuntime {
        SteppingRuntime {
            clock: Arc::new(Mutex::new(Instant::now())),
        }
    }
}

impl Runtime for SteppingRuntime {
    fn spawn(&self, _future: SpawnFuture) {
        panic!("the conformance kit spawns nothing");
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(SteppingTimer {
            clock: Arc::clone(&self.clock),
            deadline,
        })
    }

    fn now(&self) -> Instant {
        *self.clock.lock().unwrap()
    }
}

#[derive(Debug)]
struct SteppingTimer {
    clock: Arc<Mutex<Instant>>,
    deadline: Instant,
}

impl AsyncTimer for SteppingTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().deadline = deadline;
    }

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let mut now = self.clock.lock().unwrap();
        if *now >= self.deadline {
            return Poll::Ready(());
        }
        // Land exactly on the deadline, so the kit's reported waits are exact.
        *now = (*now + STEP).min(self.deadline);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

fn on_stepping_clock(flaw: Flaw) -> Result<ConformanceReport, ConformanceFailure> {
    let runtime = SteppingRuntime::new();
    smol::block_on(run_conformance_on(&runtime, &factory(flaw)))
}

#[test]
fn correct_engine_passes_on_a_runtime_that_cannot_spawn() {
    assert_eq!(on_stepping_clock(Flaw::None), Ok(passed()));
}

#[test]
fn always_ready_endless_stream_is_hung_not_a_frozen_kit() {
    let expected = ConformanceFailure::Hung {
        check: "single_generate",
        after: CHECK_TIMEOUT,
    };
    assert_eq!(on_stepping_clock(Flaw::Endless), Err(expected));
}

#[test]
fn stall_after_stop_is_reported_after_two_seconds_of_runtime_clock() {
    let expected = ConformanceFailure::CancellationNotObserved {
        after: CANCEL_WITHIN,
    };
    assert_eq!(on_stepping_clock(Flaw::StallsOnStop), Err(expected));
}
