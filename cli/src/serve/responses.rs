//! The OpenAI response objects `tether serve` sends: streamed chunks, the usage chunk,
//! whole completions and the model list.
//!
//! Owns the response JSON shapes only; which one to send when is
//! [`super::handlers`]'s decision.

use serde::Serialize;
use tether_core::protocol::{FinishReason, Usage};

use super::api::Endpoint;

/// The OpenAI `finish_reason` for an engine finish reason, `None` for reasons that are
/// not a normal end (`Cancelled`, `Error`).
pub(crate) fn openai_finish_reason(reason: &FinishReason) -> Option<&'static str> {
    match reason {
        FinishReason::Eos | FinishReason::Stop => Some("stop"),
        FinishReason::Length => Some("length"),
        FinishReason::ContentFilter => Some("content_filter"),
        FinishReason::Cancelled | FinishReason::Error(_) => None,
    }
}

/// `usage` in a response.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct UsageBody {
    /// Prompt tokens.
    pub(crate) prompt_tokens: u32,
    /// Generated tokens.
    pub(crate) completion_tokens: u32,
    /// Their sum.
    pub(crate) total_tokens: u32,
}

impl From<Usage> for UsageBody {
    fn from(u: Usage) -> Self {
        UsageBody {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
        }
    }
}

/// What every response object of one request shares.
#[derive(Clone, Debug)]
pub(crate) struct Head {
    /// The response id (`cmpl-…` / `chatcmpl-…`).
    pub(crate) id: String,
    /// Unix seconds when the request arrived.
    pub(crate) created: u64,
    /// The model.
    pub(crate) model: String,
    /// The endpoint.
    pub(crate) endpoint: Endpoint,
}

impl Head {
    /// A response object of type `object` with `choices` (and `usage`, when given):
    /// what every object of the request shares, in one place.
    fn object(
        &self,
        object: &str,
        choices: serde_json::Value,
        usage: Option<UsageBody>,
    ) -> serde_json::Value {
        let mut body = serde_json::json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
        });
        body["choices"] = choices;
        if let Some(usage) = usage {
            body["usage"] = serde_json::json!(usage);
        }
        body
    }

    /// The `object` of a streamed chunk on this endpoint.
    fn chunk_object(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        }
    }

    /// One streamed chunk carrying `text` (and a finish reason on the last one). For
    /// chat, `role` adds the assistant role to the delta (the first chunk).
    pub(crate) fn chunk(
        &self,
        text: &str,
        finish_reason: Option<&str>,
        role: bool,
    ) -> serde_json::Value {
        let choice = match self.endpoint {
            Endpoint::Completions => serde_json::json!(
                {"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}
            ),
            Endpoint::Chat => {
                let delta = match (role, finish_reason.is_some() && text.is_empty()) {
                    (true, _) => serde_json::json!({"role": "assistant", "content": text}),
                    (false, true) => serde_json::json!({}),
                    (false, false) => serde_json::json!({"content": text}),
                };
                serde_json::json!(
                    {"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}
                )
            }
        };
        self.object(self.chunk_object(), serde_json::json!([choice]), None)
    }

    /// The last streamed chunk when `stream_options.include_usage` is set.
    pub(crate) fn usage_chunk(&self, usage: UsageBody) -> serde_json::Value {
        self.object(self.chunk_object(), serde_json::json!([]), Some(usage))
    }

    /// The whole (non-streamed) response.
    pub(crate) fn full(
        &self,
        text: &str,
        finish_reason: &str,
        usage: UsageBody,
    ) -> serde_json::Value {
        let (object, choice) = match self.endpoint {
            Endpoint::Completions => (
                "text_completion",
                serde_json::json!(
                    {"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}
                ),
            ),
            Endpoint::Chat => (
                "chat.completion",
                serde_json::json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish_reason,
                }),
            ),
        };
        self.object(object, serde_json::json!([choice]), Some(usage))
    }
}

/// The body of `GET /v1/models`.
pub(crate) fn models_body(model: &str, created: u64) -> serde_json::Value {
    serde_json::json!({
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "tether"}],
    })
}
