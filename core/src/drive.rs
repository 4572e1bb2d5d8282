//! The executor-agnostic driver: runs the lifecycle machine (an internal module) over
//! an engine's stream on any [`Runtime`].
//!
//! This module owns the glue between events and actions, and no policy: every decision
//! (forward, abort, synthesize, finish) comes out of the machine's pure `step`. What it
//! adds is where events come from (the engine stream, the [`Context`] listener, `Drop`,
//! the first-token hint, timers) and how actions are carried out (yield an item, queue
//! the abort, record the outcome).
//!
//! ## Costs
//! No task is spawned per request on the happy path: cancellation is noticed by a
//! synchronous [`Context`] listener, not by a monitor task. Aborts are carried out by
//! one task per adapter, started at the adapter's first abort and parked between aborts
//! (a stop queues the abort and wakes it; an abort that does not finish in its first
//! poll moves to a task of its own). The token timeouts (time to first token, inter-token) run
//! on the consumer's poller with one lazily created timer, re-armed in place. The
//! cancel deadlines must fire whether or not the consumer polls: a stop's grace is
//! timed by the abort task (one timer per adapter), after the engine's `abort` was
//! entered; a deferred abort gets a watchdog for its request, which times the deferral
//! deadline and the grace and drains the engine after the consumer's end.

mod abort_task;
mod counting;
mod ended;
mod log;
mod probe;
mod request;
mod runtime_check;
#[cfg(feature = "tower")]
mod service;
mod shared;
mod slot;
mod span;
mod stats;
mod stream;
mod timers;
mod watchdog;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

pub use counting::CountingRuntime;

pub use log::TARGET as LOG_TARGET;
pub use probe::{Canary, ProbeAdapter, CANARY_ID, CANARY_MAX_TOKENS, CANARY_MODEL};
pub use request::{Generate, Generating, Results};
pub use runtime_check::{
    run_runtime_conformance, RuntimeCheckFailure, RuntimeCheckReport, RUNTIME_CHECKS,
    RUNTIME_CHECK_GUARD,
};
pub use span::{TraceIdHook, TARGET as SPAN_TARGET};
pub use stats::{itl_stats, AbortStatus, ItlStats, Observer, Outcome, RequestRecord};
pub use stream::ResponseStream;

use crate::context::Context;
use crate::engine::{EngineConfig, LlmEngine};
use crate::error::EngineError;
use crate::protocol::{Mode, Request};
use crate::sync::Arc;

/// A boxed `Send` future with no output: what [`Runtime::spawn`] runs.
pub type SpawnFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A timer that can be moved to a new deadline in place (quinn's `AsyncTimer`), so a
/// request re-arms one timer instead of allocating one per deadline.
pub trait AsyncTimer: Send + fmt::Debug + 'static {
    /// Move the deadline (earlier or later); the next poll waits for the new one.
    fn reset(self: Pin<&mut Self>, deadline: Instant);
    /// Ready once the deadline passed (and stays ready until reset). A timer must never
    /// fire before [`Runtime::now`] reaches its deadline.
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()>;
}

/// What the driver needs from an async runtime. Implemented by `tether-tokio` and
/// `tether-smol` in a few lines; any executor with a timer can implement it, and
/// [`run_runtime_conformance`] checks that it keeps the contract.
pub trait Runtime: Send + Sync + fmt::Debug + 'static {
    /// Run `future` to completion in the background, detached: dropping the handle
    /// must not cancel it (smol's `Task::detach`, tokio's `JoinHandle` dropped).
    fn spawn(&self, future: SpawnFuture);
    /// A timer that fires at `deadline`.
    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>>;
    /// The runtime's clock (a paused test clock where the runtime has one).
    fn now(&self) -> Instant;
}

impl<R: Runtime + ?Sized> Runtime for Arc<R> {
    fn spawn(&self, future: SpawnFuture) {
        (**self).spawn(future);
    }
    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        (**self).sleep_until(deadline)
    }
    fn now(&self) -> Instant {
        (**self).now()
    }
}

