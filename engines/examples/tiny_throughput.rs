//! Decode throughput of the tiny transformer, in tokens per second, at batch 1 and
//! batch 32: through a started `TinyEngine` (scheduler, channels and all) and through
//! the bare model. Run it optimized:
//!
//! ```text
//! cargo run --release -p tether-engines --example tiny_throughput [-- cpu|cuda]
//! ```

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tether_core::{Context, GenerateContext, LlmEngine, Request};
use tether_engines::tiny::{Device, TinyConfig, TinyEngine, TinyModel};

/// Output tokens per request.
const NEW_TOKENS: u32 = 128;
/// Prompt tokens per request.
const PROMPT: usize = 16;
/// Runs of each measurement; the fastest is reported.
const RUNS: usize = 5;

fn prompts(batch: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|i| {
            (0..PROMPT)
                .map(|j| ((i * 31 + j * 7) % 256) as u32)
                .collect()
        })
        .collect()
}

/// Tokens per second through the engine: `batch` requests at once, all streams read
/// concurrently.
async fn engine_tokens_per_s(engine: &TinyEngine, batch: usize) -> f64 {
    let started = Instant::now();
    let mut streams = Vec::new();
    for (i, prompt) in prompts(batch).into_iter().enumerate() {
        let id = format!("bench-{i}");
        let request = Request::new(id.clone(), "tiny", prompt).with_max_tokens(NEW_TOKENS);
        let gctx = GenerateContext::new(Context::new(id.clone()), id);
        streams.push(engine.generate(request, gctx).await.expect("generate"));
    }
    let counts = futures_util::future::join_all(streams.into_iter().map(|s| async move {
        s.map(|item| item.expect("no error").token_ids.len())
            .fold(0usize, |a, n| async move { a + n })
            .await
    }))
    .await;
    let tokens: usize = counts.iter().sum();
    assert_eq!(tokens, batch * NEW_TOKENS as usize);
    tokens as f64 / started.elapsed().as_secs_f64()
}

/// Tokens per second of the bare model decoding `batch` sequences in one batch.
fn model_tokens_per_s(model: &mut TinyModel, batch: usize) -> f64 {
    let started = Instant::now();
    let out = model
        .greedy_batch(&prompts(batch), NEW_TOKENS as usize)
        .expect("decode");
    let tokens: usize = out.iter().map(Vec::len).sum();
    tokens as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let device: Device = std::env::args()
        .nth(1)
        .map_or(Ok(Device::Cpu), |d| d.parse())
        .unwrap_or_else(|e| panic!("{e}"));
    let config = TinyConfig {
        device,
        ..TinyConfig::default()
    };
    let mut model = match TinyModel::new(&config) {
        Ok(model) => model,
        Err(e) => {
            println!("skipped: {device} is not usable here: {e}");
            return;
        }
    };
    println!(
        "tiny transformer: {} layers, {} heads, d_model {}, d_ff {}, vocab {}, {} parameters, on {}",
        config.layers,
        config.heads,
        config.d_model,
        config.d_ff,
        config.vocab_size,
        config.parameters(),
        model.device()
    );
    println!("prompt {PROMPT} tokens, {NEW_TOKENS} new tokens per sequence, greedy");

    println!("best of {RUNS} runs each (a busy machine only makes runs slower)");
    // Warm up (caches, page faults, kernel JIT).
    model_tokens_per_s(&mut model, 4);
    for batch in [1, 32] {
        let rate = (0..RUNS)
            .map(|_| model_tokens_per_s(&mut model, batch))
            .fold(0.0, f64::max);
        println!("model   batch {batch:>2}: {rate:>9.0} tokens/s");
    }
    drop(model);

    let runtime = tether_smol::SmolRuntime::global();
    let engine = Arc::new(TinyEngine::new(config, runtime));
    smol::block_on(async {
        engine.start(0).await.expect("start");
        engine_tokens_per_s(&engine, 4).await;
        for batch in [1, 32] {
            let mut rate = 0.0f64;
            for _ in 0..RUNS {
                rate = rate.max(engine_tokens_per_s(&engine, batch).await);
            }
            println!("engine  batch {batch:>2}: {rate:>9.0} tokens/s");
        }
        engine.cleanup().await.expect("cleanup");
    });
}
