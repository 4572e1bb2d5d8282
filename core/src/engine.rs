//! The engine side of the contract: the object-safe [`LlmEngine`] trait, its
//! [`EngineConfig`], the [`GenerateContext`] handed to each `generate`, and the
//! [`ChunkStream`] an engine returns.
//!
//! This module knows nothing of how a stream is driven and does not import the driver:
//! the first-token hint reaches whatever implements the private `FirstTokenSink` (the
//! driver's per-request state), through a handle that does not keep it alive.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use futures_core::Stream;

use crate::context::Context;
use crate::error::EngineError;
use crate::protocol::{Chunk, Request};

/// Who hears an engine's first-token hint: the driver's per-request state.
pub(crate) trait FirstTokenSink: Send + Sync + 'static {
    /// The engine said the first token exists.
    fn first_token(self: std::sync::Arc<Self>);
}

/// A handle on a [`FirstTokenSink`] that does not keep it alive: an engine may hold its
/// `GenerateContext` longer than the request lives.
#[cfg(not(tether_loom))]
pub(crate) type HintHandle = std::sync::Weak<dyn FirstTokenSink>;

/// Under loom the handle is a small sink that holds the model's own weak reference
/// (loom's `Arc` cannot be coerced to a trait object).
#[cfg(tether_loom)]
pub(crate) type HintHandle = std::sync::Arc<dyn FirstTokenSink>;

/// A boxed, `Send` future: what the object-safe engine methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What an engine's `generate` returns: chunks, or a typed error mid-stream.
///
/// A chunk with a finish reason is terminal; an engine should end its stream right
/// after it (tether stops polling there either way).
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, EngineError>> + Send>>;

/// What an engine reports once started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineConfig {
    /// The model name served. Must not be empty.
    pub model: String,
    /// The worker this engine instance runs as.
    pub worker_id: u64,
    /// How many sequences the engine runs at once, if it has a limit.
    pub max_concurrency: Option<usize>,
}

impl EngineConfig {
    /// An engine serving `model` as worker `worker_id`, with no concurrency limit.
    pub fn new(model: impl Into<String>, worker_id: u64) -> EngineConfig {
        EngineConfig {
            model: model.into(),
            worker_id,
            max_concurrency: None,
        }
    }

    /// Set [`max_concurrency`](EngineConfig::max_concurrency).
    #[must_use]
    pub fn with_max_concurrency(mut self, max: Option<usize>) -> Self {
        self.max_concurrency = max;
        self
    }
}

/// An inference engine, as tether drives it. Object-safe: `Arc<dyn LlmEngine>` works.
pub trait LlmEngine: Send + Sync + 'static {
    /// Start the engine for `worker_id`; returns what it serves.
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>>;

    /// Begin generating for `request`. A setup error is returned here, typed; once a
    /// stream is returned, every later problem travels inside it.
    fn generate(
        &self,
        request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>>;

    /// Stop work on the request behind `context` as soon as possible. tether calls it
    /// at most once per request and never after the engine's own terminal was seen. It
    /// may arrive while this request's `generate` is still pending (a kill or a drop
    /// during setup: `generate` is cancellation-safe) and runs on a spawned task. In
    /// decode mode before the first token it is deferred (SPEC rule 2), and the stream
    /// is kept alive, not dropped, until it was sent. The default does nothing (for
    /// engines whose stream stops when dropped).
    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        drop(context);
        Box::pin(async {})
    }

    /// Release everything. Idempotent, and valid after a failed or missing `start`.
    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>>;
}

impl fmt::Debug for dyn LlmEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn LlmEngine")
    }
}

/// What an engine gets with each `generate` (and back in `abort`): the request's
/// [`Context`], its id, and the first-token hint.
#[derive(Clone)]
pub struct GenerateContext {
    context: Context,
    request_id: std::sync::Arc<str>,
    hint: Option<HintHandle>,
}

impl fmt::Debug for GenerateContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateContext")
            .field("request_id", &self.request_id)
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl GenerateContext {
    /// A context for calling an engine directly (tests, the conformance kit). Its
    /// first-token hint goes nowhere.
    pub fn new(context: Context, request_id: impl Into<std::sync::Arc<str>>) -> GenerateContext {
        GenerateContext {
            context,
            request_id: request_id.into(),
            hint: None,
        }
    }

    pub(crate) fn with_hint(
        context: Context,
        request_id: std::sync::Arc<str>,
        hint: HintHandle,
    ) -> GenerateContext {
        GenerateContext {
            context,
            request_id,
            hint: Some(hint),
        }
    }

    /// The request's cancellation handle.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The id of the request being generated.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Whether the request was stopped or killed.
    pub fn is_stopped(&self) -> bool {
        self.context.is_stopped()
    }

    /// Tell tether the first token exists, before (or without) yielding it: a decode
    /// worker calls this once its KV-cache transfer completed, which releases a
    /// deferred abort. Idempotent and cheap; safe from any thread.
    pub fn notify_first_token(&self) {
        #[cfg(not(tether_loom))]
        if let Some(sink) = self.hint.as_ref().and_then(std::sync::Weak::upgrade) {
            sink.first_token();
        }
        #[cfg(tether_loom)]
        if let Some(sink) = &self.hint {
            sink.clone().first_token();
        }
    }
}
