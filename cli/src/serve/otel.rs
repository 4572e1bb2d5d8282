//! OTLP export of the adapter's `engine.generate` spans (the `otel` feature).
//!
//! [`layer`] turns the spans of target [`SPAN_TARGET`] (and only those) into
//! OpenTelemetry spans through tracing-opentelemetry, and makes a request's
//! `migration_link` (the W3C `traceparent` a client sent) a **span link** of its
//! `engine.generate` span: the adapter records it as the `migration_trace_id` /
//! `migration_span_id` fields, and [`MigrationLinks`] adds the link once both are
//! known. [`install_otlp`] wires that layer to an OTLP/HTTP exporter for
//! `tether serve --otlp-endpoint URL`. Without the flag nothing is installed, so the
//! spans stay disabled and cost nothing.
//!
//! Owns the tracing subscriber and the tracer provider; nothing here touches requests.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tether_core::drive::SPAN_TARGET;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::ServeError;

/// The layer that exports `engine.generate` spans to `provider`'s tracer, with the
/// migration link as a span link. Add it to a `tracing_subscriber::registry()`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("tether"));
    // `and_then`: the OpenTelemetry layer sees each callback first, so the span's
    // OpenTelemetry data exists when `MigrationLinks` adds to it.
    otel.and_then(MigrationLinks)
        .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::TRACE))
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
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .build()
        .map_err(|e| ServeError::Otel(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("tether").build())
        .build();
    if !super::logging::install(Some(Box::new(layer(&provider))))? {
        return Err(ServeError::Otel(
            "a global tracing subscriber is already installed".to_owned(),
        ));
    }
    Ok(OtelGuard { provider })
}

/// Adds a span's `migration_trace_id` / `migration_span_id` as an OpenTelemetry link.
#[derive(Debug, Clone, Copy)]
pub struct MigrationLinks;

/// The migration fields seen so far on one span.
#[derive(Debug, Default)]
struct PendingLink {
    trace_id: Option<String>,
    span_id: Option<String>,
    added: bool,
}

impl Visit for PendingLink {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "migration_trace_id" => self.trace_id = Some(value.to_owned()),
            "migration_span_id" => self.span_id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // Fields recorded with `%` arrive here.
        self.record_str(field, format!("{value:?}").trim_matches('"'));
    }
}

impl<S> Layer<S> for MigrationLinks
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        self.update(id, &ctx, |p| attrs.record(p));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        self.update(id, &ctx, |p| values.record(p));
    }
}

impl MigrationLinks {
    fn update<S>(&self, id: &Id, ctx: &Context<'_, S>, record: impl FnOnce(&mut PendingLink))
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let link = {
            let mut ext = span.extensions_mut();
            if ext.get_mut::<PendingLink>().is_none() {
                ext.insert(PendingLink::default());
            }
            let Some(pending) = ext.get_mut::<PendingLink>() else {
                return;
            };
            record(pending);
            match (&pending.trace_id, &pending.span_id, pending.added) {
                (Some(t), Some(s), false) => {
                    pending.added = true;
                    remote_context(t, s)
                }
                _ => None,
            }
        };
        // Outside the extensions lock: the OpenTelemetry layer takes it to find the
        // span's context.
        if let Some(link) = link {
            tracing::dispatcher::get_default(|dispatch| {
                if let Some(cx) = tracing_opentelemetry::get_otel_context(id, dispatch) {
                    cx.span().add_link(link.clone(), Vec::new());
                }
            });
        }
    }
}

fn remote_context(trace_hex: &str, span_hex: &str) -> Option<SpanContext> {
    let trace = TraceId::from_hex(trace_hex).ok()?;
    let span = SpanId::from_hex(span_hex).ok()?;
    let cx = SpanContext::new(
        trace,
        span,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn remote_contexts_must_be_valid() {
        assert!(remote_context("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331").is_some());
        assert!(remote_context("00000000000000000000000000000000", "b7ad6b7169203331").is_none());
        assert!(remote_context("xyz", "b7ad6b7169203331").is_none());
    }
}
