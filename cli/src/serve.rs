//! `tether serve`: an OpenAI-compatible HTTP edge (axum on tokio) over the
//! runtime-agnostic [`Adapter`], where a closed connection really stops the engine and
//! the metrics never lie.
//!
//! Endpoints:
//!
//! | endpoint | what | API key |
//! |---|---|---|
//! | `POST /v1/completions`, `POST /v1/chat/completions` | generation: SSE with `stream: true`, one JSON body otherwise | yes |
//! | `GET /v1/models` | the served model | yes |
//! | `POST /tokenize`, `POST /detokenize` | the byte-level [`tokenizer`], in vLLM's shapes | yes |
//! | `GET /health`, `GET`/`POST /ping` | liveness, answered at once without queueing (503 while shutting down or when the engine is not alive) | no |
//! | `GET /health/canary` | a one-token [`ProbeAdapter`] canary through the engine (503 when it fails or takes longer than `--health-timeout`) | no |
//! | `GET /version` | `{"version"}` of this build | no |
//! | `GET /metrics` | Prometheus text (see [`metrics`] for the names) | no |
//!
//! With [`ServeConfig::api_key`] set, the endpoints marked "yes" (every path under
//! `/v1/`) need `Authorization: Bearer KEY` (401 otherwise); CORS is off unless
//! [`ServeConfig::cors_allow_origins`] names origins (see [`ApiKey`] and the `auth`
//! module). Text goes through the byte-level [`tokenizer`].
//! Every response to a generation request carries its id in `x-request-id`; every
//! HTTP request gets one access log line, refused ones included (see [`logging`] for
//! what the binary prints, and where).
//!
//! - A client that disconnects mid-request gets its request killed: the engine is
//!   aborted exactly once, its slot freed, and the outcome is `cancelled` (not
//!   `dropped`: the adapter is kill-on-drop, and streamed responses are
//!   [`tether_axum::sse`] responses). A request whose terminal was read is never
//!   aborted, even if the client leaves before the last bytes are written. The
//!   in-flight gauge drops after the outcome is counted.
//! - Bad input is a 400 (404 for an unknown model) with an OpenAI error object.
//! - A parameter that changes the output (`temperature`, `top_p`, `top_k`, `seed`,
//!   `min_tokens`, `ignore_eos`, the penalties, `logit_bias`, `response_format`,
//!   `best_of`, `suffix`, `tool_choice`) is honoured by the engine or accepted only at
//!   its default: what the engine's `start` reported in
//!   [`EngineConfig::supported`](tether_core::EngineConfig::supported) says which it
//!   honours, and any other value is a 400 `unsupported_parameter` naming it, never
//!   silently ignored. SimEngine honours `seed`, `min_tokens` and `ignore_eos`;
//!   TinyEngine also samples (`temperature`, `top_p`, `top_k`). The table is in
//!   `serve/params.rs`.
//! - Connections (see [`conn`]): `TCP_NODELAY` on every socket; a request head must
//!   arrive within [`ServeConfig::header_read_timeout`], an idle keep-alive connection
//!   is closed after [`ServeConfig::idle_timeout`], a client that stops reading after
//!   [`ServeConfig::write_timeout`] (its request is killed as a disconnect); beyond
//!   [`ServeConfig::max_connections`] a new connection gets a 503 and is closed.
//! - [`Server::shutdown`] (SIGINT/SIGTERM in the binary): stop accepting, let in-flight
//!   requests finish for [`ServeConfig::shutdown_grace`], kill the rest, drop the
//!   connections still open at most [`KILL_WAIT`] later, then call the engine's
//!   `cleanup` exactly once.
//!
//! ```no_run
//! # async fn demo(runtime: std::sync::Arc<dyn tether_core::Runtime>) {
//! use std::sync::Arc;
//! use tether_cli::serve::{self, ServeConfig, ServedEngine};
//! use tether_engines::{SimConfig, SimEngine};
//!
//! let engine = Arc::new(SimEngine::new(SimConfig::default(), runtime.clone()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let server = serve::start(ServedEngine::sim(engine), runtime, listener, ServeConfig::default())
//!     .await
//!     .unwrap();
//! println!("listening on {}", server.local_addr());
//! server.shutdown();
//! let report = server.wait().await;
//! assert!(report.cleanup.is_ok());
//! # }
//! ```

