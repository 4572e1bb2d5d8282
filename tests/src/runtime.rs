//! Runtime-side scaffolding: the [`ScenarioRuntime`] trait the two test runtimes
//! implement, the [`Counting`] wrapper, and runtime-agnostic waiting helpers (sleep,
//! yield, guarded waits) built on [`Runtime::sleep_until`] alone.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_core::Stream;
use futures_util::future::{select, Either};
use tether_core::drive::{AsyncTimer, SpawnFuture};
use tether_core::{Annotated, Chunk, Runtime};
use tether_smol::SmolRuntime;
use tether_tokio::TokioRuntime;

/// How long a guarded wait may take before the test fails. On the paused tokio clock
/// this costs no real time; on smol it is only ever reached by a failing test.
pub const GUARD: Duration = Duration::from_secs(5);

/// A runtime a scenario runs on.
pub trait ScenarioRuntime: Runtime + Clone {
    /// Whether the clock is a paused test clock, so durations measured by tether are
    /// exactly the sleeps the test made (tokio under `start_paused`); `false` for real
    /// clocks (smol), where a scenario asserts only what does not depend on timing.
    fn exact_clock(&self) -> bool;
}

impl ScenarioRuntime for TokioRuntime {
    /// `true`: [`on_both_runtimes!`](crate::on_both_runtimes) runs tokio scenarios with
    /// `start_paused = true`.
    fn exact_clock(&self) -> bool {
        true
    }
}

impl ScenarioRuntime for SmolRuntime {
    fn exact_clock(&self) -> bool {
        false
    }
}

/// Run a scenario on smol's global executor (what the smol half of
/// [`on_both_runtimes!`](crate::on_both_runtimes) calls).
pub fn run_smol<F, Fut>(scenario: F)
where
    F: FnOnce(SmolRuntime) -> Fut,
    Fut: Future<Output = ()>,
{
    smol::block_on(scenario(SmolRuntime::global()));
}

#[derive(Debug, Default)]
struct Counts {
    spawns: AtomicUsize,
    /// Spawned futures not yet finished (or dropped unfinished).
    live: AtomicUsize,
    timers: AtomicUsize,
    resets: AtomicUsize,
    /// Woken whenever a spawned task finishes.
    idle_waiters: std::sync::Mutex<Vec<std::task::Waker>>,
}

/// Counts a spawned future as live until it is dropped (finished or not).
struct LiveTask {
    counts: Arc<Counts>,
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        self.counts.live.fetch_sub(1, Ordering::SeqCst);
        let waiters = std::mem::take(
            &mut *self
                .counts
                .idle_waiters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        waiters.into_iter().for_each(std::task::Waker::wake);
    }
}

/// Wraps a [`Runtime`] and counts what the driver asks of it: spawned tasks, created
/// timers and in-place timer resets. Clones share the counts.
#[derive(Clone, Debug)]
pub struct Counting<R> {
    inner: R,
    counts: Arc<Counts>,
}

impl<R: Runtime> Counting<R> {
    /// Count what is asked of `inner`.
    pub fn new(inner: R) -> Counting<R> {
        Counting {
            inner,
            counts: Arc::default(),
        }
    }

    /// Tasks spawned so far.
    pub fn spawns(&self) -> usize {
        self.counts.spawns.load(Ordering::SeqCst)
    }

    /// Spawned tasks that have not finished yet (a leak check: must return to 0).
    pub fn live_tasks(&self) -> usize {
        self.counts.live.load(Ordering::SeqCst)
    }

    /// Resolves once no spawned task is live (woken by each task's end).
    pub fn until_idle(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.live_tasks() == 0 {
                return Poll::Ready(());
            }
            self.counts
                .idle_waiters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(cx.waker().clone());
            // Re-check: a task may have ended between the check and the push.
            if self.live_tasks() == 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Timers created so far (`sleep_until` calls).
    pub fn timers(&self) -> usize {
        self.counts.timers.load(Ordering::SeqCst)
    }

    /// In-place timer resets so far.
    pub fn resets(&self) -> usize {
        self.counts.resets.load(Ordering::SeqCst)
    }
}

impl<R: Runtime> Runtime for Counting<R> {
    fn spawn(&self, future: SpawnFuture) {
        self.counts.spawns.fetch_add(1, Ordering::SeqCst);
        self.counts.live.fetch_add(1, Ordering::SeqCst);
        let live = LiveTask {
            counts: self.counts.clone(),
        };
        self.inner.spawn(Box::pin(async move {
            let _live = live;
            future.await;
        }));
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        self.counts.timers.fetch_add(1, Ordering::SeqCst);
        Box::pin(CountingTimer {
            inner: self.inner.sleep_until(deadline),
            counts: self.counts.clone(),
        })
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }
}

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
        this.counts.resets.fetch_add(1, Ordering::SeqCst);
        this.inner.as_mut().reset(deadline);
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().inner.as_mut().poll(cx)
    }
}

/// Sleep for `duration` on `rt`'s clock (instant on the paused tokio clock).
pub async fn sleep<R: Runtime>(rt: &R, duration: Duration) {
    let now = rt.now();
    let mut timer = rt.sleep_until(now.checked_add(duration).unwrap_or(now));
    poll_fn(|cx| timer.as_mut().poll(cx)).await;
}

/// Yield to the executor once (other ready tasks may run).
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await;
}

/// Await `future`, failing the test with `what` if it takes longer than [`GUARD`].
///
/// The guard is polled *first*: when its timer wakes the task, the test fails even if
/// `future` would now complete. Otherwise a lost wake-up (a future that was ready but
/// never woken) would pass as soon as the guard's own wake-up polled it.
pub async fn guarded<R: Runtime, F: Future>(rt: &R, what: &str, future: F) -> F::Output {
    match select(pin!(sleep(rt, GUARD)), pin!(future)).await {
        Either::Left(((), _)) => panic!("timed out after {GUARD:?} waiting for {what}"),
        Either::Right((out, _)) => out,
    }
}

/// The stream's next item, guarded.
pub async fn next_item<R, S>(rt: &R, stream: &mut S) -> Option<Annotated<Chunk>>
where
    R: Runtime,
    S: Stream<Item = Annotated<Chunk>> + Unpin,
{
    guarded(
        rt,
        "the next stream item",
        poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)),
    )
    .await
}

/// Poll the stream exactly once, without waiting.
pub async fn poll_once<S>(stream: &mut S) -> Poll<Option<S::Item>>
where
    S: Stream + Unpin,
{
    poll_fn(|cx| Poll::Ready(Pin::new(&mut *stream).poll_next(cx))).await
}
