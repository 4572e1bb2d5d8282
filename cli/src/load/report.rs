//! The result of a load run ([`Report`]): serializable for `--json`, and rendered as
//! the final table for people.
//!
//! Owns presentation and the percentile arithmetic; the numbers come from the run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::plan::PlanCounts;
use crate::engine::EngineKind;
use crate::runtime::RuntimeKind;

/// How many violations the table prints (the JSON has them all).
pub const SHOWN_VIOLATIONS: usize = 20;

/// Latency percentiles in milliseconds (nearest rank, `idx = round((n - 1) * q)`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `values` (reordered in place).
    pub fn of(values: &mut [f64]) -> Percentiles {
        let n = values.len();
        if n == 0 {
            return Percentiles::default();
        }
        values.sort_unstable_by(f64::total_cmp);
        let at = |q: f64| values[((n - 1) as f64 * q).round() as usize];
        Percentiles {
            count: n as u64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: values[n - 1],
        }
    }
}

/// Outcomes by kind, one per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Outcomes {
    /// The engine finished them (any reason but cancelled).
    pub finished: u64,
    /// Stopped or killed, ended with `Cancelled`.
    pub cancelled: u64,
    /// An engine error or panic reached the client.
    pub failed: u64,
    /// The client dropped the stream first.
    pub dropped: u64,
    /// A timeout ended them.
    pub timed_out: u64,
}

/// What must be back to zero once the run settled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Leaks {
    /// Engine batch slots (TinyEngine: running sequences) still held.
    pub engine_slots: u64,
    /// SimEngine: KV blocks still reserved.
    pub kv_blocks: u64,
    /// TinyEngine: bytes of KV cache still held.
    pub kv_bytes: u64,
    /// llama.cpp: KV cells still held, as llama.cpp counts them.
    pub kv_cells: u64,
    /// llama.cpp: sequence ids still holding cells (or owed a removal).
    pub kv_sequences: u64,
    /// Requests still queued in the engine.
    pub queue: u64,
    /// Requests started without a record.
    pub in_flight: i64,
    /// Spawned tasks (aborts, deferred aborts, the engine's scheduler after cleanup)
    /// still alive.
    pub tasks: u64,
}

impl Leaks {
    /// Whether everything is back to zero.
    pub fn is_clean(&self) -> bool {
        *self == Leaks::default()
    }
}

/// Everything a load run measured and checked.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The engine it ran against.
    pub engine: EngineKind,
    /// TinyEngine's device (`cpu`, `cuda:0`); `None` for SimEngine.
    pub device: Option<String>,
    /// The runtime it ran on.
    pub runtime: RuntimeKind,
    /// The adapter's mode (`agg`, `prefill`, `decode`).
    pub mode: String,
    /// Requests run.
    pub requests: u64,
    /// Requests in flight at once.
    pub concurrency: u64,
    /// The plan's seed.
    pub seed: u64,
    /// Tokens each request asks for.
    pub max_tokens: u32,
    /// How many requests the plan gave each kind of chaos.
    pub plan: PlanCounts,
    /// Outcomes by kind.
    pub outcomes: Outcomes,
    /// Finished outcomes by finish reason.
    pub finish_reasons: BTreeMap<String, u64>,
    /// Failed outcomes by error kind.
    pub failures: BTreeMap<String, u64>,
    /// Aborts the adapter handed to the runtime (`Observer::on_abort`).
    pub aborts_sent: u64,
    /// Aborts the engine received.
    pub aborts_received: u64,
    /// Aborts the plan (and, where it depends on a race, each record) calls for.
    pub aborts_expected: u64,
    /// Aborts the engine received for a request it could not abort any more
    /// (SimEngine; TinyEngine cannot tell, and reports 0).
    pub late_aborts: u64,
    /// Time to first token, from each request's record.
    pub ttft_ms: Percentiles,
    /// Inter-token latency, as the clients saw it.
    pub itl_ms: Percentiles,
    /// Wall time of the requests (the settle afterwards not included).
    pub elapsed_s: f64,
    /// Tokens the clients received.
    pub tokens: u64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Tasks spawned through the adapter's runtime (aborts and deferred aborts).
    pub tasks_spawned: u64,
    /// Ended requests the engine still remembers because an abort could still come
    /// for them (decode-mode aborts that were discarded); not a leak, bounded.
    pub engine_lingering: u64,
    /// What must be zero at the end.
    pub leaks: Leaks,
    /// Every broken invariant; empty when all held.
    pub violations: Vec<String>,
}

