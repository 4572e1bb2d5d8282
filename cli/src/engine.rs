//! The engine every command runs: the `--engine sim|tiny|llama-cpp`, `--device` and
//! `--model` flags ([`EngineArgs`]), what to build ([`EngineSpec`]), the one
//! constructor that `tether load`, `tether serve` and `tether conformance` share
//! ([`EngineSpec::build`]), and one view of every engine's gauges ([`Gauges`]).
//!
//! `--engine llama-cpp` needs a tether built with the `llama-cpp` feature; without it,
//! the choice is a usage error that says how to build one.
//!
//! Owns the choice, the construction and the start of an engine (a missing device is
//! told apart from other start failures: it is a usage error); what a command does
//! with the engine is the command's.

use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;

use tether_core::engine::EngineConfig;
use tether_core::error::ErrorKind;
use tether_core::{EngineError, LlmEngine, Runtime};
use tether_engines::{AbortHook, Device, SimConfig, SimEngine, TinyConfig, TinyEngine};

/// The engines the `tether` commands can run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// SimEngine: a continuous-batching simulator with chaos hooks (random tokens).
    #[default]
    Sim,
    /// TinyEngine: a tiny real transformer over byte tokens, weights from a seed.
    Tiny,
    /// llama.cpp serving a GGUF model (`--model FILE`; needs the `llama-cpp` feature).
    #[value(name = "llama-cpp")]
    #[serde(rename = "llama-cpp")]
    LlamaCpp,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Sim => "sim",
            EngineKind::Tiny => "tiny",
            EngineKind::LlamaCpp => "llama-cpp",
        })
    }
}

/// `--engine`, `--device`, `--model` and llama.cpp's flags, the same in every command.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct EngineArgs {
    /// Engine: `sim` (continuous-batching simulator), `tiny` (a tiny real transformer)
    /// or `llama-cpp` (a GGUF model; needs the `llama-cpp` feature).
    #[arg(long = "engine", value_name = "ENGINE", value_enum, default_value_t = EngineKind::Sim)]
    pub kind: EngineKind,
    /// TinyEngine: where the model runs (`cpu`, `cuda`, `cuda:N`; CUDA needs a tether
    /// built with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// The model: with `--engine llama-cpp`, the GGUF file to load (required); with
    /// `sim` or `tiny`, the name the engine serves (default: `sim`, `tiny`); with
    /// `tether load --url`, the model to ask for (default: the first id of
    /// `GET /v1/models`).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// llama-cpp: KV cells of the one context, shared by all sequences [default: 4096].
    #[arg(long, value_name = "CELLS")]
    pub ctx_size: Option<u32>,
    /// llama-cpp: tokens one step decodes at most (decode tokens plus prompt chunks);
    /// an abort waits for at most one step [default: 256].
    #[arg(long, value_name = "TOKENS")]
    pub batch_size: Option<usize>,
    /// llama-cpp: CPU threads llama.cpp computes with [default: every core].
    #[arg(long, value_name = "N")]
    pub compute_threads: Option<NonZeroUsize>,
}

impl Default for EngineArgs {
    fn default() -> Self {
        EngineArgs {
            kind: EngineKind::Sim,
            device: Device::Cpu,
            model: None,
            ctx_size: None,
            batch_size: None,
            compute_threads: None,
        }
    }
}

impl EngineArgs {
    /// What these flags ask for, with each engine's default configuration.
    pub fn spec(&self) -> EngineSpec {
        let name = |default: String| match self.kind {
            EngineKind::LlamaCpp => default,
            EngineKind::Sim | EngineKind::Tiny => self.model.clone().unwrap_or(default),
        };
        let sim = SimConfig::default();
        let tiny = TinyConfig::default();
        let llama = LlamaSpec::default();
        EngineSpec {
            kind: self.kind,
            sim: SimConfig {
                model: name(sim.model.clone()),
                ..sim
            },
            tiny: TinyConfig {
                device: self.device,
                model: name(tiny.model.clone()),
                ..tiny
            },
            llama: LlamaSpec {
                model: match self.kind {
                    EngineKind::LlamaCpp => self.model.as_ref().map(PathBuf::from),
                    EngineKind::Sim | EngineKind::Tiny => None,
                },
                n_ctx: self.ctx_size.unwrap_or(llama.n_ctx),
                batch_tokens: self.batch_size.unwrap_or(llama.batch_tokens),
                threads: self.compute_threads,
                llama_flags: self.ctx_size.is_some()
                    || self.batch_size.is_some()
                    || self.compute_threads.is_some(),
                ..llama
            },
        }
    }
}

