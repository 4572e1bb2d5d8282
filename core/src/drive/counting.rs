//! [`CountingRuntime`]: a [`Runtime`] wrapper that counts what the driver (or an
//! engine) asks of a runtime, so a test or a load run can prove that no task leaked and
//! that the happy path spawned nothing.
//!
//! Owns the counters only; it never changes what the wrapped runtime does.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Instant;

use super::{AsyncTimer, Runtime, SpawnFuture};
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{lock, Arc, Mutex};

/// Wraps a [`Runtime`] and counts spawned tasks (all of them, and those still live),
/// created timers and in-place timer resets. Clones share the counts, so keep a clone
/// to read them after handing the runtime to an [`Adapter`](super::Adapter) or an
/// engine.
///
/// A task is live from [`spawn`](Runtime::spawn) until its future completes or is
/// dropped unfinished; a [`live`](Self::live) count that does not return to zero once
/// the work is done is a leaked task. The wrapper costs one allocation per task and
/// per timer and a few atomic operations; nothing else changes.
///
/// ```
/// # use tether_core::drive::{CountingRuntime, Runtime};
/// # fn demo(runtime: impl Runtime + Clone) {
/// let counting = CountingRuntime::new(runtime);
/// counting.spawn(Box::pin(async {}));
/// assert_eq!(counting.spawned(), 1);
/// # }
/// ```
#[derive(Clone)]
pub struct CountingRuntime<R> {
    inner: R,
    counts: Arc<Counts>,
}

struct Counts {
    spawned: AtomicUsize,
    live: AtomicUsize,
    timers: AtomicUsize,
    resets: AtomicUsize,
    /// Woken whenever a spawned task ends (see [`CountingRuntime::until_idle`]).
    idle_waiters: Mutex<Vec<Waker>>,
}

impl<R: Runtime> CountingRuntime<R> {
    /// Count what is asked of `inner`, from zero.
    pub fn new(inner: R) -> CountingRuntime<R> {
        CountingRuntime {
            inner,
            counts: Arc::new(Counts {
                spawned: AtomicUsize::new(0),
                live: AtomicUsize::new(0),
                timers: AtomicUsize::new(0),
                resets: AtomicUsize::new(0),
                idle_waiters: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The wrapped runtime.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// Tasks spawned so far.
    pub fn spawned(&self) -> usize {
        // Relaxed: a tally; nothing is published through it.
        self.counts.spawned.load(Ordering::Relaxed)
    }

    /// Spawned tasks whose future has neither completed nor been dropped yet.
    pub fn live(&self) -> usize {
        // Acquire: pairs with the Release decrement at a task's end, so a task seen
        // ended here has finished its work.
        self.counts.live.load(Ordering::Acquire)
    }

    /// Timers created so far ([`Runtime::sleep_until`] calls).
    pub fn timers(&self) -> usize {
        // Relaxed: a tally; nothing is published through it.
        self.counts.timers.load(Ordering::Relaxed)
    }

    /// In-place resets of those timers so far ([`AsyncTimer::reset`] calls).
    pub fn resets(&self) -> usize {
        // Relaxed: a tally; nothing is published through it.
        self.counts.resets.load(Ordering::Relaxed)
    }

    /// Resolves once no spawned task is live; woken by each task's end, so it needs no
    /// timer. It never resolves while a task leaks: put a deadline around it.
    pub fn until_idle(&self) -> impl Future<Output = ()> + '_ {
        self.until_live_at_most(0)
    }

    /// Resolves once at most `n` spawned tasks are live (an adapter's parked abort task,
    /// [`Adapter::background_tasks`](super::Adapter::background_tasks), is one that
    /// stays); woken by each task's end, so it needs no timer. Put a deadline around it.
    pub fn until_live_at_most(&self, n: usize) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.live() <= n {
                return Poll::Ready(());
            }
            lock(&self.counts.idle_waiters).push(cx.waker().clone());
            // Re-check: a task may have ended (and taken the waiters) between the first
            // check and the push.
            if self.live() <= n {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

impl<R: fmt::Debug> fmt::Debug for CountingRuntime<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = &self.counts;
        // Relaxed: a snapshot for display only.
        let read = |n: &AtomicUsize| n.load(Ordering::Relaxed);
        f.debug_struct("CountingRuntime")
            .field("inner", &self.inner)
            .field("spawned", &read(&counts.spawned))
            .field("live", &read(&counts.live))
            .field("timers", &read(&counts.timers))
            .field("resets", &read(&counts.resets))
            .finish()
    }
}

/// Counts its task as live until dropped: with the task's future, whether it completed
/// or not.
struct LiveTask(Arc<Counts>);

impl Drop for LiveTask {
    fn drop(&mut self) {
        // Release: pairs with the Acquire load in `live`.
        self.0.live.fetch_sub(1, Ordering::Release);
        let waiters = std::mem::take(&mut *lock(&self.0.idle_waiters));
        waiters.into_iter().for_each(Waker::wake);
    }
}

impl<R: Runtime> Runtime for CountingRuntime<R> {
    fn spawn(&self, future: SpawnFuture) {
        // Relaxed: a tally.
        self.counts.spawned.fetch_add(1, Ordering::Relaxed);
        // Relaxed: the increment is sequenced before the spawn, so the task's Release
        // decrement always comes after it.
        self.counts.live.fetch_add(1, Ordering::Relaxed);
        let live = LiveTask(self.counts.clone());
        self.inner.spawn(Box::pin(async move {
            let _live = live;
            future.await;
        }));
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        // Relaxed: a tally.
        self.counts.timers.fetch_add(1, Ordering::Relaxed);
        Box::pin(CountingTimer {
            inner: self.inner.sleep_until(deadline),
            counts: self.counts.clone(),
        })
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }
}

/// The wrapped runtime's timer, counting its resets.
struct CountingTimer {
    inner: Pin<Box<dyn AsyncTimer>>,
    counts: Arc<Counts>,
}

impl fmt::Debug for CountingTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingTimer")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl AsyncTimer for CountingTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.get_mut();
        // Relaxed: a tally.
        this.counts.resets.fetch_add(1, Ordering::Relaxed);
        this.inner.as_mut().reset(deadline);
    }

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        self.get_mut().inner.as_mut().poll(cx)
    }
}

