//! `tether load`, the main job: drives N requests at concurrency C through the
//! [`Adapter`] against an engine ([`SimEngine`](tether_engines::SimEngine) by default,
//! or [`TinyEngine`](tether_engines::TinyEngine)) on tokio or smol, with a seeded chaos
//! plan (client stop, kill and drop at a random chunk; with SimEngine also engine
//! error, hang and panic at a random step), then checks every request against its plan
//! and proves that nothing leaked: engine sequences, KV blocks (SimEngine) or KV bytes
//! (TinyEngine), queue, in-flight requests and spawned tasks all back to zero.
//!
//! The invariants checked per request: exactly one record; exactly one terminal seen
//! by the client, as the last item (none when it dropped the stream); an outcome the
//! plan allows and that matches the terminal; at most one abort, each one sent by the
//! adapter received by the engine, none of them late, and as many as the plan calls
//! for.
//!
//! ```no_run
//! let opts = tether_cli::load::LoadOptions { requests: 1000, ..Default::default() };
//! let report = tether_cli::load::run(&opts, false).expect("valid options");
//! assert!(report.passed(), "{}", report.table());
//! ```

mod args;
mod client;
pub mod http;
mod ledger;
pub mod plan;
mod report;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tether_core::drive::CountingRuntime;
use tether_core::protocol::Mode;
use tether_core::{Adapter, AdapterConfig, Runtime};
use tether_engines::{SimConfig, TinyConfig};

pub use args::{
    misplaced_flags, parse_chaos, parse_duration, parse_timeout, LoadArgs, Timeout, UrlArgs,
};
pub use plan::{Action, ChaosRates, HangRange, PlanCounts};
pub use report::{Leaks, Outcomes, Percentiles, Report, SHOWN_VIOLATIONS};

use crate::engine::{EngineKind, EngineSpec, LlamaSpec, StartError};
use crate::runtime::{self, RuntimeKind};
use client::{Clients, WorkerOut};
use ledger::Ledger;

