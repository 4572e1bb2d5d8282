//! The conformance kit: checks any [`LlmEngine`] against the engine contract, on any
//! [`Runtime`], and names the first broken rule with a typed [`ConformanceFailure`]
//! whose message says how to fix it.
//!
//! The kit calls the engine *directly* (with [`GenerateContext::new`]), never through
//! the [`Adapter`](crate::Adapter): the adapter papers over some engine faults (it
//! synthesizes a `Cancelled` terminal, for one), and the point here is to see the
//! engine as it is. It owns no clock and spawns no task: every deadline is a timer from
//! the given runtime, and concurrent work is polled in place. It must not touch the
//! lifecycle machine.
//!
//! The checks, in order (see [`CHECKS`]), run as a server runs an engine: one engine
//! is started once, serves the generate checks, and is cleaned up.
//!
//! 1. `start_reports_model`: `start` succeeds and reports a non-empty model;
//! 2. `single_generate`: one `generate` with no `max_tokens` (the engine's own limit
//!    ends it) yields chunks and ends with exactly one terminal chunk, as its last item,
//!    and no error item;
//! 3. `interleaved_generates`: [`interleaved_requests`](ConformanceConfig::interleaved_requests)
//!    requests issued at once: their `generate` futures polled together, each stream
//!    polled round-robin from the moment it is set up; each yields chunks and a terminal;
//! 4. `stop_yields_cancelled`: a request with
//!    [`stop_max_tokens`](ConformanceConfig::stop_max_tokens), stopped and aborted right
//!    after `generate` (as the adapter would), ends with a `Cancelled` terminal within
//!    [`cancel_within`](ConformanceConfig::cancel_within) of the runtime's clock;
//! 5. `cleanup_twice`: `cleanup` of the engine that ran checks 1 to 4 succeeds, and a
//!    second `cleanup` right after it does too;
//! 6. `cleanup_without_start`: `cleanup` on a fresh, never-started engine succeeds.
//!
//! The factory is called twice: once for the engine of checks 1 to 5, once for check
//! 6. The start check must finish within
//! [`start_timeout`](ConformanceConfig::start_timeout) (a model load can take minutes)
//! and every other check within [`check_timeout`](ConformanceConfig::check_timeout),
//! or it is [`ConformanceFailure::Hung`]. After any other failure of checks 1 to 4 the
//! engine is still cleaned up, best effort (after a hang it is not: a hung engine would
//! likely hang its cleanup too).
//!
//! # Which clock
//!
//! The limits are measured on the runtime's clock. A paused tokio clock
//! (`#[tokio::test(start_paused = true)]`) makes them cost no real time, but only for
//! an engine that does all its work on the runtime's own tasks and timers (a simulator):
//! a paused clock jumps to the next timer whenever the runtime is idle, and a runtime
//! waiting on an engine that computes on its own threads (a real model, a device) is
//! idle, so the kit's deadlines fire at once and a correct engine fails as
//! [`Hung`](ConformanceFailure::Hung) or
//! [`CancellationNotObserved`](ConformanceFailure::CancellationNotObserved). Check such
//! an engine on a real clock: smol, or tokio without `start_paused`.
//!
//! # Example
//!
//! An engine crate checks itself in a test; the runtime shims wrap
//! [`run_conformance_with`] with their own runtime (`tether_tokio::run_conformance_with`,
//! `tether_smol::run_conformance_with`):
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tether_core::conformance::{run_conformance_with, ConformanceConfig};
//! use tether_core::{LlmEngine, Runtime};
//!
//! async fn check(runtime: &dyn Runtime, make: impl Fn() -> Arc<dyn LlmEngine> + Send + Sync) {
//!     // A real model: minutes to load, a slow first decode step.
//!     let config = ConformanceConfig::default()
//!         .start_timeout(Duration::from_secs(600))
//!         .cancel_within(Duration::from_secs(5));
//!     match run_conformance_with(runtime, &make, &config).await {
//!         Ok(report) => println!("{} passed {:?}", report.model, report.checks),
//!         Err(failure) => panic!("engine is not conformant: {failure}"),
//!     }
//! }
//! ```
//!
//! For an engine's own tests of cancellation, [`cancelling_context`] gives a context
//! that stops itself on the runtime's clock.

