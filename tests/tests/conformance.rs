//! The conformance kit against a correct in-file engine (passes on tokio and smol) and
//! against one deliberately broken engine per rule (each reports its exact failure).
//!
//! tokio tests run on a paused clock, so the kit's 2 s and 30 s limits cost no real
//! time; smol has real time only, so smol runs just the flaws that fail fast.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures_core::Stream;
use tether_core::conformance::{
    run_conformance_on, ConformanceFailure, ConformanceReport, CANCEL_WITHIN, CHECKS, CHECK_TIMEOUT,
};
use tether_core::drive::{AsyncTimer, SpawnFuture};
use tether_core::engine::BoxFuture;
use tether_core::{
    Chunk, ChunkStream, EngineConfig, EngineError, ErrorKind, FinishReason, GenerateContext,
    LlmEngine, Request, Runtime,
};

const MODEL: &str = "conformance-test-model";
/// The in-file engine "hits EOS" after this many tokens unless `max_tokens` is lower.
const NATURAL_LEN: u32 = 5;

/// One way to break the engine contract (or, for `None` and the `Honours*` ones, not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flaw {
    None,
    /// Streams ignore `Context::stop` and only react to `abort` (still conformant).
    HonoursAbortOnly,
    /// `abort` is a no-op; streams react to `Context::stop` (still conformant).
    HonoursStopOnly,
    StartFails,
    EmptyModel,
    StartHangs,
    GenerateFails,
    GenerateHangs,
    EmptyStream,
    ChunkAfterTerminal,
    NoTerminal,
    ErrorItem,
    /// `generate` refuses while another stream is alive.
    OneAtATime,
    /// Streams created while another is alive end at once, empty.
    EmptyUnderLoad,
    /// Streams created while another is alive yield an error item.
    ErrorUnderLoad,
    IgnoresStop,
    StallsOnStop,
    EndsSilentlyOnStop,
    ErrorOnStop,
    AbortHangs,
    CleanupFails,
    SecondCleanupFails,
    CleanupNeedsStart,
    /// Streams are always ready and never end, ignoring `max_tokens` and stop.
    Endless,
}

fn flaw_error() -> EngineError {
    EngineError::new(ErrorKind::Unavailable, "deliberately broken")
}

#[derive(Debug)]
struct TestEngine {
    flaw: Flaw,
    started: AtomicBool,
    cleanups: AtomicUsize,
    /// Streams alive right now (each holds a [`LiveGuard`]).
    live: Arc<AtomicUsize>,
    /// Ids of aborted requests.
    aborted: Arc<Mutex<HashSet<String>>>,
}

impl TestEngine {
    fn new(flaw: Flaw) -> TestEngine {
        TestEngine {
            flaw,
            started: AtomicBool::new(false),
            cleanups: AtomicUsize::new(0),
            live: Arc::default(),
            aborted: Arc::default(),
        }
    }
}

