//! OTLP export of the adapter's `engine.generate` spans (the `otel` feature), and the
//! trace ids a worker hands on so that traces stitch across workers.
//!
//! [`layer`] turns the spans of target [`SPAN_TARGET`] (and only those) into
//! OpenTelemetry spans through tracing-opentelemetry. [`install_otlp`] wires that layer
//! to an OTLP/HTTP exporter for `tether serve --otlp-endpoint URL`. Without the flag
//! nothing is installed, so the spans stay disabled and cost nothing.
//!
//! [`OtelTraceIds`] is the adapter's [`TraceIdHook`]: it answers with the trace id and
//! span id of the request's `engine.generate` span *as exported* (the OpenTelemetry
//! span context the SDK generated when it started the span), which the adapter stamps
//! as the `worker_trace_link` of the first token (and, in prefill mode, of the
//! terminal). A span nobody exports has no such ids, and then no link is stamped.
//!
//! Stitching: a request's `migration_link` (on a decode worker, the prefill worker's
//! `worker_trace_link`; at `tether serve`, the W3C `traceparent` a client sent)
//! becomes the **remote parent** of its `engine.generate` span, so the span joins the
//! previous worker's trace (same trace id, parent span id = the linked span), and it
//! is also kept as a **span link**, which marks that edge as a migration rather than
//! an ordinary call. The adapter records the link's ids as the `migration_trace_id` /
//! `migration_span_id` fields from the span's creation; the layer's tracer reads them
//! from the span's attributes at the moment it starts the OpenTelemetry span, which is
//! when the trace id is fixed. Two cases keep other behaviour:
//!
//! - a span that already has a local OpenTelemetry parent (an application that
//!   attached its own context around the request) keeps that parent, and gets the
//!   migration only as a link;
//! - a malformed migration link (the raw strings of one that did not parse, see
//!   [`Request::malformed_migration_link`](tether_core::Request::malformed_migration_link)) stays in the span's
//!   attributes only: neither a parent nor a link. The ids are parsed with
//!   [`TraceLink::parse`], the same strict rules the request's link went through.
//!
//! A link carries no trace flags; it is taken as sampled (tether only hands on the ids
//! of spans that are exported, that is sampled ones).
//!
//! Owns the tracer provider and the trace-id hook (the subscriber that carries the
//! layer is `super::logging`'s); nothing here
//! touches requests.

use opentelemetry::trace::{
    Link, SpanBuilder, SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer, TracerProvider as _,
};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tether_core::drive::SPAN_TARGET;
use tether_core::{TraceIdHook, TraceLink};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::ServeError;

/// The layer that exports `engine.generate` spans to `provider`'s tracer, each one a
/// child of its request's migration link (and linked to it) when the request has one.
/// Add it to a `tracing_subscriber::registry()`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(MigrationTracer(provider.tracer("tether")))
        .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::TRACE))
}

/// The [`TraceIdHook`] of the `otel` feature: the exported OpenTelemetry trace id and
/// span id of the request's `engine.generate` span.
///
/// Set it with `AdapterConfig::default().trace_id_hook(Arc::new(OtelTraceIds))` on an
/// adapter whose spans are exported through [`layer`]. It answers `None` for a
/// disabled span, for a span the OpenTelemetry layer does not see (no layer, or
/// filtered out), after the tracer provider was shut down, and for a span the sampler
/// dropped: in all those cases nothing with these ids reaches a trace store. The ids
/// are the SDK's random OpenTelemetry ids, never tracing's span ids (which a
/// subscriber reuses once a span is closed).
#[derive(Debug, Clone, Copy, Default)]
pub struct OtelTraceIds;

impl TraceIdHook for OtelTraceIds {
    fn trace_link(&self, span: &tracing::Span) -> Option<TraceLink> {
        if span.is_disabled() {
            return None;
        }
        // Starts the OpenTelemetry span if nothing did yet (the adapter enters it for
        // the engine's setup, long before a first token), so the ids are final.
        let cx = span.context();
        let otel_span = cx.span();
        let sc = otel_span.span_context();
        if !sc.is_valid() || !sc.is_sampled() {
            return None;
        }
        TraceLink::from_ids(
            u128::from_be_bytes(sc.trace_id().to_bytes()),
            u64::from_be_bytes(sc.span_id().to_bytes()),
        )
    }
}

/// Exports over OTLP/HTTP (protobuf) until [`OtelGuard::shutdown`].
#[derive(Debug)]
pub struct OtelGuard {
    provider: SdkTracerProvider,
}

impl OtelGuard {
    /// Flush what is buffered and stop the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("tether serve: otlp export shutdown: {e}");
        }
    }
}

