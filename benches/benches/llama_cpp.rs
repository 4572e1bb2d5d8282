//! `llama_cpp`: the llama.cpp engine (`tether_engines::llama::LlamaCppEngine`) through
//! tether against a plain llama-cpp-2 loop with no tether, on one model written for the
//! run (`TinyLlama`, random weights) and the same context parameters on both sides. A
//! plain binary (no criterion), behind the `llama-cpp` feature; `--test` runs the tiny
//! default model and a handful of tokens and prints the same tables.
//!
//! 1. **Throughput** at batch 1 and batch 8: the same prompts, greedy, `ignore_eos`,
//!    `max_tokens` tokens each. *tether*: an [`Adapter`] over the engine on a
//!    current-thread tokio runtime, the requests issued at once and every chunk read.
//!    *plain*: one llama-cpp-2 context with the engine's parameters, the prompts
//!    prefilled in one batch (one sequence id each), then one `decode` per step for all
//!    sequences, one greedy sampler per sequence. *engine*: the engine's own streams,
//!    no adapter, which splits a tether/plain gap into the adapter's part and the
//!    engine's. Reported: generated tokens over wall time from the first request to the
//!    last token (`e2e`), and over the decode phase only (from the moment every
//!    sequence has its first token), median and range of the repetitions (the three
//!    sides take turns), the tether/plain and engine/plain ratios, and whether tether
//!    and plain produced the same token ids (asserted at batch 1).
//! 2. **Abort to cells freed**: with 3 other sequences decoding, a running request is
//!    aborted at a random moment of a step (a random part of the interval between its
//!    last two tokens), by `engine.abort` or by `Context::stop` through the adapter
//!    (the two take turns); the time runs until its `Cancelled` terminal is read (the
//!    engine sends it only after the sequence's cells were removed, which the sample
//!    checks on the gauges), also as a fraction of that step. The same for an abort
//!    during the prefill of a long prompt (checked: at most the step being decoded
//!    ends after the abort).
//!
//! The model file goes to a temporary directory, deleted at the end; the figures go to
//! `target/tether-bench/llama_cpp.json` (not in `--test` mode).

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tether_benches::report::{percentile, smoke_mode, write_json};
use tether_core::{
    Adapter, AdapterConfig, Chunk, Context, EngineError, FinishReason, GenerateContext, LlmEngine,
    Request, StopConditions,
};
use tether_engines::gguf::TinyLlama;
use tether_engines::llama::{backend, LlamaCppConfig, LlamaCppEngine};
use tether_tokio::TokioRuntime;

/// CPU threads llama.cpp computes with, on both sides.
const THREADS: usize = 2;
/// KV cells of the one context (both sides).
const N_CTX: u32 = 4096;
/// Sequences at once (both sides).
const MAX_SEQUENCES: usize = 8;
/// Tokens per `decode` at most (both sides): 8 prompts of `PROMPT_LEN` fit one batch.
const BATCH_TOKENS: usize = 256;
/// Tokens of each throughput prompt.
const PROMPT_LEN: usize = 32;
/// Sequences decoding beside the aborted one.
const BACKGROUND: usize = 3;
/// `max_tokens` of a background sequence (it is restarted when it ends); with the
/// victim's cells, all fit in `N_CTX`.
const BACKGROUND_MAX_TOKENS: u32 = 800;
/// `max_tokens` of an aborted request (it is aborted long before).
const VICTIM_MAX_TOKENS: u32 = 64;
/// Tokens of the long prompt whose prefill is aborted.
const LONG_PROMPT: usize = 2000;

/// The benchmark model: one batch-1 decode step takes well over 10 ms on 2 threads.
fn bench_model() -> TinyLlama {
    TinyLlama {
        n_embd: 1024,
        n_layer: 10,
        n_head: 16,
        n_head_kv: 4,
        n_ff: 2816,
        n_ctx: N_CTX,
        ..TinyLlama::default()
    }
}

/// How much to run.
#[derive(Clone, Copy, Debug)]
struct Plan {
    smoke: bool,
    max_tokens: usize,
    reps: usize,
    abort_samples: usize,
    prefill_samples: usize,
}

