//! The conformance kit against a correct in-file engine (passes on tokio and smol) and
//! against one deliberately broken engine per rule (each reports its exact failure).
//!
//! The in-file engine works on the runtime's tasks only, so tokio tests run it on a
//! paused clock and the kit's 2 s and 30 s limits cost no real time; smol has real time
//! only, so smol runs just the flaws that fail fast. An engine that works on its own
//! threads (`threaded.rs`) runs on real clocks only.

mod cancelling;
mod config;
mod engine;
mod flaws;
mod messages;
mod stepping;
mod threaded;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::{Flaw, TestEngine};
use tether_core::conformance::{
    run_conformance_on, ConformanceFailure, ConformanceReport, CHECKS, CHECK_TIMEOUT,
    INTERLEAVED_REQUESTS, STOP_MAX_TOKENS,
};
use tether_core::LlmEngine;

const MODEL: &str = "conformance-test-model";
/// The in-file engine "hits EOS" after this many tokens unless `max_tokens` is lower.
const NATURAL_LEN: u32 = 5;

fn factory(flaw: Flaw) -> impl Fn() -> Arc<dyn LlmEngine> + Send + Sync {
    move || -> Arc<dyn LlmEngine> { Arc::new(TestEngine::new(flaw)) }
}

async fn on_tokio(flaw: Flaw) -> Result<ConformanceReport, ConformanceFailure> {
    tether_tokio::run_conformance(factory(flaw)).await
}

fn on_smol(flaw: Flaw) -> Result<ConformanceReport, ConformanceFailure> {
    smol::block_on(tether_smol::run_conformance(factory(flaw)))
}

fn passed() -> ConformanceReport {
    ConformanceReport {
        checks: CHECKS.to_vec(),
        model: MODEL.to_owned(),
    }
}

// ---- a correct engine passes -------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn correct_engine_passes_every_check_on_tokio() {
    assert_eq!(on_tokio(Flaw::None).await, Ok(passed()));
}

#[test]
fn correct_engine_passes_every_check_on_smol() {
    assert_eq!(on_smol(Flaw::None), Ok(passed()));
}

#[tokio::test(start_paused = true)]
async fn engine_that_honours_only_abort_passes() {
    assert_eq!(on_tokio(Flaw::HonoursAbortOnly).await, Ok(passed()));
}

#[tokio::test(start_paused = true)]
async fn engine_that_honours_only_context_stop_passes() {
    assert_eq!(on_tokio(Flaw::HonoursStopOnly).await, Ok(passed()));
}

/// One engine serves checks 1 to 5 (started once, cleaned up twice at the end, every
/// generate on it: the single one with no `max_tokens`, the interleaved ones, the
/// stopped one); a second, never started, is cleaned up once.
#[tokio::test(start_paused = true)]
async fn generate_checks_share_one_started_engine() {
    let made: Mutex<Vec<Arc<TestEngine>>> = Mutex::default();
    let make = || -> Arc<dyn LlmEngine> {
        let engine = Arc::new(TestEngine::new(Flaw::None));
        made.lock().unwrap().push(Arc::clone(&engine));
        engine
    };
    let runtime = tether_tokio::TokioRuntime::current();
    assert_eq!(run_conformance_on(&runtime, &make).await, Ok(passed()));
    let made = made.into_inner().unwrap();
    assert_eq!(made.len(), 2);
    let (served, fresh) = (&made[0], &made[1]);
    assert_eq!((served.starts(), served.cleanups()), (1, 2));
    assert_eq!((fresh.starts(), fresh.cleanups()), (0, 1));
    assert_eq!(
        served.seen(),
        seen_requests(INTERLEAVED_REQUESTS, STOP_MAX_TOKENS)
    );
    assert_eq!(fresh.seen(), []);
}

/// After a failed generate check the shared engine is still cleaned up, once, best
/// effort; after a hung one it is not (its cleanup would likely hang too). The fresh
/// engine of `cleanup_without_start` is never made.
#[tokio::test(start_paused = true)]
async fn a_failed_check_cleans_up_the_engine_and_a_hung_one_does_not() {
    let cases = [
        (
            Flaw::GenerateFails,
            ConformanceFailure::GenerateFailed(engine::flaw_error()),
            1,
        ),
        (
            Flaw::GenerateHangs,
            ConformanceFailure::Hung {
                check: "single_generate",
                after: CHECK_TIMEOUT,
            },
            0,
        ),
    ];
    for (flaw, expected, cleanups) in cases {
        let made: Mutex<Vec<Arc<TestEngine>>> = Mutex::default();
        let make = || -> Arc<dyn LlmEngine> {
            let engine = Arc::new(TestEngine::new(flaw));
            made.lock().unwrap().push(Arc::clone(&engine));
            engine
        };
        let runtime = tether_tokio::TokioRuntime::current();
        assert_eq!(run_conformance_on(&runtime, &make).await, Err(expected));
        let made = made.into_inner().unwrap();
        assert_eq!(made.len(), 1, "{flaw:?}");
        assert_eq!(
            (made[0].starts(), made[0].cleanups()),
            (1, cleanups),
            "{flaw:?}"
        );
    }
}

/// What a correct engine sees, in order: the single request without `max_tokens`,
/// `interleaved` requests of 16 tokens, the stopped request with `stop_max_tokens`.
fn seen_requests(interleaved: usize, stop_max_tokens: u32) -> Vec<(String, Option<u32>)> {
    let mut seen = vec![("conformance-single".to_owned(), None)];
    for n in 0..interleaved {
        seen.push((format!("conformance-interleaved-{n}"), Some(16)));
    }
    seen.push(("conformance-stop".to_owned(), Some(stop_max_tokens)));
    seen
}

#[tokio::test(start_paused = true)]
async fn passing_run_takes_no_clock_time() {
    let before = tokio::time::Instant::now();
    assert_eq!(on_tokio(Flaw::None).await, Ok(passed()));
    assert_eq!(before.elapsed(), Duration::ZERO);
}

#[test]
fn conformance_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let future = tether_smol::run_conformance(factory(Flaw::None));
    assert_send(&future);
}
