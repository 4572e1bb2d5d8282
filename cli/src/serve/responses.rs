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

/// `usage` in a response. Its fields, like those of every response object here, are
/// declared in alphabetical order: the order `serde_json::Value` (a sorted map) wrote
/// them in when the objects were built as `Value`s, so the bytes on the wire stayed
/// the same when they stopped going through one.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct UsageBody {
    /// Generated tokens.
    pub(crate) completion_tokens: u32,
    /// Prompt tokens.
    pub(crate) prompt_tokens: u32,
    /// Their sum.
    pub(crate) total_tokens: u32,
}

impl From<Usage> for UsageBody {
    fn from(u: Usage) -> Self {
        UsageBody {
            completion_tokens: u.completion_tokens,
            prompt_tokens: u.prompt_tokens,
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

/// A response object: what every object of a request shares, its `choices` and, on
/// the last ones, its `usage`.
#[derive(Serialize)]
struct Object<'a, C> {
    choices: C,
    created: u64,
    id: &'a str,
    model: &'a str,
    object: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageBody>,
}

/// A completion's choice, streamed or whole.
#[derive(Serialize)]
struct TextChoice<'a> {
    finish_reason: Option<&'a str>,
    index: u32,
    /// Always `null`.
    logprobs: (),
    text: &'a str,
}

/// A streamed chat chunk's choice.
#[derive(Serialize)]
struct DeltaChoice<'a> {
    delta: Delta<'a>,
    finish_reason: Option<&'a str>,
    index: u32,
    logprobs: (),
}

/// A chat chunk's `delta`: `{}` on a last chunk without text.
#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
}

/// A whole chat completion's choice.
#[derive(Serialize)]
struct MessageChoice<'a> {
    finish_reason: &'a str,
    index: u32,
    logprobs: (),
    message: Message<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    content: &'a str,
    role: &'static str,
}

/// `value` as JSON text.
fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("a response object of strings and numbers serializes")
}

impl Head {
    /// A response object of type `object` with `choices` (and `usage`, when given), as
    /// JSON text: what every object of the request shares, in one place.
    fn object<C: Serialize>(
        &self,
        object: &'static str,
        choices: C,
        usage: Option<UsageBody>,
    ) -> String {
        to_json(&Object {
            choices,
            created: self.created,
            id: &self.id,
            model: &self.model,
            object,
            usage,
        })
    }

    /// The `object` of a streamed chunk on this endpoint.
    fn chunk_object(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        }
    }

    /// One streamed chunk carrying `text` (and a finish reason on the last one), as
    /// JSON text. For chat, `role` adds the assistant role to the delta (the first
    /// chunk).
    pub(crate) fn chunk(&self, text: &str, finish_reason: Option<&str>, role: bool) -> String {
        let object = self.chunk_object();
        match self.endpoint {
            Endpoint::Completions => {
                let choice = TextChoice {
                    finish_reason,
                    index: 0,
                    logprobs: (),
                    text,
                };
                self.object(object, [choice], None)
            }
            Endpoint::Chat => {
                let delta = match (role, finish_reason.is_some() && text.is_empty()) {
                    (true, _) => Delta {
                        content: Some(text),
                        role: Some("assistant"),
                    },
                    (false, true) => Delta {
                        content: None,
                        role: None,
                    },
                    (false, false) => Delta {
                        content: Some(text),
                        role: None,
                    },
                };
                let choice = DeltaChoice {
                    delta,
                    finish_reason,
                    index: 0,
                    logprobs: (),
                };
                self.object(object, [choice], None)
            }
        }
    }

    /// The last streamed chunk when `stream_options.include_usage` is set, as JSON text.
    pub(crate) fn usage_chunk(&self, usage: UsageBody) -> String {
        self.object(self.chunk_object(), [(); 0], Some(usage))
    }

    /// The whole (non-streamed) response, as JSON text.
    pub(crate) fn full(&self, text: &str, finish_reason: &str, usage: UsageBody) -> String {
        match self.endpoint {
            Endpoint::Completions => {
                let choice = TextChoice {
                    finish_reason: Some(finish_reason),
                    index: 0,
                    logprobs: (),
                    text,
                };
                self.object("text_completion", [choice], Some(usage))
            }
            Endpoint::Chat => {
                let choice = MessageChoice {
                    finish_reason,
                    index: 0,
                    logprobs: (),
                    message: Message {
                        content: text,
                        role: "assistant",
                    },
                };
                self.object("chat.completion", [choice], Some(usage))
            }
        }
    }
}

/// The streamed chunks of one request that carry text and no finish reason (all but
/// the chat role chunk and the last one): the JSON around the text is serialized once,
/// when the stream starts, so each chunk only escapes its own text. Each chunk is
/// byte for byte what [`Head::chunk`]`(text, None, false)` makes.
#[derive(Clone, Debug)]
pub(crate) struct TextChunks {
    /// The chunk's JSON up to the text's opening quote.
    before: String,
    /// The chunk's JSON after the text's closing quote.
    after: String,
}

impl TextChunks {
    /// The chunks of the request `head` describes.
    pub(crate) fn new(head: &Head) -> TextChunks {
        // The text is the first string value of a chunk (`choices` comes first, and
        // nothing before the text in it is a string), so the marker's first occurrence
        // is the text's, whatever the id or the model name hold.
        const MARK: &str = "\u{1}";
        const MARK_JSON: &str = "\"\\u0001\"";
        let whole = head.chunk(MARK, None, false);
        let at = whole
            .find(MARK_JSON)
            .expect("a chunk holds its text as a JSON string");
        TextChunks {
            before: whole[..at].to_owned(),
            after: whole[at + MARK_JSON.len()..].to_owned(),
        }
    }

    /// The chunk carrying `text`, as JSON text.
    pub(crate) fn chunk(&self, text: &str) -> String {
        // Room for the quotes and a few escapes: a chunk is one allocation.
        let mut out = Vec::with_capacity(self.before.len() + text.len() + 16 + self.after.len());
        out.extend_from_slice(self.before.as_bytes());
        serde_json::to_writer(&mut out, text).expect("a string serializes");
        out.extend_from_slice(self.after.as_bytes());
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }
}

/// The body of `GET /v1/models`.
pub(crate) fn models_body(model: &str, created: u64) -> serde_json::Value {
    serde_json::json!({
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "tether"}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_are_head_chunks_byte_for_byte() {
        let texts = [
            "",
            "a",
            "say \"hi\" \\ back",
            "\u{1}\u{0}\u{8}\t\n\u{b}\u{c}\r\u{1f}\u{7f}",
            "终わり 🦀",
            "\\u0001",
        ];
        for endpoint in [Endpoint::Completions, Endpoint::Chat] {
            for model in ["sim", "we\"ird \u{1} \\u0001 model"] {
                let head = Head {
                    id: "cmpl-0123456789abcdef1".to_owned(),
                    created: 1_796_000_000,
                    model: model.to_owned(),
                    endpoint,
                };
                let chunks = TextChunks::new(&head);
                for text in texts {
                    assert_eq!(
                        chunks.chunk(text),
                        head.chunk(text, None, false),
                        "{text:?}"
                    );
                }
            }
        }
    }
}
