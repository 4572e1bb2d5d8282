//! The wire types an engine consumes and produces: [`Request`] in, a stream of
//! [`Chunk`]s out, wrapped downstream in [`Annotated`] items, plus the small value
//! types they carry ([`StopConditions`], [`SamplingOptions`], [`FinishReason`],
//! [`Usage`], [`TraceLink`], [`Mode`]).
//!
//! This module owns the shapes and their serde form, and nothing else: it must not
//! decide what a chunk *means* for a request's lifecycle (that is [`crate::lifecycle`])
//! beyond the one-line predicates (`is_terminal`, `has_tokens`) everyone agrees on.
//! Decoding is strict where a lenient reading would lose data on the way back out
//! (non-finite floats, malformed trace ids, unknown finish reasons).

use std::fmt;
use std::str::FromStr;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::EngineError;

/// When the engine must stop generating for a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StopConditions {
    /// Stop after this many generated tokens (`None`: the engine's own limit).
    pub max_tokens: Option<u32>,
    /// Stop when any of these tokens is generated.
    pub stop_token_ids: Vec<u32>,
    /// Do not stop (on EOS or stop tokens) before this many generated tokens.
    pub min_tokens: Option<u32>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// Sampling parameters. `None` means "the engine's default".
///
/// Float fields must be finite and within `f32` range: decoding rejects `1e39`
/// (which would become infinity) and encoding rejects NaN/infinity (which JSON would
/// write as `null`), so a value always survives a round trip unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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

/// Which id of a [`TraceLink`] an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraceIdField {
    /// The 16-byte trace id.
    TraceId,
    /// The 8-byte span id.
    SpanId,
}

impl fmt::Display for TraceIdField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TraceIdField::TraceId => "trace_id",
            TraceIdField::SpanId => "span_id",
        })
    }
}

/// Why a trace or span id string was rejected by [`TraceLink::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceLinkError {
    /// The id does not have the required number of hex characters.
    #[error("{field} must be {expected} hex characters, got {actual}")]
    WrongLength {
        /// Which id.
        field: TraceIdField,
        /// The required length in characters (32 or 16).
        expected: usize,
        /// The length that was given, in bytes.
        actual: usize,
    },
    /// The id contains a character that is not a hex digit.
    #[error("{field} has a non-hex character at byte {position}")]
    NotHex {
        /// Which id.
        field: TraceIdField,
        /// Byte offset of the first offending character.
        position: usize,
    },
    /// The id contains an uppercase hex digit (W3C trace context requires lowercase).
    #[error("{field} has an uppercase hex digit at byte {position}, ids must be lowercase")]
    Uppercase {
        /// Which id.
        field: TraceIdField,
        /// Byte offset of the first uppercase digit.
        position: usize,
    },
    /// The id is all zeros, which W3C trace context defines as invalid.
    #[error("{field} is all zeros, which is not a valid id")]
    AllZeros {
        /// Which id.
        field: TraceIdField,
    },
}

/// A link to a tracing span elsewhere (a W3C trace context trace id and span id), used
/// to connect a migrated request to its previous worker and a worker's span to the
/// frontend's.
///
/// Both ids are non-zero by construction. On the wire it is
/// `{"trace_id": "<32 lowercase hex>", "span_id": "<16 lowercase hex>"}`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "TraceLinkRepr", into = "TraceLinkRepr")]
pub struct TraceLink {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

/// The wire form of a [`TraceLink`]; decoding goes through [`TraceLink::parse`].
#[derive(Serialize, Deserialize)]
struct TraceLinkRepr {
    trace_id: String,
    span_id: String,
}

impl TryFrom<TraceLinkRepr> for TraceLink {
    type Error = TraceLinkError;

    fn try_from(repr: TraceLinkRepr) -> Result<Self, Self::Error> {
        TraceLink::parse(&repr.trace_id, &repr.span_id)
    }
}

impl From<TraceLink> for TraceLinkRepr {
    fn from(link: TraceLink) -> Self {
        TraceLinkRepr {
            trace_id: link.trace_id_hex(),
            span_id: link.span_id_hex(),
        }
    }
}

impl TraceLink {
    /// Parse a 32-character trace id and a 16-character span id, both lowercase hex
    /// and not all zeros. Malformed input is an error value, never a panic.
    ///
    /// # Errors
    ///
    /// A [`TraceLinkError`] naming the id and what is wrong with it: wrong length,
    /// a non-hex or uppercase character, or all zeros. The trace id is checked first.
    pub fn parse(trace_id: &str, span_id: &str) -> Result<TraceLink, TraceLinkError> {
        Ok(TraceLink {
            trace_id: decode_hex_id(trace_id, TraceIdField::TraceId)?,
            span_id: decode_hex_id(span_id, TraceIdField::SpanId)?,
        })
    }

    /// Build a link from numeric ids; `None` if either is zero (invalid in W3C).
    pub fn from_ids(trace: u128, span: u64) -> Option<TraceLink> {
        (trace != 0 && span != 0).then(|| TraceLink {
            trace_id: trace.to_be_bytes(),
            span_id: span.to_be_bytes(),
        })
    }

    /// The trace id as 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        encode_hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex characters.
    pub fn span_id_hex(&self) -> String {
        encode_hex(&self.span_id)
    }

    /// The trace id as a number (big-endian, as in the hex form).
    pub fn trace_id(&self) -> u128 {
        u128::from_be_bytes(self.trace_id)
    }

    /// The span id as a number (big-endian, as in the hex form).
    pub fn span_id(&self) -> u64 {
        u64::from_be_bytes(self.span_id)
    }
}

impl fmt::Debug for TraceLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceLink")
            .field("trace_id", &self.trace_id_hex())
            .field("span_id", &self.span_id_hex())
            .finish()
    }
}

fn decode_hex_id<const N: usize>(s: &str, field: TraceIdField) -> Result<[u8; N], TraceLinkError> {
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return Err(TraceLinkError::WrongLength {
            field,
            expected: 2 * N,
            actual: bytes.len(),
        });
    }
    let nibble = |position: usize| -> Result<u8, TraceLinkError> {
        match bytes[position] {
            b @ b'0'..=b'9' => Ok(b - b'0'),
            b @ b'a'..=b'f' => Ok(b - b'a' + 10),
            b'A'..=b'F' => Err(TraceLinkError::Uppercase { field, position }),
            _ => Err(TraceLinkError::NotHex { field, position }),
        }
    };
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (nibble(2 * i)? << 4) | nibble(2 * i + 1)?;
    }
    if out.iter().all(|&b| b == 0) {
        return Err(TraceLinkError::AllZeros { field });
    }
    Ok(out)
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// One generation request, as handed to an engine.
///
/// Only `id` and `model` are required on the wire; every other field defaults when
/// missing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated so far.
    pub completion_tokens: u32,
}

/// One piece of an engine's output stream.
///
/// A chunk with `finish_reason: Some(_)` is **terminal**: it is the last one a
/// consumer sees. A chunk may be token-less (a handshake, or a terminal without
/// tokens). On the wire, `None` fields are omitted and every field defaults when
/// missing, so `{"token_ids":[1]}` is a valid chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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
