//! `in_flight_memory`: heap bytes per idle in-flight request at 10 000, 100 000 and
//! 1 000 000 requests (1 000 000 only in a full run), for `raw` (the engine stream and
//! the request's `Context`, held as a server holds them), `tether` and `baseline`, on a
//! tokio current-thread runtime and on smol. A plain binary with a counting global
//! allocator (stats_alloc); `--test` runs 1 000 requests and writes nothing.
//!
//! Idle means: generated, polled once (the engine has nothing yet), and for the
//! baseline its monitor task has run to its first await. The figure is the net heap
//! growth (allocated − freed) divided by the number of requests, including the slot
//! each stream takes in the `Vec` that holds them. The adapter's own share is the
//! figure minus `raw`'s. The baseline's spawner wraps each monitor in a counter
//! (`TaskCount`, one `Arc` and a small guard: about 16 bytes of its task) so the bench
//! knows when every monitor has started. Figures go to
//! `target/tether-bench/in_flight_memory.json`.

use std::alloc::System;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use futures_core::Stream;
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};
use tether_benches::report::{smoke_mode, write_json};
use tether_benches::{
    tether_config, yield_now, Baseline, BenchEngine, CountingObserver, Flavor, Harness, Tail,
    TaskCount,
};
use tether_core::context::Context;
use tether_core::engine::{GenerateContext, LlmEngine};
use tether_core::protocol::{Mode, Request};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
const SMOKE_SIZES: [usize; 1] = [1_000];
const WARM_UP: usize = 1_000;

/// Live heap bytes (allocated − freed, reallocations included) and allocations made,
/// since the process began.
fn live_bytes() -> (i128, usize) {
    let s = GLOBAL.stats();
    let live =
        s.bytes_allocated as i128 - s.bytes_deallocated as i128 + s.bytes_reallocated as i128;
    (live, s.allocations)
}

/// What one measurement found, per request.
#[derive(Clone, Copy, Debug)]
struct PerRequest {
    bytes: f64,
    allocations: f64,
}

fn request(i: usize) -> (Context, Request) {
    let id = format!("r{i}");
    // No tokens, no terminal: the engine stream stays pending (Tail::Hang).
    let request = Request::new(id.as_str(), "bench", vec![1, 2, 3]).with_max_tokens(0);
    (Context::new(id), request)
}

/// Poll once with the task's waker, as a server's first `next().await` would.
async fn poll_once<S: Stream + Unpin>(stream: &mut S) {
    poll_fn(|cx| {
        assert!(
            Pin::new(&mut *stream).poll_next(cx).is_pending(),
            "an idle request yields nothing"
        );
        Poll::Ready(())
    })
    .await;
}

/// Heap per request while `n` requests are in flight; everything is torn down before
/// it returns.
async fn measure(harness_adapter: Variants, n: usize) -> PerRequest {
    let inputs: Vec<(Context, Request)> = (0..n).map(request).collect();
    let before = live_bytes();
    let after = match harness_adapter {
        Variants::Raw(engine) => {
            let mut held = Vec::with_capacity(n);
            for (context, request) in inputs {
                let gctx = GenerateContext::new(context.clone(), request.id.as_str());
                let mut stream = engine.generate(request, gctx).await.expect("generate");
                poll_once(&mut stream).await;
                held.push((stream, context));
            }
            let after = live_bytes();
            drop(held);
            after
        }
        Variants::Tether(adapter, engine) => {
            let aborted = engine.aborts();
            let mut held = Vec::with_capacity(n);
            for (context, request) in inputs {
                let mut stream = adapter.generate(request, context).await.expect("generate");
                poll_once(&mut stream).await;
                held.push(stream);
            }
            let after = live_bytes();
            // Dropping an in-flight request aborts it (rule 4): let every abort task
            // run and be freed before the next measurement starts.
            drop(held);
            while engine.aborts() < aborted + n as u64 {
                yield_now().await;
            }
            for _ in 0..4 {
                yield_now().await;
            }
            after
        }
        Variants::Baseline(baseline, count) => {
            count.reset_started();
            let mut held = Vec::with_capacity(n);
            for (context, request) in inputs {
                let mut stream = baseline.generate(request, context).await.expect("generate");
                poll_once(&mut stream).await;
                held.push(stream);
            }
            count.wait_started(n).await;
            let after = live_bytes();
            drop(held);
            count.wait_idle().await;
            after
        }
    };
    PerRequest {
        bytes: (after.0 - before.0) as f64 / n as f64,
        allocations: (after.1 - before.1) as f64 / n as f64,
    }
}

