//! [`ConformanceFailure`]: the first rule an engine broke, each message ending with what
//! the engine author changes to fix it. Owns the wording; it must not run anything.

use std::time::Duration;

use super::ConfigError;
use crate::error::EngineError;
use crate::protocol::FinishReason;

/// The first rule an engine broke (or, for [`InvalidConfig`](Self::InvalidConfig), why
/// the kit did not run). Each message names the fault, then, after a `;`, the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConformanceFailure {
    /// The [`ConformanceConfig`](super::ConformanceConfig) is unusable; no engine was
    /// made. Not an engine fault.
    #[error("invalid conformance config: {0}")]
    InvalidConfig(#[from] ConfigError),
    /// `start` returned an error.
    #[error(
        "start failed: {0}; `start` must load the model and return `Ok(EngineConfig)` \
         (run the kit where the engine's device and model files are)"
    )]
    StartFailed(EngineError),
    /// `start` succeeded but reported an empty model name.
    #[error(
        "start reported an empty model name; set `EngineConfig::model` to the name the \
         engine serves (requests carry it)"
    )]
    EmptyModelInConfig,
    /// `generate` returned a setup error for the single or the stopped request.
    #[error(
        "generate failed: {0}; `generate` must accept a well-formed request for the \
         started model, with or without `max_tokens` (use the engine's own limit when it \
         is unset)"
    )]
    GenerateFailed(EngineError),
    /// The single request's stream ended without yielding anything.
    #[error(
        "stream ended without yielding any chunk; yield the tokens, then end the stream \
         with one chunk whose `finish_reason` is set"
    )]
    NoChunksYielded,
    /// A stream yielded an item after its terminal chunk; `index` is that item's
    /// 0-based position in the stream.
    #[error(
        "stream yielded item {index} after its terminal chunk; return `None` once the \
         chunk whose `finish_reason` is set is out"
    )]
    ChunkAfterTerminal {
        /// The 0-based position of the offending item.
        index: usize,
    },
    /// A stream (single, interleaved or stopped) ended without a terminal chunk.
    #[error(
        "engine ended without a terminal chunk; end every stream with one chunk whose \
         `finish_reason` is set"
    )]
    NoTerminalChunk,
    /// The single or the stopped request's stream yielded an error item.
    #[error(
        "stream yielded an error: {0}; end a request the engine can serve with a terminal \
         chunk, not an error item (a stopped one with `FinishReason::Cancelled`)"
    )]
    StreamYieldedError(EngineError),
    /// One of the interleaved requests failed, at `generate` or with an error item.
    #[error(
        "interleaved request {request} failed: {error}; serve requests that arrive while \
         others are in flight or setting up (queue them while the engine is full), do not \
         fail them"
    )]
    ConcurrentGenerateFailed {
        /// The 0-based number of the failed request.
        request: usize,
        /// What the engine reported.
        error: EngineError,
    },
    /// One of the interleaved requests ended without yielding anything.
    #[error(
        "interleaved request {request} ended without yielding any chunk; a request that \
         arrives while others run must still stream its tokens and its terminal chunk"
    )]
    ConcurrentNoChunks {
        /// The 0-based number of the empty request.
        request: usize,
    },
    /// A stopped request had not ended `after` the stop (the runtime's clock).
    #[error(
        "stopped request did not end within {after:?} of the stop; watch \
         `Context::is_stopped` (or `Context::stopped`) or handle `abort`, and then end the \
         stream with `FinishReason::Cancelled` and wake its task (if a decode step is \
         really this slow, raise `cancel_within`)"
    )]
    CancellationNotObserved {
        /// How long the kit waited.
        after: Duration,
    },
    /// A stopped request (with a `max_tokens` only a stop can reach) ended with
    /// `reason`, not `Cancelled`.
    #[error(
        "stopped request finished with `{reason}` instead of `cancelled`; after the \
         context is stopped (or `abort` is called), end the stream with \
         `FinishReason::Cancelled`"
    )]
    CancellationIgnored {
        /// The finish reason the engine reported.
        reason: FinishReason,
    },
    /// The check named `check` did not finish within its timeout (`start_timeout` for
    /// the start, `check_timeout` for any other).
    #[error(
        "check `{check}` hung for {after:?}; every engine future and stream must finish or \
         wake its task (if the engine is only slow, raise `start_timeout` or \
         `check_timeout`)"
    )]
    Hung {
        /// The name of the check (one of [`CHECKS`](super::CHECKS)).
        check: &'static str,
        /// How long the kit waited.
        after: Duration,
    },
    /// `cleanup` after a started engine failed.
    #[error("cleanup failed: {0}; `cleanup` must release the engine and return `Ok`")]
    CleanupFailed(EngineError),
    /// A second `cleanup` in a row failed (cleanup must be idempotent).
    #[error(
        "second cleanup failed: {0}; make `cleanup` idempotent, a call after a \
         successful one returns `Ok`"
    )]
    SecondCleanupFailed(EngineError),
    /// `cleanup` on an engine that was never started failed.
    #[error(
        "cleanup on a never-started engine failed: {0}; `cleanup` must return `Ok` even \
         when `start` never ran (a server cleans up after a failed start too)"
    )]
    CleanupWithoutStartFailed(EngineError),
}
