//! The conformance kit: checks any [`LlmEngine`] against the engine contract, on any
//! [`Runtime`], and names the first broken rule with a typed [`ConformanceFailure`].
//!
//! The kit calls the engine *directly* (with [`GenerateContext::new`]), never through
//! the [`Adapter`](crate::Adapter): the adapter papers over some engine faults (it
//! synthesizes a `Cancelled` terminal, for one), and the point here is to see the
//! engine as it is. It owns no clock and spawns no task: every deadline is a timer from
//! the given runtime (so a paused tokio clock makes the 2 s and 30 s limits instant),
//! and concurrent work is polled in place. It must not touch the lifecycle machine.
//!
//! The checks, in order, each on a fresh engine from the factory (see [`CHECKS`]):
//!
//! 1. `start_reports_model`: `start` succeeds and reports a non-empty model;
//! 2. `single_generate`: one `generate` yields chunks and ends with exactly one
//!    terminal chunk, as its last item, and no error item;
//! 3. `interleaved_generates`: 8 requests generated at once, their streams polled
//!    round-robin, each yields chunks and a terminal;
//! 4. `stop_yields_cancelled`: a request with `max_tokens = 10_000`, stopped and
//!    aborted right after `generate` (as the adapter would), ends with a `Cancelled`
//!    terminal within [`CANCEL_WITHIN`] of the runtime's clock;
//! 5. `cleanup_twice`: after `start`, `cleanup` succeeds twice in a row;
//! 6. `cleanup_without_start`: `cleanup` on a never-started engine succeeds.
//!
//! Checks 1 to 4 also `cleanup` the engine at their end (a failure there is
//! [`ConformanceFailure::CleanupFailed`]), and every check, cleanup included, must
//! finish within [`CHECK_TIMEOUT`] or it is [`ConformanceFailure::Hung`].
//!
//! # Example
//!
//! An engine crate checks itself in a test; the runtime shims wrap
//! [`run_conformance_on`] with their own runtime (`tether_tokio::run_conformance`,
//! `tether_smol::run_conformance`):
//!
//! ```no_run
//! use std::sync::Arc;
//! use tether_core::conformance::run_conformance_on;
//! use tether_core::{LlmEngine, Runtime};
//!
//! async fn check(runtime: &dyn Runtime, make: impl Fn() -> Arc<dyn LlmEngine> + Send + Sync) {
//!     match run_conformance_on(runtime, &make).await {
//!         Ok(report) => println!("{} passed {:?}", report.model, report.checks),
//!         Err(failure) => panic!("engine is not conformant: {failure}"),
//!     }
//! }
//! ```

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use crate::context::Context;
use crate::drive::{AsyncTimer, Runtime};
use crate::engine::{ChunkStream, GenerateContext, LlmEngine};
use crate::error::EngineError;
use crate::protocol::{Chunk, FinishReason, Request};

/// The names of the checks, in the order they run (and appear in
/// [`ConformanceReport::checks`]).
pub const CHECKS: [&str; 6] = [
    CHECK_START,
    CHECK_SINGLE,
    CHECK_INTERLEAVED,
    CHECK_STOP,
    CHECK_CLEANUP_TWICE,
    CHECK_CLEANUP_WITHOUT_START,
];

/// How long a stopped request may take to end with its `Cancelled` terminal.
pub const CANCEL_WITHIN: Duration = Duration::from_secs(2);

/// How long any one check may take before it counts as hung.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// How many requests the interleaving check runs at once.
pub const INTERLEAVED_REQUESTS: usize = 8;

const CHECK_START: &str = "start_reports_model";
const CHECK_SINGLE: &str = "single_generate";
const CHECK_INTERLEAVED: &str = "interleaved_generates";
const CHECK_STOP: &str = "stop_yields_cancelled";
const CHECK_CLEANUP_TWICE: &str = "cleanup_twice";
const CHECK_CLEANUP_WITHOUT_START: &str = "cleanup_without_start";