#[cfg(all(test, not(tether_loom)))]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::task::Wake;
    use std::time::Duration;

    use super::*;

    /// Keeps spawned futures for the test to poll or drop; its timers fire when the
    /// test says so.
    #[derive(Default)]
    struct Held {
        tasks: std::sync::Mutex<Vec<SpawnFuture>>,
        fired: Arc<AtomicBool>,
        at: Option<Instant>,
    }

    impl fmt::Debug for Held {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Held")
        }
    }

    impl Held {
        fn take(&self) -> SpawnFuture {
            self.tasks.lock().unwrap().remove(0)
        }
    }

    #[derive(Debug)]
    struct HeldTimer {
        fired: Arc<AtomicBool>,
        deadline: Instant,
    }

    impl AsyncTimer for HeldTimer {
        fn reset(self: Pin<&mut Self>, deadline: Instant) {
            self.get_mut().deadline = deadline;
        }
        fn poll(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<()> {
            if self.fired.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    impl Runtime for Held {
        fn spawn(&self, future: SpawnFuture) {
            self.tasks.lock().unwrap().push(future);
        }
        fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
            Box::pin(HeldTimer {
                fired: self.fired.clone(),
                deadline,
            })
        }
        fn now(&self) -> Instant {
            self.at.expect("a test that reads the clock sets it")
        }
    }

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Flag {
        fn take(&self) -> bool {
            self.0.swap(false, Ordering::SeqCst)
        }
    }

    #[test]
    fn a_task_is_live_until_it_completes_or_is_dropped() {
        let counting = CountingRuntime::new(Arc::new(Held::default()));
        let observer = counting.clone();
        counting.spawn(Box::pin(async {}));
        counting.spawn(Box::pin(std::future::pending()));
        assert_eq!((observer.spawned(), observer.live()), (2, 2));

        let flag = std::sync::Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        let mut cx = TaskContext::from_waker(&waker);
        let mut idle = std::pin::pin!(observer.until_idle());
        assert!(idle.as_mut().poll(&mut cx).is_pending());

        let mut done = counting.inner().take();
        assert!(done.as_mut().poll(&mut cx).is_ready());
        assert_eq!(observer.live(), 1, "a completed task is not live");
        assert!(flag.take(), "each task's end wakes the waiter");
        drop(done);
        assert_eq!(observer.live(), 1, "nor counted twice when dropped");
        assert!(idle.as_mut().poll(&mut cx).is_pending());

        drop(counting.inner().take());
        assert_eq!((observer.spawned(), observer.live()), (2, 0));
        assert!(flag.take(), "a task dropped unfinished ends too");
        assert!(idle.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn timers_and_resets_are_counted_and_delegated() {
        let at = Instant::now();
        let counting = CountingRuntime::new(Held {
            at: Some(at),
            ..Held::default()
        });
        assert_eq!(counting.now(), at);
        let mut timer = counting.sleep_until(at + Duration::from_secs(1));
        timer.as_mut().reset(at + Duration::from_secs(2));
        timer.as_mut().reset(at);
        assert_eq!((counting.timers(), counting.resets()), (1, 2));

        let mut cx = TaskContext::from_waker(Waker::noop());
        assert!(timer.as_mut().poll(&mut cx).is_pending());
        counting.inner().fired.store(true, Ordering::SeqCst);
        assert!(timer.as_mut().poll(&mut cx).is_ready());
        assert_eq!(counting.spawned(), 0);
        assert_eq!(
            format!("{counting:?}")
                .split_once(", spawned")
                .map(|(_, counts)| counts),
            Some(": 0, live: 0, timers: 1, resets: 2 }")
        );
    }
}
