//! A request's deadlines, sans-IO: the time to first token, the inter-token gap, the
//! cancel grace and the abort deferral. Told `now`, it says which deadline passed
//! ([`Deadlines::handle_timeout`]) and when it next needs to be woken
//! ([`Deadlines::poll_timeout`]); it never reads a clock or sleeps. The driver maps
//! `poll_timeout` onto one resettable runtime timer and feeds each [`Due`] to
//! [`super::step`] as an event.

use std::time::{Duration, Instant};

use super::{Event, Timeout};

/// Which deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Due {
    /// A configured timeout (or the cancel grace).
    Timeout(Timeout),
    /// The deferral deadline of a deferred abort.
    Deferral,
}

impl Due {
    /// The lifecycle event this deadline is.
    pub fn event(self) -> Event {
        match self {
            Due::Timeout(t) => Event::Timeout(t),
            Due::Deferral => Event::DeferralDeadline,
        }
    }
}

/// The deadlines of one request. Each grace and deferral is armed at most once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deadlines {
    first_token: Option<Instant>,
    inter_token: Option<Instant>,
    grace: Option<Instant>,
    deferral: Option<Instant>,
    grace_armed: bool,
    deferral_armed: bool,
}

impl Deadlines {
    /// Deadlines for a request started at `start`, with an optional first-token limit.
    pub fn new(start: Instant, first_token_timeout: Option<Duration>) -> Deadlines {
        Deadlines {
            first_token: first_token_timeout.and_then(|d| start.checked_add(d)),
            ..Deadlines::default()
        }
    }

    /// A token arrived at `now`: the first-token deadline is met, the inter-token one
    /// moves (no timer work here: see the module doc).
    pub fn token(&mut self, now: Instant, inter_token_timeout: Option<Duration>) {
        self.first_token = None;
        if let Some(d) = inter_token_timeout {
            self.inter_token = now.checked_add(d);
        }
    }

    /// The engine stream is over: only a deferral deadline can still matter.
    pub fn engine_done(&mut self) {
        self.first_token = None;
        self.inter_token = None;
        self.grace = None;
    }

    /// A stop landed at `from`: the cancel grace (if any) runs from there. Once per request.
    pub fn arm_grace(&mut self, now: Instant, grace: Option<Duration>) {
        if !self.grace_armed {
            self.grace_armed = true;
            self.grace = grace.and_then(|g| now.checked_add(g));
        }
    }

    /// An abort was deferred at `from`: it is released at `from + deferral`. Once per request.
    pub fn arm_deferral(&mut self, now: Instant, deferral: Duration) {
        if !self.deferral_armed {
            self.deferral_armed = true;
            self.deferral = now.checked_add(deferral);
        }
    }

    /// The deferred abort was released or discarded: forget its deadline.
    pub fn disarm_deferral(&mut self) {
        self.deferral = None;
    }

    /// Whether the cancel grace was armed.
    pub fn grace_armed(&self) -> bool {
        self.grace_armed
    }

    /// Whether the deferral deadline was armed.
    pub fn deferral_armed(&self) -> bool {
        self.deferral_armed
    }

    /// The earliest deadline, if any: when the caller must next call
    /// [`handle_timeout`](Self::handle_timeout) (quinn's `poll_timeout`).
    pub fn poll_timeout(&self) -> Option<Instant> {
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
    pub fn any(&self) -> bool {
        self.poll_timeout().is_some()
    }

    /// Time has come to `now`: the first deadline that passed, cleared so it is reported
    /// once. Call again until `None`; deferral first, it releases an abort.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Due> {
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

#[cfg(all(test, not(tether_loom)))]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_configured_needs_no_wake_up() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, None);
        d.token(t0, None);
        assert_eq!(d.poll_timeout(), None);
        assert!(!d.any());
        assert_eq!(d.handle_timeout(t0 + 1000 * MS), None);
    }

    #[test]
    fn first_token_deadline_fires_once_and_a_token_clears_it() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, Some(100 * MS));
        assert_eq!(d.poll_timeout(), Some(t0 + 100 * MS));
        assert_eq!(d.handle_timeout(t0 + 99 * MS), None);
        assert_eq!(
            d.handle_timeout(t0 + 100 * MS),
            Some(Due::Timeout(Timeout::FirstToken))
        );
        assert_eq!(d.handle_timeout(t0 + 100 * MS), None);
        let mut d = Deadlines::new(t0, Some(100 * MS));
        d.token(t0 + 50 * MS, None);
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn inter_token_deadline_moves_with_each_token() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, None);
        d.token(t0 + 10 * MS, Some(20 * MS));
        assert_eq!(d.poll_timeout(), Some(t0 + 30 * MS));
        d.token(t0 + 25 * MS, Some(20 * MS));
        assert_eq!(d.handle_timeout(t0 + 30 * MS), None);
        assert_eq!(
            d.handle_timeout(t0 + 45 * MS),
            Some(Due::Timeout(Timeout::InterToken))
        );
    }

    #[test]
    fn grace_and_deferral_arm_once_and_deferral_comes_first() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, None);
        d.arm_grace(t0, Some(50 * MS));
        d.arm_grace(t0 + 40 * MS, Some(50 * MS)); // ignored: armed once
        d.arm_deferral(t0, 50 * MS);
        assert!(d.grace_armed() && d.deferral_armed());
        assert_eq!(d.poll_timeout(), Some(t0 + 50 * MS));
        assert_eq!(d.handle_timeout(t0 + 50 * MS), Some(Due::Deferral));
        assert_eq!(
            d.handle_timeout(t0 + 50 * MS),
            Some(Due::Timeout(Timeout::CancelGrace))
        );
        assert_eq!(d.handle_timeout(t0 + 50 * MS), None);
        assert_eq!(Due::Deferral.event(), Event::DeferralDeadline);
    }

    #[test]
    fn engine_done_leaves_only_the_deferral() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, Some(10 * MS));
        d.arm_grace(t0, Some(10 * MS));
        d.arm_deferral(t0, 30 * MS);
        d.engine_done();
        assert_eq!(d.poll_timeout(), Some(t0 + 30 * MS));
        d.disarm_deferral();
        assert_eq!(d.poll_timeout(), None);
    }
}
