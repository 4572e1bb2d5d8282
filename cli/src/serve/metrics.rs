//! [`Metrics`]: what `tether serve` exports at `/metrics` (Prometheus/OpenMetrics text
//! via prometheus-client), fed one record per request by the request's record callback
//! (`Metrics::record`), aborts by the [`Observer`] and responses by the access
//! middleware.
//!
//! Owns the metric names, labels and buckets; nothing here handles a request. Names:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `tether_requests_in_flight` | gauge | |
//! | `tether_requests_total` | counter | `outcome`: finished, cancelled, failed, dropped, timed_out; `endpoint`: completions, chat; `stream`: true, false |
//! | `tether_request_finish_reasons_total` | counter | `reason`: eos, length, stop, content_filter, error (finished requests only); `endpoint`; `stream` |
//! | `tether_cancellations_total` | counter | `cause`: client_disconnect, shutdown, timeout, caller, none; `endpoint`; `stream` (requests whose outcome is cancelled, dropped or timed_out) |
//! | `tether_client_disconnects_total` | counter | `endpoint` (as in `tether_http_responses_total`): the client left before its response was complete |
//! | `tether_time_to_first_token_seconds` | histogram | |
//! | `tether_inter_token_latency_seconds` | histogram | (one observation per token; a multi-token chunk spreads its gap) |
//! | `tether_request_duration_seconds` | histogram | (from generate to the request's end, every request) |
//! | `tether_queue_time_seconds` | histogram | (requests whose engine signalled scheduling only) |
//! | `tether_prompt_tokens` | histogram | (every request) |
//! | `tether_output_tokens_total` | counter | |
//! | `tether_aborts_total` | counter | (engine aborts the adapter sent) |
//! | `tether_http_responses_total` | counter | `endpoint`, `status` (499: the client went away before a response) |
//! | `tether_http_connections` | gauge | (HTTP connections open now; refused ones are not counted) |
//! | `tether_http_connections_refused_total` | counter | (connections answered 503 and closed: `--max-connections` was reached) |
//! | `tether_engine_live_sequences` | gauge | (SimEngine slots / TinyEngine sequences held now) |
//! | `tether_engine_queue_length` | gauge | |
//! | `tether_engine_aborts_received_total` | counter | |

mod engine;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tether_core::drive::{Observer, Outcome, RequestRecord};
use tether_core::protocol::FinishReason;
use tether_core::Cause;

pub use engine::{EngineGauges, GaugeFn};

use engine::EngineCollector;

/// Histogram buckets in seconds: 0.1 ms steps below 1 ms, then a coarse 1-2.5-5 ladder.
pub const LATENCY_BUCKETS: [f64; 24] = [
    0.0005, 0.0006, 0.0007, 0.0008, 0.0009, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of whole-request times (duration, queue time), in seconds: from 0.5 ms (a
/// simulated request) to 30 minutes (a long generation, or a long queue under load).
pub const DURATION_BUCKETS: [f64; 20] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Buckets of prompt lengths, in tokens: a 1-2-5 ladder up to 100 000.
pub const PROMPT_TOKEN_BUCKETS: [f64; 16] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0, 100000.0,
];

/// The request outcomes, as labelled.
pub const OUTCOMES: [&str; 5] = ["finished", "cancelled", "failed", "dropped", "timed_out"];

/// The finish reasons of finished requests, as labelled.
pub const FINISH_REASONS: [&str; 5] = ["eos", "length", "stop", "content_filter", "error"];

/// The `endpoint` label of the request series: `completions` (`/v1/completions`) and
/// `chat` (`/v1/chat/completions`).
pub const ENDPOINTS: [&str; 2] = ["completions", "chat"];

/// The cancellation causes `tether serve` produces, whose series exist from the start
/// (a client's disconnect, a shutdown's kill after its grace period, a first-token or
/// inter-token timeout). `caller` and `none` (a cancellation nobody gave a cause, such
/// as an engine that cancelled on its own) appear when they first happen.
pub const CAUSES: [&str; 3] = ["client_disconnect", "shutdown", "timeout"];

/// The `endpoint` label of HTTP series (`tether_http_responses_total`,
/// `tether_client_disconnects_total`): the known paths, and `other`.
pub const HTTP_ENDPOINTS: [&str; 11] = [
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/health/canary",
    "/ping",
    "/version",
    "/metrics",
    "other",
];

/// The `endpoint` label of an HTTP request's path.
pub(crate) fn http_endpoint(path: &str) -> &'static str {
    HTTP_ENDPOINTS
        .iter()
        .copied()
        .find(|known| *known == path)
        .unwrap_or("other")
}

