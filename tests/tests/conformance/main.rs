//! The conformance kit against a correct in-file engine (passes on tokio and smol) and
//! against one deliberately broken engine per rule (each reports its exact failure).
//!
//! tokio tests run on a paused clock, so the kit's 2 s and 30 s limits cost no real
//! time; smol has real time only, so smol runs just the flaws that fail fast.

mod engine;
mod flaws;
mod stepping;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::{flaw_error, Flaw, TestEngine};
use tether_core::conformance::{run_conformance_on, ConformanceFailure, ConformanceReport, CHECKS};
use tether_core::{FinishReason, LlmEngine};

const MODEL: &str = "conformance-test-model";
/// The in-file engine "hits EOS" after this many tokens unless `max_tokens` is lower.
const NATURAL_LEN: u32 = 5;

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
