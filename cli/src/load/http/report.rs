//! The result of a `tether load --url` run ([`UrlReport`]): serializable for `--json`,
//! and rendered as the final table.
//!
//! Owns presentation only; the numbers come from [`super::run_url`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::check::{Check, CheckStatus, ClientCounts};
use super::metrics::{MetricNames, Values};
use crate::load::report::{join, write_result};
use crate::load::{Percentiles, PlanCounts};

/// The load tool's own CPU time over the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CpuShare {
    /// User CPU seconds (`utime` of `/proc/self/stat`).
    pub user_s: f64,
    /// System CPU seconds (`stime`).
    pub system_s: f64,
    /// `(user + system) / wall`, in % of one core.
    pub percent_of_core: f64,
    /// The same over every core of the machine.
    pub percent_of_machine: f64,
    /// The machine's cores.
    pub cores: u64,
}

/// Everything a `tether load --url` run measured and checked.
#[derive(Clone, Debug, Serialize)]
pub struct UrlReport {
    /// The server's base URL.
    pub url: String,
    /// The model asked for.
    pub model: String,
    /// `chat`, `completions` or `mixed`.
    pub endpoint: String,
    /// `true`, `false` or `mixed`.
    pub stream: String,
    /// The preset the metric names came from, if any.
    pub preset: Option<String>,
    /// Requests run.
    pub requests: u64,
    /// Requests in flight at once.
    pub concurrency: u64,
    /// The plan's seed.
    pub seed: u64,
    /// `max_tokens` of each request.
    pub max_tokens: u32,
    /// How many requests the plan gave each kind of chaos (stop, kill and drop are all
    /// disconnects over HTTP; error, hang and panic are server annotations).
    pub plan: PlanCounts,
    /// What the client counted.
    pub client: ClientCounts,
    /// Planned disconnects carried out (the client dropped the response).
    pub disconnects: u64,
    /// Failed requests by kind (`connect`, `timeout`, `http_NNN`, `malformed`,
    /// `stream_cut`, `error_event`).
    pub errors: BTreeMap<String, u64>,
    /// Responses by HTTP status.
    pub status_codes: BTreeMap<u16, u64>,
    /// Streaming: time to the first event with text.
    pub ttft_ms: Percentiles,
    /// Streaming: gaps between events with text.
    pub itl_ms: Percentiles,
    /// Time to the whole response, complete requests.
    pub latency_ms: Percentiles,
    /// Wall time of the requests.
    pub elapsed_s: f64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Tokens received (usage counts when the server sent them).
    pub tokens: u64,
    /// The load tool's own CPU.
    pub cpu: CpuShare,
    /// The metrics read.
    pub metrics: MetricNames,
    /// Their values before the run (`None` if `/metrics` could not be read).
    pub metrics_before: Option<Values>,
    /// Their values after the run settled.
    pub metrics_after: Option<Values>,
    /// Whether the after-scrape settled (in-flight back and counters stable) within
    /// the settle timeout.
    pub settled: bool,
    /// The server-metric checks.
    pub checks: Vec<Check>,
    /// Every broken invariant (failed checks included); empty when all held.
    pub violations: Vec<String>,
}

impl UrlReport {
    /// Whether every invariant held (checks not available do not break a run).
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The check called `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The final table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = &self.plan;
        let _ = writeln!(
            s,
            "tether load --url {}: {} requests, concurrency {}, model {}, endpoint {}, \
             stream {}, max_tokens {}, seed {}",
            self.url,
            self.requests,
            self.concurrency,
            self.model,
            self.endpoint,
            self.stream,
            self.max_tokens,
            self.seed
        );
        let _ = writeln!(
            s,
            "  plan        none {}  disconnect {} (stop {} kill {} drop {})  error {}  hang {}  panic {}",
            p.none,
            p.stop + p.kill + p.drop,
            p.stop,
            p.kill,
            p.drop,
            p.error,
            p.hang,
            p.panic
        );
        let errors: u64 = self.errors.values().sum();
        let _ = writeln!(
            s,
            "  client      complete {}  disconnects {}  errors {}",
            self.client.complete, self.disconnects, errors
        );
        if !self.errors.is_empty() {
            let _ = writeln!(s, "    errors    {}", join(&self.errors));
        }
        let codes: BTreeMap<String, u64> = self
            .status_codes
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        let _ = writeln!(s, "  status      {}", join(&codes));
        for (name, q) in [
            ("ttft", &self.ttft_ms),
            ("itl", &self.itl_ms),
            ("latency", &self.latency_ms),
        ] {
            let _ = writeln!(
                s,
                "  {name:<11} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
                q.p50, q.p90, q.p99, q.max, q.count
            );
        }
        let _ = writeln!(
            s,
            "  throughput  {:.0} req/s  ({} tokens in {:.2} s)",
            self.requests_per_s, self.tokens, self.elapsed_s
        );
        let c = &self.cpu;
        let _ = writeln!(
            s,
            "  load cpu    {:.1}% of a core  {:.1}% of {} cores  (user {:.2} s, system {:.2} s)",
            c.percent_of_core, c.percent_of_machine, c.cores, c.user_s, c.system_s
        );
        let preset = self.preset.as_deref().unwrap_or("custom");
        let _ = writeln!(
            s,
            "  server      metrics {preset}{}",
            if self.settled {
                ""
            } else {
                " (did not settle)"
            }
        );
        for check in &self.checks {
            let status = match check.status {
                CheckStatus::Passed => "ok",
                CheckStatus::Failed => "FAILED",
                CheckStatus::NotAvailable => "n/a",
            };
            let _ = writeln!(s, "    {:<32} {status:<6} {}", check.name, check.detail);
        }
        write_result(&mut s, &self.violations);
        s
    }
}
