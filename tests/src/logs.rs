//! [`LogCapture`]: tether's log events (target [`LOG_TARGET`](tether_core::drive::LOG_TARGET))
//! as data, for the tests that check them.
//!
//! Events come from whatever thread tether acts on: the consumer's, a context listener
//! on the thread that called `stop`, the watchdog and abort tasks on the runtime's
//! workers (smol's global executor runs them on its own threads). So the capture is the
//! process's global subscriber, installed once by [`LogCapture::global`], and a test
//! reads the events of its own request ids ([`unique_id`]): tests of one binary run in
//! parallel, so only the test binary that checks logs may use it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use tether_core::drive::LOG_TARGET;

use crate::spans::Fields;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One captured log event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedEvent {
    /// Its level.
    pub level: Level,
    /// Its message (the `message` field).
    pub message: String,
    /// Every other field, as text (strings verbatim, numbers and booleans with
    /// `Display`).
    pub fields: BTreeMap<String, String>,
}

impl CapturedEvent {
    /// The value of `field`, if present.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }
}

/// The process-wide capture of tether's log events.
#[derive(Debug, Default)]
pub struct LogCapture {
    events: Mutex<Vec<CapturedEvent>>,
}

static CAPTURE: OnceLock<&'static LogCapture> = OnceLock::new();

impl LogCapture {
    /// The capture, installed as the global default subscriber on first use.
    ///
    /// # Panics
    /// If another global subscriber was installed first.
    pub fn global() -> &'static LogCapture {
        CAPTURE.get_or_init(|| {
            let capture: &'static LogCapture = Box::leak(Box::default());
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture))
                .expect("the log capture is the only global subscriber of its binary");
            capture
        })
    }

    /// The events of request `id`, in the order they were emitted.
    pub fn events_for(&self, id: &str) -> Vec<CapturedEvent> {
        lock(&self.events)
            .iter()
            .filter(|e| e.get("request_id") == Some(id))
            .cloned()
            .collect()
    }

    /// The `(level, message)` of each event of request `id`, in order.
    pub fn messages_for(&self, id: &str) -> Vec<(Level, String)> {
        self.events_for(id)
            .into_iter()
            .map(|e| (e.level, e.message))
            .collect()
    }
}

/// `name` made unique in this process (`name-7`): the request id of a test that reads
/// its own events from the shared capture.
pub fn unique_id(name: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{name}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

impl<S: Subscriber> Layer<S> for &'static LogCapture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != LOG_TARGET {
            return;
        }
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let message = fields.remove("message").unwrap_or_default();
        lock(&self.events).push(CapturedEvent {
            level: *event.metadata().level(),
            message,
            fields,
        });
    }
}
