//! Runtime-side scaffolding: the [`ScenarioRuntime`] trait the two test runtimes
//! implement, and runtime-agnostic waiting helpers (sleep, guarded waits) built on
//! [`Runtime::sleep_until`] alone. The counting wrapper is core's
//! [`CountingRuntime`](tether_core::drive::CountingRuntime).

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use futures_core::Stream;
use futures_util::future::{select, Either};
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

/// Sleep for `duration` on `rt`'s clock (instant on the paused tokio clock).
pub async fn sleep<R: Runtime>(rt: &R, duration: Duration) {
    let now = rt.now();
    let mut timer = rt.sleep_until(now.checked_add(duration).unwrap_or(now));
    poll_fn(|cx| timer.as_mut().poll(cx)).await;
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
