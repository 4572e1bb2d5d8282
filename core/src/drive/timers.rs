//! The driver's side of a request's [`Deadlines`]: one lazily created, resettable
//! runtime timer armed at [`Deadlines::poll_timeout`].
//!
//! A request with no deadline never creates a timer. The timer is re-armed lazily: a
//! deadline that moves later (the inter-token gap, on every chunk) does not touch the
//! timer; when it fires early the next deadline is armed then. So the per-chunk cost
//! of an inter-token timeout is one `Instant` addition.

use std::pin::Pin;
use std::task::Context;
use std::time::{Duration, Instant};

use super::{AsyncTimer, Runtime};
use crate::lifecycle::deadlines::{Deadlines, Due};

#[derive(Debug)]
pub(crate) struct Timers {
    /// The pure bookkeeping; the driver arms, moves and clears deadlines here.
    pub(crate) deadlines: Deadlines,
    timer: Option<Pin<Box<dyn AsyncTimer>>>,
    armed_at: Option<Instant>,
}

impl Timers {
    pub(crate) fn new(start: Instant, first_token_timeout: Option<Duration>) -> Timers {
        Timers {
            deadlines: Deadlines::new(start, first_token_timeout),
            timer: None,
            armed_at: None,
        }
    }

    /// Poll the timer; returns the deadlines due at `now()` (each once), or `None`
    /// with the waker registered on the timer.
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>, rt: &dyn Runtime) -> Option<Due> {
        loop {
            let next = self.deadlines.poll_timeout()?;
            let timer = match &mut self.timer {
                Some(t) => {
                    // Lazy re-arm: only a deadline earlier than the armed one needs a reset.
                    if self.armed_at.is_none_or(|at| at > next) {
                        t.as_mut().reset(next);
                        self.armed_at = Some(next);
                    }
                    t
                }
                None => {
                    self.armed_at = Some(next);
                    self.timer.insert(rt.sleep_until(next))
                }
            };
            if timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            // The timer fired at `armed_at`; see which deadlines are really due.
            if let Some(due) = self.deadlines.handle_timeout(rt.now()) {
                return Some(due);
            }
            // It fired for a deadline that has since moved later: arm the next one.
            // (Runtimes guarantee a timer never fires before `now()` reaches it.)
            self.armed_at = None;
        }
    }
}
