//! TinyEngine behaviour, every scenario on tokio (paused clock) and on smol, plus the
//! conformance kit through both shims.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;
use tether_core::{
    AdapterConfig, BackendError, Chunk, ChunkStream, Context, ErrorKind, FinishReason, LlmEngine,
    Outcome, Request, Usage,
};
use tether_engines::tiny::{
    AbortHook, AbortReceipt, TinyConfig, TinyEngine, TinyGauges, TinyModel,
};

use common::tiny::{config, started, TETHER, TETHER_SEED0};
use common::{
    assert_one_record, collect, gctx, kill_ends_with_cancelled, observed_adapter, on_both, smol_rt,
    terminal, tokens, tokio_rt, until, Rt,
};

on_both!(
    deterministic_tokens_for_a_fixed_seed,
    default_max_tokens_is_16,
    max_tokens_is_honoured,
    max_tokens_zero_ends_at_once,
    stop_token_ends_with_stop,
    eos_token_ends_with_eos_unless_ignored,
    context_limit_ends_with_length,
    batching_does_not_change_tokens,
    chunked_prefill_does_not_change_tokens,
    queues_when_the_batch_is_full,
    abort_frees_sequence_and_kv_cache,
    abort_of_queued_request_ends_it_with_no_tokens,
    abort_of_unknown_or_ended_request_does_nothing,
    abort_hook_hears_every_abort,
    dropped_stream_frees_its_sequence,
    invalid_requests_are_setup_errors,
    cleanup_ends_live_streams_and_engine_restarts,
    one_scheduler_task_per_engine,
    kill_through_adapter_aborts_once,
    drop_through_adapter_frees_everything,
);

/// What the default model (seed 0) answers to `b"tether"`, greedily, 16 tokens.
const DEFAULT_TETHER: [u32; 16] = [
    107, 24, 161, 164, 194, 53, 232, 251, 203, 199, 157, 199, 139, 168, 90, 90,
];

fn req(id: &str, prompt: &[u32], max_tokens: u32) -> Request {
    Request::new(id, "tiny", prompt.to_vec()).with_max_tokens(max_tokens)
}

async fn gen(engine: &TinyEngine, request: Request) -> ChunkStream {
    let id = request.id.clone();
    engine.generate(request, gctx(&id)).await.unwrap()
}

fn usage(prompt: usize, completion: usize) -> Option<Usage> {
    Some(Usage::new(prompt as u32, completion as u32))
}

fn idle(g: TinyGauges) {
    assert_eq!(
        (g.live_sequences, g.queue_len, g.kv_bytes),
        (0, 0, 0),
        "{g:?}"
    );
}

/// Generate `request` alone and return its tokens and terminal.
async fn run(engine: &TinyEngine, request: Request) -> (Vec<u32>, Chunk) {
    let items = collect(gen(engine, request).await).await;
    (tokens(&items), terminal(&items).clone())
}

async fn deterministic_tokens_for_a_fixed_seed(rt: Rt) {
    let engine = started(TinyConfig::default(), rt.clone()).await;
    let (first, end) = run(&engine, req("a", &TETHER, 16)).await;
    assert_eq!(first, DEFAULT_TETHER);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    assert_eq!(end.usage, usage(6, 16));
    let (again, _) = run(&engine, req("b", &TETHER, 16)).await;
    assert_eq!(again, DEFAULT_TETHER);
    idle(engine.gauges());
    // The bare model agrees with the engine.
    let mut model = TinyModel::new(&TinyConfig::default()).unwrap();
    assert_eq!(model.greedy(&TETHER, 16).unwrap(), DEFAULT_TETHER);
    assert_eq!(model.kv_bytes(), 0);
    // So does the smaller model the other tests use.
    let small = started(config(), rt.clone()).await;
    assert_eq!(run(&small, req("s", &TETHER, 16)).await.0, TETHER_SEED0);
    let mut model = TinyModel::new(&config()).unwrap();
    assert_eq!(model.greedy(&TETHER, 16).unwrap(), TETHER_SEED0);
    // Another seed is another model.
    let other = started(
        TinyConfig {
            seed: 1,
            ..config()
        },
        rt,
    )
    .await;
    let (theirs, _) = run(&other, req("c", &TETHER, 16)).await;
    assert_ne!(theirs, TETHER_SEED0);
}

