//! Traces that stitch across workers (issue 14), end to end over OTLP/HTTP
//! (`cargo test -p tether-cli --features otel --test otel_stitching`).
//!
//! A prefill adapter and a decode adapter (two `tether_core::Adapter`s over SimEngine
//! on tokio, with the `otel` feature's `OtelTraceIds` hook) export their
//! `engine.generate` spans through the real OTLP/HTTP exporter, batched as
//! `tether serve --otlp-endpoint` does, to a collector on 127.0.0.1 that decodes the
//! protobuf export requests. The decode request's `migration_link` is the prefill
//! worker's `worker_trace_link`; both spans must land in one trace, the decode span a
//! child of the prefill span.
#![cfg(feature = "otel")]

mod otel_support;

use std::sync::Arc;

use futures_util::StreamExt;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{Span, SpanFlags};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tether_cli::serve::otel::{self, OtelTraceIds};
use tether_core::protocol::RawTraceLink;
use tether_core::{
    Adapter, AdapterConfig, Annotated, Chunk, Context, FinishReason, LlmEngine, Mode, Request,
    TraceLink,
};
use tether_engines::{SimConfig, SimEngine};
use tether_tokio::TokioRuntime;
use tracing_subscriber::layer::SubscriberExt;

use otel_support::Collector;

/// The export pipeline of `tether serve --otlp-endpoint` (OTLP/HTTP protobuf, batch
/// processor, [`otel::layer`]) to a fresh [`Collector`], with the layer as this
/// thread's default subscriber, and a current-thread runtime so the adapters' spans are
/// created under it.
struct Pipeline {
    rt: tokio::runtime::Runtime,
    _subscriber: tracing::subscriber::DefaultGuard,
    provider: SdkTracerProvider,
    collector: Collector,
    /// One pipeline at a time in this binary: each installs a thread-local subscriber,
    /// and tracing-core rebuilds every callsite's interest when one comes or goes; a
    /// span callsite first hit while another test's subscriber is being dropped can
    /// be cached as disabled (CI once exported 2 of 3 spans under load).
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// Serializes the pipelines (see [`Pipeline::_one_at_a_time`]).
static PIPELINES: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Pipeline {
    fn new() -> Pipeline {
        // A test that failed while holding it poisoned it; the next may still run.
        let one_at_a_time = PIPELINES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let collector = Collector::start();
        // Built outside any runtime: the exporter's blocking HTTP client must not be
        // created in one.
        let provider = otel::otlp_provider(&format!("http://{}", collector.addr)).unwrap();
        let subscriber = tracing_subscriber::registry().with(otel::layer(&provider));
        let guard = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Pipeline {
            rt,
            _subscriber: guard,
            provider,
            collector,
            _one_at_a_time: one_at_a_time,
        }
    }

    /// Flush the batch and return the `engine.generate` spans the collector received.
    /// The flush returns once the exporter's HTTP request was answered, so nothing is
    /// still on its way.
    fn flush(&self) -> Vec<Span> {
        self.provider.force_flush().expect("flush");
        self.collector
            .spans()
            .into_iter()
            .filter(|s| s.name == "engine.generate")
            .collect()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Before the collector goes: shutting down exports what is left.
        let _ = self.provider.shutdown();
    }
}

/// A started SimEngine behind an adapter with `config`, on the current tokio runtime.
struct Worker {
    engine: Arc<dyn LlmEngine>,
    adapter: Adapter,
}

impl Worker {
    async fn start(config: AdapterConfig) -> Worker {
        let engine: Arc<dyn LlmEngine> = Arc::new(SimEngine::new(
            SimConfig::default(),
            TokioRuntime::current(),
        ));
        engine.start(0).await.expect("engine start");
        let adapter = Adapter::new(engine.clone(), TokioRuntime::current(), config);
        Worker { engine, adapter }
    }

    /// Every item of `request`'s stream; the stream is dropped (its span closed) when
    /// this returns.
    async fn run(&self, request: Request) -> Vec<Annotated<Chunk>> {
        let context = Context::new(request.id.as_str());
        let stream = self
            .adapter
            .generate(request, context)
            .await
            .expect("generate");
        stream.collect().await
    }

    async fn stop(self) {
        self.engine.cleanup().await.expect("engine cleanup");
    }
}

fn request(id: &str, max_tokens: u32) -> Request {
    Request::new(id, "sim", vec![11, 12, 13, 14]).with_max_tokens(max_tokens)
}

/// The first chunk that carries a token.
fn first_token(items: &[Annotated<Chunk>]) -> &Chunk {
    items
        .iter()
        .filter_map(|i| i.data.as_ref())
        .find(|c| c.has_tokens())
        .expect("a token")
}

/// The terminal chunk, which must be the last item.
fn terminal(items: &[Annotated<Chunk>]) -> &Chunk {
    let last = items.last().expect("items");
    assert!(last.is_terminal());
    last.data.as_ref().expect("a terminal chunk")
}

/// The span's exported ids as a link.
fn ids(span: &Span) -> TraceLink {
    let trace: [u8; 16] = span
        .trace_id
        .as_slice()
        .try_into()
        .expect("16-byte trace id");
    let id: [u8; 8] = span.span_id.as_slice().try_into().expect("8-byte span id");
    TraceLink::from_ids(u128::from_be_bytes(trace), u64::from_be_bytes(id)).expect("valid ids")
}

/// A string, bool or integer attribute, as text.
fn attr(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        other => panic!("{key}: unexpected value {other:?}"),
    }
}

