//! Typed errors that cross the engine/frontend boundary: [`EngineError`], its
//! [`ErrorKind`] classification and the [`BackendError`] kinds an engine reports, and
//! [`panic_message`], the text of a caught panic.
//!
//! This module owns the error vocabulary and its wire form (JSON via serde, lossless,
//! cause chain included). It must not know about requests, streams or the lifecycle:
//! which error a given situation produces is decided by the driver, not here.

use std::any::Any;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What went wrong inside (or at the edge of) an engine backend.
///
/// Carried by [`ErrorKind::Backend`]; on the wire it is spelled with a `Backend`
/// prefix (`"BackendStreamIncomplete"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendError {
    /// The backend failed for a reason it did not classify.
    Unknown,
    /// The backend rejected the request's arguments.
    InvalidArgument,
    /// The backend could not be reached.
    CannotConnect,
    /// The connection to the backend was lost mid-request.
    Disconnected,
    /// Connecting to the backend took too long.
    ConnectionTimeout,
    /// The backend took too long to answer.
    ResponseTimeout,
    /// The backend cancelled the request.
    Cancelled,
    /// The engine is shutting down and accepts no more work.
    EngineShutdown,
    /// The engine's stream ended without a terminal chunk.
    StreamIncomplete,
}

/// The classification of an [`EngineError`].
///
/// `Display`, [`ErrorKind::as_str`], [`FromStr`] and serde all use the same spelling:
/// the variant name, and for [`ErrorKind::Backend`] `"Backend"` followed by the inner
/// name (`"BackendInvalidArgument"`). An unknown name is an error, never silently
/// mapped to [`ErrorKind::Unknown`], so a newer peer's kind is noticed rather than lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An error that fits no other kind.
    Unknown,
    /// The caller's request was malformed.
    InvalidArgument,
    /// The engine could not be reached.
    CannotConnect,
    /// The connection to the engine was lost.
    Disconnected,
    /// Connecting to the engine took too long.
    ConnectionTimeout,
    /// The engine took too long to answer.
    ResponseTimeout,
    /// No first token arrived within the configured time-to-first-token limit.
    FirstTokenTimeout,
    /// No next token arrived within the configured inter-token limit.
    InterTokenTimeout,
    /// The request was cancelled (stopped or killed).
    Cancelled,
    /// A capacity limit (slots, KV blocks, queue) was hit.
    ResourceExhausted,
    /// The service is temporarily unavailable.
    Unavailable,
    /// The engine backend reported an error of its own.
    Backend(BackendError),
}

impl ErrorKind {
    /// Every kind, in declaration order (backend kinds last). Useful for exhaustive
    /// tests and for building metric label sets up front.
    pub const ALL: [ErrorKind; 20] = [
        ErrorKind::Unknown,
        ErrorKind::InvalidArgument,
        ErrorKind::CannotConnect,
        ErrorKind::Disconnected,
        ErrorKind::ConnectionTimeout,
        ErrorKind::ResponseTimeout,
        ErrorKind::FirstTokenTimeout,
        ErrorKind::InterTokenTimeout,
        ErrorKind::Cancelled,
        ErrorKind::ResourceExhausted,
        ErrorKind::Unavailable,
        ErrorKind::Backend(BackendError::Unknown),
        ErrorKind::Backend(BackendError::InvalidArgument),
        ErrorKind::Backend(BackendError::CannotConnect),
        ErrorKind::Backend(BackendError::Disconnected),
        ErrorKind::Backend(BackendError::ConnectionTimeout),
        ErrorKind::Backend(BackendError::ResponseTimeout),
        ErrorKind::Backend(BackendError::Cancelled),
        ErrorKind::Backend(BackendError::EngineShutdown),
        ErrorKind::Backend(BackendError::StreamIncomplete),
    ];

    /// The kind's name as it appears in `Display` and on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::Unknown => "Unknown",
            ErrorKind::InvalidArgument => "InvalidArgument",
            ErrorKind::CannotConnect => "CannotConnect",
            ErrorKind::Disconnected => "Disconnected",
            ErrorKind::ConnectionTimeout => "ConnectionTimeout",
            ErrorKind::ResponseTimeout => "ResponseTimeout",
            ErrorKind::FirstTokenTimeout => "FirstTokenTimeout",
            ErrorKind::InterTokenTimeout => "InterTokenTimeout",
            ErrorKind::Cancelled => "Cancelled",
            ErrorKind::ResourceExhausted => "ResourceExhausted",
            ErrorKind::Unavailable => "Unavailable",
            ErrorKind::Backend(backend) => match backend {
                BackendError::Unknown => "BackendUnknown",
                BackendError::InvalidArgument => "BackendInvalidArgument",
                BackendError::CannotConnect => "BackendCannotConnect",
                BackendError::Disconnected => "BackendDisconnected",
                BackendError::ConnectionTimeout => "BackendConnectionTimeout",
                BackendError::ResponseTimeout => "BackendResponseTimeout",
                BackendError::Cancelled => "BackendCancelled",
                BackendError::EngineShutdown => "BackendEngineShutdown",
                BackendError::StreamIncomplete => "BackendStreamIncomplete",
            },
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error [`ErrorKind::from_str`](FromStr::from_str) returns for a name that is
/// not a known kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error kind `{name}`")]
pub struct ParseErrorKindError {
    /// The name that was not recognised.
    pub name: String,
}

impl FromStr for ErrorKind {
    type Err = ParseErrorKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Twenty names: a linear scan over `ALL` keeps the spelling defined in exactly
        // one place (`as_str`), so the two directions cannot drift apart.
        ErrorKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| ParseErrorKindError { name: s.to_owned() })
    }
}

