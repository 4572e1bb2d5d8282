//! Loom models of every race in a request's life, on the REAL `Adapter`,
//! `ResponseStream` and `Context` (and, where the race is inside one decision, on the
//! pure `lifecycle::Cell` with the invariant oracle).
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
//! The test runtime is loom-friendly: `spawn` polls the future inline with a no-op
//! waker (the abort future completes at once) and keeps it if it is still pending; the
//! clock is frozen and only moves when a model advances it; timers fire only then.
#![cfg(tether_loom)]

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};
use tether_core::AbortStatus;

use futures_core::Stream;
use futures_util::StreamExt;
use loom::future::block_on;
use loom::thread;
use tether_core::context::Signal;
use tether_core::drive::SpawnFuture;
use tether_core::engine::BoxFuture;
use tether_core::lifecycle::oracle::Oracle;
use tether_core::lifecycle::{step, Abort, Actions, Cell, Event, State};
use tether_core::sync::{downgrade, lock, upgrade, Arc, Mutex, Weak};
use tether_core::{
    Adapter, AdapterConfig, Annotated, AsyncTimer, Cause, Chunk, ChunkStream, Context,
    EngineConfig, EngineError, ErrorKind, FinishReason, GenerateContext, LlmEngine, Mode, Observer,
    Outcome, Request, RequestRecord, ResponseStream, Runtime,
};

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

// ---------------------------------------------------------------------------------
// A loom-friendly runtime: inline spawn, frozen clock, manually fired timers.

struct RtState {
    base: Instant,
    offset_ms: AtomicU64,
    next_timer: AtomicUsize,
    /// `(timer id, deadline, waker)`: loom mutex, the wakers are loom wakers.
    timers: Mutex<Vec<(usize, Instant, Waker)>>,
    pending: StdMutex<Vec<SpawnFuture>>,
    spawns: AtomicUsize,
}

#[derive(Clone)]
struct LoomRuntime(StdArc<RtState>);

impl std::fmt::Debug for LoomRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoomRuntime")
            .field("offset_ms", &self.0.offset_ms.load(SeqCst))
            .finish_non_exhaustive()
    }
}

impl LoomRuntime {
    fn new() -> LoomRuntime {
        LoomRuntime(StdArc::new(RtState {
            base: Instant::now(),
            offset_ms: AtomicU64::new(0),
            next_timer: AtomicUsize::new(0),
            timers: Mutex::new(Vec::new()),
            pending: StdMutex::new(Vec::new()),
            spawns: AtomicUsize::new(0),
        }))
    }

    /// Move the clock and wake the timers now due (register-then-check in the timer
    /// makes this free of lost wake-ups).
    fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap();
        self.0.offset_ms.fetch_add(ms, SeqCst);
        let now = self.now();
        let due: Vec<Waker> = {
            let mut timers = lock(&self.0.timers);
            let (due, left): (Vec<_>, Vec<_>) = std::mem::take(&mut *timers)
                .into_iter()
                .partition(|(_, at, _)| *at <= now);
            *timers = left;
            due.into_iter().map(|(_, _, w)| w).collect()
        };
        due.into_iter().for_each(Waker::wake);
    }

    /// The executor's turn: poll every spawned future still pending once (the watchdog,
    /// whose timer or engine woke it). Called by one thread of a model at a time.
    fn run_pending(&self) {
        let tasks = std::mem::take(&mut *std_lock(&self.0.pending));
        let mut cx = TaskContext::from_waker(Waker::noop());
        let mut left: Vec<SpawnFuture> = tasks
            .into_iter()
            .filter_map(|mut t| t.as_mut().poll(&mut cx).is_pending().then_some(t))
            .collect();
        std_lock(&self.0.pending).append(&mut left);
    }

    /// Drop whatever is still pending (they hold the request: a leak for loom).
    fn shutdown(&self) {
        let pending = std::mem::take(&mut *std_lock(&self.0.pending));
        drop(pending);
        let timers = std::mem::take(&mut *lock(&self.0.timers));
        drop(timers);
    }
}

impl Runtime for LoomRuntime {
    fn spawn(&self, mut future: SpawnFuture) {
        self.0.spawns.fetch_add(1, SeqCst);
        let mut cx = TaskContext::from_waker(Waker::noop());
        if future.as_mut().poll(&mut cx).is_pending() {
            std_lock(&self.0.pending).push(future);
        }
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(LoomTimer {
            rt: self.clone(),
            id: self.0.next_timer.fetch_add(1, SeqCst),
            deadline,
        })
    }

    fn now(&self) -> Instant {
        self.0.base + Duration::from_millis(self.0.offset_ms.load(SeqCst))
    }
}

#[derive(Debug)]
struct LoomTimer {
    rt: LoomRuntime,
    id: usize,
    deadline: Instant,
}