/// The span whose attribute `key` is `value`; exactly one must match.
fn only<'a>(spans: &'a [Span], key: &str, value: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| attr(s, key).as_deref() == Some(value))
        .collect();
    assert_eq!(found.len(), 1, "spans with {key}={value}");
    found[0]
}

fn status(span: &Span) -> (StatusCode, &str) {
    match &span.status {
        None => (StatusCode::Unset, ""),
        Some(s) => (
            StatusCode::try_from(s.code).expect("a known status code"),
            s.message.as_str(),
        ),
    }
}

fn parent_is_remote(span: &Span) -> bool {
    let has = SpanFlags::ContextHasIsRemoteMask as u32;
    let is = SpanFlags::ContextIsRemoteMask as u32;
    assert_ne!(
        span.flags & has,
        0,
        "the exporter says whether the parent is remote"
    );
    span.flags & is != 0
}

#[test]
fn prefill_and_decode_spans_share_one_trace() {
    let p = Pipeline::new();
    let (prefill_items, decode_items, link) = p.rt.block_on(async {
        let hook = Arc::new(OtelTraceIds);
        let prefill = Worker::start(
            AdapterConfig::default()
                .mode(Mode::Prefill)
                .trace_id_hook(hook.clone()),
        )
        .await;
        let decode = Worker::start(
            AdapterConfig::default()
                .mode(Mode::Decode)
                .trace_id_hook(hook),
        )
        .await;
        let prefill_items = prefill.run(request("prefill-1", 1)).await;
        let link = terminal(&prefill_items)
            .worker_trace_link
            .expect("the prefill terminal carries the worker's link");
        let mut migrated = request("decode-1", 3);
        migrated.migration_link = Some(link);
        let decode_items = decode.run(migrated).await;
        prefill.stop().await;
        decode.stop().await;
        (prefill_items, decode_items, link)
    });
    let spans = p.flush();
    assert_eq!(spans.len(), 2, "one span per request");
    let prefill = only(&spans, "disagg_role", "prefill");
    let decode = only(&spans, "disagg_role", "decode");
    assert_eq!(attr(prefill, "finish_reason").as_deref(), Some("length"));
    assert_eq!(attr(decode, "finish_reason").as_deref(), Some("length"));
    assert_eq!(attr(decode, "output_tokens").as_deref(), Some("3"));
    assert_eq!(
        terminal(&decode_items).finish_reason,
        Some(FinishReason::Length)
    );

    // The prefill worker hands on its span's exported ids, on its first token and on
    // its terminal.
    assert_eq!(link, ids(prefill));
    assert_eq!(
        first_token(&prefill_items).worker_trace_link,
        Some(ids(prefill))
    );
    assert!(
        prefill.parent_span_id.is_empty(),
        "the prefill span is a root"
    );
    assert!(prefill.links.is_empty());

    // One trace: the decode span is the prefill span's child, through a remote parent.
    assert_eq!(decode.trace_id, prefill.trace_id);
    assert_eq!(decode.parent_span_id, prefill.span_id);
    assert_ne!(decode.span_id, prefill.span_id);
    assert!(parent_is_remote(decode));
    assert!(!parent_is_remote(prefill));
    // The migration is also a span link, and stays in the attributes.
    assert_eq!(decode.links.len(), 1);
    assert_eq!(decode.links[0].trace_id, prefill.trace_id);
    assert_eq!(decode.links[0].span_id, prefill.span_id);
    assert_eq!(
        attr(decode, "migration_trace_id"),
        Some(link.trace_id_hex())
    );
    assert_eq!(attr(decode, "migration_span_id"), Some(link.span_id_hex()));

    // The decode worker's own link names its own span, in the same trace.
    assert_eq!(
        first_token(&decode_items).worker_trace_link,
        Some(ids(decode))
    );
    assert_eq!(ids(decode).trace_id(), link.trace_id());
}

#[test]
fn without_a_hook_no_worker_trace_link_is_stamped() {
    let p = Pipeline::new();
    let items = p.rt.block_on(async {
        let worker = Worker::start(AdapterConfig::default().mode(Mode::Prefill)).await;
        let items = worker.run(request("prefill-1", 2)).await;
        worker.stop().await;
        items
    });
    assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Length));
    assert!(items
        .iter()
        .filter_map(|i| i.data.as_ref())
        .all(|c| c.worker_trace_link.is_none()));
    // The span was exported all the same: the missing hook is all that differs.
    let spans = p.flush();
    assert_eq!(spans.len(), 1);
    assert_eq!(attr(&spans[0], "disagg_role").as_deref(), Some("prefill"));
}

