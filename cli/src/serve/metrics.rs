//! [`Metrics`]: what `tether serve` exports at `/metrics` (Prometheus/OpenMetrics text
//! via prometheus-client), and the [`Observer`] that feeds it one record per request.
//!
//! Owns the metric names, labels and buckets; nothing here handles a request. Names:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `tether_requests_in_flight` | gauge | |
//! | `tether_requests_total` | counter | `outcome`: finished, cancelled, failed, dropped, timed_out |
//! | `tether_request_finish_reasons_total` | counter | `reason`: eos, length, stop, content_filter, error (finished requests only) |
//! | `tether_time_to_first_token_seconds` | histogram | |
//! | `tether_inter_token_latency_seconds` | histogram | (one observation per token; a multi-token chunk spreads its gap) |
//! | `tether_output_tokens_total` | counter | |
//! | `tether_aborts_total` | counter | (engine aborts the adapter sent) |
//! | `tether_http_responses_total` | counter | `endpoint`, `status` (499: the client went away before a response) |
//! | `tether_engine_live_sequences` | gauge | (SimEngine slots / TinyEngine sequences held now) |
//! | `tether_engine_queue_length` | gauge | |
//! | `tether_engine_aborts_received_total` | counter | |

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tether_core::drive::{Observer, Outcome, RequestRecord};
use tether_core::protocol::FinishReason;

