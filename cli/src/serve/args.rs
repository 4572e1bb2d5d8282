//! `tether serve`'s command line ([`ServeArgs`]) and [`run`], the binary's entry point:
//! build the runtimes and the engine, serve until SIGINT or SIGTERM, shut down
//! gracefully.
//!
//! Owns process-level concerns only (runtimes, signals, the engine choice, the log
//! subscriber and OTLP set-up); the server itself is [`super::start`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_core::Runtime;
use tether_engines::{AbortHook, AbortReceipt, SimConfig, TinyConfig};

use super::{ApiKey, ServeConfig, ServeError, ServedEngine};
use crate::engine::{EngineArgs, EngineKind, EngineSpec, LlamaSpec};
use crate::load::{parse_duration, parse_timeout, Timeout};
use crate::runtime::{self, RuntimeKind};

/// `tether serve`: an OpenAI-compatible HTTP server over an engine.
///
/// Exit code: 0 after a clean shutdown (SIGINT or SIGTERM), 1 on a failure or when a
/// second SIGINT/SIGTERM during the shutdown forced an exit, 2 on bad arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Engine to serve, and TinyEngine's device.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on (port 0: any free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub addr: SocketAddr,
    /// Runtime of the adapter and the engine (HTTP always runs on tokio).
    #[arg(long, value_enum, default_value_t = RuntimeKind::Tokio)]
    pub runtime: RuntimeKind,
    /// Worker threads of each runtime (default: the machine's parallelism).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Model name clients must ask for (default: the engine's: `--model` for sim and
    /// tiny, else `sim` or `tiny`; the GGUF file's name without `.gguf` for llama-cpp).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Time-to-first-token limit (`none`, `500ms`, `2s`); a timed-out request gets a
    /// 504 or an SSE error event.
    #[arg(long, value_parser = parse_timeout, default_value = "none")]
    pub first_token_timeout: Timeout,
    /// Inter-token limit (`none`, `200ms`, ...).
    #[arg(long, value_parser = parse_timeout, default_value = "none")]
    pub inter_token_timeout: Timeout,
    /// How long a shutdown lets in-flight requests finish before killing them.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
    /// Longest prompt accepted, in tokens (default: 4096; tiny: its context;
    /// llama-cpp: `--ctx-size` less one).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Largest `max_tokens` accepted.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: u32,
    /// `max_tokens` of requests that set none.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: u32,
    /// How long `/health/canary` waits for its canary (`/health` itself never waits).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub health_timeout: Duration,
    /// Interval of the SSE keep-alive comments a streamed response sends while the
    /// engine is silent (they keep proxies' idle timers from cutting the stream and
    /// reveal a client that is gone).
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub sse_keep_alive: Duration,
    /// Pass clients' `chaos:` annotations to the engine (testing only).
    #[arg(long)]
    pub allow_chaos: bool,
    /// SimEngine: time of one decode step, in microseconds.
    #[arg(long, default_value_t = 1000)]
    pub step_us: u64,
    /// SimEngine: prefill time per prompt token, in nanoseconds (a step that admits a
    /// prompt takes that much longer, and sends nothing meanwhile).
    #[arg(long, default_value_t = 1000)]
    pub prefill_ns: u64,
    /// Engine: sequences in the batch; more requests wait in the engine's queue
    /// [default: 256; 32 with --engine tiny; 8 with --engine llama-cpp].
    #[arg(long)]
    pub max_seqs: Option<usize>,
    /// Seed of the engine (SimEngine's tokens, TinyEngine's weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Export the `engine.generate` spans over OTLP/HTTP to this collector
    /// (`http://host:4318`; `/v1/traces` is added unless present). Needs the `otel`
    /// feature.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,

    // Who may call the server (see `super::auth`).
    /// Require `Authorization: Bearer KEY` on every `/v1/*`, `/tokenize` and
    /// `/detokenize` request (401 otherwise); `/health`, `/ping`, `/metrics` and
    /// `/version` stay open. Also read from `TETHER_API_KEY` (preferred: a flag shows
    /// in the process list).
    #[arg(
        long,
        value_name = "KEY",
        env = "TETHER_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<ApiKey>,
    /// Allow browsers on ORIGIN (`https://app.example:8443`) to call the server
    /// (CORS); repeatable; `*` for any origin. Default: CORS off (no CORS headers).
    #[arg(long = "cors-allow-origin", value_name = "ORIGIN")]
    pub cors_allow_origins: Vec<String>,

    // Connections (`super::conn`).
    /// Time a client that began sending a request head has to complete it, or its
    /// connection is closed (slowloris).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection with no request in flight and nothing received is
    /// kept open (above nginx's 60 s upstream keep-alive, so a proxy closes first).
    #[arg(long, value_parser = parse_duration, default_value = "75s")]
    pub idle_timeout: Duration,
    /// Time a write to a client that stopped reading may stay pending before its
    /// connection is closed and its request killed.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub write_timeout: Duration,
    /// Open connections at most; more get a 503 and are closed (default: the
    /// open-file soft limit minus 64, at most 4096; 1024 if unknown).
    #[arg(long)]
    pub max_connections: Option<usize>,
}

