//! `sse_load`: a small streaming load generator for `benches/serve.sh`, until
//! `tether load --url` replaces it there. N `POST /v1/completions` requests
//! (`stream: true`) at concurrency C over a pooled keep-alive hyper client with
//! `TCP_NODELAY`, each read to its end; reports requests/s, client-side time to first
//! token (the first body frame after the head) and the client's own CPU.
//!
//! ```text
//! sse_load --url http://127.0.0.1:8000 [--requests 20000] [--warmup 2000]
//!          [--concurrency 64] [--max-tokens 16] [--model sim] [--threads 1]
//! ```
//! Prints one line of `key=value` pairs: `requests`, `errors`, `elapsed_s`, `rps`,
//! `ttft_p50_us`, `ttft_p99_us`, `events_per_request`, `cpu_ticks` (the client's
//! utime+stime, in clock ticks).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

struct Plan {
    url: String,
    requests: usize,
    warmup: usize,
    concurrency: usize,
    body: Bytes,
}

#[derive(Default)]
struct Tally {
    ttft: Vec<Duration>,
    errors: usize,
    events: usize,
}

async fn one(client: &Client<HttpConnector, Full<Bytes>>, plan: &Plan, tally: &mut Tally) {
    let request = Request::post(plan.url.as_str())
        .header("content-type", "application/json")
        .body(Full::new(plan.body.clone()))
        .expect("a valid request");
    let started = Instant::now();
    let Ok(response) = client.request(request).await else {
        tally.errors += 1;
        return;
    };
    if !response.status().is_success() {
        tally.errors += 1;
        let _ = response.into_body().collect().await;
        return;
    }
    let mut body = response.into_body();
    let mut first = None;
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            tally.errors += 1;
            return;
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        if first.is_none() {
            first = Some(started.elapsed());
        }
        // Events are small and written one by one: count them by their prefix.
        let text = data.as_ref();
        tally.events += text.windows(6).filter(|w| w == b"data: ").count();
        done |= text.windows(12).any(|w| w == b"data: [DONE]");
    }
    match (first, done) {
        (Some(t), true) => tally.ttft.push(t),
        _ => tally.errors += 1,
    }
}

async fn wave(client: Client<HttpConnector, Full<Bytes>>, plan: Arc<Plan>, n: usize) -> Tally {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(plan.concurrency);
    for _ in 0..plan.concurrency {
        let (client, plan, next) = (client.clone(), plan.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            // Relaxed: only the count matters.
            while next.fetch_add(1, Ordering::Relaxed) < n {
                one(&client, &plan, &mut tally).await;
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await.expect("a load task");
        all.ttft.extend(t.ttft);
        all.errors += t.errors;
        all.events += t.events;
    }
    all
}

fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

fn percentile(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_micros()
}

fn main() {
    let mut url = "http://127.0.0.1:8000".to_owned();
    let (mut requests, mut warmup, mut concurrency, mut max_tokens) = (20_000, 2_000, 64, 16);
    let mut model = "sim".to_owned();
    let mut threads = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--url" => url = value(),
            "--requests" => requests = value().parse().expect("--requests N"),
            "--warmup" => warmup = value().parse().expect("--warmup N"),
            "--concurrency" => concurrency = value().parse().expect("--concurrency N"),
            "--max-tokens" => max_tokens = value().parse().expect("--max-tokens N"),
            "--model" => model = value(),
            "--threads" => threads = value().parse().expect("--threads N"),
            other => {
                eprintln!("sse_load: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let body = serde_json::json!({
        "model": model, "prompt": "Say something.", "max_tokens": max_tokens, "stream": true,
    })
    .to_string();
    let plan = Arc::new(Plan {
        url: format!("{}/v1/completions", url.trim_end_matches('/')),
        requests,
        warmup,
        concurrency: concurrency.max(1),
        body: Bytes::from(body),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(plan.concurrency)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        if plan.warmup > 0 {
            let w = wave(client.clone(), plan.clone(), plan.warmup).await;
            if w.errors > 0 {
                eprintln!("sse_load: {} errors in the warm-up", w.errors);
            }
        }
        let cpu_before = cpu_ticks();
        let started = Instant::now();
        let mut tally = wave(client, plan.clone(), plan.requests).await;
        let elapsed = started.elapsed();
        let cpu = cpu_ticks() - cpu_before;
        tally.ttft.sort_unstable();
        let ok = tally.ttft.len();
        println!(
            "requests={} errors={} elapsed_s={:.3} rps={:.0} ttft_p50_us={} ttft_p99_us={} \
             events_per_request={:.2} cpu_ticks={}",
            plan.requests,
            tally.errors,
            elapsed.as_secs_f64(),
            ok as f64 / elapsed.as_secs_f64(),
            percentile(&tally.ttft, 0.50),
            percentile(&tally.ttft, 0.99),
            tally.events as f64 / ok.max(1) as f64,
            cpu,
        );
    });
}
