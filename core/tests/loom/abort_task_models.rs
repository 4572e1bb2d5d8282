//! The adapter's abort task (one per adapter, parked between aborts): aborts queued
//! from several threads while it parks, and the adapter going away while an abort is
//! queued. Its waker is the runtime's flagging waker and the models poll only woken
//! tasks ([`LoomRuntime::run_woken`]), so a lost wake-up leaves an abort never entered,
//! which the models catch.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use loom::future::block_on;
use loom::thread;
use tether_core::engine::BoxFuture;
use tether_core::sync::Arc;
use tether_core::{
    Adapter, AdapterConfig, Chunk, ChunkStream, Context, EngineConfig, EngineError,
    GenerateContext, LlmEngine, Request, ResponseStream,
};

use crate::runtime::LoomRuntime;
use crate::{model, std_lock, Seen, StdArc, StdMutex};

/// An engine whose streams never yield (the requests stay live until cancelled) and
/// that notes every abort it is asked for, by request id.
#[derive(Default)]
struct Silent {
    aborts: Aborted,
}

/// The ids of the requests whose abort the engine entered.
type Aborted = StdArc<StdMutex<Vec<String>>>;

struct Never;

impl futures_core::Stream for Never {
    type Item = Result<Chunk, EngineError>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        Poll::Pending
    }
}

impl LlmEngine for Silent {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move { Ok(EngineConfig::new("loom", worker_id)) })
    }

    fn generate(
        &self,
        _request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        drop(context);
        Box::pin(async { Ok(Box::pin(Never) as ChunkStream) })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        std_lock(&self.aborts).push(context.request_id().to_owned());
        Box::pin(async {})
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

/// An adapter over [`Silent`] on the loom runtime (no grace: a stop spawns nothing but
/// the abort task).
fn rig() -> (Adapter, LoomRuntime, Aborted) {
    let rt = LoomRuntime::new();
    let engine = Silent::default();
    let aborts = engine.aborts.clone();
    let llm: StdArc<dyn LlmEngine> = StdArc::new(engine);
    let config = AdapterConfig::default()
        .cancel_grace(None)
        .first_token_timeout(None)
        .inter_token_timeout(None)
        .spans(false);
    let adapter = Adapter::new(Arc::from_std(llm), rt.clone(), config);
    (adapter, rt, aborts)
}

fn start(adapter: &Adapter, id: &str) -> (ResponseStream, Context) {
    let ctx = Context::new(id);
    let request = Request::new(id, "loom", vec![1]);
    let stream = block_on(adapter.generate(request, ctx.clone())).expect("generate succeeds");
    (stream, ctx)
}

/// The sorted ids the engine was asked to abort.
fn aborted(aborts: &Aborted) -> Vec<String> {
    let mut ids = std_lock(aborts).clone();
    ids.sort();
    ids
}

/// Two requests of one adapter are stopped on two threads. The first abort starts the
/// abort task (polled inline by the runtime); the second is queued while the task runs,
/// parks or is parked. Either way each request's abort is entered exactly once, by one
/// task, and the task ends once the adapter and its requests are gone.
#[test]
fn stops_race_the_abort_task_parking() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let (adapter, rt, engine) = rig();
        let (a, ctx_a) = start(&adapter, "a");
        let (b, ctx_b) = start(&adapter, "b");
        let stopper = thread::spawn(move || ctx_a.stop());
        ctx_b.stop();
        // What the thread that did not start the task saw of it at this point.
        let entered_before_join = aborted(&engine).len();
        stopper.join().unwrap();
        // The executor's turns: only a task that was woken is polled.
        rt.run_woken();
        assert_eq!(aborted(&engine), ["a", "b"], "each abort entered once");
        assert_eq!(rt.spawns(), 1, "one abort task for both");
        assert_eq!(adapter.unfinished_aborts(), 0);
        reached.saw(format!("entered before join: {entered_before_join}"));
        drop((a, b));
        drop(adapter);
        rt.run_woken();
        assert_eq!(rt.pending(), 0, "the abort task ends with its adapter");
        rt.shutdown();
    });
    seen.expect(&["entered before join: 1", "entered before join: 2"]);
}

/// The last handles on the adapter (its request's stream, the adapter itself) are
/// dropped while a stop on another thread queues the abort. The queued abort holds the
/// request, so the task carries it out before it can end; a drop that wins ends the
/// request first (rule 4 aborts it then). One abort either way, and no task is left.
#[test]
fn adapter_drop_races_a_queued_abort() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let (adapter, rt, engine) = rig();
        let (stream, ctx) = start(&adapter, "a");
        let stopper = thread::spawn(move || ctx.stop());
        drop(stream);
        drop(adapter);
        stopper.join().unwrap();
        rt.run_woken();
        assert_eq!(aborted(&engine), ["a"], "one abort, entered");
        assert_eq!(rt.spawns(), 1, "the abort task");
        assert_eq!(rt.pending(), 0, "the abort task ended with its adapter");
        reached.saw("done");
        rt.shutdown();
    });
    seen.expect(&["done"]);
}
