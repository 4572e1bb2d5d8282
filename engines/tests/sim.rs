//! SimEngine behaviour, every scenario on tokio (paused clock) and on smol.

mod common;

use std::future::poll_fn;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tether_core::{
    AdapterConfig, BackendError, ChunkStream, Context, ErrorKind, FinishReason, LlmEngine, Outcome,
    Request, Runtime, SupportedParams, Usage,
};
use tether_engines::{AbortReceipt, Chaos, SimConfig, SimEngine, SimGauges};

use common::{
    assert_one_record, collect, gctx, kill_ends_with_cancelled, observed_adapter, on_both, smol_rt,
    terminal, tokens, tokio_rt, until, Rt,
};

on_both!(
    deterministic_tokens,
    request_seed_is_honoured_and_declared,
    default_max_tokens_is_16,
    max_tokens_zero_ends_at_once,
    stop_token_ends_with_stop,
    eos_token_ends_with_eos_unless_ignored,
    echo_annotation_repeats_the_prompt,
    queues_when_slots_are_full,
    queues_when_kv_blocks_are_full,
    abort_frees_slot_and_blocks,
    abort_of_queued_request_frees_its_place,
    late_and_unknown_aborts_are_counted,
    abort_after_end_read_while_cancelling_is_not_late,
    dropped_stream_frees_its_sequence,
    chaos_error_ends_with_typed_error,
    chaos_hang_holds_slot_until_abort,
    chaos_panic_panics_in_poll_next,
    invalid_requests_are_setup_errors,
    cleanup_ends_live_streams,
    one_scheduler_task_per_engine,
    kill_through_adapter_aborts_once,
    drop_through_adapter_frees_everything,
    passes_conformance_kit,
);

/// Fast, exact time model: every step costs 1 ms.
fn config() -> SimConfig {
    SimConfig {
        decode_step_cost: Duration::from_millis(1),
        prefill_cost_per_token: Duration::ZERO,
        batch_cost_per_sequence: Duration::ZERO,
        ..SimConfig::default()
    }
}

async fn started(cfg: SimConfig, rt: Rt) -> Arc<SimEngine> {
    let engine = Arc::new(SimEngine::new(cfg, rt));
    engine.start(7).await.unwrap();
    engine
}

fn req(id: &str, prompt: &[u32], max_tokens: u32) -> Request {
    Request::new(id, "sim", prompt.to_vec()).with_max_tokens(max_tokens)
}

async fn gen(engine: &SimEngine, request: Request) -> ChunkStream {
    let id = request.id.clone();
    engine.generate(request, gctx(&id)).await.unwrap()
}

fn idle(g: SimGauges) {
    assert_eq!(
        (g.live_slots, g.kv_blocks_used, g.queue_len, g.hung),
        (0, 0, 0, 0),
        "{g:?}"
    );
}

async fn deterministic_tokens(rt: Rt) {
    let engine = started(config(), rt.clone()).await;
    let a = collect(gen(&engine, req("a", &[1, 2, 3], 8)).await).await;
    let b = collect(gen(&engine, req("b", &[1, 2, 3], 8)).await).await;
    let c = collect(gen(&engine, req("c", &[1, 2, 4], 8)).await).await;
    assert_eq!(tokens(&a).len(), 8);
    assert_eq!(tokens(&a), tokens(&b), "same seed and prompt, same tokens");
    assert_ne!(tokens(&a), tokens(&c), "another prompt, other tokens");
    assert!(a
        .iter()
        .take(8)
        .all(|i| i.as_ref().unwrap().token_ids.len() == 1));
    let end = terminal(&a);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    assert_eq!(end.usage, Some(Usage::new(3, 8)));
    let other_seed = started(
        SimConfig {
            seed: 9,
            ..config()
        },
        rt.clone(),
    )
    .await;
    let d = collect(gen(&other_seed, req("d", &[1, 2, 3], 8)).await).await;
    assert_ne!(tokens(&a), tokens(&d), "another seed, other tokens");
    let same_seed = started(config(), rt).await;
    let e = collect(gen(&same_seed, req("e", &[1, 2, 3], 8)).await).await;
    assert_eq!(
        tokens(&a),
        tokens(&e),
        "another engine, same seed: same tokens"
    );
    idle(engine.gauges());
    assert_eq!(engine.gauges().lingering, 0);
}

