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

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use tether_core::AbortStatus;

use futures_core::Stream;
use tether_core::drive::SpawnFuture;
use tether_core::engine::BoxFuture;
use tether_core::error::panic_message;
use tether_core::{
    Adapter, AdapterConfig, Annotated, AsyncTimer, BackendError, Chunk, ChunkStream, Context,
    EngineConfig, EngineError, ErrorKind, FinishReason, GenerateContext, LlmEngine, Mode, Observer,
    Outcome, Request, RequestRecord, ResponseStream, Runtime,
};

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

// ---------------------------------------------------------------------------------
// The manual runtime: a frozen clock moved by hand, timers that fire only then, and
// spawned futures polled inline.

struct RtState {
    base: Instant,
    offset: Mutex<Duration>,
    pending: Mutex<Vec<SpawnFuture>>,
    spawns: AtomicUsize,
    /// `(timer id, deadline, waker)` of every timer waiting for the clock.
    timer_wakers: Mutex<Vec<(usize, Instant, Waker)>>,
    timers: AtomicUsize,
}

/// A [`Runtime`] driven entirely by the harness.
#[derive(Clone)]
pub(crate) struct ManualRuntime(Arc<RtState>);

impl fmt::Debug for ManualRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualRuntime")
            .field("now", &*lock(&self.0.offset))
            .finish_non_exhaustive()
    }
}

impl Default for ManualRuntime {
    fn default() -> Self {
        ManualRuntime::new()
    }
}

impl ManualRuntime {
    /// A runtime whose clock stands still until [`ManualRuntime::advance`].
    pub(crate) fn new() -> ManualRuntime {
        ManualRuntime(Arc::new(RtState {
            base: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
            pending: Mutex::new(Vec::new()),
            spawns: AtomicUsize::new(0),
            timer_wakers: Mutex::new(Vec::new()),
            timers: AtomicUsize::new(0),
        }))
    }

    /// Move the clock forward and wake the timers that are now due.
    pub(crate) fn advance(&self, by: Duration) {
        let now = {
            let mut offset = lock(&self.0.offset);
            *offset += by;
            self.0.base + *offset
        };
        let due: Vec<Waker> = {
            let mut wakers = lock(&self.0.timer_wakers);
            let (due, left) = std::mem::take(&mut *wakers)
                .into_iter()
                .partition(|(_, at, _)| *at <= now);
            *wakers = left;
            due.into_iter().map(|(_, _, w)| w).collect()
        };
        due.into_iter().for_each(Waker::wake);
    }

    /// Poll every spawned future still pending once, with a no-op waker.
    pub(crate) fn run_spawned(&self) {
        let tasks = std::mem::take(&mut *lock(&self.0.pending));
        let mut cx = TaskContext::from_waker(Waker::noop());
        let mut left: Vec<SpawnFuture> = tasks
            .into_iter()
            .filter_map(|mut t| t.as_mut().poll(&mut cx).is_pending().then_some(t))
            .collect();
        // Futures spawned while we polled went straight into `pending`.
        lock(&self.0.pending).append(&mut left);
    }

    /// How many futures were spawned so far.
    pub(crate) fn spawns(&self) -> usize {
        self.0.spawns.load(Ordering::SeqCst)
    }

    /// How many spawned futures are still pending.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.0.pending).len()
    }
}

impl Runtime for ManualRuntime {
    fn spawn(&self, mut future: SpawnFuture) {
        self.0.spawns.fetch_add(1, Ordering::SeqCst);
        // Run it inline (no lock held: it may spawn or make a timer itself).
        let mut cx = TaskContext::from_waker(Waker::noop());
        if future.as_mut().poll(&mut cx).is_pending() {
            lock(&self.0.pending).push(future);
        }
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(ManualTimer {
            rt: self.clone(),
            id: self.0.timers.fetch_add(1, Ordering::SeqCst),
            deadline,
        })
    }

    fn now(&self) -> Instant {
        self.0.base + *lock(&self.0.offset)
    }
}

#[derive(Debug)]
struct ManualTimer {
    rt: ManualRuntime,
    id: usize,
    deadline: Instant,
}

impl AsyncTimer for ManualTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().deadline = deadline;
    }

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.rt.now() >= self.deadline {
            return Poll::Ready(());
        }
        let mut wakers = lock(&self.rt.0.timer_wakers);
        wakers.retain(|(id, _, _)| *id != self.id);
        wakers.push((self.id, self.deadline, cx.waker().clone()));
        Poll::Pending
    }
}

