//! LlamaCppEngine behaviour on a model the test writes itself (`TinyLlama`: llama
//! architecture, random weights, a real BPE vocabulary), every scenario on tokio and on
//! smol, plus the conformance kit through both shims. The engine computes on a thread
//! of its own, so tokio runs on a real clock here (a paused clock would jump every
//! deadline while the runtime waits for that thread).

mod common;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures_util::StreamExt;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tether_core::conformance::ConformanceConfig;
use tether_core::{
    AdapterConfig, BackendError, Chunk, ChunkStream, Context, ErrorKind, FinishReason, LlmEngine,
    Outcome, Request, SamplingOptions, StopConditions, Usage,
};
use tether_engines::gguf::TinyLlama;
use tether_engines::llama::{
    backend, AbortHook, AbortReceipt, LlamaCppConfig, LlamaCppEngine, LlamaCppGauges,
};

use common::{
    assert_one_record, collect, gctx, kill_ends_with_cancelled, observed_adapter, on_both_real,
    smol_rt, terminal, tokens, tokio_rt, until, Rt,
};

on_both_real!(
    greedy_tokens_are_a_plain_llama_cpp_loops,
    default_max_tokens_and_max_tokens_zero,
    stop_and_eos_tokens_end_after_min_tokens,
    context_limit_ends_with_length,
    seeded_sampling_repeats_at_equal_batch_composition,
    penalties_change_the_output,
    batch_serves_more_than_one_sequence_at_once,
    queues_when_the_batch_is_full,
    abort_frees_the_sequence_and_its_cells,
    abort_of_a_queued_request_never_prefills_it,
    abort_during_a_long_prefill_stops_within_one_step,
    abort_hook_hears_every_abort,
    dropped_stream_frees_its_sequence,
    invalid_requests_are_setup_errors,
    cleanup_ends_live_streams_and_engine_restarts,
    kill_through_adapter_aborts_once,
    drop_through_adapter_frees_everything,
);

/// The tiny model, written once per test process; 8 192 positions so that a long
/// prompt fits.
fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tether-llama-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("tiny.gguf");
        let model = TinyLlama {
            n_ctx: 8192,
            ..TinyLlama::default()
        };
        model.write(&path).expect("the model is written");
        path
    })
    .clone()
}

fn config() -> LlamaCppConfig {
    LlamaCppConfig {
        n_ctx: 2048,
        max_sequences: 4,
        batch_tokens: 64,
        default_max_tokens: 16,
        threads: Some(std::num::NonZeroUsize::MIN),
        ..LlamaCppConfig::new(model_path())
    }
}

async fn started(cfg: LlamaCppConfig) -> Arc<LlamaCppEngine> {
    let engine = Arc::new(LlamaCppEngine::load(cfg).expect("the model loads"));
    engine.start(7).await.expect("the engine starts");
    engine
}

fn prompt() -> Vec<u32> {
    let engine = LlamaCppEngine::load(config()).unwrap();
    engine.tokenizer().encode("the tether holds", false)
}

/// A request that runs to `max_tokens` (the random model emits its EOS now and then,
/// so it is ignored unless a test asks otherwise).
fn req(id: &str, prompt: &[u32], max_tokens: u32) -> Request {
    let mut stop = StopConditions::default();
    stop.max_tokens = Some(max_tokens);
    stop.ignore_eos = true;
    Request::new(id, "tiny", prompt.to_vec()).with_stop(stop)
}

fn sampled(mut request: Request, f: impl FnOnce(&mut SamplingOptions)) -> Request {
    f(&mut request.sampling);
    request
}

async fn gen(engine: &LlamaCppEngine, request: Request) -> ChunkStream {
    let id = request.id.clone();
    engine.generate(request, gctx(&id)).await.unwrap()
}

async fn run(engine: &LlamaCppEngine, request: Request) -> (Vec<u32>, Chunk) {
    let items = collect(gen(engine, request).await).await;
    (tokens(&items), terminal(&items).clone())
}

fn usage(prompt: usize, completion: usize) -> Option<Usage> {
    Some(Usage::new(prompt as u32, completion as u32))
}