async fn request_seed_is_honoured_and_declared(rt: Rt) {
    let engine = Arc::new(SimEngine::new(config(), rt));
    let declared = engine.start(7).await.unwrap().supported;
    assert_eq!(
        declared,
        SupportedParams::NONE
            .with_seed(true)
            .with_min_tokens(true)
            .with_ignore_eos(true)
    );
    let seeded = |id: &str, seed: Option<u64>| {
        let mut r = req(id, &[1, 2, 3], 8);
        r.sampling.seed = seed;
        r
    };
    let run = |r: Request| {
        let engine = engine.clone();
        async move { tokens(&collect(gen(&engine, r).await).await) }
    };
    let unseeded = run(seeded("a", None)).await;
    let five = run(seeded("b", Some(5))).await;
    assert_eq!(
        run(seeded("c", Some(5))).await,
        five,
        "same seed, same tokens"
    );
    assert_ne!(five, unseeded, "a seed changes the tokens");
    assert_ne!(
        run(seeded("d", Some(6))).await,
        five,
        "another seed, other tokens"
    );
    assert_eq!(run(seeded("e", None)).await, unseeded);
}

async fn default_max_tokens_is_16(rt: Rt) {
    let engine = started(config(), rt).await;
    let items = collect(gen(&engine, Request::new("a", "sim", vec![5])).await).await;
    assert_eq!(tokens(&items).len(), 16);
    assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Length));
}

async fn max_tokens_zero_ends_at_once(rt: Rt) {
    let engine = started(config(), rt.clone()).await;
    let t0 = rt.now();
    let items = collect(gen(&engine, req("z", &[1, 2], 0)).await).await;
    assert_eq!(items.len(), 1, "{items:?}");
    let end = terminal(&items);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    assert_eq!(end.usage, Some(Usage::new(2, 0)));
    assert!(rt.now() - t0 < Duration::from_millis(500));
    idle(engine.gauges());
    assert_eq!(engine.gauges().lingering, 0);
}

async fn stop_token_ends_with_stop(rt: Rt) {
    let engine = started(config(), rt).await;
    let all = tokens(&collect(gen(&engine, req("a", &[4, 5], 16)).await).await);
    let stop = all[3];
    let first = all.iter().position(|&t| t == stop).unwrap();
    let mut r = req("b", &[4, 5], 16);
    r.stop.stop_token_ids = vec![stop];
    let items = collect(gen(&engine, r).await).await;
    assert_eq!(tokens(&items), all[..=first].to_vec());
    let end = terminal(&items);
    assert_eq!(end.finish_reason, Some(FinishReason::Stop));
    assert_eq!(end.usage.unwrap().completion_tokens as usize, first + 1);
    // min_tokens holds a stop token back.
    let mut r = req("c", &[4, 5], 16);
    r.stop.stop_token_ids = vec![all[0]];
    r.stop.min_tokens = Some(2);
    let items = collect(gen(&engine, r).await).await;
    assert!(tokens(&items).len() >= 2);
}

async fn eos_token_ends_with_eos_unless_ignored(rt: Rt) {
    let engine = started(config(), rt).await;
    let all = tokens(&collect(gen(&engine, req("a", &[9], 16)).await).await);
    let first = all.iter().position(|&t| t == all[2]).unwrap();
    let mut r = req("b", &[9], 16);
    r.eos_token_ids = vec![all[2]];
    let items = collect(gen(&engine, r.clone()).await).await;
    assert_eq!(tokens(&items).len(), first + 1);
    assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Eos));
    r.stop.ignore_eos = true;
    let items = collect(gen(&engine, r).await).await;
    assert_eq!(tokens(&items), all);
    assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Length));
}

async fn echo_annotation_repeats_the_prompt(rt: Rt) {
    let engine = started(config(), rt).await;
    // Byte tokens above the vocabulary come back as they went in.
    let mut r = req("a", &[200, 7, 3000], 7);
    r.annotations
        .push(tether_engines::sim::ECHO_ANNOTATION.to_owned());
    let items = collect(gen(&engine, r).await).await;
    assert_eq!(tokens(&items), [200, 7, 3000, 200, 7, 3000, 200]);
    assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Length));
    // Stop tokens still apply.
    let mut r = req("b", &[1, 2, 3], 7);
    r.annotations
        .push(tether_engines::sim::ECHO_ANNOTATION.to_owned());
    r.stop.stop_token_ids = vec![3];
    let items = collect(gen(&engine, r).await).await;
    assert_eq!(tokens(&items), [1, 2, 3]);
    assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Stop));
}

