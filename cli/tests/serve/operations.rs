//! The server as operated: `/metrics`, `/health` (liveness) and `/ping`,
//! `/health/canary`, graceful shutdown and the kill of what outlives its grace period.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tether_cli::serve::{self, ServeConfig, ServedEngine};
use tether_core::{LlmEngine, Runtime};
use tether_engines::{SimConfig, SimEngine};

use crate::serve_support::*;
use crate::{chat, completion, error_object, json_of, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    within(LIMIT, async {
        let t = start_with(chaos_config(), sim_config()).await;
        let empty = t.metrics().await;
        for outcome in ["finished", "cancelled", "failed", "dropped", "timed_out"] {
            for (endpoint, stream) in [("completions", "false"), ("chat", "true")] {
                let key = format!(
                    "tether_requests_total{{endpoint=\"{endpoint}\",outcome=\"{outcome}\",stream=\"{stream}\"}}"
                );
                assert_eq!(empty.get(&key), Some(&0.0), "{key}");
            }
        }
        assert_eq!(empty.get("tether_requests_in_flight"), Some(&0.0));

        // 2 streamed + 1 unary finished, 1 bad request, 1 disconnect.
        t.post("/v1/completions", &completion(4, true))
            .await
            .text()
            .await
            .unwrap();
        t.post("/v1/chat/completions", &chat(4, true))
            .await
            .text()
            .await
            .unwrap();
        t.post_raw("/v1/completions", &completion(4, false).to_string())
            .await;
        t.post_raw("/v1/completions", "{").await;
        let mut reader = SseReader::new(t.post("/v1/completions", &completion(50_000, true)).await);
        reader.next().await.unwrap();
        reader.next().await.unwrap();
        drop(reader);
        t.settled().await;

        let (status, text) = t.get("/metrics").await;
        assert_eq!(status, 200);
        let s = parse_prometheus(&text);
        let get = |k: &str| sample(&s, k);
        assert_eq!(get("tether_requests_in_flight"), 0.0);
        // Each request in its endpoint's and stream's series.
        assert_eq!(
            lines_of(&text, "tether_requests_total", true),
            sorted(&[
                "tether_requests_total{outcome=\"finished\",endpoint=\"completions\",stream=\"true\"} 1",
                "tether_requests_total{outcome=\"finished\",endpoint=\"chat\",stream=\"true\"} 1",
                "tether_requests_total{outcome=\"finished\",endpoint=\"completions\",stream=\"false\"} 1",
                "tether_requests_total{outcome=\"cancelled\",endpoint=\"completions\",stream=\"true\"} 1",
            ])
        );
        assert_eq!(
            lines_of(&text, "tether_request_finish_reasons_total", true),
            sorted(&[
                "tether_request_finish_reasons_total{reason=\"length\",endpoint=\"completions\",stream=\"true\"} 1",
                "tether_request_finish_reasons_total{reason=\"length\",endpoint=\"chat\",stream=\"true\"} 1",
                "tether_request_finish_reasons_total{reason=\"length\",endpoint=\"completions\",stream=\"false\"} 1",
            ])
        );
        // The disconnect: a cancellation with its cause, and a client gone.
        assert_eq!(
            lines_of(&text, "tether_cancellations_total", true),
            ["tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"completions\",stream=\"true\"} 1"]
        );
        assert_eq!(
            lines_of(&text, "tether_client_disconnects_total", false),
            sorted(&[
                "tether_client_disconnects_total{endpoint=\"/v1/completions\"} 1",
                "tether_client_disconnects_total{endpoint=\"/v1/chat/completions\"} 0",
            ])
        );
        // Prompts: \"hello\" (5 tokens) three times, the chat template (46) once.
        assert_eq!(
            lines_of(&text, "tether_prompt_tokens_sum", false),
            ["tether_prompt_tokens_sum 61.0"]
        );
        for (le, n) in [("2.0", 0), ("5.0", 3), ("20.0", 3), ("50.0", 4), ("+Inf", 4)] {
            assert_eq!(get(&format!("tether_prompt_tokens_bucket{{le=\"{le}\"}}")), f64::from(n), "{le}");
        }
        // Every request has a duration, and SimEngine signalled each one's scheduling.
        assert_eq!(get("tether_request_duration_seconds_count"), 4.0);
        assert_eq!(get("tether_queue_time_seconds_count"), 4.0);
        assert_eq!(get("tether_aborts_total"), 1.0);
        assert_eq!(get("tether_engine_aborts_received_total"), 1.0);
        assert_eq!(get("tether_engine_live_sequences"), 0.0);
        assert_eq!(get("tether_engine_queue_length"), 0.0);
        // Every request produced tokens, so each has a time to first token.
        assert_eq!(get("tether_time_to_first_token_seconds_count"), 4.0);
        assert_eq!(
            get("tether_time_to_first_token_seconds_bucket{le=\"+Inf\"}"),
            4.0
        );
        // Three 4-token requests give 3 gaps each; the cancelled one at least 1.
        let itl = get("tether_inter_token_latency_seconds_count");
        assert!(itl >= 10.0, "{itl}");
        let tokens = get("tether_output_tokens_total");
        assert!(tokens >= 14.0, "{tokens}");
        // Buckets are cumulative and start at 0.5 ms.
        let mut buckets: Vec<(f64, f64)> = s
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix("tether_inter_token_latency_seconds_bucket{le=\"")?;
                let le = le.strip_suffix("\"}")?;
                Some((
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    *v,
                ))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(buckets[0].0, 0.0005);
        assert!(
            buckets.iter().filter(|b| b.0 < 0.001).count() >= 5,
            "fine buckets below 1 ms: {buckets:?}"
        );
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "cumulative: {buckets:?}"
        );
        let last = buckets.last().unwrap().1;
        assert_eq!(last, itl);
        assert_eq!(
            get("tether_http_responses_total{endpoint=\"/v1/completions\",status=\"200\"}"),
            3.0
        );
        assert_eq!(
            get("tether_http_responses_total{endpoint=\"/v1/chat/completions\",status=\"200\"}"),
            1.0
        );
        assert_eq!(
            get("tether_http_responses_total{endpoint=\"/v1/completions\",status=\"400\"}"),
            1.0
        );
        // Two scrapes were answered before this one.
        assert_eq!(
            get("tether_http_responses_total{endpoint=\"/metrics\",status=\"200\"}"),
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_is_ok_and_503_when_the_engine_errors_while_liveness_stays_ok() {
    within(LIMIT, async {
        let t = start().await;
        let (status, body) = t.get("/health/canary").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(json_of(&body), json!({"status": "ok", "model": "sim"}));
        // Canaries are not client requests.
        assert_eq!(t.server.metrics().outcome("finished"), 0);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let runtime: Arc<dyn Runtime> = Arc::new(tether_tokio::TokioRuntime::current());
        let broken = serve::start(
            ServedEngine::other(Arc::new(BrokenEngine)),
            runtime,
            listener,
            ServeConfig::default(),
        )
        .await
        .unwrap();
        let url = format!("http://{}", broken.local_addr());
        let resp = reqwest::get(format!("{url}/health/canary")).await.unwrap();
        assert_eq!(resp.status(), 503);
        let v = json_of(&resp.text().await.unwrap());
        assert_eq!(v["status"], "unhealthy");
        assert!(
            v["error"].as_str().unwrap().contains("the engine is down"),
            "{v}"
        );
        // Liveness runs no request: the engine is started and not shut down, so it is
        // alive, even though it refuses all work (that is the canary's to find).
        let resp = reqwest::get(format!("{url}/health")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            json_of(&resp.text().await.unwrap()),
            json!({"status": "ok", "model": "broken"})
        );
        // A request the engine refuses at setup is a 503 with an error object too.
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(json!({"model": "broken", "prompt": "x"}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        let v = json_of(&resp.text().await.unwrap());
        assert_eq!(error_object(&v)["code"], "engine_unavailable");
        assert_eq!(broken.metrics().outcome("failed"), 1);
        assert_eq!(broken.metrics().in_flight(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_at_once_while_the_only_slot_is_busy_and_the_canary_times_out() {
    within(LIMIT, async {
        let config = ServeConfig {
            health_timeout: Duration::from_millis(200),
            ..chaos_config()
        };
        let sim = SimConfig {
            max_sequences: 1,
            ..sim_config()
        };
        let t = start_with(config, sim).await;
        // The only slot: taken by a request that hangs after its first token.
        let mut body = completion(100, true);
        body["annotations"] = json!(["chaos:hang@1"]);
        let mut busy = SseReader::new(t.post("/v1/completions", &body).await);
        busy.next().await.unwrap();
        // And one request queued behind it.
        let queued = SseReader::new(t.post("/v1/completions", &completion(4, true)).await);
        let engine = t.engine.inner.clone();
        assert!(
            eventually(LIMIT, || {
                let g = engine.gauges();
                g.live_slots == 1 && g.queue_len == 1
            })
            .await,
            "{:?}",
            engine.gauges()
        );

        // The canary queues too, and never gets the slot in time.
        let (status, canary) = t.get("/health/canary").await;
        assert_eq!(status, 503, "{canary}");
        assert_eq!(
            json_of(&canary),
            json!({"status": "unhealthy", "model": "sim", "error": "the canary took longer than 200ms"})
        );
        // Liveness does not queue: the busy server is alive.
        let ok = json!({"status": "ok", "model": "sim"});
        let (status, health) = t.get("/health").await;
        assert_eq!((status, json_of(&health)), (200, ok.clone()));
        let (status, ping) = t.get("/ping").await;
        assert_eq!((status, json_of(&ping)), (200, ok.clone()));
        let resp = t.client.post(format!("{}/ping", t.base)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(json_of(&resp.text().await.unwrap()), ok);
        // The slot and the queue are still taken: nothing was answered by running.
        let g = engine.gauges();
        assert_eq!((g.live_slots, g.queue_len), (1, 1));

        drop((busy, queued));
        let m = t.server.metrics().clone();
        assert!(
            eventually(LIMIT, || {
                let g = engine.gauges();
                m.in_flight() == 0 && g.live_slots == 0 && g.queue_len == 0
            })
            .await,
            "{:?}",
            engine.gauges()
        );
    })
    .await;
}

/// A runtime that drops every task it is given (as one that is shutting down does),
/// with tokio's clock.
#[derive(Debug)]
struct DropsTasks(Arc<dyn Runtime>);

impl Runtime for DropsTasks {
    fn spawn(&self, future: tether_core::drive::SpawnFuture) {
        drop(future);
    }
    fn sleep_until(
        &self,
        deadline: std::time::Instant,
    ) -> std::pin::Pin<Box<dyn tether_core::AsyncTimer>> {
        self.0.sleep_until(deadline)
    }
    fn now(&self) -> std::time::Instant {
        self.0.now()
    }
}

async fn served(engine: ServedEngine) -> (serve::Server, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime: Arc<dyn Runtime> = Arc::new(tether_tokio::TokioRuntime::current());
    let server = serve::start(engine, runtime, listener, ServeConfig::default())
        .await
        .unwrap();
    let base = format!("http://{}", server.local_addr());
    (server, base)
}

/// `/health`, `GET /ping` and `POST /ping`: all the same status and body.
async fn liveness_of(base: &str) -> (u16, serde_json::Value) {
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for request in [
        client.get(format!("{base}/health")),
        client.get(format!("{base}/ping")),
        client.post(format!("{base}/ping")),
    ] {
        let resp = request.send().await.unwrap();
        let status = resp.status().as_u16();
        answers.push((status, json_of(&resp.text().await.unwrap())));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    answers.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_with_the_reason_when_the_engine_is_not_alive() {
    within(LIMIT, async {
        let unhealthy =
            |error: &str| json!({"status": "unhealthy", "model": "sim", "error": error});
        // The engine's own check says no: /health believes it (the canary, which
        // runs a request, still passes: the check is the engine's word).
        let runtime: Arc<dyn Runtime> = Arc::new(tether_tokio::TokioRuntime::current());
        let sim = Arc::new(SimEngine::new(sim_config(), runtime.clone()));
        let (server, base) = served(ServedEngine {
            alive: Some(Arc::new(|| Err("the gpu fell off the bus".to_owned()))),
            ..ServedEngine::sim(sim)
        })
        .await;
        assert_eq!(
            liveness_of(&base).await,
            (503, unhealthy("the gpu fell off the bus"))
        );
        let resp = reqwest::get(format!("{base}/health/canary")).await.unwrap();
        assert_eq!(resp.status(), 200);
        server.shutdown();
        server.wait().await.cleanup.unwrap();

        // SimEngine cleaned up under the server: not started any more.
        let t = start().await;
        assert_eq!(
            liveness_of(&t.base).await,
            (200, json!({"status": "ok", "model": "sim"}))
        );
        t.engine.inner.cleanup().await.unwrap();
        assert_eq!(
            liveness_of(&t.base).await,
            (503, unhealthy("the sim engine is not started"))
        );

        // SimEngine whose scheduler loop its runtime dropped: started, not running.
        let sim = Arc::new(SimEngine::new(sim_config(), DropsTasks(runtime.clone())));
        let (server, base) = served(ServedEngine::sim(sim.clone())).await;
        assert!(sim.is_started());
        assert_eq!(
            liveness_of(&base).await,
            (
                503,
                unhealthy("the sim engine's scheduler loop is not running")
            )
        );
        server.shutdown();
        server.wait().await.cleanup.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_in_flight_requests_finish_and_cleans_up_once() {
    within(LIMIT, async {
        let t = start().await;
        let resp = t.post("/v1/completions", &completion(40, true)).await;
        let mut reader = SseReader::new(resp);
        reader.next().await.unwrap();
        t.server.shutdown();
        // The request in flight runs to its natural end.
        let mut rest = Vec::new();
        while let Some(data) = reader.next().await {
            rest.push(data);
        }
        assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
        assert_eq!(rest.iter().filter(|e| *e == "[DONE]").count(), 1);
        let TestServer {
            server,
            engine,
            base,
            ..
        } = t;
        let report = server.wait().await;
        assert!(!report.killed_in_flight && report.drained, "{report:?}");
        assert!(report.cleanup.is_ok());
        assert_eq!(engine.cleanups.load(Ordering::SeqCst), 1);
        assert!(!engine.inner.is_started());
        // Nothing listens any more.
        assert!(reqwest::get(format!("{base}/health")).await.is_err());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_what_outlives_the_grace_period() {
    within(LIMIT, async {
        let config = ServeConfig {
            shutdown_grace: Duration::from_millis(50),
            ..chaos_config()
        };
        let t = start_with(config, sim_config()).await;
        let mut body = completion(100, true);
        body["annotations"] = json!(["chaos:hang@1"]);
        let mut reader = SseReader::new(t.post("/v1/completions", &body).await);
        reader.next().await.unwrap();
        t.server.shutdown();
        let mut rest = Vec::new();
        while let Some(data) = reader.next().await {
            rest.push(data);
        }
        assert!(!rest.iter().any(|e| e == "[DONE]"));
        let last = json_of(rest.last().unwrap());
        assert_eq!(error_object(&last)["code"], "shutting_down");
        let metrics = t.server.metrics().clone();
        let TestServer { server, engine, .. } = t;
        let report = server.wait().await;
        assert!(report.killed_in_flight && report.drained, "{report:?}");
        assert_eq!(engine.cleanups.load(Ordering::SeqCst), 1);
        assert_eq!(
            (
                metrics.outcome("cancelled"),
                metrics.aborts(),
                metrics.in_flight()
            ),
            (1, 1, 0)
        );
    })
    .await;
}
