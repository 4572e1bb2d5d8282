//! What every adapter model starts from: a channel-fed engine, an observer that keeps
//! each record with the aborts issued when it was taken, the [`Rig`] that wires them
//! to one adapter and one context, and the consumer's helpers.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;
use tether_core::AbortStatus;

use futures_core::Stream;
use futures_util::StreamExt;
use loom::future::block_on;
use tether_core::engine::BoxFuture;
use tether_core::sync::{lock, Arc, Mutex};
use tether_core::{
    Adapter, AdapterConfig, Annotated, Chunk, ChunkStream, Context, EngineConfig, EngineError,
    FinishReason, GenerateContext, LlmEngine, Mode, Observer, Request, RequestRecord,
    ResponseStream,
};

use crate::runtime::LoomRuntime;
use crate::{std_lock, StdArc, StdMutex, DEFERRAL};

// ---------------------------------------------------------------------------------
// A channel-fed engine: items are pushed by the model (or by the engine's own abort),
// and the stream parks on the channel.

#[derive(Default)]
struct ChanInner {
    items: VecDeque<Result<Chunk, EngineError>>,
    closed: bool,
    waker: Option<Waker>,
}

pub(crate) struct Chan {
    inner: Mutex<ChanInner>,
}

impl Chan {
    pub(crate) fn push(&self, item: Result<Chunk, EngineError>, close: bool) {
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
pub(crate) struct EngineLog {
    aborts: AtomicUsize,
    /// Set by a model right before it sends the first-token hint.
    pub(crate) hinted: AtomicBool,
    /// Set by a model right before it moves the clock past the deferral deadline.
    pub(crate) deadline_passed: AtomicBool,
    /// `(hinted, deadline_passed)` when the abort came.
    pub(crate) evidence: StdMutex<Option<(bool, bool)>>,
}

/// Holds an engine's `generate` pending until opened (a slow admission).
#[derive(Default)]
pub(crate) struct Gate {
    inner: Mutex<(bool, Option<Waker>)>,
    /// The engine's `generate` got past the gate.
    pub(crate) passed: AtomicBool,
}

impl Gate {
    pub(crate) fn open(&self) {
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
pub(crate) struct Rig {
    pub(crate) adapter: Adapter,
    pub(crate) rt: LoomRuntime,
    pub(crate) chan: StdArc<Chan>,
    pub(crate) log: StdArc<EngineLog>,
    records: StdArc<Records>,
    pub(crate) gctx: StdArc<StdMutex<Option<GenerateContext>>>,
    pub(crate) ctx: Context,
}

impl Rig {
    pub(crate) fn new(mode: Mode, on_abort: Option<Chunk>) -> Rig {
        Rig::build(mode, on_abort, Context::new("loom"), None)
    }

    pub(crate) fn with_context(mode: Mode, on_abort: Option<Chunk>, ctx: Context) -> Rig {
        Rig::build(mode, on_abort, ctx, None)
    }

    pub(crate) fn build(
        mode: Mode,
        on_abort: Option<Chunk>,
        ctx: Context,
        first_token_timeout: Option<Duration>,
    ) -> Rig {
        Rig::build_gated(mode, on_abort, ctx, first_token_timeout, None)
    }

    pub(crate) fn build_gated(
        mode: Mode,
        on_abort: Option<Chunk>,
        ctx: Context,
        first_token_timeout: Option<Duration>,
        gate: Option<StdArc<Gate>>,
    ) -> Rig {
        Rig::build_with_grace(mode, on_abort, ctx, first_token_timeout, gate, None)
    }

    /// A rig whose adapter has a cancel grace (a stop then also starts the watchdog).
    pub(crate) fn with_grace(mode: Mode, grace: Duration) -> Rig {
        Rig::build_with_grace(mode, None, Context::new("loom"), None, None, Some(grace))
    }

    fn build_with_grace(
        mode: Mode,
        on_abort: Option<Chunk>,
        ctx: Context,
        first_token_timeout: Option<Duration>,
        gate: Option<StdArc<Gate>>,
        cancel_grace: Option<Duration>,
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
            .cancel_grace(cancel_grace)
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
    pub(crate) fn start(&self) -> (ResponseStream, GenerateContext) {
        let request = Request::new("loom", "loom", vec![1]);
        let stream =
            block_on(self.adapter.generate(request, self.ctx.clone())).expect("generate succeeds");
        let gctx = std_lock(&self.gctx).take().expect("engine got a context");
        (stream, gctx)
    }

    pub(crate) fn aborts(&self) -> usize {
        self.log.aborts.load(SeqCst)
    }

    /// The one record; checks the abort bookkeeping around it.
    pub(crate) fn record(&self) -> RequestRecord {
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

    pub(crate) fn shutdown(self) {
        self.rt.shutdown();
        lock(&self.chan.inner).waker = None;
        drop(self.adapter);
    }
}

/// Poll `stream` to its end inside `block_on`: a missed wake-up deadlocks.
pub(crate) fn collect(stream: &mut ResponseStream) -> Vec<Annotated<Chunk>> {
    block_on(async {
        let mut items = Vec::new();
        while let Some(item) = stream.next().await {
            items.push(item);
        }
        items
    })
}

/// One poll with a no-op waker (a consumer that does not wait).
pub(crate) fn poll_once(stream: &mut ResponseStream) -> Poll<Option<Annotated<Chunk>>> {
    Pin::new(stream).poll_next(&mut TaskContext::from_waker(Waker::noop()))
}

/// Exactly one terminal, and it is the last item.
pub(crate) fn one_terminal_last(items: &[Annotated<Chunk>]) -> &Annotated<Chunk> {
    let terminals = items.iter().filter(|i| i.is_terminal()).count();
    assert_eq!(terminals, 1, "rule 6: exactly one terminal in {items:?}");
    let last = items.last().unwrap();
    assert!(
        last.is_terminal(),
        "rule 6: the terminal is last in {items:?}"
    );
    last
}

pub(crate) fn reason(item: &Annotated<Chunk>) -> Option<FinishReason> {
    item.data.as_ref().and_then(|c| c.finish_reason.clone())
}