impl Plan {
    fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                smoke,
                max_tokens: 8,
                reps: 1,
                abort_samples: 5,
                prefill_samples: 2,
            }
        } else {
            Plan {
                smoke,
                max_tokens: 64,
                reps: 7,
                abort_samples: 200,
                prefill_samples: 20,
            }
        }
    }

    fn model(self) -> TinyLlama {
        if self.smoke {
            TinyLlama {
                n_ctx: N_CTX,
                ..TinyLlama::default()
            }
        } else {
            bench_model()
        }
    }
}

/// The temporary directory of the model file, removed on drop (a panic included).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

/// A small seeded generator (xorshift64*): the random abort moments, the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, max)`.
    fn below(&mut self, max: u64) -> u64 {
        if max == 0 {
            0
        } else {
            self.next() % max
        }
    }

    /// Uniform in `[0, max)`, at microsecond resolution.
    fn duration(&mut self, max: Duration) -> Duration {
        let us = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(self.below(us))
    }
}

/// Prompt `i` of `len` fixed ids below 320 (the tiny vocabulary's 324 tokens end in
/// control tokens).
fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| u32::try_from((i * 37 + j * 7 + 3) % 320).unwrap_or(0))
        .collect()
}

/// A greedy request that runs to `max_tokens`.
fn request(id: &str, prompt: &[u32], max_tokens: u32) -> Request {
    let mut stop = StopConditions::default();
    stop.max_tokens = Some(max_tokens);
    stop.ignore_eos = true;
    Request::new(id, "bench", prompt.to_vec()).with_stop(stop)
}

fn gctx(id: &str) -> GenerateContext {
    GenerateContext::new(Context::new(id), id)
}

/// What one throughput run saw: every sequence's tokens and when each was read.
struct Run {
    start: Instant,
    tokens: Vec<Vec<u32>>,
    times: Vec<Vec<Instant>>,
    /// `decode` calls (engine steps) the run took.
    steps: u64,
}

/// A run's rates.
#[derive(Clone, Copy, Debug)]
struct Rates {
    /// Generated tokens per second, first request to last token.
    e2e: f64,
    /// Tokens read after every sequence had its first, per second of that phase.
    decode: f64,
    /// Wall time until every sequence had its first token (prefill).
    prefill: Duration,
}

impl Run {
    fn rates(&self) -> Rates {
        let all_first = self
            .times
            .iter()
            .filter_map(|t| t.first().copied())
            .max()
            .unwrap_or(self.start);
        let end = self
            .times
            .iter()
            .filter_map(|t| t.last().copied())
            .max()
            .unwrap_or(self.start);
        let total: usize = self.tokens.iter().map(Vec::len).sum();
        let after: usize = self
            .times
            .iter()
            .map(|t| t.iter().filter(|&&at| at > all_first).count())
            .sum();
        let secs = |d: Duration| d.as_secs_f64().max(1e-9);
        Rates {
            e2e: total as f64 / secs(end - self.start),
            decode: after as f64 / secs(end - all_first),
            prefill: all_first - self.start,
        }
    }
}

/// The plain llama-cpp-2 side: one context with the engine's parameters.
struct Plain<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
}

fn as_i32(n: usize) -> i32 {
    i32::try_from(n).expect("fits in i32")
}

impl<'m> Plain<'m> {
    fn new(model: &'m LlamaModel) -> Plain<'m> {
        let batch = u32::try_from(BATCH_TOKENS).expect("fits in u32");
        let threads = as_i32(THREADS);
        // The engine's context parameters (engines/src/llama/worker.rs).
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(N_CTX))
            .with_n_batch(batch)
            .with_n_ubatch(batch)
            .with_n_seq_max(u32::try_from(MAX_SEQUENCES).expect("fits in u32"))
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = model
            .new_context(backend().expect("llama.cpp's backend"), params)
            .expect("a llama.cpp context");
        Plain {
            ctx,
            batch: LlamaBatch::new(BATCH_TOKENS, 1),
        }
    }

