//! The request's [`State`]: a small `Copy` value packed into one word, and the enums it
//! is made of. What the state *means* for each event is [`super::step`]'s business.

use crate::protocol::Mode;

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Generated, no token seen yet.
    Pending,
    /// The first token was seen (a non-empty chunk or the first-token hint).
    Streaming,
    /// Stop, kill or a timeout was seen; waiting for the end.
    Cancelling,
    /// A terminal was delivered to the consumer. Final.
    Terminal,
    /// The consumer went away before a terminal. Final.
    Dropped,
}

/// The cancellation requested so far (forward-only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cancel {
    /// Nobody asked to cancel.
    None,
    /// Graceful: the engine is asked to finish, chunks keep flowing.
    Stop,
    /// Immediate: the consumer gets a synthesized terminal at its next poll.
    Kill,
}

/// What happened to the engine abort (forward-only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Abort {
    /// No abort is due.
    None,
    /// Due, but held back until the first token (decode mode) or the deadline.
    Deferred,
    /// Issued: the caller was told to run `LlmEngine::abort`.
    Sent,
    /// Was deferred and will never be sent: the engine ended by itself first. Final.
    Discarded,
}

/// A terminal the driver owes the consumer and has not delivered yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Synthesized {
    /// A `FinishReason::Cancelled` terminal chunk.
    Cancelled,
    /// An error terminal with [`crate::ErrorKind::FirstTokenTimeout`].
    FirstTokenTimeout,
    /// An error terminal with [`crate::ErrorKind::InterTokenTimeout`].
    InterTokenTimeout,
    /// An error terminal with `Backend(StreamIncomplete)`: the engine ended without one.
    Incomplete,
}

/// The request's lifecycle state. `Copy`, 14 bits: see [`State::pack`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct State {
    pub(super) mode: Mode,
    pub(super) phase: Phase,
    pub(super) cancel: Cancel,
    pub(super) abort: Abort,
    pub(super) pending_terminal: Option<Synthesized>,
    pub(super) first_token: bool,
    pub(super) engine_done: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("mode", &self.mode)
            .field("phase", &self.phase)
            .field("cancel", &self.cancel)
            .field("abort", &self.abort)
            .field("pending_terminal", &self.pending_terminal)
            .field("first_token", &self.first_token)
            .field("engine_done", &self.engine_done)
            .finish()
    }
}

impl State {
    /// A new request in `mode`, nothing seen yet.
    pub const fn new(mode: Mode) -> State {
        State {
            mode,
            phase: Phase::Pending,
            cancel: Cancel::None,
            abort: Abort::None,
            pending_terminal: None,
            first_token: false,
            engine_done: false,
        }
    }

