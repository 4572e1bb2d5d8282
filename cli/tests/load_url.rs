//! `tether load --url`: against an in-process `tether serve` (every check passes, the
//! counts are the seeded plan's), against stub servers (a gauge that never comes back
//! down is reported broken; the vLLM and SGLang presets read exactly the stub's values
//! and report what they lack as not available), and bad arguments exit 2.

mod serve_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use indicatif::ProgressBar;
use serde_json::{json, Value};
use serve_support::*;
use tether_cli::load::http::{
    run_url_on, CheckStatus, EndpointMix, Preset, StreamMix, UrlOptions, UrlReport,
};
use tether_cli::load::ChaosRates;
use tether_cli::serve::{ApiKey, ServeConfig};
use tether_engines::SimConfig;

const CHECKS: [&str; 3] = [
    "in_flight_returned",
    "cancellations_match_disconnects",
    "aborts_match_cancellations",
];

/// SimEngine with small step costs: a few hundred requests take well under a second.
fn fast_sim() -> SimConfig {
    SimConfig {
        decode_step_cost: Duration::from_micros(200),
        batch_cost_per_sequence: Duration::from_nanos(100),
        prefill_cost_per_token: Duration::from_nanos(100),
        ..sim_config()
    }
}

fn options(base: &str) -> UrlOptions {
    UrlOptions {
        url: base.to_owned(),
        requests: 300,
        concurrency: 32,
        max_tokens: 12,
        prompt_chars: (4, 24),
        seed: 42,
        settle_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(20),
        ..UrlOptions::default()
    }
}

fn statuses(r: &UrlReport) -> Vec<CheckStatus> {
    CHECKS
        .iter()
        .map(|name| r.check(name).expect(name).status)
        .collect()
}

