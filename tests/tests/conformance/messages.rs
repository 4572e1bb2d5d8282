//! Every failure message, exactly: the fault, then after a `;` what the engine author
//! changes to fix it.

use std::time::Duration;

use tether_core::conformance::{ConfigError, ConformanceFailure};
use tether_core::FinishReason;

use crate::engine::flaw_error;

#[test]
fn failure_messages_name_the_fault_and_the_fix() {
    let error = flaw_error();
    let cases = [
        (
            ConformanceFailure::InvalidConfig(ConfigError::NoInterleavedRequests),
            "invalid conformance config: `interleaved_requests` is zero; run at least one \
             request (the default is 8)"
                .to_owned(),
        ),
        (
            ConformanceFailure::StartFailed(error.clone()),
            format!(
                "start failed: {error}; `start` must load the model and return \
                 `Ok(EngineConfig)` (run the kit where the engine's device and model files are)"
            ),
        ),
        (
            ConformanceFailure::EmptyModelInConfig,
            "start reported an empty model name; set `EngineConfig::model` to the name the \
             engine serves (requests carry it)"
                .to_owned(),
        ),
        (
            ConformanceFailure::GenerateFailed(error.clone()),
            format!(
                "generate failed: {error}; `generate` must accept a well-formed request for \
                 the started model, with or without `max_tokens` (use the engine's own limit \
                 when it is unset)"
            ),
        ),
        (
            ConformanceFailure::NoChunksYielded,
            "stream ended without yielding any chunk; yield the tokens, then end the stream \
             with one chunk whose `finish_reason` is set"
                .to_owned(),
        ),
        (
            ConformanceFailure::ChunkAfterTerminal { index: 6 },
            "stream yielded item 6 after its terminal chunk; return `None` once the chunk \
             whose `finish_reason` is set is out"
                .to_owned(),
        ),
        (
            ConformanceFailure::NoTerminalChunk,
            "engine ended without a terminal chunk; end every stream with one chunk whose \
             `finish_reason` is set"
                .to_owned(),
        ),
        (
            ConformanceFailure::StreamYieldedError(error.clone()),
            format!(
                "stream yielded an error: {error}; end a request the engine can serve with a \
                 terminal chunk, not an error item (a stopped one with \
                 `FinishReason::Cancelled`)"
            ),
        ),
        (
            ConformanceFailure::ConcurrentGenerateFailed {
                request: 3,
                error: error.clone(),
            },
            format!(
                "interleaved request 3 failed: {error}; serve requests that arrive while \
                 others are in flight or setting up (queue them while the engine is full), do \
                 not fail them"
            ),
        ),
        (
            ConformanceFailure::ConcurrentNoChunks { request: 3 },
            "interleaved request 3 ended without yielding any chunk; a request that arrives \
             while others run must still stream its tokens and its terminal chunk"
                .to_owned(),
        ),
        (
            ConformanceFailure::CancellationNotObserved {
                after: Duration::from_secs(2),
            },
            "stopped request did not end within 2s of the stop; watch `Context::is_stopped` \
             (or `Context::stopped`) or handle `abort`, and then end the stream with \
             `FinishReason::Cancelled` and wake its task (if a decode step is really this \
             slow, raise `cancel_within`)"
                .to_owned(),
        ),
        (
            ConformanceFailure::CancellationIgnored {
                reason: FinishReason::Length,
            },
            "stopped request finished with `length` instead of `cancelled`; after the context \
             is stopped (or `abort` is called), end the stream with `FinishReason::Cancelled`"
                .to_owned(),
        ),
        (
            ConformanceFailure::Hung {
                check: "cleanup_twice",
                after: Duration::from_secs(30),
            },
            "check `cleanup_twice` hung for 30s; every engine future and stream must finish \
             or wake its task (if the engine is only slow, raise `start_timeout` or \
             `check_timeout`)"
                .to_owned(),
        ),
        (
            ConformanceFailure::CleanupFailed(error.clone()),
            format!("cleanup failed: {error}; `cleanup` must release the engine and return `Ok`"),
        ),
        (
            ConformanceFailure::SecondCleanupFailed(error.clone()),
            format!(
                "second cleanup failed: {error}; make `cleanup` idempotent, a call after a \
                 successful one returns `Ok`"
            ),
        ),
        (
            ConformanceFailure::CleanupWithoutStartFailed(error.clone()),
            format!(
                "cleanup on a never-started engine failed: {error}; `cleanup` must return \
                 `Ok` even when `start` never ran (a server cleans up after a failed start too)"
            ),
        ),
    ];
    for (failure, message) in cases {
        assert_eq!(failure.to_string(), message);
        let first = message.chars().next().unwrap();
        assert!(first.is_lowercase(), "{message}");
        assert!(!message.ends_with('.'), "{message}");
    }
}

#[test]
fn config_error_messages_name_the_field_and_the_fix() {
    let cases = [
        (
            ConfigError::ZeroDuration {
                field: "check_timeout",
            },
            "`check_timeout` is zero; give it a positive duration",
        ),
        (
            ConfigError::DurationTooLong {
                field: "start_timeout",
                limit: Duration::from_secs(u64::MAX),
            },
            "`start_timeout` of 18446744073709551615s is past the end of the clock; give it a \
             shorter duration",
        ),
        (
            ConfigError::ZeroStopMaxTokens,
            "`stop_max_tokens` is zero; give it a limit only a stop can end (the default is \
             10000)",
        ),
        (
            ConfigError::NoInterleavedRequests,
            "`interleaved_requests` is zero; run at least one request (the default is 8)",
        ),
        (
            ConfigError::CancelNotWithinCheck {
                cancel_within: Duration::from_secs(30),
                check_timeout: Duration::from_secs(30),
            },
            "`cancel_within` (30s) is not shorter than `check_timeout` (30s); shorten it or \
             raise `check_timeout`",
        ),
    ];
    for (error, message) in cases {
        assert_eq!(error.to_string(), message);
    }
}