/// A 2-slot engine, the time, and 5 requests of 4 tokens sent to it at that time.
async fn five_requests_for_two_slots(rt: &Rt) -> (Arc<SimEngine>, Instant, Vec<ChunkStream>) {
    let cfg = SimConfig {
        max_sequences: 2,
        ..config()
    };
    let engine = started(cfg, rt.clone()).await;
    let t0 = rt.now();
    let mut streams = Vec::new();
    for i in 0..5 {
        streams.push(gen(&engine, req(&format!("q{i}"), &[i + 1], 4)).await);
    }
    (engine, t0, streams)
}

async fn queues_when_slots_are_full(rt: Rt) {
    let (engine, t0, streams) = five_requests_for_two_slots(&rt).await;
    let mut max_live = 0;
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut items = Vec::new();
        while let Some(item) = s.next().await {
            items.push(item);
            max_live = max_live.max(engine.live_slots());
        }
        assert_eq!(tokens(&items).len(), 4, "request {i}");
        assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Length));
    }
    assert!(max_live <= 2, "{max_live}");
    // Three waves of 4 steps of 1 ms: without queueing it would take 4 ms.
    assert!(rt.now() - t0 >= Duration::from_millis(12));
    idle(engine.gauges());
    assert_eq!(engine.gauges().accepted, 5);
}

/// On a paused clock the batch is observable step by step.
#[tokio::test(start_paused = true)]
async fn queue_gauges_are_exact_on_a_paused_clock() {
    let rt = tokio_rt();
    let (engine, t0, mut streams) = five_requests_for_two_slots(&rt).await;
    assert_eq!(
        engine.queue_len(),
        5,
        "admission happens at step boundaries"
    );
    streams[0].next().await.unwrap().unwrap();
    assert_eq!(rt.now() - t0, Duration::from_millis(1));
    let g = engine.gauges();
    assert_eq!(
        (g.live_slots, g.queue_len, g.kv_blocks_used),
        (2, 3, 2),
        "{g:?}"
    );
    let last = streams.pop().unwrap();
    let items = collect(last).await;
    assert_eq!(tokens(&items).len(), 4);
    // Request 4 runs in the third wave: steps 9 to 12.
    assert_eq!(rt.now() - t0, Duration::from_millis(12));
    let g = engine.gauges();
    assert_eq!(
        (g.live_slots, g.queue_len, g.kv_blocks_used),
        (0, 0, 0),
        "{g:?}"
    );
}

async fn queues_when_kv_blocks_are_full(rt: Rt) {
    // Prompt 8 + 1000 tokens = 63 blocks of 16; the pool has 100: one at a time.
    let cfg = SimConfig {
        kv_blocks: 100,
        ..config()
    };
    let engine = started(cfg, rt).await;
    let mut a = gen(&engine, req("a", &[1; 8], 1000)).await;
    let mut b = gen(&engine, req("b", &[2; 8], 1000)).await;
    a.next().await.unwrap().unwrap();
    let g = engine.gauges();
    assert_eq!((g.live_slots, g.kv_blocks_used, g.queue_len), (1, 63, 1));
    drop(a);
    let first_b = b.next().await.unwrap().unwrap();
    assert!(first_b.has_tokens(), "b runs once a's blocks are free");
    assert_eq!(engine.kv_blocks_used(), 63);
    drop(b);
    idle(engine.gauges());
}

async fn abort_frees_slot_and_blocks(rt: Rt) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let engine = Arc::new(
        SimEngine::new(config(), rt).with_abort_hook(Arc::new(move |id, r| {
            log.lock().unwrap().push((id.to_owned(), r));
        })),
    );
    engine.start(0).await.unwrap();
    let g = gctx("x");
    let mut s = engine
        .generate(req("x", &[1, 2, 3], 1000), g.clone())
        .await
        .unwrap();
    let t1 = s.next().await.unwrap().unwrap();
    let t2 = s.next().await.unwrap().unwrap();
    assert!(t1.has_tokens() && t2.has_tokens());
    assert_eq!(engine.live_slots(), 1);
    assert_eq!(engine.kv_blocks_used(), 63, "ceil(1003 / 16)");
    engine.abort(g).await;
    idle(engine.gauges());
    let rest = collect(s).await;
    let end = terminal(&rest);
    assert_eq!(end.finish_reason, Some(FinishReason::Cancelled));
    let usage = end.usage.unwrap();
    assert_eq!(usage.prompt_tokens, 3);
    assert_eq!(usage.completion_tokens as usize, 2 + tokens(&rest).len());
    let g = engine.gauges();
    assert_eq!((g.aborts_received, g.late_aborts, g.lingering), (1, 0, 0));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![("x".to_owned(), AbortReceipt::Live)]
    );
}