    /// Prefill `prompts` in one batch (sequence `s` is prompt `s`), then decode every
    /// sequence one token per step until each has `n`, greedily.
    fn run(&mut self, prompts: &[Vec<u32>], n: usize) -> Run {
        self.ctx.clear_kv_cache();
        let b = prompts.len();
        let mut samplers: Vec<LlamaSampler> = (0..b).map(|_| LlamaSampler::greedy()).collect();
        let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(n); b];
        let mut times: Vec<Vec<Instant>> = vec![Vec::with_capacity(n); b];
        let start = Instant::now();
        self.batch.clear();
        let mut logits_at = Vec::with_capacity(b);
        for (s, p) in prompts.iter().enumerate() {
            for (i, &t) in p.iter().enumerate() {
                self.batch
                    .add(
                        LlamaToken(i32::try_from(t).expect("a token id")),
                        as_i32(i),
                        &[as_i32(s)],
                        i + 1 == p.len(),
                    )
                    .expect("the prompts fit one batch");
            }
            logits_at.push(self.batch.n_tokens() - 1);
        }
        self.ctx.decode(&mut self.batch).expect("prefill");
        let mut steps = 1;
        let mut last = Vec::with_capacity(b);
        for (s, sampler) in samplers.iter_mut().enumerate() {
            let token = sampler.sample(&self.ctx, logits_at[s]);
            last.push(token);
        }
        let now = Instant::now();
        for (s, &LlamaToken(t)) in last.iter().enumerate() {
            tokens[s].push(u32::try_from(t).expect("a token id"));
            times[s].push(now);
        }
        for k in 1..n {
            self.batch.clear();
            for (s, &token) in last.iter().enumerate() {
                let pos = prompts[s].len() + k - 1;
                self.batch
                    .add(token, as_i32(pos), &[as_i32(s)], true)
                    .expect("a decode batch");
            }
            self.ctx.decode(&mut self.batch).expect("decode");
            steps += 1;
            for (s, sampler) in samplers.iter_mut().enumerate() {
                last[s] = sampler.sample(&self.ctx, as_i32(s));
            }
            let now = Instant::now();
            for (s, &LlamaToken(t)) in last.iter().enumerate() {
                tokens[s].push(u32::try_from(t).expect("a token id"));
                times[s].push(now);
            }
        }
        Run {
            start,
            tokens,
            times,
            steps,
        }
    }
}

/// Read `stream` to its terminal (which must be `Length`): its tokens and when each
/// chunk was read. The adapter's streams are read as `Result`s
/// (`ResponseStream::results`), the engine's own as they are.
async fn read_all<S>(mut stream: S) -> (Vec<u32>, Vec<Instant>)
where
    S: futures_core::Stream<Item = Result<Chunk, EngineError>> + Unpin,
{
    let mut tokens = Vec::new();
    let mut times = Vec::new();
    while let Some(item) = stream.next().await {
        let chunk = item.unwrap_or_else(|e| panic!("the stream failed: {e}"));
        let now = Instant::now();
        for &t in &chunk.token_ids {
            tokens.push(t);
            times.push(now);
        }
        if chunk.is_terminal() {
            assert_eq!(chunk.finish_reason, Some(FinishReason::Length), "{chunk:?}");
            break;
        }
    }
    (tokens, times)
}

/// The tether side: every prompt issued through `adapter` at once, every chunk read.
async fn tether_run(
    adapter: &Adapter,
    engine: &LlamaCppEngine,
    prompts: &[Vec<u32>],
    n: usize,
    tag: &str,
) -> Run {
    let steps0 = engine.gauges().steps;
    let max_tokens = u32::try_from(n).expect("fits in u32");
    let start = Instant::now();
    let mut streams = Vec::with_capacity(prompts.len());
    for (s, p) in prompts.iter().enumerate() {
        let id = format!("{tag}-{s}");
        let stream = adapter
            .generate(request(&id, p, max_tokens), Context::new(id.as_str()))
            .await
            .expect("the request starts");
        streams.push(stream);
    }
    let read =
        futures_util::future::join_all(streams.into_iter().map(|s| read_all(s.results()))).await;
    let (tokens, times) = read.into_iter().unzip();
    Run {
        start,
        tokens,
        times,
        steps: engine.gauges().steps - steps0,
    }
}