impl Serialize for ErrorKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KindVisitor;

        impl serde::de::Visitor<'_> for KindVisitor {
            type Value = ErrorKind;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an error kind name such as \"Cancelled\" or \"BackendUnknown\"")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ErrorKind, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(KindVisitor)
    }
}

/// An error from an engine or from the lifecycle around it, with an optional cause.
///
/// Displays as `"{kind}: {message}"`; [`std::error::Error::source`] walks the cause
/// chain. It serializes as `{"kind": ..., "message": ..., "source": {...}}` (`source`
/// omitted when there is no cause) and decodes back to an equal value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct EngineError {
    kind: ErrorKind,
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[source]
    source: Option<Box<EngineError>>,
}

impl EngineError {
    /// An error of `kind` with a human-readable `message` (lowercase, no trailing period).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        EngineError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attach `cause` as the error this one was caused by (replacing any earlier cause).
    #[must_use]
    pub fn with_source(mut self, cause: EngineError) -> Self {
        self.source = Some(Box::new(cause));
        self
    }

    /// The error's classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The error's message, without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error that caused this one, if any (the typed form of `source()`).
    pub fn cause(&self) -> Option<&EngineError> {
        self.source.as_deref()
    }

    /// The request was cancelled ([`ErrorKind::Cancelled`]).
    pub fn cancelled(msg: impl Into<String>) -> Self {
        EngineError::new(ErrorKind::Cancelled, msg)
    }

    /// The engine's stream ended without a terminal chunk
    /// ([`BackendError::StreamIncomplete`]).
    pub fn stream_incomplete() -> Self {
        EngineError::new(
            ErrorKind::Backend(BackendError::StreamIncomplete),
            "engine ended without a terminal chunk",
        )
    }

    /// No first token arrived within `after` ([`ErrorKind::FirstTokenTimeout`]).
    pub fn first_token_timeout(after: Duration) -> Self {
        EngineError::new(
            ErrorKind::FirstTokenTimeout,
            format!("no first token within {after:?}"),
        )
    }

    /// No next token arrived within `after` of the previous one
    /// ([`ErrorKind::InterTokenTimeout`]).
    pub fn inter_token_timeout(after: Duration) -> Self {
        EngineError::new(
            ErrorKind::InterTokenTimeout,
            format!("no token within {after:?} of the previous one"),
        )
    }

    /// The caller's request was malformed ([`ErrorKind::InvalidArgument`]).
    pub fn invalid_argument(msg: impl Into<String>) -> Self {
        EngineError::new(ErrorKind::InvalidArgument, msg)
    }

    /// The engine panicked while producing the stream; `msg` is the panic payload
    /// (kind [`BackendError::Unknown`], message `"engine panicked: {msg}"`).
    pub fn engine_panicked(msg: impl Into<String>) -> Self {
        let msg = msg.into();
        let message = if msg.is_empty() {
            "engine panicked".to_owned()
        } else {
            format!("engine panicked: {msg}")
        };
        EngineError::new(ErrorKind::Backend(BackendError::Unknown), message)
    }
}