async fn abort_of_queued_request_frees_its_place(rt: Rt) {
    let cfg = SimConfig {
        max_sequences: 1,
        ..config()
    };
    let engine = started(cfg, rt).await;
    let mut a = gen(&engine, req("a", &[1], 1000)).await;
    let g = gctx("b");
    let b = engine
        .generate(req("b", &[2], 1000), g.clone())
        .await
        .unwrap();
    a.next().await.unwrap().unwrap();
    assert_eq!(engine.queue_len(), 1);
    engine.abort(g).await;
    assert_eq!(engine.queue_len(), 0);
    let items = collect(b).await;
    assert_eq!(items.len(), 1);
    let end = terminal(&items);
    assert_eq!(end.finish_reason, Some(FinishReason::Cancelled));
    assert_eq!(end.usage.unwrap().completion_tokens, 0);
    drop(a);
    idle(engine.gauges());
    assert_eq!(engine.gauges().late_aborts, 0);
}

async fn late_and_unknown_aborts_are_counted(rt: Rt) {
    let engine = started(config(), rt).await;
    let g = gctx("a");
    let s = engine.generate(req("a", &[1], 3), g.clone()).await.unwrap();
    let items = collect(s).await;
    assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Length));
    // Its end was read while nobody cancelled it: no abort may follow.
    engine.abort(g.clone()).await;
    engine.abort(gctx("never-generated")).await;
    let gs = engine.gauges();
    assert_eq!((gs.aborts_received, gs.late_aborts), (2, 2));
    // A second abort of an aborted request is late too.
    let g = gctx("b");
    let _s = engine
        .generate(req("b", &[1], 1000), g.clone())
        .await
        .unwrap();
    engine.abort(g.clone()).await;
    engine.abort(g).await;
    let gs = engine.gauges();
    assert_eq!((gs.aborts_received, gs.late_aborts), (4, 3));
    idle(gs);
}

async fn abort_after_end_read_while_cancelling_is_not_late(rt: Rt) {
    let engine = started(config(), rt).await;
    let g = gctx("a");
    let mut s = engine.generate(req("a", &[1], 2), g.clone()).await.unwrap();
    s.next().await.unwrap().unwrap();
    // The consumer stops; tether decides to abort, the abort task runs later, after
    // the engine's own terminal was read.
    g.context().stop();
    let rest = collect(s).await;
    assert_eq!(terminal(&rest).finish_reason, Some(FinishReason::Length));
    assert_eq!(engine.gauges().lingering, 1);
    engine.abort(g).await;
    let gs = engine.gauges();
    assert_eq!(
        (gs.aborts_received, gs.late_aborts, gs.lingering),
        (1, 0, 0)
    );
}

async fn dropped_stream_frees_its_sequence(rt: Rt) {
    let engine = started(config(), rt).await;
    let g = gctx("a");
    let mut s = engine
        .generate(req("a", &[1; 40], 1000), g.clone())
        .await
        .unwrap();
    s.next().await.unwrap().unwrap();
    assert_eq!(engine.kv_blocks_used(), 65, "ceil(1040 / 16)");
    drop(s);
    idle(engine.gauges());
    assert_eq!(engine.gauges().lingering, 1, "an abort may still come");
    engine.abort(g).await;
    let gs = engine.gauges();
    assert_eq!((gs.late_aborts, gs.lingering), (0, 0));
    // Dropped while queued.
    let s = gen(&engine, req("b", &[1], 5)).await;
    assert_eq!(engine.queue_len(), 1);
    drop(s);
    idle(engine.gauges());
}

