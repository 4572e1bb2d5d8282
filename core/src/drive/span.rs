//! The per-request `engine.generate` tracing span (target `request_span`): created at
//! generate, recorded once at the end. Owns the field names and formats of SPEC.md
//! section 6, the [`TraceIdHook`] that names the distributed trace's ids for
//! `worker_trace_link`, and nothing else.

use std::borrow::Cow;
use std::fmt;

use tracing::field::Empty;
use tracing::Span;

use super::stats::{ItlStats, Outcome, RequestRecord};
use crate::error::ErrorKind;
use crate::protocol::{Mode, Request, TraceLink};

/// The tracing target of the request span.
pub const TARGET: &str = "request_span";

/// Names the distributed trace's real ids for a request, for the `worker_trace_link`
/// its first token (and, in prefill mode, its terminal) carries: set one in
/// [`AdapterConfig::trace_id_hook`](super::AdapterConfig::trace_id_hook).
///
/// tether's core has no OpenTelemetry dependency; the hook is where one plugs in
/// (`tether serve`'s `otel` feature answers with the exported OpenTelemetry trace and
/// span ids of the request's `engine.generate` span). Without a hook no link is
/// stamped: ids that match nothing in a trace store are worse than none.
pub trait TraceIdHook: Send + Sync + 'static {
    /// The ids of the trace `span` (the request's `engine.generate` span, or a disabled
    /// span when spans are off or nobody listens) belongs to, with the id to link to;
    /// `None` when there is no trace to link to.
    fn trace_link(&self, span: &Span) -> Option<TraceLink>;
}

impl fmt::Debug for dyn TraceIdHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn TraceIdHook")
    }
}

/// How a request's span is closed beyond its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SpanNote {
    /// Nothing beyond the record.
    None,
    /// Ended by tether's own timeout of this kind.
    Timeout(ErrorKind),
    /// The engine's `generate` refused the request (rule 7).
    SetupFailed,
}

/// The request's span, with the migration link (or a malformed one's raw values) as
/// fields from its creation, so a layer sees them in `on_new_span`, and the client's
/// own id for the request (`client_id`), if it gave one.
pub(crate) fn open(request: &Request, mode: Mode, client_id: Option<&str>) -> Span {
    // Owned hex only when there is a link (rare); a malformed one is kept as it came.
    let (trace_id, span_id): (Option<Cow<'_, str>>, Option<Cow<'_, str>>) =
        match (&request.migration_link, &request.malformed_migration_link) {
            (Some(link), _) => (
                Some(link.trace_id_hex().into()),
                Some(link.span_id_hex().into()),
            ),
            (None, Some(raw)) => (
                Some(raw.trace_id.as_str().into()),
                Some(raw.span_id.as_str().into()),
            ),
            (None, None) => (None, None),
        };
    tracing::info_span!(
        target: "request_span",
        "engine.generate",
        request_id = %request.id,
        client_request_id = client_id,
        model = %request.model,
        input_tokens = request.token_ids.len(),
        disagg_role = mode.as_str(),
        // `None` records nothing: the field stays empty.
        migration_trace_id = trace_id.as_deref(),
        migration_span_id = span_id.as_deref(),
        ttft_ms = Empty,
        output_tokens = Empty,
        finish_reason = Empty,
        cancelled = Empty,
        error_kind = Empty,
        avg_itl_ms = Empty,
        itl_p50_ms = Empty,
        itl_p99_ms = Empty,
        itl_max_ms = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    )
}

fn ms2(v: f64) -> String {
    format!("{v:.2}")
}

pub(crate) fn record(span: &Span, rec: &RequestRecord, note: SpanNote) {
    if span.is_disabled() {
        return;
    }
    let timeout_kind = match note {
        SpanNote::Timeout(kind) => Some(kind),
        SpanNote::None | SpanNote::SetupFailed => None,
    };
    if let Some(ttft) = rec.ttft {
        span.record("ttft_ms", ms2(ttft.as_secs_f64() * 1000.0).as_str());
    }
    span.record("output_tokens", rec.output_tokens);
    let (reason, cancelled, error_kind): (String, bool, Option<String>) = match &rec.outcome {
        Outcome::Finished(r) => (r.to_string(), false, None),
        Outcome::Cancelled => ("cancelled".into(), true, None),
        Outcome::Failed(k) => ("error".into(), false, Some(k.to_string())),
        Outcome::Dropped => ("Dropped".into(), true, None),
        Outcome::TimedOut => ("error".into(), true, timeout_kind.map(|k| k.to_string())),
    };
    span.record("finish_reason", reason.as_str());
    span.record("cancelled", cancelled);
    if note == SpanNote::SetupFailed {
        span.record("error_kind", "setup_failed");
    } else if let Some(k) = &error_kind {
        span.record("error_kind", k.as_str());
    }
    // Failures and timeouts are errors in a trace store; a cancellation or a drop is a
    // user's normal choice and must not flood it with errors.
    if matches!(rec.outcome, Outcome::Failed(_) | Outcome::TimedOut) {
        span.record("otel.status_code", "ERROR");
        let message = match &rec.outcome {
            Outcome::Failed(kind) if note == SpanNote::SetupFailed => {
                format!("setup failed: {kind}")
            }
            Outcome::Failed(kind) => kind.to_string(),
            _ => error_kind.unwrap_or_else(|| "timed out".to_owned()),
        };
        span.record("otel.status_description", message.as_str());
    }
    record_itl(span, &rec.itl);
}

fn record_itl(span: &Span, itl: &ItlStats) {
    if itl.count == 0 {
        return;
    }
    span.record("avg_itl_ms", ms2(itl.avg_ms).as_str());
    span.record("itl_p50_ms", ms2(itl.p50_ms).as_str());
    span.record("itl_p99_ms", ms2(itl.p99_ms).as_str());
    span.record("itl_max_ms", ms2(itl.max_ms).as_str());
}