// ---------------------------------------------------------------------------------
// The scripted engine and the observer, both reporting into one tracker.

/// What the engine did during one consumer poll, in order.
#[derive(Clone, Debug, PartialEq)]
enum Did {
    Hint,
    Yield(EngineStep),
    Pending,
}

#[derive(Default)]
struct Tracker {
    mode: Mode,
    aborts: u32,
    on_aborts: u32,
    records: Vec<(RequestRecord, u32)>,
    /// The engine yielded its terminal, an error or its end, or panicked.
    engine_ended: bool,
    /// The engine yielded a non-empty chunk, or someone sent the hint.
    first_evidence: bool,
    /// The deferral deadline has passed since the abort was deferred.
    deadline_passed: bool,
    log: Vec<Did>,
    gctx: Option<GenerateContext>,
    violations: Vec<String>,
}

struct ScriptEngine {
    track: Arc<Mutex<Tracker>>,
    steps: Mutex<Option<Vec<EngineStep>>>,
    setup_error: Option<ErrorKind>,
}

impl LlmEngine for ScriptEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(
            async move { Ok(EngineConfig::new("script", worker_id).with_max_concurrency(None)) },
        )
    }

    fn generate(
        &self,
        _request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        let result = match self.setup_error {
            Some(kind) => Err(EngineError::new(kind, "scripted setup error")),
            None => {
                lock(&self.track).gctx = Some(context.clone());
                let steps = lock(&self.steps).take().unwrap_or_default();
                let stream: ChunkStream = Box::pin(ScriptStream {
                    steps: steps.into(),
                    gctx: context,
                    track: self.track.clone(),
                    next_token: 0,
                });
                Ok(stream)
            }
        };
        Box::pin(async move { result })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        drop(context);
        let mut t = lock(&self.track);
        t.aborts += 1;
        if t.aborts > 1 {
            t.violations.push("rule 1: abort called twice".into());
        }
        if t.engine_ended {
            t.violations
                .push("rule 1: abort called after the engine's own end".into());
        }
        if t.mode == Mode::Decode && !t.first_evidence && !t.deadline_passed {
            t.violations
                .push("rule 2: decode abort before the first token and the deadline".into());
        }
        Box::pin(async {})
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

struct ScriptStream {
    steps: VecDeque<EngineStep>,
    gctx: GenerateContext,
    track: Arc<Mutex<Tracker>>,
    next_token: u32,
}

impl Stream for ScriptStream {
    type Item = Result<Chunk, EngineError>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let step = {
                let mut t = lock(&this.track);
                if t.engine_ended {
                    t.violations
                        .push("the engine stream was polled after its end".into());
                    return Poll::Ready(None);
                }
                let Some(step) = this.steps.pop_front() else {
                    t.log.push(Did::Pending);
                    return Poll::Pending;
                };
                match &step {
                    EngineStep::Hint => {
                        t.first_evidence = true;
                        t.log.push(Did::Hint);
                    }
                    EngineStep::Pending => t.log.push(Did::Pending),
                    other => {
                        t.log.push(Did::Yield(other.clone()));
                        match other {
                            EngineStep::Tokens(_) => t.first_evidence = true,
                            EngineStep::Tokenless => {}
                            _ => t.engine_ended = true,
                        }
                    }
                }
                step
            };
            return match step {
                EngineStep::Hint => {
                    // Outside the tracker lock: the hint may abort, which reports here.
                    this.gctx.notify_first_token();
                    continue;
                }
                EngineStep::Pending => Poll::Pending,
                EngineStep::Tokens(n) => {
                    let ids = (0..u32::from(n)).map(|i| this.next_token + i).collect();
                    this.next_token += u32::from(n);
                    Poll::Ready(Some(Ok(Chunk::tokens(ids))))
                }
                EngineStep::Tokenless => Poll::Ready(Some(Ok(Chunk::default()))),
                EngineStep::Terminal(reason) => Poll::Ready(Some(Ok(Chunk::terminal(reason)))),
                EngineStep::Error(kind) => {
                    Poll::Ready(Some(Err(EngineError::new(kind, "scripted error"))))
                }
                EngineStep::End => Poll::Ready(None),
                EngineStep::Panic => panic!("{}", PANIC_TEXT),
            };
        }
    }
}

struct ScriptObserver {
    track: Arc<Mutex<Tracker>>,
}

impl Observer for ScriptObserver {
    fn on_record(&self, record: &RequestRecord) {
        let mut t = lock(&self.track);
        let aborts = t.aborts;
        t.records.push((record.clone(), aborts));
        if t.records.len() > 1 {
            t.violations.push("rule 9: a second record".into());
        }
    }

