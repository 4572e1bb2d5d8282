//! `tether conformance`: run tether's engine conformance kit
//! ([`tether_core::conformance`]) against an engine on a chosen runtime, within the
//! limits given on the command line, and list the checks it passed.

use std::time::Duration;

use tether_core::conformance::{
    run_conformance_with, ConformanceConfig, ConformanceFailure, ConformanceReport, CHECKS,
};

use crate::engine::{EngineArgs, EngineSpec, StartError};
use crate::load::parse_duration;
use crate::runtime::{self, RuntimeKind};

/// `tether conformance`: check an engine against the engine contract.
///
/// Exit code: 0 when every check passed, 1 otherwise, 2 on bad arguments (an
/// unavailable `--device` and an unusable limit, such as a zero timeout, included).
#[derive(Clone, Debug, clap::Args)]
pub struct ConformanceArgs {
    /// Async runtime to run the kit on.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Tokio)]
    pub runtime: RuntimeKind,
    /// Engine to check, each with its default configuration.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// How long the engine's `start` (its model load) may take (`10m`, `90s`, `1500ms`).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub start_timeout: Duration,
    /// How long any other check may take.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub check_timeout: Duration,
    /// How long a stopped request may take to end with `Cancelled` (shorter than
    /// `--check-timeout`).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub cancel_within: Duration,
    /// `max_tokens` of the request the stop check stops.
    #[arg(long, default_value_t = 10_000)]
    pub stop_max_tokens: u32,
    /// How many requests the interleaving check issues at once.
    #[arg(long, default_value_t = 8)]
    pub interleaved: usize,
}

impl ConformanceArgs {
    /// The kit's limits these flags ask for.
    pub fn config(&self) -> ConformanceConfig {
        ConformanceConfig::default()
            .start_timeout(self.start_timeout)
            .check_timeout(self.check_timeout)
            .cancel_within(self.cancel_within)
            .stop_max_tokens(self.stop_max_tokens)
            .interleaved_requests(self.interleaved)
    }
}

/// The config fields the kit's messages name, and the flags that set them.
const FLAGS: [(&str, &str); 5] = [
    ("`start_timeout`", "--start-timeout"),
    ("`check_timeout`", "--check-timeout"),
    ("`cancel_within`", "--cancel-within"),
    ("`stop_max_tokens`", "--stop-max-tokens"),
    ("`interleaved_requests`", "--interleaved"),
];

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

/// Run the kit with `config` against engines built from `spec` on a freshly built `kind`
/// runtime. A start that fails because the device is missing is reported as such
/// ([`StartError::Unavailable`]) rather than as a failed check.
pub fn run(
    kind: RuntimeKind,
    spec: &EngineSpec,
    config: &ConformanceConfig,
) -> Result<ConformanceReport, ConformanceError> {
    spec.validate().map_err(ConformanceError::InvalidOptions)?;
    config.validate().map_err(|e| {
        // Name the flags, not the config fields they set.
        let message = FLAGS.iter().fold(e.to_string(), |message, (field, flag)| {
            message.replace(field, flag)
        });
        ConformanceError::InvalidOptions(message)
    })?;
    let device = spec.tiny.device;
    let outcome = runtime::block_on(kind, runtime::default_threads(), |rt| async move {
        let engine_rt = rt.clone();
        // Built once (llama.cpp's loads its model here); each check gets a fresh one.
        let built = spec.build(rt.clone(), None)?;
        let factory = move || built.fresh(spec, engine_rt.clone());
        Ok::<_, ConformanceError>(run_conformance_with(&*rt, &factory, config).await)
    })??;
    outcome.map_err(|failure| match failure {
        ConformanceFailure::StartFailed(err) => match StartError::of(device, err) {
            unavailable @ StartError::Unavailable { .. } => ConformanceError::Start(unavailable),
            StartError::Failed(err) | StartError::Load(err) => {
                ConformanceFailure::StartFailed(err).into()
            }
            StartError::NotBuilt => ConformanceError::Start(StartError::NotBuilt),
        },
        failure => failure.into(),
    })
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConformanceArgs,
    }

    fn config_of(args: &[&str]) -> ConformanceConfig {
        let argv = std::iter::once("conformance").chain(args.iter().copied());
        Cli::try_parse_from(argv).unwrap().args.config()
    }

    #[test]
    fn default_flags_are_the_kits_default_config() {
        assert_eq!(config_of(&[]), ConformanceConfig::default());
    }

    #[test]
    fn flags_set_the_config() {
        let config = config_of(&[
            "--start-timeout",
            "10m",
            "--check-timeout",
            "45s",
            "--cancel-within",
            "1500ms",
            "--stop-max-tokens",
            "500",
            "--interleaved",
            "3",
        ]);
        let expected = ConformanceConfig::default()
            .start_timeout(Duration::from_secs(600))
            .check_timeout(Duration::from_secs(45))
            .cancel_within(Duration::from_millis(1500))
            .stop_max_tokens(500)
            .interleaved_requests(3);
        assert_eq!(config, expected);
    }

    #[test]
    fn an_unusable_limit_is_a_usage_error_naming_the_flag() {
        let spec = EngineArgs::default().spec();
        let config = ConformanceConfig::default().interleaved_requests(0);
        let err = run(RuntimeKind::Tokio, &spec, &config).unwrap_err();
        assert!(err.is_usage());
        assert_eq!(
            err.to_string(),
            "--interleaved is zero; run at least one request (the default is 8)"
        );
    }
}