/// Nothing held: no sequence, nothing queued, nothing reserved, and llama.cpp's own
/// memory holds no cell and no sequence id.
fn idle(g: LlamaCppGauges) {
    assert_eq!(
        (
            g.live_sequences,
            g.queue_len,
            g.reserved_cells,
            g.kv_cells,
            g.kv_sequences,
            g.pending_removals
        ),
        (0, 0, 0, 0, 0, 0),
        "{g:?}"
    );
}

/// `n` tokens after `prompt` by a plain llama-cpp-2 loop: no tether, the same context
/// parameters as the engine's, one sequence, the argmax.
fn plain_greedy(cfg: &LlamaCppConfig, prompt: &[u32], n: usize) -> Vec<u32> {
    let backend = backend().unwrap();
    let model =
        LlamaModel::load_from_file(backend, &cfg.model_path, &LlamaModelParams::default()).unwrap();
    let batch_tokens = cfg.batch_tokens as u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(cfg.n_ctx))
        .with_n_batch(batch_tokens)
        .with_n_ubatch(batch_tokens)
        .with_n_seq_max(cfg.max_sequences as u32)
        .with_kv_unified(true)
        .with_n_threads(1)
        .with_n_threads_batch(1);
    let mut ctx = model.new_context(backend, params).unwrap();
    let mut batch = LlamaBatch::new(cfg.batch_tokens, 1);
    for (i, &t) in prompt.iter().enumerate() {
        batch
            .add(LlamaToken(t as i32), i as i32, &[0], i + 1 == prompt.len())
            .unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    let mut sampler = LlamaSampler::greedy();
    let mut at = batch.n_tokens() - 1;
    let mut out = Vec::new();
    for pos in prompt.len()..prompt.len() + n {
        let t = sampler.sample(&ctx, at);
        out.push(t.0 as u32);
        batch.clear();
        batch.add(t, pos as i32, &[0], true).unwrap();
        ctx.decode(&mut batch).unwrap();
        at = 0;
    }
    out
}

async fn greedy_tokens_are_a_plain_llama_cpp_loops(_rt: Rt) {
    let cfg = config();
    let p = prompt();
    let expected = plain_greedy(&cfg, &p, 12);
    let engine = started(cfg).await;
    let (out, end) = run(&engine, req("g", &p, 12)).await;
    assert_eq!(out, expected);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    assert_eq!(end.usage, usage(p.len(), 12));
    // Alone or not, the same request gives the same tokens again.
    assert_eq!(run(&engine, req("g2", &p, 12)).await.0, expected);
    idle(engine.gauges());
}

async fn default_max_tokens_and_max_tokens_zero(_rt: Rt) {
    let engine = started(config()).await;
    let p = prompt();
    let request = Request::new("d", "tiny", p.clone());
    let (out, end) = run(&engine, request).await;
    assert_eq!(out.len(), 16);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    let (out, end) = run(&engine, req("z", &p, 0)).await;
    assert!(out.is_empty());
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    assert_eq!(end.usage, usage(p.len(), 0));
    assert_eq!(
        engine.gauges().prefill_tokens,
        p.len() as u64,
        "max_tokens 0 is never prefilled"
    );
    idle(engine.gauges());
}

async fn stop_and_eos_tokens_end_after_min_tokens(_rt: Rt) {
    let engine = started(config()).await;
    let p = prompt();
    let (greedy, _) = run(&engine, req("ref", &p, 8)).await;
    let stop_on = |i: usize, min: Option<u32>, eos: bool, ignore: bool| {
        let mut stop = StopConditions::default();
        stop.max_tokens = Some(8);
        stop.min_tokens = min;
        stop.ignore_eos = ignore;
        let mut r = req("s", &p, 8).with_stop(stop.clone());
        if eos {
            r.eos_token_ids = vec![greedy[i]];
        } else {
            stop.stop_token_ids = vec![greedy[i]];
            r = r.with_stop(stop);
        }
        r
    };
    let first = greedy.iter().position(|&t| t == greedy[2]).unwrap();
    let (out, end) = run(&engine, stop_on(2, None, false, false)).await;
    assert_eq!(out, greedy[..=first]);
    assert_eq!(end.finish_reason, Some(FinishReason::Stop));
    let (out, end) = run(&engine, stop_on(2, None, true, false)).await;
    assert_eq!(out, greedy[..=first]);
    assert_eq!(end.finish_reason, Some(FinishReason::Eos));
    let (out, end) = run(&engine, stop_on(2, None, true, true)).await;
    assert_eq!(out, greedy);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    // Not before min_tokens: a stop token at an earlier place is passed over.
    let (out, _) = run(&engine, stop_on(0, Some(8), false, false)).await;
    assert_eq!(out, greedy);
    idle(engine.gauges());
}