    fn on_abort(&self, _request_id: &str) {
        lock(&self.track).on_aborts += 1;
    }
}

#[derive(Default)]
struct CountWake(AtomicUsize);

impl Wake for CountWake {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------
// The ghost: what the rules say must happen, op by op.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cancel {
    None,
    Stop,
    Kill,
}

/// A terminal the consumer is owed, with the outcome it records.
#[derive(Clone, Debug, PartialEq)]
struct Owed {
    item: Annotated<Chunk>,
    outcome: Outcome,
}

#[derive(Debug)]
struct Ghost {
    mode: Mode,
    /// No record yet (the request is not over for the consumer).
    live: bool,
    cancel: Cancel,
    /// A synthesized terminal is owed (kill, expired grace, timeout).
    pending_terminal: Option<Owed>,
    /// A first token exists (a non-empty chunk or the hint).
    first_token: bool,
    /// An abort was issued (by anyone).
    aborted: bool,
    /// An abort is due but held back (decode mode before the first token).
    deferred: bool,
    /// The deferred abort was discarded: the engine ended by itself first.
    discarded: bool,
    /// The engine's own end was seen (terminal, error, end, panic).
    engine_ended: bool,
    /// The watchdog task exists and has not ended.
    watchdog: bool,
    /// When the cancel grace expires (armed by the stop, off the consumer's path).
    grace_due: Option<Instant>,
    /// When the deferred abort is released (armed by the event that deferred it).
    deferral_due: Option<Instant>,
    /// The engine was handed to the watchdog (the consumer is over, an abort is owed).
    handed_over: bool,
    /// When the consumer started waiting on a silent engine since the last token.
    silence_since: Option<Instant>,
    /// A token reached the consumer (the inter-token limit applies).
    seen_token: bool,
    /// The silence limit fired (once).
    silence_fired: bool,
    /// What the consumer saw.
    terminal_seen: bool,
    tokens: u32,
    /// Expected outcome once recorded.
    outcome: Option<Outcome>,
    /// The consumer's last poll was `Pending` and it waits for a wake-up.
    waiting: bool,
    /// When the consumer's own timer (the silence limit) wakes it, if it waits on one.
    timer_wait: Option<Instant>,
    /// Tasks the rules allow the adapter to spawn.
    spawns_allowed: usize,
    /// The terminal an early finish put in front of the consumer (rule 12).
    stashed: Option<Annotated<Chunk>>,
}

/// What a run did, for statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    /// How many items the consumer received.
    pub(crate) items: usize,
    /// Whether the engine was aborted.
    pub(crate) aborted: bool,
    /// The recorded outcome's label.
    pub(crate) outcome: &'static str,
}

struct Harness {
    cfg_ttft: Option<Duration>,
    cfg_itl: Option<Duration>,
    cfg_grace: Option<Duration>,
    rt: ManualRuntime,
    track: Arc<Mutex<Tracker>>,
    ctx: Context,
    stream: Option<Pin<Box<ResponseStream>>>,
    wake: Arc<CountWake>,
    waker: Waker,
    g: Ghost,
    items: usize,
    wakes_at_pending: usize,
}

type Check = Result<(), String>;

fn fail<T>(what: impl Into<String>) -> Result<T, String> {
    Err(what.into())
}

