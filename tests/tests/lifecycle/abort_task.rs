//! The adapter's abort task: one per adapter, started at its first abort and parked
//! between aborts, so a stop spawns nothing once it runs; an abort that does not finish
//! at once (or panics) never holds up the next; the task ends with the adapter.

use std::sync::{Arc, Mutex};

use tether_core::engine::BoxFuture;
use tether_core::{
    Adapter, AdapterConfig, ChunkStream, EngineConfig, EngineError, FinishReason, GenerateContext,
    LlmEngine, Outcome, Request,
};
use tether_tests::{guarded, yield_now, Harness, ScenarioRuntime};

use crate::{terminal, tokens};

/// No cancel grace: a stop needs no watchdog, so the abort task is the only task.
fn no_grace() -> AdapterConfig {
    AdapterConfig::default().cancel_grace(None)
}

pub(crate) async fn the_abort_task_is_started_once_for_every_stop<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, no_grace());
    assert_eq!(h.adapter.background_tasks(), 0);
    let (mut a, script_a, ctx_a) = h.start("a").await;
    let (mut b, script_b, ctx_b) = h.start("b").await;
    ctx_a.stop();
    h.wait_aborts(&script_a, 1).await;
    assert_eq!((h.counting.spawned(), h.adapter.background_tasks()), (1, 1));
    ctx_b.stop();
    h.wait_aborts(&script_b, 1).await;
    // The second stop woke the parked task: nothing spawned.
    assert_eq!((h.counting.spawned(), h.counting.live()), (1, 1));
    for (s, script) in [(&mut a, &script_a), (&mut b, &script_b)] {
        script.terminal(FinishReason::Cancelled);
        assert_eq!(h.collect(s).await, vec![terminal(FinishReason::Cancelled)]);
    }
    assert_eq!((script_a.aborts(), script_b.aborts()), (1, 1));
    h.assert_clean().await;
}

/// Stops queued faster than the task runs (more than it takes in one poll) are all
/// carried out, each once, by the one task.
pub(crate) async fn a_burst_of_stops_is_carried_out_by_the_one_task<R: ScenarioRuntime>(rt: R) {
    const N: usize = 150;
    let h = Harness::with_config(rt, no_grace());
    let mut started = Vec::new();
    for i in 0..N {
        started.push(h.start(&format!("r{i}")).await);
    }
    for (_, _, ctx) in &started {
        ctx.stop();
    }
    for (mut s, script, _) in started {
        h.wait_aborts(&script, 1).await;
        script.terminal(FinishReason::Cancelled);
        assert_eq!(
            h.collect(&mut s).await,
            vec![terminal(FinishReason::Cancelled)]
        );
        assert_eq!(script.aborts(), 1);
    }
    assert_eq!(h.counting.spawned(), 1);
    assert_eq!(h.engine.total_aborts() as usize, N);
    h.assert_clean().await;
}

/// An abort that stays pending in the engine moves to a task of its own: the next
/// request's abort is entered while the first is still held.
pub(crate) async fn a_pending_abort_does_not_hold_up_the_next<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, no_grace());
    let (mut a, script_a, ctx_a) = h.start("a").await;
    let (mut b, script_b, ctx_b) = h.start("b").await;
    script_a.hold_abort();
    ctx_a.stop();
    h.wait_aborts(&script_a, 1).await;
    ctx_b.stop();
    h.wait_aborts(&script_b, 1).await;
    // The abort task, and the held abort's own task (still in the engine).
    assert_eq!((h.counting.spawned(), h.counting.live()), (2, 2));
    script_a.release_abort();
    for (s, script) in [(&mut a, &script_a), (&mut b, &script_b)] {
        script.terminal(FinishReason::Cancelled);
        assert_eq!(h.collect(s).await, vec![terminal(FinishReason::Cancelled)]);
    }
    h.assert_clean().await;
    assert_eq!(h.counting.live(), 1, "the held abort's task ended");
}