#[derive(Clone, Debug)]
enum Variants {
    Raw(Arc<BenchEngine>),
    Tether(tether_core::drive::Adapter, Arc<BenchEngine>),
    Baseline(Arc<Baseline>, Arc<TaskCount>),
}

fn main() {
    let smoke = smoke_mode();
    let sizes: &[usize] = if smoke { &SMOKE_SIZES } else { &SIZES };
    let mut rows = Vec::new();
    println!("in_flight_memory: heap bytes per idle in-flight request");
    println!(
        "(size_of: tether ResponseStream {} B, baseline stream handle {} B, engine ChunkStream {} B, Context {} B)",
        std::mem::size_of::<tether_core::drive::ResponseStream>(),
        std::mem::size_of::<tether_benches::BaselineStream>(),
        std::mem::size_of::<tether_core::engine::ChunkStream>(),
        std::mem::size_of::<Context>(),
    );
    println!(
        "{:<10} {:<9} {:>10} {:>10} {:>10} {:>10}",
        "runtime", "variant", "n", "B/request", "over raw", "allocs/req"
    );
    for flavor in [Flavor::TokioCt, Flavor::Smol] {
        let harness = Harness::new(flavor);
        let engine = BenchEngine::new(Tail::Hang);
        let observer = CountingObserver::new();
        let count = TaskCount::new();
        let adapter = harness.adapter(engine.clone(), tether_config(observer.clone()));
        let baseline = Arc::new(Baseline::new(
            engine.clone(),
            harness.spawner(Some(count.clone())),
            Mode::Aggregated,
        ));
        // Warm-up: the executor's and reactor's one-time allocations (async-io starts
        // lazily, queues grow) must not land in the first measurement.
        for name in ["raw", "tether", "baseline"] {
            let variant = match name {
                "raw" => Variants::Raw(engine.clone()),
                "tether" => Variants::Tether(adapter.clone(), engine.clone()),
                _ => Variants::Baseline(baseline.clone(), count.clone()),
            };
            harness.block_on(async move { measure(variant, WARM_UP).await });
        }
        for &n in sizes {
            let mut raw = 0.0;
            for name in ["raw", "tether", "baseline"] {
                let variant = match name {
                    "raw" => Variants::Raw(engine.clone()),
                    "tether" => Variants::Tether(adapter.clone(), engine.clone()),
                    _ => Variants::Baseline(baseline.clone(), count.clone()),
                };
                let per = harness.block_on(async move { measure(variant, n).await });
                if name == "raw" {
                    raw = per.bytes;
                }
                let over = per.bytes - raw;
                println!(
                    "{:<10} {:<9} {:>10} {:>10.1} {:>10.1} {:>10.2}",
                    flavor.name(),
                    name,
                    n,
                    per.bytes,
                    over,
                    per.allocations
                );
                rows.push(serde_json::json!({
                    "runtime": flavor.name(),
                    "variant": name,
                    "requests": n,
                    "bytes_per_request": per.bytes,
                    "allocations_per_request": per.allocations,
                    "bytes_over_raw": over,
                }));
            }
        }
        // tether aborts every dropped in-flight request; the baseline aborts none.
        let tether_requests: usize = sizes.iter().sum::<usize>() + WARM_UP;
        assert_eq!(
            engine.aborts(),
            tether_requests as u64,
            "one abort per dropped tether request"
        );
    }
    if smoke {
        println!("in_flight_memory: smoke run ok (--test), no figures written");
    } else {
        write_json(
            "in_flight_memory",
            &serde_json::to_string_pretty(&rows).expect("json"),
        );
    }
}
