//! What an engine tells its abort hook: [`AbortReceipt`] (what an abort found) and
//! [`AbortHook`] (who is told). Both engines take a hook, so that a load test can
//! check, request by request, that every abort tether sent reached the engine.
//!
//! Owns the two types only; each engine decides which receipt an abort gets.

use std::sync::Arc;

/// What an abort found, as the engine tells its abort hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortReceipt {
    /// The sequence was waiting or running (or hung): it was freed and its stream ends
    /// with `Cancelled` and the usage so far.
    Live,
    /// The sequence had already ended, but tether had not seen that end, or saw it
    /// while the request was being cancelled, or dropped its stream: an abort decided
    /// before the end and delivered after it. Nothing to do. (TinyEngine forgets a
    /// sequence as soon as it ends, so it answers this to every abort that finds no
    /// live sequence: it cannot tell a late abort from one that is merely after the end.)
    AfterEnd,
    /// No sequence for this id could still expect an abort: the id is unknown, it was
    /// already aborted, or its end was read while nobody cancelled it. tether must
    /// never cause this; SimEngine counts it in
    /// [`SimGauges::late_aborts`](crate::SimGauges::late_aborts).
    Late,
}

/// Called with the request id and what the engine found, for every abort it receives.
pub type AbortHook = Arc<dyn Fn(&str, AbortReceipt) + Send + Sync>;

impl AbortReceipt {
    /// What an engine that forgets a sequence as soon as it ends found: `Live` when
    /// the abort ended a live sequence, `AfterEnd` otherwise.
    pub(crate) fn forgetful(live: bool) -> AbortReceipt {
        if live {
            AbortReceipt::Live
        } else {
            AbortReceipt::AfterEnd
        }
    }

    /// Tell `hook`, if there is one.
    pub(crate) fn tell(self, hook: Option<&AbortHook>, request_id: &str) {
        if let Some(hook) = hook {
            hook(request_id, self);
        }
    }
}
