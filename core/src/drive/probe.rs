//! [`ProbeAdapter`]: a health-check canary. A request goes in (a [`Canary`] the caller
//! reads from JSON, as small as `{"token_ids":[1]}`, or a whole [`Request`]), the
//! stream's items come out, and a chunk whose finish reason is `Error` is surfaced as
//! an error item, so a probe never reports healthy on an engine error.

use serde::{Deserialize, Serialize};

use futures_core::Stream;

use super::Adapter;
use crate::context::Context;
use crate::error::{EngineError, ErrorKind};
use crate::protocol::{Annotated, Chunk, FinishReason, Request, StopConditions};

/// The request id a [`Canary`] gets when it names none.
pub const CANARY_ID: &str = "health-check";
/// The model a [`Canary`] gets when it names none.
pub const CANARY_MODEL: &str = "health-check";
/// The `max_tokens` a [`Canary`] gets when it sets none: one token proves the engine
/// runs, and keeps the probe cheap.
pub const CANARY_MAX_TOKENS: u32 = 1;

/// A health-check canary as an operator writes it: only `token_ids` is required, the
/// rest takes health-check defaults ([`CANARY_ID`], [`CANARY_MODEL`],
/// [`CANARY_MAX_TOKENS`]). Read it with any serde format:
/// `serde_json::from_str::<Canary>(r#"{"token_ids":[1]}"#)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Canary {
    /// The prompt.
    pub token_ids: Vec<u32>,
    /// The request id (default [`CANARY_ID`]).
    #[serde(default = "canary_id")]
    pub id: String,
    /// The model (default [`CANARY_MODEL`]).
    #[serde(default = "canary_model")]
    pub model: String,
    /// When to stop (default: [`CANARY_MAX_TOKENS`] tokens).
    #[serde(default = "canary_stop")]
    pub stop: StopConditions,
}

fn canary_id() -> String {
    CANARY_ID.to_owned()
}

fn canary_model() -> String {
    CANARY_MODEL.to_owned()
}

fn canary_stop() -> StopConditions {
    StopConditions {
        max_tokens: Some(CANARY_MAX_TOKENS),
        ..StopConditions::default()
    }
}

impl Canary {
    /// A canary with prompt `token_ids` and every default.
    pub fn new(token_ids: Vec<u32>) -> Canary {
        Canary {
            token_ids,
            id: canary_id(),
            model: canary_model(),
            stop: canary_stop(),
        }
    }

    /// The request it stands for.
    pub fn into_request(self) -> Request {
        Request::new(self.id, self.model, self.token_ids).with_stop(self.stop)
    }
}

impl From<Canary> for Request {
    fn from(canary: Canary) -> Request {
        canary.into_request()
    }
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

    /// Run a [`Canary`] (the minimal health-check request) to its end; see
    /// [`probe`](ProbeAdapter::probe).
    pub async fn probe_canary(&self, canary: Canary) -> Result<Vec<Annotated<Chunk>>, EngineError> {
        self.probe(canary.into_request()).await
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
