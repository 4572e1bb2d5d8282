//! The `tether load` command line ([`LoadArgs`]) and its conversion to
//! [`LoadOptions`]. Owns parsing only: every value is checked by
//! [`LoadOptions::validate`].

use std::time::Duration;

use tether_core::protocol::Mode;
use tether_engines::{SimConfig, TinyConfig};

use super::http::{EndpointMix, MetricNames, Preset, Selector, StreamMix, UrlOptions};
use super::plan::{CHAOS_KINDS, ENGINE_FAULTS};
use super::{ChaosRates, LoadError, LoadOptions};
use crate::engine::{EngineArgs, EngineKind, LlamaSpec};
use crate::runtime::{self, RuntimeKind};

/// `tether load`: drive requests with chaos through the adapter against an engine
/// (SimEngine by default) and check that every invariant held and nothing leaked.
///
/// Exit code: 0 when every invariant held, 1 when one broke, 2 on bad arguments (an
/// unavailable `--device` included).
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// Engine to load, and TinyEngine's device.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Requests to run [default: 10000; 1000 with --engine tiny or --url].
    #[arg(long)]
    pub requests: Option<usize>,
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
    /// kinds get 0), or `none`. Without it: stop, kill, drop 0.05; error, hang, panic 0.01
    /// (0 with --engine tiny, which has no engine faults). The per-kind flags below
    /// override it.
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
    /// Fraction of requests the engine fails with an error at a random step (SimEngine).
    #[arg(long, value_name = "F")]
    pub error: Option<f64>,
    /// Fraction of requests the engine hangs at a random step (SimEngine; needs a
    /// timeout).
    #[arg(long, value_name = "F")]
    pub hang: Option<f64>,
    /// Fraction of requests whose engine stream panics at a random step (SimEngine).
    #[arg(long, value_name = "F")]
    pub panic: Option<f64>,
    /// Seed of the chaos plan and of the engine (SimEngine's tokens, TinyEngine's weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Time-to-first-token limit (`250ms`, `2s`, a number of ms, or `none`).
    #[arg(long, default_value = "none", value_parser = parse_timeout)]
    pub first_token_timeout: Timeout,
    /// Inter-token limit (`200ms`, `1s`, a number of ms, or `none`) [default: 200ms;
    /// 2s with --engine tiny, whose steps are real compute].
    #[arg(long, value_parser = parse_timeout)]
    pub inter_token_timeout: Option<Timeout>,
    /// How long a decode-mode abort before the first token is held back.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub deferral_deadline: Duration,
    /// Engine: sequences in the batch [default: 256; 32 with --engine tiny].
    #[arg(long)]
    pub max_seqs: Option<usize>,
    /// SimEngine: KV blocks (16 tokens each).
    #[arg(long, default_value_t = 8192)]
    pub kv_blocks: usize,
    /// SimEngine: fixed time of a decode step, in microseconds.
    #[arg(long, default_value_t = 1000)]
    pub step_us: u64,
    /// SimEngine: extra step time per running sequence, in nanoseconds.
    #[arg(long, default_value_t = 2000)]
    pub batch_ns: u64,
    /// SimEngine: prefill time per prompt token, in nanoseconds.
    #[arg(long, default_value_t = 1000)]
    pub prefill_ns: u64,
    /// Print one JSON object instead of the table (no progress bar).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Load an OpenAI-compatible server over HTTP (`http://host:port`) instead of an
    /// in-process engine: stop, kill and drop become disconnects; see the `--url`
    /// flags below.
    #[arg(long, value_name = "URL", help_heading = "HTTP (--url)")]
    pub url: Option<String>,
    /// The flags of a `--url` run.
    #[command(flatten)]
    pub http: UrlArgs,
}