pub mod access;
mod api;
mod args;
mod auth;
pub mod conn;
mod error;
mod generation;
mod handlers;
pub mod logging;
pub mod metrics;
mod ops;
#[cfg(feature = "otel")]
pub mod otel;
mod params;
mod responses;
mod stop;
pub mod tokenizer;
mod traceparent;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tether_core::drive::ProbeAdapter;
use tether_core::{Adapter, AdapterConfig, Cause, Context, EngineError, LlmEngine, Runtime};
use tether_engines::{SimEngine, TinyEngine};
use tokio::sync::watch;
use tower_http::cors::CorsLayer;
use tower_http::request_id::PropagateRequestIdLayer;
use tower_http::validate_request::ValidateRequestHeaderLayer;

pub use crate::engine::EngineKind;
pub use args::{log_engine_abort, run, ServeArgs, ENGINE_LOG_TARGET};
pub use auth::ApiKey;
pub use metrics::{EngineGauges, GaugeFn, Metrics};
pub use ops::LivenessFn;
pub use tokenizer::Tokenizer;

use crate::engine::Engine;
use api::Limits;
use metrics::MetricsObserver;

/// How long a killed request may take to end once the grace period expired, before
/// the server drops its connection.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// How the server runs. `Default` is the command line's defaults.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The model name clients must ask for (`None`: the name the engine reports).
    pub model: Option<String>,
    /// The adapter's time-to-first-token limit (a timed-out request gets a 504 or an
    /// SSE error event).
    pub first_token_timeout: Option<Duration>,
    /// The adapter's inter-token limit.
    pub inter_token_timeout: Option<Duration>,
    /// How long a shutdown lets in-flight requests finish before it kills them.
    pub shutdown_grace: Duration,
    /// The longest prompt accepted, in byte tokens (longer: 400).
    pub max_prompt_tokens: usize,
    /// The largest `max_tokens` accepted (larger: 400).
    pub max_tokens_limit: u32,
    /// `max_tokens` for requests that set none.
    pub default_max_tokens: u32,
    /// Pass `chaos:` annotations from clients on to the engine (testing only; they are
    /// stripped otherwise).
    pub allow_chaos: bool,
    /// How long `/health/canary` waits for its canary.
    pub health_timeout: Duration,
    /// Interval of SSE keep-alive comments (they also reveal dead clients while an
    /// engine is silent).
    pub keep_alive: Duration,
    /// The key every request to `/v1/*`, `/tokenize` and `/detokenize` must send as
    /// `Authorization: Bearer KEY` (`None`: no key is asked for).
    pub api_key: Option<ApiKey>,
    /// The origins browsers may call the server from (CORS), each
    /// `scheme://host[:port]`, or `*` alone for any. Empty: CORS off, no CORS headers.
    pub cors_allow_origins: Vec<String>,
    /// Time a connection that began sending a request head has to complete it; it is
    /// closed otherwise (slowloris).
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection with no request in flight and nothing received is
    /// kept open.
    pub idle_timeout: Duration,
    /// Time a write to a client may stay pending (the client stopped reading) before
    /// the connection is closed and its request killed as a disconnect.
    pub write_timeout: Duration,
    /// Open connections at most; a connection beyond gets a 503 and is closed.
    /// Default: [`conn::default_max_connections`] (from the open-file limit).
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: None,
            first_token_timeout: None,
            inter_token_timeout: None,
            shutdown_grace: Duration::from_secs(10),
            max_prompt_tokens: 4096,
            max_tokens_limit: 4096,
            default_max_tokens: 16,
            allow_chaos: false,
            health_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(15),
            api_key: None,
            cors_allow_origins: Vec::new(),
            header_read_timeout: conn::DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: conn::DEFAULT_IDLE_TIMEOUT,
            write_timeout: conn::DEFAULT_WRITE_TIMEOUT,
            max_connections: conn::default_max_connections(),
        }
    }
}

/// The engine a server drives, how to read its gauges for `/metrics`, and how to tell
/// whether it is alive for `/health`.
#[derive(Clone)]
pub struct ServedEngine {
    /// The engine (not started yet: [`start`] starts it).
    pub engine: Arc<dyn LlmEngine>,
    /// Reads the engine's gauges at every scrape, if it has any.
    pub gauges: Option<GaugeFn>,
    /// The engine's own liveness check, run by every `GET /health` (cheap, never a
    /// request: see [`LivenessFn`]). `None`: the engine is alive while it is started
    /// and not shut down.
    pub alive: Option<LivenessFn>,
    /// The engine's vocabulary: text in, text out (byte tokens but for llama.cpp's).
    pub tokenizer: Tokenizer,
}