/// How an [`Adapter`] runs its requests. Every field has a sensible default; build one
/// with the setters (`AdapterConfig::default().mode(Mode::Decode)`), and override any
/// of them for one request with [`Adapter::request`].
///
/// ```
/// use std::time::Duration;
/// use tether_core::{AdapterConfig, Mode};
///
/// let config = AdapterConfig::default()
///     .mode(Mode::Decode)
///     .first_token_timeout(Some(Duration::from_secs(10)))
///     .cancel_grace(Some(Duration::from_secs(2)))
///     .kill_on_drop(true);
/// assert_eq!(config.mode, Mode::Decode);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct AdapterConfig {
    /// The disaggregation role: in [`Mode::Decode`], aborts before the first token are deferred.
    pub mode: Mode,
    /// How long a deferred abort waits for the first token before it is sent anyway.
    pub deferral_deadline: Duration,
    /// How long a stopped request may take to end before it is killed (`None`: forever).
    pub cancel_grace: Option<Duration>,
    /// Kill the request if no token arrives within this long (`None`: no limit).
    pub first_token_timeout: Option<Duration>,
    /// Kill the request if no token arrives within this long of the previous one.
    pub inter_token_timeout: Option<Duration>,
    /// Receives one record per request and each abort.
    pub observer: Option<Arc<dyn Observer>>,
    /// Create the `engine.generate` tracing span (it costs nothing when no subscriber
    /// listens to target `request_span`).
    pub spans: bool,
    /// Streams start with [kill-on-drop](ResponseStream::set_kill_on_drop): a drop
    /// before the terminal kills the context (cause client disconnect) and records
    /// `Cancelled`. Off by default (a drop records `Dropped`); an HTTP edge turns it on.
    pub kill_on_drop: bool,
    /// Names the distributed trace's ids for `worker_trace_link` (see [`TraceIdHook`]).
    /// `None` (the default): no link is stamped, except one the engine set itself.
    pub trace_id_hook: Option<Arc<dyn TraceIdHook>>,
}

impl AdapterConfig {
    /// Set [`mode`](AdapterConfig::mode).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    /// Set [`deferral_deadline`](AdapterConfig::deferral_deadline).
    pub fn deferral_deadline(mut self, deadline: Duration) -> Self {
        self.deferral_deadline = deadline;
        self
    }
    /// Set [`cancel_grace`](AdapterConfig::cancel_grace).
    pub fn cancel_grace(mut self, grace: Option<Duration>) -> Self {
        self.cancel_grace = grace;
        self
    }
    /// Set [`first_token_timeout`](AdapterConfig::first_token_timeout).
    pub fn first_token_timeout(mut self, limit: Option<Duration>) -> Self {
        self.first_token_timeout = limit;
        self
    }
    /// Set [`inter_token_timeout`](AdapterConfig::inter_token_timeout).
    pub fn inter_token_timeout(mut self, limit: Option<Duration>) -> Self {
        self.inter_token_timeout = limit;
        self
    }
    /// Set [`observer`](AdapterConfig::observer).
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }
    /// Set [`spans`](AdapterConfig::spans).
    pub fn spans(mut self, on: bool) -> Self {
        self.spans = on;
        self
    }
    /// Set [`kill_on_drop`](AdapterConfig::kill_on_drop).
    pub fn kill_on_drop(mut self, on: bool) -> Self {
        self.kill_on_drop = on;
        self
    }
    /// Set [`trace_id_hook`](AdapterConfig::trace_id_hook).
    pub fn trace_id_hook(mut self, hook: Arc<dyn TraceIdHook>) -> Self {
        self.trace_id_hook = Some(hook);
        self
    }
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig {
            mode: Mode::Aggregated,
            deferral_deadline: Duration::from_secs(30),
            cancel_grace: Some(Duration::from_secs(5)),
            first_token_timeout: None,
            inter_token_timeout: None,
            observer: None,
            spans: true,
            kill_on_drop: false,
            trace_id_hook: None,
        }
    }
}

impl fmt::Debug for AdapterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdapterConfig")
            .field("mode", &self.mode)
            .field("deferral_deadline", &self.deferral_deadline)
            .field("cancel_grace", &self.cancel_grace)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("inter_token_timeout", &self.inter_token_timeout)
            .field("observer", &self.observer.is_some())
            .field("spans", &self.spans)
            .field("kill_on_drop", &self.kill_on_drop)
            .field("trace_id_hook", &self.trace_id_hook.is_some())
            .finish()
    }
}

/// What every request of an adapter shares (one allocation per adapter).
pub(crate) struct AdapterInner {
    pub(crate) engine: Arc<dyn LlmEngine>,
    pub(crate) runtime: Box<dyn Runtime>,
    pub(crate) config: AdapterConfig,
    /// What each request runs under unless it says otherwise (from `config`).
    pub(crate) limits: request::Limits,
    /// The queue to the adapter's abort task (started at the first abort).
    pub(crate) aborts: Arc<abort_task::AbortQueue>,
}