impl LlmEngine for TestEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            match self.flaw {
                Flaw::StartFails => return Err(flaw_error()),
                Flaw::StartHangs => std::future::pending::<()>().await,
                _ => {}
            }
            self.started.store(true, Ordering::SeqCst);
            let model = if self.flaw == Flaw::EmptyModel {
                String::new()
            } else {
                MODEL.to_owned()
            };
            Ok(EngineConfig::new(model, worker_id).with_max_concurrency(None))
        })
    }

    fn generate(
        &self,
        request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async move {
            if !self.started.load(Ordering::SeqCst) {
                return Err(EngineError::invalid_argument("engine not started"));
            }
            assert_eq!(request.model, MODEL);
            match self.flaw {
                Flaw::GenerateFails => return Err(flaw_error()),
                Flaw::GenerateHangs => std::future::pending::<()>().await,
                _ => {}
            }
            let under_load = self.live.fetch_add(1, Ordering::SeqCst) > 0;
            let guard = LiveGuard(Arc::clone(&self.live));
            if under_load && self.flaw == Flaw::OneAtATime {
                return Err(flaw_error());
            }
            let max = request.stop.max_tokens.unwrap_or(u32::MAX);
            let stream: ChunkStream = Box::pin(TokenStream {
                flaw: self.flaw,
                context,
                aborted: Arc::clone(&self.aborted),
                under_load,
                len: max.min(NATURAL_LEN),
                reason: if max <= NATURAL_LEN {
                    FinishReason::Length
                } else {
                    FinishReason::Eos
                },
                emitted: 0,
                yielded: false,
                done: false,
                extra_sent: false,
                _live: guard,
            });
            Ok(stream)
        })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match self.flaw {
                Flaw::AbortHangs => std::future::pending::<()>().await,
                Flaw::HonoursStopOnly => return,
                _ => {}
            }
            let mut aborted = self.aborted.lock().unwrap();
            aborted.insert(context.request_id().to_owned());
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let earlier = self.cleanups.fetch_add(1, Ordering::SeqCst);
            let fails = match self.flaw {
                Flaw::CleanupFails => true,
                Flaw::SecondCleanupFails => earlier > 0,
                Flaw::CleanupNeedsStart => !self.started.load(Ordering::SeqCst),
                _ => false,
            };
            if fails {
                Err(flaw_error())
            } else {
                Ok(())
            }
        })
    }
}

#[derive(Debug)]
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Emits `len` tokens, yielding to the executor between items (so interleaving is
/// real), then a terminal with `reason`; on stop or abort, a `Cancelled` terminal.
#[derive(Debug)]
struct TokenStream {
    flaw: Flaw,
    context: GenerateContext,
    aborted: Arc<Mutex<HashSet<String>>>,
    under_load: bool,
    len: u32,
    reason: FinishReason,
    emitted: u32,
    yielded: bool,
    done: bool,
    extra_sent: bool,
    _live: LiveGuard,
}

type Item = Option<Result<Chunk, EngineError>>;

impl TokenStream {
    fn cancelled(&self) -> bool {
        let stopped = self.context.is_stopped() && self.flaw != Flaw::HonoursAbortOnly;
        let aborted = self
            .aborted
            .lock()
            .unwrap()
            .contains(self.context.request_id());
        (stopped || aborted) && self.flaw != Flaw::IgnoresStop
    }

    fn end(&mut self, item: Item) -> Poll<Item> {
        self.done = true;
        Poll::Ready(item)
    }
}

impl Stream for TokenStream {
    type Item = Result<Chunk, EngineError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Item> {
        let this = self.get_mut();
        if this.done {
            if this.flaw == Flaw::ChunkAfterTerminal && !this.extra_sent {
                this.extra_sent = true;
                return Poll::Ready(Some(Ok(Chunk::tokens(vec![7]))));
            }
            return Poll::Ready(None);
        }
        if this.flaw == Flaw::Endless {
            this.emitted = this.emitted.wrapping_add(1);
            return Poll::Ready(Some(Ok(Chunk::tokens(vec![this.emitted]))));
        }
        if !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yielded = false;
        if this.cancelled() {
            return match this.flaw {
                // Never wakes again: the kit's 2 s deadline has to catch it.
                Flaw::StallsOnStop => Poll::Pending,
                Flaw::EndsSilentlyOnStop => this.end(None),
                Flaw::ErrorOnStop => this.end(Some(Err(EngineError::cancelled("stopped")))),
                _ => this.end(Some(Ok(Chunk::terminal(FinishReason::Cancelled)))),
            };
        }
        match this.flaw {
            Flaw::EmptyStream => return this.end(None),
            Flaw::EmptyUnderLoad if this.under_load => return this.end(None),
            Flaw::ErrorUnderLoad if this.under_load => return this.end(Some(Err(flaw_error()))),
            Flaw::ErrorItem if this.emitted == 1 => return this.end(Some(Err(flaw_error()))),
            _ => {}
        }
        if this.emitted == this.len {
            if this.flaw == Flaw::NoTerminal {
                return this.end(None);
            }
            let terminal = Chunk::terminal(this.reason.clone());
            return this.end(Some(Ok(terminal)));
        }
        this.emitted += 1;
        Poll::Ready(Some(Ok(Chunk::tokens(vec![100 + this.emitted]))))
    }
}

fn factory(flaw: Flaw) -> impl Fn() -> Arc<dyn LlmEngine> + Send + Sync {
    move || -> Arc<dyn LlmEngine> { Arc::new(TestEngine::new(flaw)) }
}

async fn on_tokio(flaw: Flaw) -> Result<ConformanceReport, ConformanceFailure> {
    tether_tokio::run_conformance(factory(flaw)).await
}

fn on_smol(flaw: Flaw) -> Result<ConformanceReport, ConformanceFailure> {
    smol::block_on(tether_smol::run_conformance(factory(flaw)))
}

fn passed() -> ConformanceReport {
    ConformanceReport {
        checks: CHECKS.to_vec(),
        model: MODEL.to_owned(),
    }
}

// ---- a correct engine passes -------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn correct_engine_passes_every_check_on_tokio() {
    assert_eq!(on_tokio(Flaw::None).await, Ok(passed()));
}