/// Which series a request's record lands in: its endpoint (one of [`ENDPOINTS`]) and
/// whether it was streamed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RequestLabels {
    pub(crate) endpoint: &'static str,
    pub(crate) stream: bool,
}

impl RequestLabels {
    fn stream(self) -> &'static str {
        if self.stream {
            "true"
        } else {
            "false"
        }
    }

    fn all() -> impl Iterator<Item = RequestLabels> {
        ENDPOINTS.into_iter().flat_map(|endpoint| {
            [false, true]
                .into_iter()
                .map(move |stream| RequestLabels { endpoint, stream })
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
    endpoint: &'static str,
    stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
    endpoint: &'static str,
    stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
    endpoint: &'static str,
    stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabel {
    endpoint: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

/// Every metric `tether serve` exports. Cheap to share (`Arc`), lock-free to update.
pub struct Metrics {
    registry: Registry,
    in_flight: Gauge,
    requests: Family<OutcomeLabel, Counter>,
    finish_reasons: Family<ReasonLabel, Counter>,
    cancellations: Family<CauseLabel, Counter>,
    client_disconnects: Family<EndpointLabel, Counter>,
    ttft: Histogram,
    itl: Histogram,
    duration: Histogram,
    queue_time: Histogram,
    prompt_tokens: Histogram,
    output_tokens: Counter,
    aborts: Counter,
    http: Family<HttpLabel, Counter>,
    connections: Gauge,
    connections_refused: Counter,
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
    /// A fresh set, every outcome, finish reason and [`CAUSES`] cause at zero for every
    /// endpoint and both stream values; `engine` adds the engine's gauges to every
    /// scrape.
    pub fn new(engine: Option<GaugeFn>) -> Metrics {
        let mut registry = Registry::with_prefix("tether");
        let m = Metrics {
            registry: Registry::default(),
            in_flight: Gauge::default(),
            requests: Family::default(),
            finish_reasons: Family::default(),
            cancellations: Family::default(),
            client_disconnects: Family::default(),
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(LATENCY_BUCKETS),
            duration: Histogram::new(DURATION_BUCKETS),
            queue_time: Histogram::new(DURATION_BUCKETS),
            prompt_tokens: Histogram::new(PROMPT_TOKEN_BUCKETS),
            output_tokens: Counter::default(),
            aborts: Counter::default(),
            http: Family::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
        };
        for labels in RequestLabels::all() {
            let (endpoint, stream) = (labels.endpoint, labels.stream());
            for outcome in OUTCOMES {
                m.requests.get_or_create_owned(&OutcomeLabel {
                    outcome,
                    endpoint,
                    stream,
                });
            }
            for reason in FINISH_REASONS {
                m.finish_reasons.get_or_create_owned(&ReasonLabel {
                    reason,
                    endpoint,
                    stream,
                });
            }
            for cause in CAUSES {
                m.cancellations.get_or_create_owned(&CauseLabel {
                    cause,
                    endpoint,
                    stream,
                });
            }
        }
        for endpoint in &HTTP_ENDPOINTS[..2] {
            m.client_disconnects
                .get_or_create_owned(&EndpointLabel { endpoint });
        }
        registry.register(
            "requests_in_flight",
            "Requests between generate and their end",
            m.in_flight.clone(),
        );
        registry.register(
            "requests",
            "Requests that ended, by outcome, endpoint and stream",
            m.requests.clone(),
        );
        registry.register(
            "request_finish_reasons",
            "Finished requests by the engine's finish reason",
            m.finish_reasons.clone(),
        );
        registry.register(
            "cancellations",
            "Requests cancelled, dropped or timed out, by the cause of the cancellation",
            m.cancellations.clone(),
        );
        registry.register(
            "client_disconnects",
            "HTTP requests whose client went away before the response was complete",
            m.client_disconnects.clone(),
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
            "request_duration_seconds",
            "Time from generate to the request's end",
            m.duration.clone(),
        );
        registry.register(
            "queue_time_seconds",
            "Time in the engine's queue, for requests whose engine signalled scheduling",
            m.queue_time.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt length of each request, in tokens",
            m.prompt_tokens.clone(),
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
        registry.register(
            "http_connections",
            "HTTP connections open now",
            m.connections.clone(),
        );
        registry.register(
            "http_connections_refused",
            "HTTP connections answered 503 and closed because the connection limit was reached",
            m.connections_refused.clone(),
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

    /// Requests that ended with `outcome` (one of [`OUTCOMES`]), over both endpoints
    /// and both stream values.
    pub fn outcome(&self, outcome: &'static str) -> u64 {
        RequestLabels::all()
            .map(|l| {
                self.requests
                    .get_or_create(&OutcomeLabel {
                        outcome,
                        endpoint: l.endpoint,
                        stream: l.stream(),
                    })
                    .get()
            })
            .sum()
    }

    /// Requests cancelled, dropped or timed out with `cause` (a [`Cause`] label, or
    /// `none`), over both endpoints and both stream values.
    pub fn cancellations(&self, cause: &'static str) -> u64 {
        RequestLabels::all()
            .map(|l| {
                self.cancellations
                    .get_or_create(&CauseLabel {
                        cause,
                        endpoint: l.endpoint,
                        stream: l.stream(),
                    })
                    .get()
            })
            .sum()
    }

    /// HTTP requests whose client went away before their response was complete, over
    /// every endpoint.
    pub fn client_disconnects(&self) -> u64 {
        HTTP_ENDPOINTS
            .iter()
            .map(|endpoint| {
                self.client_disconnects
                    .get_or_create(&EndpointLabel { endpoint })
                    .get()
            })
            .sum()
    }

    /// HTTP connections open now.
    pub fn connections(&self) -> i64 {
        self.connections.get()
    }

    /// HTTP connections refused (the connection limit was reached) so far.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.get()
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.dec();
    }

    pub(crate) fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    pub(crate) fn request_started(&self) {
        self.in_flight.inc();
    }

    /// The request left the in-flight gauge: call it after [`Metrics::record`], so a
    /// scrape that sees the gauge back at zero sees the request's outcome.
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

    /// The client of an HTTP request to `endpoint` (an [`HTTP_ENDPOINTS`] label) left
    /// before its response was complete.
    pub(crate) fn client_disconnect(&self, endpoint: &'static str) {
        self.client_disconnects
            .get_or_create(&EndpointLabel { endpoint })
            .inc();
    }

    /// A request is over: `rec` is its record, `labels` its series, `prompt_tokens`
    /// its prompt length and `duration` the time from generate to its end.
    ///
    /// `tether_cancellations_total` counts the outcomes `cancelled`, `dropped` and
    /// `timed_out`, labelled with the record's cause (`none` when it has none); a
    /// request stopped gracefully that still finished is a finished request, not a
    /// cancellation. So the causes of an endpoint and stream value add up to its
    /// cancelled, dropped and timed-out requests.
    pub(crate) fn record(
        &self,
        rec: &RequestRecord,
        labels: RequestLabels,
        prompt_tokens: u32,
        duration: Duration,
    ) {
        let (endpoint, stream) = (labels.endpoint, labels.stream());
        let outcome = rec.outcome.label();
        self.requests
            .get_or_create(&OutcomeLabel {
                outcome,
                endpoint,
                stream,
            })
            .inc();
        match &rec.outcome {
            Outcome::Finished(reason) => {
                let reason = match reason {
                    FinishReason::Eos => "eos",
                    FinishReason::Length => "length",
                    FinishReason::Stop => "stop",
                    FinishReason::ContentFilter => "content_filter",
                    // Not a finished outcome by the adapter's rules; counted as an error.
                    FinishReason::Error(_) | FinishReason::Cancelled => "error",
                };
                self.finish_reasons
                    .get_or_create(&ReasonLabel {
                        reason,
                        endpoint,
                        stream,
                    })
                    .inc();
            }
            Outcome::Cancelled | Outcome::Dropped | Outcome::TimedOut => {
                let cause = rec.cause.map_or("none", Cause::label);
                self.cancellations
                    .get_or_create(&CauseLabel {
                        cause,
                        endpoint,
                        stream,
                    })
                    .inc();
            }
            Outcome::Failed(_) => {}
        }
        if let Some(ttft) = rec.ttft {
            self.ttft.observe(ttft.as_secs_f64());
        }
        if let Some(queue) = rec.queue_time {
            self.queue_time.observe(queue.as_secs_f64());
        }
        self.duration.observe(duration.as_secs_f64());
        self.prompt_tokens.observe(f64::from(prompt_tokens));
        self.output_tokens.inc_by(u64::from(rec.output_tokens));
    }
}

/// Feeds [`Metrics`] the aborts the adapter sends (outcomes come through each request's
/// record callback, which knows the request's endpoint).
#[derive(Debug, Clone)]
pub(crate) struct MetricsObserver(pub(crate) Arc<Metrics>);

impl Observer for MetricsObserver {
    fn on_record(&self, _record: &RequestRecord) {}

    fn on_abort(&self, _request_id: &str) {
        self.0.aborts.inc();
    }
}