/// The flags of `tether load --url` (used only with it).
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "HTTP (--url)")]
pub struct UrlArgs {
    /// Endpoint: `chat` (/v1/chat/completions), `completions` (/v1/completions) or
    /// `mixed` (each request draws one).
    #[arg(long, value_enum, default_value_t = EndpointMix::Mixed)]
    pub endpoint: EndpointMix,
    /// Streaming: `true`, `false` or `mixed` (each request draws).
    #[arg(long, value_enum, default_value_t = StreamMix::Mixed)]
    pub stream: StreamMix,
    /// Send `Authorization: Bearer KEY`.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Send server faults (error, hang, panic) as `chaos:` annotations: the server must
    /// run `tether serve --allow-chaos` (hang also needs its --inter-token-timeout).
    /// Without it the chaos is client disconnects only (stop, kill, drop).
    #[arg(long)]
    pub allow_server_chaos: bool,
    /// The server's metric names: tether, vllm or sglang.
    #[arg(long, value_enum, default_value_t = Preset::Tether)]
    pub preset: Preset,
    /// In-flight gauge(s), summed (`NAME[{label="v"}],...`; `none` to skip).
    #[arg(long, value_name = "NAMES")]
    pub metric_in_flight: Option<String>,
    /// Counter of requests the server ended, any outcome (`none` to skip).
    #[arg(long, value_name = "NAME")]
    pub metric_requests: Option<String>,
    /// Counter of requests the server finished normally (`none` to skip).
    #[arg(long, value_name = "NAME")]
    pub metric_finished: Option<String>,
    /// Counter of requests cancelled because the client disconnected (`none` to skip).
    #[arg(long, value_name = "NAME")]
    pub metric_cancellations: Option<String>,
    /// Counter of requests the server cancelled on its own timeouts (`none` to skip).
    #[arg(long, value_name = "NAME")]
    pub metric_timeouts: Option<String>,
    /// Counter of engine aborts the server sent (`none` to skip).
    #[arg(long, value_name = "NAME")]
    pub metric_aborts: Option<String>,
    /// Read the metrics from this `/metrics` URL instead of the server's own
    /// (`http://host:port/metrics`); repeatable: the values of every URL given are
    /// summed. Behind a proxy in front of several workers, give each worker's.
    #[arg(long = "metrics-url", value_name = "URL")]
    pub metrics_urls: Vec<String>,
    /// The longest one request may take; then it is dropped (an error `timeout`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Unary requests planned to disconnect leave after up to this long.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    pub unary_disconnect_within: Duration,
    /// How long the server's metrics may take to settle after the run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub settle_timeout: Duration,
}

/// The flags (argument id, flag) that only an in-process run takes.
const IN_PROCESS_ONLY: [(&str, &str); 15] = [
    ("kind", "--engine"),
    ("device", "--device"),
    ("ctx_size", "--ctx-size"),
    ("batch_size", "--batch-size"),
    ("compute_threads", "--compute-threads"),
    ("runtime", "--runtime"),
    ("mode", "--mode"),
    ("first_token_timeout", "--first-token-timeout"),
    ("inter_token_timeout", "--inter-token-timeout"),
    ("deferral_deadline", "--deferral-deadline"),
    ("max_seqs", "--max-seqs"),
    ("kv_blocks", "--kv-blocks"),
    ("step_us", "--step-us"),
    ("batch_ns", "--batch-ns"),
    ("prefill_ns", "--prefill-ns"),
];

/// The flags (argument id, flag) that only a `--url` run takes.
const URL_ONLY: [(&str, &str); 14] = [
    ("endpoint", "--endpoint"),
    ("stream", "--stream"),
    ("api_key", "--api-key"),
    ("allow_server_chaos", "--allow-server-chaos"),
    ("preset", "--preset"),
    ("metric_in_flight", "--metric-in-flight"),
    ("metric_requests", "--metric-requests"),
    ("metric_finished", "--metric-finished"),
    ("metric_cancellations", "--metric-cancellations"),
    ("metric_timeouts", "--metric-timeouts"),
    ("metric_aborts", "--metric-aborts"),
    ("metrics_urls", "--metrics-url"),
    ("request_timeout", "--request-timeout"),
    ("unary_disconnect_within", "--unary-disconnect-within"),
];