/// The engine alone (no adapter): every prompt issued by `engine.generate` at once,
/// every chunk of its own streams read. Splits a tether/plain gap into the adapter's
/// part and the engine's.
async fn engine_run(engine: &LlamaCppEngine, prompts: &[Vec<u32>], n: usize, tag: &str) -> Run {
    let steps0 = engine.gauges().steps;
    let max_tokens = u32::try_from(n).expect("fits in u32");
    let start = Instant::now();
    let mut streams = Vec::with_capacity(prompts.len());
    for (s, p) in prompts.iter().enumerate() {
        let id = format!("{tag}-{s}");
        let stream = engine
            .generate(request(&id, p, max_tokens), gctx(&id))
            .await
            .expect("the request starts");
        streams.push(stream);
    }
    let read = futures_util::future::join_all(streams.into_iter().map(read_all)).await;
    let (tokens, times) = read.into_iter().unzip();
    Run {
        start,
        tokens,
        times,
        steps: engine.gauges().steps - steps0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn range(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// One side's repetitions at one batch size.
#[derive(Default)]
struct Side {
    e2e: Vec<f64>,
    decode: Vec<f64>,
    prefill_ms: Vec<f64>,
    steps: Vec<u64>,
    tokens: Vec<Vec<u32>>,
}

impl Side {
    fn push(&mut self, run: &Run) {
        let r = run.rates();
        self.e2e.push(r.e2e);
        self.decode.push(r.decode);
        self.prefill_ms.push(r.prefill.as_secs_f64() * 1e3);
        self.steps.push(run.steps);
        self.tokens.clone_from(&run.tokens);
    }

    fn row(&self, batch: usize, name: &str) -> String {
        let (e_lo, e_hi) = range(&self.e2e);
        let (d_lo, d_hi) = range(&self.decode);
        let decode = median(self.decode.clone());
        let steps: Vec<String> = self.steps.iter().map(u64::to_string).collect();
        format!(
            "{batch:>5}  {name:<7} {:>9.1} [{e_lo:>7.1}-{e_hi:>7.1}] {decode:>9.1} [{d_lo:>7.1}-{d_hi:>7.1}] {:>9.2} {:>10.1}  {}",
            median(self.e2e.clone()),
            batch as f64 / decode * 1e3,
            median(self.prefill_ms.clone()),
            steps.join(",")
        )
    }

    fn json(&self, batch: usize, name: &str) -> serde_json::Value {
        serde_json::json!({
            "batch": batch,
            "side": name,
            "e2e_tok_s": self.e2e,
            "decode_tok_s": self.decode,
            "prefill_ms": self.prefill_ms,
            "steps": self.steps,
            "e2e_median": median(self.e2e.clone()),
            "decode_median": median(self.decode.clone()),
        })
    }
}

/// How many of `a`'s sequences equal `b`'s, and the tokens of the first that differs.
fn same_tokens(a: &[Vec<u32>], b: &[Vec<u32>]) -> (usize, Option<(usize, usize)>) {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    let first_diff = a.iter().zip(b).enumerate().find_map(|(s, (x, y))| {
        x.iter()
            .zip(y)
            .position(|(p, q)| p != q)
            .or((x.len() != y.len()).then_some(x.len().min(y.len())))
            .map(|at| (s, at))
    });
    (same, first_diff)
}

/// Wait (on the runtime's timer, 1 ms at a time, at most 30 s) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Read a raw engine stream to its end; its terminal.
async fn terminal(stream: &mut tether_core::ChunkStream) -> Chunk {
    let mut last = None;
    while let Some(item) = stream.next().await {
        let chunk = item.unwrap_or_else(|e| panic!("the stream failed: {e}"));
        if chunk.is_terminal() {
            last = Some(chunk);
            break;
        }
    }
    last.expect("a terminal")
}

/// Start the background sequences: each decodes `BACKGROUND_MAX_TOKENS` tokens and
/// starts again, until its task is aborted (which drops its stream: the engine frees
/// its sequence).
fn background(engine: &Arc<LlamaCppEngine>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..BACKGROUND)
        .map(|k| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let p = prompt(100 + k, PROMPT_LEN);
                for round in 0u64.. {
                    let id = format!("bg{k}-{round}");
                    let mut stream = engine
                        .generate(request(&id, &p, BACKGROUND_MAX_TOKENS), gctx(&id))
                        .await
                        .expect("a background request");
                    while let Some(item) = stream.next().await {
                        if let Err(e) = item {
                            panic!("a background stream failed: {e}");
                        }
                    }
                }
            })
        })
        .collect()
}

