//! [`ConformanceConfig`]: the kit's limits, and [`ConfigError`], why a config is unusable.
//! Owns the defaults and their validation; it must not run anything.

use std::time::{Duration, Instant};

/// The default [`ConformanceConfig::start_timeout`].
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The default [`ConformanceConfig::check_timeout`]: how long any check but the start
/// may take before it counts as hung.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The default [`ConformanceConfig::cancel_within`]: how long a stopped request may
/// take to end with its `Cancelled` terminal.
pub const CANCEL_WITHIN: Duration = Duration::from_secs(2);

/// The default [`ConformanceConfig::stop_max_tokens`].
pub const STOP_MAX_TOKENS: u32 = 10_000;

/// The default [`ConformanceConfig::interleaved_requests`]: how many requests the
/// interleaving check runs at once.
pub const INTERLEAVED_REQUESTS: usize = 8;

/// The kit's limits. [`Default`] is what [`run_conformance_on`](super::run_conformance_on)
/// uses, sized for a simulator or a small model; an engine that loads a real model
/// raises [`start_timeout`](ConformanceConfig::start_timeout) (a load can take minutes)
/// and maybe [`check_timeout`](ConformanceConfig::check_timeout) and
/// [`cancel_within`](ConformanceConfig::cancel_within) (a decode step on a busy device
/// can be slow). Build one with the setters.
///
/// Every duration is measured on the [`Runtime`](crate::Runtime)'s clock and must be
/// positive, `interleaved_requests` and `stop_max_tokens` must be positive, and
/// `cancel_within` must be shorter than `check_timeout` (the stop check runs within
/// the check timeout, so a longer `cancel_within` could never be reported). The kit
/// checks this before it makes an engine: a config that breaks it is
/// [`ConformanceFailure::InvalidConfig`](super::ConformanceFailure::InvalidConfig),
/// never a panic or a hang.
///
/// ```
/// use std::time::Duration;
/// use tether_core::conformance::ConformanceConfig;
///
/// let config = ConformanceConfig::default()
///     .start_timeout(Duration::from_secs(600))
///     .cancel_within(Duration::from_secs(5))
///     .interleaved_requests(4);
/// assert_eq!(config.check_timeout, Duration::from_secs(30));
/// assert_eq!(config.validate(), Ok(()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConformanceConfig {
    /// How long `start` may take (it loads the model) before the start check counts as
    /// hung. Default [`START_TIMEOUT`].
    pub start_timeout: Duration,
    /// How long any other check may take, its `generate` calls, streams, aborts and
    /// cleanups included, before it counts as hung. Default [`CHECK_TIMEOUT`].
    pub check_timeout: Duration,
    /// How long a stopped request may take, from the stop, to end with its `Cancelled`
    /// terminal. Default [`CANCEL_WITHIN`].
    pub cancel_within: Duration,
    /// `max_tokens` of the request the stop check stops: large enough that only the
    /// stop can end it. Default [`STOP_MAX_TOKENS`].
    pub stop_max_tokens: u32,
    /// How many requests the interleaving check issues at once. Default
    /// [`INTERLEAVED_REQUESTS`]; 1 checks a second request, but no concurrency.
    pub interleaved_requests: usize,
}

impl Default for ConformanceConfig {
    fn default() -> Self {
        ConformanceConfig {
            start_timeout: START_TIMEOUT,
            check_timeout: CHECK_TIMEOUT,
            cancel_within: CANCEL_WITHIN,
            stop_max_tokens: STOP_MAX_TOKENS,
            interleaved_requests: INTERLEAVED_REQUESTS,
        }
    }
}

