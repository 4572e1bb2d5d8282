//! `tether load --url URL`: the seeded chaos plan of the in-process load, sent over
//! HTTP to any OpenAI-compatible server with a pooled keep-alive client. The client's
//! stop, kill and drop all become disconnects (the response is dropped, which closes
//! the connection): after k SSE events when streaming, after a delay before the
//! response when unary. Server faults (error, hang, panic) are `chaos:` annotations,
//! sent only with `--allow-server-chaos` (the server must run `tether serve
//! --allow-chaos`).
//!
//! The server's `/metrics` is scraped before the run and, after it, until it settled
//! (the in-flight gauge back at its start and the counters still) or the settle timeout
//! passed; the `check` module turns the two scrapes and the client's counts into the
//! invariants.
//!
//! ```no_run
//! # async fn f() {
//! use tether_cli::load::http::{run_url_on, UrlOptions};
//! let opts = UrlOptions { url: "http://127.0.0.1:8000".into(), ..Default::default() };
//! let report = run_url_on(&opts, indicatif::ProgressBar::hidden()).await.expect("valid");
//! assert!(report.passed(), "{}", report.table());
//! # }
//! ```

mod check;
mod client;
pub mod metrics;
mod report;
mod sse;
mod tally;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde_json::json;

pub use check::{Check, CheckStatus, ClientCounts};
pub use metrics::{MetricNames, Preset, Selector, Values};
pub use report::{CpuShare, UrlReport};

use super::plan::{self, Planned};
use super::{ChaosRates, HangRange, LoadError};
use client::{Disconnect, HttpClient, Job, Seen};

/// Which endpoint the requests go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EndpointMix {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
    /// Each request draws one (seeded).
    Mixed,
}

/// Whether the requests stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamMix {
    /// Every request streams (SSE).
    True,
    /// No request streams.
    False,
    /// Each request draws (seeded).
    Mixed,
}

/// Everything a `--url` run needs.
#[derive(Clone, Debug)]
pub struct UrlOptions {
    /// The server's base URL (`http://host:port`).
    pub url: String,
    /// The endpoint mix.
    pub endpoint: EndpointMix,
    /// The streaming mix.
    pub stream: StreamMix,
    /// The model (`None`: the first id `/v1/models` lists).
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Requests to run.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Worker threads of the runtime [`run_url`] builds.
    pub threads: usize,
    /// `max_tokens` of each request.
    pub max_tokens: u32,
    /// Prompt lengths (characters) are drawn from this range.
    pub prompt_chars: (u32, u32),
    /// The chaos mix: stop, kill and drop are disconnects; error, hang and panic need
    /// `allow_server_chaos`.
    pub chaos: ChaosRates,
    /// Send server faults as `chaos:` annotations.
    pub allow_server_chaos: bool,
    /// Seed of the plan.
    pub seed: u64,
    /// A unary disconnect happens after `within × (k + 1) / (max_tokens + 1)`, k the
    /// plan's point.
    pub unary_disconnect_within: Duration,
    /// The longest a request may take (then it is dropped, an error `timeout`).
    pub request_timeout: Duration,
    /// How long to wait for the server's metrics to settle after the run.
    pub settle_timeout: Duration,
    /// The preset the metric names came from (for the report).
    pub preset: Option<Preset>,
    /// The metrics the checks read.
    pub metrics: MetricNames,
    /// Where the metrics are read: `{url}/metrics` when empty, else each of these
    /// `/metrics` URLs, summed (the workers behind a proxy).
    pub metrics_urls: Vec<String>,
}

impl Default for UrlOptions {
    fn default() -> Self {
        UrlOptions {
            url: String::new(),
            endpoint: EndpointMix::Mixed,
            stream: StreamMix::Mixed,
            model: None,
            api_key: None,
            requests: 1000,
            concurrency: 64,
            threads: crate::runtime::default_threads(),
            max_tokens: 16,
            prompt_chars: (8, 64),
            chaos: ChaosRates::default().without_engine_faults(),
            allow_server_chaos: false,
            seed: 0,
            unary_disconnect_within: Duration::from_millis(20),
            request_timeout: Duration::from_secs(60),
            settle_timeout: Duration::from_secs(10),
            preset: Some(Preset::Tether),
            metrics: Preset::Tether.names(),
            metrics_urls: Vec::new(),
        }
    }
}

impl UrlOptions {
    /// The base URL without a trailing `/`, checked: `http://host[:port]`.
    pub fn base(&self) -> Result<String, LoadError> {
        checked_url("--url", &self.url, false)
    }

    /// The `/metrics` URLs to scrape (the server's own unless `metrics_urls` are
    /// given), checked.
    pub fn metrics_urls(&self) -> Result<Vec<String>, LoadError> {
        if self.metrics_urls.is_empty() {
            return Ok(vec![format!("{}/metrics", self.base()?)]);
        }
        self.metrics_urls
            .iter()
            .map(|u| checked_url("--metrics-url", u, true))
            .collect()
    }