async fn default_max_tokens_is_16(rt: Rt) {
    let engine = started(config(), rt).await;
    let request = Request::new("d", "tiny", TETHER.to_vec());
    let (toks, end) = run(&engine, request).await;
    assert_eq!(toks, TETHER_SEED0);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
}

async fn max_tokens_is_honoured(rt: Rt) {
    let engine = started(config(), rt).await;
    for n in [1, 5, 40] {
        let (toks, end) = run(&engine, req("m", &TETHER, n)).await;
        assert_eq!(toks.len(), n as usize);
        assert_eq!(
            toks[..toks.len().min(16)],
            TETHER_SEED0[..toks.len().min(16)]
        );
        assert_eq!(end.finish_reason, Some(FinishReason::Length));
        assert_eq!(end.usage, usage(6, n as usize));
    }
    idle(engine.gauges());
}

async fn max_tokens_zero_ends_at_once(rt: Rt) {
    let engine = started(config(), rt).await;
    let items = collect(gen(&engine, req("z", &TETHER, 0)).await).await;
    assert_eq!(items.len(), 1);
    let end = terminal(&items);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    assert_eq!(end.usage, usage(6, 0));
    assert_eq!(engine.gauges().steps, 0);
}

async fn stop_token_ends_with_stop(rt: Rt) {
    let engine = started(config(), rt).await;
    let stop = TETHER_SEED0[3];
    let first = TETHER_SEED0.iter().position(|&t| t == stop).unwrap();
    let mut request = req("s", &TETHER, 16);
    request.stop.stop_token_ids = vec![stop];
    let (toks, end) = run(&engine, request.clone()).await;
    assert_eq!(toks, TETHER_SEED0[..=first]);
    assert_eq!(end.finish_reason, Some(FinishReason::Stop));
    assert_eq!(end.usage, usage(6, first + 1));
    // Not before min_tokens.
    request.stop.min_tokens = Some(first as u32 + 2);
    let (toks, _) = run(&engine, request).await;
    assert!(toks.len() > first + 1, "{toks:?}");
}

async fn eos_token_ends_with_eos_unless_ignored(rt: Rt) {
    let engine = started(config(), rt).await;
    let eos = TETHER_SEED0[2];
    let first = TETHER_SEED0.iter().position(|&t| t == eos).unwrap();
    let mut request = req("e", &TETHER, 16);
    request.eos_token_ids = vec![eos];
    let (toks, end) = run(&engine, request.clone()).await;
    assert_eq!(toks, TETHER_SEED0[..=first]);
    assert_eq!(end.finish_reason, Some(FinishReason::Eos));
    request.stop.ignore_eos = true;
    let (toks, end) = run(&engine, request).await;
    assert_eq!(toks, TETHER_SEED0);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
}

async fn context_limit_ends_with_length(rt: Rt) {
    let cfg = TinyConfig {
        max_context: 10,
        ..config()
    };
    let engine = started(cfg, rt).await;
    let (toks, end) = run(&engine, req("c", &TETHER, 100)).await;
    // Prompt plus output reach the context of 10.
    assert_eq!(toks, TETHER_SEED0[..4]);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    // A prompt as long as the context still gets one token.
    let full: Vec<u32> = (0..10).collect();
    let (toks, end) = run(&engine, req("f", &full, 100)).await;
    assert_eq!(
        (toks.len(), end.finish_reason),
        (1, Some(FinishReason::Length))
    );
    idle(engine.gauges());
}

/// Prompts of assorted lengths (some longer than a prefill chunk).
fn assorted_prompts() -> Vec<Vec<u32>> {
    [1usize, 5, 23, 40, 3, 64, 9, 2]
        .iter()
        .enumerate()
        .map(|(i, &len)| (0..len).map(|j| ((i * 37 + j * 11) % 256) as u32).collect())
        .collect()
}

