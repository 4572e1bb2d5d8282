//! The engine's own gauges in `/metrics` ([`EngineGauges`], read through a
//! [`GaugeFn`] at every scrape): live sequences, queue length, requests accepted,
//! aborts received and late aborts. They are the engine's books, kept apart from
//! tether's own counters, so that `/metrics` can show the two agree (every abort tether
//! sent was received, none twice; no request was accepted twice behind a proxy).
//!
//! Owns the collector that encodes them; nothing here counts requests.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// A snapshot of an engine's gauges, read at every scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineGauges {
    /// Sequences holding a batch slot (or KV cache) now.
    pub live_sequences: u64,
    /// Requests waiting for one.
    pub queue_length: u64,
    /// Requests the engine's `generate` accepted since it was created.
    pub accepted: u64,
    /// `abort` calls the engine received.
    pub aborts_received: u64,
    /// Aborts that found nothing the engine could still expect an abort for: a second
    /// abort of one request, or one for an id it never saw (SimEngine tells them
    /// apart; 0 for an engine that cannot).
    pub late_aborts: u64,
}

/// Reads an engine's gauges.
pub type GaugeFn = Arc<dyn Fn() -> EngineGauges + Send + Sync>;

/// Encodes what its [`GaugeFn`] reads, at every scrape.
pub(super) struct EngineCollector(pub(super) GaugeFn);

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
        let counters = [
            (
                "engine_requests_accepted",
                "Requests the engine's generate accepted",
                g.accepted,
            ),
            (
                "engine_aborts_received",
                "Aborts the engine received",
                g.aborts_received,
            ),
            (
                "engine_late_aborts",
                "Aborts that found nothing to abort: a second abort of a request, or one for an unknown id",
                g.late_aborts,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}