/// The text of a panic payload: the message of `panic!("...")` or `panic!("{x}")` (a
/// `&'static str` or a `String` payload), `""` for any other payload.
///
/// What the driver puts in [`EngineError::engine_panicked`] when an engine panics, and
/// what a panic hook can match on (pass [`PanicHookInfo::payload`]). For the `Box` that
/// [`catch_unwind`] returns, pass `&*payload`: `&payload` would coerce the box itself to
/// `dyn Any`, whose text is always `""`.
///
/// [`PanicHookInfo::payload`]: std::panic::PanicHookInfo::payload
/// [`catch_unwind`]: std::panic::catch_unwind
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn display_is_kind_colon_message() {
        let err = EngineError::new(ErrorKind::FirstTokenTimeout, "no first token within 2s");
        assert_eq!(
            err.to_string(),
            "FirstTokenTimeout: no first token within 2s"
        );
        assert_eq!(
            EngineError::stream_incomplete().to_string(),
            "BackendStreamIncomplete: engine ended without a terminal chunk"
        );
    }

    #[test]
    fn backend_invalid_argument_display_names_backend_kind() {
        let err = EngineError::new(
            ErrorKind::Backend(BackendError::InvalidArgument),
            "bad token id",
        );
        assert!(err.to_string().contains("BackendInvalidArgument"));
        assert_eq!(err.to_string(), "BackendInvalidArgument: bad token id");
    }

    #[test]
    fn convenience_constructors_set_kind_and_message() {
        assert_eq!(
            EngineError::cancelled("stopped").kind(),
            ErrorKind::Cancelled
        );
        assert_eq!(
            EngineError::invalid_argument("empty prompt").kind(),
            ErrorKind::InvalidArgument
        );
        let timeout = EngineError::first_token_timeout(Duration::from_millis(1500));
        assert_eq!(timeout.kind(), ErrorKind::FirstTokenTimeout);
        assert_eq!(timeout.message(), "no first token within 1.5s");
        let itl = EngineError::inter_token_timeout(Duration::from_millis(250));
        assert_eq!(itl.kind(), ErrorKind::InterTokenTimeout);
        assert_eq!(itl.message(), "no token within 250ms of the previous one");
        let panicked = EngineError::engine_panicked("index out of bounds");
        assert_eq!(panicked.kind(), ErrorKind::Backend(BackendError::Unknown));
        assert_eq!(panicked.message(), "engine panicked: index out of bounds");
        assert_eq!(
            EngineError::engine_panicked("").message(),
            "engine panicked"
        );
    }

    #[test]
    fn panic_message_reads_str_and_string_payloads_only() {
        let text = std::panic::catch_unwind(|| panic!("plain text")).unwrap_err();
        assert_eq!(panic_message(&*text), "plain text");
        let n = 3;
        let formatted = std::panic::catch_unwind(|| panic!("step {n}")).unwrap_err();
        assert_eq!(panic_message(&*formatted), "step 3");
        let other = std::panic::catch_unwind(|| std::panic::panic_any(7_u32)).unwrap_err();
        assert_eq!(panic_message(&*other), "");
    }

    #[test]
    fn source_walks_the_cause_chain() {
        let err = EngineError::new(ErrorKind::Unavailable, "router gave up")
            .with_source(EngineError::new(ErrorKind::CannotConnect, "refused"));
        let source = err.source().map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("CannotConnect: refused"));
        assert_eq!(
            err.cause().map(EngineError::kind),
            Some(ErrorKind::CannotConnect)
        );
        assert!(EngineError::cancelled("x").source().is_none());
    }

    #[test]
    fn json_round_trip_keeps_three_deep_cause_chain() {
        let err = EngineError::new(ErrorKind::Unavailable, "no worker could serve").with_source(
            EngineError::new(
                ErrorKind::Backend(BackendError::Disconnected),
                "worker 3 went away",
            )
            .with_source(EngineError::new(ErrorKind::ConnectionTimeout, "after 5s")),
        );
        let json = serde_json::to_string(&err).expect("serializing an EngineError cannot fail");
        let back: EngineError = serde_json::from_str(&json).expect("own output decodes");
        assert_eq!(back, err);
        assert_eq!(
            back.cause()
                .and_then(EngineError::cause)
                .map(EngineError::message),
            Some("after 5s")
        );
    }

    #[test]
    fn json_text_is_exact() {
        let err = EngineError::new(ErrorKind::Cancelled, "killed by client")
            .with_source(EngineError::stream_incomplete());
        assert_eq!(
            serde_json::to_string(&err).expect("serializing an EngineError cannot fail"),
            r#"{"kind":"Cancelled","message":"killed by client","source":{"kind":"BackendStreamIncomplete","message":"engine ended without a terminal chunk"}}"#
        );
        let decoded: EngineError =
            serde_json::from_str(r#"{"kind":"BackendEngineShutdown","message":"bye"}"#)
                .expect("valid error JSON");
        assert_eq!(
            decoded,
            EngineError::new(ErrorKind::Backend(BackendError::EngineShutdown), "bye")
        );
    }

    #[test]
    fn unknown_kind_is_a_decode_error() {
        let result: Result<EngineError, _> =
            serde_json::from_str(r#"{"kind":"Exploded","message":"x"}"#);
        let err = result.expect_err("unknown kind must not decode");
        assert!(
            err.to_string().contains("unknown error kind `Exploded`"),
            "{err}"
        );
        assert!(serde_json::from_str::<ErrorKind>(r#""Backend""#).is_err());
        assert!(serde_json::from_str::<ErrorKind>(r#""cancelled""#).is_err());
        assert!(serde_json::from_str::<ErrorKind>("3").is_err());
        assert_eq!(
            "BackendNope".parse::<ErrorKind>(),
            Err(ParseErrorKindError {
                name: "BackendNope".to_owned()
            })
        );
    }

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for kind in ErrorKind::ALL {
            assert_eq!(kind.as_str().parse::<ErrorKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
            let json = serde_json::to_string(&kind).expect("serializing a kind cannot fail");
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&json).ok(), Some(kind));
        }
        let names: std::collections::HashSet<&str> =
            ErrorKind::ALL.iter().map(ErrorKind::as_str).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }
}
