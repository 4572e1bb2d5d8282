//! The wire types an engine consumes and produces: [`Request`] in, a stream of
//! [`Chunk`]s out, wrapped downstream in [`Annotated`] items, plus the small value
//! types they carry ([`StopConditions`], [`SamplingOptions`], [`FinishReason`],
//! [`Usage`], [`TraceLink`], [`Mode`]).
//!
//! This module owns the shapes and their serde form, and nothing else: it must not
//! decide what a chunk *means* for a request's lifecycle (that is the lifecycle machine)
//! beyond the one-line predicates (`is_terminal`, `has_tokens`) everyone agrees on.
//! Decoding is strict where a lenient reading would lose data on the way back out
//! (non-finite floats, malformed trace ids, unknown finish reasons).

use std::fmt;
use std::str::FromStr;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::EngineError;

mod trace_link;

pub use trace_link::{RawTraceLink, TraceIdField, TraceLink, TraceLinkError};

/// When the engine must stop generating for a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct StopConditions {
    /// Stop after this many generated tokens (`None`: the engine's own limit).
    pub max_tokens: Option<u32>,
    /// Stop when any of these tokens is generated.
    pub stop_token_ids: Vec<u32>,
    /// Do not stop (on EOS or stop tokens) before this many generated tokens.
    pub min_tokens: Option<u32>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Stop when the decoded text contains any of these strings, for an engine or an
    /// edge that matches text. tether carries them and does not match them itself: the
    /// side that matches ends the stream with `FinishReason::Stop` (an engine by its own
    /// terminal, an edge with `ResponseStream::finish`, SPEC rule 12).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

/// Sampling parameters. `None` means "the engine's default".
///
/// Float fields must be finite and within `f32` range: decoding rejects `1e39`
/// (which would become infinity) and encoding rejects NaN/infinity (which JSON would
/// write as `null`), so a value always survives a round trip unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SamplingOptions {
    /// Softmax temperature.
    #[serde(
        serialize_with = "finite_f32::serialize",
        deserialize_with = "finite_f32::deserialize"
    )]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[serde(
        serialize_with = "finite_f32::serialize",
        deserialize_with = "finite_f32::deserialize"
    )]
    pub top_p: Option<f32>,
    /// Sample only among the `top_k` most likely tokens.
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
}

/// Serde helpers for `Option<f32>` fields that must stay finite.
mod finite_f32 {
    use serde::{de, ser, Deserialize, Deserializer, Serializer};

    // `&Option<f32>` is the signature serde's `serialize_with` requires.
    #[allow(clippy::ref_option, clippy::trivially_copy_pass_by_ref)]
    pub(super) fn serialize<S: Serializer>(
        value: &Option<f32>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) if !v.is_finite() => Err(ser::Error::custom(format!(
                "sampling value {v} is not finite"
            ))),
            Some(v) => serializer.serialize_some(v),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<f32>, D::Error> {
        // Read as f64 first: reading `1e39` straight into f32 silently saturates to
        // infinity, which then re-encodes as `null`.
        let Some(wide) = Option::<f64>::deserialize(deserializer)? else {
            return Ok(None);
        };
        #[allow(clippy::cast_possible_truncation)] // range is checked right below
        let narrow = wide as f32;
        if narrow.is_finite() {
            Ok(Some(narrow))
        } else {
            Err(de::Error::custom(format!(
                "sampling value {wide} is not a finite f32"
            )))
        }
    }
}

/// One generation request, as handed to an engine.
///
/// Only `id` and `model` are required on the wire; every other field defaults when
/// missing. A `migration_link` whose ids are malformed does not reject the request: it
/// is read as `None` and its raw values are kept in
/// [`malformed_migration_link`](Request::malformed_migration_link), which the adapter
/// records as span attributes (with a warning) instead of a link.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "RequestWire")]
#[non_exhaustive]
pub struct Request {
    /// Caller-chosen request id (used in logs, spans and aborts).
    pub id: String,
    /// The model the request is for.
    pub model: String,
    /// The prompt, already tokenized.
    #[serde(default)]
    pub token_ids: Vec<u32>,
    /// When to stop generating.
    #[serde(default)]
    pub stop: StopConditions,
    /// How to sample.
    #[serde(default)]
    pub sampling: SamplingOptions,
    /// Token ids that end the sequence for this model.
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    /// The span of the worker this request is migrating from, if it is a migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_link: Option<TraceLink>,
    /// Free-form annotations the caller asked the engine to report back.
    #[serde(default)]
    pub annotations: Vec<String>,
    /// An incoming migration link that did not parse, as it came. Written under its own
    /// key (`malformed_migration_link`), so a request read and written again keeps it
    /// and is never mistaken for one with a valid link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malformed_migration_link: Option<RawTraceLink>,
}

