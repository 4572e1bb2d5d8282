//! `ConformanceConfig`: its defaults are the kit's fixed limits of before, each limit
//! bounds what it says it does, and an unusable config is a typed failure before any
//! engine is made.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_core::conformance::{
    run_conformance_with, ConfigError, ConformanceConfig, ConformanceFailure,
};
use tether_core::LlmEngine;
use tether_tokio::TokioRuntime;

use crate::engine::{Flaw, TestEngine};
use crate::{factory, passed, seen_requests};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

async fn on_tokio_with(
    flaw: Flaw,
    config: &ConformanceConfig,
) -> Result<tether_core::conformance::ConformanceReport, ConformanceFailure> {
    tether_tokio::run_conformance_with(factory(flaw), config).await
}

#[test]
fn default_config_is_the_kits_former_fixed_limits() {
    let config = ConformanceConfig::default();
    assert_eq!(config.start_timeout, secs(30));
    assert_eq!(config.check_timeout, secs(30));
    assert_eq!(config.cancel_within, secs(2));
    assert_eq!(config.stop_max_tokens, 10_000);
    assert_eq!(config.interleaved_requests, 8);
    assert_eq!(config.validate(), Ok(()));
}

#[test]
fn setters_set_their_field_only() {
    let config = ConformanceConfig::default()
        .start_timeout(secs(600))
        .check_timeout(secs(60))
        .cancel_within(secs(5))
        .stop_max_tokens(500)
        .interleaved_requests(3);
    assert_eq!(
        (
            config.start_timeout,
            config.check_timeout,
            config.cancel_within,
            config.stop_max_tokens,
            config.interleaved_requests
        ),
        (secs(600), secs(60), secs(5), 500, 3)
    );
    assert_eq!(config.validate(), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn unusable_config_is_invalid_config_before_any_engine_is_made() {
    let base = ConformanceConfig::default;
    let cases = [
        (
            base().start_timeout(Duration::ZERO),
            ConfigError::ZeroDuration {
                field: "start_timeout",
            },
        ),
        (
            base().check_timeout(Duration::ZERO),
            ConfigError::ZeroDuration {
                field: "check_timeout",
            },
        ),
        (
            base().cancel_within(Duration::ZERO),
            ConfigError::ZeroDuration {
                field: "cancel_within",
            },
        ),
        (base().stop_max_tokens(0), ConfigError::ZeroStopMaxTokens),
        (
            base().interleaved_requests(0),
            ConfigError::NoInterleavedRequests,
        ),
        (
            base().cancel_within(secs(30)),
            ConfigError::CancelNotWithinCheck {
                cancel_within: secs(30),
                check_timeout: secs(30),
            },
        ),
        (
            base().start_timeout(Duration::MAX),
            ConfigError::DurationTooLong {
                field: "start_timeout",
                limit: Duration::MAX,
            },
        ),
        (
            base().check_timeout(Duration::MAX),
            ConfigError::DurationTooLong {
                field: "check_timeout",
                limit: Duration::MAX,
            },
        ),
    ];
    let runtime = TokioRuntime::current();
    for (config, expected) in cases {
        let made = AtomicUsize::new(0);
        let make = || -> Arc<dyn LlmEngine> {
            made.fetch_add(1, Ordering::SeqCst);
            Arc::new(TestEngine::new(Flaw::None))
        };
        let outcome = run_conformance_with(&runtime, &make, &config).await;
        assert_eq!(outcome, Err(ConformanceFailure::InvalidConfig(expected)));
        assert_eq!(made.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn smol_shim_reports_invalid_config_too() {
    let config = ConformanceConfig::default().interleaved_requests(0);
    let outcome = smol::block_on(tether_smol::run_conformance_with(
        factory(Flaw::None),
        &config,
    ));
    let expected = ConformanceFailure::InvalidConfig(ConfigError::NoInterleavedRequests);
    assert_eq!(outcome, Err(expected));
}

/// A 45 s model load: hung under the default 30 s, fine with a longer start timeout.
#[tokio::test(start_paused = true)]
async fn slow_start_passes_only_with_a_longer_start_timeout() {
    let make = || -> Arc<dyn LlmEngine> {
        Arc::new(TestEngine::slow_start(
            Arc::new(TokioRuntime::current()),
            secs(45),
        ))
    };
    let runtime = TokioRuntime::current();

    let default = ConformanceConfig::default();
    let expected = ConformanceFailure::Hung {
        check: "start_reports_model",
        after: secs(30),
    };
    let outcome = run_conformance_with(&runtime, &make, &default).await;
    assert_eq!(outcome, Err(expected));

    let before = tokio::time::Instant::now();
    let patient = ConformanceConfig::default().start_timeout(secs(60));
    let outcome = run_conformance_with(&runtime, &make, &patient).await;
    assert_eq!(outcome, Ok(passed()));
    assert_eq!(before.elapsed(), secs(45));
}

#[tokio::test(start_paused = true)]
async fn hanging_start_is_hung_after_the_start_timeout_not_the_check_timeout() {
    let before = tokio::time::Instant::now();
    let config = ConformanceConfig::default().start_timeout(secs(600));
    let expected = ConformanceFailure::Hung {
        check: "start_reports_model",
        after: secs(600),
    };
    assert_eq!(
        on_tokio_with(Flaw::StartHangs, &config).await,
        Err(expected)
    );
    assert_eq!(before.elapsed(), secs(600));
}

#[tokio::test(start_paused = true)]
async fn check_timeout_bounds_a_hanging_generate() {
    let before = tokio::time::Instant::now();
    let config = ConformanceConfig::default().check_timeout(secs(5));
    let expected = ConformanceFailure::Hung {
        check: "single_generate",
        after: secs(5),
    };
    assert_eq!(
        on_tokio_with(Flaw::GenerateHangs, &config).await,
        Err(expected)
    );
    assert_eq!(before.elapsed(), secs(5));
}

#[tokio::test(start_paused = true)]
async fn check_timeout_bounds_a_hanging_abort() {
    let config = ConformanceConfig::default().check_timeout(secs(5));
    let expected = ConformanceFailure::Hung {
        check: "stop_yields_cancelled",
        after: secs(5),
    };
    assert_eq!(
        on_tokio_with(Flaw::AbortHangs, &config).await,
        Err(expected)
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_within_bounds_the_wait_for_the_cancelled_terminal() {
    let before = tokio::time::Instant::now();
    let config = ConformanceConfig::default().cancel_within(secs(5));
    let expected = ConformanceFailure::CancellationNotObserved { after: secs(5) };
    assert_eq!(
        on_tokio_with(Flaw::StallsOnStop, &config).await,
        Err(expected)
    );
    assert_eq!(before.elapsed(), secs(5));
}

#[tokio::test(start_paused = true)]
async fn interleaved_count_and_stop_max_tokens_reach_the_engine() {
    let made: Mutex<Vec<Arc<TestEngine>>> = Mutex::default();
    let make = || -> Arc<dyn LlmEngine> {
        let engine = Arc::new(TestEngine::new(Flaw::None));
        made.lock().unwrap().push(Arc::clone(&engine));
        engine
    };
    let config = ConformanceConfig::default()
        .interleaved_requests(3)
        .stop_max_tokens(500);
    let runtime = TokioRuntime::current();
    let outcome = run_conformance_with(&runtime, &make, &config).await;
    assert_eq!(outcome, Ok(passed()));
    let served = made.lock().unwrap()[0].seen();
    assert_eq!(served, seen_requests(3, 500));
}

#[test]
fn smol_shim_takes_a_config() {
    let config = ConformanceConfig::default().interleaved_requests(2);
    let outcome = smol::block_on(tether_smol::run_conformance_with(
        factory(Flaw::None),
        &config,
    ));
    assert_eq!(outcome, Ok(passed()));
}