impl fmt::Debug for ServedEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServedEngine")
            .field("gauges", &self.gauges.is_some())
            .field("alive", &self.alive.is_some())
            .field("tokenizer", &self.tokenizer)
            .finish_non_exhaustive()
    }
}

impl ServedEngine {
    /// A SimEngine, with its slots, queue and aborts exported, alive while its
    /// scheduler loop runs.
    pub fn sim(engine: Arc<SimEngine>) -> ServedEngine {
        ServedEngine::with(Engine::Sim(engine), Tokenizer::bytes())
    }

    /// A TinyEngine, with its sequences, queue and aborts exported, alive while its
    /// scheduler loop runs.
    pub fn tiny(engine: Arc<TinyEngine>) -> ServedEngine {
        ServedEngine::with(Engine::Tiny(engine), Tokenizer::bytes())
    }

    /// Any engine [`EngineSpec::build`](crate::engine::EngineSpec::build) makes, with
    /// its sequences, queue and aborts exported, alive while its scheduler loop (or
    /// thread) runs ([`Engine::liveness`]), and its vocabulary: llama.cpp's model's
    /// own (an error when its chat template does not compile), byte tokens for the
    /// others.
    pub fn of(engine: Engine) -> Result<ServedEngine, String> {
        let tokenizer = match &engine {
            #[cfg(feature = "llama-cpp")]
            Engine::LlamaCpp(e) => Tokenizer::gguf(e.tokenizer().clone())?,
            Engine::Sim(_) | Engine::Tiny(_) => Tokenizer::bytes(),
        };
        Ok(ServedEngine::with(engine, tokenizer))
    }

    /// Any engine, without engine gauges or a liveness check of its own.
    pub fn other(engine: Arc<dyn LlmEngine>) -> ServedEngine {
        ServedEngine {
            engine,
            gauges: None,
            alive: None,
            tokenizer: Tokenizer::bytes(),
        }
    }
}

impl ServedEngine {
    fn with(engine: Engine, tokenizer: Tokenizer) -> ServedEngine {
        let llm = engine.llm();
        let probed = engine.clone();
        ServedEngine {
            engine: llm,
            tokenizer,
            alive: Some(Arc::new(move || probed.liveness())),
            gauges: Some(Arc::new(move || {
                let g = engine.gauges();
                EngineGauges {
                    live_sequences: g.live_sequences as u64,
                    queue_length: g.queue_len as u64,
                    accepted: g.accepted,
                    aborts_received: g.aborts_received,
                    late_aborts: g.late_aborts,
                }
            })),
        }
    }
}

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The options make no sense; the message says which and why.
    #[error("{0}")]
    InvalidOptions(String),
    /// A runtime, the listener or the signal handlers could not be set up.
    #[error("{context}: {source}")]
    Io {
        /// What was being set up.
        context: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The engine could not be built (llama.cpp's model did not load, or the feature
    /// is not built in).
    #[error("{0}")]
    EngineBuild(crate::engine::StartError),
    /// The engine did not start.
    #[error("engine failed to start: {0}")]
    EngineStart(EngineError),
    /// The engine's cleanup failed at shutdown.
    #[error("engine cleanup failed: {0}")]
    Cleanup(EngineError),
    /// The OTLP exporter could not be set up.
    #[error("cannot set up otlp export: {0}")]
    Otel(String),
    /// A second SIGINT/SIGTERM arrived during the graceful shutdown: the process exits
    /// at once (exit code 1), without waiting for requests in flight or the engine's
    /// cleanup.
    #[error("{signal} during the shutdown: exited without draining or cleaning up")]
    ForcedExit {
        /// The signal's name (`SIGINT`, `SIGTERM`).
        signal: &'static str,
    },
}

/// What a stopped server reports.
#[derive(Debug)]
pub struct ShutdownReport {
    /// Whether the grace period expired with requests in flight, which were killed.
    pub killed_in_flight: bool,
    /// Whether every connection closed (false: some were still open [`KILL_WAIT`] after
    /// the grace period, and the server dropped them). Connections with no request in
    /// flight are closed by the server at the end of the grace period, and count as
    /// closed.
    pub drained: bool,
    /// The engine's `cleanup` result (it is called exactly once).
    pub cleanup: Result<(), EngineError>,
}

/// What every handler shares.
pub(crate) struct App {
    pub(crate) adapter: Adapter,
    pub(crate) probe: ProbeAdapter,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) runtime: Arc<dyn Runtime>,
    /// Every request's context is linked to it; killing it kills them all.
    pub(crate) root: Context,
    pub(crate) ids: handlers::RequestIds,
    /// A shutdown began: new requests and health checks get a 503.
    pub(crate) draining: AtomicBool,
    /// What `/health` checks besides `draining`.
    pub(crate) liveness: ops::Liveness,
    pub(crate) health_timeout: Duration,
    pub(crate) keep_alive: Duration,
    pub(crate) started_at: u64,
}