/// How a running request is aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// `engine.abort(gctx)`, the engine's stream read to `Cancelled`.
    Engine,
    /// `Context::stop()` through the adapter, its stream read to `Cancelled`.
    Tether,
}

/// Tokens read, and when the last two were.
struct Reads {
    got: usize,
    at: [Instant; 2],
}

impl Default for Reads {
    fn default() -> Reads {
        Reads {
            got: 0,
            at: [Instant::now(); 2],
        }
    }
}

impl Reads {
    fn note(&mut self, tokens: usize) {
        if tokens > 0 {
            self.got += tokens;
            self.at = [self.at[1], Instant::now()];
        }
    }

    /// The interval between the last two tokens read: one engine step.
    fn step(&self) -> Duration {
        self.at[1] - self.at[0]
    }
}

/// One abort-during-decode sample: start a request beside the background, read 2 to 4
/// tokens, wait a random part of the step (the interval between the last two tokens:
/// the step time moves as the background's sequences grow), abort, and time it until
/// `Cancelled` is read. The time, and the step it was drawn from.
async fn decode_abort_sample(
    engine: &LlamaCppEngine,
    adapter: &Adapter,
    how: How,
    i: usize,
    rng: &mut Rng,
) -> (Duration, Duration) {
    until("the background sequences", || {
        let g = engine.gauges();
        g.live_sequences == BACKGROUND && g.kv_sequences == BACKGROUND && g.queue_len == 0
    })
    .await;
    let id = format!("victim-{how:?}-{i}");
    let p = prompt(i % 64, PROMPT_LEN);
    let first = 2 + usize::try_from(rng.below(3)).unwrap_or(0);
    let mut reads = Reads::default();
    let (took, step, end) = match how {
        How::Engine => {
            let mut stream = engine
                .generate(request(&id, &p, VICTIM_MAX_TOKENS), gctx(&id))
                .await
                .expect("the victim starts");
            while reads.got < first {
                let chunk = stream.next().await.expect("a token").expect("no error");
                reads.note(chunk.token_ids.len());
            }
            let step = reads.step();
            tokio::time::sleep(rng.duration(step)).await;
            let t0 = Instant::now();
            engine.abort(gctx(&id)).await;
            let end = terminal(&mut stream).await;
            (t0.elapsed(), step, end)
        }
        How::Tether => {
            let ctx = Context::new(id.as_str());
            let mut stream = adapter
                .generate(request(&id, &p, VICTIM_MAX_TOKENS), ctx.clone())
                .await
                .expect("the victim starts");
            while reads.got < first {
                let item = stream.next().await.expect("a token");
                reads.note(item.data.map_or(0, |c| c.token_ids.len()));
            }
            let step = reads.step();
            tokio::time::sleep(rng.duration(step)).await;
            let t0 = Instant::now();
            ctx.stop();
            let mut end = None;
            while let Some(item) = stream.next().await {
                if let Some(chunk) = item.data.filter(Chunk::is_terminal) {
                    end = Some(chunk);
                    break;
                }
            }
            (t0.elapsed(), step, end.expect("a terminal"))
        }
    };
    assert_eq!(end.finish_reason, Some(FinishReason::Cancelled), "{end:?}");
    // Cancelled comes only after the victim's cells left llama.cpp's memory: only the
    // background's sequence ids hold cells.
    let g = engine.gauges();
    assert!(g.kv_sequences <= BACKGROUND, "cells still held: {g:?}");
    (took, step)
}

