//! [`SharedState`]: the shared copy of a request's [`State`] in one atomic word, updated by
//! compare-exchange, and the poller's one-entry memo ([`StepCache`]).

use super::{step, Actions, Event, State};
use crate::sync::atomic::{AtomicU32, Ordering};

/// The shared copy of a request's [`State`]: one atomic word, updated by
/// compare-exchange so that of several racing actors exactly one wins each decision.
#[derive(Debug)]
pub struct SharedState {
    word: AtomicU32,
}

impl SharedState {
    /// A cell holding `state`.
    pub fn new(state: State) -> SharedState {
        SharedState {
            word: AtomicU32::new(state.pack()),
        }
    }

    /// The current state.
    #[inline]
    pub fn load(&self) -> State {
        // Acquire pairs with the AcqRel exchange in `apply`: whoever reads a state sees
        // everything the actor that wrote it did before.
        State::unpack(self.word.load(Ordering::Acquire)).expect("cell holds a packed state")
    }

    /// Apply `event` atomically; returns the state it moved to and the actions that the
    /// caller, and only the caller, must carry out. Retries on contention; `step` is
    /// pure, so a retry just recomputes.
    #[inline]
    pub fn apply(&self, event: Event) -> (State, Actions) {
        // Acquire: see the state the last writer published (pairs with AcqRel below).
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            let old = State::unpack(current).expect("cell holds a packed state");
            let (new, acts) = step(old, event);
            if new == old {
                return (new, acts);
            }
            // AcqRel: release this decision to the next actor, acquire the previous one.
            match self.word.compare_exchange_weak(
                current,
                new.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return (new, acts),
                Err(actual) => current = actual,
            }
        }
    }
}

/// The poller's memo of its steady step (see [`SharedState::apply_steady`]): the packed
/// word and the event of the last step that changed nothing and only passed a chunk
/// on. Owned by one caller (the poller); 8 bytes, on a struct every in-flight request
/// carries.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepCache {
    steady: Option<(u32, Event)>,
}

impl SharedState {
    /// Whether the word is the one of the remembered steady step (see
    /// [`apply_steady`](Self::apply_steady)): the request is live and owes the consumer
    /// no terminal (a step that only forwards a chunk is taken in no other state), so
    /// the poller has nothing to look at before it polls the engine.
    #[inline(always)]
    pub fn is_steady_cached(&self, cache: &StepCache) -> bool {
        // Acquire: as in `load`.
        matches!(cache.steady, Some((w, _)) if w == self.word.load(Ordering::Acquire))
    }

    /// [`apply`](Self::apply) for the poller's hot path: `None` for the step it takes
    /// on almost every chunk, the remembered steady no-op (the state unchanged, the
    /// actions [`is_steady`](Actions::is_steady), the engine not done), which leaves
    /// nothing to copy out or to check; otherwise the step's state and actions. Since
    /// [`step`] is pure, the same packed state and event give the same result.
    #[inline(always)]
    pub fn apply_steady(&self, event: Event, cache: &mut StepCache) -> Option<(State, Actions)> {
        // Acquire: as in `apply`.
        let word = self.word.load(Ordering::Acquire);
        if cache.steady == Some((word, event)) {
            return None;
        }
        Some(self.apply_and_remember(word, event, cache))
    }

    /// [`apply_steady`](Self::apply_steady) off its steady step: step from `word`, and
    /// remember the step if it is the steady one. Out of line, so that the poller's
    /// loop carries none of it.
    #[inline(never)]
    fn apply_and_remember(
        &self,
        word: u32,
        event: Event,
        cache: &mut StepCache,
    ) -> (State, Actions) {
        let old = State::unpack(word).expect("cell holds a packed state");
        let (new, acts) = step(old, event);
        if new == old {
            // A no-op needs no exchange.
            if acts.is_steady() && !new.engine_done() {
                cache.steady = Some((word, event));
            }
            return (new, acts);
        }
        // AcqRel/Acquire: as in `apply`; on contention, `apply` retries from scratch.
        match self
            .word
            .compare_exchange(word, new.pack(), Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => (new, acts),
            Err(_) => self.apply(event),
        }
    }
}
