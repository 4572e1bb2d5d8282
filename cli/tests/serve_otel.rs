//! OTLP export of `engine.generate` spans (`cargo test -p tether-cli --features otel`):
//! into an in-memory exporter in-process, and over OTLP/HTTP from the binary to a fake
//! collector on 127.0.0.1. A client's `traceparent` (the request's migration link) is
//! the span's remote parent and a span link. Stitching two workers' spans into one
//! trace is `otel_stitching.rs`.
#![cfg(feature = "otel")]

mod otel_support;
mod serve_support;

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, Sampler, SdkTracerProvider, SpanData};
use otel_support::Collector;
use serde_json::json;
use serve_support::*;
use tether_cli::serve::otel::OtelTraceIds;
use tether_core::{TraceIdHook, TraceLink};
use tracing_subscriber::layer::SubscriberExt;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const SPAN: &str = "b7ad6b7169203331";

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

#[test]
fn engine_generate_spans_are_exported_as_children_of_the_migration_link() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry().with(tether_cli::serve::otel::layer(&provider));
    let _guard = tracing::subscriber::set_default(subscriber);
    // One thread: the spans are created where the subscriber is set.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(within(Duration::from_secs(20), async {
        let t = start().await;
        let body = json!({"model": "sim", "prompt": "hi", "max_tokens": 3});
        let resp = t
            .client
            .post(format!("{}/v1/completions", t.base))
            .header("traceparent", format!("00-{TRACE}-{SPAN}-01"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
        let (status, _) = t.post_raw("/v1/completions", &body.to_string()).await;
        assert_eq!(status, 200);
        t.settled().await;
        t.server.shutdown();
        t.server.wait().await;
    }));
    provider.force_flush().unwrap();
    let spans: Vec<SpanData> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "engine.generate")
        .collect();
    assert_eq!(
        spans.len(),
        2,
        "one span per request, none for anything else"
    );
    let (linked, plain): (Vec<&SpanData>, Vec<&SpanData>) =
        spans.iter().partition(|s| !s.links.is_empty());
    assert_eq!((linked.len(), plain.len()), (1, 1));
    let link = &linked[0].links.links[0];
    assert_eq!(
        link.span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    assert_eq!(link.span_context.span_id(), SpanId::from_hex(SPAN).unwrap());
    assert!(link.span_context.is_remote());
    // The client's span is also the span's (remote) parent: one trace.
    assert_eq!(
        linked[0].span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    assert_eq!(linked[0].parent_span_id, SpanId::from_hex(SPAN).unwrap());
    assert!(linked[0].parent_span_is_remote);
    // Without a traceparent the span is a root, in a trace of its own.
    assert_eq!(plain[0].parent_span_id, SpanId::INVALID);
    assert_ne!(
        plain[0].span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    for span in &spans {
        assert_eq!(
            attr(span, "model").map(Value::as_str).as_deref(),
            Some("sim")
        );
        assert_eq!(
            attr(span, "finish_reason").map(Value::as_str).as_deref(),
            Some("length")
        );
        assert_eq!(
            attr(span, "output_tokens").map(Value::as_str).as_deref(),
            Some("3")
        );
        assert!(attr(span, "ttft_ms").is_some());
    }
    assert_eq!(
        attr(linked[0], "migration_trace_id")
            .map(Value::as_str)
            .as_deref(),
        Some(TRACE)
    );
}

#[test]
fn the_binary_exports_over_otlp_http() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let collector = Collector::start();
    let endpoint = format!("http://{}", collector.addr);
    let (child, addr) = spawn_serve(&["--addr", "127.0.0.1:0", "--otlp-endpoint", &endpoint]);
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("http://{addr}/v1/completions"))
            .header("traceparent", format!("00-{TRACE}-{SPAN}-01"))
            .header("content-type", "application/json")
            .body(json!({"model": "sim", "prompt": "hi", "max_tokens": 2}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    });
    stop_serve(child, Duration::from_secs(20));
    // The batch was flushed at shutdown: one protobuf export naming the span and
    // carrying the link's raw trace id.
    let bodies = collector.bytes();
    let contains = |needle: &[u8]| bodies.windows(needle.len()).any(|w| w == needle);
    assert!(
        contains(b"engine.generate"),
        "no span exported ({} bytes)",
        bodies.len()
    );
    assert!(contains(&TraceId::from_hex(TRACE).unwrap().to_bytes()));
    drop(rt);
}

/// A span of the adapter's target under a subscriber exporting through `provider`.
fn with_exported_span<T>(provider: &SdkTracerProvider, f: impl FnOnce(&tracing::Span) -> T) -> T {
    let subscriber = tracing_subscriber::registry().with(tether_cli::serve::otel::layer(provider));
    let _guard = tracing::subscriber::set_default(subscriber);
    let span = tracing::info_span!(target: "request_span", "engine.generate");
    f(&span)
}

#[test]
fn the_trace_id_hook_names_exported_spans_only() {
    let hook = OtelTraceIds;
    // Exported: the hook's ids are the exported span's.
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let link = with_exported_span(&provider, |span| hook.trace_link(span)).expect("a link");
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    assert_eq!(spans.len(), 1);
    assert_eq!(
        Some(link),
        TraceLink::from_ids(
            u128::from_be_bytes(spans[0].span_context.trace_id().to_bytes()),
            u64::from_be_bytes(spans[0].span_context.span_id().to_bytes()),
        )
    );
    // Dropped by the sampler: never exported, so no ids.
    let unsampled = SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOff)
        .with_simple_exporter(InMemorySpanExporter::default())
        .build();
    assert_eq!(
        with_exported_span(&unsampled, |span| hook.trace_link(span)),
        None
    );
    // A disabled span, and a span no OpenTelemetry layer sees.
    assert_eq!(hook.trace_link(&tracing::Span::none()), None);
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry());
    let unseen = tracing::info_span!(target: "request_span", "engine.generate");
    assert!(!unseen.is_disabled());
    assert_eq!(hook.trace_link(&unseen), None);
}