/// Histogram buckets in seconds: 0.1 ms steps below 1 ms, then a coarse 1-2.5-5 ladder.
pub const LATENCY_BUCKETS: [f64; 24] = [
    0.0005, 0.0006, 0.0007, 0.0008, 0.0009, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The request outcomes, as labelled.
pub const OUTCOMES: [&str; 5] = ["finished", "cancelled", "failed", "dropped", "timed_out"];

/// The finish reasons of finished requests, as labelled.
pub const FINISH_REASONS: [&str; 5] = ["eos", "length", "stop", "content_filter", "error"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabel {
    endpoint: &'static str,
    status: u16,
}

/// A snapshot of an engine's gauges, read at every scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineGauges {
    /// Sequences holding a batch slot (or KV cache) now.
    pub live_sequences: u64,
    /// Requests waiting for one.
    pub queue_length: u64,
    /// `abort` calls the engine received.
    pub aborts_received: u64,
}

/// Reads an engine's gauges.
pub type GaugeFn = Arc<dyn Fn() -> EngineGauges + Send + Sync>;

struct EngineCollector(GaugeFn);

impl fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EngineCollector")
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let g = (self.0)();
        let live = ConstGauge::new(g.live_sequences as i64);
        live.encode(encoder.encode_descriptor(
            "engine_live_sequences",
            "Sequences holding an engine slot now",
            None,
            live.metric_type(),
        )?)?;
        let queue = ConstGauge::new(g.queue_length as i64);
        queue.encode(encoder.encode_descriptor(
            "engine_queue_length",
            "Requests waiting for an engine slot",
            None,
            queue.metric_type(),
        )?)?;
        let aborts = ConstCounter::new(g.aborts_received);
        aborts.encode(encoder.encode_descriptor(
            "engine_aborts_received",
            "Aborts the engine received",
            None,
            aborts.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Every metric `tether serve` exports. Cheap to share (`Arc`), lock-free to update.
pub struct Metrics {
    registry: Registry,
    in_flight: Gauge,
    requests: Family<OutcomeLabel, Counter>,
    finish_reasons: Family<ReasonLabel, Counter>,
    ttft: Histogram,
    itl: Histogram,
    output_tokens: Counter,
    aborts: Counter,
    http: Family<HttpLabel, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("in_flight", &self.in_flight.get())
            .field("aborts", &self.aborts.get())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh set, every outcome and finish reason at zero; `engine` adds the
    /// engine's gauges to every scrape.
    pub fn new(engine: Option<GaugeFn>) -> Metrics {
        let mut registry = Registry::with_prefix("tether");
        let m = Metrics {
            registry: Registry::default(),
            in_flight: Gauge::default(),
            requests: Family::default(),
            finish_reasons: Family::default(),
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(LATENCY_BUCKETS),
            output_tokens: Counter::default(),
            aborts: Counter::default(),
            http: Family::default(),
        };
        for outcome in OUTCOMES {
            m.requests.get_or_create_owned(&OutcomeLabel { outcome });
        }
        for reason in FINISH_REASONS {
            m.finish_reasons
                .get_or_create_owned(&ReasonLabel { reason });
        }
        registry.register(
            "requests_in_flight",
            "Requests between generate and their end",
            m.in_flight.clone(),
        );
        registry.register(
            "requests",
            "Requests that ended, by outcome",
            m.requests.clone(),
        );
        registry.register(
            "request_finish_reasons",
            "Finished requests by the engine's finish reason",
            m.finish_reasons.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from generate to the first token",
            m.ttft.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between tokens (a chunk of n tokens counts its gap / n, n times)",
            m.itl.clone(),
        );
        registry.register(
            "output_tokens",
            "Tokens sent to clients",
            m.output_tokens.clone(),
        );
        registry.register("aborts", "Engine aborts sent", m.aborts.clone());
        registry.register(
            "http_responses",
            "HTTP responses by endpoint and status (499: the client went away first)",
            m.http.clone(),
        );
        if let Some(gauges) = engine {
            registry.register_collector(Box::new(EngineCollector(gauges)));
        }
        Metrics { registry, ..m }
    }

    /// The text exposition (OpenMetrics, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// Engine aborts sent so far.
    pub fn aborts(&self) -> u64 {
        self.aborts.get()
    }

    /// Requests that ended with `outcome` (one of [`OUTCOMES`]).
    pub fn outcome(&self, outcome: &'static str) -> u64 {
        self.requests.get_or_create(&OutcomeLabel { outcome }).get()
    }

    pub(crate) fn request_started(&self) {
        self.in_flight.inc();
    }

    pub(crate) fn request_ended(&self) {
        self.in_flight.dec();
    }

    /// `n` tokens arrived `gap` after the previous ones.
    pub(crate) fn tokens_after(&self, n: usize, gap: Duration) {
        if n == 0 {
            return;
        }
        let per = gap.as_secs_f64() / n as f64;
        for _ in 0..n {
            self.itl.observe(per);
        }
    }

    pub(crate) fn http_response(&self, endpoint: &'static str, status: u16) {
        self.http
            .get_or_create(&HttpLabel { endpoint, status })
            .inc();
    }

    fn record(&self, rec: &RequestRecord) {
        let outcome = rec.outcome.label();
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
        if let Outcome::Finished(reason) = &rec.outcome {
            let reason = match reason {
                FinishReason::Eos => "eos",
                FinishReason::Length => "length",
                FinishReason::Stop => "stop",
                FinishReason::ContentFilter => "content_filter",
                // Not a finished outcome by the adapter's rules; counted as an error.
                FinishReason::Error(_) | FinishReason::Cancelled => "error",
            };
            self.finish_reasons
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
        if let Some(ttft) = rec.ttft {
            self.ttft.observe(ttft.as_secs_f64());
        }
        self.output_tokens.inc_by(u64::from(rec.output_tokens));
    }
}

/// Feeds [`Metrics`] from the adapter.
#[derive(Debug, Clone)]
pub(crate) struct MetricsObserver(pub(crate) Arc<Metrics>);

impl Observer for MetricsObserver {
    fn on_record(&self, record: &RequestRecord) {
        self.0.record(record);
    }

    fn on_abort(&self, _request_id: &str) {
        self.0.aborts.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(outcome: Outcome) -> RequestRecord {
        let mut record = RequestRecord::new("r", outcome);
        record.ttft = Some(Duration::from_micros(700));
        record.output_tokens = 3;
        record
    }

    #[test]
    fn records_land_in_their_series() {
        let m = Arc::new(Metrics::new(Some(Arc::new(|| EngineGauges {
            live_sequences: 2,
            queue_length: 1,
            aborts_received: 5,
        }))));
        let obs = MetricsObserver(m.clone());
        obs.on_record(&record(Outcome::Finished(FinishReason::Length)));
        obs.on_record(&record(Outcome::Cancelled));
        obs.on_abort("r");
        m.tokens_after(4, Duration::from_millis(2));
        m.http_response("/v1/completions", 200);
        let text = m.encode();
        for line in [
            "tether_requests_total{outcome=\"finished\"} 1",
            "tether_requests_total{outcome=\"cancelled\"} 1",
            "tether_requests_total{outcome=\"dropped\"} 0",
            "tether_request_finish_reasons_total{reason=\"length\"} 1",
            "tether_aborts_total 1",
            "tether_output_tokens_total 6",
            "tether_time_to_first_token_seconds_bucket{le=\"0.0007\"} 2",
            "tether_time_to_first_token_seconds_bucket{le=\"0.0006\"} 0",
            "tether_inter_token_latency_seconds_count 4",
            "tether_http_responses_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
            "tether_engine_live_sequences 2",
            "tether_engine_aborts_received_total 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.outcome("cancelled"), 1);
    }
}