/// Everything a load run needs. `Default` is the command line's defaults (SimEngine);
/// [`LoadOptions::for_engine`] gives each engine's.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The engine: [`LoadOptions::sim`] or [`LoadOptions::tiny`] configures it.
    pub engine: EngineKind,
    /// Requests to run.
    pub requests: usize,
    /// Requests in flight at once (at least 1).
    pub concurrency: usize,
    /// The runtime ([`run`] builds it; [`run_on`] is given one).
    pub runtime: RuntimeKind,
    /// Worker threads of the runtime [`run`] builds.
    pub threads: usize,
    /// The adapter's mode.
    pub mode: Mode,
    /// Tokens each request asks for.
    pub max_tokens: u32,
    /// Prompt lengths are drawn from this range (inclusive).
    pub prompt_tokens: (u32, u32),
    /// The chaos mix (TinyEngine takes client chaos only: stop, kill, drop).
    pub chaos: ChaosRates,
    /// Seed of the plan and of the engine's tokens.
    pub seed: u64,
    /// The adapter's time-to-first-token limit.
    pub first_token_timeout: Option<Duration>,
    /// The adapter's inter-token limit.
    pub inter_token_timeout: Option<Duration>,
    /// The adapter's decode-mode abort deferral deadline.
    pub deferral_deadline: Duration,
    /// SimEngine's configuration (its `seed` is replaced by [`LoadOptions::seed`]).
    pub sim: SimConfig,
    /// TinyEngine's configuration, its device included (its `seed` is replaced by
    /// [`LoadOptions::seed`]).
    pub tiny: TinyConfig,
    /// llama.cpp's (`--model`, `--ctx-size`, ...).
    pub llama: LlamaSpec,
    /// How long to wait for in-flight aborts and tasks once the requests are done.
    pub settle_timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            engine: EngineKind::Sim,
            requests: 10_000,
            concurrency: 256,
            runtime: RuntimeKind::Tokio,
            threads: runtime::default_threads(),
            mode: Mode::Aggregated,
            max_tokens: 16,
            prompt_tokens: (8, 64),
            chaos: ChaosRates::default(),
            seed: 0,
            first_token_timeout: None,
            inter_token_timeout: Some(Duration::from_millis(200)),
            deferral_deadline: Duration::from_millis(50),
            sim: SimConfig::default(),
            tiny: TinyConfig::default(),
            llama: LlamaSpec::default(),
            settle_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a load run could not run (broken invariants are not errors: they are in the
/// [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The options make no sense; the message says which and why.
    #[error("{0}")]
    InvalidOptions(String),
    /// The runtime could not be built.
    #[error("cannot build the runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// The engine did not start (an unavailable device is a usage error).
    #[error("{0}")]
    Engine(#[from] StartError),
    /// `--url`: the server could not be asked for its model.
    #[error("{0}")]
    Unreachable(String),
}

impl LoadError {
    /// Whether the arguments were at fault (exit code 2).
    pub fn is_usage(&self) -> bool {
        match self {
            LoadError::InvalidOptions(_) => true,
            LoadError::Engine(e) => e.is_usage(),
            LoadError::Runtime(_) | LoadError::Unreachable(_) => false,
        }
    }
}

impl LoadOptions {
    /// The defaults for `engine`. TinyEngine does real compute (about 15,000 tokens/s
    /// on one CPU core), so by default it runs 1000 requests, has no engine faults, and
    /// allows 2 s between tokens (a busy host must not fire the limit; it still
    /// catches a stuck engine). llama.cpp runs 200 requests, no engine faults, 10 s
    /// between tokens.
    pub fn for_engine(engine: EngineKind) -> LoadOptions {
        match engine {
            EngineKind::Sim => LoadOptions::default(),
            EngineKind::Tiny => LoadOptions {
                engine,
                requests: 1000,
                chaos: ChaosRates::default().without_engine_faults(),
                inter_token_timeout: Some(Duration::from_secs(2)),
                ..LoadOptions::default()
            },
            // A real model on the CPU: fewer requests, and 10 s between tokens (a
            // step of a large batch can take a while; a stuck engine is still caught).
            EngineKind::LlamaCpp => LoadOptions {
                engine,
                requests: 200,
                chaos: ChaosRates::default().without_engine_faults(),
                inter_token_timeout: Some(Duration::from_secs(10)),
                ..LoadOptions::default()
            },
        }
    }

    /// Where hangs may be placed: a hang at step 0 needs a first-token timeout, a later
    /// one an inter-token timeout. `None` when no timeout would ever end a hang.
    pub fn hang_range(&self) -> Option<HangRange> {
        let n = self.max_tokens;
        match (self.first_token_timeout, self.inter_token_timeout) {
            (Some(_), Some(_)) => Some(HangRange { from: 0, to: n }),
            (Some(_), None) => Some(HangRange {
                from: 0,
                to: n.min(1),
            }),
            (None, Some(_)) => Some(HangRange { from: 1, to: n }),
            (None, None) => None,
        }
    }

    /// The seeded plan of this run and its counts.
    pub fn plan(&self) -> (Vec<plan::Planned>, PlanCounts) {
        plan::plan_all(
            self.seed,
            self.requests,
            &self.chaos,
            self.max_tokens,
            self.prompt_tokens,
            self.hang_range(),
        )
    }

    /// The engine this run builds: both seeds are [`LoadOptions::seed`].
    pub fn engine_spec(&self) -> EngineSpec {
        EngineSpec {
            kind: self.engine,
            sim: SimConfig {
                seed: self.seed,
                ..self.sim.clone()
            },
            tiny: TinyConfig {
                seed: self.seed,
                ..self.tiny.clone()
            },
            llama: self.llama.clone(),
        }
    }

    /// Check the options; the error says what to change.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |msg: String| Err(LoadError::InvalidOptions(msg));
        if self.concurrency == 0 {
            return bad("--concurrency must be at least 1".to_owned());
        }
        if self.threads == 0 {
            return bad("--threads must be at least 1".to_owned());
        }
        for (name, rate) in self.chaos.named() {
            if !(0.0..=1.0).contains(&rate) {
                return bad(format!("--{name} must be a fraction in 0..1, got {rate}"));
            }
        }
        let total = self.chaos.total();
        if total > 1.0 + 1e-9 {
            return bad(format!(
                "the chaos fractions add up to {total}, more than 1 (each request gets at most one kind)"
            ));
        }
        let faults = self.chaos.engine_faults();
        if self.engine != EngineKind::Sim && !faults.is_empty() {
            return bad(format!(
                "--engine {} cannot inject engine faults ({}): error, hang and panic chaos \
                 need --engine sim; set them to 0 ({} takes stop, kill and drop)",
                self.engine,
                faults.join(", "),
                self.engine
            ));
        }
        if self.chaos.hang > 0.0 {
            match self.hang_range() {
                None => {
                    return bad("--hang needs a timeout to end the hung requests: set \
                         --inter-token-timeout or --first-token-timeout (or --hang 0)"
                        .to_owned())
                }
                Some(r) if r.to <= r.from => {
                    return bad(format!(
                        "--hang cannot be placed with --max-tokens {}: a hang after the first \
                         token needs --max-tokens of at least 2, one before it \
                         --first-token-timeout",
                        self.max_tokens
                    ))
                }
                Some(_) => {}
            }
        }
        if self.prompt_tokens.0 == 0 || self.prompt_tokens.0 > self.prompt_tokens.1 {
            return bad(format!(
                "prompt lengths {}..={} must be a non-empty range starting at 1 or more",
                self.prompt_tokens.0, self.prompt_tokens.1
            ));
        }
        let spec = self.engine_spec();
        spec.validate().map_err(LoadError::InvalidOptions)?;
        let longest = self.prompt_tokens.1 as usize + self.max_tokens as usize;
        match self.engine {
            EngineKind::Sim if spec.sim.blocks_for(longest) > spec.sim.kv_blocks => bad(format!(
                "a request of {longest} tokens needs {} kv blocks, the engine has {}",
                spec.sim.blocks_for(longest),
                spec.sim.kv_blocks
            )),
            // Longer would end with `Length` before `max_tokens`, which no plan expects.
            EngineKind::Tiny if longest > spec.tiny.max_context => bad(format!(
                "a request of {longest} tokens (--prompt-max plus --max-tokens) does not fit \
                 TinyEngine's context of {}",
                spec.tiny.max_context
            )),
            EngineKind::LlamaCpp if longest > spec.llama.n_ctx as usize => bad(format!(
                "a request of {longest} tokens (--prompt-max plus --max-tokens) does not fit \
                 the llama.cpp context of {} (--ctx-size)",
                spec.llama.n_ctx
            )),
            EngineKind::Sim | EngineKind::Tiny | EngineKind::LlamaCpp => Ok(()),
        }
    }
}