async fn batching_does_not_change_tokens(rt: Rt) {
    let cfg = TinyConfig {
        prefill_tokens_per_step: 16,
        ..config()
    };
    let engine = started(cfg, rt).await;
    let prompts = assorted_prompts();
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        alone.push(run(&engine, req(&format!("alone-{i}"), p, 12)).await.0);
    }
    let mut streams = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        streams.push(gen(&engine, req(&format!("batch-{i}"), p, 12)).await);
    }
    let together = futures_util::future::join_all(streams.into_iter().map(collect)).await;
    for (i, items) in together.iter().enumerate() {
        assert_eq!(tokens(items), alone[i], "prompt {i}");
        assert_eq!(terminal(items).usage, usage(prompts[i].len(), 12));
    }
    idle(engine.gauges());
}

async fn chunked_prefill_does_not_change_tokens(rt: Rt) {
    let prompt: Vec<u32> = (0..30).map(|i| (i * 13 % 256) as u32).collect();
    let whole = started(config(), rt.clone()).await;
    let chunked = started(
        TinyConfig {
            prefill_tokens_per_step: 4,
            ..config()
        },
        rt,
    )
    .await;
    let (a, _) = run(&whole, req("w", &prompt, 8)).await;
    let (b, _) = run(&chunked, req("c", &prompt, 8)).await;
    assert_eq!(a, b);
    // 30 prompt tokens in chunks of 4: 8 prefill steps, the last emits the first token.
    assert_eq!(whole.gauges().steps, 8);
    assert_eq!(chunked.gauges().steps, 8 + 7);
}

async fn queues_when_the_batch_is_full(rt: Rt) {
    let cfg = TinyConfig {
        max_sequences: 2,
        ..config()
    };
    let engine = started(cfg, rt).await;
    let mut streams = Vec::new();
    for i in 0..5 {
        streams.push(gen(&engine, req(&format!("q{i}"), &TETHER, 4)).await);
    }
    let g = engine.gauges();
    assert!(
        g.live_sequences + g.queue_len <= 5 && g.live_sequences <= 2,
        "{g:?}"
    );
    let all = futures_util::future::join_all(streams.into_iter().map(collect)).await;
    for items in &all {
        assert_eq!(tokens(items), TETHER_SEED0[..4]);
    }
    idle(engine.gauges());
}

async fn abort_frees_sequence_and_kv_cache(rt: Rt) {
    let cfg = config();
    let per_seq = cfg.kv_rows_for(TETHER.len(), 10_000) * cfg.kv_bytes_per_token();
    let engine = started(cfg, rt).await;
    let mut stream = gen(&engine, req("a", &TETHER, 10_000)).await;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.token_ids, [TETHER_SEED0[0]]);
    let g = engine.gauges();
    assert_eq!((g.live_sequences, g.kv_bytes), (1, per_seq), "{g:?}");
    assert_eq!(per_seq, 4096 * 2 * 2 * 32 * 4);

    engine.abort(gctx("a")).await;
    idle(engine.gauges());
    assert_eq!(engine.gauges().aborts_live, 1);
    let rest = collect(stream).await;
    let end = terminal(&rest);
    assert_eq!(end.finish_reason, Some(FinishReason::Cancelled));
    // Partial usage: every token sent, the first one included.
    let sent = 1 + tokens(&rest).len();
    assert_eq!(end.usage, usage(6, sent));
    let seen = sent.min(16);
    assert_eq!(tokens(&rest)[..seen - 1], TETHER_SEED0[1..seen]);
}

async fn abort_of_queued_request_ends_it_with_no_tokens(rt: Rt) {
    let cfg = TinyConfig {
        max_sequences: 1,
        ..config()
    };
    let engine = started(cfg, rt).await;
    let mut running = gen(&engine, req("run", &TETHER, 10_000)).await;
    assert!(running.next().await.unwrap().unwrap().has_tokens());
    let queued = gen(&engine, req("wait", &TETHER, 10_000)).await;
    assert_eq!(engine.gauges().queue_len, 1);
    engine.abort(gctx("wait")).await;
    let items = collect(queued).await;
    assert_eq!(items.len(), 1);
    let end = terminal(&items);
    assert_eq!(end.finish_reason, Some(FinishReason::Cancelled));
    assert_eq!(end.usage, usage(6, 0));
    let g = engine.gauges();
    assert_eq!((g.live_sequences, g.queue_len), (1, 0));
    engine.abort(gctx("run")).await;
    idle(engine.gauges());
    drop(running);
}