/// The worker id the kit starts engines as.
const WORKER_ID: u64 = 0;
/// `max_tokens` of the requests that are meant to finish on their own.
const SHORT_MAX_TOKENS: u32 = 16;
/// `max_tokens` of the request that is stopped: long enough that only a stop ends it.
const STOP_MAX_TOKENS: u32 = 10_000;
const PROMPT: [u32; 3] = [1, 2, 3];
/// How many ready items the kit takes in one poll before it yields. A stream that is
/// always ready (an endless engine) would otherwise never let a deadline be checked.
const ITEMS_PER_POLL: usize = 64;

/// What a passing engine produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConformanceReport {
    /// The names of the checks passed, in order (all of [`CHECKS`]).
    pub checks: Vec<&'static str>,
    /// The model the engine reported from `start`.
    pub model: String,
}

/// The first rule an engine broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConformanceFailure {
    /// `start` returned an error.
    #[error("start failed: {0}")]
    StartFailed(EngineError),
    /// `start` succeeded but reported an empty model name.
    #[error("start reported an empty model name")]
    EmptyModelInConfig,
    /// `generate` returned a setup error for the single request.
    #[error("generate failed: {0}")]
    GenerateFailed(EngineError),
    /// The single request's stream ended without yielding anything.
    #[error("stream ended without yielding any chunk")]
    NoChunksYielded,
    /// A stream yielded an item after its terminal chunk; `index` is that item's
    /// 0-based position in the stream.
    #[error("stream yielded item {index} after its terminal chunk")]
    ChunkAfterTerminal {
        /// The 0-based position of the offending item.
        index: usize,
    },
    /// A stream (single, interleaved or stopped) ended without a terminal chunk.
    #[error("engine ended without a terminal chunk")]
    NoTerminalChunk,
    /// The single or the stopped request's stream yielded an error item.
    #[error("stream yielded an error: {0}")]
    StreamYieldedError(EngineError),
    /// One of the interleaved requests failed, at `generate` or with an error item.
    #[error("interleaved request {request} failed: {error}")]
    ConcurrentGenerateFailed {
        /// The 0-based number of the failed request.
        request: usize,
        /// What the engine reported.
        error: EngineError,
    },
    /// One of the interleaved requests ended without yielding anything.
    #[error("interleaved request {request} ended without yielding any chunk")]
    ConcurrentNoChunks {
        /// The 0-based number of the empty request.
        request: usize,
    },
    /// A stopped request had not ended `after` the stop (the runtime's clock).
    #[error("stopped request did not end within {after:?} of the stop")]
    CancellationNotObserved {
        /// How long the kit waited.
        after: Duration,
    },
    /// A stopped request (with `max_tokens = 10_000`) ended with `reason`, not `Cancelled`.
    #[error("stopped request finished with `{reason}` instead of `cancelled`")]
    CancellationIgnored {
        /// The finish reason the engine reported.
        reason: FinishReason,
    },
    /// The check named `check` did not finish within [`CHECK_TIMEOUT`].
    #[error("check `{check}` hung for {after:?}")]
    Hung {
        /// The name of the check (one of [`CHECKS`]).
        check: &'static str,
        /// How long the kit waited.
        after: Duration,
    },
    /// `cleanup` after a started engine failed.
    #[error("cleanup failed: {0}")]
    CleanupFailed(EngineError),
    /// A second `cleanup` in a row failed (cleanup must be idempotent).
    #[error("second cleanup failed: {0}")]
    SecondCleanupFailed(EngineError),
    /// `cleanup` on an engine that was never started failed.
    #[error("cleanup on a never-started engine failed: {0}")]
    CleanupWithoutStartFailed(EngineError),
}

