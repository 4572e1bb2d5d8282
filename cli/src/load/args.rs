//! The `tether load` command line ([`LoadArgs`]) and its conversion to
//! [`LoadOptions`]. Owns parsing only: every value is checked by
//! [`LoadOptions::validate`].

use std::time::Duration;

use tether_core::protocol::Mode;
use tether_engines::SimConfig;

use super::{ChaosRates, LoadError, LoadOptions};
use crate::runtime::{self, RuntimeKind};

/// `tether load`: drive requests with chaos through the adapter against SimEngine and
/// check that every invariant held and nothing leaked.
///
/// Exit code: 0 when every invariant held, 1 when one broke, 2 on bad arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// Requests to run.
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Async runtime.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Tokio)]
    pub runtime: RuntimeKind,
    /// Worker threads [default: the machine's parallelism].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Disaggregation role of the adapter: agg, prefill or decode.
    #[arg(long, default_value = "agg")]
    pub mode: Mode,
    /// Tokens each request asks for.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Shortest prompt, in tokens.
    #[arg(long, default_value_t = 8)]
    pub prompt_min: u32,
    /// Longest prompt, in tokens.
    #[arg(long, default_value_t = 64)]
    pub prompt_max: u32,
    /// Chaos mix as `kind=F,...` (kinds: stop, kill, drop, error, hang, panic; unnamed
    /// kinds get 0), or `none`. Without it: stop, kill, drop 0.05; error, hang, panic 0.01.
    /// The per-kind flags below override it.
    #[arg(long, value_name = "SPEC")]
    pub chaos: Option<String>,
    /// Fraction of requests the client stops (graceful) at a random chunk.
    #[arg(long, value_name = "F")]
    pub stop: Option<f64>,
    /// Fraction of requests the client kills at a random chunk.
    #[arg(long, value_name = "F")]
    pub kill: Option<f64>,
    /// Fraction of requests whose stream the client drops at a random chunk.
    #[arg(long, value_name = "F")]
    pub drop: Option<f64>,
    /// Fraction of requests the engine fails with an error at a random step.
    #[arg(long, value_name = "F")]
    pub error: Option<f64>,
    /// Fraction of requests the engine hangs at a random step (needs a timeout).
    #[arg(long, value_name = "F")]
    pub hang: Option<f64>,
    /// Fraction of requests whose engine stream panics at a random step.
    #[arg(long, value_name = "F")]
    pub panic: Option<f64>,
    /// Seed of the chaos plan and of the engine's tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Time-to-first-token limit (`250ms`, `2s`, a number of ms, or `none`).
    #[arg(long, default_value = "none", value_parser = parse_timeout)]
    pub first_token_timeout: Timeout,
    /// Inter-token limit (`200ms`, `1s`, a number of ms, or `none`).
    #[arg(long, default_value = "200ms", value_parser = parse_timeout)]
    pub inter_token_timeout: Timeout,
    /// How long a decode-mode abort before the first token is held back.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub deferral_deadline: Duration,
    /// Engine: sequences in the batch.
    #[arg(long, default_value_t = 256)]
    pub max_seqs: usize,
    /// Engine: KV blocks (16 tokens each).
    #[arg(long, default_value_t = 8192)]
    pub kv_blocks: usize,
    /// Engine: fixed time of a decode step, in microseconds.
    #[arg(long, default_value_t = 1000)]
    pub step_us: u64,
    /// Engine: extra step time per running sequence, in nanoseconds.
    #[arg(long, default_value_t = 2000)]
    pub batch_ns: u64,
    /// Engine: prefill time per prompt token, in nanoseconds.
    #[arg(long, default_value_t = 1000)]
    pub prefill_ns: u64,
    /// Print one JSON object instead of the table (no progress bar).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// An optional time limit on the command line (`none` for no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

fn parse_timeout(s: &str) -> Result<Timeout, String> {
    if matches!(s, "none" | "off") {
        return Ok(Timeout(None));
    }
    parse_duration(s).map(|d| Timeout((!d.is_zero()).then_some(d)))
}

/// Parse `250ms`, `2s`, `1.5s`, `500us` or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "ms"),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (like 200ms, 2s, 500us)"))?;
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use s, ms, us or ns)"
            ))
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{s}`: {e}"))
}

/// Parse a `--chaos` spec (`none`, or `kind=F,...`).
pub fn parse_chaos(spec: &str) -> Result<ChaosRates, String> {
    let mut rates = ChaosRates::NONE;
    if spec.trim() == "none" {
        return Ok(rates);
    }
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("--chaos: `{part}` is not kind=fraction"))?;
        let value: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("--chaos: `{value}` is not a number"))?;
        if !rates.set(name.trim(), value) {
            return Err(format!(
                "--chaos: unknown kind `{name}` (stop, kill, drop, error, hang, panic)"
            ));
        }
    }
    Ok(rates)
}

impl LoadArgs {
    /// The options these arguments ask for, checked.
    pub fn to_options(&self) -> Result<LoadOptions, LoadError> {
        let mut chaos = match &self.chaos {
            Some(spec) => parse_chaos(spec).map_err(LoadError::InvalidOptions)?,
            None => ChaosRates::default(),
        };
        let flags = [
            ("stop", self.stop),
            ("kill", self.kill),
            ("drop", self.drop),
            ("error", self.error),
            ("hang", self.hang),
            ("panic", self.panic),
        ];
        for (name, value) in flags {
            if let Some(v) = value {
                chaos.set(name, v);
            }
        }
        let opts = LoadOptions {
            requests: self.requests,
            concurrency: self.concurrency,
            runtime: self.runtime,
            threads: self.threads.unwrap_or_else(runtime::default_threads),
            mode: self.mode,
            max_tokens: self.max_tokens,
            prompt_tokens: (self.prompt_min, self.prompt_max),
            chaos,
            seed: self.seed,
            first_token_timeout: self.first_token_timeout.0,
            inter_token_timeout: self.inter_token_timeout.0,
            deferral_deadline: self.deferral_deadline,
            sim: SimConfig {
                max_sequences: self.max_seqs,
                kv_blocks: self.kv_blocks,
                decode_step_cost: Duration::from_micros(self.step_us),
                batch_cost_per_sequence: Duration::from_nanos(self.batch_ns),
                prefill_cost_per_token: Duration::from_nanos(self.prefill_ns),
                ..SimConfig::default()
            },
            ..LoadOptions::default()
        };
        opts.validate()?;
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_millis(30)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_timeout("none"), Ok(Timeout(None)));
        assert_eq!(parse_timeout("0"), Ok(Timeout(None)));
    }

    #[test]
    fn chaos_specs_parse() {
        let r = parse_chaos("kill=0.5, hang=0.1").unwrap();
        assert_eq!((r.kill, r.hang, r.stop), (0.5, 0.1, 0.0));
        assert_eq!(parse_chaos("none"), Ok(ChaosRates::NONE));
        assert!(parse_chaos("boom=0.1").is_err());
        assert!(parse_chaos("kill").is_err());
        assert!(parse_chaos("kill=x").is_err());
    }
}