async fn context_limit_ends_with_length(_rt: Rt) {
    let cfg = LlamaCppConfig {
        n_ctx: 64,
        ..config()
    };
    let engine = started(cfg).await;
    let p: Vec<u32> = (0..60).map(|i| i % 300).collect();
    let (out, end) = run(&engine, req("c", &p, 100)).await;
    assert_eq!(out.len(), 4, "prompt plus output reach the context");
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    idle(engine.gauges());
}

async fn seeded_sampling_repeats_at_equal_batch_composition(_rt: Rt) {
    let engine = started(config()).await;
    let p = prompt();
    let warm = |id: &str, seed: Option<u64>| {
        sampled(req(id, &p, 12), |s| {
            s.temperature = Some(1.5);
            s.top_k = Some(40);
            s.top_p = Some(0.95);
            s.seed = seed;
        })
    };
    // Alone, twice.
    let a = run(&engine, warm("a", Some(11))).await.0;
    assert_eq!(run(&engine, warm("a", Some(11))).await.0, a);
    // Four at once, twice: the same batch composition gives the same tokens.
    let four = |round: u32| {
        let engine = engine.clone();
        let warm = &warm;
        async move {
            let mut streams = Vec::new();
            for i in 0..4u64 {
                streams.push(gen(&engine, warm(&format!("b{round}-{i}"), Some(100 + i))).await);
            }
            let all = futures_util::future::join_all(streams.into_iter().map(collect)).await;
            all.iter().map(|items| tokens(items)).collect::<Vec<_>>()
        }
    };
    let first = four(0).await;
    assert_eq!(four(1).await, first);
    // Different seeds draw differently (12 draws at temperature 1.5 from 324 tokens).
    assert_ne!(first[0], first[1]);
    let b = run(&engine, warm("c", Some(12))).await.0;
    assert_ne!(a, b);
    // Temperature 0 is the argmax, whatever the seed says.
    let greedy = run(&engine, req("g", &p, 12)).await.0;
    let cold = sampled(req("h", &p, 12), |s| {
        s.temperature = Some(0.0);
        s.seed = Some(3);
    });
    assert_eq!(run(&engine, cold).await.0, greedy);
    idle(engine.gauges());
}

async fn penalties_change_the_output(_rt: Rt) {
    let engine = started(config()).await;
    let p = prompt();
    let (greedy, _) = run(&engine, req("g", &p, 32)).await;
    let mut seen = greedy.clone();
    seen.sort_unstable();
    seen.dedup();
    assert!(
        seen.len() < greedy.len(),
        "the argmax repeats itself: {greedy:?}"
    );
    // A strong repetition penalty never picks a token it already emitted again while
    // the model has others left (a random model's logits are close together).
    let penalized = sampled(req("p", &p, 32), |s| s.repetition_penalty = Some(50.0));
    let (out, _) = run(&engine, penalized).await;
    let mut distinct = out.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), out.len(), "no repeats: {out:?}");
    let presence = sampled(req("q", &p, 32), |s| s.presence_penalty = Some(2.0));
    assert_ne!(run(&engine, presence).await.0, greedy);
    idle(engine.gauges());
}

async fn batch_serves_more_than_one_sequence_at_once(_rt: Rt) {
    let engine = started(config()).await;
    let p = prompt();
    let mut streams = Vec::new();
    for i in 0..4 {
        streams.push(gen(&engine, req(&format!("r{i}"), &p, 200)).await);
    }
    for s in &mut streams {
        assert!(s.next().await.unwrap().unwrap().has_tokens());
    }
    let g = engine.gauges();
    assert_eq!(g.live_sequences, 4, "{g:?}");
    let steps = g.steps;
    let all = futures_util::future::join_all(streams.into_iter().map(collect)).await;
    for items in &all {
        assert_eq!(terminal(items).finish_reason, Some(FinishReason::Length));
    }
    // 4 × 199 more tokens in about 199 steps, not 4 × 199: they shared the batch.
    let more = engine.gauges().steps - steps;
    assert!(more < 2 * 199, "{more} steps for 4 × 199 tokens");
    idle(engine.gauges());
}

