//! The engine side of the contract: the object-safe [`LlmEngine`] trait, its
//! [`EngineConfig`], the [`GenerateContext`] handed to each `generate`, and the
//! [`ChunkStream`] an engine returns.
//!
//! This module knows nothing of how a stream is driven and does not import the driver:
//! the engine's hints (first token, scheduled) reach whatever implements the private
//! `HintSink` (the driver's per-request state), through a handle that does not keep it
//! alive.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use futures_core::Stream;

use crate::context::Context;
use crate::error::EngineError;
use crate::protocol::{Chunk, Request};

/// Who hears an engine's hints: the driver's per-request state.
pub(crate) trait HintSink: Send + Sync + 'static {
    /// The engine said the first token exists.
    fn first_token(self: std::sync::Arc<Self>);
    /// The engine said the request left its queue and was scheduled.
    fn scheduled(self: std::sync::Arc<Self>);
}

/// A handle on a [`HintSink`] that does not keep it alive: an engine may hold its
/// `GenerateContext` longer than the request lives.
#[cfg(not(tether_loom))]
pub(crate) type HintHandle = std::sync::Weak<dyn HintSink>;

/// Under loom the handle is a small sink that holds the model's own weak reference
/// (loom's `Arc` cannot be coerced to a trait object).
#[cfg(tether_loom)]
pub(crate) type HintHandle = std::sync::Arc<dyn HintSink>;

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
    /// The request parameters that change the output which this engine honours. A
    /// serving edge uses it to refuse a request that asks for what the engine would
    /// silently ignore. [`SupportedParams::NONE`] (the default) claims nothing.
    pub supported: SupportedParams,
}

impl EngineConfig {
    /// An engine serving `model` as worker `worker_id`, with no concurrency limit.
    pub fn new(model: impl Into<String>, worker_id: u64) -> EngineConfig {
        EngineConfig {
            model: model.into(),
            worker_id,
            max_concurrency: None,
            supported: SupportedParams::NONE,
        }
    }

    /// Set [`max_concurrency`](EngineConfig::max_concurrency).
    #[must_use]
    pub fn with_max_concurrency(mut self, max: Option<usize>) -> Self {
        self.max_concurrency = max;
        self
    }

    /// Set [`supported`](EngineConfig::supported).
    #[must_use]
    pub fn with_supported(mut self, supported: SupportedParams) -> Self {
        self.supported = supported;
        self
    }
}

/// Which of a [`Request`]'s output-changing parameters an engine honours: each flag
/// names a field the engine reads and acts on. Declared in
/// [`EngineConfig::supported`]; an edge (such as `tether serve`) passes an honoured
/// parameter on and refuses a request that sets one the engine would ignore.
///
/// Start from [`SupportedParams::NONE`] and turn on what the engine really does; a
/// flag added later starts off, so an engine never claims more than it was written
/// for.
///
/// ```
/// use tether_core::engine::{EngineConfig, SupportedParams};
///
/// let supported = SupportedParams::NONE.with_seed(true).with_min_tokens(true);
/// let config = EngineConfig::new("sim", 0).with_supported(supported);
/// assert!(config.supported.seed && !config.supported.temperature);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct SupportedParams {
    /// [`SamplingOptions::temperature`](crate::protocol::SamplingOptions::temperature):
    /// the engine samples at the given temperature (0 being greedy).
    pub temperature: bool,
    /// [`SamplingOptions::top_p`](crate::protocol::SamplingOptions::top_p): nucleus
    /// sampling.
    pub top_p: bool,
    /// [`SamplingOptions::top_k`](crate::protocol::SamplingOptions::top_k): sampling
    /// among the `k` most likely tokens.
    pub top_k: bool,
    /// [`SamplingOptions::seed`](crate::protocol::SamplingOptions::seed): the same
    /// seed (with the same prompt and parameters) gives the same tokens.
    pub seed: bool,
    /// [`StopConditions::min_tokens`](crate::protocol::StopConditions::min_tokens): no
    /// stop before that many tokens.
    pub min_tokens: bool,
    /// [`StopConditions::ignore_eos`](crate::protocol::StopConditions::ignore_eos):
    /// generation goes on past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// [`SamplingOptions::presence_penalty`](crate::protocol::SamplingOptions::presence_penalty).
    pub presence_penalty: bool,
    /// [`SamplingOptions::frequency_penalty`](crate::protocol::SamplingOptions::frequency_penalty).
    pub frequency_penalty: bool,
    /// [`SamplingOptions::repetition_penalty`](crate::protocol::SamplingOptions::repetition_penalty).
    pub repetition_penalty: bool,
}