/// What `--engine llama-cpp` loads and how it batches (plain data, built with or
/// without the `llama-cpp` feature).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlamaSpec {
    /// The GGUF file (`--model`).
    pub model: Option<PathBuf>,
    /// KV cells of the context (`--ctx-size`).
    pub n_ctx: u32,
    /// Sequences in the batch (`--max-seqs`).
    pub max_sequences: usize,
    /// Tokens per step (`--batch-size`).
    pub batch_tokens: usize,
    /// `max_tokens` of a request that sets none.
    pub default_max_tokens: u32,
    /// llama.cpp's CPU threads (`--compute-threads`).
    pub threads: Option<NonZeroUsize>,
    /// Whether a llama.cpp flag was given (an error with another engine).
    pub llama_flags: bool,
}

impl Default for LlamaSpec {
    fn default() -> Self {
        LlamaSpec {
            model: None,
            n_ctx: 4096,
            max_sequences: 8,
            batch_tokens: 256,
            default_max_tokens: 256,
            threads: None,
            llama_flags: false,
        }
    }
}

#[cfg(feature = "llama-cpp")]
impl LlamaSpec {
    /// The engine's configuration (`None` without a model file).
    fn config(&self) -> Option<tether_engines::LlamaCppConfig> {
        let path = self.model.clone()?;
        Some(tether_engines::LlamaCppConfig {
            n_ctx: self.n_ctx,
            max_sequences: self.max_sequences,
            batch_tokens: self.batch_tokens,
            default_max_tokens: self.default_max_tokens,
            threads: self.threads,
            ..tether_engines::LlamaCppConfig::new(path)
        })
    }
}

/// What to build: which engine, and the configuration of each (only the chosen one's
/// is used; TinyEngine's device is [`TinyConfig::device`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineSpec {
    /// The engine.
    pub kind: EngineKind,
    /// SimEngine's configuration.
    pub sim: SimConfig,
    /// TinyEngine's configuration.
    pub tiny: TinyConfig,
    /// llama.cpp's.
    pub llama: LlamaSpec,
}

/// What `--engine llama-cpp` says without the `llama-cpp` feature.
pub const LLAMA_CPP_NOT_BUILT: &str = "--engine llama-cpp needs a tether built with the \
     `llama-cpp` feature: cargo build --release -p tether-cli --features llama-cpp \
     (it builds llama.cpp with cmake; libclang is needed too)";