/// Run `script` and check it; `Err` names the first broken rule.
pub(crate) fn run(script: &Script) -> Result<Summary, String> {
    let rt = ManualRuntime::new();
    let track = Arc::new(Mutex::new(Tracker {
        mode: script.mode,
        ..Tracker::default()
    }));
    let engine = ScriptEngine {
        track: track.clone(),
        steps: Mutex::new(Some(script.engine.clone())),
        setup_error: script.setup_error,
    };
    let observer = ScriptObserver {
        track: track.clone(),
    };
    let config = AdapterConfig::default()
        .mode(script.mode)
        .deferral_deadline(DEFERRAL)
        .cancel_grace(script.grace)
        .first_token_timeout(script.ttft)
        .inter_token_timeout(script.itl)
        .observer(Arc::new(observer))
        .spans(false);
    let adapter = Adapter::new(Arc::new(engine), rt.clone(), config);
    let ctx = Context::new("script");
    let request = Request::new("script", "script", vec![1, 2, 3]);
    let mut generate = std::pin::pin!(adapter.generate(request, ctx.clone()));
    let Poll::Ready(result) = generate
        .as_mut()
        .poll(&mut TaskContext::from_waker(Waker::noop()))
    else {
        return fail("generate did not complete at once");
    };
    let stream = match result {
        Ok(stream) => stream,
        Err(err) => return setup_failed(script, &rt, &track, &err),
    };
    if script.setup_error.is_some() {
        return fail("rule 7: generate succeeded despite the setup error");
    }
    let wake = Arc::new(CountWake::default());
    let waker = Waker::from(wake.clone());
    let mut h = Harness {
        cfg_ttft: script.ttft,
        cfg_itl: script.itl,
        cfg_grace: script.grace,
        rt,
        track,
        ctx,
        stream: Some(Box::pin(stream)),
        wake,
        waker,
        g: Ghost {
            mode: script.mode,
            live: true,
            cancel: Cancel::None,
            pending_terminal: None,
            first_token: false,
            aborted: false,
            deferred: false,
            discarded: false,
            engine_ended: false,
            watchdog: false,
            grace_due: None,
            deferral_due: None,
            handed_over: false,
            silence_since: None,
            seen_token: false,
            silence_fired: false,
            terminal_seen: false,
            tokens: 0,
            outcome: None,
            waiting: false,
            timer_wait: None,
            spawns_allowed: 0,
            stashed: None,
        },
        items: 0,
        wakes_at_pending: 0,
    };
    for (i, &op) in script.ops.iter().enumerate() {
        h.op(op)
            .and_then(|()| h.consistent())
            .map_err(|e| format!("op {i} ({op:?}): {e}\nghost: {:?}", h.g))?;
    }
    h.finish()
        .and_then(|()| h.consistent())
        .map_err(|e| format!("at the end: {e}\nghost: {:?}", h.g))?;
    let t = lock(&h.track);
    Ok(Summary {
        items: h.items,
        aborted: t.aborts > 0,
        outcome: t.records.first().map_or("none", |(r, _)| r.outcome.label()),
    })
}

fn setup_failed(
    script: &Script,
    rt: &ManualRuntime,
    track: &Mutex<Tracker>,
    err: &EngineError,
) -> Result<Summary, String> {
    let Some(kind) = script.setup_error else {
        return fail(format!("rule 7: unexpected setup error {err}"));
    };
    if err.kind() != kind {
        return fail(format!("rule 7: setup error of kind {:?}", err.kind()));
    }
    let t = lock(track);
    if t.aborts != 0 || rt.spawns() != 0 {
        return fail("rule 7: a setup error aborted or spawned");
    }
    match t.records.as_slice() {
        [(rec, _)]
            if rec.outcome == Outcome::Failed(kind) && rec.abort == AbortStatus::NotNeeded => {}
        other => return fail(format!("rule 9: setup error records {other:?}")),
    }
    Ok(Summary {
        items: 0,
        aborted: false,
        outcome: "failed",
    })
}

fn cancelled() -> Owed {
    Owed {
        item: Annotated::from_data(Chunk::terminal(FinishReason::Cancelled)),
        outcome: Outcome::Cancelled,
    }
}

impl Harness {
    fn aborts(&self) -> u32 {
        lock(&self.track).aborts
    }

    fn wakes(&self) -> usize {
        self.wake.0.load(Ordering::SeqCst)
    }

    fn now(&self) -> Instant {
        self.rt.now()
    }

    /// The watchdog is needed: spawned the first time (it then runs inline once).
    fn need_watchdog(&mut self) {
        if !self.g.watchdog {
            self.g.watchdog = true;
            self.g.spawns_allowed += 1;
        }
    }

    /// The abort the rules call for when a cancellation lands on a request that has
    /// none yet: now, or deferred (arming the deferral deadline off the consumer's
    /// path) in decode mode before the first token.
    fn request_abort(&mut self) -> bool {
        if self.g.aborted || self.g.deferred || self.g.discarded || self.g.engine_ended {
            return false;
        }
        if self.g.mode == Mode::Decode && !self.g.first_token {
            self.g.deferred = true;
            self.g.deferral_due = Some(self.now() + DEFERRAL);
            self.need_watchdog();
            false
        } else {
            self.abort_now()
        }
    }

    fn abort_now(&mut self) -> bool {
        self.g.deferred = false;
        self.g.aborted = true;
        self.g.spawns_allowed += 1;
        true
    }

    /// A first-token hint or a non-empty chunk: releases a deferred abort.
    fn saw_first_token(&mut self) -> bool {
        self.g.first_token = true;
        if self.g.deferred {
            self.abort_now()
        } else {
            false
        }
    }