async fn queues_when_the_batch_is_full(_rt: Rt) {
    let cfg = LlamaCppConfig {
        max_sequences: 2,
        ..config()
    };
    let engine = started(cfg).await;
    let p = prompt();
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(gen(&engine, req(&format!("q{i}"), &p, 1000)).await);
    }
    for s in &mut streams[..2] {
        assert!(s.next().await.unwrap().unwrap().has_tokens());
    }
    let g = engine.gauges();
    assert_eq!(
        (g.live_sequences, g.queue_len, g.kv_sequences),
        (2, 1, 2),
        "{g:?}"
    );
    drop(streams);
    until(&tokio_or_smol(), || engine.gauges().kv_cells == 0).await;
    idle(engine.gauges());
}

/// A runtime for `until`, whichever test harness runs.
fn tokio_or_smol() -> Rt {
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio_rt()
    } else {
        smol_rt()
    }
}

async fn abort_frees_the_sequence_and_its_cells(_rt: Rt) {
    let engine = started(config()).await;
    let p = prompt();
    let mut stream = gen(&engine, req("a", &p, 1000)).await;
    let mut sent = 0;
    while sent < 3 {
        sent += stream.next().await.unwrap().unwrap().token_ids.len();
    }
    let g = engine.gauges();
    assert_eq!((g.live_sequences, g.kv_sequences), (1, 1), "{g:?}");
    assert!(g.kv_cells >= p.len(), "{g:?}");
    engine.abort(gctx("a")).await;
    let rest = collect(stream).await;
    let end = terminal(&rest);
    assert_eq!(end.finish_reason, Some(FinishReason::Cancelled));
    assert_eq!(end.usage, usage(p.len(), sent + tokens(&rest).len()));
    // The terminal comes after the cells were removed from llama.cpp's memory.
    idle(engine.gauges());
    let g = engine.gauges();
    assert_eq!(
        (g.aborts_received, g.aborts_running, g.aborts_queued),
        (1, 1, 0)
    );
}

async fn abort_of_a_queued_request_never_prefills_it(_rt: Rt) {
    let cfg = LlamaCppConfig {
        max_sequences: 1,
        ..config()
    };
    let engine = started(cfg).await;
    let p = prompt();
    let mut running = gen(&engine, req("run", &p, 1000)).await;
    assert!(running.next().await.unwrap().unwrap().has_tokens());
    let queued = gen(&engine, req("wait", &p, 1000)).await;
    assert_eq!(engine.gauges().queue_len, 1);
    engine.abort(gctx("wait")).await;
    let items = collect(queued).await;
    assert_eq!(items.len(), 1, "only the terminal: {items:?}");
    assert_eq!(
        terminal(&items).finish_reason,
        Some(FinishReason::Cancelled)
    );
    assert_eq!(terminal(&items).usage, usage(p.len(), 0));
    let g = engine.gauges();
    assert_eq!((g.aborts_queued, g.queue_len), (1, 0));
    assert_eq!(
        g.prefill_tokens,
        p.len() as u64,
        "only the running one was prefilled"
    );
    engine.abort(gctx("run")).await;
    collect(running).await;
    idle(engine.gauges());
}

async fn abort_during_a_long_prefill_stops_within_one_step(_rt: Rt) {
    let cfg = LlamaCppConfig {
        n_ctx: 8192,
        batch_tokens: 64,
        ..config()
    };
    let engine = started(cfg).await;
    let long: Vec<u32> = (0..8000).map(|i| (i * 7 + 3) % 320).collect();
    let stream = gen(&engine, req("long", &long, 10)).await;
    until(&tokio_or_smol(), || engine.gauges().prefill_tokens >= 64).await;
    let at_abort = engine.gauges().prefill_tokens;
    let t0 = Instant::now();
    engine.abort(gctx("long")).await;
    let items = collect(stream).await;
    let took = t0.elapsed();
    assert_eq!(items.len(), 1, "only the terminal: {items:?}");
    assert_eq!(
        terminal(&items).finish_reason,
        Some(FinishReason::Cancelled)
    );
    assert_eq!(terminal(&items).usage, usage(long.len(), 0));
    let g = engine.gauges();
    // At most the step being decoded when the abort came: one chunk of 64.
    assert!(
        g.prefill_tokens <= at_abort + 64,
        "prefill went on: {} tokens at the abort, {} after",
        at_abort,
        g.prefill_tokens
    );
    assert!(g.prefill_tokens < long.len() as u64);
    idle(g);
    eprintln!(
        "abort during a prefill of {} tokens: ended after {} prompt tokens, {:.2} ms from the abort to Cancelled (cells free)",
        long.len(),
        g.prefill_tokens,
        took.as_secs_f64() * 1e3
    );
}

