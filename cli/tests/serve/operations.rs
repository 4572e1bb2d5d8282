//! The server as operated: `/metrics`, `/health`, graceful shutdown and the kill of
//! what outlives its grace period.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tether_cli::serve::{self, ServeConfig, ServedEngine};
use tether_core::Runtime;

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
async fn health_is_ok_and_503_when_the_engine_errors() {
    within(LIMIT, async {
        let t = start().await;
        let (status, body) = t.get("/health").await;
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
        let resp = reqwest::get(format!("{url}/health")).await.unwrap();
        assert_eq!(resp.status(), 503);
        let v = json_of(&resp.text().await.unwrap());
        assert_eq!(v["status"], "unhealthy");
        assert!(
            v["error"].as_str().unwrap().contains("the engine is down"),
            "{v}"
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
