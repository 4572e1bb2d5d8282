//! [`ProbeAdapter`]: a health-check canary. A JSON request goes in, the stream's items
//! come out, and a chunk whose finish reason is `Error` is surfaced as an error item,
//! so a probe never reports healthy on an engine error.

use futures_core::Stream;

use super::Adapter;
use crate::context::Context;
use crate::error::{EngineError, ErrorKind};
use crate::protocol::{Annotated, Chunk, FinishReason, Request};

/// Why a probe could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The canary JSON is not a valid request.
    #[error("invalid probe request: {0}")]
    InvalidRequest(#[from] serde_json::Error),
    /// The engine refused to start the canary.
    #[error("probe generate failed: {0}")]
    Generate(#[from] EngineError),
}

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

    /// Run the canary `request_json` to its end. `FinishReason::Error` chunks come back
    /// as [`Annotated`] error items.
    pub async fn probe(&self, request_json: &str) -> Result<Vec<Annotated<Chunk>>, ProbeError> {
        let request: Request = serde_json::from_str(request_json)?;
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
