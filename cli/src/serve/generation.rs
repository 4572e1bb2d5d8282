//! [`Generation`]: one request's run through the adapter, owned by its HTTP response,
//! with the disconnect rule in its `Drop`.
//!
//! Owns the request's [`Context`], its place in the in-flight gauge and its
//! per-chunk token timing. It must not know the wire format: handlers turn its items
//! into SSE events or a JSON body.
//!
//! # Disconnects
//! When a client goes away, hyper drops the response body (or the handler future),
//! and with it the `Generation` before its terminal. `Drop` then **kills** the
//! request's context (the adapter aborts the engine exactly once and frees its slot)
//! and takes the synthesized `Cancelled` terminal at once, so the request's outcome is
//! `cancelled`, never `dropped`, and the in-flight gauge is decremented only after the
//! outcome is recorded. A request whose terminal was read is never killed, even if the
//! client leaves before the last bytes are written.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{FutureExt, StreamExt};
use tether_core::protocol::{Annotated, Chunk, Request};
use tether_core::{Context, EngineError, ResponseStream};

use super::App;

pub(crate) struct Generation {
    app: Arc<App>,
    context: Context,
    stream: Option<Pin<Box<ResponseStream>>>,
    /// A terminal (or an error item, or the end) was read: nothing to cancel.
    ended: bool,
    last_token: Option<Instant>,
}

impl Generation {
    /// Start `request` (its id already set); a setup error comes back typed, and then
    /// nothing is in flight any more.
    pub(crate) async fn start(app: Arc<App>, request: Request) -> Result<Generation, EngineError> {
        let context = Context::new(request.id.clone());
        // A graceful shutdown kills the root after its grace period, and with it every
        // request still running (a request arriving later is killed at once).
        app.root.link_child(&context);
        app.metrics.request_started();
        let mut generation = Generation {
            app,
            context,
            stream: None,
            ended: false,
            last_token: None,
        };
        let adapter = generation.app.adapter.clone();
        match adapter.generate(request, generation.context.clone()).await {
            Ok(stream) => {
                generation.stream = Some(Box::pin(stream));
                Ok(generation)
            }
            Err(err) => {
                generation.ended = true;
                Err(err)
            }
        }
    }

    /// The next item; `None` once the stream ended.
    pub(crate) async fn next(&mut self) -> Option<Annotated<Chunk>> {
        let Some(stream) = self.stream.as_mut() else {
            self.ended = true;
            return None;
        };
        let item = stream.next().await;
        match &item {
            None => self.ended = true,
            Some(item) => {
                if item.is_terminal() {
                    self.ended = true;
                }
                if let Some(chunk) = item.data.as_ref().filter(|c| c.has_tokens()) {
                    let now = self.app.runtime.now();
                    if let Some(last) = self.last_token {
                        self.app.metrics.tokens_after(
                            chunk.token_ids.len(),
                            now.saturating_duration_since(last),
                        );
                    }
                    self.last_token = Some(now);
                }
            }
        }
        item
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.ended {
            self.context.kill();
            if let Some(stream) = self.stream.as_mut() {
                // A kill owes the consumer a `Cancelled` terminal at its next poll, and
                // that poll is ready at once: taking it records the outcome `cancelled`.
                let _ = stream.next().now_or_never();
            }
        }
        self.stream = None;
        self.app.metrics.request_ended();
    }
}