async fn chaos_error_ends_with_typed_error(rt: Rt) {
    let engine = started(config(), rt).await;
    let mut r = req("e", &[1], 10);
    r.annotations.push(Chaos::Error(2).annotation());
    let items = collect(gen(&engine, r).await).await;
    assert_eq!(items.len(), 3, "{items:?}");
    assert_eq!(tokens(&items).len(), 2);
    let err = items[2].as_ref().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend(BackendError::Unknown));
    assert!(err.message().contains("injected"), "{err}");
    idle(engine.gauges());
    assert_eq!(engine.gauges().lingering, 0);
}

async fn chaos_hang_holds_slot_until_abort(rt: Rt) {
    let engine = started(config(), rt.clone()).await;
    let mut r = req("h", &[1], 10);
    r.annotations.push("chaos:hang@1".to_owned());
    let g = gctx("h");
    let mut s = engine.generate(r, g.clone()).await.unwrap();
    assert!(s.next().await.unwrap().unwrap().has_tokens());
    // Nothing more comes while we wait (30 ms: real on smol, paused on tokio).
    let mut timer = rt.sleep_until(rt.now() + Duration::from_millis(30));
    let hung = poll_fn(|cx| match s.as_mut().poll_next(cx) {
        Poll::Ready(item) => Poll::Ready(Some(item)),
        Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
    })
    .await;
    assert!(hung.is_none(), "a hung stream yields nothing: {hung:?}");
    let gs = engine.gauges();
    assert_eq!((gs.live_slots, gs.hung), (1, 1));
    engine.abort(g).await;
    let rest = collect(s).await;
    let end = terminal(&rest);
    assert_eq!(end.finish_reason, Some(FinishReason::Cancelled));
    assert_eq!(end.usage.unwrap().completion_tokens, 1);
    idle(engine.gauges());
}

async fn chaos_panic_panics_in_poll_next(rt: Rt) {
    let engine = started(config(), rt).await;
    let mut r = req("p", &[1], 10);
    r.annotations.push("chaos:panic@1".to_owned());
    let mut s = gen(&engine, r).await;
    assert!(s.next().await.unwrap().unwrap().has_tokens());
    // Wait until the second token is in the channel, then poll it by hand.
    let panicked =
        poll_fn(
            |cx| match catch_unwind(AssertUnwindSafe(|| s.as_mut().poll_next(cx))) {
                Ok(Poll::Pending) => Poll::Pending,
                Ok(Poll::Ready(item)) => panic!("expected a panic, got {item:?}"),
                Err(payload) => Poll::Ready(payload),
            },
        )
        .await;
    let msg = tether_core::error::panic_message(&*panicked);
    assert!(tether_engines::sim::is_chaos_panic(msg), "{msg}");
    drop(s);
    idle(engine.gauges());
    assert_eq!(engine.gauges().lingering, 0, "a panic is an end tether saw");
}

async fn invalid_requests_are_setup_errors(rt: Rt) {
    let unstarted = SimEngine::new(config(), rt.clone());
    let err = unstarted
        .generate(req("a", &[1], 1), gctx("a"))
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    unstarted.cleanup().await.unwrap();

    let bad = SimEngine::new(
        SimConfig {
            max_sequences: 0,
            ..config()
        },
        rt.clone(),
    );
    let err = bad.start(0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("max_sequences"), "{err}");
    let bad = SimEngine::new(
        SimConfig {
            model: String::new(),
            ..config()
        },
        rt.clone(),
    );
    assert_eq!(
        bad.start(0).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    let engine = started(
        SimConfig {
            kv_blocks: 4,
            ..config()
        },
        rt,
    )
    .await;
    let cases = [
        req("empty", &[], 4),
        {
            let mut r = req("chaos", &[1], 4);
            r.annotations.push("chaos:explode".to_owned());
            r
        },
        req("too-long", &[1; 60], 10),
    ];
    for r in cases {
        let id = r.id.clone();
        let err = engine.generate(r, gctx(&id)).await.err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{id}: {err}");
    }
    assert_eq!(engine.gauges().accepted, 0);
}

async fn cleanup_ends_live_streams(rt: Rt) {
    let engine = started(config(), rt.clone()).await;
    assert!(engine.is_running());
    let mut s = gen(&engine, req("a", &[1], 1000)).await;
    s.next().await.unwrap().unwrap();
    engine.cleanup().await.unwrap();
    engine.cleanup().await.unwrap();
    assert!(!engine.is_started() && !engine.is_running());
    idle(engine.gauges());
    let rest = collect(s).await;
    let err = rest.last().unwrap().as_ref().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend(BackendError::EngineShutdown));
    // It starts again after a cleanup.
    engine.start(1).await.unwrap();
    assert!(engine.is_running());
    let items = collect(gen(&engine, req("b", &[1], 3)).await).await;
    assert_eq!(terminal(&items).finish_reason, Some(FinishReason::Length));
}

