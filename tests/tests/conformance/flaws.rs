//! One deliberately broken engine per failure: each on tokio (paused clock), and the
//! fast-failing ones again on smol (real time).

use tether_core::conformance::{ConformanceFailure, CANCEL_WITHIN, CHECK_TIMEOUT};
use tether_core::{EngineError, FinishReason};

use crate::engine::{flaw_error, Flaw};
use crate::{on_smol, on_tokio};

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