impl ConformanceConfig {
    /// Set [`start_timeout`](ConformanceConfig::start_timeout).
    pub fn start_timeout(mut self, limit: Duration) -> Self {
        self.start_timeout = limit;
        self
    }
    /// Set [`check_timeout`](ConformanceConfig::check_timeout).
    pub fn check_timeout(mut self, limit: Duration) -> Self {
        self.check_timeout = limit;
        self
    }
    /// Set [`cancel_within`](ConformanceConfig::cancel_within).
    pub fn cancel_within(mut self, limit: Duration) -> Self {
        self.cancel_within = limit;
        self
    }
    /// Set [`stop_max_tokens`](ConformanceConfig::stop_max_tokens).
    pub fn stop_max_tokens(mut self, max_tokens: u32) -> Self {
        self.stop_max_tokens = max_tokens;
        self
    }
    /// Set [`interleaved_requests`](ConformanceConfig::interleaved_requests).
    pub fn interleaved_requests(mut self, requests: usize) -> Self {
        self.interleaved_requests = requests;
        self
    }

    /// Check the rules in the [type docs](ConformanceConfig); the first one broken, in
    /// field order, is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, limit) in self.limits() {
            if limit.is_zero() {
                return Err(ConfigError::ZeroDuration { field });
            }
        }
        if self.stop_max_tokens == 0 {
            return Err(ConfigError::ZeroStopMaxTokens);
        }
        if self.interleaved_requests == 0 {
            return Err(ConfigError::NoInterleavedRequests);
        }
        if self.cancel_within >= self.check_timeout {
            return Err(ConfigError::CancelNotWithinCheck {
                cancel_within: self.cancel_within,
                check_timeout: self.check_timeout,
            });
        }
        Ok(())
    }

    /// [`validate`](ConformanceConfig::validate), and check that every limit, counted
    /// from `now`, is a time the clock can hold.
    pub(super) fn validate_at(&self, now: Instant) -> Result<(), ConfigError> {
        self.validate()?;
        for (field, limit) in self.limits() {
            deadline(now, limit, field)?;
        }
        Ok(())
    }

    fn limits(&self) -> [(&'static str, Duration); 3] {
        [
            ("start_timeout", self.start_timeout),
            ("check_timeout", self.check_timeout),
            ("cancel_within", self.cancel_within),
        ]
    }
}

/// `now + limit`, or the error naming `field` when the clock cannot hold it.
pub(super) fn deadline(
    now: Instant,
    limit: Duration,
    field: &'static str,
) -> Result<Instant, ConfigError> {
    now.checked_add(limit)
        .ok_or(ConfigError::DurationTooLong { field, limit })
}

/// Why a [`ConformanceConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration is zero: every check would count as hung at once.
    #[error("`{field}` is zero; give it a positive duration")]
    ZeroDuration {
        /// The field's name (`start_timeout`, `check_timeout` or `cancel_within`).
        field: &'static str,
    },
    /// A duration runs past what the runtime's clock can represent.
    #[error("`{field}` of {limit:?} is past the end of the clock; give it a shorter duration")]
    DurationTooLong {
        /// The field's name (`start_timeout`, `check_timeout` or `cancel_within`).
        field: &'static str,
        /// The duration given.
        limit: Duration,
    },
    /// `stop_max_tokens` is zero: the stopped request would end on its own, with `Length`.
    #[error(
        "`stop_max_tokens` is zero; give it a limit only a stop can end (the default is {})",
        STOP_MAX_TOKENS
    )]
    ZeroStopMaxTokens,
    /// `interleaved_requests` is zero: the interleaving check would check nothing.
    #[error(
        "`interleaved_requests` is zero; run at least one request (the default is {})",
        INTERLEAVED_REQUESTS
    )]
    NoInterleavedRequests,
    /// `cancel_within` is not shorter than `check_timeout`: the stop check would count as
    /// hung before a slow cancellation could be reported as one.
    #[error(
        "`cancel_within` ({cancel_within:?}) is not shorter than `check_timeout` \
         ({check_timeout:?}); shorten it or raise `check_timeout`"
    )]
    CancelNotWithinCheck {
        /// The `cancel_within` given.
        cancel_within: Duration,
        /// The `check_timeout` given.
        check_timeout: Duration,
    },
}
