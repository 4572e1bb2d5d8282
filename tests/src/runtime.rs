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
    timers: AtomicUsize,
    resets: AtomicUsize,
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
        self.inner.spawn(future);
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
pub async fn guarded<R: Runtime, F: Future>(rt: &R, what: &str, future: F) -> F::Output {
    match select(pin!(future), pin!(sleep(rt, GUARD))).await {
        Either::Left((out, _)) => out,
        Either::Right(((), _)) => panic!("timed out after {GUARD:?} waiting for {what}"),
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
