//! A request's deadlines, sans-IO. Told `now`, each kind says which deadline passed
//! (`handle_timeout`) and when it next needs to be woken (`poll_timeout`); it never
//! reads a clock or sleeps. There are two kinds, because SPEC.md rule 11 gives them
//! different clocks:
//!
//! - [`Silence`]: the time-to-first-token and inter-token limits. They measure *engine
//!   silence while the consumer waits*: the clock starts when the consumer's poll finds
//!   the engine with nothing to give ([`Silence::waiting`]) and stops at the next token.
//!   A consumer that stops polling (a full socket) never makes the engine time out. They
//!   live with the consumer's poller and need no task.
//! - The cancel deadlines ([`CancelLimits`], [`CancelAnchors`], [`poll_timeout`],
//!   [`handle_timeout`]): the cancel grace and the abort deferral. They run from the
//!   stop, kill or drop that armed them and must fire whether or not the consumer polls,
//!   so the driver runs them off the consumer's path (one task, on the cancel path
//!   only). Whether one still matters is read from the machine's [`State`], so nothing
//!   has to disarm them.

use std::time::{Duration, Instant};

use super::{Actions, Event, State, Timeout};

/// Which deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Due {
    /// A configured first-token or inter-token timeout.
    Timeout(Timeout),
    /// The cancel grace of a stopped request.
    CancelGrace,
    /// The deferral deadline of a deferred abort.
    Deferral,
}

impl Due {
    /// The lifecycle event this deadline is.
    pub fn event(self) -> Event {
        match self {
            Due::Timeout(t) => Event::Timeout(t),
            Due::CancelGrace => Event::CancelGraceExpired,
            Due::Deferral => Event::DeferralDeadline,
        }
    }
}

/// The time-to-first-token and inter-token limits of one request: engine silence while
/// the consumer waits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Silence {
    first_token: Option<Duration>,
    inter_token: Option<Duration>,
    /// A token was seen: the inter-token limit applies from now on.
    seen_token: bool,
    /// When the consumer started waiting for the engine since the last token.
    waiting_since: Option<Instant>,
    /// The limit fired (once per request: the request is killed by it).
    fired: bool,
}

impl Silence {
    /// Limits for one request (`None`: no limit).
    pub fn new(first_token: Option<Duration>, inter_token: Option<Duration>) -> Silence {
        Silence {
            first_token,
            inter_token,
            ..Silence::default()
        }
    }

    /// The first-token and inter-token limits.
    pub fn limits(&self) -> (Option<Duration>, Option<Duration>) {
        (self.first_token, self.inter_token)
    }

    /// Whether any limit is configured (the driver skips the clock otherwise).
    pub fn any(&self) -> bool {
        self.first_token.is_some() || self.inter_token.is_some()
    }

    fn limit(&self) -> Option<Duration> {
        if self.seen_token {
            self.inter_token
        } else {
            self.first_token
        }
    }

    /// The consumer asked for an item and the engine had none: silence counts from
    /// `now`, unless it already counts since an earlier wait with no token between.
    pub fn waiting(&mut self, now: Instant) {
        if self.needs_wait_start() {
            self.waiting_since = Some(now);
        }
    }

    /// Whether the clock runs (the driver reads `now` for [`Silence::waiting`] only then).
    pub fn needs_wait_start(&self) -> bool {
        self.waiting_since.is_none() && self.limit().is_some() && !self.fired
    }

    /// A token arrived: the silence is over.
    pub fn token(&mut self) {
        self.seen_token = true;
        self.waiting_since = None;
    }

    /// The first token exists by another path (the engine's first-token hint): the
    /// first-token limit no longer applies, the inter-token one does, from the next wait.
    pub fn first_token_seen(&mut self) {
        if !self.seen_token {
            self.token();
        }
    }

