//! Turns what the clients saw and the two scrapes into a [`UrlReport`]: the counts, the
//! percentiles, the per-request violations (a failure no server fault was planned for,
//! a planned server fault that completed), the checks and the load tool's CPU share.
//!
//! Owns the summing; it must not send requests (that is [`super::client`]) nor format
//! (that is [`super::report`]).

use std::collections::BTreeMap;
use std::time::Duration;

use super::check::{self, Check, CheckStatus, ClientCounts};
use super::client::{self, Ending, Seen};
use super::metrics::{self, Values};
use super::report::{CpuShare, UrlReport};
use super::UrlOptions;
use crate::load::plan::Planned;
use crate::load::{Percentiles, PlanCounts};

/// What a run produced, for [`build_report`].
pub(super) struct Finished<'a> {
    pub(super) base: String,
    pub(super) model: String,
    pub(super) plan: &'a [Planned],
    pub(super) plan_counts: PlanCounts,
    pub(super) seen: &'a [Seen],
    pub(super) elapsed: Duration,
    pub(super) cpu: Option<((f64, f64), (f64, f64))>,
    pub(super) before: Result<(Values, Vec<metrics::Sample>), String>,
    pub(super) after: Option<Values>,
    pub(super) settled: bool,
}

pub(super) fn build_report(opts: &UrlOptions, run: Finished<'_>) -> UrlReport {
    let mut violations = Vec::new();
    let mut counts = ClientCounts::default();
    let (mut errors, mut status_codes) = (BTreeMap::new(), BTreeMap::new());
    let (mut ttft, mut itl, mut latency) = (Vec::new(), Vec::new(), Vec::new());
    let (mut disconnects, mut tokens) = (0, 0);
    for (index, (s, planned)) in run.seen.iter().zip(run.plan).enumerate() {
        if let Some(code) = s.status {
            *status_codes.entry(code).or_insert(0u64) += 1;
        }
        ttft.extend(s.ttft.map(|d| d.as_secs_f64() * 1000.0));
        latency.extend(s.latency.map(|d| d.as_secs_f64() * 1000.0));
        itl.extend(s.gaps_us.iter().map(|&g| f64::from(g) / 1000.0));
        tokens += s.tokens;
        if s.ending != Ending::Failed(client::Failure::Connect) {
            counts.sent += 1;
        }
        if s.left() {
            counts.left += 1;
            if s.status.is_none() {
                counts.left_unary += 1;
            }
        }
        let action = planned.action;
        let tag = format!("r{index} ({action})");
        match s.ending {
            Ending::Complete => {
                counts.complete += 1;
                if action.chaos().is_some() {
                    violations.push(format!(
                        "{tag}: completed, the server ignored the chaos annotation (does it \
                         run with --allow-chaos?)"
                    ));
                }
            }
            Ending::Disconnected => disconnects += 1,
            Ending::Failed(f) => {
                *errors.entry(f.label()).or_insert(0u64) += 1;
                if action.chaos().is_none() {
                    violations.push(format!("{tag}: failed: {}", f.label()));
                }
            }
        }
    }
    let checks = match (&run.before, &run.after) {
        (Ok((before, _)), Some(after)) => check::checks(before, after, counts),
        (Err(e), _) => not_available(&format!("cannot read /metrics before the run: {e}")),
        (Ok(_), None) => not_available("cannot read /metrics after the run"),
    };
    for c in checks.iter().filter(|c| c.status == CheckStatus::Failed) {
        violations.push(format!("{} broke: {}", c.name, c.detail));
    }
    let secs = run.elapsed.as_secs_f64();
    let cores = crate::runtime::default_threads() as u64;
    let cpu = run
        .cpu
        .map(|((u0, s0), (u1, s1))| {
            let (user_s, system_s) = (u1 - u0, s1 - s0);
            let core = if secs > 0.0 {
                100.0 * (user_s + system_s) / secs
            } else {
                0.0
            };
            CpuShare {
                user_s,
                system_s,
                percent_of_core: core,
                percent_of_machine: core / cores.max(1) as f64,
                cores,
            }
        })
        .unwrap_or_default();
    UrlReport {
        url: run.base,
        model: run.model,
        endpoint: format!("{:?}", opts.endpoint).to_lowercase(),
        stream: format!("{:?}", opts.stream).to_lowercase(),
        preset: opts.preset.map(|p| p.to_string()),
        requests: opts.requests as u64,
        concurrency: opts.concurrency as u64,
        seed: opts.seed,
        max_tokens: opts.max_tokens,
        plan: run.plan_counts,
        client: counts,
        disconnects,
        errors,
        status_codes,
        ttft_ms: Percentiles::of(&mut ttft),
        itl_ms: Percentiles::of(&mut itl),
        latency_ms: Percentiles::of(&mut latency),
        elapsed_s: secs,
        requests_per_s: if secs > 0.0 {
            opts.requests as f64 / secs
        } else {
            0.0
        },
        tokens,
        cpu,
        metrics: opts.metrics.clone(),
        metrics_before: run.before.ok().map(|(v, _)| v),
        metrics_after: run.after,
        settled: run.settled,
        checks,
        violations,
    }
}

fn not_available(why: &str) -> Vec<Check> {
    [
        "in_flight_returned",
        "cancellations_match_disconnects",
        "aborts_match_cancellations",
    ]
    .into_iter()
    .map(|name| Check {
        name,
        status: CheckStatus::NotAvailable,
        detail: why.to_owned(),
    })
    .collect()
}