    /// The engine's own end: a deferred abort is discarded for good.
    fn engine_end(&mut self) {
        self.g.engine_ended = true;
        if self.g.deferred {
            self.g.deferred = false;
            self.g.discarded = true;
        }
    }

    /// A kill-like cancellation owes the consumer `owed` and asks for the abort.
    fn force(&mut self, owed: Owed) -> bool {
        self.g.cancel = Cancel::Kill;
        self.g.pending_terminal = Some(owed);
        self.request_abort()
    }

    fn op(&mut self, op: Op) -> Check {
        let aborts_before = self.aborts();
        let wakes_before = self.wakes();
        if wakes_before != self.wakes_at_pending {
            // Woken since its last `Pending` (perhaps spuriously): an executor would
            // poll it again, so it no longer counts as waiting.
            self.g.waiting = false;
        }
        let mut expect_abort = false;
        let mut expect_wake = false;
        match op {
            Op::Poll => {
                if self.stream.is_none() {
                    return Ok(());
                }
                lock(&self.track).log.clear();
                let mut cx = TaskContext::from_waker(&self.waker);
                let Some(stream) = self.stream.as_mut() else {
                    return Ok(());
                };
                let polled = stream.as_mut().poll_next(&mut cx);
                expect_abort = self.check_poll(&polled)?;
            }
            Op::Stop | Op::Kill => {
                let was = self.g.cancel;
                if op == Op::Stop {
                    self.ctx.stop();
                } else {
                    self.ctx.kill();
                }
                let raises = match op {
                    Op::Stop => was == Cancel::None,
                    _ => was != Cancel::Kill,
                };
                if self.g.live && raises && !self.g.engine_ended {
                    if op == Op::Kill {
                        expect_abort = self.force(cancelled());
                        expect_wake = self.g.waiting;
                        self.g.grace_due = None;
                    } else {
                        self.g.cancel = Cancel::Stop;
                        expect_abort = self.request_abort();
                        if let Some(grace) = self.cfg_grace {
                            self.g.grace_due = Some(self.now() + grace);
                            self.need_watchdog();
                        }
                    }
                } else if raises && !self.g.live {
                    // The context moves on; the request is over and ignores it.
                }
                if raises {
                    self.g.cancel = self.g.cancel.max_with(op);
                }
            }
            Op::Drop => {
                if self.stream.take().is_none() {
                    return Ok(());
                }
                if self.g.live {
                    self.g.live = false;
                    self.g.pending_terminal = None;
                    self.g.outcome = Some(Outcome::Dropped);
                    expect_abort = self.request_abort();
                    if self.g.deferred && !self.g.engine_ended {
                        self.g.handed_over = true;
                    }
                    let t = lock(&self.track);
                    if t.records.len() != 1 {
                        return fail("rule 4: a drop before the terminal was not recorded");
                    }
                }
                self.g.waiting = false;
            }
            Op::Hint => {
                let gctx = lock(&self.track).gctx.clone();
                lock(&self.track).first_evidence = true;
                if let Some(gctx) = gctx {
                    gctx.notify_first_token();
                }
                if !self.g.first_token {
                    expect_abort = self.saw_first_token();
                }
            }
            Op::Advance(by) => {
                self.rt.advance(by);
                let now = self.now();
                expect_wake = self.g.waiting && self.g.timer_wait.is_some_and(|at| at <= now);
                self.update_deadline_passed();
                let (aborted, woken) = self.run_watchdog()?;
                expect_abort = aborted;
                expect_wake |= woken;
            }
            Op::RunSpawned => {
                let (aborted, woken) = self.run_watchdog()?;
                expect_abort = aborted;
                expect_wake = woken;
            }
            Op::Finish => {
                let Some(stream) = self.stream.as_mut() else {
                    return Ok(());
                };
                let took = stream.as_mut().get_mut().finish(FinishReason::Stop);
                let expected = self.g.live && self.g.pending_terminal.is_none();
                if took != expected {
                    return fail(format!("rule 12: finish said {took}, expected {expected}"));
                }
                if took {
                    self.g.live = false;
                    self.g.outcome = Some(Outcome::Finished(FinishReason::Stop));
                    self.g.stashed =
                        Some(Annotated::from_data(Chunk::terminal(FinishReason::Stop)));
                    expect_abort = self.request_abort();
                    if self.g.deferred && !self.g.engine_ended {
                        self.g.handed_over = true;
                    }
                    if lock(&self.track).records.len() != 1 {
                        return fail("rule 12: an early finish was not recorded at once");
                    }
                }
            }
        }
        let aborts_after = self.aborts();
        let got = aborts_after - aborts_before;
        if got != u32::from(expect_abort) {
            return fail(format!(
                "rule 1/2/4: expected {} abort(s) in this step, got {got}",
                u32::from(expect_abort)
            ));
        }
        if expect_wake && self.wakes() == wakes_before {
            return fail("lost wake-up: the waiting consumer was not woken");
        }
        if expect_wake {
            self.g.waiting = false;
        }
        Ok(())
    }

