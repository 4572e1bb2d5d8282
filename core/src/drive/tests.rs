//! Unit tests of the driver's small pieces; the behaviour is tested on real runtimes by
//! `tests/` and on a manual one by `core/tests/props.rs`.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use super::*;
use crate::engine::{BoxFuture, ChunkStream, EngineConfig, GenerateContext, SupportedParams};

#[derive(Debug)]
struct Never;

impl AsyncTimer for Never {
    fn reset(self: Pin<&mut Self>, _deadline: Instant) {}
    fn poll(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<()> {
        Poll::Pending
    }
}

/// A clock stopped at `.0`, timers that never fire, spawned futures dropped unpolled.
#[derive(Debug)]
pub(super) struct Frozen(pub(super) Instant);

impl Runtime for Frozen {
    fn spawn(&self, future: SpawnFuture) {
        drop(future);
    }
    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(Never)
    }
    fn now(&self) -> Instant {
        self.0
    }
}

/// An engine that refuses every request.
pub(super) struct Idle;

impl LlmEngine for Idle {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            Ok(EngineConfig {
                model: "idle".into(),
                worker_id,
                max_concurrency: None,
                supported: SupportedParams::NONE,
            })
        })
    }
    fn generate(
        &self,
        _request: Request,
        _context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async { Err(EngineError::invalid_argument("idle")) })
    }
    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A request of `mode` on `adapter`, as the driver's shared part alone (no stream, no
/// engine call), created at `at`; its context is named after it ("r").
pub(super) fn shared_part(adapter: &Adapter, mode: Mode, at: Instant) -> Arc<shared::Shared> {
    Arc::new(shared::Shared::new(
        crate::lifecycle::SharedState::new(crate::lifecycle::State::new(mode)),
        adapter.inner.clone(),
        Context::new("r"),
        None,
        at,
    ))
}

#[test]
fn an_arc_of_a_runtime_is_that_runtime() {
    let at = Instant::now() + Duration::from_secs(7);
    let inner = Arc::new(CountingRuntime::new(Frozen(at)));
    let rt: &dyn Runtime = &inner;
    rt.spawn(Box::pin(async {}));
    drop(rt.sleep_until(at));
    assert_eq!(rt.now(), at);
    assert_eq!((inner.spawned(), inner.timers()), (1, 1));
}

#[test]
fn adapter_shows_its_config_and_runtime() {
    let config = AdapterConfig::default()
        .mode(Mode::Decode)
        .cancel_grace(None);
    let adapter = Adapter::new(Arc::new(Idle), Frozen(Instant::now()), config);
    assert_eq!(adapter.config().mode, Mode::Decode);
    assert_eq!(adapter.config().cancel_grace, None);
    let shown = format!("{adapter:?}");
    assert!(shown.starts_with("Adapter { runtime: Frozen("), "{shown}");
    assert!(
        shown.contains(
            "config: AdapterConfig { mode: Decode, deferral_deadline: 30s, cancel_grace: None, \
             first_token_timeout: None, inter_token_timeout: None, observer: false, spans: true, \
             kill_on_drop: false, trace_id_hook: false }"
        ),
        "{shown}"
    );
}

#[test]
fn an_observer_shows_as_dyn_observer_and_ignores_aborts_by_default() {
    struct Quiet;
    impl Observer for Quiet {
        fn on_record(&self, _record: &RequestRecord) {}
    }
    let observer: Arc<dyn Observer> = Arc::new(Quiet);
    observer.on_abort("r");
    assert_eq!(format!("{observer:?}"), "dyn Observer");
}

#[test]
fn the_engine_side_and_the_request_builder_show_what_they_hold() {
    let engine: Arc<dyn LlmEngine> = Arc::new(Idle);
    assert_eq!(format!("{engine:?}"), "dyn LlmEngine");
    let gctx = GenerateContext::new(Context::new("c"), "r");
    assert_eq!(
        format!("{gctx:?}"),
        "GenerateContext { request_id: \"r\", context: Context { id: \"c\", level: Live }, \
         metadata: Metadata { pairs: [] }, .. }"
    );
    let adapter = Adapter::new(engine, Frozen(Instant::now()), AdapterConfig::default());
    let shown = format!(
        "{:?}",
        adapter
            .request(Request::new("r", "m", vec![1]))
            .kill_on_drop(true)
            .on_record(|_| {})
            .metadata("tenant", "a")
    );
    assert!(
        shown.starts_with("Generate { request_id: \"r\", context: None, limits: Limits {"),
        "{shown}"
    );
    assert!(
        shown.contains(
            "kill_on_drop: true }, on_record: true, metadata: Metadata { pairs: [(\"tenant\", \"a\")] } }"
        ),
        "{shown}"
    );
}

#[test]
fn queue_times_count_in_nanoseconds_and_saturate_below_the_end_marker() {
    let start = Instant::now();
    let adapter = Adapter::new(Arc::new(Idle), Frozen(start), AdapterConfig::default());
    let year = Duration::from_secs(365 * 24 * 3600);
    // 300 years: still counted exactly (u64 nanoseconds reach 584 years).
    let shared = shared_part(&adapter, crate::protocol::Mode::Aggregated, start);
    shared.mark_scheduled(start + 300 * year);
    assert_eq!(shared.queue_time(), Some(300 * year));
    // 600 years: the longest time there is, never "none" and never the end's marker.
    let shared = shared_part(&adapter, crate::protocol::Mode::Aggregated, start);
    shared.mark_scheduled(start + 600 * year);
    let longest = Duration::from_nanos(u64::MAX - 2);
    assert_eq!(shared.queue_time(), Some(longest));
    shared.end_queue_time();
    assert_eq!(
        shared.queue_time(),
        Some(longest),
        "a signal that came stays"
    );
    // Ended without a signal: none, and a late signal changes nothing.
    let shared = shared_part(&adapter, crate::protocol::Mode::Aggregated, start);
    shared.end_queue_time();
    shared.mark_scheduled(start + year);
    assert_eq!(shared.queue_time(), None);
}