async fn abort_hook_hears_every_abort(rt: Rt) {
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = heard.clone();
    let hook: AbortHook = Arc::new(move |id, receipt| {
        log.lock().unwrap().push((id.to_owned(), receipt));
    });
    let engine = Arc::new(TinyEngine::new(config(), rt).with_abort_hook(hook));
    engine.start(0).await.unwrap();
    let mut stream = gen(&engine, req("live", &TETHER, 10_000)).await;
    assert!(stream.next().await.unwrap().unwrap().has_tokens());
    engine.abort(gctx("live")).await;
    engine.abort(gctx("live")).await;
    engine.abort(gctx("nobody")).await;
    assert_eq!(
        *heard.lock().unwrap(),
        [
            ("live".to_owned(), AbortReceipt::Live),
            ("live".to_owned(), AbortReceipt::AfterEnd),
            ("nobody".to_owned(), AbortReceipt::AfterEnd),
        ]
    );
    let g = engine.gauges();
    assert_eq!((g.aborts_received, g.aborts_live), (3, 1));
    idle(g);
    drop(stream);
}

async fn abort_of_unknown_or_ended_request_does_nothing(rt: Rt) {
    let engine = started(config(), rt).await;
    engine.abort(gctx("nobody")).await;
    let (toks, _) = run(&engine, req("done", &TETHER, 3)).await;
    assert_eq!(toks.len(), 3);
    engine.abort(gctx("done")).await;
    let g = engine.gauges();
    assert_eq!((g.aborts_received, g.aborts_live), (2, 0));
    idle(g);
}

async fn dropped_stream_frees_its_sequence(rt: Rt) {
    let engine = started(config(), rt).await;
    let mut streams = Vec::new();
    for i in 0..4 {
        streams.push(gen(&engine, req(&format!("d{i}"), &TETHER, 10_000)).await);
    }
    for s in &mut streams {
        assert!(s.next().await.unwrap().unwrap().has_tokens());
    }
    assert_eq!(engine.live_sequences(), 4);
    assert!(engine.kv_bytes() > 0);
    drop(streams);
    idle(engine.gauges());
    // A stream dropped before its sequence ran frees its place in the queue too.
    drop(gen(&engine, req("never", &TETHER, 10_000)).await);
    idle(engine.gauges());
}