/// One abort-during-prefill sample: a `LONG_PROMPT`-token prompt alone, aborted a
/// random part of `window` after its admission. The time until `Cancelled` is read,
/// the prompt tokens prefilled before the abort, and the engine steps that ended after
/// it (at most the one being decoded).
async fn prefill_abort_sample(
    engine: &LlamaCppEngine,
    i: usize,
    rng: &mut Rng,
    window: Duration,
) -> (Duration, u64, u64) {
    let id = format!("long-{i}");
    let long = prompt(1000 + i, LONG_PROMPT);
    let before = engine.gauges().prefill_tokens;
    let mut stream = engine
        .generate(request(&id, &long, 16), gctx(&id))
        .await
        .expect("the long request starts");
    while engine.gauges().live_sequences == 0 {
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_micros(20));
    }
    tokio::time::sleep(rng.duration(window)).await;
    let at_abort = engine.gauges();
    let t0 = Instant::now();
    engine.abort(gctx(&id)).await;
    let end = terminal(&mut stream).await;
    let took = t0.elapsed();
    assert_eq!(end.finish_reason, Some(FinishReason::Cancelled), "{end:?}");
    let g = engine.gauges();
    assert_eq!(
        (g.kv_sequences, g.kv_cells),
        (0, 0),
        "cells still held: {g:?}"
    );
    let prefilled = at_abort.prefill_tokens - before;
    assert!(
        prefilled < LONG_PROMPT as u64,
        "the abort came after the prefill: {prefilled} tokens"
    );
    let steps_after = g.steps - at_abort.steps;
    assert!(
        steps_after <= 1,
        "{steps_after} steps ended after the abort"
    );
    (took, prefilled, steps_after)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// min, p50, p99, mean and max of `samples`, in ms.
fn latency_row(name: &str, mut samples: Vec<Duration>) -> (String, serde_json::Value) {
    samples.sort_unstable();
    let n = samples.len();
    let mean = samples.iter().sum::<Duration>() / u32::try_from(n.max(1)).unwrap_or(1);
    let min = samples.first().copied().unwrap_or_default();
    let max = samples.last().copied().unwrap_or_default();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    let row = format!(
        "{name:<52} {n:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        ms(min),
        ms(p50),
        ms(p99),
        ms(mean),
        ms(max)
    );
    let json = serde_json::json!({
        "case": name, "samples": n, "min_ms": ms(min), "p50_ms": ms(p50), "p99_ms": ms(p99),
        "mean_ms": ms(mean), "max_ms": ms(max),
    });
    (row, json)
}

