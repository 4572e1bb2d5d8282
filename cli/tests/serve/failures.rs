//! Requests that do not end well: client disconnects (streaming and unary), an engine
//! error mid-stream, bad input and timeouts.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tether_cli::serve::ServeConfig;

use crate::serve_support::*;
use crate::{chat, completion, error_object, json_of, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_kills_the_request_once() {
    within(LIMIT, async {
        let t = start_with(chaos_config(), sim_config()).await;
        let resp = t.post("/v1/completions", &completion(50_000, true)).await;
        assert_eq!(resp.status(), 200);
        let mut reader = SseReader::new(resp);
        for _ in 0..3 {
            let data = reader.next().await.unwrap();
            assert!(json_of(&data)["choices"][0]["finish_reason"].is_null());
        }
        drop(reader); // closes the connection mid-stream
        t.settled().await;
        let m = t.server.metrics();
        assert_eq!(m.in_flight(), 0);
        assert_eq!(m.aborts(), 1);
        assert_eq!(t.engine.inner.gauges().aborts_received, 1);
        assert_eq!(t.engine.inner.gauges().late_aborts, 0);
        assert_eq!(m.outcome("cancelled"), 1);
        assert_eq!(m.outcome("dropped"), 0);
        let s = t.metrics().await;
        assert_eq!(
            sample(
                &s,
                "tether_requests_total{endpoint=\"completions\",outcome=\"cancelled\",stream=\"true\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &s,
                "tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"completions\",stream=\"true\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &s,
                "tether_client_disconnects_total{endpoint=\"/v1/completions\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &s,
                "tether_http_responses_total{endpoint=\"/v1/completions\",status=\"200\"}"
            ),
            1.0
        );
        assert_eq!(sample(&s, "tether_engine_live_sequences"), 0.0);
        assert!(!s
            .keys()
            .any(|k| k.starts_with("tether_http_responses_total") && k.contains("status=\"5")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_during_a_unary_request_is_cancelled_and_counted_499() {
    within(LIMIT, async {
        let t = Arc::new(start_with(chaos_config(), sim_config()).await);
        let mut body = completion(100, false);
        body["annotations"] = json!(["chaos:hang@2"]);
        let client = {
            let t = t.clone();
            tokio::spawn(async move { t.post("/v1/completions", &body).await })
        };
        // The engine is holding the hung request.
        let (m, engine) = (t.server.metrics().clone(), t.engine.inner.clone());
        assert!(eventually(LIMIT, || m.in_flight() == 1 && engine.gauges().hung == 1).await);
        client.abort();
        assert!(client.await.unwrap_err().is_cancelled());
        t.settled().await;
        assert_eq!((m.outcome("cancelled"), m.aborts()), (1, 1));
        assert_eq!(engine.gauges().aborts_received, 1);
        let s = t.metrics().await;
        assert_eq!(
            sample(
                &s,
                "tether_http_responses_total{endpoint=\"/v1/completions\",status=\"499\"}"
            ),
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_mid_stream_is_an_error_event_without_done() {
    within(LIMIT, async {
        let t = start_with(chaos_config(), sim_config()).await;
        for path in ["/v1/completions", "/v1/chat/completions"] {
            let mut body = if path == "/v1/completions" {
                completion(10, true)
            } else {
                chat(10, true)
            };
            body["annotations"] = json!(["chaos:error@3"]);
            let resp = t.post(path, &body).await;
            assert_eq!(resp.status(), 200);
            let events = sse_data(&resp.text().await.unwrap());
            assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
            let last = json_of(events.last().unwrap());
            let err = error_object(&last);
            assert_eq!(err["type"], "server_error");
            assert_eq!(err["code"], "engine_error");
            let tokens: usize = events[..events.len() - 1]
                .iter()
                .map(|e| json_of(e))
                .map(|c| {
                    let choice = &c["choices"][0];
                    choice["text"]
                        .as_str()
                        .or(choice["delta"]["content"].as_str())
                        .unwrap_or("")
                        .len()
                })
                .sum();
            assert_eq!(tokens, 3, "{path}: three tokens before the error");
        }
        // Unary: a 500 with the error object.
        let mut body = completion(10, false);
        body["annotations"] = json!(["chaos:error@3"]);
        let (status, v) = t.post_raw("/v1/completions", &body.to_string()).await;
        assert_eq!(status, 500);
        assert_eq!(error_object(&v)["type"], "server_error");
        t.settled().await;
        let m = t.server.metrics();
        assert_eq!((m.outcome("failed"), m.aborts()), (3, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_openai_error_and_the_server_keeps_serving() {
    within(LIMIT, async {
        let t = start_with(
            ServeConfig {
                max_prompt_tokens: 64,
                max_tokens_limit: 1000,
                ..ServeConfig::default()
            },
            sim_config(),
        )
        .await;
        let long = "x".repeat(65);
        let cases: Vec<(&str, String, u16, &str, Value)> = vec![
            ("/v1/completions", "{\"model\": \"sim\", \"prompt\": ".into(), 400, "invalid_json", Value::Null),
            ("/v1/completions", "not json".into(), 400, "invalid_json", Value::Null),
            ("/v1/completions", "{\"model\": \"sim\", \"prompt\": \"x\"} trailing".into(), 400, "invalid_json", Value::Null),
            ("/v1/completions", json!({"prompt": "x"}).to_string(), 400, "missing_required_parameter", json!("model")),
            ("/v1/completions", json!({"model": "sim"}).to_string(), 400, "missing_required_parameter", json!("prompt")),
            ("/v1/completions", json!({"model": 7, "prompt": "x"}).to_string(), 400, "invalid_type", json!("model")),
            ("/v1/completions", json!({"model": "sim", "prompt": "x", "max_tokens": "ten"}).to_string(), 400, "invalid_type", json!("max_tokens")),
            ("/v1/completions", json!({"model": "sim", "prompt": "x", "stream": "yes"}).to_string(), 400, "invalid_type", json!("stream")),
            ("/v1/completions", json!({"model": "sim", "prompt": "x", "max_tokens": -1}).to_string(), 400, "invalid_value", json!("max_tokens")),
            ("/v1/completions", json!({"model": "sim", "prompt": "x", "max_tokens": 1_000_000_000_000_i64}).to_string(), 400, "invalid_value", json!("max_tokens")),
            ("/v1/completions", json!({"model": "sim", "prompt": "x", "max_tokens": 1e30}).to_string(), 400, "invalid_type", json!("max_tokens")),
            ("/v1/completions", json!({"model": "sim", "prompt": long}).to_string(), 400, "context_length_exceeded", json!("prompt")),
            ("/v1/completions", json!({"model": "sim", "prompt": ""}).to_string(), 400, "invalid_value", json!("prompt")),
            ("/v1/completions", json!({"model": "sim", "prompt": [1, 999]}).to_string(), 400, "invalid_value", json!("prompt[1]")),
            ("/v1/completions", json!({"model": "gpt-4", "prompt": "x"}).to_string(), 404, "model_not_found", json!("model")),
            ("/v1/chat/completions", json!({"model": "sim", "messages": []}).to_string(), 400, "invalid_value", json!("messages")),
            ("/v1/chat/completions", json!({"model": "sim", "messages": "hi"}).to_string(), 400, "invalid_type", json!("messages")),
            ("/v1/chat/completions", json!({"model": "sim", "messages": [{"content": "hi"}]}).to_string(), 400, "missing_required_parameter", json!("messages[0].role")),
            ("/v1/chat/completions", json!({"model": "sim", "messages": [{"role": "wizard", "content": "hi"}]}).to_string(), 400, "invalid_value", json!("messages[0].role")),
            ("/v1/chat/completions", json!({"model": "sim", "messages": [{"role": "user", "content": long}]}).to_string(), 400, "context_length_exceeded", json!("messages")),
            ("/v1/chat/completions", json!({"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}).to_string(), 400, "invalid_value", json!("max_completion_tokens")),
            ("/v1/chat/completions", json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).to_string(), 404, "model_not_found", json!("model")),
        ];
        for (path, body, status, code, param) in &cases {
            let (got, v) = t.post_raw(path, body).await;
            assert_eq!(got, *status, "{path} {body}: {v}");
            let err = error_object(&v);
            assert_eq!(err["code"], *code, "{path} {body}: {v}");
            assert_eq!(err["param"], *param, "{path} {body}: {v}");
            assert_eq!(err["type"], "invalid_request_error");
        }
        // Unknown paths and methods answer in the same shape.
        let (status, text) = t.get("/v2/nothing").await;
        assert_eq!(status, 404);
        assert_eq!(error_object(&json_of(&text))["code"], "unknown_url");
        let (status, text) = t.get("/v1/completions").await;
        assert_eq!(status, 405);
        assert_eq!(error_object(&json_of(&text))["code"], "method_not_allowed");
        // And the server still serves.
        let (status, v) = t.post_raw("/v1/completions", &completion(3, false).to_string()).await;
        assert_eq!(status, 200, "{v}");
        t.settled().await;
        let s = t.metrics().await;
        let n400 = cases.iter().filter(|c| c.2 == 400 && c.0 == "/v1/completions").count() as f64;
        assert_eq!(sample(&s, "tether_http_responses_total{endpoint=\"/v1/completions\",status=\"400\"}"), n400);
        assert_eq!(sample(&s, "tether_http_responses_total{endpoint=\"/v1/completions\",status=\"404\"}"), 1.0);
        assert_eq!(sample(&s, "tether_http_responses_total{endpoint=\"/v1/chat/completions\",status=\"404\"}"), 1.0);
        // Rejected requests never reached the engine.
        assert_eq!(sum_of(&s, "tether_requests_total", &["outcome=\"finished\""]), 1.0);
        assert_eq!(sum_of(&s, "tether_requests_total", &[]), 1.0);
        assert_eq!(t.engine.inner.gauges().accepted, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_504_or_an_error_event() {
    within(LIMIT, async {
        let config = ServeConfig {
            first_token_timeout: Some(Duration::from_millis(50)),
            inter_token_timeout: Some(Duration::from_millis(50)),
            ..chaos_config()
        };
        let t = start_with(config, sim_config()).await;
        // Unary, no first token ever: 504.
        let mut body = completion(10, false);
        body["annotations"] = json!(["chaos:hang@0"]);
        let (status, v) = t.post_raw("/v1/completions", &body.to_string()).await;
        assert_eq!(status, 504);
        let err = error_object(&v);
        assert_eq!(
            (err["type"].as_str(), err["code"].as_str()),
            (Some("timeout_error"), Some("first_token_timeout"))
        );
        // Unary, stalls after 2 tokens: 504 inter-token.
        body["annotations"] = json!(["chaos:hang@2"]);
        let (status, v) = t.post_raw("/v1/completions", &body.to_string()).await;
        assert_eq!(status, 504);
        assert_eq!(error_object(&v)["code"], "inter_token_timeout");
        // Streaming: 200, then an error event, no [DONE].
        for (chaos, code) in [
            ("chaos:hang@0", "first_token_timeout"),
            ("chaos:hang@2", "inter_token_timeout"),
        ] {
            let mut body = chat(10, true);
            body["annotations"] = json!([chaos]);
            let resp = t.post("/v1/chat/completions", &body).await;
            assert_eq!(resp.status(), 200);
            let events = sse_data(&resp.text().await.unwrap());
            assert!(!events.iter().any(|e| e == "[DONE]"));
            let last = json_of(events.last().unwrap());
            assert_eq!(error_object(&last)["code"], code, "{events:?}");
        }
        t.settled().await;
        let m = t.server.metrics();
        assert_eq!(m.outcome("timed_out"), 4);
        // A timeout kills the request: the hung engine sequences were aborted.
        assert_eq!(m.aborts(), 4);
        assert_eq!(t.engine.inner.gauges().hung, 0);
    })
    .await;
}