    fn update_deadline_passed(&mut self) {
        let now = self.now();
        if self.g.deferral_due.is_some_and(|at| at <= now) {
            lock(&self.track).deadline_passed = true;
        }
    }

    /// The spawned tasks run (the watchdog is the only one that can still be pending):
    /// it drains a handed-over engine, then fires the deadlines that passed. Returns
    /// whether it must have aborted and whether it must have woken the consumer.
    fn run_watchdog(&mut self) -> Result<(bool, bool), String> {
        lock(&self.track).log.clear();
        self.rt.run_spawned();
        let log = std::mem::take(&mut lock(&self.track).log);
        let mut aborted = false;
        let mut woken = false;
        if !self.g.watchdog {
            if !log.is_empty() {
                return fail(format!(
                    "the engine was polled with nobody reading: {log:?}"
                ));
            }
            return Ok((false, false));
        }
        // 1. Draining: only while the consumer is over and the abort is still deferred.
        let mut polls = log.into_iter();
        if self.g.handed_over {
            // One drain poll is any number of hints, then `Pending` or an item.
            let mut poll_starts = true;
            for did in polls.by_ref() {
                if poll_starts && (!self.g.deferred || self.g.engine_ended) {
                    return fail(format!("the engine was drained after the abort: {did:?}"));
                }
                poll_starts = false;
                match did {
                    Did::Hint => {
                        if !self.g.first_token {
                            aborted |= self.saw_first_token();
                        }
                        continue;
                    }
                    Did::Pending => break,
                    Did::Yield(EngineStep::Tokens(_)) => {
                        if !self.g.first_token {
                            aborted |= self.saw_first_token();
                        }
                    }
                    Did::Yield(EngineStep::Tokenless) => {}
                    Did::Yield(_) => self.engine_end(),
                }
                poll_starts = true;
                if !self.g.deferred {
                    break;
                }
            }
        }
        // 2. Deadlines, deferral first.
        let now = self.now();
        if self.g.deferred && self.g.deferral_due.is_some_and(|at| at <= now) {
            // (The engine's rule-2 check was told the deadline passed when the clock
            // moved: `update_deadline_passed`.)
            aborted |= self.abort_now();
        }
        let grace_pending =
            self.g.live && self.g.cancel == Cancel::Stop && self.g.pending_terminal.is_none();
        if grace_pending && self.g.grace_due.is_some_and(|at| at <= now) {
            aborted |= self.force(cancelled());
            woken = self.g.waiting;
        }
        // 3. It ends once nothing it owns matters.
        let grace_left = self.g.live
            && self.g.cancel == Cancel::Stop
            && self.g.pending_terminal.is_none()
            && self.g.grace_due.is_some();
        if !self.g.deferred && !grace_left {
            self.g.watchdog = false;
            self.g.handed_over = false;
        }
        Ok((aborted, woken))
    }

