//! What a request must look like (a JSON content type, `stream_options` only on a
//! stream) and headers every streamed response carries.

use std::time::Duration;

use serde_json::json;
use tether_cli::serve::{ServeConfig, ServedEngine};

use crate::serve_support::*;
use crate::{completion, error_object, json_of, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_declared_json_is_415() {
    within(LIMIT, async {
        let t = start().await;
        let body = completion(2, false).to_string();
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let mut req = t
                .client
                .post(format!("{}/v1/completions", t.base))
                .body(body.clone());
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 415, "{content_type:?}");
            let body = json_of(&resp.text().await.unwrap());
            let err = error_object(&body);
            assert_eq!(err["code"], "unsupported_media_type");
            assert_eq!(err["type"], "invalid_request_error");
        }
        // A charset parameter is fine.
        let resp = t
            .client
            .post(format!("{}/v1/chat/completions", t.base))
            .header("content-type", "application/json; charset=utf-8")
            .body(crate::chat(2, false).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
        t.settled().await;
        assert_eq!(t.server.metrics().outcome("finished"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_options_without_a_stream_is_400() {
    within(LIMIT, async {
        let t = start().await;
        for stream in [json!(false), json!(null)] {
            let mut body = completion(2, false);
            body["stream"] = stream.clone();
            body["stream_options"] = json!({"include_usage": true});
            let resp = t.post("/v1/completions", &body).await;
            assert_eq!(resp.status(), 400, "stream: {stream}");
            let body = json_of(&resp.text().await.unwrap());
            assert_eq!(error_object(&body)["param"], "stream_options");
        }
        // `null` options are no options.
        let mut body = completion(2, false);
        body["stream_options"] = json!(null);
        let resp = t.post("/v1/completions", &body).await;
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
        t.settled().await;
        assert_eq!(t.server.metrics().outcome("finished"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_tell_proxies_not_to_buffer() {
    within(LIMIT, async {
        let t = start().await;
        let resp = t.post("/v1/completions", &completion(2, true)).await;
        assert_eq!(resp.headers()["x-accel-buffering"], "no");
        resp.text().await.unwrap();
        let resp = t.post("/v1/completions", &completion(2, false)).await;
        assert!(resp.headers().get("x-accel-buffering").is_none());
        resp.text().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_gets_keep_alive_comments_at_the_configured_interval() {
    within(LIMIT, async {
        let config = ServeConfig {
            keep_alive: Duration::from_millis(20),
            ..chaos_config()
        };
        let t = start_with(config, sim_config()).await;
        // The engine hangs after its first token: only keep-alive comments follow.
        let body = json!({"model": "sim", "prompt": "hi", "max_tokens": 100, "stream": true,
                          "annotations": ["chaos:hang@1"]});
        let mut resp = t.post("/v1/completions", &body).await;
        assert_eq!(resp.status(), 200);
        let mut seen = String::new();
        // Three comments, each a line of its own starting with `:`, after the token.
        while seen.lines().filter(|l| l.starts_with(':')).count() < 3 {
            let chunk = resp.chunk().await.unwrap().expect("the stream goes on");
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        assert!(seen.starts_with("data: {"), "{seen}");
        drop(resp);
        // Leaving kills the hung request, as any disconnect does.
        t.settled().await;
        assert_eq!(t.server.metrics().outcome("cancelled"), 1);
        // A zero interval is refused at start.
        let runtime: std::sync::Arc<dyn tether_core::Runtime> =
            std::sync::Arc::new(tether_tokio::TokioRuntime::current());
        let engine = std::sync::Arc::new(tether_engines::SimEngine::new(
            sim_config(),
            runtime.clone(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ServeConfig {
            keep_alive: Duration::ZERO,
            ..ServeConfig::default()
        };
        let err = tether_cli::serve::start(ServedEngine::sim(engine), runtime, listener, config)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "--sse-keep-alive must be above 0");
    })
    .await;
}
