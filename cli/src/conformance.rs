//! `tether conformance`: run tether's engine conformance kit
//! ([`tether_core::conformance`]) against an engine on a chosen runtime and list the
//! checks it passed.

use std::sync::Arc;

use tether_core::conformance::{run_conformance_on, ConformanceFailure, ConformanceReport, CHECKS};
use tether_core::LlmEngine;
use tether_engines::{SimConfig, SimEngine};

use crate::runtime::{self, RuntimeKind};

/// The engines the kit can be run against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// SimEngine with its default configuration.
    #[default]
    Sim,
}

/// `tether conformance`: check an engine against the engine contract.
///
/// Exit code: 0 when every check passed, 1 otherwise, 2 on bad arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct ConformanceArgs {
    /// Async runtime to run the kit on.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Tokio)]
    pub runtime: RuntimeKind,
    /// Engine to check.
    #[arg(long, value_enum, default_value_t = EngineKind::Sim)]
    pub engine: EngineKind,
}

/// Why the kit did not pass.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// The runtime could not be built.
    #[error("cannot build the runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// The engine broke a rule.
    #[error("{0}")]
    Failed(#[from] ConformanceFailure),
}

/// Run the kit against `engine` on a freshly built `kind` runtime.
pub fn run(kind: RuntimeKind, engine: EngineKind) -> Result<ConformanceReport, ConformanceError> {
    let outcome = runtime::block_on(kind, runtime::default_threads(), |rt| async move {
        let engine_rt = rt.clone();
        let factory = move || -> Arc<dyn LlmEngine> {
            match engine {
                EngineKind::Sim => {
                    Arc::new(SimEngine::new(SimConfig::default(), engine_rt.clone()))
                }
            }
        };
        run_conformance_on(&*rt, &factory).await
    })?;
    Ok(outcome?)
}

/// The lines `tether conformance` prints for a passing `report`.
pub fn render(report: &ConformanceReport, kind: RuntimeKind) -> String {
    let mut out = String::new();
    for check in &report.checks {
        out.push_str(&format!("  ok  {check}\n"));
    }
    out.push_str(&format!(
        "conformance: engine `{}` passed {}/{} checks on {kind}\n",
        report.model,
        report.checks.len(),
        CHECKS.len()
    ));
    out
}
