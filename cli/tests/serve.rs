//! `tether serve` over real loopback HTTP (127.0.0.1, ephemeral ports): streaming and
//! unary completions on both endpoints, disconnects, errors, timeouts, bad input,
//! `/metrics`, `/health` and graceful shutdown.
//!
//! These tests do real socket I/O, so they run on real time (a paused clock would
//! auto-advance past timeouts while a socket is merely waiting); every wait is
//! bounded and no assertion depends on how long anything took.

mod serve_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use serve_support::*;
use tether_cli::serve::{self, ServeConfig, ServedEngine};
use tether_core::Runtime;

const LIMIT: Duration = Duration::from_secs(20);

fn completion(max_tokens: u32, stream: bool) -> Value {
    json!({"model": "sim", "prompt": "hello", "max_tokens": max_tokens, "stream": stream})
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "sim",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

fn json_of(data: &str) -> Value {
    serde_json::from_str(data).unwrap_or_else(|e| panic!("not json ({e}): {data}"))
}

/// Assert the OpenAI error object shape exactly, returning it.
fn error_object(body: &Value) -> &Value {
    let err = &body["error"];
    let keys: Vec<&String> = err.as_object().expect("an error object").keys().collect();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["type"].is_string(), "{body}");
    assert!(err["param"].is_string() || err["param"].is_null(), "{body}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_completion_ends_with_exactly_one_done() {
    within(LIMIT, async {
        let t = start().await;
        let resp = t.post("/v1/completions", &completion(8, true)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let events = sse_data(&resp.text().await.unwrap());
        assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| json_of(e))
            .collect();
        let text: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text.len(), 8, "one ASCII character per token");
        for c in &chunks {
            assert_eq!(c["object"], "text_completion");
            assert_eq!(c["id"], chunks[0]["id"]);
            assert_eq!(c["model"], "sim");
        }
        assert!(chunks[0]["id"].as_str().unwrap().starts_with("cmpl-"));
        let reasons: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .collect();
        assert_eq!(reasons.last().unwrap().as_str(), Some("length"));
        assert!(reasons[..reasons.len() - 1].iter().all(|r| r.is_null()));
        t.settled().await;
        let m = t.server.metrics();
        assert_eq!(
            (m.outcome("finished"), m.aborts()),
            (1, 0),
            "a natural end is not aborted"
        );
        assert_eq!(t.engine.inner.gauges().aborts_received, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chat_sends_the_role_first_then_usage_then_one_done() {
    within(LIMIT, async {
        let t = start().await;
        let mut body = chat(5, true);
        body["stream_options"] = json!({"include_usage": true});
        let resp = t.post("/v1/chat/completions", &body).await;
        assert_eq!(resp.status(), 200);
        let events = sse_data(&resp.text().await.unwrap());
        assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| json_of(e)).collect();
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
        }
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        let prompt = tether_cli::serve::tokenizer::encode("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n");
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": prompt.len(), "completion_tokens": 5, "total_tokens": prompt.len() + 5})
        );
        let last = &chunks[chunks.len() - 2];
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let text: String = chunks[1..chunks.len() - 1]
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text.len(), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_completion_and_chat_are_one_json_body() {
    within(LIMIT, async {
        let t = start().await;
        let resp = t.post("/v1/completions", &completion(6, false)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: Value = json_of(&resp.text().await.unwrap());
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 6);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11})
        );

        let (status, v) = t
            .post_raw("/v1/chat/completions", &chat(4, false).to_string())
            .await;
        assert_eq!(status, 200);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .len(),
            4
        );
        assert_eq!(v["usage"]["completion_tokens"], 4);

        // The same prompt and seed give the same text (the tokens are deterministic).
        let (_, a) = t
            .post_raw("/v1/completions", &completion(6, false).to_string())
            .await;
        let (_, b) = t
            .post_raw("/v1/completions", &completion(6, false).to_string())
            .await;
        assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
        assert_ne!(a["id"], b["id"]);

        let (status, v) = t.get("/v1/models").await;
        assert_eq!(status, 200);
        let v = json_of(&v);
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "sim");
        assert_eq!(v["data"][0]["object"], "model");
    })
    .await;
}

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
            sample(&s, "tether_requests_total{outcome=\"cancelled\"}"),
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
async fn chaos_annotations_from_clients_are_stripped_by_default() {
    within(LIMIT, async {
        let t = start().await;
        let mut body = completion(5, false);
        body["annotations"] = json!(["chaos:error@0", "chaos:panic@0"]);
        let (status, v) = t.post_raw("/v1/completions", &body.to_string()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
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
        assert_eq!(sample(&s, "tether_requests_total{outcome=\"finished\"}"), 1.0);
        assert_eq!(t.engine.inner.gauges().accepted, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    within(LIMIT, async {
        let t = start_with(chaos_config(), sim_config()).await;
        let empty = t.metrics().await;
        for outcome in ["finished", "cancelled", "failed", "dropped", "timed_out"] {
            assert_eq!(
                empty.get(&format!("tether_requests_total{{outcome=\"{outcome}\"}}")),
                Some(&0.0),
                "{outcome}"
            );
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

        let s = t.metrics().await;
        let get = |k: &str| sample(&s, k);
        assert_eq!(get("tether_requests_in_flight"), 0.0);
        assert_eq!(get("tether_requests_total{outcome=\"finished\"}"), 3.0);
        assert_eq!(get("tether_requests_total{outcome=\"cancelled\"}"), 1.0);
        for o in ["failed", "dropped", "timed_out"] {
            assert_eq!(
                get(&format!("tether_requests_total{{outcome=\"{o}\"}}")),
                0.0,
                "{o}"
            );
        }
        assert_eq!(
            get("tether_request_finish_reasons_total{reason=\"length\"}"),
            3.0
        );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapter_and_engine_may_run_on_smol() {
    within(LIMIT, async {
        let runtime: Arc<dyn Runtime> = Arc::new(tether_smol::SmolRuntime::global());
        let t = start_on(chaos_config(), sim_config(), runtime).await;
        let events = sse_data(
            &t.post("/v1/completions", &completion(5, true))
                .await
                .text()
                .await
                .unwrap(),
        );
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let mut reader = SseReader::new(t.post("/v1/completions", &completion(50_000, true)).await);
        reader.next().await.unwrap();
        drop(reader);
        t.settled().await;
        assert_eq!(
            (
                t.server.metrics().outcome("cancelled"),
                t.server.metrics().aborts()
            ),
            (1, 1)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_engine_is_served_through_the_byte_tokenizer() {
    within(LIMIT, async {
        let runtime: Arc<dyn Runtime> = Arc::new(tether_tokio::TokioRuntime::current());
        let engine = Arc::new(tether_engines::TinyEngine::new(
            tether_engines::TinyConfig::default(),
            runtime.clone(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = serve::start(
            ServedEngine::tiny(engine.clone()),
            runtime,
            listener,
            ServeConfig::default(),
        )
        .await
        .unwrap();
        let url = format!("http://{}/v1/completions", server.local_addr());
        let client = reqwest::Client::new();
        let body = json!({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8});
        let text = |v: Value| v["choices"][0]["text"].as_str().unwrap().to_owned();
        let a: Value = json_of(
            &client
                .post(&url)
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
        assert_eq!(a["usage"]["completion_tokens"], 8, "{a}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = sse_data(
            &client
                .post(&url)
                .body(streamed.to_string())
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let joined: String = events[..events.len() - 1]
            .iter()
            .map(|e| {
                json_of(e)["choices"][0]["text"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        // Greedy decoding: the streamed text is the unary text.
        assert_eq!(joined, text(a));
        assert!(eventually(LIMIT, || engine.live_sequences() == 0).await);
        server.shutdown();
        assert!(server.wait().await.cleanup.is_ok());
    })
    .await;
}