async fn abort_hook_hears_every_abort(_rt: Rt) {
    let heard: Arc<Mutex<Vec<(String, AbortReceipt)>>> = Arc::default();
    let hook: AbortHook = {
        let heard = heard.clone();
        Arc::new(move |id, receipt| heard.lock().unwrap().push((id.to_owned(), receipt)))
    };
    let engine = Arc::new(
        LlamaCppEngine::load(config())
            .unwrap()
            .with_abort_hook(hook),
    );
    engine.start(0).await.unwrap();
    let p = prompt();
    let mut s = gen(&engine, req("live", &p, 1000)).await;
    assert!(s.next().await.unwrap().unwrap().has_tokens());
    engine.abort(gctx("live")).await;
    collect(s).await;
    engine.abort(gctx("live")).await;
    engine.abort(gctx("never")).await;
    assert_eq!(
        *heard.lock().unwrap(),
        [
            ("live".to_owned(), AbortReceipt::Live),
            ("live".to_owned(), AbortReceipt::AfterEnd),
            ("never".to_owned(), AbortReceipt::AfterEnd),
        ]
    );
    idle(engine.gauges());
}

async fn dropped_stream_frees_its_sequence(_rt: Rt) {
    let engine = started(config()).await;
    let p = prompt();
    let mut s = gen(&engine, req("d", &p, 1000)).await;
    assert!(s.next().await.unwrap().unwrap().has_tokens());
    assert_eq!(engine.gauges().kv_sequences, 1);
    drop(s);
    until(&tokio_or_smol(), || engine.gauges().kv_sequences == 0).await;
    idle(engine.gauges());
    // The slot is free again.
    assert_eq!(run(&engine, req("e", &p, 3)).await.0.len(), 3);
}

async fn invalid_requests_are_setup_errors(_rt: Rt) {
    let engine = started(config()).await;
    let n_vocab = engine.tokenizer().n_vocab();
    let too_long: Vec<u32> = vec![1; 2048];
    let cases = [
        req("empty", &[], 4),
        req("vocab", &[1, n_vocab], 4),
        req("long", &too_long, 4),
        sampled(req("temp", &[1], 4), |s| s.temperature = Some(-1.0)),
        sampled(req("top_p", &[1], 4), |s| s.top_p = Some(0.0)),
        sampled(req("rep", &[1], 4), |s| s.repetition_penalty = Some(0.0)),
    ];
    for r in cases {
        let id = r.id.clone();
        let Err(err) = engine.generate(r, gctx(&id)).await else {
            panic!("{id}: accepted")
        };
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{id}: {err}");
    }
    assert_eq!(engine.gauges().accepted, 0);
    idle(engine.gauges());
}

async fn cleanup_ends_live_streams_and_engine_restarts(_rt: Rt) {
    let engine = started(config()).await;
    let p = prompt();
    let mut s = gen(&engine, req("c", &p, 1000)).await;
    assert!(s.next().await.unwrap().unwrap().has_tokens());
    engine.cleanup().await.unwrap();
    let rest = collect(s).await;
    let last = rest.last().unwrap().as_ref().unwrap_err();
    assert_eq!(
        last.kind(),
        ErrorKind::Backend(BackendError::EngineShutdown)
    );
    assert!(!engine.is_started());
    idle(engine.gauges());
    let refused = engine.generate(req("x", &p, 2), gctx("x")).await;
    assert_eq!(refused.err().unwrap().kind(), ErrorKind::Unavailable);
    engine.start(0).await.unwrap();
    assert_eq!(run(&engine, req("after", &p, 3)).await.0.len(), 3);
    idle(engine.gauges());
}

