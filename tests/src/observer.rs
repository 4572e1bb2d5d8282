//! [`RecordingObserver`]: keeps every [`RequestRecord`] and every abort decision, and
//! checks each abort decision against the engine's state at that very moment.

use std::sync::{Mutex, MutexGuard, PoisonError};

use tether_core::{Observer, RequestRecord};

use crate::engine::ScriptEngine;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Seen {
    records: Vec<RequestRecord>,
    aborts: Vec<String>,
    aborts_after_end: Vec<String>,
}

/// An [`Observer`] that keeps everything it is told.
///
/// `on_abort` runs synchronously when tether *decides* to abort (before the abort task
/// is spawned), so counts read from here are exact without waiting for any task. When
/// built with [`RecordingObserver::watching`], each decision is also checked against
/// whether the engine's stream had already ended at that moment: such an abort breaks
/// rule 1 whatever the task scheduling.
#[derive(Debug, Default)]
pub struct RecordingObserver {
    seen: Mutex<Seen>,
    engine: Option<ScriptEngine>,
}

impl RecordingObserver {
    /// An observer that only records.
    pub fn new() -> RecordingObserver {
        RecordingObserver::default()
    }

    /// An observer that also checks each abort decision against `engine`.
    pub fn watching(engine: &ScriptEngine) -> RecordingObserver {
        RecordingObserver {
            seen: Mutex::default(),
            engine: Some(engine.clone()),
        }
    }

    /// Every record, in the order they arrived.
    pub fn records(&self) -> Vec<RequestRecord> {
        lock(&self.seen).records.clone()
    }

    /// The records for request `id`.
    pub fn records_of(&self, id: &str) -> Vec<RequestRecord> {
        lock(&self.seen)
            .records
            .iter()
            .filter(|r| *r.id == *id)
            .cloned()
            .collect()
    }

    /// The one record of request `id`.
    ///
    /// # Panics
    /// If there is not exactly one.
    pub fn record(&self, id: &str) -> RequestRecord {
        let mut recs = self.records_of(id);
        assert_eq!(recs.len(), 1, "records of {id}: {recs:?}");
        recs.remove(0)
    }

    /// Abort decisions for request `id`.
    pub fn aborts(&self, id: &str) -> usize {
        lock(&self.seen).aborts.iter().filter(|a| *a == id).count()
    }

    /// Abort decisions over all requests.
    pub fn total_aborts(&self) -> usize {
        lock(&self.seen).aborts.len()
    }

    /// Ids whose abort was decided after the engine's stream had ended.
    pub fn aborts_after_end(&self) -> Vec<String> {
        lock(&self.seen).aborts_after_end.clone()
    }
}

impl Observer for RecordingObserver {
    fn on_record(&self, record: &RequestRecord) {
        lock(&self.seen).records.push(record.clone());
    }

    fn on_abort(&self, request_id: &str) {
        let after_end = self.engine.as_ref().is_some_and(|e| e.ended(request_id));
        let mut seen = lock(&self.seen);
        seen.aborts.push(request_id.to_owned());
        if after_end {
            seen.aborts_after_end.push(request_id.to_owned());
        }
    }
}
