//! `cancel_latency`: time from `context.stop()` on another task to the engine's
//! `abort()` being entered, tether versus the reference-design baseline, on each
//! executor. A plain binary (no criterion): it takes `SAMPLES` samples per case and
//! prints p50, p99, mean and max; `--test` takes a handful and writes nothing.
//!
//! One sample: generate (engine: one token, then nothing), read the token, yield so
//! the baseline's monitor is parked on its `select!`, spawn a task that reads the clock
//! and calls `stop()`, and wait for the engine to report the instant `abort()` was
//! entered. Figures go to `target/tether-bench/cancel_latency.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tether_benches::report::{percentile, smoke_mode, write_json};
use tether_benches::{
    tether_config, yield_now, Baseline, BenchEngine, CountingObserver, Flavor, Harness, Spawner,
    Tail,
};
use tether_core::context::Context;
use tether_core::drive::Adapter;
use tether_core::protocol::{Mode, Request};

const SAMPLES: usize = 10_000;
const WARM_UP: usize = 200;
const SMOKE_SAMPLES: usize = 10;

#[derive(Clone, Debug)]
enum Variant {
    Tether(Adapter),
    Baseline(Arc<Baseline>),
}

async fn sample(variant: &Variant, engine: &BenchEngine, spawner: &Spawner, i: usize) -> Duration {
    let id = format!("r{i}");
    let context = Context::new(id.as_str());
    let request = Request::new(id, "bench", vec![1, 2, 3]).with_max_tokens(1);
    let stopper = {
        let context = context.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = async move {
            let t0 = Instant::now();
            context.stop();
            let _ = tx.send(t0);
        };
        (task, rx)
    };
    let (stop_task, stopped_at) = stopper;
    let aborted_at = match variant {
        Variant::Tether(adapter) => {
            let mut stream = adapter.generate(request, context).await.expect("generate");
            let first = stream.next().await.expect("a first chunk");
            assert!(first.data.is_some_and(|c| c.has_tokens()));
            settle().await;
            spawner.spawn(stop_task);
            let at = engine.abort_entered().await;
            drop(stream);
            at
        }
        Variant::Baseline(baseline) => {
            let mut stream = baseline.generate(request, context).await.expect("generate");
            let first = stream.next().await.expect("a first chunk");
            assert!(first.data.is_some_and(|c| c.has_tokens()));
            settle().await;
            spawner.spawn(stop_task);
            let at = engine.abort_entered().await;
            drop(stream);
            at
        }
    };
    let t0 = stopped_at.await.expect("the stopper ran");
    aborted_at.saturating_duration_since(t0)
}

/// Let freshly spawned tasks (the baseline's monitor) run to their first await.
async fn settle() {
    for _ in 0..4 {
        yield_now().await;
    }
}

async fn measure(
    variant: Variant,
    engine: Arc<BenchEngine>,
    spawner: Spawner,
    n: usize,
    warm_up: usize,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..warm_up + n {
        let d = sample(&variant, &engine, &spawner, i).await;
        if i >= warm_up {
            samples.push(d);
        }
    }
    samples
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn main() {
    let smoke = smoke_mode();
    let (n, warm_up) = if smoke {
        (SMOKE_SAMPLES, 0)
    } else {
        (SAMPLES, WARM_UP)
    };
    let mut rows = Vec::new();
    println!("cancel_latency: stop() on another task -> engine abort() entered ({n} samples)");
    println!(
        "{:<10} {:<9} {:>9} {:>9} {:>9} {:>9}",
        "runtime", "variant", "p50 ns", "p99 ns", "mean ns", "max ns"
    );
    for flavor in Flavor::ALL {
        let harness = Harness::new(flavor);
        for name in ["tether", "baseline"] {
            let engine = BenchEngine::new(Tail::Hang);
            let observer = CountingObserver::new();
            let variant = match name {
                "tether" => Variant::Tether(
                    harness.adapter(engine.clone(), tether_config(observer.clone())),
                ),
                _ => Variant::Baseline(Arc::new(Baseline::new(
                    engine.clone(),
                    harness.spawner(None),
                    Mode::Aggregated,
                ))),
            };
            let spawner = harness.spawner(None);
            let mut samples =
                harness.block_on(measure(variant, engine.clone(), spawner, n, warm_up));
            assert_eq!(
                engine.aborts(),
                (n + warm_up) as u64,
                "{name}: one abort per stopped request"
            );
            samples.sort_unstable();
            let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
            let mean =
                samples.iter().sum::<Duration>() / u32::try_from(samples.len()).unwrap_or(1).max(1);
            let max = samples.last().copied().unwrap_or_default();
            println!(
                "{:<10} {:<9} {:>9} {:>9} {:>9} {:>9}",
                flavor.name(),
                name,
                ns(p50),
                ns(p99),
                ns(mean),
                ns(max)
            );
            rows.push(serde_json::json!({
                "runtime": flavor.name(),
                "variant": name,
                "samples": samples.len(),
                "p50_ns": ns(p50),
                "p99_ns": ns(p99),
                "mean_ns": ns(mean),
                "max_ns": ns(max),
            }));
        }
    }
    if smoke {
        println!("cancel_latency: smoke run ok (--test), no figures written");
    } else {
        write_json(
            "cancel_latency",
            &serde_json::to_string_pretty(&rows).expect("json"),
        );
    }
}