impl ServeArgs {
    /// The server configuration these arguments ask for.
    pub fn config(&self) -> ServeConfig {
        let max_prompt_tokens = self.max_prompt_tokens.unwrap_or(match self.engine.kind {
            EngineKind::Sim => 4096,
            EngineKind::Tiny => TinyConfig::default().max_context,
            EngineKind::LlamaCpp => self.engine_spec().llama.n_ctx.saturating_sub(1) as usize,
        });
        ServeConfig {
            model: self.served_model_name.clone(),
            first_token_timeout: self.first_token_timeout.0,
            inter_token_timeout: self.inter_token_timeout.0,
            shutdown_grace: self.shutdown_grace,
            max_prompt_tokens,
            max_tokens_limit: self.max_tokens_limit,
            default_max_tokens: self.default_max_tokens,
            allow_chaos: self.allow_chaos,
            health_timeout: self.health_timeout,
            keep_alive: self.sse_keep_alive,
            api_key: self.api_key.clone(),
            cors_allow_origins: self.cors_allow_origins.clone(),
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            write_timeout: self.write_timeout,
            max_connections: self
                .max_connections
                .unwrap_or_else(super::conn::default_max_connections),
        }
    }

    /// The engine these arguments ask for.
    pub fn engine_spec(&self) -> EngineSpec {
        let spec = self.engine.spec();
        EngineSpec {
            sim: SimConfig {
                // ASCII only: every token decodes to a character on its own.
                vocab_size: 128,
                decode_step_cost: Duration::from_micros(self.step_us),
                prefill_cost_per_token: Duration::from_nanos(self.prefill_ns),
                max_sequences: self.max_seqs.unwrap_or(spec.sim.max_sequences),
                seed: self.seed,
                ..spec.sim
            },
            tiny: TinyConfig {
                seed: self.seed,
                max_sequences: self.max_seqs.unwrap_or(spec.tiny.max_sequences),
                ..spec.tiny
            },
            llama: LlamaSpec {
                max_sequences: self.max_seqs.unwrap_or(spec.llama.max_sequences),
                default_max_tokens: self.default_max_tokens,
                ..spec.llama
            },
            ..spec
        }
    }

    /// Build the engine these arguments ask for, on `runtime`, logging every abort it
    /// receives ([`log_engine_abort`]).
    pub fn engine(&self, runtime: Arc<dyn Runtime>) -> Result<ServedEngine, ServeError> {
        let hook: AbortHook = Arc::new(log_engine_abort);
        let engine = self
            .engine_spec()
            .build(runtime, Some(hook))
            .map_err(ServeError::EngineBuild)?;
        ServedEngine::of(engine).map_err(ServeError::InvalidOptions)
    }
}

/// The target of [`log_engine_abort`]'s event.
pub const ENGINE_LOG_TARGET: &str = "tether::engine";

/// The engine's side of an abort, logged by the engine itself the moment it handled
/// it: a debug event `engine abort received` (target [`ENGINE_LOG_TARGET`]) with the
/// `request_id` and what the abort found (`receipt`: `live`, `after_end` or `late`).
/// Its timestamp, against the moment a client went away, is the disconnect-to-abort
/// latency `deploy/nginx/e2e` measures through a proxy (`RUST_LOG=tether::engine=debug`).
pub fn log_engine_abort(request_id: &str, receipt: AbortReceipt) {
    let receipt = match receipt {
        AbortReceipt::Live => "live",
        AbortReceipt::AfterEnd => "after_end",
        AbortReceipt::Late => "late",
    };
    tracing::debug!(
        target: ENGINE_LOG_TARGET,
        request_id = %request_id,
        receipt,
        "engine abort received"
    );
}

