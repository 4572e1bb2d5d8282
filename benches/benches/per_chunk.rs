//! `per_chunk`: drain 1 000 single-token chunks (plus the terminal) three ways, on each
//! executor: `raw` (the engine stream consumed directly), `minimal` (the floor wrapper
//! of `tether_benches::minimal`) and `tether` (the Adapter, spans off, observer on).
//! One iteration is one stream of 1 000 chunks; the chunks are prepared outside the
//! timed region. Report: time per iteration / 1 000 = ns per chunk.

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_core::Stream;
use tether_benches::{
    script, tether_config, BenchEngine, CountingObserver, Flavor, Harness, Minimal, Tail,
};
use tether_core::context::Context;
use tether_core::drive::{Adapter, Runtime};
use tether_core::engine::{GenerateContext, LlmEngine};
use tether_core::protocol::Request;

const CHUNKS: usize = 1000;

#[derive(Clone, Copy, Debug)]
enum Variant {
    Raw,
    Minimal,
    Tether,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Raw => "raw",
            Variant::Minimal => "minimal",
            Variant::Tether => "tether",
        }
    }
}

/// Drains a stream, counting items. A named future with an out-of-line `poll` so a
/// profiler can isolate the drain (`valgrind --tool=callgrind --toggle-collect='*Drain*poll*'`).
struct Drain<S> {
    stream: S,
    n: usize,
}

impl<S: Stream + Unpin> Future for Drain<S> {
    type Output = usize;

    #[inline(never)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<usize> {
        loop {
            match Pin::new(&mut self.stream).poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    black_box(&item);
                    self.n += 1;
                }
                Poll::Ready(None) => return Poll::Ready(self.n),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

fn drain<S: Stream + Unpin>(stream: S) -> Drain<S> {
    Drain { stream, n: 0 }
}

async fn run(
    variant: Variant,
    engine: Arc<BenchEngine>,
    adapter: Adapter,
    runtime: Arc<dyn Runtime>,
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        engine.prepare(script(CHUNKS));
        let context = Context::new("bench");
        let request = Request::new("bench", "bench", vec![1]);
        let start = Instant::now();
        let n = match variant {
            Variant::Raw => {
                let gctx = GenerateContext::new(context, "bench");
                drain(engine.generate(request, gctx).await.expect("generate")).await
            }
            Variant::Minimal => {
                let gctx = GenerateContext::new(context, "bench");
                let stream = engine.generate(request, gctx).await.expect("generate");
                drain(Minimal::new(stream, runtime.clone())).await
            }
            Variant::Tether => {
                drain(adapter.generate(request, context).await.expect("generate")).await
            }
        };
        total += start.elapsed();
        assert_eq!(n, CHUNKS + 1, "every chunk and the terminal come through");
    }
    total
}

fn per_chunk(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_chunk");
    group.throughput(Throughput::Elements(CHUNKS as u64));
    for flavor in Flavor::ALL {
        let harness = Harness::new(flavor);
        let engine = BenchEngine::new(Tail::End);
        let observer = CountingObserver::new();
        let adapter = harness.adapter(engine.clone(), tether_config(observer.clone()));
        let runtime = harness.runtime();
        for variant in [Variant::Raw, Variant::Minimal, Variant::Tether] {
            group.bench_function(BenchmarkId::new(variant.name(), flavor.name()), |b| {
                b.iter_custom(|iters| {
                    let (engine, adapter, runtime) =
                        (engine.clone(), adapter.clone(), runtime.clone());
                    harness.block_on(run(variant, engine, adapter, runtime, iters))
                });
            });
        }
        assert_eq!(engine.aborts(), 0, "the happy path never aborts");
    }
    group.finish();
}

criterion_group!(benches, per_chunk);
criterion_main!(benches);
