//! [`TraceLink`]: a W3C trace-context link between spans, and why a malformed one is
//! rejected ([`TraceLinkError`]). Parsing never panics.

use std::fmt;

use serde::{Deserialize, Serialize};

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
#[serde(try_from = "RawTraceLink", into = "RawTraceLink")]
pub struct TraceLink {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

/// The wire form of a [`TraceLink`], its ids as they came (decoding goes through
/// [`TraceLink::parse`]); what a [`Request`](super::Request) keeps of a malformed one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RawTraceLink {
    /// The trace id as it came.
    pub trace_id: String,
    /// The span id as it came.
    pub span_id: String,
}

impl TryFrom<RawTraceLink> for TraceLink {
    type Error = TraceLinkError;

    fn try_from(repr: RawTraceLink) -> Result<Self, Self::Error> {
        TraceLink::parse(&repr.trace_id, &repr.span_id)
    }
}

impl From<TraceLink> for RawTraceLink {
    fn from(link: TraceLink) -> Self {
        RawTraceLink {
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