/// A background smol executor for the adapter and the engine, stopped on drop.
struct SmolPool {
    stop: smol::channel::Sender<()>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl SmolPool {
    fn start(threads: usize) -> Result<(SmolPool, Arc<dyn Runtime>), ServeError> {
        let ex = Arc::new(smol::Executor::new());
        let (stop, stopped) = smol::channel::unbounded::<()>();
        let mut workers = Vec::with_capacity(threads);
        for n in 0..threads.max(1) {
            let ex = ex.clone();
            let stopped = stopped.clone();
            let worker = std::thread::Builder::new()
                .name(format!("smol-{n}"))
                .spawn(move || {
                    let _ = smol::block_on(ex.run(stopped.recv()));
                })
                .map_err(|source| ServeError::Io {
                    context: "cannot start the smol threads",
                    source,
                })?;
            workers.push(worker);
        }
        let rt: Arc<dyn Runtime> = Arc::new(tether_smol::SmolRuntime::with_executor(ex));
        Ok((SmolPool { stop, workers }, rt))
    }
}

impl Drop for SmolPool {
    fn drop(&mut self) {
        self.stop.close();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// SIGINT and SIGTERM, caught from the moment they are installed (before the server
/// says it listens, so a signal sent right after that line is never fatal).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, ServeError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let io = |source| ServeError::Io {
                context: "cannot install the signal handlers",
                source,
            };
            Ok(Signals {
                term: signal(SignalKind::terminate()).map_err(io)?,
                int: signal(SignalKind::interrupt()).map_err(io)?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Wait for one; returns its name.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "ctrl-c"
        }
    }
}

/// Run `tether serve` until SIGINT or SIGTERM, then shut down gracefully. Prints
/// `tether serve: listening on http://ADDR` on stdout once it accepts connections, and
/// its logs on stderr ([`super::logging`]: filtered by `RUST_LOG`, a bad filter is an
/// [`ServeError::InvalidOptions`]).
///
/// A second SIGINT or SIGTERM during the shutdown ends it at once, without waiting for
/// the requests in flight or the engine's cleanup: it prints a line saying so and
/// returns [`ServeError::ForcedExit`].
pub fn run(args: &ServeArgs) -> Result<(), ServeError> {
    let threads = args.threads.unwrap_or_else(runtime::default_threads).max(1);
    args.engine_spec()
        .validate()
        .map_err(ServeError::InvalidOptions)?;
    if args.otlp_endpoint.is_some() && cfg!(not(feature = "otel")) {
        return Err(ServeError::InvalidOptions(
            "--otlp-endpoint needs a tether built with the `otel` feature".to_owned(),
        ));
    }
    // Built before the runtime: the OTLP exporter's blocking HTTP client must not be
    // created (or dropped) inside an async context. One subscriber carries the log
    // lines and, with `--otlp-endpoint`, the OTLP layer.
    #[cfg(feature = "otel")]
    let otel = match &args.otlp_endpoint {
        Some(url) => Some(super::otel::install_otlp(url)?),
        None => {
            super::logging::install(None)?;
            None
        }
    };
    #[cfg(not(feature = "otel"))]
    super::logging::install(None)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            context: "cannot build the tokio runtime",
            source,
        })?;
    let (pool, engine_rt) = match args.runtime {
        RuntimeKind::Tokio => {
            let rt: Arc<dyn Runtime> =
                Arc::new(tether_tokio::TokioRuntime::new(rt.handle().clone()));
            (None, rt)
        }
        RuntimeKind::Smol => {
            let (pool, rt) = SmolPool::start(threads)?;
            (Some(pool), rt)
        }
    };
    let result = rt.block_on(async {
        let mut signals = Signals::install()?;
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .map_err(|source| ServeError::Io {
                context: "cannot listen",
                source,
            })?;
        let engine = args.engine(engine_rt.clone())?;
        let server = super::start(engine, engine_rt, listener, args.config()).await?;
        println!(
            "tether serve: listening on http://{} (model `{}`, engine {}, runtime {})",
            server.local_addr(),
            server.model(),
            args.engine_spec().describe(),
            args.runtime
        );
        let signal = signals.recv().await;
        eprintln!(
            "tether serve: {signal}: shutting down (grace {:?})",
            args.shutdown_grace
        );
        server.shutdown();
        let report = tokio::select! {
            report = server.wait() => report,
            again = signals.recv() => {
                eprintln!(
                    "tether serve: {again} during the shutdown: exiting now, without waiting \
                     for requests in flight or the engine's cleanup"
                );
                return Err(ServeError::ForcedExit { signal: again });
            }
        };
        eprintln!(
            "tether serve: stopped (in-flight killed: {}, drained: {}, engine cleanup: {})",
            report.killed_in_flight,
            report.drained,
            match &report.cleanup {
                Ok(()) => "ok".to_owned(),
                Err(e) => e.to_string(),
            }
        );
        report.cleanup.map_err(ServeError::Cleanup)
    });
    if matches!(result, Err(ServeError::ForcedExit { .. })) {
        // Asked to exit now: do not wait for the tasks still running either.
        rt.shutdown_background();
    } else {
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    drop(pool);
    #[cfg(feature = "otel")]
    if let Some(otel) = otel {
        otel.shutdown();
    }
    result
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn spec_of(args: &[&str]) -> EngineSpec {
        let argv = std::iter::once("serve").chain(args.iter().copied());
        Cli::try_parse_from(argv).unwrap().args.engine_spec()
    }

    #[test]
    fn engine_flags_reach_the_engines_config() {
        let default = spec_of(&[]);
        assert_eq!(
            default.sim.max_sequences,
            SimConfig::default().max_sequences
        );
        assert_eq!(
            default.sim.prefill_cost_per_token,
            Duration::from_nanos(1000)
        );
        assert_eq!(default.sim.decode_step_cost, Duration::from_micros(1000));
        assert_eq!(
            default.tiny.max_sequences,
            TinyConfig::default().max_sequences
        );
        let set = spec_of(&[
            "--max-seqs",
            "3",
            "--prefill-ns",
            "250000",
            "--step-us",
            "5000",
        ]);
        assert_eq!(set.sim.max_sequences, 3);
        assert_eq!(set.sim.prefill_cost_per_token, Duration::from_micros(250));
        assert_eq!(set.sim.decode_step_cost, Duration::from_millis(5));
        assert_eq!(set.tiny.max_sequences, 3);
    }
}
