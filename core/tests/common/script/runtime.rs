//! The manual runtime: a frozen clock moved by hand, timers that fire only then, and
//! spawned futures polled inline.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use tether_core::drive::SpawnFuture;
use tether_core::{AsyncTimer, Runtime};

use super::lock;

struct RtState {
    base: Instant,
    offset: Mutex<Duration>,
    pending: Mutex<Vec<SpawnFuture>>,
    spawns: AtomicUsize,
    /// `(timer id, deadline, waker)` of every timer waiting for the clock.
    timer_wakers: Mutex<Vec<(usize, Instant, Waker)>>,
    timers: AtomicUsize,
}

/// A [`Runtime`] driven entirely by the harness.
#[derive(Clone)]
pub(crate) struct ManualRuntime(Arc<RtState>);

impl fmt::Debug for ManualRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualRuntime")
            .field("now", &*lock(&self.0.offset))
            .finish_non_exhaustive()
    }
}

impl Default for ManualRuntime {
    fn default() -> Self {
        ManualRuntime::new()
    }
}

impl ManualRuntime {
    /// A runtime whose clock stands still until [`ManualRuntime::advance`].
    pub(crate) fn new() -> ManualRuntime {
        ManualRuntime(Arc::new(RtState {
            base: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
            pending: Mutex::new(Vec::new()),
            spawns: AtomicUsize::new(0),
            timer_wakers: Mutex::new(Vec::new()),
            timers: AtomicUsize::new(0),
        }))
    }

    /// Move the clock forward and wake the timers that are now due.
    pub(crate) fn advance(&self, by: Duration) {
        let now = {
            let mut offset = lock(&self.0.offset);
            *offset += by;
            self.0.base + *offset
        };
        let due: Vec<Waker> = {
            let mut wakers = lock(&self.0.timer_wakers);
            let (due, left) = std::mem::take(&mut *wakers)
                .into_iter()
                .partition(|(_, at, _)| *at <= now);
            *wakers = left;
            due.into_iter().map(|(_, _, w)| w).collect()
        };
        due.into_iter().for_each(Waker::wake);
    }

    /// Poll every spawned future still pending once, with a no-op waker.
    pub(crate) fn run_spawned(&self) {
        let tasks = std::mem::take(&mut *lock(&self.0.pending));
        let mut cx = TaskContext::from_waker(Waker::noop());
        let mut left: Vec<SpawnFuture> = tasks
            .into_iter()
            .filter_map(|mut t| t.as_mut().poll(&mut cx).is_pending().then_some(t))
            .collect();
        // Futures spawned while we polled went straight into `pending`.
        lock(&self.0.pending).append(&mut left);
    }

    /// How many futures were spawned so far.
    pub(crate) fn spawns(&self) -> usize {
        self.0.spawns.load(Ordering::SeqCst)
    }

    /// How many spawned futures are still pending.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.0.pending).len()
    }
}

impl Runtime for ManualRuntime {
    fn spawn(&self, mut future: SpawnFuture) {
        self.0.spawns.fetch_add(1, Ordering::SeqCst);
        // Run it inline (no lock held: it may spawn or make a timer itself).
        let mut cx = TaskContext::from_waker(Waker::noop());
        if future.as_mut().poll(&mut cx).is_pending() {
            lock(&self.0.pending).push(future);
        }
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(ManualTimer {
            rt: self.clone(),
            id: self.0.timers.fetch_add(1, Ordering::SeqCst),
            deadline,
        })
    }

    fn now(&self) -> Instant {
        self.0.base + *lock(&self.0.offset)
    }
}

#[derive(Debug)]
struct ManualTimer {
    rt: ManualRuntime,
    id: usize,
    deadline: Instant,
}

impl AsyncTimer for ManualTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().deadline = deadline;
    }

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.rt.now() >= self.deadline {
            return Poll::Ready(());
        }
        let mut wakers = lock(&self.rt.0.timer_wakers);
        wakers.retain(|(id, _, _)| *id != self.id);
        wakers.push((self.id, self.deadline, cx.waker().clone()));
        Poll::Pending
    }
}
