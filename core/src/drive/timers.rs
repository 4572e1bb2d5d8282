//! A request's deadlines (time to first token, inter-token gap, cancel grace, abort
//! deferral) multiplexed onto one lazily created, resettable runtime timer.
//!
//! Owns deadline bookkeeping only: it reports which [`Timeout`]s are due, the caller
//! feeds them to the lifecycle machine. A request with no deadline never creates a
//! timer. The timer is re-armed lazily: a deadline that moves later (the inter-token
//! gap, on every chunk) does not touch the timer; when it fires early the next
//! deadline is armed then. So the per-chunk cost of an inter-token timeout is one
//! `Instant` addition.

use std::pin::Pin;
use std::task::Context;
use std::time::{Duration, Instant};

use super::{AsyncTimer, Runtime};
use crate::lifecycle::Timeout;

/// Which deadline is due. `Deferral` is not a [`Timeout`] (it releases an abort).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    Timeout(Timeout),
    Deferral,
}

#[derive(Debug, Default)]
pub(crate) struct Timers {
    first_token: Option<Instant>,
    inter_token: Option<Instant>,
    grace: Option<Instant>,
    deferral: Option<Instant>,
    /// Whether grace/deferral were ever armed (each is armed once per request).
    grace_armed: bool,
    deferral_armed: bool,
    timer: Option<Pin<Box<dyn AsyncTimer>>>,
    armed_at: Option<Instant>,
}

impl Timers {
    pub(crate) fn new(start: Instant, first_token_timeout: Option<Duration>) -> Timers {
        Timers {
            first_token: first_token_timeout.and_then(|d| start.checked_add(d)),
            ..Timers::default()
        }
    }

    /// A token arrived at `now`: the first-token deadline is met, the inter-token one
    /// moves (no timer work here: see the module doc).
    pub(crate) fn token(&mut self, now: Instant, inter_token_timeout: Option<Duration>) {
        self.first_token = None;
        if let Some(d) = inter_token_timeout {
            self.inter_token = now.checked_add(d);
        }
    }

    /// The engine stream is over: only a deferral deadline can still matter.
    pub(crate) fn engine_done(&mut self) {
        self.first_token = None;
        self.inter_token = None;
        self.grace = None;
    }

    pub(crate) fn arm_grace(&mut self, now: Instant, grace: Option<Duration>) {
        if !self.grace_armed {
            self.grace_armed = true;
            self.grace = grace.and_then(|g| now.checked_add(g));
        }
    }

    pub(crate) fn arm_deferral(&mut self, now: Instant, deferral: Duration) {
        if !self.deferral_armed {
            self.deferral_armed = true;
            self.deferral = now.checked_add(deferral);
        }
    }

    pub(crate) fn disarm_deferral(&mut self) {
        self.deferral = None;
    }

    pub(crate) fn grace_armed(&self) -> bool {
        self.grace_armed
    }

    pub(crate) fn deferral_armed(&self) -> bool {
        self.deferral_armed
    }

    fn next(&self) -> Option<Instant> {
        [
            self.first_token,
            self.inter_token,
            self.grace,
            self.deferral,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether any deadline exists (the caller skips reading the clock otherwise).
    pub(crate) fn any(&self) -> bool {
        self.next().is_some()
    }

    /// Poll the timer; returns the deadlines due at `now()` (each once), or `None`
    /// with the waker registered on the timer.
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>, rt: &dyn Runtime) -> Option<Due> {
        loop {
            let next = self.next()?;
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
            if let Some(due) = self.take_due(rt.now()) {
                return Some(due);
            }
            // It fired for a deadline that has since moved later: arm the next one.
            // (Runtimes guarantee a timer never fires before `now()` reaches it.)
            self.armed_at = None;
        }
    }

    fn take_due(&mut self, now: Instant) -> Option<Due> {
        let due = |d: &mut Option<Instant>| match *d {
            Some(at) if at <= now => {
                *d = None;
                true
            }
            _ => false,
        };
        if due(&mut self.deferral) {
            return Some(Due::Deferral);
        }
        if due(&mut self.first_token) {
            return Some(Due::Timeout(Timeout::FirstToken));
        }
        if due(&mut self.inter_token) {
            return Some(Due::Timeout(Timeout::InterToken));
        }
        if due(&mut self.grace) {
            return Some(Due::Timeout(Timeout::CancelGrace));
        }
        None
    }
}
