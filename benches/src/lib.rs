//! Shared code for the benches: the in-memory [`engine`], the [`minimal`] floor
//! wrapper, the reference-design [`baseline`], the executors they run on
//! ([`harness`]) and the helpers of the plain (non-criterion) bench binaries
//! ([`report`]).
//!
//! Nothing here is tether: it is what tether is measured with and against.
#![forbid(unsafe_code)]

pub mod baseline;
pub mod engine;
pub mod harness;
pub mod minimal;
pub mod report;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tether_core::drive::{AdapterConfig, Observer, RequestRecord};

pub use baseline::{Baseline, BaselineStream};
pub use engine::{script, BenchEngine, Tail};
pub use futures_lite::future::yield_now;
pub use harness::{Flavor, Harness, Spawner, TaskCount};
pub use minimal::Minimal;

/// An observer that only counts, as cheap as an observer can be.
#[derive(Debug, Default)]
pub struct CountingObserver {
    records: AtomicU64,
    aborts: AtomicU64,
}

impl CountingObserver {
    /// A fresh counter.
    pub fn new() -> Arc<CountingObserver> {
        Arc::new(CountingObserver::default())
    }

    /// Records received.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Aborts reported.
    pub fn aborts(&self) -> u64 {
        self.aborts.load(Ordering::Relaxed)
    }
}

impl Observer for CountingObserver {
    fn on_record(&self, record: &RequestRecord) {
        std::hint::black_box(record);
        // Relaxed: a statistic, read after the bench joined its tasks.
        self.records.fetch_add(1, Ordering::Relaxed);
    }

    fn on_abort(&self, request_id: &str) {
        std::hint::black_box(request_id);
        self.aborts.fetch_add(1, Ordering::Relaxed);
    }
}

/// The adapter configuration the benches use unless they measure spans: spans off,
/// an observer on, everything else default (no timeouts configured).
pub fn tether_config(observer: Arc<CountingObserver>) -> AdapterConfig {
    AdapterConfig::default().spans(false).observer(observer)
}