/// The server's own counters agree with what the report read off `/metrics`.
fn assert_matches_server(t: &TestServer, r: &UrlReport) {
    let m = t.server.metrics();
    let after = r.metrics_after.as_ref().expect("scraped after");
    assert_eq!(after.in_flight, Some(0.0));
    assert_eq!(after.aborts, Some(m.aborts() as f64));
    assert_eq!(
        after.cancellations,
        Some(m.cancellations("client_disconnect") as f64)
    );
    assert_eq!(after.timeouts, Some(m.cancellations("timeout") as f64));
    assert_eq!(after.finished, Some(m.outcome("finished") as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invariant_holds_against_tether_serve_with_server_chaos() {
    let config = ServeConfig {
        inter_token_timeout: Some(Duration::from_millis(300)),
        ..chaos_config()
    };
    tether_cli::quiet_chaos_panics();
    let t = start_with(config, fast_sim()).await;
    let opts = UrlOptions {
        chaos: ChaosRates {
            stop: 0.1,
            kill: 0.1,
            drop: 0.1,
            error: 0.03,
            hang: 0.03,
            panic: 0.03,
        },
        allow_server_chaos: true,
        ..options(&t.base)
    };
    let r = run_passing(&opts, Duration::from_secs(60)).await;
    assert!(r.settled);
    let (_, p) = opts.plan();
    assert_eq!(r.plan, p);
    for kind in [p.stop + p.kill + p.drop, p.error, p.hang, p.panic] {
        assert!(kind > 0, "every chaos kind is exercised: {p:?}");
    }
    // Every server fault is an error the client saw; nothing else failed.
    let errors: u64 = r.errors.values().sum();
    assert_eq!(errors, p.error + p.hang + p.panic, "{:?}", r.errors);
    assert!(!r.errors.contains_key("connect") && !r.errors.contains_key("timeout"));
    // A planned disconnect either happened or the response was complete first.
    assert_eq!(
        r.client.complete + r.disconnects,
        p.none + p.stop + p.kill + p.drop
    );
    assert_eq!(r.client.left, r.disconnects);
    assert_eq!(r.client.sent, 300);
    assert_eq!(r.model, "sim");
    assert_matches_server(&t, &r);
    let m = t.server.metrics();
    // Hangs end on the server's inter-token timeout, each with one abort.
    assert_eq!(m.cancellations("timeout"), p.hang);
    assert_eq!(
        m.aborts(),
        m.cancellations("client_disconnect") + m.cancellations("timeout")
    );
    assert!(r.ttft_ms.count > 0 && r.itl_ms.count > 0 && r.latency_ms.count > 0);
    // Every request got a response head but the unary ones left before it.
    assert_eq!(
        r.status_codes.values().sum::<u64>() + r.client.left_unary,
        300
    );
    assert_eq!(
        r.status_codes.get(&500).copied().unwrap_or(0)
            + r.status_codes.get(&504).copied().unwrap_or(0),
        r.errors.get("http_500").copied().unwrap_or(0)
            + r.errors.get("http_504").copied().unwrap_or(0),
    );
    t.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_disconnects_are_all_counted_by_tether_serve() {
    let t = start_with(chaos_config(), fast_sim()).await;
    let opts = UrlOptions {
        stream: StreamMix::True,
        endpoint: EndpointMix::Chat,
        chaos: ChaosRates {
            drop: 0.3,
            ..ChaosRates::NONE
        },
        ..options(&t.base)
    };
    let r = run_passing(&opts, Duration::from_secs(60)).await;
    // Streamed requests are never left before the server started them.
    assert_eq!(r.client.left_unary, 0);
    let (_, p) = opts.plan();
    let before = r.metrics_before.clone().unwrap();
    let after = r.metrics_after.clone().unwrap();
    let cancelled = after.cancellations.unwrap() - before.cancellations.unwrap();
    let finished = after.finished.unwrap() - before.finished.unwrap();
    // Each disconnect is a cancellation, or a request the server finished first.
    assert_eq!(cancelled + finished, 300.0);
    assert_eq!(
        finished - r.client.complete as f64 + cancelled,
        r.disconnects as f64
    );
    assert_eq!(r.client.complete + r.disconnects, 300);
    assert!(r.disconnects > 0 && r.disconnects <= p.drop);
    assert_eq!(r.status_codes.get(&200), Some(&300));
    assert_matches_server(&t, &r);
    t.settled().await;
}

/// Behind a proxy the metrics are every worker's, summed: the run loads one server and
/// reads its `/metrics` and another's (which finished 5 requests before the run), and
/// every value it reads is the sum of the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_urls_are_read_instead_of_the_server_and_summed() {
    let loaded = start_with(chaos_config(), fast_sim()).await;
    let other = start_with(chaos_config(), fast_sim()).await;
    for _ in 0..5 {
        let body = json!({"model": "sim", "prompt": "hi", "max_tokens": 3});
        assert_eq!(other.post("/v1/completions", &body).await.status(), 200);
    }
    let opts = UrlOptions {
        chaos: ChaosRates {
            drop: 0.2,
            ..ChaosRates::NONE
        },
        metrics_urls: vec![
            format!("{}/metrics", loaded.base),
            format!("{}/metrics/", other.base),
        ],
        ..options(&loaded.base)
    };
    let r = run_passing(&opts, Duration::from_secs(60)).await;
    let before = r.metrics_before.as_ref().expect("scraped before");
    let after = r.metrics_after.as_ref().expect("scraped after");
    assert_eq!(before.finished, Some(5.0));
    assert_eq!(before.requests, Some(5.0));
    let m = loaded.server.metrics();
    assert_eq!(after.finished, Some(m.outcome("finished") as f64 + 5.0));
    assert_eq!(after.aborts, Some(m.aborts() as f64));
    assert!(m.aborts() > 0);
    assert_eq!(other.server.metrics().aborts(), 0);
    loaded.settled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_sent_as_a_bearer_token() {
    let config = ServeConfig {
        api_key: Some(ApiKey::new("sekrit")),
        ..chaos_config()
    };
    let t = start_with(config, fast_sim()).await;
    let opts = UrlOptions {
        requests: 40,
        api_key: Some("sekrit".to_owned()),
        ..options(&t.base)
    };
    run_passing(&opts, Duration::from_secs(30)).await;
    // Without it the model cannot be asked for: the server is unreachable (exit 1).
    let err = run_url_on(&options(&t.base), ProgressBar::hidden())
        .await
        .unwrap_err();
    assert!(!err.is_usage());
    assert!(
        err.to_string().contains("GET /v1/models answered 401"),
        "{err}"
    );
    t.settled().await;
}

/// A stub OpenAI server: `/v1/models` lists `stub`, both endpoints answer `max_tokens`
/// one-letter tokens (SSE or JSON), `/metrics` is `metrics(requests so far)`.
struct Stub {
    requests: AtomicU64,
    metrics: fn(u64) -> String,
}

/// A JSON response (axum's `json` feature is not built).
fn json_response(v: &Value) -> axum::response::Response {
    ([("content-type", "application/json")], v.to_string()).into_response()
}

async fn models() -> axum::response::Response {
    json_response(&json!({"object": "list", "data": [{"id": "stub", "object": "model"}]}))
}

async fn generate(State(stub): State<Arc<Stub>>, body: String) -> axum::response::Response {
    stub.requests.fetch_add(1, Ordering::SeqCst);
    let body: Value = serde_json::from_str(&body).expect("the load sends JSON");
    let n = body["max_tokens"].as_u64().unwrap_or(16);
    let chat = body.get("messages").is_some();
    let choice = |text: &str, finish: Option<&str>| {
        if chat {
            json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})
        } else {
            json!({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})
        }
    };
    if body["stream"] == json!(true) {
        let mut sse = String::new();
        for _ in 0..n {
            sse.push_str(&format!("data: {}\n\n", choice("a", None)));
        }
        sse.push_str(&format!("data: {}\n\n", choice("", Some("length"))));
        sse.push_str("data: [DONE]\n\n");
        ([("content-type", "text/event-stream")], sse).into_response()
    } else {
        let text = "a".repeat(n as usize);
        let message = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        json_response(&json!({"choices": [message], "usage": {"completion_tokens": n}}))
    }
}

async fn metrics(State(stub): State<Arc<Stub>>) -> String {
    (stub.metrics)(stub.requests.load(Ordering::SeqCst))
}

/// Serve a stub on 127.0.0.1 (a free port); returns its base URL.
async fn stub(metrics_text: fn(u64) -> String) -> String {
    let stub = Arc::new(Stub {
        requests: AtomicU64::new(0),
        metrics: metrics_text,
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(generate))
        .route("/v1/chat/completions", post(generate))
        .route("/metrics", get(metrics))
        .with_state(stub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// Every request raises the gauge; nothing lowers it.
fn leaky_gauge(requests: u64) -> String {
    format!("# TYPE tether_requests_in_flight gauge\ntether_requests_in_flight {requests}\n# EOF\n")
}

fn stub_options(base: &str) -> UrlOptions {
    UrlOptions {
        requests: 50,
        concurrency: 8,
        max_tokens: 4,
        settle_timeout: Duration::from_millis(200),
        chaos: ChaosRates::NONE,
        ..options(base)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gauge_that_never_comes_back_is_reported_broken() {
    let base = stub(leaky_gauge).await;
    let opts = stub_options(&base);
    let r = within(
        Duration::from_secs(30),
        run_url_on(&opts, ProgressBar::hidden()),
    )
    .await
    .unwrap();
    assert!(!r.passed());
    assert!(!r.settled);
    assert_eq!(r.model, "stub");
    assert_eq!(r.client.complete, 50);
    assert_eq!(
        statuses(&r),
        [
            CheckStatus::Failed,
            CheckStatus::NotAvailable,
            CheckStatus::NotAvailable
        ]
    );
    assert_eq!(
        r.check("in_flight_returned").unwrap().detail,
        "in-flight gauge 0 before, 50 after"
    );
    assert_eq!(
        r.violations,
        ["in_flight_returned broke: in-flight gauge 0 before, 50 after"]
    );

    // The binary says so too, and exits 1.
    let base2 = base.clone();
    let out = tokio::task::spawn_blocking(move || {
        tether(&[
            "load",
            "--url",
            &base,
            "--requests",
            "20",
            "--concurrency",
            "4",
            "--chaos",
            "none",
            "--settle-timeout",
            "200ms",
        ])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", stderr(&out));
    assert!(
        stdout.contains("in_flight_returned broke: in-flight gauge 50 before, 70 after"),
        "{stdout}"
    );

    // And in JSON.
    let out = tokio::task::spawn_blocking(move || {
        tether(&[
            "load",
            "--url",
            &base2,
            "--requests",
            "10",
            "--concurrency",
            "2",
            "--chaos",
            "none",
            "--settle-timeout",
            "200ms",
            "--json",
        ])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["checks"][0]["name"], "in_flight_returned");
    assert_eq!(v["checks"][0]["status"], "failed");
    assert_eq!(v["checks"][1]["status"], "not_available");
    assert_eq!(v["metrics_before"]["in_flight"], 70.0);
    assert_eq!(v["metrics_after"]["in_flight"], 80.0);
    assert_eq!(v["client"]["complete"], 10);
    assert_eq!(v["status_codes"]["200"], 10);
    assert_eq!(v["settled"], false);
    assert!(v["cpu"]["percent_of_core"].is_f64());
}

fn vllm_metrics(_: u64) -> String {
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
     # TYPE vllm:num_requests_running gauge\n\
     vllm:num_requests_running{engine=\"0\",model_name=\"stub\"} 2.0\n\
     # TYPE vllm:num_requests_waiting gauge\n\
     vllm:num_requests_waiting{engine=\"0\",model_name=\"stub\"} 1.0\n\
     # TYPE vllm:request_success_total counter\n\
     vllm:request_success_total{finished_reason=\"stop\",model_name=\"stub\"} 9.0\n"
        .to_owned()
}

fn sglang_metrics(_: u64) -> String {
    "# TYPE sglang:num_running_reqs gauge\n\
     sglang:num_running_reqs{model_name=\"stub\",tp_rank=\"0\"} 4.0\n\
     sglang:num_running_reqs{model_name=\"stub\",tp_rank=\"1\"} 1.0\n\
     # TYPE sglang:num_queue_reqs gauge\n\
     sglang:num_queue_reqs{model_name=\"stub\",tp_rank=\"0\"} 0.0\n"
        .to_owned()
}

async fn preset_run(metrics_text: fn(u64) -> String, preset: Preset) -> UrlReport {
    let base = stub(metrics_text).await;
    let opts = UrlOptions {
        preset: Some(preset),
        metrics: preset.names(),
        chaos: ChaosRates {
            drop: 0.2,
            ..ChaosRates::NONE
        },
        ..stub_options(&base)
    };
    within(
        Duration::from_secs(30),
        run_url_on(&opts, ProgressBar::hidden()),
    )
    .await
    .unwrap()
}

/// Run `opts` within `limit`; every invariant must hold and every check pass.
async fn run_passing(opts: &UrlOptions, limit: Duration) -> UrlReport {
    let r = within(limit, run_url_on(opts, ProgressBar::hidden()))
        .await
        .unwrap();
    assert!(r.passed(), "{}", r.table());
    assert_eq!(statuses(&r), [CheckStatus::Passed; 3], "{}", r.table());
    r
}

fn assert_gauge_only(r: &UrlReport, in_flight: f64) {
    assert!(r.passed(), "{}", r.table());
    let values = r.metrics_after.as_ref().unwrap();
    assert_eq!(values.in_flight, Some(in_flight));
    assert_eq!(
        (values.requests, values.cancellations, values.aborts),
        (None, None, None)
    );
    assert_eq!(
        statuses(r),
        [
            CheckStatus::Passed,
            CheckStatus::NotAvailable,
            CheckStatus::NotAvailable
        ]
    );
    assert_eq!(
        r.check("in_flight_returned").unwrap().detail,
        format!("in-flight gauge {in_flight} before, {in_flight} after")
    );
    assert_eq!(
        r.check("cancellations_match_disconnects").unwrap().detail,
        "not available: the server exports no cancellation, finished or request counter metric"
    );
    assert_eq!(
        r.check("aborts_match_cancellations").unwrap().detail,
        "not available: the server exports no abort or cancellation metric"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vllm_preset_reads_running_plus_waiting() {
    let r = preset_run(vllm_metrics, Preset::Vllm).await;
    assert_gauge_only(&r, 3.0);
    assert_eq!(r.preset.as_deref(), Some("vllm"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sglang_preset_reads_running_plus_queued() {
    let r = preset_run(sglang_metrics, Preset::Sglang).await;
    assert_gauge_only(&r, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tether_preset_against_vllm_has_nothing_to_check() {
    let r = preset_run(vllm_metrics, Preset::Tether).await;
    // Nothing is available: never a pass.
    assert_eq!(statuses(&r), [CheckStatus::NotAvailable; 3]);
    assert!(r.passed(), "no broken invariant: {}", r.table());
    assert_eq!(r.metrics_after.as_ref().unwrap().in_flight, None);
}

#[test]
fn bad_url_arguments_exit_2_with_a_message() {
    let url = "http://127.0.0.1:9";
    let cases: [(&[&str], &str); 13] = [
        (
            &["load", "--url", "localhost:8000"],
            "--url `localhost:8000`",
        ),
        (&["load", "--url", "https://x:1"], "https is not supported"),
        (&["load", "--url", "http://x:1/v1"], "must not have a path"),
        (
            &["load", "--url", url, "--engine", "tiny"],
            "--engine only apply to an in-process run",
        ),
        (
            &["load", "--url", url, "--runtime", "smol", "--step-us", "5"],
            "--runtime, --step-us only apply to an in-process run",
        ),
        (&["load", "--url", url, "--preset", "triton"], "triton"),
        (
            &["load", "--url", url, "--error", "0.1"],
            "only with --allow-server-chaos",
        ),
        (
            &["load", "--url", url, "--metric-aborts", "bad name"],
            "`bad name` is not a metric",
        ),
        (
            &["load", "--endpoint", "chat"],
            "--endpoint only apply with --url",
        ),
        (&["load", "--url", url, "--stream", "maybe"], "maybe"),
        (
            &["load", "--url", url, "--metrics-url", "http://x:1"],
            "--metrics-url `http://x:1` must have a path",
        ),
        (
            &["load", "--url", url, "--metrics-url", "ftp://x:1/metrics"],
            "is not an http:// URL",
        ),
        (
            &["load", "--metrics-url", "http://x:1/metrics"],
            "--metrics-url only apply with --url",
        ),
    ];
    for (args, needle) in cases {
        let out = tether(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn an_unreachable_server_exits_1() {
    // Port 9 (discard) on loopback: nothing listens there here.
    let out = tether(&[
        "load",
        "--url",
        "http://127.0.0.1:9",
        "--request-timeout",
        "5s",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("/v1/models"), "{}", stderr(&out));
}