impl AsyncTimer for LoomTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().deadline = deadline;
    }

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        {
            let mut timers = lock(&self.rt.0.timers);
            timers.retain(|(id, _, _)| *id != self.id);
            timers.push((self.id, self.deadline, cx.waker().clone()));
        }
        if self.rt.now() >= self.deadline {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

// ---------------------------------------------------------------------------------
// A channel-fed engine: items are pushed by the model (or by the engine's own abort),
// and the stream parks on the channel.

#[derive(Default)]
struct ChanInner {
    items: VecDeque<Result<Chunk, EngineError>>,
    closed: bool,
    waker: Option<Waker>,
}

struct Chan {
    inner: Mutex<ChanInner>,
}

impl Chan {
    fn push(&self, item: Result<Chunk, EngineError>, close: bool) {
        let waker = {
            let mut c = lock(&self.inner);
            c.items.push_back(item);
            c.closed |= close;
            c.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

struct ChanStream {
    chan: StdArc<Chan>,
}

impl Stream for ChanStream {
    type Item = Result<Chunk, EngineError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let mut c = lock(&self.chan.inner);
        if let Some(item) = c.items.pop_front() {
            return Poll::Ready(Some(item));
        }
        if c.closed {
            return Poll::Ready(None);
        }
        c.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// What the engine saw; std atomics, so reading them adds no interleavings.
#[derive(Default)]
struct EngineLog {
    aborts: AtomicUsize,
    /// Set by a model right before it sends the first-token hint.
    hinted: AtomicBool,
    /// Set by a model right before it moves the clock past the deferral deadline.
    deadline_passed: AtomicBool,
    /// `(hinted, deadline_passed)` when the abort came.
    evidence: StdMutex<Option<(bool, bool)>>,
}

/// Holds an engine's `generate` pending until opened (a slow admission).
#[derive(Default)]
struct Gate {
    inner: Mutex<(bool, Option<Waker>)>,
    /// The engine's `generate` got past the gate.
    passed: AtomicBool,
}

impl Gate {
    fn open(&self) {
        let waker = {
            let mut g = lock(&self.inner);
            g.0 = true;
            g.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

struct LoomEngine {
    /// When set, `generate` waits for this gate.
    gate: Option<StdArc<Gate>>,
    mode: Mode,
    chan: StdArc<Chan>,
    log: StdArc<EngineLog>,
    /// The engine reacts to `abort` by ending its stream with this chunk.
    on_abort: Option<Chunk>,
    /// The `GenerateContext` of the last `generate` (a model takes it out at once:
    /// left here it would keep the request alive through the engine).
    gctx: StdArc<StdMutex<Option<GenerateContext>>>,
}

impl LlmEngine for LoomEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move { Ok(EngineConfig::new("loom", worker_id).with_max_concurrency(None)) })
    }

    fn generate(
        &self,
        _request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        *std_lock(&self.gctx) = Some(context);
        let stream: ChunkStream = Box::pin(ChanStream {
            chan: self.chan.clone(),
        });
        let gate = self.gate.clone();
        Box::pin(async move {
            if let Some(gate) = gate {
                std::future::poll_fn(|cx| {
                    let mut g = lock(&gate.inner);
                    if g.0 {
                        Poll::Ready(())
                    } else {
                        g.1 = Some(cx.waker().clone());
                        Poll::Pending
                    }
                })
                .await;
                gate.passed.store(true, SeqCst);
            }
            Ok(stream)
        })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        drop(context);
        let n = self.log.aborts.fetch_add(1, SeqCst) + 1;
        assert_eq!(n, 1, "rule 1: abort called twice");
        if self.mode == Mode::Decode {
            let evidence = (
                self.log.hinted.load(SeqCst),
                self.log.deadline_passed.load(SeqCst),
            );
            assert!(
                evidence.0 || evidence.1,
                "rule 2: decode abort before the first token and the deadline"
            );
            *std_lock(&self.log.evidence) = Some(evidence);
        }
        if let Some(chunk) = &self.on_abort {
            self.chan.push(Ok(chunk.clone()), true);
        }
        Box::pin(async {})
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

#[derive(Default)]
struct Records {
    /// Each record with the number of aborts issued when it was taken.
    records: StdMutex<Vec<(RequestRecord, usize)>>,
    on_aborts: AtomicUsize,
    engine: StdArc<EngineLog>,
}

struct LoomObserver(StdArc<Records>);

impl Observer for LoomObserver {
    fn on_record(&self, record: &RequestRecord) {
        let aborts = self.0.engine.aborts.load(SeqCst);
        std_lock(&self.0.records).push((record.clone(), aborts));
    }

    fn on_abort(&self, _request_id: &str) {
        self.0.on_aborts.fetch_add(1, SeqCst);
    }
}

/// One adapter, one engine, one context: what every adapter model starts from.
struct Rig {
    adapter: Adapter,
    rt: LoomRuntime,
    chan: StdArc<Chan>,
    log: StdArc<EngineLog>,
    records: StdArc<Records>,
    gctx: StdArc<StdMutex<Option<GenerateContext>>>,
    ctx: Context,
}

impl Rig {
    fn new(mode: Mode, on_abort: Option<Chunk>) -> Rig {
        Rig::build(mode, on_abort, Context::new("loom"), None)
    }

    fn with_context(mode: Mode, on_abort: Option<Chunk>, ctx: Context) -> Rig {
        Rig::build(mode, on_abort, ctx, None)
    }

    fn build(
        mode: Mode,
        on_abort: Option<Chunk>,
        ctx: Context,
        first_token_timeout: Option<Duration>,
    ) -> Rig {
        Rig::build_gated(mode, on_abort, ctx, first_token_timeout, None)
    }

    fn build_gated(
        mode: Mode,
        on_abort: Option<Chunk>,
        ctx: Context,
        first_token_timeout: Option<Duration>,
        gate: Option<StdArc<Gate>>,
    ) -> Rig {
        let rt = LoomRuntime::new();
        let chan = StdArc::new(Chan {
            inner: Mutex::new(ChanInner::default()),
        });
        let log = StdArc::new(EngineLog::default());
        let gctx = StdArc::new(StdMutex::new(None));
        let records = StdArc::new(Records {
            engine: log.clone(),
            ..Records::default()
        });
        let engine: StdArc<dyn LlmEngine> = StdArc::new(LoomEngine {
            gate: gate.clone(),
            mode,
            chan: chan.clone(),
            log: log.clone(),
            on_abort,
            gctx: gctx.clone(),
        });
        let observer: StdArc<dyn Observer> = StdArc::new(LoomObserver(records.clone()));
        let config = AdapterConfig::default()
            .mode(mode)
            .deferral_deadline(DEFERRAL)
            .cancel_grace(None)
            .first_token_timeout(first_token_timeout)
            .inter_token_timeout(None)
            .observer(Arc::from_std(observer))
            .spans(false);
        let adapter = Adapter::new(Arc::from_std(engine), rt.clone(), config);
        Rig {
            adapter,
            rt,
            chan,
            log,
            records,
            gctx,
            ctx,
        }
    }

    /// `generate`, and take the engine's `GenerateContext` out of the engine.
    fn start(&self) -> (ResponseStream, GenerateContext) {
        let request = Request::new("loom", "loom", vec![1]);
        let stream =
            block_on(self.adapter.generate(request, self.ctx.clone())).expect("generate succeeds");
        let gctx = std_lock(&self.gctx).take().expect("engine got a context");
        (stream, gctx)
    }

    fn aborts(&self) -> usize {
        self.log.aborts.load(SeqCst)
    }

    /// The one record; checks the abort bookkeeping around it.
    fn record(&self) -> RequestRecord {
        let records = std_lock(&self.records.records).clone();
        assert_eq!(records.len(), 1, "rule 9: exactly one record: {records:?}");
        let (record, aborts_then) = records.into_iter().next().unwrap();
        let aborts = self.aborts();
        assert!(aborts <= 1, "rule 1: {aborts} aborts");
        assert_eq!(
            self.records.on_aborts.load(SeqCst),
            aborts,
            "the observer hears of every abort"
        );
        // The abort is decided by the compare-exchange and carried out right after it,
        // so a terminal recorded in between says `Sent` before the engine heard of it;
        // the reverse (an abort issued, the record unaware) is a bug.
        // A deferred abort may also be released by a racing hint in between (the record
        // then says `Deferred`); an abort issued while the record says `None` or
        // `Discarded` is a bug.
        assert!(
            aborts_then == 0 || matches!(record.abort, AbortStatus::Sent | AbortStatus::Deferred),
            "an abort was issued but the record says {record:?}"
        );
        if record.abort == AbortStatus::Sent {
            assert_eq!(aborts, 1, "a decided abort is carried out: {record:?}");
        }
        if matches!(
            record.abort,
            AbortStatus::NotNeeded | AbortStatus::Discarded
        ) {
            // Rule 1: nothing may follow a terminal (or drop) that owed no abort.
            assert_eq!(
                aborts, 0,
                "abort issued after the request ended: {record:?}"
            );
        }
        record
    }

    fn shutdown(self) {
        self.rt.shutdown();
        lock(&self.chan.inner).waker = None;
        drop(self.adapter);
    }
}

/// Poll `stream` to its end inside `block_on`: a missed wake-up deadlocks.
fn collect(stream: &mut ResponseStream) -> Vec<Annotated<Chunk>> {
    block_on(async {
        let mut items = Vec::new();
        while let Some(item) = stream.next().await {
            items.push(item);
        }
        items
    })
}

/// One poll with a no-op waker (a consumer that does not wait).
fn poll_once(stream: &mut ResponseStream) -> Poll<Option<Annotated<Chunk>>> {
    Pin::new(stream).poll_next(&mut TaskContext::from_waker(Waker::noop()))
}

/// Exactly one terminal, and it is the last item.
fn one_terminal_last(items: &[Annotated<Chunk>]) -> &Annotated<Chunk> {
    let terminals = items.iter().filter(|i| i.is_terminal()).count();
    assert_eq!(terminals, 1, "rule 6: exactly one terminal in {items:?}");
    let last = items.last().unwrap();
    assert!(
        last.is_terminal(),
        "rule 6: the terminal is last in {items:?}"
    );
    last
}

fn reason(item: &Annotated<Chunk>) -> Option<FinishReason> {
    item.data.as_ref().and_then(|c| c.finish_reason.clone())
}

// ---------------------------------------------------------------------------------
// The models.

/// A stop lands while the engine's worker pushes its final chunk. Whichever wins, the
/// engine's own terminal reaches the consumer (stop is graceful), the abort is sent
/// only if the stop was decided before that terminal was seen, and the parked
/// consumer is woken by the worker.
#[test]
fn stop_races_final_chunk() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        rig.chan.push(Ok(Chunk::tokens(vec![7])), false);
        let chan = rig.chan.clone();
        let worker = thread::spawn(move || {
            chan.push(Ok(Chunk::terminal(FinishReason::Length)), true);
        });
        let ctx = rig.ctx.clone();
        let stopper = thread::spawn(move || ctx.stop());
        let items = collect(&mut stream);
        worker.join().unwrap();
        stopper.join().unwrap();
        assert_eq!(items.len(), 2, "{items:?}");
        let last = one_terminal_last(&items);
        assert_eq!(reason(last), Some(FinishReason::Length));
        let record = rig.record();
        assert_eq!(record.outcome, Outcome::Finished(FinishReason::Length));
        assert_eq!(
            rig.aborts(),
            usize::from(stream.state().abort() == Abort::Sent)
        );
        reached.saw(format!("aborts={}", rig.aborts()));
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["aborts=0", "aborts=1"]);
}

/// A kill races the consumer dropping the stream on another thread (after at most one
/// poll). Exactly one abort (aggregated mode, the engine never ends), exactly one
/// record: `Cancelled` if the consumer's poll saw the kill, `Dropped` otherwise.
#[test]
fn kill_races_consumer_drop() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        assert!(poll_once(&mut stream).is_pending());
        let consumer = thread::spawn(move || {
            let polled = poll_once(&mut stream);
            drop(stream);
            polled
        });
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill());
        let polled = consumer.join().unwrap();
        killer.join().unwrap();
        let record = rig.record();
        match polled {
            Poll::Ready(Some(item)) => {
                assert_eq!(reason(&item), Some(FinishReason::Cancelled), "{item:?}");
                assert_eq!(record.outcome, Outcome::Cancelled);
            }
            Poll::Pending => assert_eq!(record.outcome, Outcome::Dropped),
            Poll::Ready(None) => panic!("rule 6: the stream ended without a terminal"),
        }
        assert_eq!(rig.aborts(), 1, "rule 1/4: exactly one abort");
        reached.saw(record.outcome.label());
        rig.shutdown();
    });
    seen.expect(&["cancelled", "dropped"]);
}

/// Kill-on-drop (rule 4's opt-in): the consumer drops its stream while another thread
/// kills the context for a shutdown, so the drop's own kill may find the listener
/// mid-delivery. Whichever cause came first is the record's, the outcome is always
/// `Cancelled` (never `Dropped`), and there is exactly one abort and one record.
#[test]
fn kill_on_drop_races_kill() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        stream.set_kill_on_drop(true);
        let consumer = thread::spawn(move || drop(stream));
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill_with(Cause::Shutdown));
        consumer.join().unwrap();
        killer.join().unwrap();
        let record = rig.record();
        assert_eq!(record.outcome, Outcome::Cancelled, "rule 4: never Dropped");
        assert_eq!(record.cause, rig.ctx.cause(), "the first cause is recorded");
        assert_eq!(rig.aborts(), 1, "rule 1: exactly one abort");
        reached.saw(format!("{:?}", record.cause));
        rig.shutdown();
    });
    seen.expect(&["Some(ClientDisconnect)", "Some(Shutdown)"]);
}