async fn invalid_requests_are_setup_errors(rt: Rt) {
    let engine = TinyEngine::new(config(), rt);
    let not_started = engine
        .generate(req("x", &TETHER, 4), gctx("x"))
        .await
        .err()
        .unwrap();
    assert_eq!(not_started.kind(), ErrorKind::Unavailable);
    engine.start(0).await.unwrap();
    let long: Vec<u32> = vec![1; 4097];
    for (prompt, what) in [
        (&[][..], "empty prompt"),
        (&[1, 256, 2][..], "token outside the vocabulary"),
        (&long[..], "prompt longer than the context"),
    ] {
        let err = engine
            .generate(req("x", prompt, 4), gctx("x"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{what}: {err}");
    }
    let g = engine.gauges();
    assert_eq!(g.accepted, 0);
    idle(g);
}

async fn cleanup_ends_live_streams_and_engine_restarts(rt: Rt) {
    let engine = started(config(), rt).await;
    assert!(engine.is_running());
    let mut stream = gen(&engine, req("c", &TETHER, 10_000)).await;
    assert!(stream.next().await.unwrap().unwrap().has_tokens());
    engine.cleanup().await.unwrap();
    assert!(!engine.is_started() && !engine.is_running());
    idle(engine.gauges());
    let rest = collect(stream).await;
    let last = rest.last().unwrap().as_ref().unwrap_err();
    assert_eq!(
        last.kind(),
        ErrorKind::Backend(BackendError::EngineShutdown)
    );
    engine.cleanup().await.unwrap();
    engine.start(0).await.unwrap();
    assert_eq!(engine.device_description().as_deref(), Some("cpu"));
    let (toks, _) = run(&engine, req("again", &TETHER, 16)).await;
    assert_eq!(toks, TETHER_SEED0);
}

async fn one_scheduler_task_per_engine(rt: Rt) {
    let make = |counting| TinyEngine::new(config(), counting);
    common::one_scheduler_task_per_engine(rt, make, "tiny", 12).await;
}

async fn kill_through_adapter_aborts_once(rt: Rt) {
    let engine = started(config(), rt.clone()).await;
    let (adapter, records) = observed_adapter(engine.clone(), &rt);
    let ctx = Context::new("k");
    let mut s = adapter
        .generate(req("k", &TETHER, 10_000), ctx.clone())
        .await
        .unwrap();
    for expected in &TETHER_SEED0[..3] {
        assert_eq!(s.next().await.unwrap().data.unwrap().token_ids, [*expected]);
    }
    kill_ends_with_cancelled(&ctx, &mut s).await;
    until(&rt, || engine.gauges().aborts_received == 1).await;
    // The adapter dropped the engine's stream (which freed the sequence) before its
    // spawned abort ran, so the abort found nothing live.
    let g = engine.gauges();
    idle(g);
    assert_eq!((g.aborts_live, records.1.load(Ordering::SeqCst)), (0, 1));
    assert_one_record(&records, &Outcome::Cancelled, 3);
}

async fn drop_through_adapter_frees_everything(rt: Rt) {
    let engine = started(config(), rt.clone()).await;
    let adapter = tether_core::Adapter::new(engine.clone(), rt.clone(), AdapterConfig::default());
    let mut streams = Vec::new();
    for i in 0..6 {
        let id = format!("d{i}");
        let s = adapter
            .generate(req(&id, &[i], 10_000), Context::new(id))
            .await
            .unwrap();
        streams.push(s);
    }
    for s in &mut streams {
        assert!(s.next().await.unwrap().data.unwrap().has_tokens());
    }
    assert_eq!(engine.live_sequences(), 6);
    drop(streams);
    idle(engine.gauges());
    until(&rt, || engine.gauges().aborts_received == 6).await;
}

fn factory_on(rt: Rt) -> impl Fn() -> Arc<dyn LlmEngine> + Send + Sync {
    move || -> Arc<dyn LlmEngine> { Arc::new(TinyEngine::new(config(), rt.clone())) }
}

#[tokio::test(start_paused = true)]
async fn passes_conformance_kit_on_tokio() {
    let report = tether_tokio::run_conformance(factory_on(tokio_rt()))
        .await
        .unwrap_or_else(|f| panic!("not conformant: {f}"));
    assert_eq!(report.checks, tether_core::conformance::CHECKS);
    assert_eq!(report.model, "tiny");
}

#[test]
fn passes_conformance_kit_on_smol() {
    let report = smol::block_on(tether_smol::run_conformance(factory_on(smol_rt())))
        .unwrap_or_else(|f| panic!("not conformant: {f}"));
    assert_eq!(report.checks, tether_core::conformance::CHECKS);
    assert_eq!(report.model, "tiny");
}

#[cfg(not(feature = "cuda"))]
#[tokio::test(start_paused = true)]
async fn cuda_device_without_the_feature_is_unavailable() {
    let engine = TinyEngine::new(
        TinyConfig {
            device: tether_engines::Device::Cuda(0),
            ..config()
        },
        tokio_rt(),
    );
    let err = engine.start(0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(!engine.is_started());
    engine.cleanup().await.unwrap();
}

#[test]
fn bad_config_fails_start_with_invalid_argument() {
    let engine = TinyEngine::new(
        TinyConfig {
            heads: 3,
            ..config()
        },
        smol_rt(),
    );
    let err = smol::block_on(engine.start(0)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}