/// The flags of `matches` (a `tether load` command line) that do not fit its mode: the
/// in-process-only ones with `--url`, the `--url`-only ones without it.
pub fn misplaced_flags(matches: &clap::ArgMatches) -> Vec<&'static str> {
    let url = matches.value_source("url").is_some();
    let list: &[(&str, &str)] = if url { &IN_PROCESS_ONLY } else { &URL_ONLY };
    list.iter()
        .filter(|(id, _)| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        .map(|&(_, flag)| flag)
        .collect()
}

/// An optional metric flag: `None` keeps the preset's, `none` unsets it.
fn metric_flag(
    flag: &Option<String>,
    preset: Option<Selector>,
) -> Result<Option<Selector>, LoadError> {
    match flag.as_deref().map(str::trim) {
        None => Ok(preset),
        Some("none") => Ok(None),
        Some(spec) => Selector::parse(spec)
            .map(Some)
            .map_err(LoadError::InvalidOptions),
    }
}

/// An optional time limit on the command line (`none` for no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

/// Parse a time limit: a duration (see [`parse_duration`]; zero is no limit), `none`
/// or `off`.
pub fn parse_timeout(s: &str) -> Result<Timeout, String> {
    if matches!(s, "none" | "off") {
        return Ok(Timeout(None));
    }
    parse_duration(s).map(|d| Timeout((!d.is_zero()).then_some(d)))
}