    /// Judge one consumer poll against the ghost. Returns whether it must have aborted.
    fn check_poll(&mut self, polled: &Poll<Option<Annotated<Chunk>>>) -> Result<bool, String> {
        let now = self.now();
        if let Some(item) = self.g.stashed.take() {
            // Rule 12: the early finish's terminal, then the end.
            if *polled != Poll::Ready(Some(item)) {
                return fail(format!(
                    "rule 12: {polled:?} instead of the finish terminal"
                ));
            }
            self.g.terminal_seen = true;
            return Ok(false);
        }
        if !self.g.live {
            if *polled != Poll::Ready(None) {
                return fail(format!("rule 6: {polled:?} after the end"));
            }
            if !self.g.terminal_seen {
                return fail("rule 6: the stream ended without a terminal");
            }
            return Ok(false);
        }
        // 1. An owed terminal comes first.
        if let Some(owed) = self.g.pending_terminal.take() {
            return self
                .expect_terminal(polled, &owed.item, owed.outcome)
                .map(|()| false);
        }
        // 2. The engine, as its log says.
        let mut aborted = false;
        let log = std::mem::take(&mut lock(&self.track).log);
        let Some((last, hints)) = log.split_last() else {
            return fail("the engine was not polled");
        };
        for did in hints {
            if *did != Did::Hint {
                return fail(format!("the engine was polled on after {did:?}"));
            }
            if !self.g.first_token {
                aborted |= self.saw_first_token();
            }
        }
        match last {
            Did::Hint => fail("the engine's poll ended on a hint"),
            Did::Pending => {
                // 3. The engine is silent while the consumer waits: the limits run.
                if self.g.first_token {
                    self.g.seen_token_or_hint();
                }
                let limit = if self.g.seen_token {
                    self.cfg_itl
                } else {
                    self.cfg_ttft
                };
                let due = match limit {
                    Some(limit) if !self.g.silence_fired => {
                        let since = *self.g.silence_since.get_or_insert(now);
                        Some(since + limit)
                    }
                    _ => None,
                };
                if due.is_some_and(|at| at <= now) {
                    self.g.silence_fired = true;
                    let item = if self.g.seen_token {
                        EngineError::inter_token_timeout(self.cfg_itl.unwrap_or_default())
                    } else {
                        EngineError::first_token_timeout(self.cfg_ttft.unwrap_or_default())
                    };
                    aborted |= self.force(Owed {
                        item: Annotated::from_error(item),
                        outcome: Outcome::TimedOut,
                    });
                    let owed = self.g.pending_terminal.take().expect("just forced");
                    self.expect_terminal(polled, &owed.item, owed.outcome)?;
                    return Ok(aborted);
                }
                if polled.is_ready() {
                    return fail(format!(
                        "the engine was pending but the consumer got {polled:?}"
                    ));
                }
                self.g.waiting = true;
                self.wakes_at_pending = self.wakes();
                self.g.timer_wait = due;
                Ok(aborted)
            }
            Did::Yield(step) => Ok(aborted | self.engine_item(step, polled)?),
        }
    }

    fn engine_item(
        &mut self,
        step: &EngineStep,
        polled: &Poll<Option<Annotated<Chunk>>>,
    ) -> Result<bool, String> {
        match step {
            EngineStep::Tokens(n) => {
                let aborted = if self.g.first_token {
                    false
                } else {
                    self.saw_first_token()
                };
                let ids: Vec<u32> = (0..u32::from(*n)).map(|i| self.g.tokens + i).collect();
                let want = Annotated::from_data(Chunk::tokens(ids));
                if !matches!(polled, Poll::Ready(Some(got)) if *got == want) {
                    return fail(format!("rule 6: expected {want:?}, got {polled:?}"));
                }
                self.items += 1;
                self.g.tokens += u32::from(*n);
                self.g.seen_token = true;
                self.g.silence_since = None;
                self.g.waiting = false;
                Ok(aborted)
            }
            EngineStep::Tokenless => {
                let want = Annotated::from_data(Chunk::default());
                if !matches!(polled, Poll::Ready(Some(got)) if *got == want) {
                    return fail(format!("rule 3: expected {want:?}, got {polled:?}"));
                }
                self.items += 1;
                self.g.waiting = false;
                Ok(false)
            }
            EngineStep::Terminal(reason) => {
                self.engine_end();
                let outcome = if *reason == FinishReason::Cancelled {
                    Outcome::Cancelled
                } else {
                    Outcome::Finished(reason.clone())
                };
                let want = Annotated::from_data(Chunk::terminal(reason.clone()));
                self.expect_terminal(polled, &want, outcome).map(|()| false)
            }
            EngineStep::Error(kind) => {
                self.engine_end();
                let want = Annotated::from_error(EngineError::new(*kind, "scripted error"));
                self.expect_terminal(polled, &want, Outcome::Failed(*kind))
                    .map(|()| false)
            }
            EngineStep::End => {
                self.engine_end();
                let (want, outcome) = if self.g.cancel == Cancel::None {
                    (
                        Annotated::from_error(EngineError::stream_incomplete()),
                        Outcome::Failed(ErrorKind::Backend(BackendError::StreamIncomplete)),
                    )
                } else {
                    (
                        Annotated::from_data(Chunk::terminal(FinishReason::Cancelled)),
                        Outcome::Cancelled,
                    )
                };
                self.expect_terminal(polled, &want, outcome).map(|()| false)
            }
            EngineStep::Panic => {
                self.engine_end();
                let kind = ErrorKind::Backend(BackendError::Unknown);
                let ok = matches!(
                    polled,
                    Poll::Ready(Some(item)) if item.is_error()
                        && item.error.as_ref().is_some_and(|e| e.kind() == kind
                            && e.message().starts_with("engine panicked"))
                );
                if !ok {
                    return fail(format!("rule 6: a panic became {polled:?}"));
                }
                let Poll::Ready(Some(item)) = polled else {
                    return fail("unreachable");
                };
                self.expect_terminal(polled, item, Outcome::Failed(kind))
                    .map(|()| false)
            }
            other => fail(format!("unexpected engine step {other:?}")),
        }
    }

