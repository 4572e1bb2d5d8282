//! [`Chaos`]: faults a request asks the simulator to inject, for load tests, and how a
//! frontend recognizes them ([`is_chaos_annotation`], [`is_chaos_panic`]).
//!
//! Owns the fault kinds, their annotation syntax and the injected panic's text only;
//! the scheduler and the stream carry them out.

use std::fmt;
use std::str::FromStr;

/// The annotation prefix that selects a fault: `chaos:error@3`, `chaos:hang@1`,
/// `chaos:hang`, `chaos:panic@2` (no `@k` means step 0).
const CHAOS_PREFIX: &str = "chaos:";

/// Every panic the simulator injects starts with this text.
pub(crate) const CHAOS_PANIC_MESSAGE: &str = "sim chaos: injected panic";

/// Whether `annotation` asks SimEngine for a fault (`chaos:...`, well-formed or not): a
/// server that must not let its clients inject faults drops these from requests.
pub fn is_chaos_annotation(annotation: &str) -> bool {
    annotation.starts_with(CHAOS_PREFIX)
}

/// Whether a panic with this message is one SimEngine injected on purpose
/// ([`Chaos::Panic`]), so a panic hook can keep it quiet and still report real ones.
/// Read the message from the payload with
/// [`panic_message`](tether_core::error::panic_message).
pub fn is_chaos_panic(message: &str) -> bool {
    message.starts_with(CHAOS_PANIC_MESSAGE)
}

/// A fault injected into one request. The step `k` counts tokens: the fault strikes
/// when the sequence would emit its token number `k` (0-based), so exactly `k` tokens
/// reach the stream before it. A request that ends before step `k` never sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Chaos {
    /// The stream yields a typed engine error (`Backend(Unknown)`) instead of token `k`.
    Error(u32),
    /// The sequence stops producing at token `k` and never yields again; it keeps its
    /// slot and KV blocks until it is aborted or its stream dropped.
    Hang(u32),
    /// The stream panics inside `poll_next` where it would yield token `k`.
    Panic(u32),
}

impl Chaos {
    /// The step the fault strikes at.
    pub fn step(self) -> u32 {
        match self {
            Chaos::Error(k) | Chaos::Hang(k) | Chaos::Panic(k) => k,
        }
    }

    /// The request annotation that asks for this fault.
    pub fn annotation(self) -> String {
        format!("{CHAOS_PREFIX}{self}")
    }

    /// The fault requested by `annotations`, if any (the last one wins).
    pub fn from_annotations(annotations: &[String]) -> Result<Option<Chaos>, ChaosParseError> {
        let mut chaos = None;
        for a in annotations {
            if let Some(spec) = a.strip_prefix(CHAOS_PREFIX) {
                chaos = Some(spec.parse()?);
            }
        }
        Ok(chaos)
    }
}

impl fmt::Display for Chaos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, k) = match *self {
            Chaos::Error(k) => ("error", k),
            Chaos::Hang(k) => ("hang", k),
            Chaos::Panic(k) => ("panic", k),
        };
        write!(f, "{name}@{k}")
    }
}

/// A chaos annotation that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad chaos annotation {spec:?}: expected error|hang|panic, optionally @step")]
pub struct ChaosParseError {
    spec: String,
}

impl FromStr for Chaos {
    type Err = ChaosParseError;

    /// `error`, `hang` or `panic`, optionally followed by `@k`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ChaosParseError { spec: s.to_owned() };
        let (name, k) = match s.split_once('@') {
            Some((name, k)) => (name, k.parse::<u32>().map_err(|_| err())?),
            None => (s, 0),
        };
        match name {
            "error" => Ok(Chaos::Error(k)),
            "hang" => Ok(Chaos::Hang(k)),
            "panic" => Ok(Chaos::Panic(k)),
            _ => Err(err()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_round_trip() {
        for c in [Chaos::Error(3), Chaos::Hang(0), Chaos::Panic(7)] {
            assert_eq!(Chaos::from_annotations(&[c.annotation()]), Ok(Some(c)));
        }
        let plain = vec!["chaos:hang".to_owned(), "other".to_owned()];
        assert_eq!(Chaos::from_annotations(&plain), Ok(Some(Chaos::Hang(0))));
        assert_eq!(Chaos::from_annotations(&["x".to_owned()]), Ok(None));
    }

    #[test]
    fn chaos_annotations_and_panics_are_recognized() {
        for c in [Chaos::Error(3), Chaos::Hang(0), Chaos::Panic(7)] {
            assert!(is_chaos_annotation(&c.annotation()));
        }
        assert!(is_chaos_annotation("chaos:boom"), "malformed, still chaos");
        assert!(!is_chaos_annotation("x-chaos:hang"));
        assert!(!is_chaos_annotation("Chaos:hang"));
        assert!(is_chaos_panic(&format!("{CHAOS_PANIC_MESSAGE} at step 2")));
        assert!(!is_chaos_panic("index out of bounds"));
        assert!(!is_chaos_panic(""));
    }

    #[test]
    fn bad_annotations_are_errors() {
        for bad in ["chaos:boom", "chaos:error@x", "chaos:hang@-1", "chaos:"] {
            assert!(Chaos::from_annotations(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