/// Run every check against engines made by `factory`, on `runtime`; stop at the first
/// failure. Each check gets a fresh engine. See the [module docs](self) for the checks.
///
/// # Example
///
/// ```no_run
/// # use std::sync::Arc;
/// # use tether_core::{conformance, LlmEngine, Runtime};
/// # async fn demo(runtime: &dyn Runtime, make: fn() -> Arc<dyn LlmEngine>) {
/// let report = conformance::run_conformance_on(runtime, &make).await.expect("conformant");
/// assert_eq!(report.checks, conformance::CHECKS);
/// # }
/// ```
pub async fn run_conformance_on(
    runtime: &dyn Runtime,
    factory: &(dyn Fn() -> Arc<dyn LlmEngine> + Send + Sync),
) -> Result<ConformanceReport, ConformanceFailure> {
    let mut checks = Vec::with_capacity(CHECKS.len());

    let engine = factory();
    let model = run_started(runtime, CHECK_START, &*engine, |_, model| async move {
        Ok(model)
    })
    .await?;
    drop(engine);
    checks.push(CHECK_START);

    let engine = factory();
    run_started(runtime, CHECK_SINGLE, &*engine, single_generate).await?;
    drop(engine);
    checks.push(CHECK_SINGLE);

    let engine = factory();
    run_started(runtime, CHECK_INTERLEAVED, &*engine, interleaved_generates).await?;
    drop(engine);
    checks.push(CHECK_INTERLEAVED);

    let engine = factory();
    run_started(runtime, CHECK_STOP, &*engine, |engine, model| {
        stop_yields_cancelled(runtime, engine, model)
    })
    .await?;
    drop(engine);
    checks.push(CHECK_STOP);

    let engine = factory();
    guarded(runtime, CHECK_CLEANUP_TWICE, async {
        start(&*engine).await?;
        engine
            .cleanup()
            .await
            .map_err(ConformanceFailure::CleanupFailed)?;
        engine
            .cleanup()
            .await
            .map_err(ConformanceFailure::SecondCleanupFailed)
    })
    .await?;
    drop(engine);
    checks.push(CHECK_CLEANUP_TWICE);

    let engine = factory();
    guarded(runtime, CHECK_CLEANUP_WITHOUT_START, async {
        engine
            .cleanup()
            .await
            .map_err(ConformanceFailure::CleanupWithoutStartFailed)
    })
    .await?;
    drop(engine);
    checks.push(CHECK_CLEANUP_WITHOUT_START);

    Ok(ConformanceReport { checks, model })
}

/// Start `engine`, run `body` on it, then clean it up, all within [`CHECK_TIMEOUT`].
/// After a failure the engine is still cleaned up, best effort (unless it hung: a hung
/// engine would likely hang its cleanup too).
async fn run_started<'e, T, Fut>(
    runtime: &dyn Runtime,
    check: &'static str,
    engine: &'e dyn LlmEngine,
    body: impl FnOnce(&'e dyn LlmEngine, String) -> Fut,
) -> Result<T, ConformanceFailure>
where
    Fut: Future<Output = Result<T, ConformanceFailure>> + 'e,
{
    let outcome = guarded(runtime, check, async {
        let model = start(engine).await?;
        let value = body(engine, model).await?;
        engine
            .cleanup()
            .await
            .map_err(ConformanceFailure::CleanupFailed)?;
        Ok(value)
    })
    .await;
    if let Err(failure) = &outcome {
        if !matches!(failure, ConformanceFailure::Hung { .. }) {
            let cleanup = async {
                engine
                    .cleanup()
                    .await
                    .map_err(ConformanceFailure::CleanupFailed)
            };
            let _best_effort = guarded(runtime, check, cleanup).await;
        }
    }
    outcome
}

async fn start(engine: &dyn LlmEngine) -> Result<String, ConformanceFailure> {
    let config = engine
        .start(WORKER_ID)
        .await
        .map_err(ConformanceFailure::StartFailed)?;
    if config.model.is_empty() {
        return Err(ConformanceFailure::EmptyModelInConfig);
    }
    Ok(config.model)
}

async fn single_generate(engine: &dyn LlmEngine, model: String) -> Result<(), ConformanceFailure> {
    let (request, gctx) = request("conformance-single", model, SHORT_MAX_TOKENS);
    let mut stream = engine
        .generate(request, gctx)
        .await
        .map_err(ConformanceFailure::GenerateFailed)?;
    let mut tally = Tally::default();
    while let Some(item) = next(&mut stream).await {
        tally.observe(item).map_err(|flaw| match flaw {
            ItemFlaw::AfterTerminal(index) => ConformanceFailure::ChunkAfterTerminal { index },
            ItemFlaw::Error(error) => ConformanceFailure::StreamYieldedError(error),
        })?;
        if tally.items % ITEMS_PER_POLL == 0 {
            yield_now().await;
        }
    }
    tally.finish(ConformanceFailure::NoChunksYielded)
}

