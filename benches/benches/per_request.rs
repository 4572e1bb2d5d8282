//! `per_request`: generate, read one chunk, finish (read to the end), with 1, 256 and
//! 4 096 requests in flight at once, on each executor: `raw` (the engine directly),
//! `minimal` (the floor wrapper of `tether_benches::minimal`: a bare wrapper, not a
//! lifecycle layer), `tether` (the Adapter, spans off, observer on) and `baseline` (the reference design
//! of `tether_benches::baseline`). One iteration is 4 096 requests, run in waves of
//! `in_flight`; contexts and requests are built outside the timed region. For the
//! baseline, each wave waits until its monitor tasks have ended (their work is part of
//! the cost). Report: time per iteration / 4 096 = ns per request.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use futures_core::Stream;
use futures_util::StreamExt;
use tether_benches::{
    tether_config, Baseline, BenchEngine, CountingObserver, Flavor, Harness, Minimal, Tail,
    TaskCount,
};
use tether_core::context::Context;
use tether_core::drive::{Adapter, Runtime};
use tether_core::engine::{GenerateContext, LlmEngine};
use tether_core::protocol::{Mode, Request};

/// Requests per iteration, whatever the number in flight.
const PER_ITER: usize = 4096;
const IN_FLIGHT: [usize; 3] = [1, 256, 4096];

#[derive(Clone, Debug)]
enum Variant {
    Raw(Arc<BenchEngine>),
    Minimal(Arc<BenchEngine>, Arc<dyn Runtime>),
    Tether(Adapter),
    Baseline(Arc<Baseline>, Arc<TaskCount>),
}

impl Variant {
    fn name(&self) -> &'static str {
        match self {
            Variant::Raw(_) => "raw",
            Variant::Minimal(..) => "minimal",
            Variant::Tether(_) => "tether",
            Variant::Baseline(..) => "baseline",
        }
    }
}

/// Read the first chunk, then the rest.
async fn first_then_finish<S: Stream + Unpin>(streams: &mut [S]) {
    for s in streams.iter_mut() {
        black_box(s.next().await.expect("a first chunk"));
    }
    for s in streams.iter_mut() {
        while let Some(item) = s.next().await {
            black_box(&item);
        }
    }
}

async fn wave(variant: &Variant, inputs: Vec<(Context, Request)>) {
    match variant {
        Variant::Raw(engine) => {
            let mut streams = Vec::with_capacity(inputs.len());
            for (context, request) in inputs {
                let gctx = GenerateContext::new(context, request.id.as_str());
                streams.push(engine.generate(request, gctx).await.expect("generate"));
            }
            first_then_finish(&mut streams).await;
        }
        Variant::Minimal(engine, runtime) => {
            let mut streams = Vec::with_capacity(inputs.len());
            for (context, request) in inputs {
                let gctx = GenerateContext::new(context, request.id.as_str());
                let stream = engine.generate(request, gctx).await.expect("generate");
                streams.push(Minimal::new(stream, runtime.clone()));
            }
            first_then_finish(&mut streams).await;
        }
        Variant::Tether(adapter) => {
            let mut streams = Vec::with_capacity(inputs.len());
            for (context, request) in inputs {
                streams.push(adapter.generate(request, context).await.expect("generate"));
            }
            first_then_finish(&mut streams).await;
        }
        Variant::Baseline(baseline, count) => {
            let mut streams = Vec::with_capacity(inputs.len());
            for (context, request) in inputs {
                streams.push(baseline.generate(request, context).await.expect("generate"));
            }
            first_then_finish(&mut streams).await;
            drop(streams);
            count.wait_idle().await;
        }
    }
}

async fn run(variant: Variant, in_flight: usize, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut waves: Vec<Vec<(Context, Request)>> = (0..PER_ITER / in_flight)
            .map(|w| {
                (0..in_flight)
                    .map(|i| {
                        let id = format!("r{}", w * in_flight + i);
                        let request =
                            Request::new(id.as_str(), "bench", vec![1, 2, 3]).with_max_tokens(1);
                        (Context::new(id), request)
                    })
                    .collect()
            })
            .collect();
        let start = Instant::now();
        for inputs in waves.drain(..) {
            wave(&variant, inputs).await;
        }
        total += start.elapsed();
    }
    total
}

fn per_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_request");
    group.throughput(Throughput::Elements(PER_ITER as u64));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    for flavor in Flavor::ALL {
        let harness = Harness::new(flavor);
        let engine = BenchEngine::new(Tail::End);
        let observer = CountingObserver::new();
        let count = TaskCount::new();
        let variants = [
            Variant::Raw(engine.clone()),
            Variant::Minimal(engine.clone(), harness.runtime()),
            Variant::Tether(harness.adapter(engine.clone(), tether_config(observer.clone()))),
            Variant::Baseline(
                Arc::new(Baseline::new(
                    engine.clone(),
                    harness.spawner(Some(count.clone())),
                    Mode::Aggregated,
                )),
                count.clone(),
            ),
        ];
        for variant in variants {
            for in_flight in IN_FLIGHT {
                let id =
                    BenchmarkId::new(format!("{}/{}", variant.name(), flavor.name()), in_flight);
                group.bench_with_input(id, &in_flight, |b, &in_flight| {
                    b.iter_custom(|iters| harness.block_on(run(variant.clone(), in_flight, iters)));
                });
            }
        }
        assert_eq!(engine.aborts(), 0, "the happy path never aborts");
    }
    group.finish();
}

criterion_group!(benches, per_request);
criterion_main!(benches);