/// A running server. Dropping it leaves the server running; [`Server::shutdown`] and
/// [`Server::wait`] stop it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    model: String,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<ShutdownReport>,
}

impl Server {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The model name it serves.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Its metrics (what `/metrics` exports).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Begin a graceful shutdown (idempotent): stop accepting, let in-flight requests
    /// finish for the grace period, kill the rest, clean the engine up.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Wait until the server stopped and the engine was cleaned up. Only returns after
    /// [`Server::shutdown`] (or if the server failed).
    pub async fn wait(self) -> ShutdownReport {
        match self.task.await {
            Ok(report) => report,
            Err(e) => ShutdownReport {
                killed_in_flight: false,
                drained: false,
                cleanup: Err(EngineError::new(
                    tether_core::ErrorKind::Unknown,
                    format!("the server task failed: {e}"),
                )),
            },
        }
    }
}

/// Start `engine` and serve it on `listener`. Must be called inside a tokio runtime
/// (axum runs there); the adapter and the engine run on `runtime`, which may be tokio
/// or another runtime's shim.
pub async fn start(
    engine: ServedEngine,
    runtime: Arc<dyn Runtime>,
    listener: tokio::net::TcpListener,
    config: ServeConfig,
) -> Result<Server, ServeError> {
    let addr = listener.local_addr().map_err(|source| ServeError::Io {
        context: "cannot read the listener's address",
        source,
    })?;
    if config.max_prompt_tokens == 0 {
        return Err(ServeError::InvalidOptions(
            "--max-prompt-tokens must be at least 1".to_owned(),
        ));
    }
    if config.keep_alive.is_zero() {
        return Err(ServeError::InvalidOptions(
            "--sse-keep-alive must be above 0".to_owned(),
        ));
    }
    if config.default_max_tokens > config.max_tokens_limit {
        return Err(ServeError::InvalidOptions(format!(
            "--default-max-tokens {} is above --max-tokens-limit {}",
            config.default_max_tokens, config.max_tokens_limit
        )));
    }
    if let Some(key) = &config.api_key {
        key.check().map_err(ServeError::InvalidOptions)?;
    }
    let cors = auth::cors_layer(&config.cors_allow_origins).map_err(ServeError::InvalidOptions)?;
    let conn_config = conn::ConnConfig {
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        write_timeout: config.write_timeout,
        max_connections: config.max_connections,
    };
    conn_config.check().map_err(ServeError::InvalidOptions)?;
    let started = match engine.engine.start(0).await {
        Ok(started) => started,
        Err(err) => {
            // Cleanup is valid after a failed start, and frees what the start took.
            let _ = engine.engine.cleanup().await;
            return Err(ServeError::EngineStart(err));
        }
    };
    let model = config.model.clone().unwrap_or(started.model);
    let metrics = Arc::new(Metrics::new(engine.gauges.clone()));
    // `worker_trace_link` names the exported OpenTelemetry ids of the request's span;
    // while nothing exports it (no `--otlp-endpoint`) the hook answers none.
    #[cfg(feature = "otel")]
    let client_config = AdapterConfig::default().trace_id_hook(Arc::new(otel::OtelTraceIds));
    #[cfg(not(feature = "otel"))]
    let client_config = AdapterConfig::default();
    let adapter = Adapter::new(
        engine.engine.clone(),
        runtime.clone(),
        client_config
            .first_token_timeout(config.first_token_timeout)
            .inter_token_timeout(config.inter_token_timeout)
            // Aborts only: outcomes are counted by each request's record callback.
            .observer(Arc::new(MetricsObserver(metrics.clone())))
            // An HTTP edge: a dropped response (the client went away) is a kill with
            // cause client disconnect, recorded `cancelled` (SPEC rule 4).
            .kill_on_drop(true),
    );
    // Health canaries are not client requests: they get their own adapter, without
    // the metrics observer and without spans.
    let probe = ProbeAdapter::new(Adapter::new(
        engine.engine.clone(),
        runtime.clone(),
        AdapterConfig::default().spans(false),
    ));
    let app = Arc::new(App {
        adapter,
        probe,
        limits: Limits {
            model: model.clone(),
            max_prompt_tokens: config.max_prompt_tokens,
            max_tokens_limit: config.max_tokens_limit,
            default_max_tokens: config.default_max_tokens,
            allow_chaos: config.allow_chaos,
            supported: started.supported,
            tokenizer: engine.tokenizer.clone(),
        },
        metrics: metrics.clone(),
        runtime,
        root: Context::new("tether-serve"),
        ids: handlers::RequestIds::new(),
        draining: AtomicBool::new(false),
        liveness: ops::Liveness::new(engine.alive.clone()),
        health_timeout: config.health_timeout,
        keep_alive: config.keep_alive,
        started_at: handlers::started_at(),
    });
    let router = router(app.clone(), config.api_key.clone(), cors);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run_server(
        listener,
        router,
        app,
        engine.engine,
        stopped,
        config.shutdown_grace,
        conn_config,
    ));
    Ok(Server {
        addr,
        model,
        metrics,
        stop,
        task,
    })
}

