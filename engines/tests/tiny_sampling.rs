//! TinyEngine's sampling, every scenario on tokio (paused clock) and on smol: what it
//! declares, seeded sampling that reproduces whatever the batch, seeds that differ,
//! and the parameter values that must leave greedy decoding exactly as it was.

mod common;

use tether_core::{ErrorKind, FinishReason, LlmEngine, Request, SupportedParams};
use tether_engines::tiny::{TinyConfig, TinyEngine};

use common::tiny::{config, started, TETHER, TETHER_SEED0};
use common::{collect, gctx, on_both, terminal, tokens, Rt};

on_both!(
    declares_what_it_honours,
    same_seed_same_tokens_whatever_the_batch,
    different_seeds_give_different_tokens,
    degenerate_sampling_is_greedy,
    bad_sampling_values_are_setup_errors,
);

/// What [`config`]'s model answers to `b"tether"` at temperature 1 with seed 11.
const TETHER_SEED11: [u32; 16] = [
    43, 102, 7, 223, 119, 26, 19, 125, 96, 187, 92, 193, 132, 82, 208, 155,
];

/// A request for 16 tokens after `prompt`, sampled at `temperature` with `seed`.
fn sampled(id: &str, prompt: &[u32], temperature: Option<f32>, seed: Option<u64>) -> Request {
    let mut r = Request::new(id, "tiny", prompt.to_vec()).with_max_tokens(16);
    r.sampling.temperature = temperature;
    r.sampling.seed = seed;
    r
}

/// Generate `request` alone and return its tokens.
async fn run(engine: &TinyEngine, request: Request) -> Vec<u32> {
    let id = request.id.clone();
    let items = collect(engine.generate(request, gctx(&id)).await.unwrap()).await;
    assert_eq!(
        terminal(&items).finish_reason,
        Some(FinishReason::Length),
        "{id}"
    );
    tokens(&items)
}

async fn declares_what_it_honours(rt: Rt) {
    let engine = TinyEngine::new(config(), rt);
    let declared = engine.start(0).await.unwrap().supported;
    assert_eq!(declared, TinyEngine::SUPPORTED);
    assert_eq!(
        declared,
        SupportedParams::NONE
            .with_temperature(true)
            .with_top_p(true)
            .with_top_k(true)
            .with_seed(true)
            .with_min_tokens(true)
            .with_ignore_eos(true)
    );
}

async fn same_seed_same_tokens_whatever_the_batch(rt: Rt) {
    let engine = started(config(), rt.clone()).await;
    let alone = run(&engine, sampled("a", &TETHER, Some(1.0), Some(11))).await;
    assert_eq!(alone, TETHER_SEED11);
    assert_ne!(alone, TETHER_SEED0, "temperature 1 samples");
    assert_eq!(
        run(&engine, sampled("b", &TETHER, Some(1.0), Some(11))).await,
        alone
    );
    // In a batch with greedy and other sampled requests, on an engine that prefills
    // in chunks of 4: the same tokens.
    let chunked = started(
        TinyConfig {
            prefill_tokens_per_step: 4,
            ..config()
        },
        rt,
    )
    .await;
    let others = [
        sampled("greedy", &[1, 2, 3, 4, 5, 6, 7, 8, 9], None, None),
        sampled("other-seed", &TETHER, Some(1.0), Some(12)),
        sampled("unseeded", &[200; 20], Some(1.3), None),
    ];
    let mut streams = Vec::new();
    for r in others
        .into_iter()
        .chain([sampled("c", &TETHER, Some(1.0), Some(11))])
    {
        let id = r.id.clone();
        streams.push(chunked.generate(r, gctx(&id)).await.unwrap());
    }
    let together = futures_util::future::join_all(streams.into_iter().map(collect)).await;
    assert_eq!(tokens(&together[3]), alone);
    assert_eq!(tokens(&together[0]).len(), 16);
    assert_eq!(chunked.gauges().live_sequences, 0);
}

async fn different_seeds_give_different_tokens(rt: Rt) {
    let engine = started(config(), rt).await;
    let mut seen = Vec::new();
    for seed in [11, 12, 13] {
        let toks = run(&engine, sampled("s", &TETHER, Some(1.0), Some(seed))).await;
        assert!(
            !seen.contains(&toks),
            "seed {seed} repeated another seed's tokens"
        );
        seen.push(toks);
    }
    assert_eq!(seen[0], TETHER_SEED11);
    // Without a seed each request gets a fresh one. (Two equal 16-token draws at
    // temperature 1 from this model would take odds far below 1e-20.)
    let a = run(&engine, sampled("u1", &TETHER, Some(1.0), None)).await;
    let b = run(&engine, sampled("u2", &TETHER, Some(1.0), None)).await;
    assert_ne!(a, b, "two unseeded requests drew the same tokens");
}

async fn degenerate_sampling_is_greedy(rt: Rt) {
    let engine = started(config(), rt).await;
    // Temperature absent or 0: greedy, whatever the seed, top_k and top_p say.
    let mut r = sampled("none", &TETHER, None, Some(11));
    r.sampling.top_k = Some(3);
    r.sampling.top_p = Some(0.5);
    assert_eq!(run(&engine, r.clone()).await, TETHER_SEED0);
    r.sampling.temperature = Some(0.0);
    assert_eq!(run(&engine, r).await, TETHER_SEED0);
    // top_k = 1 keeps only the best token, at any temperature.
    let mut r = sampled("k1", &TETHER, Some(2.0), Some(11));
    r.sampling.top_k = Some(1);
    assert_eq!(run(&engine, r).await, TETHER_SEED0);
    // A tiny top_p keeps only the best token too.
    let mut r = sampled("p", &TETHER, Some(2.0), Some(11));
    r.sampling.top_p = Some(1e-6);
    assert_eq!(run(&engine, r).await, TETHER_SEED0);
    // top_k = 0 means no limit: the same as leaving it out.
    let mut r = sampled("k0", &TETHER, Some(1.0), Some(11));
    r.sampling.top_k = Some(0);
    assert_eq!(run(&engine, r).await, TETHER_SEED11);
}

async fn bad_sampling_values_are_setup_errors(rt: Rt) {
    let engine = started(config(), rt).await;
    for (temperature, top_p) in [
        (Some(-0.5), None),
        (Some(f32::INFINITY), None),
        (Some(1.0), Some(0.0)),
        (Some(1.0), Some(1.5)),
        (None, Some(-1.0)),
    ] {
        let mut r = sampled("bad", &TETHER, temperature, None);
        r.sampling.top_p = top_p;
        let err = engine
            .generate(r, gctx("bad"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{temperature:?} {top_p:?} accepted"));
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    }
    assert_eq!(engine.gauges().accepted, 0);
}
