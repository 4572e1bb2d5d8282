//! A deterministic, single-threaded harness that runs the REAL [`Adapter`] over a
//! scripted engine while a scripted canceller stops, kills, hints, drops and moves a
//! manual clock, and checks every step against a ghost model of SPEC.md section 4.
//!
//! Shared by `core/tests/props.rs` (proptest) and `fuzz/fuzz_targets/stream.rs`
//! (libFuzzer), which both build a [`Script`] from raw bytes with [`Script::from_bytes`]
//! and call [`run`]. Nothing here is threaded: the consumer is polled by hand with a
//! counting waker, the runtime polls spawned futures inline with a no-op waker (and
//! keeps the ones still pending for later turns), and timers fire only when the
//! script advances the clock. So every run is a pure function of its bytes.
//!
//! What is checked (a failure is an `Err` naming the op and the broken rule):
//! - the consumer sees exactly what the rules say, item by item (engine items forwarded
//!   verbatim, the right synthesized terminal, timeouts exactly when due), at most one
//!   terminal, nothing after it, and `None` only after it;
//! - `LlmEngine::abort` is called at most once, never after the engine's own end, never
//!   before the first token in decode mode (unless the deferral deadline passed), and
//!   exactly when the rules say (stop/kill/drop/timeout, hint or chunk releasing a
//!   deferred abort, the deferral deadline);
//! - a consumer waiting on `Pending` is woken by stop, kill, a released abort and a due
//!   timer (no lost wake-up);
//! - exactly one [`RequestRecord`] per request, with the outcome, token count and abort
//!   state matching what the consumer saw; a setup error gets its record and no abort;
//! - no task is spawned except the abort and the deferred-abort waiter, and no spawned
//!   task is left pending once the deadline has passed.
#![allow(dead_code)]

#[path = "script/engine.rs"]
mod engine;
#[path = "script/ghost.rs"]
mod ghost;
#[path = "script/runtime.rs"]
mod runtime;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tether_core::error::panic_message;
use tether_core::{ErrorKind, FinishReason, Mode};

pub(crate) use ghost::run;

/// Time-to-first-token limit when the script enables it.
pub(crate) const TTFT: Duration = Duration::from_millis(100);
/// Inter-token limit when the script enables it.
pub(crate) const ITL: Duration = Duration::from_millis(50);
/// Cancel grace when the script enables it.
pub(crate) const GRACE: Duration = Duration::from_millis(200);
/// The deferral deadline (always configured).
pub(crate) const DEFERRAL: Duration = Duration::from_millis(300);
const STEPS: [Duration; 5] = [
    Duration::from_millis(1),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(400),
];
const PANIC_TEXT: &str = "scripted engine panic";

/// What the scripted engine does on one turn of its stream.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum EngineStep {
    /// Yield a chunk with this many tokens (1 to 3).
    Tokens(u8),
    /// Yield a token-less, non-terminal chunk (a handshake).
    Tokenless,
    /// Yield a terminal chunk.
    Terminal(FinishReason),
    /// Yield a typed error.
    Error(ErrorKind),
    /// End the stream without a terminal.
    End,
    /// Return `Pending` (without waking anyone).
    Pending,
    /// Panic inside `poll_next`.
    Panic,
    /// Call `GenerateContext::notify_first_token` and go on to the next step.
    Hint,
}

/// What the canceller (and the consumer) does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// The consumer polls the stream once.
    Poll,
    /// `Context::stop`.
    Stop,
    /// `Context::kill`.
    Kill,
    /// The consumer drops the stream.
    Drop,
    /// `GenerateContext::notify_first_token` from outside the engine.
    Hint,
    /// Move the manual clock forward (and run the spawned tasks, as an executor would).
    Advance(Duration),
    /// Poll every spawned task that is still pending.
    RunSpawned,
    /// `ResponseStream::finish(FinishReason::Stop)`: the edge matched a stop string.
    Finish,
}

/// One scripted request.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Script {
    /// The adapter's mode.
    pub(crate) mode: Mode,
    /// Time-to-first-token limit.
    pub(crate) ttft: Option<Duration>,
    /// Inter-token limit.
    pub(crate) itl: Option<Duration>,
    /// Cancel grace after a stop.
    pub(crate) grace: Option<Duration>,
    /// `generate` fails with this kind instead of returning a stream.
    pub(crate) setup_error: Option<ErrorKind>,
    /// The engine's stream, turn by turn (pending forever once exhausted).
    pub(crate) engine: Vec<EngineStep>,
    /// The canceller's and consumer's ops, in order.
    pub(crate) ops: Vec<Op>,
}

impl Script {
    /// Decode a script from arbitrary bytes: every byte string is a valid script.
    /// Byte 0: mode and which limits are configured; byte 1: engine length (or a setup
    /// error); then one byte per engine step; the rest: one byte per op.
    pub(crate) fn from_bytes(data: &[u8]) -> Script {
        let head = data.first().copied().unwrap_or(0);
        let mode = match head % 3 {
            0 => Mode::Aggregated,
            1 => Mode::Prefill,
            _ => Mode::Decode,
        };
        let flags = head / 3;
        let second = data.get(1).copied().unwrap_or(0);
        let setup_error =
            (second >= 0xF8).then(|| ErrorKind::ALL[usize::from(second) % ErrorKind::ALL.len()]);
        let len = usize::from(second % 17);
        let rest = data.get(2..).unwrap_or(&[]);
        let (engine, ops) = rest.split_at(len.min(rest.len()));
        Script {
            mode,
            ttft: (flags & 1 != 0).then_some(TTFT),
            itl: (flags & 2 != 0).then_some(ITL),
            grace: (flags & 4 != 0).then_some(GRACE),
            setup_error,
            engine: engine.iter().map(|&b| engine_step(b)).collect(),
            ops: ops.iter().map(|&b| op(b)).collect(),
        }
    }
}

fn engine_step(b: u8) -> EngineStep {
    let hi = usize::from(b / 16);
    match b % 16 {
        0..=4 | 13..=15 => EngineStep::Tokens(1 + (b / 16) % 3),
        5 => EngineStep::Tokenless,
        6 => EngineStep::Terminal(match hi % 6 {
            0 => FinishReason::Eos,
            1 => FinishReason::Length,
            2 => FinishReason::Stop,
            3 => FinishReason::Cancelled,
            4 => FinishReason::ContentFilter,
            _ => FinishReason::Error("scripted".into()),
        }),
        7 => EngineStep::Error(ErrorKind::ALL[hi % ErrorKind::ALL.len()]),
        8 => EngineStep::End,
        9 | 10 => EngineStep::Pending,
        11 => EngineStep::Panic,
        _ => EngineStep::Hint,
    }
}

fn op(b: u8) -> Op {
    match b % 16 {
        0..=5 | 15 => Op::Poll,
        14 => Op::Finish,
        6 => Op::Stop,
        7 => Op::Kill,
        8 => Op::Drop,
        9 => Op::Hint,
        10..=12 => Op::Advance(STEPS[usize::from(b / 16) % STEPS.len()]),
        _ => Op::RunSpawned,
    }
}

/// Silence the panic message of the scripted engine panic (it is expected and caught
/// by the adapter); every other panic goes to the hook that was installed before.
pub(crate) fn quiet_scripted_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if panic_message(info.payload()) != PANIC_TEXT {
                previous(info);
            }
        }));
    });
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