/// Build the runtime `opts` asks for and run the load on it, with a progress bar on
/// stderr if `progress` is set and stderr is a terminal.
pub fn run(opts: &LoadOptions, progress: bool) -> Result<Report, LoadError> {
    opts.validate()?;
    let bar = if progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        progress_bar(opts.requests)
    } else {
        ProgressBar::hidden()
    };
    runtime::block_on(opts.runtime, opts.threads, |rt| run_on(opts, rt, bar))?
}

fn progress_bar(requests: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(requests as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} requests ({rate}, eta {eta})",
    ) {
        bar.set_style(style.with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} req/s", state.per_sec());
            },
        ));
    }
    bar
}

/// Run the load on `runtime` (which must be the runtime polling this future: the
/// clients, the engine's scheduler and the aborts are spawned on it).
pub async fn run_on(
    opts: &LoadOptions,
    runtime: Arc<dyn Runtime>,
    progress: ProgressBar,
) -> Result<Report, LoadError> {
    opts.validate()?;
    let (plan, plan_counts) = opts.plan();
    let ledger = Arc::new(Ledger::new(opts.requests));
    // Separate counters: the adapter's tasks must be gone once the requests settled,
    // the engine's scheduler once it is cleaned up.
    let adapter_rt = CountingRuntime::new(runtime.clone());
    let engine_rt = CountingRuntime::new(runtime.clone());
    let (adapter_tasks, engine_tasks) = (adapter_rt.clone(), engine_rt.clone());
    let spec = opts.engine_spec();
    let hook_ledger = ledger.clone();
    let engine = spec.build(
        engine_rt,
        Some(Arc::new(move |id, receipt| {
            hook_ledger.engine_abort(id, receipt);
        })),
    )?;
    let started = engine.start(0).await?;
    let adapter = Adapter::new(
        engine.llm(),
        adapter_rt,
        AdapterConfig::default()
            .mode(opts.mode)
            .deferral_deadline(opts.deferral_deadline)
            .first_token_timeout(opts.first_token_timeout)
            .inter_token_timeout(opts.inter_token_timeout)
            .observer(ledger.clone()),
    );
    let clients = Arc::new(Clients {
        adapter,
        runtime: runtime.clone(),
        plan,
        ledger: ledger.clone(),
        model: started.model,
        max_tokens: opts.max_tokens,
        vocab: engine.vocab_size(),
        // A real model emits its end-of-sequence token now and then; the plan expects
        // every unstopped request to run to `max_tokens`.
        ignore_eos: opts.engine == EngineKind::LlamaCpp,
        progress: progress.clone(),
        next: AtomicUsize::new(0),
    });

    let t0 = runtime.now();
    let workers = opts.concurrency.min(opts.requests);
    let (done_tx, done_rx) = smol::channel::unbounded::<WorkerOut>();
    for _ in 0..workers {
        let clients = clients.clone();
        let done_tx = done_tx.clone();
        runtime.spawn(Box::pin(async move {
            let out = client::worker(clients).await;
            let _ = done_tx.send(out).await;
        }));
    }
    drop(done_tx);
    let mut gaps_us = Vec::new();
    let mut tokens = 0u64;
    while let Ok(out) = done_rx.recv().await {
        gaps_us.extend(out.gaps_us);
        tokens += out.tokens;
    }
    let elapsed = runtime.now().saturating_duration_since(t0);
    progress.finish_and_clear();

    // Settle: the aborts (and deferred aborts) still on their way land, the engine
    // frees what they free. A bounded wait on the runtime's timer.
    let settle = opts.settle_timeout + opts.deferral_deadline;
    runtime::wait_until(&*runtime, settle, || {
        let g = engine.gauges();
        // The adapter's abort task, once started, stays until the adapter goes.
        adapter_tasks.live() <= clients.adapter.background_tasks()
            && g.live_sequences == 0
            && g.queue_len == 0
            && g.kv_sequences == 0
            && g.aborts_received == ledger.aborts_sent()
    })
    .await;
    let gauges = engine.gauges();
    let (mut violations, mut totals) = ledger.check(&clients.plan, opts.mode, opts.max_tokens);
    // The last handle on the adapter goes: its abort task ends with it, so every task
    // the adapter spawned must now end.
    drop(clients);
    runtime::wait_until(&*runtime, opts.settle_timeout, || adapter_tasks.live() == 0).await;
    let adapter_alive = adapter_tasks.live();
    let _ = engine.llm().cleanup().await;
    runtime::wait_until(&*runtime, opts.settle_timeout, || engine_tasks.live() == 0).await;
    // Read before the cleanup, which frees everything.
    let leaks = Leaks {
        engine_slots: gauges.live_sequences as u64,
        kv_blocks: gauges.kv_blocks as u64,
        kv_bytes: gauges.kv_bytes as u64,
        kv_cells: gauges.kv_cells as u64,
        kv_sequences: gauges.kv_sequences as u64,
        queue: gauges.queue_len as u64,
        in_flight: ledger.in_flight(),
        tasks: (adapter_alive + engine_tasks.live()) as u64,
    };
    if gauges.late_aborts > 0 {
        violations.push(format!(
            "the engine received {} late aborts",
            gauges.late_aborts
        ));
    }
    if !leaks.is_clean() {
        violations.push(format!("leak after settling: {leaks:?}"));
    }
    let outcome = |k: &str| totals.outcomes.get(k).copied().unwrap_or(0);
    let secs = elapsed.as_secs_f64();
    let rate = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
    let mut itl: Vec<f64> = gaps_us.iter().map(|&g| f64::from(g) / 1000.0).collect();
    Ok(Report {
        engine: opts.engine,
        device: (opts.engine == EngineKind::Tiny).then(|| opts.tiny.device.to_string()),
        runtime: opts.runtime,
        mode: opts.mode.as_str().to_owned(),
        requests: opts.requests as u64,
        concurrency: opts.concurrency as u64,
        seed: opts.seed,
        max_tokens: opts.max_tokens,
        plan: plan_counts,
        outcomes: Outcomes {
            finished: outcome("finished"),
            cancelled: outcome("cancelled"),
            failed: outcome("failed"),
            dropped: outcome("dropped"),
            timed_out: outcome("timed_out"),
        },
        finish_reasons: std::mem::take(&mut totals.finish_reasons),
        failures: std::mem::take(&mut totals.failures),
        aborts_sent: ledger.aborts_sent(),
        aborts_received: gauges.aborts_received,
        aborts_expected: totals.aborts_expected,
        late_aborts: gauges.late_aborts,
        ttft_ms: Percentiles::of(&mut totals.ttft_ms),
        itl_ms: Percentiles::of(&mut itl),
        elapsed_s: secs,
        tokens,
        requests_per_s: rate(opts.requests as f64),
        tokens_per_s: rate(tokens as f64),
        tasks_spawned: adapter_tasks.spawned() as u64,
        engine_lingering: gauges.lingering as u64,
        leaks,
        violations,
    })
}
