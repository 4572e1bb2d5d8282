//! `TokioRuntime` against tether's runtime contract
//! ([`tether_core::run_runtime_conformance`]) on every kind of tokio runtime, and the
//! clock read from a thread outside the runtime.

use std::time::Duration;

use tether_core::drive::{RuntimeCheckReport, RUNTIME_CHECKS};
use tether_core::Runtime;
use tether_tokio::TokioRuntime;

const PASSED: RuntimeCheckReport = RuntimeCheckReport {
    checks: RUNTIME_CHECKS,
};

#[tokio::test(start_paused = true)]
async fn paused_current_thread_runtime_passes() {
    let started = tokio::time::Instant::now();
    let report = tether_tokio::run_runtime_conformance().await;
    assert_eq!(report, Ok(PASSED));
    // Only the paused clock moved, by the kit's deadlines, not to any guard (5 s).
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn real_clock_current_thread_runtime_passes() {
    assert_eq!(tether_tokio::run_runtime_conformance().await, Ok(PASSED));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_runtime_passes() {
    // On a worker, as a `Send` task: the kit's future can be spawned, and its spawned
    // task may run on the other worker.
    let report = tokio::spawn(tether_tokio::run_runtime_conformance())
        .await
        .expect("kit task");
    assert_eq!(report, Ok(PASSED));
}

#[tokio::test(start_paused = true)]
async fn now_from_a_foreign_thread_reads_the_paused_clock() {
    let runtime = TokioRuntime::current();
    tokio::time::advance(Duration::from_secs(3600)).await;
    let expected = tokio::time::Instant::now().into_std();
    // The clock is paused and this thread blocks in `join`, so it cannot move in between.
    // Before the fix, `now()` outside the runtime's context read the wall clock: about
    // 1 hour earlier than `expected`.
    let seen = std::thread::spawn(move || runtime.now())
        .join()
        .expect("reader thread");
    assert_eq!(seen, expected);
}