#[test]
fn correct_engine_passes_every_check_on_smol() {
    assert_eq!(on_smol(Flaw::None), Ok(passed()));
}

#[tokio::test(start_paused = true)]
async fn engine_that_honours_only_abort_passes() {
    assert_eq!(on_tokio(Flaw::HonoursAbortOnly).await, Ok(passed()));
}

#[tokio::test(start_paused = true)]
async fn engine_that_honours_only_context_stop_passes() {
    assert_eq!(on_tokio(Flaw::HonoursStopOnly).await, Ok(passed()));
}

#[tokio::test(start_paused = true)]
async fn every_check_gets_a_fresh_engine() {
    let made = AtomicUsize::new(0);
    let make = || -> Arc<dyn LlmEngine> {
        made.fetch_add(1, Ordering::SeqCst);
        Arc::new(TestEngine::new(Flaw::None))
    };
    let runtime = tether_tokio::TokioRuntime::current();
    let report = run_conformance_on(&runtime, &make).await;
    assert_eq!(report, Ok(passed()));
    assert_eq!(made.load(Ordering::SeqCst), CHECKS.len());
}

#[tokio::test(start_paused = true)]
async fn passing_run_takes_no_clock_time() {
    let before = tokio::time::Instant::now();
    assert_eq!(on_tokio(Flaw::None).await, Ok(passed()));
    assert_eq!(before.elapsed(), Duration::ZERO);
}

#[test]
fn conformance_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let future = tether_smol::run_conformance(factory(Flaw::None));
    assert_send(&future);
}

// ---- one broken engine per failure, on tokio (paused clock) -----------------------