    /// When the limit is reached if the engine stays silent, if it can be.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.fired {
            return None;
        }
        self.waiting_since?.checked_add(self.limit()?)
    }

    /// Time has come to `now`: the limit that was reached, reported once.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Due> {
        let at = self.poll_timeout()?;
        if at > now {
            return None;
        }
        self.fired = true;
        Some(Due::Timeout(if self.seen_token {
            Timeout::InterToken
        } else {
            Timeout::FirstToken
        }))
    }
}

/// The cancel grace and the deferral deadline of one request: its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CancelLimits {
    /// How long a deferred abort waits for the first token.
    pub deferral_deadline: Duration,
    /// How long a stopped request may take to end (`None`: forever).
    pub cancel_grace: Option<Duration>,
}

impl CancelLimits {
    /// Whether `acts` start a clock under these limits: the driver reads `now` (and
    /// records it with [`CancelAnchors::start`]) only then.
    pub fn started_by(&self, acts: &Actions) -> bool {
        acts.arm_deferral || (acts.arm_grace && self.cancel_grace.is_some())
    }
}

/// When the cancel clocks started (the stop, and the deferral of the abort): plain data,
/// each set once, by the step whose actions started it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CancelAnchors {
    stopped: Option<Instant>,
    deferred: Option<Instant>,
}

impl CancelAnchors {
    /// The step whose actions are `acts` happened at `now`. First start wins.
    pub fn start(&mut self, acts: &Actions, now: Instant) {
        if acts.arm_grace && self.stopped.is_none() {
            self.stopped = Some(now);
        }
        if acts.arm_deferral && self.deferred.is_none() {
            self.deferred = Some(now);
        }
    }
}

/// The cancel deadlines that still matter in `state`, with their instants.
fn live(
    state: State,
    limits: &CancelLimits,
    anchors: &CancelAnchors,
) -> [Option<(Instant, Due)>; 2] {
    [
        anchors
            .deferred
            .filter(|_| state.abort_deferred())
            .and_then(|at| at.checked_add(limits.deferral_deadline))
            .map(|at| (at, Due::Deferral)),
        anchors
            .stopped
            .filter(|_| state.grace_pending())
            .and_then(|at| at.checked_add(limits.cancel_grace?))
            .map(|at| (at, Due::CancelGrace)),
    ]
}

/// The earliest cancel deadline that still matters in `state`, if any (quinn's
/// `poll_timeout`): the driver sleeps until then.
pub fn poll_timeout(
    state: State,
    limits: &CancelLimits,
    anchors: &CancelAnchors,
) -> Option<Instant> {
    live(state, limits, anchors)
        .into_iter()
        .flatten()
        .map(|(at, _)| at)
        .min()
}

/// Time has come to `now`: a cancel deadline that passed and still matters in `state`
/// (the deferral first: it releases an abort), as the event to feed the machine. Ask
/// again with the new state until `None` (quinn's `handle_timeout`).
pub fn handle_timeout(
    state: State,
    limits: &CancelLimits,
    anchors: &CancelAnchors,
    now: Instant,
) -> Option<Due> {
    live(state, limits, anchors)
        .into_iter()
        .flatten()
        .find(|&(at, _)| at <= now)
        .map(|(_, due)| due)
}