mod cancelling;
mod checks;
mod config;
mod failure;

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

pub use cancelling::cancelling_context;
pub use config::{
    ConfigError, ConformanceConfig, CANCEL_WITHIN, CHECK_TIMEOUT, INTERLEAVED_REQUESTS,
    START_TIMEOUT, STOP_MAX_TOKENS,
};
pub use failure::ConformanceFailure;

use crate::drive::{AsyncTimer, Runtime};
#[cfg(doc)]
use crate::engine::GenerateContext;
use crate::engine::LlmEngine;

/// The names of the checks, in the order they run (and appear in
/// [`ConformanceReport::checks`]).
pub const CHECKS: [&str; 6] = [
    CHECK_START,
    CHECK_SINGLE,
    CHECK_INTERLEAVED,
    CHECK_STOP,
    CHECK_CLEANUP_TWICE,
    CHECK_CLEANUP_WITHOUT_START,
];

const CHECK_START: &str = "start_reports_model";
const CHECK_SINGLE: &str = "single_generate";
const CHECK_INTERLEAVED: &str = "interleaved_generates";
const CHECK_STOP: &str = "stop_yields_cancelled";
const CHECK_CLEANUP_TWICE: &str = "cleanup_twice";
const CHECK_CLEANUP_WITHOUT_START: &str = "cleanup_without_start";

/// The worker id the kit starts engines as.
const WORKER_ID: u64 = 0;

/// What a passing engine produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConformanceReport {
    /// The names of the checks passed, in order (all of [`CHECKS`]).
    pub checks: Vec<&'static str>,
    /// The model the engine reported from `start`.
    pub model: String,
}

/// [`run_conformance_with`] the default [`ConformanceConfig`].
///
/// # Example
///
/// ```no_run
/// # use std::sync::Arc;
/// # use tether_core::{conformance, LlmEngine, Runtime};
/// # async fn demo(runtime: &dyn Runtime, make: fn() -> Arc<dyn LlmEngine>) {
/// let report = conformance::run_conformance_on(runtime, &make).await.expect("conformant");
/// assert_eq!(report.checks, conformance::CHECKS);
/// # }
/// ```
pub async fn run_conformance_on(
    runtime: &dyn Runtime,
    factory: &(dyn Fn() -> Arc<dyn LlmEngine> + Send + Sync),
) -> Result<ConformanceReport, ConformanceFailure> {
    run_conformance_with(runtime, factory, &ConformanceConfig::default()).await
}

/// Run every check against engines made by `factory`, on `runtime`, within the limits
/// of `config`; stop at the first failure. See the [module docs](self) for the checks.
///
/// An unusable `config` is [`ConformanceFailure::InvalidConfig`], before `factory` is
/// called.
pub async fn run_conformance_with(
    runtime: &dyn Runtime,
    factory: &(dyn Fn() -> Arc<dyn LlmEngine> + Send + Sync),
    config: &ConformanceConfig,
) -> Result<ConformanceReport, ConformanceFailure> {
    config.validate_at(runtime.now())?;
    let kit = Kit { runtime, config };
    let mut checks = Vec::with_capacity(CHECKS.len());

    let engine = factory();
    let served = start_and_generate(&kit, &*engine, &mut checks).await;
    let model = match served {
        Ok(model) => model,
        Err(failure) => {
            if !matches!(failure, ConformanceFailure::Hung { .. }) {
                let cleanup = async {
                    engine
                        .cleanup()
                        .await
                        .map_err(ConformanceFailure::CleanupFailed)
                };
                let _best_effort = kit.guarded(CHECK_CLEANUP_TWICE, cleanup).await;
            }
            return Err(failure);
        }
    };

    kit.guarded(CHECK_CLEANUP_TWICE, async {
        engine
            .cleanup()
            .await
            .map_err(ConformanceFailure::CleanupFailed)?;
        engine
            .cleanup()
            .await
            .map_err(ConformanceFailure::SecondCleanupFailed)
    })
    .await?;
    drop(engine);
    checks.push(CHECK_CLEANUP_TWICE);

    let engine = factory();
    kit.guarded(CHECK_CLEANUP_WITHOUT_START, async {
        engine
            .cleanup()
            .await
            .map_err(ConformanceFailure::CleanupWithoutStartFailed)
    })
    .await?;
    drop(engine);
    checks.push(CHECK_CLEANUP_WITHOUT_START);

    Ok(ConformanceReport { checks, model })
}

