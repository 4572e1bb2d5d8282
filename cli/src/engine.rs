//! The engine every command runs: the `--engine sim|tiny` and `--device` flags
//! ([`EngineArgs`]), what to build ([`EngineSpec`]), the one constructor that
//! `tether load`, `tether serve` and `tether conformance` share ([`EngineSpec::build`]),
//! and one view of either engine's gauges ([`Gauges`]).
//!
//! Owns the choice, the construction and the start of an engine (a missing device is
//! told apart from other start failures: it is a usage error); what a command does
//! with the engine is the command's.

use std::fmt;
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
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Sim => "sim",
            EngineKind::Tiny => "tiny",
        })
    }
}

/// `--engine` and `--device`, the same in every command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct EngineArgs {
    /// Engine: `sim` (continuous-batching simulator) or `tiny` (a tiny real transformer).
    #[arg(long = "engine", value_name = "ENGINE", value_enum, default_value_t = EngineKind::Sim)]
    pub kind: EngineKind,
    /// TinyEngine: where the model runs (`cpu`, `cuda`, `cuda:N`; CUDA needs a tether
    /// built with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

impl Default for EngineArgs {
    fn default() -> Self {
        EngineArgs {
            kind: EngineKind::Sim,
            device: Device::Cpu,
        }
    }
}

impl EngineArgs {
    /// What these flags ask for, with each engine's default configuration.
    pub fn spec(&self) -> EngineSpec {
        EngineSpec {
            kind: self.kind,
            sim: SimConfig::default(),
            tiny: TinyConfig {
                device: self.device,
                ..TinyConfig::default()
            },
        }
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
}

impl EngineSpec {
    /// Check the chosen engine's configuration; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        match self.kind {
            EngineKind::Sim if self.tiny.device != Device::Cpu => Err(format!(
                "--device {} needs --engine tiny (SimEngine has no device)",
                self.tiny.device
            )),
            EngineKind::Sim => self
                .sim
                .validate()
                .map_err(|e| format!("engine configuration: {e}")),
            EngineKind::Tiny => self
                .tiny
                .validate()
                .map_err(|e| format!("engine configuration: {e}")),
        }
    }

    /// The chosen engine, for humans: `sim`, `tiny on cpu`, `tiny on cuda:0`.
    pub fn describe(&self) -> String {
        match self.kind {
            EngineKind::Sim => "sim".to_owned(),
            EngineKind::Tiny => format!("tiny on {}", self.tiny.device),
        }
    }

    /// Token ids a request may use: `0..vocab_size`.
    pub fn vocab_size(&self) -> u32 {
        match self.kind {
            EngineKind::Sim => self.sim.vocab_size,
            EngineKind::Tiny => u32::try_from(self.tiny.vocab_size).unwrap_or(u32::MAX),
        }
    }

    /// Build the engine (not started) on `runtime`, telling `abort_hook` about every
    /// abort it receives.
    pub fn build(&self, runtime: impl Runtime, abort_hook: Option<AbortHook>) -> Engine {
        match self.kind {
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
        }
    }

    /// Build the engine on `runtime`, start it and clean it up: does it run here at all?
    pub async fn probe(&self, runtime: impl Runtime) -> Result<(), StartError> {
        let engine = self.build(runtime, None);
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
        matches!(self, StartError::Unavailable { .. })
    }
}

/// A built engine, either kind.
#[derive(Clone, Debug)]
pub enum Engine {
    /// A SimEngine.
    Sim(Arc<SimEngine>),
    /// A TinyEngine.
    Tiny(Arc<TinyEngine>),
}

/// The gauges and counters both engines have, read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Sequences in the running batch (SimEngine's slots, TinyEngine's sequences).
    pub live_sequences: usize,
    /// Requests waiting for a place in the batch.
    pub queue_len: usize,
    /// SimEngine: KV blocks reserved (0 for TinyEngine).
    pub kv_blocks: usize,
    /// TinyEngine: bytes of KV cache held (0 for SimEngine).
    pub kv_bytes: usize,
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
        }
    }

    /// Start the engine; a missing device is [`StartError::Unavailable`].
    pub async fn start(&self, worker_id: u64) -> Result<EngineConfig, StartError> {
        self.llm().start(worker_id).await.map_err(|err| match self {
            Engine::Tiny(e) => StartError::of(e.config().device, err),
            Engine::Sim(_) => StartError::Failed(err),
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
        };
        let err = args.spec().validate().unwrap_err();
        assert_eq!(
            err,
            "--device cuda:1 needs --engine tiny (SimEngine has no device)"
        );
        let tiny = EngineArgs {
            kind: EngineKind::Tiny,
            ..args
        };
        assert_eq!(tiny.spec().validate(), Ok(()));
        assert_eq!(tiny.spec().describe(), "tiny on cuda:1");
        assert_eq!(EngineArgs::default().spec().describe(), "sim");
        assert_eq!(tiny.spec().vocab_size(), 256);
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
