//! Small pieces both engines share: [`LoopControl`], how a start and a cleanup drive
//! the one scheduler loop; the error that sequences end with at shutdown; and
//! [`splitmix64`], the generator behind SimEngine's tokens and TinyEngine's weights.
//!
//! Knows nothing of requests, sequences or models.

use async_channel::{Receiver, Sender};
use tether_core::error::{BackendError, EngineError, ErrorKind};

/// Whether an engine is started, which start is current (its epoch), and the kicks
/// that wake its scheduler loop. Lives in the engine's books, under their lock.
///
/// A loop is started with the epoch [`LoopControl::start`] returns and exits when it
/// sees that epoch is no longer current, or when its kicks are closed while it waits.
/// Kicks are buffered (capacity 1), so one sent between the loop's last look at the
/// books and its wait is not lost.
#[derive(Debug, Default)]
pub(crate) struct LoopControl {
    epoch: u64,
    /// `Some` exactly while started.
    kick: Option<Sender<()>>,
}

impl LoopControl {
    /// Whether `start` ran and `stop` has not.
    pub(crate) fn is_started(&self) -> bool {
        self.kick.is_some()
    }

    /// Whether `start` ran, `stop` has not, and the loop started then still exists: its
    /// future holds the only receiver of the kicks, so a loop that returned, panicked
    /// (its runtime drops a task that panics) or was dropped by a runtime shutting down
    /// leaves none. A cheap liveness check: no lock but the caller's, nothing sent.
    pub(crate) fn is_running(&self) -> bool {
        self.kick
            .as_ref()
            .is_some_and(|kick| kick.receiver_count() > 0)
    }

    /// Whether a loop started at `epoch` should go on.
    pub(crate) fn is_current(&self, epoch: u64) -> bool {
        self.is_started() && self.epoch == epoch
    }

    /// Begin a new epoch: its number and the receiving end of its kicks, for the loop
    /// to spawn. `None` when already started (one loop per engine).
    pub(crate) fn start(&mut self) -> Option<(u64, Receiver<()>)> {
        if self.is_started() {
            return None;
        }
        self.epoch += 1;
        let (tx, rx) = async_channel::bounded(1);
        self.kick = Some(tx);
        Some((self.epoch, rx))
    }

    /// End the current epoch: its loop exits at its next look, or at once if it waits
    /// for a kick.
    pub(crate) fn stop(&mut self) {
        if let Some(kick) = self.kick.take() {
            self.epoch += 1;
            kick.close();
        }
    }

    /// Wake the loop (something may run now).
    pub(crate) fn kick(&self) {
        if let Some(kick) = &self.kick {
            // Capacity 1: a kick already pending is as good as a new one.
            let _ = kick.try_send(());
        }
    }
}

/// What every live sequence ends with when its engine is cleaned up.
pub(crate) fn shutdown_error() -> EngineError {
    EngineError::new(
        ErrorKind::Backend(BackendError::EngineShutdown),
        "engine shut down",
    )
}

/// One step of splitmix64 over `state`: small, fast, and plenty for output that only
/// needs to be deterministic and well spread.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_control_runs_one_epoch_at_a_time() {
        let mut control = LoopControl::default();
        assert!(!control.is_started());
        let (first, kicks) = control.start().unwrap();
        assert!(control.is_running(), "the loop holds its kicks");
        assert!(control.start().is_none(), "one loop per engine");
        assert!(control.is_current(first));
        control.kick();
        control.kick();
        assert_eq!(kicks.len(), 1, "kicks are buffered once");
        control.stop();
        assert!(!control.is_started() && !control.is_current(first));
        assert!(kicks.is_closed());
        assert!(!control.is_running());
        let (second, _) = control.start().unwrap();
        assert!(second > first && control.is_current(second));
        // `_` dropped the receiver at once: a loop that is gone while still started.
        assert!(control.is_started() && !control.is_running());
    }

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The first outputs of splitmix64 seeded with 0 (Vigna's reference code).
        let mut state = 0;
        assert_eq!(splitmix64(&mut state), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(&mut state), 0x6e78_9e6a_a1b9_65f4);
    }
}