async fn kill_through_adapter_aborts_once(rt: Rt) {
    let engine = started(config()).await;
    let (adapter, records) = observed_adapter(engine.clone(), &rt);
    let ctx = Context::new("k");
    let p = prompt();
    let mut s = adapter
        .generate(req("k", &p, 1000), ctx.clone())
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(s.next().await.unwrap().data.unwrap().has_tokens());
    }
    kill_ends_with_cancelled(&ctx, &mut s).await;
    until(&rt, || engine.gauges().aborts_received == 1).await;
    until(&rt, || engine.gauges().kv_sequences == 0).await;
    idle(engine.gauges());
    assert_eq!(records.1.load(Ordering::SeqCst), 1);
    assert_one_record(&records, &Outcome::Cancelled, 3);
}

async fn drop_through_adapter_frees_everything(rt: Rt) {
    let cfg = LlamaCppConfig {
        max_sequences: 4,
        ..config()
    };
    let engine = started(cfg).await;
    let adapter = tether_core::Adapter::new(engine.clone(), rt.clone(), AdapterConfig::default());
    let p = prompt();
    let mut streams = Vec::new();
    for i in 0..6 {
        let id = format!("d{i}");
        let s = adapter
            .generate(req(&id, &p, 1000), Context::new(id))
            .await
            .unwrap();
        streams.push(s);
    }
    for s in &mut streams[..4] {
        assert!(s.next().await.unwrap().data.unwrap().has_tokens());
    }
    assert_eq!(engine.gauges().queue_len, 2);
    drop(streams);
    until(&rt, || engine.gauges().aborts_received == 6).await;
    until(&rt, || engine.gauges().kv_sequences == 0).await;
    idle(engine.gauges());
}

fn factory() -> Arc<dyn LlmEngine> {
    Arc::new(LlamaCppEngine::load(config()).expect("the model loads"))
}

fn kit() -> ConformanceConfig {
    // A stopped request reserves the whole context; the limit keeps it within.
    ConformanceConfig::default().stop_max_tokens(1000)
}

#[tokio::test]
async fn passes_conformance_kit_on_tokio() {
    let report = tether_tokio::run_conformance_with(factory, &kit())
        .await
        .unwrap_or_else(|f| panic!("not conformant: {f}"));
    assert_eq!(report.checks, tether_core::conformance::CHECKS);
    assert_eq!(report.model, "tiny");
}

#[test]
fn passes_conformance_kit_on_smol() {
    let report = smol::block_on(tether_smol::run_conformance_with(factory, &kit()))
        .unwrap_or_else(|f| panic!("not conformant: {f}"));
    assert_eq!(report.checks, tether_core::conformance::CHECKS);
    assert_eq!(report.model, "tiny");
}

#[test]
fn a_missing_model_or_a_bad_config_is_an_invalid_argument() {
    let missing = LlamaCppEngine::load(LlamaCppConfig::new("/nonexistent/model.gguf")).unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::InvalidArgument);
    assert!(
        missing.to_string().contains("/nonexistent/model.gguf"),
        "{missing}"
    );
    let bad = LlamaCppConfig {
        batch_tokens: 2,
        ..config()
    };
    let err = LlamaCppEngine::load(bad).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("batch_tokens"), "{err}");
    let not_gguf = std::env::temp_dir().join(format!("tether-not-gguf-{}", std::process::id()));
    std::fs::write(&not_gguf, b"not a model").unwrap();
    let err = LlamaCppEngine::load(LlamaCppConfig::new(&not_gguf)).unwrap_err();
    let _ = std::fs::remove_file(&not_gguf);
    assert_eq!(
        err.kind(),
        ErrorKind::Backend(BackendError::Unknown),
        "{err}"
    );
}

#[test]
fn the_tokenizer_is_the_models_own() {
    let engine = LlamaCppEngine::load(config()).unwrap();
    let tok = engine.tokenizer();
    assert_eq!(tok.n_vocab(), 324);
    let ids = tok.encode("héllo wörld", false);
    let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.piece(id).to_vec()).collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), "héllo wörld");
    // A control token written in text is read as itself, and outputs no text.
    let im_start = tok.encode("<|im_start|>", false);
    assert_eq!(im_start, [322]);
    assert!(tok.piece(322).is_empty());
    assert_eq!(tok.bos_token(), Some("<|bos|>"));
    assert_eq!(tok.eos_token(), Some("<|eos|>"));
    assert!(tok.end_of_generation().contains(&321));
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    assert_eq!(engine.config().served_name(), "tiny");
}
