//! [`Ended`]: how a request ended, as its stream keeps it after the end (for
//! [`ResponseStream::record`](super::ResponseStream::record)), in a few bytes: every
//! in-flight request carries room for it.
//!
//! Owns: packing an [`Outcome`] without the text of a [`FinishReason::Error`] (the
//! caller keeps that text elsewhere, in the rare case there is one) and unpacking it.
//! Must not touch: the record's other parts (stats, queue time), which live elsewhere.

use super::stats::{AbortStatus, Outcome};
use crate::context::Cause;
use crate::error::ErrorKind;
use crate::protocol::FinishReason;

/// How a request ended: its outcome, the abort as it stood, the cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ended {
    outcome: EndedAs,
    pub(super) abort: AbortStatus,
    pub(super) cause: Option<Cause>,
}

/// An [`Outcome`] without the text of [`FinishReason::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndedAs {
    Finished(Finish),
    Cancelled,
    Failed(ErrorKind),
    Dropped,
    TimedOut,
}

/// A [`FinishReason`] without its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Finish {
    Eos,
    Length,
    Stop,
    Error,
    Cancelled,
    ContentFilter,
}

impl Ended {
    /// `outcome` packed, with the text of a [`FinishReason::Error`] it carries (for the
    /// caller to keep).
    pub(super) fn pack(
        outcome: &Outcome,
        abort: AbortStatus,
        cause: Option<Cause>,
    ) -> (Ended, Option<String>) {
        let (outcome, text) = match outcome {
            Outcome::Finished(reason) => {
                let (finish, text) = match reason {
                    FinishReason::Eos => (Finish::Eos, None),
                    FinishReason::Length => (Finish::Length, None),
                    FinishReason::Stop => (Finish::Stop, None),
                    FinishReason::Error(text) => (Finish::Error, Some(text.clone())),
                    FinishReason::Cancelled => (Finish::Cancelled, None),
                    FinishReason::ContentFilter => (Finish::ContentFilter, None),
                };
                (EndedAs::Finished(finish), text)
            }
            Outcome::Cancelled => (EndedAs::Cancelled, None),
            Outcome::Failed(kind) => (EndedAs::Failed(*kind), None),
            Outcome::Dropped => (EndedAs::Dropped, None),
            Outcome::TimedOut => (EndedAs::TimedOut, None),
        };
        (
            Ended {
                outcome,
                abort,
                cause,
            },
            text,
        )
    }

    /// The outcome, with `text` for a [`FinishReason::Error`] (what [`pack`](Self::pack)
    /// gave; empty if lost).
    pub(super) fn outcome(&self, text: Option<&str>) -> Outcome {
        match self.outcome {
            EndedAs::Finished(finish) => Outcome::Finished(match finish {
                Finish::Eos => FinishReason::Eos,
                Finish::Length => FinishReason::Length,
                Finish::Stop => FinishReason::Stop,
                Finish::Error => FinishReason::Error(text.unwrap_or_default().to_owned()),
                Finish::Cancelled => FinishReason::Cancelled,
                Finish::ContentFilter => FinishReason::ContentFilter,
            }),
            EndedAs::Cancelled => Outcome::Cancelled,
            EndedAs::Failed(kind) => Outcome::Failed(kind),
            EndedAs::Dropped => Outcome::Dropped,
            EndedAs::TimedOut => Outcome::TimedOut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BackendError;

    #[test]
    fn every_outcome_comes_back_as_it_went_in() {
        let reasons = [
            FinishReason::Eos,
            FinishReason::Length,
            FinishReason::Stop,
            FinishReason::Error("the engine's words".to_owned()),
            FinishReason::Cancelled,
            FinishReason::ContentFilter,
        ];
        let outcomes = reasons
            .into_iter()
            .map(Outcome::Finished)
            .chain(ErrorKind::ALL.map(Outcome::Failed))
            .chain([Outcome::Cancelled, Outcome::Dropped, Outcome::TimedOut])
            .chain([Outcome::Failed(ErrorKind::Backend(
                BackendError::StreamIncomplete,
            ))]);
        for outcome in outcomes {
            for (abort, cause) in [
                (AbortStatus::NotNeeded, None),
                (AbortStatus::Sent, Some(Cause::ClientDisconnect)),
                (AbortStatus::Discarded, Some(Cause::Timeout)),
            ] {
                let (ended, text) = Ended::pack(&outcome, abort, cause);
                let is_error = matches!(outcome, Outcome::Finished(FinishReason::Error(_)));
                assert_eq!(text.is_some(), is_error, "{outcome:?}");
                assert_eq!(ended.outcome(text.as_deref()), outcome);
                assert_eq!((ended.abort, ended.cause), (abort, cause));
            }
        }
    }

    #[test]
    fn a_request_carries_a_few_bytes_for_its_end() {
        assert!(std::mem::size_of::<Option<Ended>>() <= 8);
    }
}