/// Checks 1 to 4 on one engine, as a server runs it: start it, then the generate
/// checks; the model it reported.
async fn start_and_generate(
    kit: &Kit<'_>,
    engine: &dyn LlmEngine,
    checks: &mut Vec<&'static str>,
) -> Result<String, ConformanceFailure> {
    let model = kit.guarded(CHECK_START, start(engine)).await?;
    checks.push(CHECK_START);
    kit.guarded(CHECK_SINGLE, checks::single_generate(engine, &model))
        .await?;
    checks.push(CHECK_SINGLE);
    let requests = kit.config.interleaved_requests;
    kit.guarded(
        CHECK_INTERLEAVED,
        checks::interleaved_generates(engine, &model, requests),
    )
    .await?;
    checks.push(CHECK_INTERLEAVED);
    kit.guarded(
        CHECK_STOP,
        checks::stop_yields_cancelled(kit, engine, &model),
    )
    .await?;
    checks.push(CHECK_STOP);
    Ok(model)
}

async fn start(engine: &dyn LlmEngine) -> Result<String, ConformanceFailure> {
    let config = engine
        .start(WORKER_ID)
        .await
        .map_err(ConformanceFailure::StartFailed)?;
    if config.model.is_empty() {
        return Err(ConformanceFailure::EmptyModelInConfig);
    }
    Ok(config.model)
}

/// The runtime and the limits one run of the kit works with.
struct Kit<'a> {
    runtime: &'a dyn Runtime,
    config: &'a ConformanceConfig,
}

impl Kit<'_> {
    /// A timer `limit` (the config's field `field`) after `from`.
    fn timer(
        &self,
        from: Instant,
        limit: Duration,
        field: &'static str,
    ) -> Result<Pin<Box<dyn AsyncTimer>>, ConformanceFailure> {
        let deadline = config::deadline(from, limit, field)?;
        Ok(self.runtime.sleep_until(deadline))
    }

    /// Race `check_future` against the check's timeout (`start_timeout` for the start
    /// check, `check_timeout` for the others) on the runtime's timer.
    async fn guarded<T>(
        &self,
        check: &'static str,
        check_future: impl Future<Output = Result<T, ConformanceFailure>>,
    ) -> Result<T, ConformanceFailure> {
        let (limit, field) = if check == CHECK_START {
            (self.config.start_timeout, "start_timeout")
        } else {
            (self.config.check_timeout, "check_timeout")
        };
        let started = self.runtime.now();
        let mut timer = self.timer(started, limit, field)?;
        let mut check_future = pin!(check_future);
        poll_fn(|cx| {
            if let Poll::Ready(outcome) = check_future.as_mut().poll(cx) {
                return Poll::Ready(outcome);
            }
            if AsyncTimer::poll(timer.as_mut(), cx).is_ready() {
                let after = self.runtime.now().saturating_duration_since(started);
                return Poll::Ready(Err(ConformanceFailure::Hung { check, after }));
            }
            Poll::Pending
        })
        .await
    }
}