/// Early finish (rule 12) races a kill from another thread. The consumer gets exactly
/// one terminal, last: its own `Stop` if the finish won (outcome `Finished(Stop)`), the
/// synthesized `Cancelled` if the kill did (outcome `Cancelled`, and `finish` said
/// no). Exactly one abort either way.
#[test]
fn early_finish_races_kill() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        let consumer = thread::spawn(move || {
            let finished = stream.finish(FinishReason::Stop);
            let items = collect(&mut stream);
            (finished, items)
        });
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill());
        let (finished, items) = consumer.join().unwrap();
        killer.join().unwrap();
        let last = reason(one_terminal_last(&items));
        let record = rig.record();
        if finished {
            assert_eq!(last, Some(FinishReason::Stop));
            assert_eq!(record.outcome, Outcome::Finished(FinishReason::Stop));
        } else {
            assert_eq!(last, Some(FinishReason::Cancelled));
            assert_eq!(record.outcome, Outcome::Cancelled);
        }
        assert_eq!(rig.aborts(), 1, "rule 1: exactly one abort");
        reached.saw(record.outcome.label());
        rig.shutdown();
    });
    seen.expect(&["finished", "cancelled"]);
}

/// Stop and kill race each other from two threads while the consumer is parked on a
/// silent engine: only the listener's wake-up can unpark it. The consumer gets one
/// synthesized `Cancelled`, the engine one abort, the context's listener sees
/// `Stop, Kill` or `Kill` alone.
#[test]
fn stop_races_kill() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let seen = StdArc::new(StdMutex::new(Vec::new()));
        let s = seen.clone();
        rig.ctx
            .add_listener(move |signal| std_lock(&s).push(signal));
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        let ctx = rig.ctx.clone();
        let stopper = thread::spawn(move || ctx.stop());
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill());
        let items = collect(&mut stream);
        stopper.join().unwrap();
        killer.join().unwrap();
        let last = one_terminal_last(&items);
        assert_eq!(reason(last), Some(FinishReason::Cancelled));
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        let seen = std_lock(&seen).clone();
        assert!(
            seen == [Signal::Stop, Signal::Kill] || seen == [Signal::Kill],
            "listener saw {seen:?}"
        );
        reached.saw(format!("{seen:?}"));
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["[Stop, Kill]", "[Kill]"]);
}