/// How a [`Request`] is read: like the request, but with the migration link's ids
/// as they came, so a malformed link is kept aside instead of rejecting the request.
#[derive(Deserialize)]
struct RequestWire {
    id: String,
    model: String,
    #[serde(default)]
    token_ids: Vec<u32>,
    #[serde(default)]
    stop: StopConditions,
    #[serde(default)]
    sampling: SamplingOptions,
    #[serde(default)]
    eos_token_ids: Vec<u32>,
    #[serde(default)]
    migration_link: Option<RawTraceLink>,
    #[serde(default)]
    annotations: Vec<String>,
    #[serde(default)]
    malformed_migration_link: Option<RawTraceLink>,
}

impl From<RequestWire> for Request {
    fn from(wire: RequestWire) -> Request {
        let (migration_link, malformed_migration_link) = match wire.migration_link {
            None => (None, wire.malformed_migration_link),
            Some(raw) => match TraceLink::parse(&raw.trace_id, &raw.span_id) {
                Ok(link) => (Some(link), wire.malformed_migration_link),
                Err(_) => (None, Some(raw)),
            },
        };
        Request {
            id: wire.id,
            model: wire.model,
            token_ids: wire.token_ids,
            stop: wire.stop,
            sampling: wire.sampling,
            eos_token_ids: wire.eos_token_ids,
            migration_link,
            annotations: wire.annotations,
            malformed_migration_link,
        }
    }
}

impl Request {
    /// A request with the given id, model and prompt tokens and default everything else.
    pub fn new(id: impl Into<String>, model: impl Into<String>, token_ids: Vec<u32>) -> Self {
        Request {
            id: id.into(),
            model: model.into(),
            token_ids,
            ..Request::default()
        }
    }

    /// Set [`StopConditions::max_tokens`].
    #[must_use]
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.stop.max_tokens = Some(max_tokens);
        self
    }

    /// Set the stop conditions.
    #[must_use]
    pub fn with_stop(mut self, stop: StopConditions) -> Self {
        self.stop = stop;
        self
    }

    /// Set the sampling options.
    #[must_use]
    pub fn with_sampling(mut self, sampling: SamplingOptions) -> Self {
        self.sampling = sampling;
        self
    }
}

/// Why a stream ended. A [`Chunk`] that carries one is terminal.
///
/// Wire form: `"eos"`, `"length"`, `"stop"`, `{"error": "<message>"}`, `"cancelled"`
/// (`"abort"` is also accepted when reading, as some engines spell it), and
/// `"content_filter"`. `Display` uses the same words (`error: <message>` for errors).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// The token limit was reached.
    Length,
    /// A stop token was produced.
    Stop,
    /// Generation failed with this message.
    Error(String),
    /// The request was cancelled (stopped, killed or aborted).
    Cancelled,
    /// Output was withheld by a content filter.
    ContentFilter,
}

const FINISH_REASON_NAMES: &[&str] = &[
    "eos",
    "length",
    "stop",
    "error",
    "cancelled",
    "abort",
    "content_filter",
];

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FinishReason::Eos => f.write_str("eos"),
            FinishReason::Length => f.write_str("length"),
            FinishReason::Stop => f.write_str("stop"),
            FinishReason::Error(msg) => write!(f, "error: {msg}"),
            FinishReason::Cancelled => f.write_str("cancelled"),
            FinishReason::ContentFilter => f.write_str("content_filter"),
        }
    }
}

impl Serialize for FinishReason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let name = match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Error(msg) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("error", msg)?;
                return map.end();
            }
        };
        serializer.serialize_str(name)
    }
}

impl<'de> Deserialize<'de> for FinishReason {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FinishReasonVisitor;

        impl<'de> Visitor<'de> for FinishReasonVisitor {
            type Value = FinishReason;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a finish reason string or {\"error\": message}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<FinishReason, E> {
                match v {
                    "eos" => Ok(FinishReason::Eos),
                    "length" => Ok(FinishReason::Length),
                    "stop" => Ok(FinishReason::Stop),
                    "cancelled" | "abort" => Ok(FinishReason::Cancelled),
                    "content_filter" => Ok(FinishReason::ContentFilter),
                    other => Err(E::unknown_variant(other, FINISH_REASON_NAMES)),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FinishReason, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::invalid_length(0, &"a map with one `error` key"));
                };
                if key != "error" {
                    return Err(de::Error::unknown_variant(&key, &["error"]));
                }
                let msg: String = map.next_value()?;
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(2, &"a map with one `error` key"));
                }
                Ok(FinishReason::Error(msg))
            }
        }

        deserializer.deserialize_any(FinishReasonVisitor)
    }
}

/// Token accounting for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated so far.
    pub completion_tokens: u32,
}

