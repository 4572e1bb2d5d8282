//! [`ProbeAdapter`]: a health-check canary. A request goes in (the caller reads it from
//! JSON or builds it), the stream's items come out, and a chunk whose finish reason is
//! `Error` is surfaced as an error item, so a probe never reports healthy on an engine
//! error.

use futures_core::Stream;

use super::Adapter;
use crate::context::Context;
use crate::error::{EngineError, ErrorKind};
use crate::protocol::{Annotated, Chunk, FinishReason, Request};

/// Runs canary requests through an [`Adapter`].
#[derive(Debug, Clone)]
pub struct ProbeAdapter {
    adapter: Adapter,
}

impl ProbeAdapter {
    /// Probe through `adapter`.
    pub fn new(adapter: Adapter) -> ProbeAdapter {
        ProbeAdapter { adapter }
    }

    /// Run the canary `request` to its end. `FinishReason::Error` chunks come back as
    /// [`Annotated`] error items; an engine that refuses the canary is the `Err`.
    pub async fn probe(&self, request: Request) -> Result<Vec<Annotated<Chunk>>, EngineError> {
        let context = Context::new(format!("probe-{}", request.id));
        let mut stream = self.adapter.generate(request, context).await?;
        let mut items = Vec::new();
        while let Some(item) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx)).await
        {
            items.push(surface_error(item));
        }
        Ok(items)
    }

    /// Whether a probe's items say the engine is healthy: a terminal arrived, it is not
    /// an error, and no item is an error.
    pub fn is_healthy(items: &[Annotated<Chunk>]) -> bool {
        !items.is_empty()
            && items.iter().all(|i| !i.is_error())
            && items.last().is_some_and(Annotated::is_terminal)
    }
}

fn surface_error(item: Annotated<Chunk>) -> Annotated<Chunk> {
    match item.data.as_ref().and_then(|c| c.finish_reason.as_ref()) {
        Some(FinishReason::Error(msg)) => {
            let mut out = Annotated::from_error(EngineError::new(ErrorKind::Unknown, msg.clone()));
            out.id = item.id;
            out
        }
        _ => item,
    }
}
