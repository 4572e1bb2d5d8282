//! `tether serve` over real loopback HTTP (127.0.0.1, ephemeral ports): streaming and
//! unary completions on both endpoints, disconnects, errors, timeouts, bad input,
//! `/metrics`, `/health` and its canary, graceful shutdown, request ids and migration
//! links, the API key and CORS, `/version` and the tokenizer endpoints, the parameters
//! that change the output (honoured or refused), and the connection layer (keep-alive,
//! timeouts, the connection limit).
//!
//! These tests do real socket I/O, so they run on real time (a paused clock would
//! auto-advance past timeouts while a socket is merely waiting); every wait is
//! bounded and no assertion depends on how long anything took.

#[path = "../serve_support/mod.rs"]
mod serve_support;

mod auth;
mod completions;
mod connections;
mod failures;
mod observability;
mod operations;
mod params;
mod requests;
mod stop_strings;
mod tokenize;

use std::time::Duration;

use serde_json::{json, Value};

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

/// A `tether serve` over a default TinyEngine on this tokio runtime: the server, the
/// engine (for its gauges) and the URL of its `/v1/completions`.
async fn tiny_server() -> (
    tether_cli::serve::Server,
    std::sync::Arc<tether_engines::TinyEngine>,
    String,
) {
    use std::sync::Arc;
    use tether_cli::serve::{self, ServeConfig, ServedEngine};
    use tether_core::Runtime;

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
    (server, engine, url)
}

/// The JSON of a stream's data events before its last one (`[DONE]`).
fn data_chunks(events: &[String]) -> Vec<Value> {
    events[..events.len() - 1]
        .iter()
        .map(|e| json_of(e))
        .collect()
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