    /// Check the options; the error says what to change.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |msg: String| Err(LoadError::InvalidOptions(msg));
        self.base()?;
        self.metrics_urls()?;
        if self.concurrency == 0 || self.threads == 0 {
            return bad("--concurrency and --threads must be at least 1".to_owned());
        }
        for (name, rate) in self.chaos.named() {
            if !(0.0..=1.0).contains(&rate) {
                return bad(format!("--{name} must be a fraction in 0..1, got {rate}"));
            }
        }
        if self.chaos.total() > 1.0 + 1e-9 {
            return bad("the chaos fractions add up to more than 1".to_owned());
        }
        let faults = self.chaos.engine_faults();
        if !faults.is_empty() && !self.allow_server_chaos {
            return bad(format!(
                "--url sends server faults ({}) only with --allow-server-chaos (and the server \
                 must run `tether serve --allow-chaos`)",
                faults.join(", ")
            ));
        }
        if self.prompt_chars.0 == 0 || self.prompt_chars.0 > self.prompt_chars.1 {
            return bad(format!(
                "prompt lengths {}..={} must be a non-empty range starting at 1 or more",
                self.prompt_chars.0, self.prompt_chars.1
            ));
        }
        if self.request_timeout.is_zero() {
            return bad("--request-timeout must not be zero".to_owned());
        }
        Ok(())
    }

    /// The seeded plan (hangs after the first token: the server needs an inter-token
    /// timeout to end them).
    pub fn plan(&self) -> (Vec<Planned>, super::PlanCounts) {
        let hang = Some(HangRange {
            from: 1,
            to: self.max_tokens,
        });
        plan::plan_all(
            self.seed,
            self.requests,
            &self.chaos,
            self.max_tokens,
            self.prompt_chars,
            hang,
        )
    }
}

/// Build a tokio runtime of `opts.threads` workers and run the load on it, with a
/// progress bar on stderr if `progress` is set and stderr is a terminal.
pub fn run_url(opts: &UrlOptions, progress: bool) -> Result<UrlReport, LoadError> {
    opts.validate()?;
    let bar = if progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        super::progress_bar(opts.requests)
    } else {
        ProgressBar::hidden()
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .enable_all()
        .build()?
        .block_on(run_url_on(opts, bar))
}

/// `url` checked as an `http://host[:port]` URL with a path only if `with_path`
/// (`flag` names it in the error); returned without a trailing `/`.
fn checked_url(flag: &str, url: &str, with_path: bool) -> Result<String, LoadError> {
    let expected = if with_path {
        "http://host:port/path"
    } else {
        "http://host:port"
    };
    let bad = |why: &str| {
        Err(LoadError::InvalidOptions(format!(
            "{flag} `{url}` {why} (expected {expected})"
        )))
    };
    let trimmed = url.trim_end_matches('/');
    let Ok(uri) = trimmed.parse::<hyper::Uri>() else {
        return bad("is not a URL");
    };
    if uri.scheme_str() != Some("http") {
        return bad("is not an http:// URL (https is not supported)");
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return bad("has no host");
    }
    let has_path = !matches!(uri.path(), "" | "/");
    if has_path != with_path || uri.query().is_some() {
        return bad(if with_path {
            "must have a path and no query"
        } else {
            "must not have a path"
        });
    }
    Ok(trimmed.to_owned())
}

/// A cheap seeded draw for request `index` (the endpoint and stream mixes).
fn draw(seed: u64, index: usize, salt: u64) -> bool {
    let mut z = (seed ^ salt).wrapping_add((index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & 1 == 1
}

/// Request `index`'s job.
fn job(opts: &UrlOptions, base: &str, model: &str, index: usize, planned: &Planned) -> Job {
    let chat = match opts.endpoint {
        EndpointMix::Chat => true,
        EndpointMix::Completions => false,
        EndpointMix::Mixed => draw(opts.seed, index, 0x00c4_a7c4),
    };
    let stream = match opts.stream {
        StreamMix::True => true,
        StreamMix::False => false,
        StreamMix::Mixed => draw(opts.seed, index, 0x5743_a3b7),
    };
    let text: String = (0..planned.prompt_len)
        .map(|i| char::from(b'a' + ((index as u32 + i) % 26) as u8))
        .collect();
    let mut body = if chat {
        json!({"model": model, "messages": [{"role": "user", "content": text}]})
    } else {
        json!({"model": model, "prompt": text})
    };
    body["max_tokens"] = json!(opts.max_tokens);
    body["stream"] = json!(stream);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if let Some(chaos) = planned.action.chaos() {
        body["annotations"] = json!([chaos.annotation()]);
    }
    let disconnect = match planned.action.client_at() {
        None => Disconnect::Never,
        Some(k) if stream => Disconnect::AfterEvents(k),
        Some(k) => {
            Disconnect::After(opts.unary_disconnect_within * (k + 1) / (opts.max_tokens + 1).max(1))
        }
    };
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    Job {
        uri: format!("{base}{path}")
            .parse()
            .expect("a checked base URL and a fixed path"),
        body: body.to_string(),
        bearer: opts.api_key.clone(),
        stream,
        disconnect,
        timeout: opts.request_timeout,
    }
}

/// Scrape every `/metrics` URL and read `names` off their samples, summed over the
/// URLs (one that cannot be read fails the scrape).
async fn scrape(
    client: &HttpClient,
    urls: &[String],
    opts: &UrlOptions,
) -> Result<(Values, Vec<metrics::Sample>), String> {
    let mut samples = Vec::new();
    for url in urls {
        let (status, body) = client::get(
            client,
            url,
            opts.api_key.as_deref(),
            Duration::from_secs(10),
        )
        .await?;
        if status != 200 {
            return Err(format!("GET {url} answered {status}"));
        }
        samples.extend(metrics::parse(&String::from_utf8_lossy(&body))?);
    }
    Ok((opts.metrics.values(&samples), samples))
}

/// `utime + stime` of this process, in seconds (USER_HZ is 100 on Linux).
fn cpu_times() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: fields are counted after its `)`.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i)?.parse::<f64>().ok().map(|t| t / 100.0);
    // Fields 14 and 15 of the file; 11 and 12 after the state (field 3).
    Some((tick(11)?, tick(12)?))
}