impl SupportedParams {
    /// Nothing is honoured: every such parameter must be left at its default.
    pub const NONE: SupportedParams = SupportedParams {
        temperature: false,
        top_p: false,
        top_k: false,
        seed: false,
        min_tokens: false,
        ignore_eos: false,
        presence_penalty: false,
        frequency_penalty: false,
        repetition_penalty: false,
    };

    /// [`SupportedParams::NONE`], as a function.
    pub const fn none() -> SupportedParams {
        SupportedParams::NONE
    }

    /// Set [`temperature`](SupportedParams::temperature).
    #[must_use]
    pub const fn with_temperature(mut self, honoured: bool) -> Self {
        self.temperature = honoured;
        self
    }

    /// Set [`top_p`](SupportedParams::top_p).
    #[must_use]
    pub const fn with_top_p(mut self, honoured: bool) -> Self {
        self.top_p = honoured;
        self
    }

    /// Set [`top_k`](SupportedParams::top_k).
    #[must_use]
    pub const fn with_top_k(mut self, honoured: bool) -> Self {
        self.top_k = honoured;
        self
    }

    /// Set [`seed`](SupportedParams::seed).
    #[must_use]
    pub const fn with_seed(mut self, honoured: bool) -> Self {
        self.seed = honoured;
        self
    }

    /// Set [`min_tokens`](SupportedParams::min_tokens).
    #[must_use]
    pub const fn with_min_tokens(mut self, honoured: bool) -> Self {
        self.min_tokens = honoured;
        self
    }

    /// Set [`ignore_eos`](SupportedParams::ignore_eos).
    #[must_use]
    pub const fn with_ignore_eos(mut self, honoured: bool) -> Self {
        self.ignore_eos = honoured;
        self
    }

    /// Set [`presence_penalty`](SupportedParams::presence_penalty).
    #[must_use]
    pub const fn with_presence_penalty(mut self, honoured: bool) -> Self {
        self.presence_penalty = honoured;
        self
    }

    /// Set [`frequency_penalty`](SupportedParams::frequency_penalty).
    #[must_use]
    pub const fn with_frequency_penalty(mut self, honoured: bool) -> Self {
        self.frequency_penalty = honoured;
        self
    }

    /// Set [`repetition_penalty`](SupportedParams::repetition_penalty).
    #[must_use]
    pub const fn with_repetition_penalty(mut self, honoured: bool) -> Self {
        self.repetition_penalty = honoured;
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
    /// during setup: `generate` is cancellation-safe). It is first polled by the
    /// adapter's abort task, one abort after another: it must not block in a poll (an
    /// abort that is not done in its first poll moves on to a task of its own). In
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

/// Key/value pairs a caller attached to a request for its engine (a tenant, a priority
/// class, a routing hint): set with [`Generate::metadata`](crate::Generate::metadata),
/// read with [`GenerateContext::metadata`]. Kept in the order they were attached; a
/// key attached twice keeps both, and [`Metadata::get`] answers the last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    pairs: Vec<(String, String)>,
}

impl Metadata {
    /// The key under which a serving frontend keeps the id the client gave a request
    /// (an HTTP `x-request-id`; set with
    /// [`Generate::client_request_id`](crate::Generate::client_request_id)). Clients
    /// reuse such ids (retries), so it is for correlation only: the request's own id
    /// stays unique. The request's span records it as `client_request_id`.
    pub const CLIENT_REQUEST_ID: &'static str = "client_request_id";

    /// No pairs.
    pub fn new() -> Metadata {
        Metadata::default()
    }

    /// Attach `value` under `key`.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.pairs.push((key.into(), value.into()));
    }

    /// The value last attached under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every pair, in the order attached.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Metadata {
        Metadata {
            pairs: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

/// The empty metadata a request without any refers to.
static NO_METADATA: Metadata = Metadata { pairs: Vec::new() };

/// What an engine gets with each `generate` (and back in `abort`): the request's
/// [`Context`], its id, the caller's [`Metadata`], and the hints an engine gives
/// tether ([`notify_first_token`](GenerateContext::notify_first_token),
/// [`notify_scheduled`](GenerateContext::notify_scheduled)).
#[derive(Clone)]
pub struct GenerateContext {
    context: Context,
    request_id: std::sync::Arc<str>,
    metadata: Option<std::sync::Arc<Metadata>>,
    hint: Option<HintHandle>,
}

impl fmt::Debug for GenerateContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateContext")
            .field("request_id", &self.request_id)
            .field("context", &self.context)
            .field("metadata", self.metadata())
            .finish_non_exhaustive()
    }
}