impl EngineSpec {
    /// Check the chosen engine's configuration; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.kind != EngineKind::Tiny && self.tiny.device != Device::Cpu {
            return Err(format!(
                "--device {} needs --engine tiny ({} has no device)",
                self.tiny.device,
                match self.kind {
                    EngineKind::LlamaCpp => "the llama.cpp engine runs on the CPU and",
                    EngineKind::Sim | EngineKind::Tiny => "SimEngine",
                }
            ));
        }
        if self.kind != EngineKind::LlamaCpp && self.llama.llama_flags {
            return Err(
                "--ctx-size, --batch-size and --compute-threads need --engine llama-cpp".to_owned(),
            );
        }
        match self.kind {
            EngineKind::Sim => self
                .sim
                .validate()
                .map_err(|e| format!("engine configuration: {e}")),
            EngineKind::Tiny => self
                .tiny
                .validate()
                .map_err(|e| format!("engine configuration: {e}")),
            EngineKind::LlamaCpp => self.validate_llama(),
        }
    }

    #[cfg(not(feature = "llama-cpp"))]
    fn validate_llama(&self) -> Result<(), String> {
        Err(LLAMA_CPP_NOT_BUILT.to_owned())
    }

    #[cfg(feature = "llama-cpp")]
    fn validate_llama(&self) -> Result<(), String> {
        let Some(config) = self.llama.config() else {
            return Err("--engine llama-cpp needs --model FILE, a GGUF model".to_owned());
        };
        config
            .validate()
            .map_err(|e| format!("engine configuration: {e}"))
    }

    /// The chosen engine, for humans: `sim`, `tiny on cpu`, `tiny on cuda:0`.
    pub fn describe(&self) -> String {
        match self.kind {
            EngineKind::Sim => "sim".to_owned(),
            EngineKind::Tiny => format!("tiny on {}", self.tiny.device),
            EngineKind::LlamaCpp => match &self.llama.model {
                Some(path) => format!("llama-cpp ({})", path.display()),
                None => "llama-cpp".to_owned(),
            },
        }
    }

    /// Build the engine (not started) on `runtime`, telling `abort_hook` about every
    /// abort it receives. Only llama.cpp's can fail here: it loads the model file (and
    /// is not built without the `llama-cpp` feature). llama.cpp computes on a thread
    /// of its own, not on `runtime`.
    pub fn build(
        &self,
        runtime: impl Runtime,
        abort_hook: Option<AbortHook>,
    ) -> Result<Engine, StartError> {
        Ok(match self.kind {
            EngineKind::Sim => {
                let engine = SimEngine::new(self.sim.clone(), runtime);
                Engine::Sim(Arc::new(match abort_hook {
                    Some(hook) => engine.with_abort_hook(hook),
                    None => engine,
                }))
            }
            EngineKind::Tiny => {
                let engine = TinyEngine::new(self.tiny.clone(), runtime);
                Engine::Tiny(Arc::new(match abort_hook {
                    Some(hook) => engine.with_abort_hook(hook),
                    None => engine,
                }))
            }
            EngineKind::LlamaCpp => self.build_llama(abort_hook)?,
        })
    }

    #[cfg(not(feature = "llama-cpp"))]
    fn build_llama(&self, _: Option<AbortHook>) -> Result<Engine, StartError> {
        Err(StartError::NotBuilt)
    }

    #[cfg(feature = "llama-cpp")]
    fn build_llama(&self, abort_hook: Option<AbortHook>) -> Result<Engine, StartError> {
        let config = self.llama.config().ok_or_else(|| {
            StartError::Failed(EngineError::invalid_argument(
                "--engine llama-cpp needs --model FILE",
            ))
        })?;
        let engine = tether_engines::LlamaCppEngine::load(config).map_err(StartError::Load)?;
        Ok(Engine::LlamaCpp(Arc::new(match abort_hook {
            Some(hook) => engine.with_abort_hook(hook),
            None => engine,
        })))
    }

    /// Build the engine on `runtime`, start it and clean it up: does it run here at all?
    pub async fn probe(&self, runtime: impl Runtime) -> Result<(), StartError> {
        let engine = self.build(runtime, None)?;
        let started = engine.start(0).await;
        let _ = engine.llm().cleanup().await;
        started.map(drop)
    }
}

/// Why an engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The device is not there (no GPU, driver or NVRTC, or no CUDA support built in):
    /// a usage error, exit code 2.
    #[error("--device {device} is unavailable: {source}")]
    Unavailable {
        /// The device asked for.
        device: Device,
        /// The engine's error.
        source: EngineError,
    },
    /// The model could not be loaded (a missing or unreadable file): a usage error.
    #[error("cannot load the model: {0}")]
    Load(EngineError),
    /// `--engine llama-cpp` without the `llama-cpp` feature: a usage error.
    #[error("{}", LLAMA_CPP_NOT_BUILT)]
    NotBuilt,
    /// Any other failure.
    #[error("engine failed to start: {0}")]
    Failed(EngineError),
}

impl StartError {
    /// What `err`, from the start of an engine on `device`, means: only a device can
    /// be unavailable at start (the CPU backend and SimEngine never answer
    /// `Unavailable` there).
    pub fn of(device: Device, err: EngineError) -> StartError {
        if err.kind() != ErrorKind::Unavailable || device == Device::Cpu {
            return StartError::Failed(err);
        }
        StartError::Unavailable {
            device,
            source: err,
        }
    }

    /// Whether the arguments were at fault (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            StartError::Unavailable { .. } | StartError::Load(_) | StartError::NotBuilt
        )
    }
}