impl Usage {
    /// Usage of `prompt_tokens` in and `completion_tokens` out.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
        }
    }
}

/// One piece of an engine's output stream.
///
/// A chunk with `finish_reason: Some(_)` is **terminal**: it is the last one a
/// consumer sees. A chunk may be token-less (a handshake, or a terminal without
/// tokens). On the wire, `None` fields are omitted and every field defaults when
/// missing, so `{"token_ids":[1]}` is a valid chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Chunk {
    /// Generated token ids in this chunk (possibly empty).
    pub token_ids: Vec<u32>,
    /// Detokenized text of `token_ids`, if the engine provides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Why the stream ended; `Some` makes this chunk terminal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// Token accounting, usually on the terminal chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Which choice (of `n` parallel sequences) this chunk belongs to.
    pub index: u32,
    /// The worker's tracing span for this request, carried by its first token chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_trace_link: Option<TraceLink>,
}

impl Chunk {
    /// A non-terminal chunk carrying `token_ids`.
    pub fn tokens(token_ids: Vec<u32>) -> Chunk {
        Chunk {
            token_ids,
            ..Chunk::default()
        }
    }

    /// A token-less terminal chunk ending the stream with `reason`.
    pub fn terminal(reason: FinishReason) -> Chunk {
        Chunk {
            finish_reason: Some(reason),
            ..Chunk::default()
        }
    }

    /// Set the chunk's usage.
    #[must_use]
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = Some(usage);
        self
    }

    /// Set the chunk's detokenized text.
    #[must_use]
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// Whether this chunk ends the stream (it has a finish reason).
    pub fn is_terminal(&self) -> bool {
        self.finish_reason.is_some()
    }

    /// Whether this chunk carries at least one token.
    pub fn has_tokens(&self) -> bool {
        !self.token_ids.is_empty()
    }
}

/// The event name that marks an [`Annotated`] item as an error.
const ERROR_EVENT: &str = "error";

/// An item of a response stream: data, or an error, plus SSE-style metadata.
///
/// This is what the driver yields downstream. An error item has `event == "error"`
/// and its [`EngineError`] in `error`. `None` fields are omitted on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Annotated<T> {
    /// The payload, if this item carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    /// An id for the item (SSE `id:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The event name (SSE `event:`); `"error"` marks an error item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Comment lines (SSE `:` lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<Vec<String>>,
    /// The error, for an error item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EngineError>,
}

impl<T> Annotated<T> {
    /// An item carrying `data` and no metadata.
    pub fn from_data(data: T) -> Self {
        Annotated {
            data: Some(data),
            id: None,
            event: None,
            comment: None,
            error: None,
        }
    }

    /// An error item: `event` is `"error"` and `error` holds `error`.
    pub fn from_error(error: EngineError) -> Self {
        Annotated {
            data: None,
            id: None,
            event: Some(ERROR_EVENT.to_owned()),
            comment: None,
            error: Some(error),
        }
    }

    /// Whether this is an error item (`event == "error"`).
    pub fn is_error(&self) -> bool {
        self.event.as_deref() == Some(ERROR_EVENT)
    }
}

impl Annotated<Chunk> {
    /// Whether this item ends the stream: an error item, or a terminal chunk.
    pub fn is_terminal(&self) -> bool {
        self.is_error() || self.data.as_ref().is_some_and(Chunk::is_terminal)
    }
}

/// A worker's role in disaggregated serving.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Prefill and decode on the same worker (`"agg"`).
    #[default]
    #[serde(rename = "agg")]
    Aggregated,
    /// Prefill only; the KV cache is handed to a decode worker (`"prefill"`).
    #[serde(rename = "prefill")]
    Prefill,
    /// Decode only, after receiving the KV cache from a prefill worker (`"decode"`).
    #[serde(rename = "decode")]
    Decode,
}

impl Mode {
    /// The mode's wire name: `"agg"`, `"prefill"` or `"decode"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Aggregated => "agg",
            Mode::Prefill => "prefill",
            Mode::Decode => "decode",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error [`Mode::from_str`](FromStr::from_str) returns for an unknown mode name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode `{input}`, expected one of: agg, aggregated, prefill, decode")]
pub struct ParseModeError {
    /// The text that was not recognised.
    pub input: String,
}

impl FromStr for Mode {
    type Err = ParseModeError;

    /// Case-insensitive; accepts `agg`, `aggregated`, `prefill` and `decode`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let is = |name: &str| s.eq_ignore_ascii_case(name);
        if is("agg") || is("aggregated") {
            Ok(Mode::Aggregated)
        } else if is("prefill") {
            Ok(Mode::Prefill)
        } else if is("decode") {
            Ok(Mode::Decode)
        } else {
            Err(ParseModeError {
                input: s.to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests;