async fn interleaved_generates(
    engine: &dyn LlmEngine,
    model: String,
) -> Result<(), ConformanceFailure> {
    let mut streams: Vec<Option<ChunkStream>> = Vec::with_capacity(INTERLEAVED_REQUESTS);
    for request_no in 0..INTERLEAVED_REQUESTS {
        let id = format!("conformance-interleaved-{request_no}");
        let (request, gctx) = request(&id, model.clone(), SHORT_MAX_TOKENS);
        let stream = engine.generate(request, gctx).await.map_err(|error| {
            ConformanceFailure::ConcurrentGenerateFailed {
                request: request_no,
                error,
            }
        })?;
        streams.push(Some(stream));
    }
    let mut tallies: Vec<Tally> = (0..INTERLEAVED_REQUESTS)
        .map(|_| Tally::default())
        .collect();

    // Round-robin: one item per live stream per pass, passes repeated while any stream
    // made progress. An engine that only advances a request when another is polled
    // (a batch scheduler) works here; one that serves them one after the other does too,
    // as long as each stream eventually wakes us.
    poll_fn(|cx| {
        let mut taken = 0;
        loop {
            let mut progressed = false;
            for (request_no, slot) in streams.iter_mut().enumerate() {
                match poll_interleaved(request_no, slot, &mut tallies[request_no], cx) {
                    Err(failure) => return Poll::Ready(Err(failure)),
                    Ok(true) => {
                        progressed = true;
                        taken += 1;
                    }
                    Ok(false) => {}
                }
            }
            if streams.iter().all(Option::is_none) {
                return Poll::Ready(Ok(()));
            }
            if !progressed {
                return Poll::Pending;
            }
            if taken >= ITEMS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    })
    .await
}

/// Poll interleaved request `request_no` once (if its stream is still live); `Ok(true)`
/// when it yielded an item or ended.
fn poll_interleaved(
    request_no: usize,
    slot: &mut Option<ChunkStream>,
    tally: &mut Tally,
    cx: &mut TaskContext<'_>,
) -> Result<bool, ConformanceFailure> {
    let Some(stream) = slot else { return Ok(false) };
    match stream.as_mut().poll_next(cx) {
        Poll::Pending => Ok(false),
        Poll::Ready(Some(item)) => {
            tally.observe(item).map_err(|flaw| match flaw {
                ItemFlaw::AfterTerminal(index) => ConformanceFailure::ChunkAfterTerminal { index },
                ItemFlaw::Error(error) => ConformanceFailure::ConcurrentGenerateFailed {
                    request: request_no,
                    error,
                },
            })?;
            Ok(true)
        }
        Poll::Ready(None) => {
            *slot = None;
            tally.finish(ConformanceFailure::ConcurrentNoChunks {
                request: request_no,
            })?;
            Ok(true)
        }
    }
}

async fn stop_yields_cancelled(
    runtime: &dyn Runtime,
    engine: &dyn LlmEngine,
    model: String,
) -> Result<(), ConformanceFailure> {
    let (request, gctx) = request("conformance-stop", model, STOP_MAX_TOKENS);
    let mut stream = engine
        .generate(request, gctx.clone())
        .await
        .map_err(ConformanceFailure::GenerateFailed)?;

    // What the adapter does on a client stop: flag the context, then abort the engine.
    // The abort runs alongside the stream, as the adapter's spawned abort would: an
    // engine may need its stream polled for the abort to complete.
    gctx.context().stop();
    let stopped_at = runtime.now();
    let mut deadline = runtime.sleep_until(stopped_at + CANCEL_WITHIN);
    let mut abort = Some(engine.abort(gctx));
    let mut cancelled = false;

    poll_fn(|cx| {
        if let Some(fut) = abort.as_mut() {
            if fut.as_mut().poll(cx).is_ready() {
                abort = None;
            }
        }
        let mut taken = 0;
        while !cancelled {
            if taken == ITEMS_PER_POLL {
                // Let the deadline below be checked against an always-ready stream.
                cx.waker().wake_by_ref();
                break;
            }
            taken += 1;
            match stream.as_mut().poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(ConformanceFailure::NoTerminalChunk));
                }
                Poll::Ready(Some(Err(error))) => {
                    return Poll::Ready(Err(ConformanceFailure::StreamYieldedError(error)));
                }
                Poll::Ready(Some(Ok(chunk))) => match chunk.finish_reason {
                    None => {}
                    Some(FinishReason::Cancelled) => cancelled = true,
                    Some(reason) => {
                        return Poll::Ready(Err(ConformanceFailure::CancellationIgnored {
                            reason,
                        }));
                    }
                },
            }
        }
        if cancelled {
            // Only the abort is left; it gets the rest of the check's time.
            return if abort.is_none() {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        if AsyncTimer::poll(deadline.as_mut(), cx).is_ready() {
            let after = runtime.now().saturating_duration_since(stopped_at);
            return Poll::Ready(Err(ConformanceFailure::CancellationNotObserved { after }));
        }
        Poll::Pending
    })
    .await
}

