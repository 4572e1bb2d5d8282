//! [`SpanCapture`]: a `tracing_subscriber` layer that keeps the fields of every span of
//! target [`SPAN_TARGET`](tether_core::drive::SPAN_TARGET), as strings.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tether_core::drive::SPAN_TARGET;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One captured request span.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapturedSpan {
    /// The span's id (what `worker_trace_link.span_id` must carry).
    pub id: u64,
    /// The span's name.
    pub name: String,
    /// Every field recorded so far, formatted as text (strings verbatim, numbers and
    /// booleans with `Display`). Fields never recorded are absent.
    pub fields: BTreeMap<String, String>,
    /// Whether the span was closed.
    pub closed: bool,
}

impl CapturedSpan {
    /// The value of `field`, if recorded.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }
}

/// A layer capturing request spans. Clones share the capture.
#[derive(Clone, Debug, Default)]
pub struct SpanCapture {
    spans: Arc<Mutex<Vec<CapturedSpan>>>,
}

impl SpanCapture {
    /// An empty capture.
    pub fn new() -> SpanCapture {
        SpanCapture::default()
    }

    /// Install a subscriber with this layer as the current thread's default until the
    /// guard drops (current-thread tokio and `smol::block_on` run a scenario, and the
    /// tasks it spawns on tokio, on that thread).
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    /// Every captured span, in creation order.
    pub fn spans(&self) -> Vec<CapturedSpan> {
        lock(&self.spans).clone()
    }

    /// The one captured span.
    ///
    /// # Panics
    /// If there is not exactly one.
    pub fn only(&self) -> CapturedSpan {
        let spans = self.spans();
        assert_eq!(spans.len(), 1, "captured spans: {spans:?}");
        spans.into_iter().next().expect("one span")
    }

    fn update(&self, id: &Id, f: impl FnOnce(&mut CapturedSpan)) {
        // Span ids are reused after a close: the open span with this id is the one.
        let mut spans = lock(&self.spans);
        if let Some(span) = spans
            .iter_mut()
            .rev()
            .find(|s| s.id == id.into_u64() && !s.closed)
        {
            f(span);
        }
    }
}

/// A visitor that keeps every field as text.
pub(crate) struct Fields<'a>(pub(crate) &'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%value` fields arrive here as a Debug wrapper that prints their Display.
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for SpanCapture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        if attrs.metadata().target() != SPAN_TARGET {
            return;
        }
        let mut span = CapturedSpan {
            id: id.into_u64(),
            name: attrs.metadata().name().to_owned(),
            ..CapturedSpan::default()
        };
        attrs.record(&mut Fields(&mut span.fields));
        lock(&self.spans).push(span);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        self.update(id, |span| values.record(&mut Fields(&mut span.fields)));
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        self.update(&id, |span| span.closed = true);
    }
}

/// A [`TraceIdHook`](tether_core::TraceIdHook) for tests: the link is trace
/// [`SpanIdHook::TRACE`] with the request span's own id (so a test can tell which span
/// it was asked about), or `None` for a disabled span. Counts its calls.
#[derive(Debug, Default)]
pub struct SpanIdHook {
    calls: std::sync::atomic::AtomicUsize,
}

impl SpanIdHook {
    /// The trace id every link of this hook carries.
    pub const TRACE: u128 = 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c;

    /// How many times the adapter asked.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The link this hook gives for the span `span`.
    pub fn link_for(span: &CapturedSpan) -> Option<tether_core::TraceLink> {
        tether_core::TraceLink::from_ids(SpanIdHook::TRACE, span.id)
    }
}

impl tether_core::TraceIdHook for SpanIdHook {
    fn trace_link(&self, span: &tracing::Span) -> Option<tether_core::TraceLink> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = span.id()?.into_u64();
        tether_core::TraceLink::from_ids(SpanIdHook::TRACE, id)
    }
}