#[tokio::test(start_paused = true)]
async fn failing_start_is_start_failed() {
    let expected = ConformanceFailure::StartFailed(flaw_error());
    assert_eq!(on_tokio(Flaw::StartFails).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn empty_model_is_empty_model_in_config() {
    let expected = ConformanceFailure::EmptyModelInConfig;
    assert_eq!(on_tokio(Flaw::EmptyModel).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn hanging_start_is_hung_after_the_check_timeout() {
    let before = tokio::time::Instant::now();
    let expected = ConformanceFailure::Hung {
        check: "start_reports_model",
        after: CHECK_TIMEOUT,
    };
    assert_eq!(on_tokio(Flaw::StartHangs).await, Err(expected));
    assert_eq!(before.elapsed(), CHECK_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn failing_generate_is_generate_failed() {
    let expected = ConformanceFailure::GenerateFailed(flaw_error());
    assert_eq!(on_tokio(Flaw::GenerateFails).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn hanging_generate_is_hung_in_single_generate() {
    let expected = ConformanceFailure::Hung {
        check: "single_generate",
        after: CHECK_TIMEOUT,
    };
    assert_eq!(on_tokio(Flaw::GenerateHangs).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn empty_stream_is_no_chunks_yielded() {
    let expected = ConformanceFailure::NoChunksYielded;
    assert_eq!(on_tokio(Flaw::EmptyStream).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn item_after_terminal_is_chunk_after_terminal_with_its_index() {
    // NATURAL_LEN tokens (items 0..=4), the terminal (item 5), then the stray item 6.
    let expected = ConformanceFailure::ChunkAfterTerminal { index: 6 };
    assert_eq!(on_tokio(Flaw::ChunkAfterTerminal).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn stream_without_terminal_is_no_terminal_chunk() {
    let expected = ConformanceFailure::NoTerminalChunk;
    assert_eq!(on_tokio(Flaw::NoTerminal).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn error_item_is_stream_yielded_error() {
    let expected = ConformanceFailure::StreamYieldedError(flaw_error());
    assert_eq!(on_tokio(Flaw::ErrorItem).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn refusing_a_second_request_is_concurrent_generate_failed() {
    let expected = ConformanceFailure::ConcurrentGenerateFailed {
        request: 1,
        error: flaw_error(),
    };
    assert_eq!(on_tokio(Flaw::OneAtATime).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn error_item_under_load_is_concurrent_generate_failed() {
    let expected = ConformanceFailure::ConcurrentGenerateFailed {
        request: 1,
        error: flaw_error(),
    };
    assert_eq!(on_tokio(Flaw::ErrorUnderLoad).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn empty_stream_under_load_is_concurrent_no_chunks() {
    let expected = ConformanceFailure::ConcurrentNoChunks { request: 1 };
    assert_eq!(on_tokio(Flaw::EmptyUnderLoad).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn finishing_despite_stop_is_cancellation_ignored() {
    let expected = ConformanceFailure::CancellationIgnored {
        reason: FinishReason::Eos,
    };
    assert_eq!(on_tokio(Flaw::IgnoresStop).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn stalling_after_stop_is_cancellation_not_observed_after_two_seconds() {
    let before = tokio::time::Instant::now();
    let expected = ConformanceFailure::CancellationNotObserved {
        after: CANCEL_WITHIN,
    };
    assert_eq!(on_tokio(Flaw::StallsOnStop).await, Err(expected));
    assert_eq!(before.elapsed(), CANCEL_WITHIN);
}

#[tokio::test(start_paused = true)]
async fn ending_silently_after_stop_is_no_terminal_chunk() {
    let expected = ConformanceFailure::NoTerminalChunk;
    assert_eq!(on_tokio(Flaw::EndsSilentlyOnStop).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn error_instead_of_cancelled_terminal_is_stream_yielded_error() {
    let expected = ConformanceFailure::StreamYieldedError(EngineError::cancelled("stopped"));
    assert_eq!(on_tokio(Flaw::ErrorOnStop).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn hanging_abort_is_hung_in_the_stop_check() {
    let expected = ConformanceFailure::Hung {
        check: "stop_yields_cancelled",
        after: CHECK_TIMEOUT,
    };
    assert_eq!(on_tokio(Flaw::AbortHangs).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn failing_cleanup_is_cleanup_failed() {
    let expected = ConformanceFailure::CleanupFailed(flaw_error());
    assert_eq!(on_tokio(Flaw::CleanupFails).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn failing_second_cleanup_is_second_cleanup_failed() {
    let expected = ConformanceFailure::SecondCleanupFailed(flaw_error());
    assert_eq!(on_tokio(Flaw::SecondCleanupFails).await, Err(expected));
}

#[tokio::test(start_paused = true)]
async fn failing_cleanup_without_start_is_cleanup_without_start_failed() {
    let expected = ConformanceFailure::CleanupWithoutStartFailed(flaw_error());
    assert_eq!(on_tokio(Flaw::CleanupNeedsStart).await, Err(expected));
}

// ---- fast-failing flaws on smol (real time) ---------------------------------------

#[test]
fn smol_reports_start_failed() {
    let expected = ConformanceFailure::StartFailed(flaw_error());
    assert_eq!(on_smol(Flaw::StartFails), Err(expected));
}

#[test]
fn smol_reports_chunk_after_terminal() {
    let expected = ConformanceFailure::ChunkAfterTerminal { index: 6 };
    assert_eq!(on_smol(Flaw::ChunkAfterTerminal), Err(expected));
}

#[test]
fn smol_reports_concurrent_no_chunks() {
    let expected = ConformanceFailure::ConcurrentNoChunks { request: 1 };
    assert_eq!(on_smol(Flaw::EmptyUnderLoad), Err(expected));
}

#[test]
fn smol_reports_cancellation_ignored() {
    let expected = ConformanceFailure::CancellationIgnored {
        reason: FinishReason::Eos,
    };
    assert_eq!(on_smol(Flaw::IgnoresStop), Err(expected));
}

#[test]
fn smol_reports_cleanup_without_start_failed() {
    let expected = ConformanceFailure::CleanupWithoutStartFailed(flaw_error());
    assert_eq!(on_smol(Flaw::CleanupNeedsStart), Err(expected));
}

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

// ---- messages ----------------------------------------------------------------------

#[test]
fn failure_messages_are_lowercase_and_name_the_fault() {
    let error = flaw_error();
    let cases = [
        (
            ConformanceFailure::StartFailed(error.clone()),
            format!("start failed: {error}"),
        ),
        (
            ConformanceFailure::EmptyModelInConfig,
            "start reported an empty model name".to_owned(),
        ),
        (
            ConformanceFailure::GenerateFailed(error.clone()),
            format!("generate failed: {error}"),
        ),
        (
            ConformanceFailure::NoChunksYielded,
            "stream ended without yielding any chunk".to_owned(),
        ),
        (
            ConformanceFailure::ChunkAfterTerminal { index: 6 },
            "stream yielded item 6 after its terminal chunk".to_owned(),
        ),
        (
            ConformanceFailure::NoTerminalChunk,
            "engine ended without a terminal chunk".to_owned(),
        ),
        (
            ConformanceFailure::StreamYieldedError(error.clone()),
            format!("stream yielded an error: {error}"),
        ),
        (
            ConformanceFailure::ConcurrentGenerateFailed {
                request: 3,
                error: error.clone(),
            },
            format!("interleaved request 3 failed: {error}"),
        ),
        (
            ConformanceFailure::ConcurrentNoChunks { request: 3 },
            "interleaved request 3 ended without yielding any chunk".to_owned(),
        ),
        (
            ConformanceFailure::CancellationNotObserved {
                after: Duration::from_secs(2),
            },
            "stopped request did not end within 2s of the stop".to_owned(),
        ),
        (
            ConformanceFailure::CancellationIgnored {
                reason: FinishReason::Length,
            },
            "stopped request finished with `length` instead of `cancelled`".to_owned(),
        ),
        (
            ConformanceFailure::Hung {
                check: "cleanup_twice",
                after: Duration::from_secs(30),
            },
            "check `cleanup_twice` hung for 30s".to_owned(),
        ),
        (
            ConformanceFailure::CleanupFailed(error.clone()),
            format!("cleanup failed: {error}"),
        ),
        (
            ConformanceFailure::SecondCleanupFailed(error.clone()),
            format!("second cleanup failed: {error}"),
        ),
        (
            ConformanceFailure::CleanupWithoutStartFailed(error.clone()),
            format!("cleanup on a never-started engine failed: {error}"),
        ),
    ];
    for (failure, message) in cases {
        assert_eq!(failure.to_string(), message);
        let first = message.chars().next().unwrap();
        assert!(first.is_lowercase(), "{message}");
    }
}