fn router(app: Arc<App>, api_key: Option<ApiKey>, cors: Option<CorsLayer>) -> Router {
    let mut router = Router::new()
        .route(
            "/v1/completions",
            post(handlers::completions).fallback(handlers::wrong_method),
        )
        .route(
            "/v1/chat/completions",
            post(handlers::chat_completions).fallback(handlers::wrong_method),
        )
        .route(
            "/v1/models",
            get(handlers::models).fallback(handlers::wrong_method),
        )
        .route(
            "/tokenize",
            post(ops::tokenize).fallback(handlers::wrong_method),
        )
        .route(
            "/detokenize",
            post(ops::detokenize).fallback(handlers::wrong_method),
        )
        .route("/health", get(ops::health).fallback(handlers::wrong_method))
        .route(
            "/health/canary",
            get(ops::canary).fallback(handlers::wrong_method),
        )
        .route(
            "/ping",
            get(ops::health)
                .post(ops::health)
                .fallback(handlers::wrong_method),
        )
        .route(
            "/version",
            get(ops::version).fallback(handlers::wrong_method),
        )
        .route(
            "/metrics",
            get(handlers::metrics).fallback(handlers::wrong_method),
        )
        .fallback(handlers::no_route);
    // Layers wrap what was built before them: the key check runs inside the CORS
    // layer (which answers preflights, requests without credentials, itself), and
    // both inside the access log, so a refused request is logged and counted too.
    if let Some(key) = api_key {
        router = router.layer(ValidateRequestHeaderLayer::custom(
            auth::RequireApiKey::new(key),
        ));
    }
    if let Some(cors) = cors {
        router = router.layer(cors);
    }
    router
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            access::observe,
        ))
        .layer(DefaultBodyLimit::max(error::MAX_BODY_BYTES))
        // A client's own `x-request-id` is echoed on the response as it came.
        .layer(PropagateRequestIdLayer::x_request_id())
        .with_state(app)
}

async fn wait_for_stop(mut stopped: watch::Receiver<bool>) {
    // An error means the `Server` and its sender are gone: never stop on that.
    if stopped.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run_server(
    listener: tokio::net::TcpListener,
    router: Router,
    app: Arc<App>,
    engine: Arc<dyn LlmEngine>,
    stopped: watch::Receiver<bool>,
    grace: Duration,
    conn_config: conn::ConnConfig,
) -> ShutdownReport {
    // Accepting only ends on a shutdown (a failed accept is retried after a back-off).
    let connections = conn::accept_until(
        listener,
        router,
        conn_config,
        app.metrics.clone(),
        wait_for_stop(stopped),
    )
    .await;
    // Acquire/Release pair: a handler that sees the flag sees a shutdown that began.
    app.draining.store(true, Ordering::Release);
    let drained = connections
        .drain(grace, KILL_WAIT, || app.root.kill_with(Cause::Shutdown))
        .await;
    // The only call to cleanup: the server task reaches it once, after every connection
    // closed or was dropped.
    app.liveness.engine_cleaned_up();
    let cleanup = engine.cleanup().await;
    ShutdownReport {
        killed_in_flight: drained.killed_in_flight,
        drained: drained.drained,
        cleanup,
    }
}