/// The traces URL for `endpoint`: `/v1/traces` is appended unless present.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Install the global subscriber ([`super::logging::install`]): the log lines, and the
/// layer that exports `engine.generate` spans to the OTLP/HTTP collector at `endpoint`.
/// Call it outside any async runtime (the exporter's blocking HTTP client must not be
/// created inside one).
pub fn install_otlp(endpoint: &str) -> Result<OtelGuard, ServeError> {
    let provider = otlp_provider(endpoint)?;
    if !super::logging::install(Some(Box::new(layer(&provider))))? {
        return Err(ServeError::Otel(
            "a global tracing subscriber is already installed".to_owned(),
        ));
    }
    Ok(OtelGuard { provider })
}

/// A tracer provider that batches spans to the OTLP/HTTP (protobuf) collector at
/// `endpoint` (see [`traces_url`]), as service `tether`. Call it outside any async
/// runtime (the exporter's blocking HTTP client must not be created inside one).
pub fn otlp_provider(endpoint: &str) -> Result<SdkTracerProvider, ServeError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .build()
        .map_err(|e| ServeError::Otel(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("tether").build())
        .build())
}

/// The SDK's tracer, plus the migration parent and link: the tracer tracing-opentelemetry
/// starts each span with, the one place where a span's parent is still open and its
/// attributes (the span's fields as recorded so far) are all known.
#[derive(Debug, Clone)]
struct MigrationTracer(SdkTracer);

impl Tracer for MigrationTracer {
    type Span = <SdkTracer as Tracer>::Span;

    fn build_with_context(
        &self,
        mut builder: SpanBuilder,
        parent_cx: &opentelemetry::Context,
    ) -> Self::Span {
        let Some(remote) = builder.attributes.as_deref().and_then(migration_context) else {
            return self.0.build_with_context(builder, parent_cx);
        };
        builder
            .links
            .get_or_insert_with(Vec::new)
            .push(Link::with_context(remote.clone()));
        if parent_cx.span().span_context().is_valid() {
            self.0.build_with_context(builder, parent_cx)
        } else {
            let parent = parent_cx.with_remote_span_context(remote);
            self.0.build_with_context(builder, &parent)
        }
    }
}

/// The remote span context of the migration link among a span's `attributes`: `None`
/// without both fields or when they do not parse as a [`TraceLink`].
fn migration_context(attributes: &[KeyValue]) -> Option<SpanContext> {
    // The last value recorded wins.
    let field = |name: &str| {
        attributes
            .iter()
            .rev()
            .find(|kv| kv.key.as_str() == name)
            .map(|kv| kv.value.as_str())
    };
    let link =
        TraceLink::parse(&field("migration_trace_id")?, &field("migration_span_id")?).ok()?;
    Some(SpanContext::new(
        TraceId::from(link.trace_id()),
        SpanId::from(link.span_id()),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const SPAN: &str = "b7ad6b7169203331";

    fn attrs(trace: &str, span: &str) -> Vec<KeyValue> {
        vec![
            KeyValue::new("model", "sim"),
            KeyValue::new("migration_trace_id", trace.to_owned()),
            KeyValue::new("migration_span_id", span.to_owned()),
        ]
    }

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[test]
    fn a_valid_migration_link_is_a_sampled_remote_context() {
        let cx = migration_context(&attrs(TRACE, SPAN)).expect("a valid link");
        assert_eq!(cx.trace_id(), TraceId::from_hex(TRACE).unwrap());
        assert_eq!(cx.span_id(), SpanId::from_hex(SPAN).unwrap());
        assert!(cx.is_remote());
        assert!(cx.is_sampled());
    }

    #[test]
    fn malformed_or_missing_migration_links_are_skipped() {
        let bad = [
            ("00000000000000000000000000000000", SPAN),
            (TRACE, "0000000000000000"),
            ("xyz", SPAN),
            // `TraceId::from_hex` would take these; `TraceLink::parse` does not.
            ("af7651916cd43dd8448eb211c80319c", SPAN),
            ("+af7651916cd43dd8448eb211c80319c", SPAN),
            ("0AF7651916CD43DD8448EB211C80319C", SPAN),
        ];
        for (trace, span) in bad {
            assert_eq!(
                migration_context(&attrs(trace, span)),
                None,
                "{trace} {span}"
            );
        }
        assert_eq!(migration_context(&[]), None);
        assert_eq!(
            migration_context(&[KeyValue::new("migration_trace_id", TRACE)]),
            None
        );
    }

    #[test]
    fn the_last_recorded_migration_field_wins() {
        let mut a = attrs("xyz", SPAN);
        a.push(KeyValue::new("migration_trace_id", TRACE));
        assert!(migration_context(&a).is_some());
    }
}