    /// The poll must yield `want`, a terminal, and end the request with `outcome`.
    fn expect_terminal(
        &mut self,
        polled: &Poll<Option<Annotated<Chunk>>>,
        want: &Annotated<Chunk>,
        outcome: Outcome,
    ) -> Check {
        if !matches!(polled, Poll::Ready(Some(got)) if got == want) {
            return fail(format!("rule 5/6/8: expected {want:?}, got {polled:?}"));
        }
        if !want.is_terminal() {
            return fail("the expected item is not a terminal");
        }
        self.items += 1;
        self.g.terminal_seen = true;
        self.g.live = false;
        self.g.waiting = false;
        self.g.pending_terminal = None;
        self.g.outcome = Some(outcome);
        if self.g.deferred && !self.g.engine_ended {
            // The consumer has its terminal; the abort still waits for the first token,
            // so the engine goes to the watchdog, which drains it (rule 2).
            self.g.handed_over = true;
        }
        Ok(())
    }

    /// The tracker agrees with the ghost after every op.
    fn consistent(&self) -> Check {
        let t = lock(&self.track);
        if let Some(v) = t.violations.first() {
            return fail(v.clone());
        }
        if t.aborts != t.on_aborts {
            return fail("the observer did not hear of every abort");
        }
        if t.aborts != u32::from(self.g.aborted) {
            return fail(format!(
                "rule 1: {} abort(s), the rules say {}",
                t.aborts, self.g.aborted
            ));
        }
        match (t.records.as_slice(), &self.g.outcome) {
            ([], None) => {}
            ([(rec, aborts_then)], Some(outcome)) => {
                if rec.outcome != *outcome {
                    return fail(format!(
                        "rule 9: recorded {:?}, expected {outcome:?}",
                        rec.outcome
                    ));
                }
                if rec.output_tokens != self.g.tokens || rec.ttft.is_some() != (self.g.tokens > 0) {
                    return fail(format!(
                        "record {rec:?} disagrees with {} tokens",
                        self.g.tokens
                    ));
                }
                if (rec.abort == AbortStatus::Sent) != (*aborts_then == 1) {
                    return fail(format!(
                        "record says abort {:?} with {aborts_then} abort(s) issued",
                        rec.abort
                    ));
                }
                if rec.id != "script" {
                    return fail("record for the wrong request");
                }
            }
            (recs, want) => return fail(format!("rule 9: records {recs:?}, expected {want:?}")),
        }
        let spawns = self.rt.spawns();
        if spawns != self.g.spawns_allowed {
            return fail(format!(
                "{spawns} task(s) spawned, the rules allow {}",
                self.g.spawns_allowed
            ));
        }
        if self.rt.pending() != usize::from(self.g.watchdog) {
            return fail(format!(
                "{} spawned task(s) pending, the rules allow {}",
                self.rt.pending(),
                usize::from(self.g.watchdog)
            ));
        }
        Ok(())
    }

    /// Drop the stream if the script did not, let every deadline pass, and check that
    /// nothing is left owed.
    fn finish(&mut self) -> Check {
        self.op(Op::Drop)?;
        self.consistent()?;
        self.op(Op::RunSpawned)?;
        self.consistent()?;
        self.op(Op::Advance(DEFERRAL * 2))?;
        self.op(Op::RunSpawned)?;
        if self.g.deferred {
            return fail("rule 2: a deferred abort was never released nor discarded");
        }
        if self.rt.pending() != 0 {
            return fail("a spawned task is still pending after every deadline passed");
        }
        if lock(&self.track).records.len() != 1 {
            return fail("rule 9: not exactly one record");
        }
        // What the context still holds must not keep the request alive.
        drop(self.ctx.clone());
        Ok(())
    }
}

impl Ghost {
    /// The hint counts as the first token for the silence limits.
    fn seen_token_or_hint(&mut self) {
        if !self.seen_token {
            self.seen_token = true;
            self.silence_since = None;
        }
    }
}

impl Cancel {
    fn max_with(self, op: Op) -> Cancel {
        match (self, op) {
            (_, Op::Kill) | (Cancel::Kill, _) => Cancel::Kill,
            _ => Cancel::Stop,
        }
    }
}