/// Decode mode, before the first token: the consumer drops the stream while the
/// engine sends its first-token hint, with and without a stop before. A drop that wins
/// keeps the abort deferred (the engine may be mid KV transfer, and the work must not
/// leak) and the hint then releases it; a hint that wins makes the drop (or the stop)
/// abort at once. Either way exactly one abort, never before the hint.
#[test]
fn drop_races_first_token_hint() {
    for stop_first in [false, true] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let rig = Rig::new(Mode::Decode, None);
            let (mut stream, gctx) = rig.start();
            if stop_first {
                rig.ctx.stop();
                assert_eq!(rig.aborts(), 0, "rule 2: deferred");
            }
            assert!(poll_once(&mut stream).is_pending());
            let log = rig.log.clone();
            let hinter = thread::spawn(move || {
                log.hinted.store(true, SeqCst);
                gctx.notify_first_token();
            });
            let dropper = thread::spawn(move || drop(stream));
            hinter.join().unwrap();
            dropper.join().unwrap();
            let record = rig.record();
            assert_eq!(record.outcome, Outcome::Dropped);
            assert_eq!(rig.aborts(), 1, "rule 4: the dropped request is aborted");
            reached.saw(format!("recorded {:?}", record.abort));
            rig.shutdown();
        });
        seen.expect(&["recorded Deferred", "recorded Sent"]);
    }
}