/// A panic in one request's abort is caught in the abort task, which goes on to
/// carry out the next abort.
pub(crate) async fn an_abort_panic_leaves_the_abort_task_running<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, no_grace());
    let (mut a, script_a, ctx_a) = h.start("a").await;
    let (mut b, script_b, ctx_b) = h.start("b").await;
    script_a.tokens(&[1]).panic_in_abort("abort boom");
    assert_eq!(h.next(&mut a).await, Some(tokens(&[1])));
    ctx_a.stop();
    h.wait_aborts(&script_a, 1).await;
    ctx_b.stop();
    h.wait_aborts(&script_b, 1).await;
    assert_eq!((h.counting.spawned(), h.counting.live()), (1, 1));
    script_a.terminal(FinishReason::Cancelled);
    script_b.terminal(FinishReason::Cancelled);
    assert_eq!(
        h.collect(&mut a).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert_eq!(
        h.collect(&mut b).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert_eq!(h.observer.record("b").outcome, Outcome::Cancelled);
    h.assert_clean().await;
}

/// Once the adapter and its last request are gone, its abort task ends: nothing of
/// the adapter stays on the runtime.
pub(crate) async fn the_abort_task_ends_with_its_adapter<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, no_grace());
    // A second adapter on the same engine and counted runtime, which the test can drop.
    let adapter = Adapter::new(Arc::new(h.engine.clone()), h.counting.clone(), no_grace());
    let (stream, script, ctx) = h.start_on(&adapter, "r").await;
    ctx.stop();
    h.wait_aborts_on(&adapter, &script, 1).await;
    assert_eq!((adapter.background_tasks(), h.counting.live()), (1, 1));
    drop(adapter);
    // The stream still holds the adapter: the task stays parked.
    assert_eq!(h.counting.live(), 1);
    drop(stream);
    guarded(&h.rt, "the abort task to end", h.counting.until_idle()).await;
    assert_eq!((h.counting.spawned(), h.counting.live()), (1, 0));
    assert_eq!(script.aborts(), 1);
}

/// The engine of [`aborts_not_yet_carried_out_are_counted`]: the script engine, plus a
/// look at the adapter's `unfinished_aborts()` from inside each `abort`.
struct Peeking {
    inner: tether_tests::ScriptEngine,
    adapter: Mutex<Option<Adapter>>,
    seen: Mutex<Vec<usize>>,
}

impl LlmEngine for Peeking {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        self.inner.start(worker_id)
    }
    fn generate(
        &self,
        request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        self.inner.generate(request, context)
    }
    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        let adapter = self.adapter.lock().unwrap();
        if let Some(adapter) = adapter.as_ref() {
            self.seen.lock().unwrap().push(adapter.unfinished_aborts());
        }
        self.inner.abort(context)
    }
    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        self.inner.cleanup()
    }
}

/// `Adapter::unfinished_aborts` counts the aborts queued and the one being carried out:
/// seen from inside each engine `abort` of three stops made before the task ran, 3,
/// then 2, then 1 (on tokio's single thread; smol's task may run beside the stops), and
/// 0 once all were carried out.
pub(crate) async fn aborts_not_yet_carried_out_are_counted<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, no_grace());
    let engine = Arc::new(Peeking {
        inner: h.engine.clone(),
        adapter: Mutex::new(None),
        seen: Mutex::new(Vec::new()),
    });
    let adapter = Adapter::new(engine.clone(), h.counting.clone(), no_grace());
    *engine.adapter.lock().unwrap() = Some(adapter.clone());
    let mut started = Vec::new();
    for id in ["a", "b", "c"] {
        started.push(h.start_on(&adapter, id).await);
    }
    assert_eq!(adapter.unfinished_aborts(), 0);
    for (_, _, ctx) in &started {
        ctx.stop();
    }
    if h.rt.exact_clock() {
        assert_eq!(
            adapter.unfinished_aborts(),
            3,
            "queued, the task not run yet"
        );
    }
    for (_, script, _) in &started {
        h.wait_aborts_on(&adapter, script, 1).await;
    }
    guarded(&h.rt, "the abort task to be done", async {
        while adapter.unfinished_aborts() > 0 {
            yield_now().await;
        }
    })
    .await;
    let seen = engine.seen.lock().unwrap().clone();
    if h.rt.exact_clock() {
        assert_eq!(seen, [3, 2, 1]);
    } else {
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|n| (1..=3).contains(n)), "{seen:?}");
    }
    // Let go of the cycle (the engine held its adapter) and of the requests.
    engine.adapter.lock().unwrap().take();
    drop(started);
    drop(adapter);
    guarded(&h.rt, "the abort task to end", h.counting.until_idle()).await;
}
