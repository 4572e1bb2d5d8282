//! One lazily created, resettable runtime timer, armed at the earliest deadline a
//! sans-IO deadline keeper reports ([`Silence`] on the consumer's poller,
//! the cancel deadlines' `poll_timeout` in the watchdog).
//!
//! A request with no deadline never creates a timer. The timer is re-armed lazily: a
//! deadline that moves later (the inter-token silence, after every token) does not
//! touch the timer; when it fires early the next deadline is armed then. The timer
//! contract (SPEC.md section 6: ready once the deadline passed and until reset) is what
//! makes "fired early, re-arm later" safe.

use std::pin::Pin;
use std::task::Context;
use std::time::Instant;

use super::{AsyncTimer, Runtime};

/// A timer slot: created on first use, reset in place afterwards.
#[derive(Debug, Default)]
pub(crate) struct Timer {
    timer: Option<Pin<Box<dyn AsyncTimer>>>,
    armed_at: Option<Instant>,
}

impl Timer {
    /// Wait for `deadline`: `true` once the runtime's clock reached the armed deadline
    /// (which may be earlier than `deadline`, when it moved later since), `false` with
    /// the waker registered.
    pub(crate) fn poll_until(
        &mut self,
        deadline: Instant,
        cx: &mut Context<'_>,
        rt: &dyn Runtime,
    ) -> bool {
        let timer = match &mut self.timer {
            Some(t) => {
                // Lazy re-arm: only an earlier deadline, or one after a fired timer,
                // needs a reset.
                if self.armed_at.is_none_or(|at| at > deadline) {
                    t.as_mut().reset(deadline);
                    self.armed_at = Some(deadline);
                }
                t
            }
            None => {
                self.armed_at = Some(deadline);
                self.timer.insert(rt.sleep_until(deadline))
            }
        };
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        // It fired at `armed_at`: the caller checks what is really due at `now()`;
        // if nothing is, the next call re-arms for the later deadline.
        self.armed_at = None;
        true
    }
}