impl GenerateContext {
    /// A context for calling an engine directly (tests, the conformance kit). Its
    /// hints go nowhere.
    pub fn new(context: Context, request_id: impl Into<std::sync::Arc<str>>) -> GenerateContext {
        GenerateContext {
            context,
            request_id: request_id.into(),
            metadata: None,
            hint: None,
        }
    }

    /// The same, carrying `metadata` (for calling an engine directly).
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> GenerateContext {
        self.metadata = (!metadata.is_empty()).then(|| std::sync::Arc::new(metadata));
        self
    }

    pub(crate) fn with_hint(
        context: Context,
        request_id: std::sync::Arc<str>,
        metadata: Option<std::sync::Arc<Metadata>>,
        hint: HintHandle,
    ) -> GenerateContext {
        GenerateContext {
            context,
            request_id,
            metadata,
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

    /// The key/values the caller attached to this request (empty when none).
    pub fn metadata(&self) -> &Metadata {
        self.metadata.as_deref().unwrap_or(&NO_METADATA)
    }

    /// Whether the request was stopped or killed.
    pub fn is_stopped(&self) -> bool {
        self.context.is_stopped()
    }

    /// Tell tether the first token exists, before (or without) yielding it: a decode
    /// worker calls this once its KV-cache transfer completed, which releases a
    /// deferred abort. Idempotent and cheap; safe from any thread.
    pub fn notify_first_token(&self) {
        self.hint(HintSink::first_token);
    }

    /// Tell tether the request left the engine's queue and was scheduled (admitted to a
    /// batch, given its KV blocks): the request's queue time
    /// ([`RequestRecord::queue_time`](crate::RequestRecord::queue_time)) ends here, as
    /// it does at a token-less chunk before the first token. Only the first signal
    /// counts; cheap; safe from any thread.
    pub fn notify_scheduled(&self) {
        self.hint(HintSink::scheduled);
    }

    fn hint(&self, give: impl FnOnce(std::sync::Arc<dyn HintSink>)) {
        #[cfg(not(tether_loom))]
        if let Some(sink) = self.hint.as_ref().and_then(std::sync::Weak::upgrade) {
            give(sink);
        }
        #[cfg(tether_loom)]
        if let Some(sink) = &self.hint {
            give(sink.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_config_claims_no_parameter_unless_told() {
        let config = EngineConfig::new("m", 3);
        assert_eq!(config.supported, SupportedParams::NONE);
        assert_eq!(SupportedParams::default(), SupportedParams::NONE);
        assert_eq!(SupportedParams::none(), SupportedParams::NONE);
        assert_eq!(EngineConfig::default().supported, SupportedParams::NONE);
    }

    type Set = fn(SupportedParams) -> SupportedParams;
    type Read = fn(&SupportedParams) -> bool;

    #[test]
    fn supported_params_builders_set_exactly_their_flag() {
        let all_off = SupportedParams::NONE;
        let cases: [(Set, Read); 6] = [
            (|s| s.with_temperature(true), |s| s.temperature),
            (|s| s.with_top_p(true), |s| s.top_p),
            (|s| s.with_top_k(true), |s| s.top_k),
            (|s| s.with_seed(true), |s| s.seed),
            (|s| s.with_min_tokens(true), |s| s.min_tokens),
            (|s| s.with_ignore_eos(true), |s| s.ignore_eos),
        ];
        for (i, (set, _)) in cases.iter().enumerate() {
            let on = set(all_off);
            for (j, (_, read)) in cases.iter().enumerate() {
                assert_eq!(read(&on), i == j, "setting flag {i} shows in flag {j}");
            }
        }
        let everything = cases.iter().fold(all_off, |s, (set, _)| set(s));
        let back_off = everything
            .with_temperature(false)
            .with_top_p(false)
            .with_top_k(false)
            .with_seed(false)
            .with_min_tokens(false)
            .with_ignore_eos(false);
        assert_eq!(back_off, SupportedParams::NONE);
        let config = EngineConfig::new("m", 0).with_supported(everything);
        assert_eq!(config.supported, everything);
        assert_eq!(
            config.with_supported(SupportedParams::NONE).supported,
            all_off
        );
    }
}