#[test]
fn a_failed_span_is_exported_as_an_error_a_cancelled_or_dropped_one_is_not() {
    let p = Pipeline::new();
    p.rt.block_on(async {
        let worker =
            Worker::start(AdapterConfig::default().trace_id_hook(Arc::new(OtelTraceIds))).await;
        // An engine error at the second token.
        let mut failing = request("failed", 4);
        failing.annotations.push("chaos:error@1".to_owned());
        let items = worker.run(failing).await;
        assert!(items.last().is_some_and(Annotated::is_error));

        // Stopped by its caller after the first token.
        let context = Context::new("cancelled");
        let mut stream = Box::pin(
            worker
                .adapter
                .generate(request("cancelled", 1000), context.clone())
                .await
                .expect("generate"),
        );
        let first = stream.next().await.expect("a first item");
        assert!(first.data.as_ref().is_some_and(Chunk::has_tokens));
        context.stop();
        let rest: Vec<Annotated<Chunk>> = stream.collect().await;
        assert_eq!(terminal(&rest).finish_reason, Some(FinishReason::Cancelled));

        // Dropped by its caller after the first token.
        let mut stream = Box::pin(
            worker
                .adapter
                .generate(request("dropped", 1000), Context::new("dropped"))
                .await
                .expect("generate"),
        );
        assert!(stream.next().await.is_some());
        drop(stream);
        worker.stop().await;
    });
    let spans = p.flush();
    assert_eq!(spans.len(), 3);

    let failed = only(&spans, "finish_reason", "error");
    assert_eq!(status(failed), (StatusCode::Error, "BackendUnknown"));
    assert_eq!(
        attr(failed, "error_kind").as_deref(),
        Some("BackendUnknown")
    );
    assert_eq!(attr(failed, "cancelled").as_deref(), Some("false"));

    let cancelled = only(&spans, "finish_reason", "cancelled");
    assert_eq!(status(cancelled), (StatusCode::Unset, ""));
    assert_eq!(attr(cancelled, "cancelled").as_deref(), Some("true"));

    let dropped = only(&spans, "finish_reason", "Dropped");
    assert_eq!(status(dropped), (StatusCode::Unset, ""));
    assert_eq!(attr(dropped, "cancelled").as_deref(), Some("true"));
}

#[test]
fn a_malformed_migration_link_stays_attributes_neither_parent_nor_link() {
    let p = Pipeline::new();
    let items = p.rt.block_on(async {
        let worker = Worker::start(
            AdapterConfig::default()
                .mode(Mode::Decode)
                .trace_id_hook(Arc::new(OtelTraceIds)),
        )
        .await;
        let mut migrated = request("decode-1", 2);
        migrated.malformed_migration_link = Some(RawTraceLink {
            trace_id: "not-a-trace-id".to_owned(),
            span_id: "b7ad6b7169203331".to_owned(),
        });
        let items = worker.run(migrated).await;
        worker.stop().await;
        items
    });
    assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Length));
    let spans = p.flush();
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert!(span.parent_span_id.is_empty(), "a root span");
    assert!(span.links.is_empty());
    assert_eq!(
        attr(span, "migration_trace_id").as_deref(),
        Some("not-a-trace-id")
    );
    assert_eq!(
        attr(span, "migration_span_id").as_deref(),
        Some("b7ad6b7169203331")
    );
    assert_eq!(first_token(&items).worker_trace_link, Some(ids(span)));
}

#[test]
fn a_local_parent_stays_and_the_migration_is_a_link() {
    let p = Pipeline::new();
    let local = SpanContext::new(
        TraceId::from(0x1111_u128),
        SpanId::from(0x2222_u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let migration = TraceLink::from_ids(0x3333, 0x4444).expect("valid ids");
    p.rt.block_on(async {
        let worker = Worker::start(
            AdapterConfig::default()
                .mode(Mode::Decode)
                .trace_id_hook(Arc::new(OtelTraceIds)),
        )
        .await;
        let mut migrated = request("decode-1", 2);
        migrated.migration_link = Some(migration);
        // The application's own context around the request: the span is created (and
        // entered for the engine's setup) while it is current.
        let stream = {
            let _attached = opentelemetry::Context::new()
                .with_remote_span_context(local.clone())
                .attach();
            worker
                .adapter
                .generate(migrated, Context::new("decode-1"))
                .await
                .expect("generate")
        };
        let items: Vec<Annotated<Chunk>> = stream.collect().await;
        assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Length));
        worker.stop().await;
    });
    let spans = p.flush();
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.trace_id, local.trace_id().to_bytes());
    assert_eq!(span.parent_span_id, local.span_id().to_bytes());
    assert_eq!(span.links.len(), 1);
    assert_eq!(span.links[0].trace_id, migration.trace_id().to_be_bytes());
    assert_eq!(span.links[0].span_id, migration.span_id().to_be_bytes());
}