fn write_model(plan: Plan, dir: &Path) -> (PathBuf, TinyLlama) {
    std::fs::create_dir_all(dir).expect("a temporary directory");
    let path = dir.join("bench.gguf");
    let shape = plan.model();
    let t0 = Instant::now();
    shape.write(&path).expect("the model is written");
    let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
    println!(
        "model: TinyLlama n_embd {} n_layer {} n_head {} n_head_kv {} n_ff {} (f32, {:.0} MB, written in {:.1} s to {})",
        shape.n_embd,
        shape.n_layer,
        shape.n_head,
        shape.n_head_kv,
        shape.n_ff,
        bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    (path, shape)
}

fn main() {
    let plan = Plan::new(smoke_mode());
    let dir =
        TempDir(std::env::temp_dir().join(format!("tether-bench-llama-{}", std::process::id())));
    let (path, _) = write_model(plan, &dir.0);
    let threads = NonZeroUsize::new(THREADS).expect("nonzero");
    let config = LlamaCppConfig {
        model_name: Some("bench".into()),
        n_ctx: N_CTX,
        max_sequences: MAX_SEQUENCES,
        batch_tokens: BATCH_TOKENS,
        default_max_tokens: 16,
        threads: Some(threads),
        ..LlamaCppConfig::new(&path)
    };
    let engine = Arc::new(LlamaCppEngine::load(config).expect("the engine loads the model"));
    let model = LlamaModel::load_from_file(
        backend().expect("llama.cpp's backend"),
        &path,
        &LlamaModelParams::default(),
    )
    .expect("the plain side loads the model");
    let mut plain = Plain::new(&model);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    rt.block_on(engine.start(0)).expect("the engine starts");
    let adapter = Adapter::new(
        engine.clone(),
        TokioRuntime::new(rt.handle().clone()),
        AdapterConfig::default(),
    );
    let mut json = serde_json::Map::new();

    // 1. Throughput.
    let n = plan.max_tokens;
    let prompts: Vec<Vec<u32>> = (0..MAX_SEQUENCES).map(|i| prompt(i, PROMPT_LEN)).collect();
    let mut rows = Vec::new();
    let mut throughput = Vec::new();
    let mut identical = Vec::new();
    let mut prefill8_ms = 0.0;
    let mut step1_ms = 0.0;
    for batch in [1, MAX_SEQUENCES] {
        let prompts = &prompts[..batch];
        let (mut tether, mut direct, mut bare) =
            (Side::default(), Side::default(), Side::default());
        // One warm-up run each (buffers allocated, pages faulted in), then in turn.
        rt.block_on(tether_run(&adapter, &engine, prompts, n, "warm"));
        rt.block_on(engine_run(&engine, prompts, n, "warm-engine"));
        plain.run(prompts, n);
        for rep in 0..plan.reps {
            let tag = format!("b{batch}-{rep}");
            tether.push(&rt.block_on(tether_run(&adapter, &engine, prompts, n, &tag)));
            let tag = format!("b{batch}-{rep}-engine");
            direct.push(&rt.block_on(engine_run(&engine, prompts, n, &tag)));
            bare.push(&plain.run(prompts, n));
        }
        let ratio = |side: &Side, of: fn(&Side) -> &Vec<f64>| {
            median(of(side).clone()) / median(of(&bare).clone())
        };
        let (ratio_e2e, ratio_decode) = (ratio(&tether, |s| &s.e2e), ratio(&tether, |s| &s.decode));
        let (engine_e2e, engine_decode) =
            (ratio(&direct, |s| &s.e2e), ratio(&direct, |s| &s.decode));
        rows.push(tether.row(batch, "tether"));
        rows.push(direct.row(batch, "engine"));
        rows.push(bare.row(batch, "plain"));
        rows.push(format!(
            "{batch:>5}  {:<7} {:>9.3} {:>17} {:>9.3}",
            "t/p", ratio_e2e, "", ratio_decode
        ));
        rows.push(format!(
            "{batch:>5}  {:<7} {:>9.3} {:>17} {:>9.3}",
            "e/p", engine_e2e, "", engine_decode
        ));
        let (same, diff) = same_tokens(&tether.tokens, &bare.tokens);
        identical.push(format!(
            "batch {batch}: {same} of {batch} sequences identical, tether and plain{}",
            diff.map_or(String::new(), |(s, at)| format!(
                " (sequence {s} first differs at token {at})"
            ))
        ));
        if batch == 1 {
            assert_eq!(
                tether.tokens, bare.tokens,
                "batch 1: tether and the plain loop give different tokens"
            );
            assert_eq!(
                direct.tokens, bare.tokens,
                "batch 1: the engine and the plain loop give different tokens"
            );
            step1_ms = 1e3 / median(bare.decode.clone());
        } else {
            prefill8_ms = median(bare.prefill_ms.clone());
        }
        throughput.push(tether.json(batch, "tether"));
        throughput.push(direct.json(batch, "engine"));
        throughput.push(bare.json(batch, "plain"));
        throughput.push(serde_json::json!({
            "batch": batch, "ratio_e2e": ratio_e2e, "ratio_decode": ratio_decode,
            "engine_ratio_e2e": engine_e2e, "engine_ratio_decode": engine_decode,
            "identical_sequences": same,
        }));
    }
    drop(plain);
    drop(model);
    println!();
    println!(
        "llama_cpp throughput: {THREADS} threads, n_ctx {N_CTX}, batch_tokens {BATCH_TOKENS}, prompts of {PROMPT_LEN} tokens, {n} tokens each (greedy, ignore_eos), {} reps, median [min-max]",
        plan.reps
    );
    println!(
        "{:>5}  {:<7} {:>27} {:>27} {:>9} {:>10}  steps",
        "batch", "side", "e2e tok/s", "decode tok/s", "ms/step", "prefill ms"
    );
    for row in &rows {
        println!("{row}");
    }
    for line in &identical {
        println!("{line}");
    }
    println!("plain decode step at batch 1: {step1_ms:.2} ms");
    json.insert("throughput".into(), throughput.into());
    json.insert("ms_per_step_batch1".into(), step1_ms.into());

    // 2. Abort to cells freed.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let bg = rt.block_on(async {
        let bg = background(&engine);
        until("the background sequences", || {
            engine.gauges().kv_sequences == BACKGROUND
        })
        .await;
        bg
    });
    // The two ways alternate, so that both see the background at the same ages.
    let (by_engine, by_tether) = rt.block_on(async {
        let (mut by_engine, mut by_tether) = (Vec::new(), Vec::new());
        for i in 0..2 * plan.abort_samples {
            let (how, out) = if i % 2 == 0 {
                (How::Engine, &mut by_engine)
            } else {
                (How::Tether, &mut by_tether)
            };
            out.push(decode_abort_sample(&engine, &adapter, how, i, &mut rng).await);
        }
        (by_engine, by_tether)
    });
    let mut latency_rows = Vec::new();
    let mut latency_json = Vec::new();
    let mut in_steps = Vec::new();
    for (name, samples) in [
        ("engine.abort, decoding (+3 seqs) -> Cancelled", &by_engine),
        (
            "Context::stop via Adapter, decoding (+3) -> Cancelled",
            &by_tether,
        ),
    ] {
        let (row, mut j) = latency_row(name, samples.iter().map(|s| s.0).collect());
        let mut fraction: Vec<f64> = samples
            .iter()
            .map(|(took, step)| took.as_secs_f64() / step.as_secs_f64().max(1e-9))
            .collect();
        fraction.sort_by(f64::total_cmp);
        let max = fraction.last().copied().unwrap_or(0.0);
        j["latency_over_step_median"] = median(fraction.clone()).into();
        j["latency_over_step_max"] = max.into();
        in_steps.push(format!("{:.2} (max {max:.2})", median(fraction)));
        latency_rows.push(row);
        latency_json.push(j);
    }
    let steps: Vec<f64> = by_engine
        .iter()
        .chain(&by_tether)
        .map(|s| ms(s.1))
        .collect();
    let (step_lo, step_hi) = range(&steps);
    let step_median = median(steps);
    rt.block_on(async {
        for task in &bg {
            task.abort();
        }
        until("the background's end", || {
            let g = engine.gauges();
            g.kv_sequences == 0 && g.live_sequences == 0
        })
        .await;
    });
    // A window of two 256-token prefill steps (measured on the plain side at batch 8).
    let window = Duration::from_secs_f64(2.0 * prefill8_ms / 1e3);
    let prefill = rt.block_on(async {
        let mut out = Vec::with_capacity(plan.prefill_samples);
        for i in 0..plan.prefill_samples {
            out.push(prefill_abort_sample(&engine, i, &mut rng, window).await);
        }
        out
    });
    let samples = prefill.iter().map(|s| s.0).collect();
    let max_steps_after = prefill.iter().map(|s| s.2).max().unwrap_or(0);
    let prefilled: Vec<u64> = prefill.iter().map(|s| s.1).collect();
    let (row, mut j) = latency_row(
        &format!("engine.abort, prefill of {LONG_PROMPT} -> Cancelled"),
        samples,
    );
    j["max_steps_after_abort"] = max_steps_after.into();
    j["prompt_tokens_prefilled_at_abort"] = prefilled.clone().into();
    latency_rows.push(row);
    latency_json.push(j);
    println!();
    println!("llama_cpp abort -> cells freed (Cancelled read; the engine sends it after seq_rm)");
    println!(
        "{:<52} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "case", "samples", "min ms", "p50 ms", "p99 ms", "mean ms", "max ms"
    );
    for row in &latency_rows {
        println!("{row}");
    }
    println!(
        "decode aborts: step (4 seqs, the victim's last token interval) {step_median:.2} ms median [{step_lo:.2}-{step_hi:.2}]; latency / step: engine.abort {}, Context::stop {}",
        in_steps[0], in_steps[1]
    );
    println!(
        "prefill aborts: at most {max_steps_after} step of {BATCH_TOKENS} tokens ended after the abort; prompt tokens prefilled at the abort: {}",
        prefilled.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    );
    json.insert("abort".into(), latency_json.into());
    json.insert("decode_step_ms_median".into(), step_median.into());

    rt.block_on(engine.cleanup()).expect("cleanup");
    let g = engine.gauges();
    assert_eq!((g.kv_cells, g.kv_sequences, g.live_sequences), (0, 0, 0));
    if plan.smoke {
        println!("llama_cpp: smoke run ok (--test), no figures written");
    } else {
        write_json(
            "llama_cpp",
            &serde_json::to_string_pretty(&serde_json::Value::Object(json)).expect("json"),
        );
    }
}
