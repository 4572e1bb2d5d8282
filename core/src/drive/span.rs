//! The per-request `engine.generate` tracing span (target `request_span`): created at
//! generate, recorded once at the end. Owns the field names and formats of SPEC.md
//! section 6 and the `worker_trace_link` derived from the span; nothing else.

use tracing::field::Empty;
use tracing::Span;

use super::stats::{ItlStats, Outcome, RequestRecord};
use crate::error::ErrorKind;
use crate::protocol::{Request, TraceLink};

/// The tracing target of the request span.
pub const TARGET: &str = "request_span";

pub(crate) fn open(request: &Request, mode: crate::protocol::Mode) -> Span {
    let span = tracing::info_span!(
        target: "request_span",
        "engine.generate",
        model = %request.model,
        input_tokens = request.token_ids.len(),
        disagg_role = mode.as_str(),
        migration_trace_id = Empty,
        migration_span_id = Empty,
        ttft_ms = Empty,
        output_tokens = Empty,
        finish_reason = Empty,
        cancelled = Empty,
        error_kind = Empty,
        avg_itl_ms = Empty,
        itl_p50_ms = Empty,
        itl_p99_ms = Empty,
        itl_max_ms = Empty,
    );
    if let (false, Some(link)) = (span.is_disabled(), request.migration_link) {
        span.record("migration_trace_id", link.trace_id_hex().as_str());
        span.record("migration_span_id", link.span_id_hex().as_str());
    }
    span
}

/// The ids to stamp as `worker_trace_link`: the request's migration trace (or one
/// derived from the span) and this span's id. `None` when the span is not recorded.
pub(crate) fn trace_link(span: &Span, request_link: Option<TraceLink>) -> Option<TraceLink> {
    if span.is_disabled() {
        return None;
    }
    // A callsite made interesting by another thread's subscriber can hand out a span
    // with no id (or a placeholder) when this thread has none: stamp nothing then.
    let id = span.id()?.into_u64();
    let trace = request_link.map_or(u128::from(id) << 64 | u128::from(id), |l| l.trace_id());
    TraceLink::from_ids(trace, id)
}

fn ms2(v: f64) -> String {
    format!("{v:.2}")
}

pub(crate) fn record(span: &Span, rec: &RequestRecord, timeout_kind: Option<ErrorKind>) {
    if span.is_disabled() {
        return;
    }
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
    if let Some(k) = error_kind {
        span.record("error_kind", k.as_str());
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
