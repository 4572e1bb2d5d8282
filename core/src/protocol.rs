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
mod tests {
    use super::*;
    use crate::error::{BackendError, ErrorKind};

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn to_json<T: Serialize>(value: &T) -> String {
        serde_json::to_string(value).expect("test values serialize")
    }

    #[test]
    fn finish_reason_json_is_exact_both_ways() {
        let cases = [
            (FinishReason::Eos, r#""eos""#),
            (FinishReason::Length, r#""length""#),
            (FinishReason::Stop, r#""stop""#),
            (FinishReason::Cancelled, r#""cancelled""#),
            (FinishReason::ContentFilter, r#""content_filter""#),
            (FinishReason::Error("oom".to_owned()), r#"{"error":"oom"}"#),
        ];
        for (reason, json) in cases {
            assert_eq!(to_json(&reason), json);
            assert_eq!(
                serde_json::from_str::<FinishReason>(json).ok(),
                Some(reason)
            );
        }
    }

    #[test]
    fn finish_reason_reads_abort_as_cancelled() {
        assert_eq!(
            serde_json::from_str::<FinishReason>(r#""abort""#).ok(),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(to_json(&FinishReason::Cancelled), r#""cancelled""#);
    }

    #[test]
    fn finish_reason_rejects_malformed_input() {
        for bad in [
            r#""finished""#,
            r#""error""#,
            r#""EOS""#,
            r#"{"error":1}"#,
            r#"{"fault":"x"}"#,
            "{}",
            r#"{"error":"a","extra":1}"#,
            "7",
            "null",
        ] {
            assert!(
                serde_json::from_str::<FinishReason>(bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn finish_reason_display_matches_wire_words() {
        assert_eq!(FinishReason::ContentFilter.to_string(), "content_filter");
        assert_eq!(FinishReason::Cancelled.to_string(), "cancelled");
        assert_eq!(
            FinishReason::Error("oom".to_owned()).to_string(),
            "error: oom"
        );
    }

    #[test]
    fn chunk_round_trips_and_omits_none_fields() {
        let link = TraceLink::parse(TRACE, SPAN).expect("valid ids");
        let chunk = Chunk {
            token_ids: vec![1, 2],
            text: Some("hi".to_owned()),
            finish_reason: Some(FinishReason::Error("boom".to_owned())),
            usage: Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            }),
            index: 1,
            worker_trace_link: Some(link),
        };
        let json = to_json(&chunk);
        assert_eq!(serde_json::from_str::<Chunk>(&json).ok(), Some(chunk));
        assert_eq!(
            to_json(&Chunk::tokens(vec![5])),
            r#"{"token_ids":[5],"index":0}"#
        );
        assert_eq!(
            to_json(&Chunk::terminal(FinishReason::Eos)),
            r#"{"token_ids":[],"finish_reason":"eos","index":0}"#
        );
    }

    #[test]
    fn chunk_with_only_tokens_decodes_with_defaults() {
        let chunk: Chunk = serde_json::from_str(r#"{"token_ids":[1]}"#).expect("minimal chunk");
        assert_eq!(chunk, Chunk::tokens(vec![1]));
        assert!(chunk.has_tokens());
        assert!(!chunk.is_terminal());
    }

    #[test]
    fn chunk_predicates() {
        let terminal = Chunk::terminal(FinishReason::Length).with_usage(Usage {
            prompt_tokens: 4,
            completion_tokens: 16,
        });
        assert!(terminal.is_terminal());
        assert!(!terminal.has_tokens());
        assert_eq!(terminal.usage.map(|u| u.completion_tokens), Some(16));
        assert!(!Chunk::default().has_tokens());
    }

    #[test]
    fn request_minimal_json_decodes_with_defaults() {
        let req: Request = serde_json::from_str(r#"{"id":"r1","model":"m","token_ids":[1,2,3]}"#)
            .expect("minimal request");
        assert_eq!(req, Request::new("r1", "m", vec![1, 2, 3]));
        assert_eq!(req.stop, StopConditions::default());
        assert_eq!(req.migration_link, None);
        assert!(serde_json::from_str::<Request>(r#"{"model":"m"}"#).is_err());
    }

    #[test]
    fn request_round_trips() {
        let mut req = Request::new("r2", "tiny", vec![7]).with_max_tokens(32);
        req.stop.stop_token_ids = vec![2];
        req.stop.ignore_eos = true;
        req.sampling = SamplingOptions {
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: Some(40),
            seed: Some(u64::MAX),
        };
        req.eos_token_ids = vec![0];
        req.migration_link = TraceLink::from_ids(1, 2);
        req.annotations = vec!["worker_id".to_owned()];
        let json = to_json(&req);
        assert_eq!(serde_json::from_str::<Request>(&json).ok(), Some(req));
    }

    #[test]
    fn out_of_range_temperature_is_rejected() {
        let err = serde_json::from_str::<SamplingOptions>(r#"{"temperature":1e39}"#)
            .expect_err("1e39 overflows f32");
        assert!(err.to_string().contains("not a finite f32"), "{err}");
        assert!(serde_json::from_str::<SamplingOptions>(r#"{"top_p":-1e39}"#).is_err());
        let ok: SamplingOptions =
            serde_json::from_str(r#"{"temperature":0.5,"top_p":null}"#).expect("valid");
        assert_eq!(ok.temperature, Some(0.5));
        assert_eq!(ok.top_p, None);
        assert_eq!(
            serde_json::from_str::<SamplingOptions>("{}").ok(),
            Some(SamplingOptions::default())
        );
    }

    #[test]
    fn non_finite_temperature_does_not_encode_as_null() {
        let opts = SamplingOptions {
            temperature: Some(f32::NAN),
            ..SamplingOptions::default()
        };
        assert!(serde_json::to_string(&opts).is_err());
    }

    #[test]
    fn trace_link_parse_accepts_valid_ids() {
        let link = TraceLink::parse(TRACE, SPAN).expect("valid ids");
        assert_eq!(link.trace_id_hex(), TRACE);
        assert_eq!(link.span_id_hex(), SPAN);
        assert_eq!(link.trace_id(), 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(link.span_id(), 0x00f0_67aa_0ba9_02b7);
        assert_eq!(
            TraceLink::from_ids(link.trace_id(), link.span_id()),
            Some(link)
        );
    }

    #[test]
    fn trace_link_parse_rejects_each_malformed_case() {
        use TraceIdField::{SpanId, TraceId};
        let cases = [
            (
                &TRACE[..31],
                SPAN,
                TraceLinkError::WrongLength {
                    field: TraceId,
                    expected: 32,
                    actual: 31,
                },
            ),
            (
                TRACE,
                "00f067aa0ba902b7a",
                TraceLinkError::WrongLength {
                    field: SpanId,
                    expected: 16,
                    actual: 17,
                },
            ),
            (
                "4bf92f3577b34da6a3ce929d0e0e473g",
                SPAN,
                TraceLinkError::NotHex {
                    field: TraceId,
                    position: 31,
                },
            ),
            (
                TRACE,
                "00f067aA0ba902b7",
                TraceLinkError::Uppercase {
                    field: SpanId,
                    position: 7,
                },
            ),
            (
                "00000000000000000000000000000000",
                SPAN,
                TraceLinkError::AllZeros { field: TraceId },
            ),
            (
                TRACE,
                "0000000000000000",
                TraceLinkError::AllZeros { field: SpanId },
            ),
            // Multi-byte UTF-8 of the right byte length must be rejected, not sliced.
            (
                TRACE,
                "00f067aa0ba902é",
                TraceLinkError::NotHex {
                    field: SpanId,
                    position: 14,
                },
            ),
        ];
        for (trace, span, expected) in cases {
            assert_eq!(
                TraceLink::parse(trace, span),
                Err(expected),
                "{trace} {span}"
            );
        }
        assert_eq!(
            TraceLinkError::Uppercase {
                field: SpanId,
                position: 7
            }
            .to_string(),
            "span_id has an uppercase hex digit at byte 7, ids must be lowercase"
        );
        assert_eq!(TraceLink::from_ids(0, 1), None);
        assert_eq!(TraceLink::from_ids(1, 0), None);
    }

    #[test]
    fn trace_link_serde_is_hex_and_rejects_malformed() {
        let link = TraceLink::parse(TRACE, SPAN).expect("valid ids");
        let json = to_json(&link);
        assert_eq!(
            json,
            format!(r#"{{"trace_id":"{TRACE}","span_id":"{SPAN}"}}"#)
        );
        assert_eq!(serde_json::from_str::<TraceLink>(&json).ok(), Some(link));
        for bad in [
            format!(
                r#"{{"trace_id":"{}","span_id":"{SPAN}"}}"#,
                TRACE.to_uppercase()
            ),
            format!(r#"{{"trace_id":"{TRACE}","span_id":"xyz"}}"#),
            format!(r#"{{"trace_id":"{TRACE}","span_id":"0000000000000000"}}"#),
            format!(r#"{{"trace_id":"{TRACE}"}}"#),
        ] {
            assert!(
                serde_json::from_str::<TraceLink>(&bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn mode_parse_is_case_insensitive() {
        assert_eq!("AGG".parse::<Mode>(), Ok(Mode::Aggregated));
        assert_eq!("aggregated".parse::<Mode>(), Ok(Mode::Aggregated));
        assert_eq!("Decode".parse::<Mode>(), Ok(Mode::Decode));
        assert_eq!("prefill".parse::<Mode>(), Ok(Mode::Prefill));
        let err = "x".parse::<Mode>().expect_err("x is no mode");
        assert_eq!(
            err.to_string(),
            "unknown mode `x`, expected one of: agg, aggregated, prefill, decode"
        );
    }

    #[test]
    fn mode_serde_and_display_use_wire_names() {
        for mode in [Mode::Aggregated, Mode::Prefill, Mode::Decode] {
            let json = to_json(&mode);
            assert_eq!(json, format!("\"{mode}\""));
            assert_eq!(serde_json::from_str::<Mode>(&json).ok(), Some(mode));
        }
        assert_eq!(Mode::default(), Mode::Aggregated);
        assert_eq!(Mode::Aggregated.to_string(), "agg");
    }

    #[test]
    fn annotated_error_is_error_and_round_trips() {
        let item: Annotated<Chunk> = Annotated::from_error(
            EngineError::stream_incomplete().with_source(EngineError::new(
                ErrorKind::Backend(BackendError::Disconnected),
                "eof",
            )),
        );
        assert!(item.is_error());
        assert!(item.is_terminal());
        let json = to_json(&item);
        assert!(
            json.starts_with(r#"{"event":"error","error":{"kind":"BackendStreamIncomplete""#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<Annotated<Chunk>>(&json).ok(),
            Some(item)
        );
    }

    #[test]
    fn annotated_data_terminal_follows_chunk() {
        let tokens = Annotated::from_data(Chunk::tokens(vec![1]));
        assert!(!tokens.is_error());
        assert!(!tokens.is_terminal());
        assert_eq!(to_json(&tokens), r#"{"data":{"token_ids":[1],"index":0}}"#);
        assert!(Annotated::from_data(Chunk::terminal(FinishReason::Stop)).is_terminal());
        let decoded: Annotated<Chunk> = serde_json::from_str("{}").expect("all fields optional");
        assert!(!decoded.is_terminal());
    }
}