/// A runtime that drops every task it is given, as a runtime shutting down does (and
/// as tokio does with a task that panicked); its clock is tokio's.
#[derive(Debug)]
struct DropsTasks(Rt);

impl Runtime for DropsTasks {
    fn spawn(&self, future: tether_core::drive::SpawnFuture) {
        drop(future);
    }
    fn sleep_until(&self, deadline: Instant) -> std::pin::Pin<Box<dyn tether_core::AsyncTimer>> {
        self.0.sleep_until(deadline)
    }
    fn now(&self) -> Instant {
        self.0.now()
    }
}

#[tokio::test]
async fn a_scheduler_its_runtime_dropped_is_not_running() {
    let engine = SimEngine::new(config(), DropsTasks(tokio_rt()));
    engine.start(0).await.unwrap();
    // Started, but nothing will ever step its batch: not running.
    assert!(engine.is_started());
    assert!(!engine.is_running());
}

async fn one_scheduler_task_per_engine(rt: Rt) {
    let make = |counting| SimEngine::new(config(), counting);
    common::one_scheduler_task_per_engine(rt, make, "sim", 20).await;
}

async fn kill_through_adapter_aborts_once(rt: Rt) {
    let engine = started(config(), rt.clone()).await;
    let (adapter, records) = observed_adapter(engine.clone(), &rt);
    let ctx = Context::new("k");
    let mut s = adapter
        .generate(req("k", &[1, 2], 1000), ctx.clone())
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(s.next().await.unwrap().data.unwrap().has_tokens());
    }
    kill_ends_with_cancelled(&ctx, &mut s).await;
    until(&rt, || engine.gauges().aborts_received == 1).await;
    let gs = engine.gauges();
    idle(gs);
    assert_eq!((gs.late_aborts, records.1.load(Ordering::SeqCst)), (0, 1));
    assert_one_record(&records, &Outcome::Cancelled, 3);
}

async fn drop_through_adapter_frees_everything(rt: Rt) {
    let engine = started(config(), rt.clone()).await;
    let adapter = tether_core::Adapter::new(engine.clone(), rt.clone(), AdapterConfig::default());
    let mut streams = Vec::new();
    for i in 0..10 {
        let id = format!("d{i}");
        let mut s = adapter
            .generate(req(&id, &[i], 1000), Context::new(id))
            .await
            .unwrap();
        s.next().await.unwrap();
        streams.push(s);
    }
    assert_eq!(engine.live_slots(), 10);
    drop(streams);
    idle(engine.gauges());
    until(&rt, || engine.gauges().aborts_received == 10).await;
    let gs = engine.gauges();
    assert_eq!((gs.late_aborts, gs.lingering), (0, 0));
}

async fn passes_conformance_kit(rt: Rt) {
    let make_rt = rt.clone();
    let factory =
        move || -> Arc<dyn LlmEngine> { Arc::new(SimEngine::new(config(), make_rt.clone())) };
    let report = tether_core::conformance::run_conformance_on(&*rt, &factory)
        .await
        .unwrap_or_else(|f| panic!("not conformant: {f}"));
    assert_eq!(report.checks, tether_core::conformance::CHECKS);
    assert_eq!(report.model, "sim");
}

#[tokio::test(start_paused = true)]
async fn passes_conformance_through_the_tokio_shim() {
    let report = tether_tokio::run_conformance(|| -> Arc<dyn LlmEngine> {
        Arc::new(SimEngine::new(config(), tokio_rt()))
    })
    .await
    .unwrap_or_else(|f| panic!("not conformant: {f}"));
    assert_eq!(report.checks, tether_core::conformance::CHECKS);
}

#[test]
fn passes_conformance_through_the_smol_shim() {
    let report = smol::block_on(tether_smol::run_conformance(|| -> Arc<dyn LlmEngine> {
        Arc::new(SimEngine::new(config(), smol_rt()))
    }))
    .unwrap_or_else(|f| panic!("not conformant: {f}"));
    assert_eq!(report.checks, tether_core::conformance::CHECKS);
}