/// A built engine, either kind.
#[derive(Clone, Debug)]
pub enum Engine {
    /// A SimEngine.
    Sim(Arc<SimEngine>),
    /// A TinyEngine.
    Tiny(Arc<TinyEngine>),
    /// llama.cpp.
    #[cfg(feature = "llama-cpp")]
    LlamaCpp(Arc<tether_engines::LlamaCppEngine>),
}

/// The gauges and counters every engine has, read at one moment (0 where an engine
/// has no such thing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Sequences in the running batch (SimEngine's slots, TinyEngine's and llama.cpp's
    /// sequences).
    pub live_sequences: usize,
    /// Requests waiting for a place in the batch.
    pub queue_len: usize,
    /// SimEngine: KV blocks reserved (0 for TinyEngine).
    pub kv_blocks: usize,
    /// TinyEngine: bytes of KV cache held (0 for SimEngine).
    pub kv_bytes: usize,
    /// llama.cpp: KV cells its memory holds, as llama.cpp counts them.
    pub kv_cells: usize,
    /// llama.cpp: sequence ids holding cells, as llama.cpp counts them, plus the
    /// removals still owed to it.
    pub kv_sequences: usize,
    /// Requests accepted by `generate` since the engine was created.
    pub accepted: u64,
    /// `abort` calls received.
    pub aborts_received: u64,
    /// SimEngine: aborts that could only be a protocol error (TinyEngine cannot tell: 0).
    pub late_aborts: u64,
    /// SimEngine: ended requests still remembered for an abort that may come (0 for
    /// TinyEngine).
    pub lingering: usize,
}

impl Engine {
    /// The engine behind the trait.
    pub fn llm(&self) -> Arc<dyn LlmEngine> {
        match self {
            Engine::Sim(e) => e.clone(),
            Engine::Tiny(e) => e.clone(),
            #[cfg(feature = "llama-cpp")]
            Engine::LlamaCpp(e) => e.clone(),
        }
    }

    /// Token ids a request may use: `0..vocab_size`.
    pub fn vocab_size(&self) -> u32 {
        match self {
            Engine::Sim(e) => e.config().vocab_size,
            Engine::Tiny(e) => u32::try_from(e.config().vocab_size).unwrap_or(u32::MAX),
            #[cfg(feature = "llama-cpp")]
            Engine::LlamaCpp(e) => e.tokenizer().n_vocab(),
        }
    }

    /// A new engine like this one, for a check that wants a fresh engine each time
    /// (llama.cpp's shares the loaded weights; the others are rebuilt from `spec` on
    /// `runtime`).
    pub fn fresh(&self, spec: &EngineSpec, runtime: impl Runtime) -> Arc<dyn LlmEngine> {
        match self {
            #[cfg(feature = "llama-cpp")]
            Engine::LlamaCpp(e) => Arc::new(e.with_same_model()),
            Engine::Sim(_) => Arc::new(SimEngine::new(spec.sim.clone(), runtime)),
            Engine::Tiny(_) => Arc::new(TinyEngine::new(spec.tiny.clone(), runtime)),
        }
    }

    /// Start the engine; a missing device is [`StartError::Unavailable`].
    pub async fn start(&self, worker_id: u64) -> Result<EngineConfig, StartError> {
        self.llm().start(worker_id).await.map_err(|err| match self {
            Engine::Tiny(e) => StartError::of(e.config().device, err),
            _ => StartError::Failed(err),
        })
    }

    /// A snapshot of the gauges.
    pub fn gauges(&self) -> Gauges {
        match self {
            Engine::Sim(e) => {
                let g = e.gauges();
                Gauges {
                    live_sequences: g.live_slots,
                    queue_len: g.queue_len,
                    kv_blocks: g.kv_blocks_used,
                    kv_bytes: 0,
                    kv_cells: 0,
                    kv_sequences: 0,
                    accepted: g.accepted,
                    aborts_received: g.aborts_received,
                    late_aborts: g.late_aborts,
                    lingering: g.lingering,
                }
            }
            Engine::Tiny(e) => {
                let g = e.gauges();
                Gauges {
                    live_sequences: g.live_sequences,
                    queue_len: g.queue_len,
                    kv_blocks: 0,
                    kv_bytes: g.kv_bytes,
                    kv_cells: 0,
                    kv_sequences: 0,
                    accepted: g.accepted,
                    aborts_received: g.aborts_received,
                    late_aborts: 0,
                    lingering: 0,
                }
            }
            #[cfg(feature = "llama-cpp")]
            Engine::LlamaCpp(e) => {
                let g = e.gauges();
                Gauges {
                    live_sequences: g.live_sequences,
                    queue_len: g.queue_len,
                    kv_blocks: 0,
                    kv_bytes: 0,
                    kv_cells: g.kv_cells,
                    kv_sequences: g.kv_sequences + g.pending_removals,
                    accepted: g.accepted,
                    aborts_received: g.aborts_received,
                    late_aborts: 0,
                    lingering: 0,
                }
            }
        }
    }