/// Decode mode: a stop (deferred: no first token yet) races the engine's hint. Either
/// order ends in exactly one abort, after the hint; the engine answers the abort with
/// its terminal, which wakes the parked consumer. A lost abort or wake-up deadlocks.
#[test]
fn first_token_hint_races_deferred_stop() {
    model(|| {
        let rig = Rig::new(Mode::Decode, Some(Chunk::terminal(FinishReason::Cancelled)));
        let (mut stream, gctx) = rig.start();
        let ctx = rig.ctx.clone();
        let stopper = thread::spawn(move || ctx.stop());
        let log = rig.log.clone();
        let hinter = thread::spawn(move || {
            log.hinted.store(true, SeqCst);
            gctx.notify_first_token();
        });
        let items = collect(&mut stream);
        stopper.join().unwrap();
        hinter.join().unwrap();
        let last = one_terminal_last(&items);
        assert_eq!(reason(last), Some(FinishReason::Cancelled));
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        drop(stream);
        rig.shutdown();
    });
}

/// Decode mode, stopped before the first token: the deferral deadline (the watchdog's
/// timer, fired by another thread moving the clock, which then runs the watchdog as an
/// executor would) races the first-token hint. The consumer never polls for it. One
/// abort, after one of them; the parked consumer is woken by whichever wins.
/// Then the same race inside one decision, on the pure `Cell`: the deadline, the hint
/// and a first chunk applied from three threads release the abort exactly once, and
/// the outcome is linearizable and passes the oracle.
#[test]
fn deferral_deadline_races_first_token() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Decode, Some(Chunk::terminal(FinishReason::Cancelled)));
        let (mut stream, gctx) = rig.start();
        // Arms the deferral deadline at t0 + 30 s, on the watchdog.
        rig.ctx.stop();
        assert!(poll_once(&mut stream).is_pending());
        assert_eq!(rig.aborts(), 0, "rule 2: deferred");
        let (rt, log) = (rig.rt.clone(), rig.log.clone());
        let clock = thread::spawn(move || {
            log.deadline_passed.store(true, SeqCst);
            rt.advance(DEFERRAL);
            rt.run_pending();
        });
        let log = rig.log.clone();
        let hinter = thread::spawn(move || {
            log.hinted.store(true, SeqCst);
            gctx.notify_first_token();
        });
        let items = collect(&mut stream);
        clock.join().unwrap();
        hinter.join().unwrap();
        one_terminal_last(&items);
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        match *std_lock(&rig.log.evidence) {
            Some((true, false)) => reached.saw("hint released"),
            Some((false, true)) => reached.saw("deadline released"),
            _ => {}
        }
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["hint released", "deadline released"]);

    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let cell = Arc::new(Cell::new(State::new(Mode::Decode)));
        let (after_stop, stop_acts) = cell.apply(Event::Stop);
        assert!(after_stop.abort_deferred() && !stop_acts.abort);
        let racers = [Event::DeferralDeadline, Event::FirstTokenHint];
        let handles: Vec<_> = racers
            .into_iter()
            .map(|event| {
                let cell = cell.clone();
                thread::spawn(move || {
                    let (state, acts) = cell.apply(event);
                    (event, state, acts)
                })
            })
            .collect();
        let (state, acts) = cell.apply(Event::Chunk);
        let mut applied = vec![(Event::Chunk, state, acts)];
        applied.extend(handles.into_iter().map(|h| h.join().unwrap()));
        let aborts = applied.iter().filter(|(_, _, a)| a.abort).count();
        assert_eq!(aborts, 1, "rule 1/2: one release: {applied:?}");
        check_linearizable(
            Mode::Decode,
            &[(Event::Stop, after_stop, stop_acts)],
            &applied,
        );
        for (event, _, acts) in &applied {
            if acts.abort {
                reached.saw(format!("{event:?}"));
            }
        }
    });
    seen.expect(&["DeferralDeadline", "FirstTokenHint", "Chunk"]);
}

/// Some order of the racing applications replays through `step` to exactly what each
/// actor got, and that order passes the oracle.
fn check_linearizable(
    mode: Mode,
    prefix: &[(Event, State, Actions)],
    applied: &[(Event, State, Actions)],
) {
    let mut start = State::new(mode);
    let mut oracle = Oracle::new(mode);
    for &(event, state, acts) in prefix {
        oracle.observe(event, acts, state).unwrap();
        start = state;
    }
    let n = applied.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut found = false;
    permute(&mut order, 0, &mut |order| {
        let mut state = start;
        let mut o = oracle.clone();
        for &i in order {
            let (event, got_state, got_acts) = applied[i];
            let (next, acts) = step(state, event);
            if (next, acts) != (got_state, got_acts) {
                // A no-op application reads the state without writing it: it may have
                // happened anywhere the state matched, which this order does not show.
                return;
            }
            if let Err(v) = o.observe(event, acts, next) {
                panic!("oracle: {v} in {order:?} of {applied:?}");
            }
            state = next;
        }
        found = true;
    });
    assert!(found, "not linearizable: {applied:?}");
}

fn permute(items: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
    if k == items.len() {
        f(items);
        return;
    }
    for i in k..items.len() {
        items.swap(k, i);
        permute(items, k + 1, f);
        items.swap(k, i);
    }
}