impl Report {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The final table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = &self.plan;
        let o = &self.outcomes;
        let l = &self.leaks;
        let engine = match &self.device {
            Some(device) => format!("{} on {device}", self.engine),
            None => self.engine.to_string(),
        };
        let _ = writeln!(
            s,
            "tether load: {} requests, concurrency {}, engine {engine}, runtime {}, mode {}, \
             max_tokens {}, seed {}",
            self.requests, self.concurrency, self.runtime, self.mode, self.max_tokens, self.seed
        );
        let _ = writeln!(
            s,
            "  plan        none {}  stop {}  kill {}  drop {}  error {}  hang {}  panic {}",
            p.none, p.stop, p.kill, p.drop, p.error, p.hang, p.panic
        );
        let _ = writeln!(
            s,
            "  outcomes    finished {}  cancelled {}  failed {}  dropped {}  timed_out {}",
            o.finished, o.cancelled, o.failed, o.dropped, o.timed_out
        );
        if !self.finish_reasons.is_empty() {
            let _ = writeln!(s, "    finished  {}", join(&self.finish_reasons));
        }
        if !self.failures.is_empty() {
            let _ = writeln!(s, "    failed    {}", join(&self.failures));
        }
        // TinyEngine forgets ended sequences, so it cannot tell a late abort.
        let late = match self.engine {
            EngineKind::Sim => format!("  late {}", self.late_aborts),
            EngineKind::Tiny | EngineKind::LlamaCpp => String::new(),
        };
        let _ = writeln!(
            s,
            "  aborts      received by engine {}  sent by adapter {}  expected {}{late}",
            self.aborts_received, self.aborts_sent, self.aborts_expected
        );
        for (name, q) in [("ttft", &self.ttft_ms), ("itl", &self.itl_ms)] {
            let _ = writeln!(
                s,
                "  {name:<11} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
                q.p50, q.p90, q.p99, q.max, q.count
            );
        }
        let _ = writeln!(
            s,
            "  throughput  {:.0} req/s  {:.0} tokens/s  ({} tokens in {:.2} s)",
            self.requests_per_s, self.tokens_per_s, self.tokens, self.elapsed_s
        );
        let (slots, kv) = match self.engine {
            EngineKind::Sim => (
                format!("engine slots {}", l.engine_slots),
                format!("kv blocks {}", l.kv_blocks),
            ),
            EngineKind::Tiny => (
                format!("sequences {}", l.engine_slots),
                format!("kv bytes {}", l.kv_bytes),
            ),
            EngineKind::LlamaCpp => (
                format!("sequences {}", l.engine_slots),
                format!("kv cells {}  kv sequences {}", l.kv_cells, l.kv_sequences),
            ),
        };
        let _ = writeln!(
            s,
            "  leaks       {slots}  {kv}  queue {}  in-flight {}  tasks {}  {}",
            l.queue,
            l.in_flight,
            l.tasks,
            if l.is_clean() { "(clean)" } else { "(LEAK)" }
        );
        write_result(&mut s, &self.violations);
        s
    }
}

/// The table's last lines: `ok`, or the violations (the first [`SHOWN_VIOLATIONS`]).
pub(crate) fn write_result(s: &mut String, violations: &[String]) {
    if violations.is_empty() {
        let _ = writeln!(s, "  result      ok: every invariant held");
        return;
    }
    let _ = writeln!(s, "  result      FAILED: {} violations", violations.len());
    for v in violations.iter().take(SHOWN_VIOLATIONS) {
        let _ = writeln!(s, "    - {v}");
    }
    if violations.len() > SHOWN_VIOLATIONS {
        let _ = writeln!(
            s,
            "    ... and {} more (--json lists them all)",
            violations.len() - SHOWN_VIOLATIONS
        );
    }
}

/// Counts as `key value  key value`.
pub(crate) fn join(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join("  ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!(
            (p.count, p.p50, p.p90, p.p99, p.max),
            (100, 51.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}
