//! The driver's log events (SPEC.md section 6): `tracing` events of target [`TARGET`],
//! each with the request's `request_id`, `mode`, and `model` and `elapsed_ms` (since the
//! request was created, on the runtime's clock) where they apply. Debug level on the
//! normal path, warn for timeouts and engine misbehaviour.
//!
//! Owns the target, the messages and the field names; nothing else. Every field is
//! computed inside the macro, so an event nobody listens to costs a level check and
//! reads no clock.

use std::time::Duration;

use tracing::warn;

use super::shared::Shared;
use super::stats::{Outcome, RequestRecord};
use crate::context::{Cause, Signal};

/// The tracing target of tether's log events.
pub const TARGET: &str = "tether";

/// Milliseconds, rounded to the microsecond (so a log line reads `6.094`, not
/// `6.093781000000001`).
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn elapsed_ms(shared: &Shared) -> f64 {
    ms(shared
        .adapter
        .runtime
        .now()
        .saturating_duration_since(shared.start))
}

fn mode(shared: &Shared) -> &'static str {
    shared.cell.load().mode().as_str()
}

fn cause_label(cause: Option<Cause>) -> &'static str {
    cause.map_or("none", Cause::label)
}

/// An event of target `tether` about the request behind `$shared`, with the fields
/// every event has (`request_id`, `model`, `mode`, `elapsed_ms`) and then its own.
macro_rules! request_event {
    ($level:ident, $shared:expr, $($rest:tt)*) => {
        tracing::$level!(
            target: "tether",
            request_id = %$shared.request_id(),
            model = $shared.model(),
            mode = mode($shared),
            elapsed_ms = elapsed_ms($shared),
            $($rest)*
        )
    };
}

/// The context listener saw a stop or a kill (the cause says from where).
pub(super) fn cancellation_seen(shared: &Shared, signal: Signal) {
    request_event!(
        debug,
        shared,
        signal = match signal {
            Signal::Stop => "stop",
            Signal::Kill => "kill",
        },
        cause = cause_label(shared.context.cause()),
        "cancellation seen"
    );
}

/// The consumer dropped a kill-on-drop stream before its terminal: the client is gone.
pub(super) fn client_disconnect(shared: &Shared) {
    request_event!(
        debug,
        shared,
        "client disconnect: stream dropped before its terminal, request killed"
    );
}

/// An abort is due but held back until the first token (rule 2).
pub(super) fn abort_deferred(shared: &Shared) {
    request_event!(
        debug,
        shared,
        deferral_deadline_ms = ms(shared.limits().deferral_deadline),
        "abort deferred until the first token"
    );
}

/// `LlmEngine::abort` was handed to the runtime.
pub(super) fn abort_sent(shared: &Shared) {
    request_event!(debug, shared, "abort sent");
}

/// The deferral deadline passed with no first token: the abort goes out anyway.
pub(super) fn deferral_deadline_hit(shared: &Shared) {
    request_event!(
        warn,
        shared,
        deferral_deadline_ms = ms(shared.limits().deferral_deadline),
        "deferral deadline hit: no first token, abort sent anyway"
    );
}

/// A stopped request did not end within its cancel grace: it is killed.
pub(super) fn cancel_grace_expired(shared: &Shared) {
    request_event!(
        warn,
        shared,
        cancel_grace_ms = shared.limits().cancel_grace.map(ms),
        "cancel grace expired: the stopped request is killed"
    );
}

/// A first-token (`first = true`) or inter-token timeout fired after `limit`.
pub(super) fn timeout_fired(shared: &Shared, first: bool, limit: Duration) {
    request_event!(
        warn,
        shared,
        timeout = if first { "first_token" } else { "inter_token" },
        limit_ms = ms(limit),
        "{} timeout fired: request killed",
        if first { "first-token" } else { "inter-token" }
    );
}

/// The engine misbehaved (`what`): it ended without a terminal, or panicked. tether
/// repaired the stream; the engine needs fixing. (An item after the terminal is never
/// seen: tether does not poll past a terminal, SPEC rule 5; the conformance kit
/// reports such an engine.)
pub(super) fn engine_misbehaved(shared: &Shared, what: &str) {
    request_event!(warn, shared, "engine misbehaviour: {what}");
}

/// The request is over for its consumer: its outcome, tokens and timings.
pub(super) fn stream_complete(shared: &Shared, rec: &RequestRecord, setup_failed: bool) {
    request_event!(
        debug,
        shared,
        outcome = rec.outcome.label(),
        finish_reason = match &rec.outcome {
            Outcome::Finished(reason) => Some(tracing::field::display(reason)),
            _ => None,
        },
        cause = cause_label(rec.cause),
        output_tokens = rec.output_tokens,
        ttft_ms = rec.ttft.map(ms),
        queue_ms = rec.queue_time.map(ms),
        abort = rec.abort.label(),
        setup_failed,
        "stream complete"
    );
}

/// A request's incoming migration link could not be parsed: it is kept as span
/// attributes and skipped as a link; the request runs.
pub(super) fn malformed_migration_link(request_id: &str, trace_id: &str, span_id: &str) {
    warn!(
        target: "tether",
        request_id,
        migration_trace_id = trace_id,
        migration_span_id = span_id,
        "malformed migration link skipped (kept as span attributes)"
    );
}