/// Run the load on the current tokio runtime.
pub async fn run_url_on(opts: &UrlOptions, progress: ProgressBar) -> Result<UrlReport, LoadError> {
    opts.validate()?;
    let base = opts.base()?;
    let metrics_urls = opts.metrics_urls()?;
    let client = client::build(opts.concurrency);
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => client::first_model(
            &client,
            &base,
            opts.api_key.as_deref(),
            opts.request_timeout,
        )
        .await
        .map_err(|e| LoadError::Unreachable(format!("{base}: {e}")))?,
    };
    let (plan, plan_counts) = opts.plan();
    let before = scrape(&client, &metrics_urls, opts).await;

    let cpu0 = cpu_times();
    let t0 = Instant::now();
    let jobs: Arc<Vec<Job>> = Arc::new(
        plan.iter()
            .enumerate()
            .map(|(i, p)| job(opts, &base, &model, i, p))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.min(opts.requests) {
        let (jobs, next, client, progress) =
            (jobs.clone(), next.clone(), client.clone(), progress.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                // Relaxed: only the uniqueness of each number matters.
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(index) else {
                    return out;
                };
                out.push((index, client::run(&client, job).await));
                progress.inc(1);
            }
        }));
    }
    let mut seen: Vec<Option<Seen>> = vec![None; opts.requests];
    for worker in workers {
        for (index, s) in worker.await.expect("a load worker panicked") {
            seen[index] = Some(s);
        }
    }
    let elapsed = t0.elapsed();
    let cpu1 = cpu_times();
    progress.finish_and_clear();

    // Settle: the server ends what the disconnects cancelled on its own time. A bounded
    // poll until the in-flight gauge is back and two scrapes in a row agree.
    let mut after = None;
    let mut settled = false;
    if let Ok((b, _)) = &before {
        let deadline = Instant::now() + opts.settle_timeout;
        let mut last: Option<Values> = None;
        loop {
            if let Ok((v, _)) = scrape(&client, &metrics_urls, opts).await {
                let back = v.in_flight == b.in_flight;
                if back && last.as_ref() == Some(&v) {
                    settled = true;
                    after = Some(v);
                    break;
                }
                last = Some(v);
            }
            if Instant::now() >= deadline {
                after = last;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let seen: Vec<Seen> = seen
        .into_iter()
        .map(|s| s.expect("every job ran"))
        .collect();
    Ok(tally::build_report(
        opts,
        tally::Finished {
            base,
            model,
            plan: &plan,
            plan_counts,
            seen: &seen,
            elapsed,
            cpu: cpu0.zip(cpu1),
            before,
            after,
            settled,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::plan::Action;

    #[test]
    fn urls_are_checked() {
        let base = |url: &str| {
            UrlOptions {
                url: url.to_owned(),
                ..UrlOptions::default()
            }
            .base()
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            base("http://127.0.0.1:8000/"),
            Ok("http://127.0.0.1:8000".into())
        );
        for bad in [
            "localhost:8000",
            "https://x",
            "http://x/v1",
            "not a url",
            "",
        ] {
            assert!(base(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unary_disconnects_spread_over_the_window() {
        let opts = UrlOptions {
            url: "http://h:1".into(),
            max_tokens: 3,
            stream: StreamMix::False,
            unary_disconnect_within: Duration::from_millis(40),
            ..UrlOptions::default()
        };
        let p = |action| Planned {
            prompt_len: 4,
            action,
        };
        let d = |action| job(&opts, "http://h:1", "m", 0, &p(action)).disconnect;
        assert_eq!(
            d(Action::Drop(0)),
            Disconnect::After(Duration::from_millis(10))
        );
        assert_eq!(
            d(Action::Kill(3)),
            Disconnect::After(Duration::from_millis(40))
        );
        assert_eq!(d(Action::None), Disconnect::Never);
    }
}