/// A router's parent context is stopped while a request's context is being linked to
/// it. Either the link sees the stopped parent and stops the child itself, or the
/// parent's delivery reaches the child, before the parent's own listeners. The child's
/// `stopped()` waiter, parked first, is woken; the request behind the child is aborted
/// once and its consumer, parked on the engine, gets the engine's answer.
#[test]
fn link_child_races_parent_stop() {
    model(|| {
        let parent = Context::new("parent");
        let child = Context::new("child");
        let rig = Rig::with_context(
            Mode::Aggregated,
            Some(Chunk::terminal(FinishReason::Cancelled)),
            child.clone(),
        );
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        let linked = StdArc::new(AtomicBool::new(false));
        let (l, c) = (linked.clone(), child.clone());
        parent.add_listener(move |_| {
            assert!(
                !l.load(SeqCst) || c.is_stopped(),
                "a linked child is signalled before the parent's listeners"
            );
        });
        let (p, c, l) = (parent.clone(), child.clone(), linked.clone());
        let linker = thread::spawn(move || {
            p.link_child(&c);
            l.store(true, SeqCst);
        });
        let p = parent.clone();
        let stopper = thread::spawn(move || p.stop());
        block_on(child.stopped());
        let items = collect(&mut stream);
        linker.join().unwrap();
        stopper.join().unwrap();
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        drop(stream);
        rig.shutdown();
    });
}

/// One upgrade for `upgrades_race_last_owner_drop`: whether no owner was left when it
/// started, and what it got. `live` moves right next to the loom operation it mirrors.
fn upgrade_once(weak: &Weak<u32>, live: &AtomicUsize) -> (bool, Option<u32>) {
    let none_left = live.load(SeqCst) == 0;
    let got = upgrade(weak);
    if got.is_some() {
        live.fetch_add(1, SeqCst);
    }
    let value = got.as_deref().copied();
    if let Some(arc) = got {
        drop(arc);
        live.fetch_sub(1, SeqCst);
    }
    (none_left, value)
}

/// The loom `Weak` model itself (`tether_core::sync`): two upgrades (each dropping what
/// it got) race the drop of the original owner, with the drop on the model's main thread
/// or on a spawned one (loom starts from different schedules). An upgrade that starts
/// once no owner is left fails, even while the other upgrade holds its probe; one that
/// succeeds hands out a working `Arc`. `live` counts the owners.
#[test]
fn upgrades_race_last_owner_drop() {
    for drop_on_main in [true, false] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let owner = Arc::new(7_u32);
            let weak = downgrade(&owner);
            let live = StdArc::new(AtomicUsize::new(1));
            let l = live.clone();
            let drop_owner = move || {
                drop(owner);
                l.fetch_sub(1, SeqCst);
            };
            let spawn_upgrade = || {
                let (w, live) = (weak.clone(), live.clone());
                thread::spawn(move || upgrade_once(&w, &live))
            };
            let mut results = Vec::new();
            if drop_on_main {
                let upgraders = [spawn_upgrade(), spawn_upgrade()];
                drop_owner();
                results.extend(upgraders.map(|u| u.join().unwrap()));
            } else {
                let dropper = thread::spawn(drop_owner);
                let upgrader = spawn_upgrade();
                results.push(upgrade_once(&weak, &live));
                dropper.join().unwrap();
                results.push(upgrader.join().unwrap());
            }
            for result in results {
                match result {
                    (true, value) => {
                        assert_eq!(value, None, "upgraded after the last owner left");
                        reached.saw("after the last owner");
                    }
                    (false, value) => {
                        assert!(matches!(value, None | Some(7)), "{value:?}");
                        reached.saw(format!("{value:?}"));
                    }
                }
            }
            assert!(upgrade(&weak).is_none());
        });
        seen.expect(&["Some(7)", "None", "after the last owner"]);
    }
}

/// Sets its flag when dropped: tells a model when a context's state was freed (its
/// listeners go with it).
struct DropFlag(StdArc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// A child listener that counts its calls (each must be `Stop`) and flags when it is freed.
fn count_stops(ctx: &Context) -> (StdArc<AtomicUsize>, StdArc<AtomicBool>) {
    let (calls, freed) = (
        StdArc::new(AtomicUsize::new(0)),
        StdArc::new(AtomicBool::new(false)),
    );
    let (c, flag) = (calls.clone(), DropFlag(freed.clone()));
    ctx.add_listener(move |signal| {
        let _owned = &flag;
        assert_eq!(signal, Signal::Stop);
        c.fetch_add(1, SeqCst);
    });
    (calls, freed)
}

/// A request's context (the child) is dropped on one thread while its router's parent
/// context is stopped on another: the parent's link is weak, so it signals the child only
/// if its upgrade beat the drop. A child dropped before the stop began is never
/// signalled, one that outlived the whole stop always is, and the parent's own delivery
/// completes either way. Run with the drop on the main thread and with the stop there.
#[test]
fn child_drop_races_parent_stop() {
    for drop_on_main in [true, false] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let parent = Context::new("parent");
            let child = Context::new("child");
            parent.link_child(&child);
            let (calls, _) = count_stops(&child);
            let (parent_calls, _) = count_stops(&parent);
            let dropped = StdArc::new(AtomicBool::new(false));
            let stopped = StdArc::new(AtomicBool::new(false));
            let (d, s) = (dropped.clone(), stopped.clone());
            // The last owner: the parent's link alone does not keep the child alive.
            let drop_child = move || {
                let stopped_before = s.load(SeqCst);
                drop(child);
                d.store(true, SeqCst);
                stopped_before
            };
            let (p, d, s) = (parent.clone(), dropped.clone(), stopped.clone());
            let stop_parent = move || {
                let dropped_before = d.load(SeqCst);
                p.stop();
                s.store(true, SeqCst);
                dropped_before
            };
            let (stopped_before, dropped_before) = if drop_on_main {
                let stopper = thread::spawn(stop_parent);
                (drop_child(), stopper.join().unwrap())
            } else {
                let dropper = thread::spawn(drop_child);
                let dropped_before = stop_parent();
                (dropper.join().unwrap(), dropped_before)
            };
            let calls = calls.load(SeqCst);
            assert!(calls <= 1, "child signalled {calls} times");
            if dropped_before {
                assert_eq!(calls, 0, "a dead child was signalled");
            }
            if stopped_before {
                assert_eq!(calls, 1, "a child alive through the stop was not signalled");
            }
            assert_eq!(parent_calls.load(SeqCst), 1);
            reached.saw(if calls == 1 { "signalled" } else { "skipped" });
        });
        seen.expect(&["signalled", "skipped"]);
    }
}

