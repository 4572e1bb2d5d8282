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
//! killed, even if the client leaves before the last bytes are written. The in-flight
//! gauge is decremented by the request's record callback, which runs after the
//! metrics observer counted the outcome.

use std::sync::Arc;
use std::time::Instant;

use tether_core::protocol::{Annotated, Chunk, Request};
use tether_core::{Context, EngineError, ResponseStream, Runtime};

use super::metrics::Metrics;
use super::App;

/// Start `request` (its id already set) under a context linked to the server's root;
/// a setup error comes back typed, and then nothing is in flight any more.
pub(crate) async fn start(app: &App, request: Request) -> Result<ResponseStream, EngineError> {
    let context = Context::new(request.id.clone());
    // A graceful shutdown kills the root after its grace period, and with it every
    // request still running (a request arriving later is killed at once).
    app.root.link_child(&context);
    app.metrics.request_started();
    let metrics = app.metrics.clone();
    app.adapter
        .request(request)
        .context(context)
        .on_record(move |_| metrics.request_ended())
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
