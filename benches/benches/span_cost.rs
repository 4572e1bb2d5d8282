//! `span_cost`: per-request cost of the `engine.generate` span. The same request as
//! `per_request` at one in flight (generate, read one chunk, finish), on a
//! current-thread tokio runtime and on smol (a thread-local subscriber reaches every
//! task there; on tokio multi-thread it would not, and the span code is the same):
//! - `spans_off`: `AdapterConfig::spans = false`;
//! - `no_subscriber`: spans on, no subscriber installed (the default configuration);
//! - `subscriber`: spans on, a `tracing-subscriber` registry with a `fmt` layer writing
//!   to `io::sink`, filtered to target `request_span`.
//!
//! `no_subscriber` runs before any subscriber exists in the process: once one was set,
//! every callsite re-checks its interest.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use futures_util::StreamExt;
use tether_benches::{tether_config, BenchEngine, CountingObserver, Flavor, Harness, Tail};
use tether_core::context::Context;
use tether_core::drive::{Adapter, SPAN_TARGET};
use tether_core::protocol::{Request, TraceLink};
use tether_core::TraceIdHook;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

const PER_ITER: usize = 256;

async fn run(adapter: Adapter, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let inputs: Vec<(Context, Request)> = (0..PER_ITER)
            .map(|i| {
                let id = format!("r{i}");
                let request = Request::new(id.as_str(), "bench", vec![1, 2, 3]).with_max_tokens(1);
                (Context::new(id), request)
            })
            .collect();
        let start = Instant::now();
        for (context, request) in inputs {
            let mut stream = adapter.generate(request, context).await.expect("generate");
            while let Some(item) = stream.next().await {
                black_box(&item);
            }
        }
        total += start.elapsed();
    }
    total
}

/// A trace-id hook that names the request span's own id: it answers only for a span a
/// subscriber records, so the first token's link tells whether the span is real.
struct SpanIds;

impl TraceIdHook for SpanIds {
    fn trace_link(&self, span: &tracing::Span) -> Option<TraceLink> {
        TraceLink::from_ids(1, span.id()?.into_u64())
    }
}

/// The span is really recorded (or really not): the first token carries a
/// `worker_trace_link` (from [`SpanIds`]) only when a subscriber records it.
async fn first_link_present(adapter: Adapter) -> bool {
    let request = Request::new("probe", "bench", vec![1]).with_max_tokens(1);
    let mut stream = adapter
        .generate(request, Context::new("probe"))
        .await
        .expect("generate");
    let first = stream.next().await.expect("a first chunk");
    first
        .data
        .is_some_and(|chunk| chunk.worker_trace_link.is_some())
}

fn span_cost(c: &mut Criterion) {
    let mut group = c.benchmark_group("span_cost");
    group.throughput(Throughput::Elements(PER_ITER as u64));
    // One iteration is 256 requests (up to ~1 ms with a subscriber): flat sampling keeps
    // the run within its measurement time.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(50);
    let flavors = [Flavor::TokioCt, Flavor::Smol];
    let harnesses: Vec<Harness> = flavors.into_iter().map(Harness::new).collect();
    let engine = BenchEngine::new(Tail::End);
    let observer = CountingObserver::new();
    let config = |spans: bool| {
        let mut cfg = tether_config(observer.clone()).trace_id_hook(Arc::new(SpanIds));
        cfg.spans = spans;
        cfg
    };
    let bench = |group: &mut criterion::BenchmarkGroup<'_, _>, name: &str, spans: bool| {
        for harness in &harnesses {
            let adapter = harness.adapter(engine.clone(), config(spans));
            let recorded = harness.block_on(first_link_present(adapter.clone()));
            assert_eq!(
                recorded,
                spans && name == "subscriber",
                "{name}: span recorded?"
            );
            group.bench_function(BenchmarkId::new(name, harness.flavor().name()), |b| {
                b.iter_custom(|iters| harness.block_on(run(adapter.clone(), iters)));
            });
        }
    };
    bench(&mut group, "spans_off", false);
    bench(&mut group, "no_subscriber", true);
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::INFO)),
    );
    // Thread-local: the current-thread runtime and the smol executor run every task on
    // this thread.
    let _default = tracing::subscriber::set_default(subscriber);
    bench(&mut group, "subscriber", true);
    group.finish();
}

criterion_group!(benches, span_cost);
criterion_main!(benches);