/// A parent links a new child while another thread drops an earlier child, whose link
/// the new one's push may prune (four links fill the `Vec`, so the fifth prunes dead
/// ones first). The dead child's state is freed by that prune or, if the prune still saw
/// it alive, by the parent's next stop; the stop never signals it, and signals every
/// live child. Run with the drop on the main thread and with the link there.
#[test]
fn link_child_races_child_drop() {
    for drop_on_main in [true, false] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let parent = Context::new("parent");
            let gone = Context::new("gone");
            parent.link_child(&gone);
            let (gone_calls, gone_freed) = count_stops(&gone);
            let kept: Vec<Context> = (0..3).map(|i| Context::new(format!("kept{i}"))).collect();
            kept.iter().for_each(|k| parent.link_child(k));
            let late = Context::new("late");
            if drop_on_main {
                let (p, l) = (parent.clone(), late.clone());
                let linker = thread::spawn(move || p.link_child(&l));
                drop(gone);
                linker.join().unwrap();
            } else {
                let dropper = thread::spawn(move || drop(gone));
                parent.link_child(&late);
                dropper.join().unwrap();
            }
            let pruned_by_link = gone_freed.load(SeqCst);
            parent.stop();
            assert!(gone_freed.load(SeqCst), "the stop prunes a dead link");
            assert_eq!(gone_calls.load(SeqCst), 0, "a dead child was signalled");
            assert!(kept.iter().all(Context::is_stopped));
            assert!(late.is_stopped());
            reached.saw(if pruned_by_link {
                "pruned by link"
            } else {
                "pruned by stop"
            });
        });
        seen.expect(&["pruned by link", "pruned by stop"]);
    }
}

/// `generate` registers the request's context listener while another thread stops
/// the context. The registration either sees the stop (and is called at once) or is
/// included in the stop's delivery: the engine is aborted exactly once and answers with
/// its terminal, waking the consumer. A missed stop leaves the consumer parked forever.
#[test]
fn listener_registration_races_stop() {
    model(|| {
        let rig = Rig::new(
            Mode::Aggregated,
            Some(Chunk::terminal(FinishReason::Cancelled)),
        );
        let ctx = rig.ctx.clone();
        let stopper = thread::spawn(move || ctx.stop());
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        let items = collect(&mut stream);
        stopper.join().unwrap();
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        drop(stream);
        rig.shutdown();
    });
}

/// Every ender at once: the engine's worker delivers its terminal (or an error), a
/// killer kills, the consumer polls once and drops the stream, and (third variant) a
/// clock thread moves time past the time-to-first-token limit. Exactly one record, and
/// it says what the consumer saw: the engine's terminal (`Finished` / `Failed`, and
/// then no abort ever), the synthesized `Cancelled`, the timeout (`TimedOut`), or
/// `Dropped`.
#[test]
fn observer_record_exactly_once_under_all_enders() {
    const TTFT: Duration = Duration::from_secs(1);
    for (engine_error, timeout) in [(false, false), (true, false), (false, true)] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let ctx = Context::new("loom");
            let rig = Rig::build(Mode::Aggregated, None, ctx, timeout.then_some(TTFT));
            let (mut stream, gctx) = rig.start();
            drop(gctx);
            let chan = rig.chan.clone();
            let worker = thread::spawn(move || {
                let item = if engine_error {
                    Err(EngineError::new(ErrorKind::Unavailable, "worker lost"))
                } else {
                    Ok(Chunk::terminal(FinishReason::Eos))
                };
                chan.push(item, true);
            });
            let ctx = rig.ctx.clone();
            let killer = thread::spawn(move || ctx.kill());
            let clock = timeout.then(|| {
                let rt = rig.rt.clone();
                thread::spawn(move || rt.advance(TTFT))
            });
            let polled = poll_once(&mut stream);
            drop(stream);
            worker.join().unwrap();
            killer.join().unwrap();
            if let Some(clock) = clock {
                clock.join().unwrap();
            }
            let record = rig.record();
            match polled {
                Poll::Ready(Some(item)) if item.is_error() => {
                    let kind = item.error.as_ref().map(EngineError::kind);
                    if kind == Some(ErrorKind::FirstTokenTimeout) {
                        assert!(timeout, "{item:?}");
                        assert_eq!(record.outcome, Outcome::TimedOut);
                        assert_eq!(rig.aborts(), 1, "rule 8: a timeout kills");
                    } else {
                        assert!(engine_error, "{item:?}");
                        assert_eq!(record.outcome, Outcome::Failed(ErrorKind::Unavailable));
                        assert_eq!(rig.aborts(), 0, "rule 1: no abort after the terminal");
                    }
                }
                Poll::Ready(Some(item)) => match reason(&item) {
                    Some(FinishReason::Eos) => {
                        assert_eq!(record.outcome, Outcome::Finished(FinishReason::Eos));
                        assert_eq!(rig.aborts(), 0, "rule 1: no abort after the terminal");
                    }
                    Some(FinishReason::Cancelled) => {
                        assert_eq!(record.outcome, Outcome::Cancelled);
                        assert_eq!(rig.aborts(), 1);
                    }
                    other => panic!("unexpected item {item:?} ({other:?})"),
                },
                Poll::Pending => {
                    assert_eq!(record.outcome, Outcome::Dropped);
                    assert_eq!(rig.aborts(), usize::from(record.abort == AbortStatus::Sent));
                }
                Poll::Ready(None) => panic!("rule 6: the stream ended without a terminal"),
            }
            reached.saw(record.outcome.label());
            rig.shutdown();
        });
        let ender = if engine_error { "failed" } else { "finished" };
        let mut all = vec![ender, "cancelled", "dropped"];
        if timeout {
            all.push("timed_out");
        }
        seen.expect(&all);
    }
}