#[cfg(all(test, not(tether_loom)))]
mod tests {
    use super::*;
    use crate::lifecycle::step;
    use crate::protocol::Mode;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_configured_needs_no_wake_up() {
        let t0 = Instant::now();
        let mut s = Silence::new(None, None);
        assert!(!s.any() && !s.needs_wait_start());
        s.waiting(t0);
        s.token();
        s.waiting(t0);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.handle_timeout(t0 + 1000 * MS), None);
    }

    #[test]
    fn first_token_silence_counts_from_the_first_wait_and_fires_once() {
        let t0 = Instant::now();
        let mut s = Silence::new(Some(100 * MS), None);
        // Nobody waits yet: no deadline, however late it is.
        assert_eq!(s.poll_timeout(), None);
        assert!(s.needs_wait_start());
        s.waiting(t0 + 10 * MS);
        s.waiting(t0 + 50 * MS); // still the same wait
        assert!(!s.needs_wait_start());
        assert_eq!(s.poll_timeout(), Some(t0 + 110 * MS));
        assert_eq!(s.handle_timeout(t0 + 109 * MS), None);
        assert_eq!(
            s.handle_timeout(t0 + 110 * MS),
            Some(Due::Timeout(Timeout::FirstToken))
        );
        assert_eq!(s.handle_timeout(t0 + 500 * MS), None);
        assert_eq!(s.poll_timeout(), None);
        assert!(!s.needs_wait_start());
    }

    #[test]
    fn inter_token_silence_restarts_at_the_next_wait_after_each_token() {
        let t0 = Instant::now();
        let mut s = Silence::new(None, Some(20 * MS));
        // No first-token limit: waiting before the first token arms nothing.
        s.waiting(t0);
        assert_eq!(s.poll_timeout(), None);
        s.token();
        // A consumer that comes back 1 s later is not an engine that was silent 1 s.
        s.waiting(t0 + 1000 * MS);
        assert_eq!(s.poll_timeout(), Some(t0 + 1020 * MS));
        s.token();
        assert_eq!(s.poll_timeout(), None);
        s.waiting(t0 + 1030 * MS);
        assert_eq!(
            s.handle_timeout(t0 + 1050 * MS),
            Some(Due::Timeout(Timeout::InterToken))
        );
    }

    #[test]
    fn cancel_deadlines_start_once_and_matter_only_while_the_state_needs_them() {
        let t0 = Instant::now();
        let limits = CancelLimits {
            deferral_deadline: 30 * MS,
            cancel_grace: Some(50 * MS),
        };
        let mut anchors = CancelAnchors::default();
        let fresh = State::new(Mode::Decode);
        let (stopped, acts) = step(fresh, Event::Stop);
        assert!(acts.arm_grace && acts.arm_deferral && limits.started_by(&acts));
        anchors.start(&acts, t0);
        anchors.start(&acts, t0 + 40 * MS); // ignored: started once
        assert_eq!(
            poll_timeout(fresh, &limits, &anchors),
            None,
            "nothing matters before a cancel"
        );
        assert_eq!(poll_timeout(stopped, &limits, &anchors), Some(t0 + 30 * MS));
        assert_eq!(
            handle_timeout(stopped, &limits, &anchors, t0 + 29 * MS),
            None
        );
        assert_eq!(
            handle_timeout(stopped, &limits, &anchors, t0 + 60 * MS),
            Some(Due::Deferral)
        );
        let (released, acts) = step(stopped, Due::Deferral.event());
        assert!(acts.abort && !limits.started_by(&acts));
        assert_eq!(
            poll_timeout(released, &limits, &anchors),
            Some(t0 + 50 * MS)
        );
        assert_eq!(
            handle_timeout(released, &limits, &anchors, t0 + 60 * MS),
            Some(Due::CancelGrace)
        );
        let (forced, _) = step(released, Event::CancelGraceExpired);
        assert_eq!(poll_timeout(forced, &limits, &anchors), None);
        assert_eq!(
            handle_timeout(forced, &limits, &anchors, t0 + 60 * MS),
            None
        );
    }

    #[test]
    fn a_grace_of_none_or_beyond_the_clock_never_fires() {
        let t0 = Instant::now();
        let (stopped, acts) = step(State::new(Mode::Aggregated), Event::Stop);
        let mut anchors = CancelAnchors::default();
        anchors.start(&acts, t0);
        let none = CancelLimits {
            deferral_deadline: MS,
            cancel_grace: None,
        };
        assert!(!none.started_by(&acts));
        assert_eq!(poll_timeout(stopped, &none, &anchors), None);
        let beyond = CancelLimits {
            deferral_deadline: MS,
            cancel_grace: Some(Duration::MAX),
        };
        assert_eq!(poll_timeout(stopped, &beyond, &anchors), None);
    }
}