    /// Whether the engine is alive, without queueing anything: started, not cleaned
    /// up, and its scheduler loop still there (it did not panic and its runtime did
    /// not drop it). The error says which part failed.
    pub fn liveness(&self) -> Result<(), String> {
        let (name, started, running) = match self {
            Engine::Sim(e) => ("sim", e.is_started(), e.is_running()),
            Engine::Tiny(e) => ("tiny", e.is_started(), e.is_running()),
            #[cfg(feature = "llama-cpp")]
            Engine::LlamaCpp(e) => ("llama-cpp", e.is_started(), e.is_running()),
        };
        match (started, running) {
            (_, true) => Ok(()),
            (false, false) => Err(format!("the {name} engine is not started")),
            (true, false) => Err(format!("the {name} engine's scheduler loop is not running")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_needs_the_tiny_engine() {
        let args = EngineArgs {
            kind: EngineKind::Sim,
            device: Device::Cuda(1),
            ..EngineArgs::default()
        };
        let err = args.spec().validate().unwrap_err();
        assert_eq!(
            err,
            "--device cuda:1 needs --engine tiny (SimEngine has no device)"
        );
        let tiny = EngineArgs {
            kind: EngineKind::Tiny,
            ..args.clone()
        };
        assert_eq!(tiny.spec().validate(), Ok(()));
        assert_eq!(tiny.spec().describe(), "tiny on cuda:1");
        assert_eq!(EngineArgs::default().spec().describe(), "sim");
    }

    #[test]
    fn llama_flags_need_the_llama_engine_and_a_model() {
        let args = EngineArgs {
            ctx_size: Some(1024),
            ..EngineArgs::default()
        };
        assert_eq!(
            args.spec().validate().unwrap_err(),
            "--ctx-size, --batch-size and --compute-threads need --engine llama-cpp"
        );
        let llama = EngineArgs {
            kind: EngineKind::LlamaCpp,
            ..EngineArgs::default()
        };
        let err = llama.spec().validate().unwrap_err();
        if cfg!(feature = "llama-cpp") {
            assert_eq!(err, "--engine llama-cpp needs --model FILE, a GGUF model");
        } else {
            assert_eq!(err, LLAMA_CPP_NOT_BUILT);
        }
        // `--model` names a sim or tiny engine, and is llama.cpp's file.
        let named = EngineArgs {
            model: Some("m.gguf".to_owned()),
            ..EngineArgs::default()
        };
        assert_eq!(named.spec().sim.model, "m.gguf");
        let file = EngineArgs {
            kind: EngineKind::LlamaCpp,
            ..named
        };
        assert_eq!(file.spec().llama.model, Some(PathBuf::from("m.gguf")));
        assert_eq!(file.spec().sim.model, SimConfig::default().model);
        assert_eq!(file.spec().describe(), "llama-cpp (m.gguf)");
    }

    #[test]
    fn only_a_missing_device_is_a_usage_error() {
        let unavailable = || EngineError::new(ErrorKind::Unavailable, "no driver");
        let err = StartError::of(Device::Cuda(0), unavailable());
        assert!(err.is_usage());
        assert_eq!(
            err.to_string(),
            "--device cuda:0 is unavailable: Unavailable: no driver"
        );
        assert!(!StartError::of(Device::Cpu, unavailable()).is_usage());
        let other = EngineError::invalid_argument("bad config");
        assert!(!StartError::of(Device::Cuda(0), other).is_usage());
    }
}