/// A kill lands while the engine's `generate` is still pending (a slow admission) and
/// the engine finishes its setup on another thread. Rule 10: the context is watched
/// before `generate` is entered, so a kill that wins resolves `generate` at once with a
/// stream that yields `Cancelled`; a setup that wins gives a stream the kill then ends.
/// Either way one `Cancelled` terminal, one record, one abort, and no lost wake-up of
/// the caller parked in `generate`.
#[test]
fn kill_races_slow_setup() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let gate = StdArc::new(Gate::default());
        let rig = Rig::build_gated(
            Mode::Aggregated,
            None,
            Context::new("loom"),
            None,
            Some(gate.clone()),
        );
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill());
        let opener = {
            let gate = gate.clone();
            thread::spawn(move || gate.open())
        };
        let request = Request::new("loom", "loom", vec![1]);
        let mut stream = block_on(rig.adapter.generate(request, rig.ctx.clone()))
            .expect("a kill is not a setup error");
        let setup_done = gate.passed.load(SeqCst);
        drop(std_lock(&rig.gctx).take());
        let items = collect(&mut stream);
        killer.join().unwrap();
        opener.join().unwrap();
        let last = one_terminal_last(&items);
        assert_eq!(reason(last), Some(FinishReason::Cancelled));
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        reached.saw(if setup_done {
            "killed after setup"
        } else {
            "killed during setup"
        });
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["killed after setup", "killed during setup"]);
}

/// Decode mode, killed before the first token: the consumer takes its `Cancelled` and
/// is gone, the abort is still owed and the watchdog drains the engine. The engine's
/// first token (pushed on one thread) races the deferral deadline (the clock moved on
/// another); each thread then lets the executor run the watchdog. Exactly one abort,
/// released by the token or by the deadline, and the engine stream is let go after it.
#[test]
fn deferral_deadline_races_drained_first_token() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Decode, None);
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        rig.ctx.kill();
        let items = collect(&mut stream);
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(rig.aborts(), 0, "rule 2: deferred past the consumer's end");
        drop(stream);
        // Each thread then runs the executor's turn for the watchdog it woke.
        let (chan, log, rt) = (rig.chan.clone(), rig.log.clone(), rig.rt.clone());
        let engine = thread::spawn(move || {
            log.hinted.store(true, SeqCst);
            chan.push(Ok(Chunk::tokens(vec![1])), false);
            rt.run_pending();
        });
        let (rt, log) = (rig.rt.clone(), rig.log.clone());
        let clock = thread::spawn(move || {
            log.deadline_passed.store(true, SeqCst);
            rt.advance(DEFERRAL);
            rt.run_pending();
        });
        engine.join().unwrap();
        clock.join().unwrap();
        // A turn that found the watchdog busy on the other thread did nothing; this
        // last turn must find nothing left to do.
        rig.rt.run_pending();
        assert_eq!(rig.aborts(), 1, "rule 2: released once");
        assert_eq!(
            std_lock(&rig.rt.0.pending).len(),
            0,
            "the watchdog ended once the abort was sent"
        );
        match *std_lock(&rig.log.evidence) {
            Some((true, false)) => reached.saw("token released"),
            Some((false, true)) => reached.saw("deadline released"),
            Some((true, true)) => reached.saw("both passed"),
            _ => {}
        }
        rig.shutdown();
    });
    seen.expect(&["token released", "deadline released"]);
}

/// The engine's first-token hint (through the `GenerateContext`'s weak handle on the
/// request) races the consumer dropping a finished stream: the hint upgrades a request
/// that is being torn down, or fails to upgrade one that is gone (the loom model of
/// `Weak` explores the failed upgrade). Either way nothing is aborted, nothing panics,
/// and the one record stands.
#[test]
fn first_token_hint_races_request_teardown() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        rig.chan
            .push(Ok(Chunk::terminal(FinishReason::Length)), true);
        let items = collect(&mut stream);
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Length)
        );
        let dropped = StdArc::new(loom::sync::atomic::AtomicBool::new(false));
        let flag = dropped.clone();
        let dropper = thread::spawn(move || {
            drop(stream);
            flag.store(true, SeqCst);
        });
        let hinter = thread::spawn(move || {
            let late = dropped.load(SeqCst);
            gctx.notify_first_token();
            drop(gctx);
            late
        });
        dropper.join().unwrap();
        let hinted_after_drop = hinter.join().unwrap();
        assert_eq!(rig.aborts(), 0, "rule 1: nothing after the terminal");
        assert_eq!(
            rig.record().outcome,
            Outcome::Finished(FinishReason::Length)
        );
        reached.saw(if hinted_after_drop { "late" } else { "early" });
        rig.shutdown();
    });
    seen.expect(&["early", "late"]);
}
