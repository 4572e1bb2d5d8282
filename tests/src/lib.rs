//! # tether-tests
//!
//! The harness of the cross-runtime integration suite. Every scenario in `tests/` is
//! one generic async function over a [`ScenarioRuntime`], run twice by
//! [`on_both_runtimes!`]: once on a paused-clock tokio runtime, once on smol.
//!
//! - [`ScriptEngine`]: an [`LlmEngine`](tether_core::LlmEngine) whose streams the test
//!   drives step by step ([`Script`]), which records every `abort` and every stream it
//!   hands out, so a test can prove "aborted exactly once, never after the end" and
//!   "nothing leaked";
//! - [`RecordingObserver`]: keeps every record and every abort decision;
//! - [`CountingRuntime`](tether_core::drive::CountingRuntime) (from `tether-core`): the
//!   runtime wrapper counting spawned tasks and created timers;
//! - [`Harness`]: all of the above wired to one adapter, with guarded waits (a wait
//!   that never completes fails the test instead of hanging it);
//! - [`SpanCapture`]: a tracing layer that keeps the `engine.generate` span fields.
//!
//! This crate owns test scaffolding only; it must not re-implement any lifecycle rule.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod engine;
mod harness;
mod logs;
mod observer;
mod runtime;
mod spans;

pub use engine::{Script, ScriptEngine, Step};
/// Yield to the executor once, on any runtime (futures-lite's: pending once, waking
/// itself).
pub use futures_lite::future::yield_now;
pub use harness::{data, error_kind, Harness, DEADLINE};
pub use logs::{unique_id, CapturedEvent, LogCapture};
pub use observer::RecordingObserver;
pub use runtime::{guarded, next_item, poll_once, run_smol, sleep, ScenarioRuntime, GUARD};
pub use spans::{CapturedSpan, SpanCapture, SpanIdHook};

/// Generates, for each named scenario `async fn name<R: ScenarioRuntime>(rt: R)`, a
/// module `name` with two tests: `name::tokio` (current-thread tokio with a paused
/// clock, [`TokioRuntime::current`](tether_tokio::TokioRuntime::current)) and
/// `name::smol` ([`smol::block_on`] with
/// [`SmolRuntime::global`](tether_smol::SmolRuntime::global)).
#[macro_export]
macro_rules! on_both_runtimes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[::tokio::test(start_paused = true)]
                async fn tokio() {
                    super::$name(::tether_tokio::TokioRuntime::current()).await;
                }

                #[test]
                fn smol() {
                    $crate::run_smol(super::$name);
                }
            }
        )*
    };
}

/// The README's Rust examples, compiled and run as doctests of this crate.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