/// Parse `250ms`, `2s`, `1.5s`, `10m` (minutes), `500us` or a bare number of milliseconds.
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
        "m" => 60.0,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use m, s, ms, us or ns)"
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
    /// The `--url` run these arguments ask for, checked (`None` without `--url`).
    /// `misplaced` lists the in-process-only flags given (see [`misplaced_flags`]):
    /// any of them is a usage error.
    pub fn to_url_options(&self, misplaced: &[&str]) -> Result<Option<UrlOptions>, LoadError> {
        let Some(url) = &self.url else {
            if !misplaced.is_empty() {
                return Err(LoadError::InvalidOptions(format!(
                    "{} only apply with --url",
                    misplaced.join(", ")
                )));
            }
            return Ok(None);
        };
        if !misplaced.is_empty() {
            return Err(LoadError::InvalidOptions(format!(
                "--url loads a server over HTTP: {} only apply to an in-process run",
                misplaced.join(", ")
            )));
        }
        let h = &self.http;
        let mut chaos = match &self.chaos {
            Some(spec) => parse_chaos(spec).map_err(LoadError::InvalidOptions)?,
            None if h.allow_server_chaos => ChaosRates::default(),
            None => ChaosRates::default().without_engine_faults(),
        };
        let flags = [
            self.stop, self.kill, self.drop, self.error, self.hang, self.panic,
        ];
        for (name, value) in CHAOS_KINDS.into_iter().zip(flags) {
            if let Some(v) = value {
                chaos.set(name, v);
            }
        }
        let preset = h.preset.names();
        let in_flight = match h.metric_in_flight.as_deref().map(str::trim) {
            None => preset.in_flight,
            Some("none") => Vec::new(),
            Some(list) => list
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(Selector::parse)
                .collect::<Result<_, _>>()
                .map_err(LoadError::InvalidOptions)?,
        };
        let metrics = MetricNames {
            in_flight,
            requests: metric_flag(&h.metric_requests, preset.requests)?,
            finished: metric_flag(&h.metric_finished, preset.finished)?,
            cancellations: metric_flag(&h.metric_cancellations, preset.cancellations)?,
            timeouts: metric_flag(&h.metric_timeouts, preset.timeouts)?,
            aborts: metric_flag(&h.metric_aborts, preset.aborts)?,
        };
        let opts = UrlOptions {
            url: url.clone(),
            endpoint: h.endpoint,
            stream: h.stream,
            // `--model`: with --url, the model to ask for.
            model: self.engine.model.clone(),
            api_key: h.api_key.clone(),
            requests: self.requests.unwrap_or(1000),
            concurrency: self.concurrency,
            threads: self.threads.unwrap_or_else(runtime::default_threads),
            max_tokens: self.max_tokens,
            prompt_chars: (self.prompt_min, self.prompt_max),
            chaos,
            allow_server_chaos: h.allow_server_chaos,
            seed: self.seed,
            unary_disconnect_within: h.unary_disconnect_within,
            request_timeout: h.request_timeout,
            settle_timeout: h.settle_timeout,
            preset: Some(h.preset),
            metrics,
            metrics_urls: h.metrics_urls.clone(),
        };
        opts.validate()?;
        Ok(Some(opts))
    }

    /// The options these arguments ask for, checked.
    pub fn to_options(&self) -> Result<LoadOptions, LoadError> {
        self.to_options_with_note().map(|(opts, _)| opts)
    }

    /// The options these arguments ask for, checked, and a note for the user when a
    /// default was changed to fit the engine: only `--engine sim` has engine faults, so
    /// for the others error, hang and panic chaos left at their defaults become 0 (set
    /// explicitly, they are an error).
    pub fn to_options_with_note(&self) -> Result<(LoadOptions, Option<String>), LoadError> {
        let engine = self.engine.kind;
        let base = LoadOptions::for_engine(engine);
        let mut chaos = match &self.chaos {
            Some(spec) => parse_chaos(spec).map_err(LoadError::InvalidOptions)?,
            None => ChaosRates::default(),
        };
        let flags = [
            self.stop, self.kill, self.drop, self.error, self.hang, self.panic,
        ];
        let mut zeroed = Vec::new();
        for (name, value) in CHAOS_KINDS.into_iter().zip(flags) {
            match value {
                Some(v) => {
                    chaos.set(name, v);
                }
                None if engine != EngineKind::Sim
                    && self.chaos.is_none()
                    && ENGINE_FAULTS.contains(&name) =>
                {
                    chaos.set(name, 0.0);
                    zeroed.push(name);
                }
                None => {}
            }
        }
        let note = (!zeroed.is_empty()).then(|| {
            format!(
                "note: --engine {engine} has no engine faults: {} chaos set to 0 (stop, kill \
                 and drop apply)",
                zeroed.join(", ")
            )
        });
        let max_seqs = |default: usize| self.max_seqs.unwrap_or(default);
        let spec = self.engine.spec();
        let opts = LoadOptions {
            engine,
            requests: self.requests.unwrap_or(base.requests),
            concurrency: self.concurrency,
            runtime: self.runtime,
            threads: self.threads.unwrap_or_else(runtime::default_threads),
            mode: self.mode,
            max_tokens: self.max_tokens,
            prompt_tokens: (self.prompt_min, self.prompt_max),
            chaos,
            seed: self.seed,
            first_token_timeout: self.first_token_timeout.0,
            inter_token_timeout: self
                .inter_token_timeout
                .map_or(base.inter_token_timeout, |t| t.0),
            deferral_deadline: self.deferral_deadline,
            sim: SimConfig {
                max_sequences: max_seqs(spec.sim.max_sequences),
                kv_blocks: self.kv_blocks,
                decode_step_cost: Duration::from_micros(self.step_us),
                batch_cost_per_sequence: Duration::from_nanos(self.batch_ns),
                prefill_cost_per_token: Duration::from_nanos(self.prefill_ns),
                ..spec.sim
            },
            tiny: TinyConfig {
                max_sequences: max_seqs(spec.tiny.max_sequences),
                ..spec.tiny
            },
            llama: LlamaSpec {
                max_sequences: max_seqs(spec.llama.max_sequences),
                ..spec.llama
            },
            ..base
        };
        opts.validate()?;
        Ok((opts, note))
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
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_timeout("none"), Ok(Timeout(None)));
        assert_eq!(parse_timeout("0"), Ok(Timeout(None)));
    }

    /// `tether load ARGS`, parsed.
    fn load_args(args: &[&str]) -> LoadArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            load: LoadArgs,
        }
        let argv = std::iter::once("load").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().load
    }

    #[test]
    fn each_engine_has_its_defaults() {
        let (sim, note) = load_args(&[]).to_options_with_note().unwrap();
        assert_eq!(note, None);
        assert_eq!((sim.engine, sim.requests), (EngineKind::Sim, 10_000));
        assert_eq!(sim.chaos, ChaosRates::default());
        assert_eq!(sim.sim.max_sequences, 256);
        assert_eq!(sim.inter_token_timeout, Some(Duration::from_millis(200)));
        let (tiny, note) = load_args(&["--engine", "tiny"])
            .to_options_with_note()
            .unwrap();
        assert_eq!((tiny.engine, tiny.requests), (EngineKind::Tiny, 1000));
        assert_eq!(tiny.chaos, ChaosRates::default().without_engine_faults());
        assert_eq!(tiny.tiny.max_sequences, 32);
        assert_eq!(tiny.inter_token_timeout, Some(Duration::from_secs(2)));
        assert!(note.unwrap().contains("error, hang, panic chaos set to 0"));
    }

    #[test]
    fn tiny_flags_override_its_defaults() {
        let (opts, note) = load_args(&[
            "--engine",
            "tiny",
            "--requests",
            "7",
            "--max-seqs",
            "4",
            "--inter-token-timeout",
            "none",
            "--kill",
            "0.5",
            "--panic",
            "0",
        ])
        .to_options_with_note()
        .unwrap();
        assert_eq!((opts.requests, opts.tiny.max_sequences), (7, 4));
        assert_eq!(opts.inter_token_timeout, None);
        assert_eq!((opts.chaos.kill, opts.chaos.stop), (0.5, 0.05));
        // Only the kinds left at their defaults are noted.
        assert!(note.unwrap().contains(": error, hang chaos set to 0"));
        // A spec sets every kind: nothing to note.
        let (_, note) = load_args(&["--engine", "tiny", "--chaos", "drop=0.2"])
            .to_options_with_note()
            .unwrap();
        assert_eq!(note, None);
    }

    #[test]
    fn tiny_with_explicit_engine_faults_is_a_usage_error() {
        for args in [
            &["--engine", "tiny", "--error", "0.01"][..],
            &["--engine", "tiny", "--chaos", "hang=0.1"],
        ] {
            let err = load_args(args).to_options().unwrap_err();
            assert!(err.is_usage(), "{args:?}: {err}");
            assert!(
                err.to_string().contains("cannot inject engine faults"),
                "{err}"
            );
        }
    }

    #[test]
    fn url_options_take_the_preset_and_the_overrides() {
        let url = |args: &[&str]| {
            let mut argv = vec!["--url", "http://127.0.0.1:8000"];
            argv.extend_from_slice(args);
            load_args(&argv).to_url_options(&[]).unwrap().unwrap()
        };
        let opts = url(&[]);
        assert_eq!(opts.requests, 1000);
        assert_eq!(opts.chaos, ChaosRates::default().without_engine_faults());
        assert_eq!(opts.metrics, Preset::Tether.names());
        let opts = url(&["--allow-server-chaos"]);
        assert_eq!(opts.chaos, ChaosRates::default());
        let opts = url(&[
            "--preset",
            "vllm",
            "--metric-in-flight",
            "a,b{x=\"1\"}",
            "--metric-aborts",
            "vllm:aborts_total",
        ]);
        assert_eq!(
            opts.metrics.in_flight,
            [
                Selector::parse("a").unwrap(),
                Selector::parse("b{x=\"1\"}").unwrap()
            ]
        );
        assert_eq!(
            opts.metrics.aborts,
            Some(Selector::parse("vllm:aborts_total").unwrap())
        );
        assert_eq!(opts.metrics.cancellations, None);
        let opts = url(&[
            "--metric-cancellations",
            "none",
            "--metric-in-flight",
            "none",
        ]);
        assert_eq!(opts.metrics.cancellations, None);
        assert!(opts.metrics.in_flight.is_empty());
        assert_eq!(opts.metrics.aborts, Preset::Tether.names().aborts);
        // Without --url there is no HTTP run.
        assert!(load_args(&[]).to_url_options(&[]).unwrap().is_none());
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