    /// The disaggregation role this request runs in.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    #[cfg(any(test, feature = "internals", tether_loom))]
    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }
    /// The cancellation requested so far.
    pub fn cancel(&self) -> Cancel {
        self.cancel
    }
    /// The state of the engine abort.
    pub fn abort(&self) -> Abort {
        self.abort
    }
    /// The synthesized terminal owed to the consumer, if any.
    pub fn pending_terminal(&self) -> Option<Synthesized> {
        self.pending_terminal
    }
    /// Whether the first token was seen (non-empty chunk or hint).
    pub fn first_token(&self) -> bool {
        self.first_token
    }
    /// Whether the engine's stream is over (its terminal, error or end was seen).
    pub fn engine_done(&self) -> bool {
        self.engine_done
    }
    /// Whether the outcome was recorded (a terminal delivered, or the consumer gone).
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Terminal | Phase::Dropped)
    }
    #[cfg(any(test, feature = "internals", tether_loom))]
    /// Whether a terminal reached the consumer.
    pub fn is_terminal(&self) -> bool {
        self.phase == Phase::Terminal
    }
    #[cfg(any(test, feature = "internals", tether_loom))]
    /// Whether stop, kill or a timeout was seen before the end.
    pub fn is_cancelling(&self) -> bool {
        self.phase == Phase::Cancelling
    }
    /// Whether an abort is deferred and not yet released or discarded.
    pub fn abort_deferred(&self) -> bool {
        self.abort == Abort::Deferred
    }
    #[cfg(any(test, feature = "internals", tether_loom))]
    /// Whether the poller should still poll the engine's stream.
    pub fn polls_engine(&self) -> bool {
        !self.is_over() && !self.engine_done && self.pending_terminal.is_none()
    }
    /// Whether the request is over for the consumer but an abort is still deferred and
    /// the engine still running: its stream must be kept alive and drained (rule 2)
    /// until the abort is sent or discarded.
    pub fn drains_engine(&self) -> bool {
        self.is_over() && self.abort == Abort::Deferred && !self.engine_done
    }
    /// Whether the cancel grace still matters: stopped, not yet forced, not over.
    pub fn grace_pending(&self) -> bool {
        !self.is_over() && self.cancel == Cancel::Stop && self.pending_terminal.is_none()
    }

    /// Pack into the low 14 bits of a `u32` (the shared atomic word).
    #[inline]
    pub const fn pack(self) -> u32 {
        let mode = match self.mode {
            Mode::Aggregated => 0,
            Mode::Prefill => 1,
            Mode::Decode => 2,
        };
        let phase = match self.phase {
            Phase::Pending => 0,
            Phase::Streaming => 1,
            Phase::Cancelling => 2,
            Phase::Terminal => 3,
            Phase::Dropped => 4,
        };
        let cancel = match self.cancel {
            Cancel::None => 0,
            Cancel::Stop => 1,
            Cancel::Kill => 2,
        };
        let abort = match self.abort {
            Abort::None => 0,
            Abort::Deferred => 1,
            Abort::Sent => 2,
            Abort::Discarded => 3,
        };
        let owed = match self.pending_terminal {
            None => 0,
            Some(Synthesized::Cancelled) => 1,
            Some(Synthesized::FirstTokenTimeout) => 2,
            Some(Synthesized::InterTokenTimeout) => 3,
            Some(Synthesized::Incomplete) => 4,
        };
        mode | phase << 2
            | cancel << 5
            | abort << 7
            | owed << 9
            | (self.first_token as u32) << 12
            | (self.engine_done as u32) << 13
    }

    /// Unpack a word made by [`State::pack`]. Returns `None` for a word no state packs to.
    #[inline]
    pub const fn unpack(word: u32) -> Option<State> {
        if word >> 14 != 0 {
            return None;
        }
        let mode = match word & 0b11 {
            0 => Mode::Aggregated,
            1 => Mode::Prefill,
            2 => Mode::Decode,
            _ => return None,
        };
        let phase = match (word >> 2) & 0b111 {
            0 => Phase::Pending,
            1 => Phase::Streaming,
            2 => Phase::Cancelling,
            3 => Phase::Terminal,
            4 => Phase::Dropped,
            _ => return None,
        };
        let cancel = match (word >> 5) & 0b11 {
            0 => Cancel::None,
            1 => Cancel::Stop,
            2 => Cancel::Kill,
            _ => return None,
        };
        let abort = match (word >> 7) & 0b11 {
            0 => Abort::None,
            1 => Abort::Deferred,
            2 => Abort::Sent,
            _ => Abort::Discarded,
        };
        let owed = match (word >> 9) & 0b111 {
            0 => None,
            1 => Some(Synthesized::Cancelled),
            2 => Some(Synthesized::FirstTokenTimeout),
            3 => Some(Synthesized::InterTokenTimeout),
            4 => Some(Synthesized::Incomplete),
            _ => return None,
        };
        Some(State {
            mode,
            phase,
            cancel,
            abort,
            pending_terminal: owed,
            first_token: (word >> 12) & 1 == 1,
            engine_done: (word >> 13) & 1 == 1,
        })
    }
}