/// A request (with its fresh context) for the engine, named `id`.
fn request(id: &str, model: String, max_tokens: u32) -> (Request, GenerateContext) {
    let request = Request::new(id, model, PROMPT.to_vec()).with_max_tokens(max_tokens);
    let gctx = GenerateContext::new(Context::new(id), id);
    (request, gctx)
}

/// Race `check_future` against [`CHECK_TIMEOUT`] on the runtime's timer.
async fn guarded<T>(
    runtime: &dyn Runtime,
    check: &'static str,
    check_future: impl Future<Output = Result<T, ConformanceFailure>>,
) -> Result<T, ConformanceFailure> {
    let started = runtime.now();
    let mut timer = runtime.sleep_until(started + CHECK_TIMEOUT);
    let mut check_future = pin!(check_future);
    poll_fn(|cx| {
        if let Poll::Ready(outcome) = check_future.as_mut().poll(cx) {
            return Poll::Ready(outcome);
        }
        if AsyncTimer::poll(timer.as_mut(), cx).is_ready() {
            let after = runtime.now().saturating_duration_since(started);
            return Poll::Ready(Err(ConformanceFailure::Hung { check, after }));
        }
        Poll::Pending
    })
    .await
}

fn next(stream: &mut ChunkStream) -> impl Future<Output = Option<Result<Chunk, EngineError>>> + '_ {
    poll_fn(move |cx: &mut TaskContext<'_>| stream.as_mut().poll_next(cx))
}

/// Return `Pending` once (waking at once), so that an enclosing deadline gets polled.
async fn yield_now() {
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

/// What one stream has yielded so far.
#[derive(Debug, Default)]
struct Tally {
    items: usize,
    terminal: bool,
}

/// A bad item, before it is named for the check that saw it.
#[derive(Debug)]
enum ItemFlaw {
    AfterTerminal(usize),
    Error(EngineError),
}

impl Tally {
    fn observe(&mut self, item: Result<Chunk, EngineError>) -> Result<(), ItemFlaw> {
        let index = self.items;
        self.items += 1;
        // Anything after the terminal is the worse fault: even an error item there
        // means the engine did not end its stream where it said it would.
        if self.terminal {
            return Err(ItemFlaw::AfterTerminal(index));
        }
        let chunk = item.map_err(ItemFlaw::Error)?;
        self.terminal = chunk.is_terminal();
        Ok(())
    }

    fn finish(&self, empty: ConformanceFailure) -> Result<(), ConformanceFailure> {
        if self.items == 0 {
            Err(empty)
        } else if !self.terminal {
            Err(ConformanceFailure::NoTerminalChunk)
        } else {
            Ok(())
        }
    }
}
