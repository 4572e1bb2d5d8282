//! [`Baseline`]: the reference design tether is measured against, written the way the
//! widely used adapters do it. Per request:
//! - a spawned **monitor task** that `select!`s on the request's `Context::stopped()`
//!   and a tokio-util `CancellationToken` (cancelled when the stream ends or is
//!   dropped); on a stop it waits on
//! - a tokio **watch channel**, the first-token gate (open from the start unless in
//!   decode mode), then calls `engine.abort()`;
//! - a **drop guard** of the token inside
//! - an **`async-stream` generator** wrapping the engine stream, which opens the gate
//!   at the first token.
//!
//! It keeps the reference design's gaps (no terminal synthesis, a dropped stream is
//! not aborted, no records): it is the cost model, not a correct alternative.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use futures_core::Stream;
use futures_util::StreamExt;
use tether_core::context::Context;
use tether_core::engine::{GenerateContext, LlmEngine};
use tether_core::error::EngineError;
use tether_core::protocol::{Annotated, Chunk, Mode, Request};
use tokio_util::sync::CancellationToken;

use crate::harness::Spawner;

/// The baseline's response stream (boxed, as the reference design returns it).
pub type BaselineStream = Pin<Box<dyn Stream<Item = Annotated<Chunk>> + Send>>;

/// The reference-design adapter (see the module doc).
pub struct Baseline {
    engine: Arc<dyn LlmEngine>,
    spawner: Spawner,
    mode: Mode,
}

impl fmt::Debug for Baseline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Baseline")
            .field("spawner", &self.spawner)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Baseline {
    /// A baseline adapter for `engine`, spawning its monitors with `spawner`.
    pub fn new(engine: Arc<dyn LlmEngine>, spawner: Spawner, mode: Mode) -> Baseline {
        Baseline {
            engine,
            spawner,
            mode,
        }
    }

    /// Start `request` under `context`.
    pub async fn generate(
        &self,
        request: Request,
        context: Context,
    ) -> Result<BaselineStream, EngineError> {
        let gctx = GenerateContext::new(context.clone(), request.id.as_str());
        let engine_stream = self.engine.generate(request, gctx.clone()).await?;

        let token = CancellationToken::new();
        let (first_tx, mut first_rx) = tokio::sync::watch::channel(self.mode != Mode::Decode);
        let engine = self.engine.clone();
        let finished = token.clone();
        self.spawner.spawn(async move {
            tokio::select! {
                () = finished.cancelled() => {}
                () = context.stopped() => {
                    // The first-token gate: a decode worker must not abort mid transfer.
                    tokio::select! {
                        () = finished.cancelled() => return,
                        gate = gate_open(&mut first_rx) => if !gate { return },
                    }
                    engine.abort(gctx).await;
                }
            }
        });

        let guard = token.drop_guard();
        Ok(Box::pin(async_stream::stream! {
            let _guard = guard;
            let mut engine_stream = engine_stream;
            let mut first = false;
            while let Some(item) = engine_stream.next().await {
                match item {
                    Ok(chunk) => {
                        if !first && chunk.has_tokens() {
                            first = true;
                            first_tx.send_replace(true);
                        }
                        let terminal = chunk.is_terminal();
                        yield Annotated::from_data(chunk);
                        if terminal {
                            break;
                        }
                    }
                    Err(err) => {
                        yield Annotated::from_error(err);
                        break;
                    }
                }
            }
        }))
    }
}

/// Wait for the gate to open; `false` if the stream side went away first.
async fn gate_open(rx: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    rx.wait_for(|open| *open).await.is_ok()
}
