//! One request's run through the adapter as `tether serve` starts it ([`start`]), and
//! the timing of its tokens as they are read ([`TokenClock`]).
//!
//! Owns the request's link to the server's shutdown root, its place in the in-flight
//! gauge and its per-chunk token timing. It must not know the wire format: handlers
//! turn the stream's items into SSE events (through `tether_axum`) or a JSON body.
//!
//! # Disconnects
//! The server's adapter is an HTTP edge: its streams are kill-on-drop
//! ([`AdapterConfig::kill_on_drop`](tether_core::AdapterConfig::kill_on_drop)). When a
//! client goes away, hyper drops the response body (the SSE stream that holds the
//! [`ResponseStream`]) or the handler future (a unary request, or one still in the
//! engine's setup), and with it the stream before its terminal: the request's context
//! is killed with cause client disconnect, the engine is aborted exactly once, and the
//! outcome is `cancelled`, never `dropped`. A request whose terminal was read is never
//! killed, even if the client leaves before the last bytes are written.
//!
//! # Metrics
//! The request's record callback ([`Generate::on_record`](tether_core::drive::Generate::on_record))
//! counts its outcome in its endpoint's and stream's series (with its duration from
//! generate to its end, prompt length and queue time), then decrements the in-flight
//! gauge: a scrape that sees the gauge back at zero sees the outcome too. It runs
//! however the request ends, a setup error or a disconnect during the engine's setup
//! included.

use std::sync::Arc;
use std::time::Instant;

use tether_core::protocol::{Annotated, Chunk, Request};
use tether_core::{Context, EngineError, ResponseStream, Runtime};

use super::metrics::{Metrics, RequestLabels};
use super::App;

/// Start `request` (its id already set) under a context linked to the server's root,
/// its record counted in the `labels` series, with the client's own id for the request
/// (`client_id`, its `x-request-id`) on its span and in its metadata; a setup error
/// comes back typed, and then nothing is in flight any more.
pub(crate) async fn start(
    app: &App,
    request: Request,
    labels: RequestLabels,
    client_id: Option<&str>,
) -> Result<ResponseStream, EngineError> {
    let context = Context::new(request.id.as_str());
    // A graceful shutdown kills the root after its grace period, and with it every
    // request still running (a request arriving later is killed at once).
    app.root.link_child(&context);
    let prompt_tokens = u32::try_from(request.token_ids.len()).unwrap_or(u32::MAX);
    let (metrics, runtime) = (app.metrics.clone(), app.runtime.clone());
    let started = runtime.now();
    app.metrics.request_started();
    let generate = app.adapter.request(request).context(context);
    let generate = match client_id {
        Some(id) => generate.client_request_id(id),
        None => generate,
    };
    generate
        .on_record(move |record| {
            let duration = runtime.now().saturating_duration_since(started);
            metrics.record(record, labels, prompt_tokens, duration);
            metrics.request_ended();
        })
        .await
}

/// Measures the gaps between a request's tokens as its consumer reads them (the
/// inter-token latency histogram).
pub(crate) struct TokenClock {
    metrics: Arc<Metrics>,
    runtime: Arc<dyn Runtime>,
    last_token: Option<Instant>,
}

impl TokenClock {
    pub(crate) fn new(app: &App) -> TokenClock {
        TokenClock {
            metrics: app.metrics.clone(),
            runtime: app.runtime.clone(),
            last_token: None,
        }
    }

    /// `item` was just read.
    pub(crate) fn read(&mut self, item: &Annotated<Chunk>) {
        let Some(chunk) = item.data.as_ref().filter(|c| c.has_tokens()) else {
            return;
        };
        let now = self.runtime.now();
        if let Some(last) = self.last_token {
            self.metrics
                .tokens_after(chunk.token_ids.len(), now.saturating_duration_since(last));
        }
        self.last_token = Some(now);
    }
}
