//! One deliberately broken engine per failure: each on tokio (paused clock), and the
//! fast-failing ones again on smol (real time).

use std::sync::Arc;
use std::time::Duration;

use tether_core::conformance::{ConformanceFailure, CANCEL_WITHIN, CHECK_TIMEOUT, START_TIMEOUT};
use tether_core::{Context, EngineError, FinishReason, GenerateContext, LlmEngine, Request};

use crate::engine::{flaw_error, Flaw, TestEngine};
use crate::{on_smol, on_tokio, MODEL};

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
async fn hanging_start_is_hung_after_the_start_timeout() {
    let before = tokio::time::Instant::now();
    let expected = ConformanceFailure::Hung {
        check: "start_reports_model",
        after: START_TIMEOUT,
    };
    assert_eq!(on_tokio(Flaw::StartHangs).await, Err(expected));
    assert_eq!(before.elapsed(), START_TIMEOUT);
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

/// The single request leaves `max_tokens` unset: an engine with no limit of its own
/// fails there.
#[tokio::test(start_paused = true)]
async fn requiring_max_tokens_is_generate_failed() {
    let expected =
        ConformanceFailure::GenerateFailed(EngineError::invalid_argument("max_tokens is required"));
    assert_eq!(on_tokio(Flaw::RequiresMaxTokens).await, Err(expected));
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

/// The interleaved setups really overlap: request 0's setup still holds its lock when
/// request 1's is polled, which never wakes again. A kit that awaited each `generate`
/// before calling the next would pass this engine (see the test below).
#[tokio::test(start_paused = true)]
async fn setup_that_deadlocks_when_setups_overlap_is_hung_in_interleaving() {
    let before = tokio::time::Instant::now();
    let expected = ConformanceFailure::Hung {
        check: "interleaved_generates",
        after: CHECK_TIMEOUT,
    };
    assert_eq!(on_tokio(Flaw::OverlappingSetupHangs).await, Err(expected));
    assert_eq!(before.elapsed(), CHECK_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn setup_that_fails_when_setups_overlap_is_concurrent_generate_failed() {
    let expected = ConformanceFailure::ConcurrentGenerateFailed {
        request: 1,
        error: flaw_error(),
    };
    assert_eq!(on_tokio(Flaw::OverlappingSetupFails).await, Err(expected));
}

/// The two flaws above are invisible to setups awaited one after the other (what the
/// kit did before it issued them concurrently): each of 8 sequential setups succeeds
/// while every earlier stream is still alive, and each stream ends with a terminal.
#[tokio::test(start_paused = true)]
async fn overlapping_setup_flaws_pass_setups_awaited_one_at_a_time() {
    for flaw in [Flaw::OverlappingSetupHangs, Flaw::OverlappingSetupFails] {
        let engine: Arc<dyn LlmEngine> = Arc::new(TestEngine::new(flaw));
        engine.start(0).await.unwrap();
        let mut streams = Vec::new();
        for n in 0..8 {
            let id = format!("sequential-{n}");
            let request = Request::new(&id, MODEL, vec![1, 2, 3]).with_max_tokens(16);
            let gctx = GenerateContext::new(Context::new(id.as_str()), id.as_str());
            let setup = engine.generate(request, gctx);
            let stream = tokio::time::timeout(Duration::from_secs(1), setup).await;
            streams.push(stream.expect("no hang").expect("no failure"));
        }
        for stream in streams {
            let items: Vec<_> = futures::StreamExt::collect(stream).await;
            let last = items.last().cloned().unwrap().unwrap();
            assert_eq!(last.finish_reason, Some(FinishReason::Eos), "{flaw:?}");
        }
    }
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
fn smol_reports_a_setup_that_fails_when_setups_overlap() {
    let expected = ConformanceFailure::ConcurrentGenerateFailed {
        request: 1,
        error: flaw_error(),
    };
    assert_eq!(on_smol(Flaw::OverlappingSetupFails), Err(expected));
}

#[test]
fn smol_reports_cleanup_without_start_failed() {
    let expected = ConformanceFailure::CleanupWithoutStartFailed(flaw_error());
    assert_eq!(on_smol(Flaw::CleanupNeedsStart), Err(expected));
}
