//! `tether conformance`: run tether's engine conformance kit
//! ([`tether_core::conformance`]) against an engine on a chosen runtime and list the
//! checks it passed.

use std::sync::Arc;

use tether_core::conformance::{run_conformance_on, ConformanceFailure, ConformanceReport, CHECKS};
use tether_core::LlmEngine;

use crate::engine::{EngineArgs, EngineSpec, StartError};
use crate::runtime::{self, RuntimeKind};

/// `tether conformance`: check an engine against the engine contract.
///
/// Exit code: 0 when every check passed, 1 otherwise, 2 on bad arguments (an
/// unavailable `--device` included).
#[derive(Clone, Debug, clap::Args)]
pub struct ConformanceArgs {
    /// Async runtime to run the kit on.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Tokio)]
    pub runtime: RuntimeKind,
    /// Engine to check, each with its default configuration.
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Why the kit did not pass.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// The engine cannot be checked as asked (bad flags): exit code 2.
    #[error("{0}")]
    InvalidOptions(String),
    /// The runtime could not be built.
    #[error("cannot build the runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// The engine does not start here at all (an unavailable device is a usage error).
    #[error("{0}")]
    Start(#[from] StartError),
    /// The engine broke a rule.
    #[error("{0}")]
    Failed(#[from] ConformanceFailure),
}

impl ConformanceError {
    /// Whether the arguments were at fault (exit code 2).
    pub fn is_usage(&self) -> bool {
        match self {
            ConformanceError::InvalidOptions(_) => true,
            ConformanceError::Start(e) => e.is_usage(),
            ConformanceError::Runtime(_) | ConformanceError::Failed(_) => false,
        }
    }
}

/// Run the kit against fresh engines built from `spec` on a freshly built `kind`
/// runtime. The engine is first started once on its own, so that a missing device is
/// reported as such rather than as a failed check.
pub fn run(kind: RuntimeKind, spec: &EngineSpec) -> Result<ConformanceReport, ConformanceError> {
    spec.validate().map_err(ConformanceError::InvalidOptions)?;
    let outcome = runtime::block_on(kind, runtime::default_threads(), |rt| async move {
        spec.probe(rt.clone()).await?;
        let engine_rt = rt.clone();
        let factory = move || -> Arc<dyn LlmEngine> { spec.build(engine_rt.clone(), None).llm() };
        Ok::<_, ConformanceError>(run_conformance_on(&*rt, &factory).await?)
    })?;
    outcome
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
