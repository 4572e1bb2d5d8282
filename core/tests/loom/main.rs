//! Loom models of every race in a request's life, on the REAL `Adapter`,
//! `ResponseStream` and `Context` (and, where the race is inside one decision, on the
//! pure `lifecycle::SharedState` with the invariant oracle).
//!
//! Run with (a project-specific cfg: a global `--cfg loom` breaks smol's dependencies):
//!
//! ```text
//! RUSTFLAGS="--cfg tether_loom -C debug-assertions" LOOM_MAX_PREEMPTIONS=2 \
//!     CARGO_TARGET_DIR=target-loom cargo test --release -p tether-core --test loom
//! ```
//!
//! Every model asserts, in every interleaving loom explores:
//! - `LlmEngine::abort` is called at most once, and never after the engine's terminal
//!   was forwarded (the record taken when the terminal reached the consumer says no
//!   abort was sent, and none is sent later);
//! - the consumer sees exactly one terminal, last;
//! - the observer gets exactly one record, matching what the consumer saw;
//! - no lost wake-up: a consumer (or a `Context::stopped` waiter) parked before the
//!   racing stop/kill/hint/timer is woken. The consumer parks in
//!   `loom::future::block_on`, so a missed wake-up is a deadlock, which loom reports.
//!
//! The test runtime is loom-friendly: `spawn` polls the future inline (the adapter's
//! abort task enters the engine's abort at once) and keeps it if it is still pending,
//! with a waker that flags it for [`runtime::LoomRuntime::run_woken`]; the clock is
//! frozen and only moves when a model advances it; timers fire only then.
#![cfg(tether_loom)]

mod abort_task_models;
mod adapter_models;
mod context_models;
mod deferral_models;
mod rig;
mod runtime;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// std types for test bookkeeping: their critical sections contain no loom operation,
/// so a loom thread switch can never happen while one is held.
type StdArc<T> = std::sync::Arc<T>;
type StdMutex<T> = std::sync::Mutex<T>;

const DEFERRAL: Duration = Duration::from_secs(30);

/// `loom::model`, with a preemption bound of 2 unless `LOOM_MAX_PREEMPTIONS` says
/// otherwise (unbounded exploration of the adapter models takes far too long).
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    let runs = StdArc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let started = Instant::now();
    builder.check(move || {
        counter.fetch_add(1, SeqCst);
        f();
    });
    eprintln!(
        "loom: {} interleavings explored in {:.2?}",
        runs.load(SeqCst),
        started.elapsed()
    );
}

/// Which endings a model reached, over all its interleavings: a model whose race never
/// goes both ways proves nothing, so each model checks that it saw every ending.
#[derive(Clone, Default)]
struct Seen(StdArc<StdMutex<std::collections::BTreeSet<String>>>);

impl Seen {
    fn saw(&self, what: impl Into<String>) {
        std_lock(&self.0).insert(what.into());
    }

    fn expect(&self, all: &[&str]) {
        let seen = std_lock(&self.0).clone();
        for what in all {
            assert!(
                seen.contains(*what),
                "no interleaving reached {what:?}: {seen:?}"
            );
        }
    }
}

fn std_lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
