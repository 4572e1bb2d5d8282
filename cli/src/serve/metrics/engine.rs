//! The engine's own gauges in `/metrics` ([`EngineGauges`], read through a
//! [`GaugeFn`] at every scrape): live sequences, queue length, aborts received.
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
    /// `abort` calls the engine received.
    pub aborts_received: u64,
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