impl Drop for AdapterInner {
    fn drop(&mut self) {
        // No request is left (each holds the adapter): the abort task may end.
        self.aborts.close();
    }
}

/// Runs requests against one engine on one runtime. Cheap to clone.
#[derive(Clone)]
pub struct Adapter {
    inner: Arc<AdapterInner>,
}

impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter")
            .field("runtime", &self.inner.runtime)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Adapter {
    /// An adapter for `engine` on `runtime`.
    pub fn new(
        engine: Arc<dyn LlmEngine>,
        runtime: impl Runtime,
        config: AdapterConfig,
    ) -> Adapter {
        Adapter {
            inner: Arc::new(AdapterInner {
                engine,
                runtime: Box::new(runtime),
                limits: request::Limits::of(&config),
                config,
                aborts: Arc::default(),
            }),
        }
    }

    /// The engine this adapter drives.
    pub fn engine(&self) -> &Arc<dyn LlmEngine> {
        &self.inner.engine
    }

    /// The configuration.
    pub fn config(&self) -> &AdapterConfig {
        &self.inner.config
    }

    /// Tasks this adapter keeps between requests: 1 once its abort task was started (at
    /// the adapter's first abort; it parks between aborts and ends when the adapter and
    /// all its requests are dropped), 0 before. A leak check counts the runtime's live
    /// tasks beyond this (see [`CountingRuntime::live`]).
    pub fn background_tasks(&self) -> usize {
        usize::from(self.inner.aborts.started())
    }

    /// Aborts decided and not yet carried out by the abort task: queued, or being
    /// entered (the engine's `abort` polled once, the request's cancel clocks started
    /// and its grace put on the task's timer). 0 once every decided abort was entered
    /// in the engine, an unfinished one moved to a task of its own, and the cancel
    /// clocks its step started were taken on.
    pub fn unfinished_aborts(&self) -> usize {
        self.inner.aborts.unfinished()
    }

    /// Start the engine as worker `worker_id` (`LlmEngine::start`). The adapter does
    /// not call it by itself: an engine is started once, before the first request, by
    /// whoever owns it (this method, or code that shares the engine between adapters).
    pub async fn start(&self, worker_id: u64) -> Result<EngineConfig, EngineError> {
        self.inner.engine.start(worker_id).await
    }

    /// Release the engine (`LlmEngine::cleanup`, idempotent): call it once no request
    /// is running any more, e.g. after a graceful shutdown drained them.
    pub async fn cleanup(&self) -> Result<(), EngineError> {
        self.inner.engine.cleanup().await
    }

    /// Start `request` under `context`. A setup error from the engine comes back here,
    /// typed, and nothing is aborted (rule 7); otherwise the stream carries everything,
    /// ending with exactly one terminal.
    ///
    /// Cancellation-safe (rule 10): the context is watched before the engine's
    /// `generate` is entered, so a kill (or a first-token timeout) during a slow setup
    /// resolves this future at once with a stream that yields the terminal, and dropping
    /// this future records the request as `Dropped` and aborts the engine. A panic in
    /// the engine's `generate` comes back as a typed error.
    ///
    /// [`Adapter::request`] does the same with per-request settings, and makes the
    /// context itself when the caller has none.
    pub async fn generate(
        &self,
        request: Request,
        context: Context,
    ) -> Result<ResponseStream, EngineError> {
        // `request(..).context(..)` without the builder's moves: this is the hot path.
        let mut stream = ResponseStream::new(&self.inner, request, context, None);
        // Dropping this future drops `stream`: the request is recorded (`Dropped`, or
        // `Cancelled` with kill-on-drop) and the engine aborted under rules 1 and 2.
        std::future::poll_fn(|cx| stream.poll_setup(cx)).await?;
        Ok(stream)
    }

    /// A request with settings of its own (mode, timeouts, deferral deadline, cancel
    /// grace, kill-on-drop, a record callback, a context): `.await` it to start it. See
    /// [`Generate`].
    pub fn request(&self, request: Request) -> Generate<'_> {
        Generate::new(self, request)
    }
}

#[cfg(all(test, not(tether_loom)))]
mod tests;
