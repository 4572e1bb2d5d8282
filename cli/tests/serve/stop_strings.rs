//! Stop strings over HTTP: matched on the decoded text across chunks (one byte token
//! per chunk here, so every multi-byte character and every stop string is split),
//! excluded from the text, ending the request with `finish_reason: "stop"` through the
//! adapter's early finish (SPEC rule 12): the engine aborted once, the outcome
//! `finished`, never a cancellation.
//!
//! SimEngine's `sim:echo` annotation makes the generated text the prompt's, so each
//! test knows the text it will get.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tether_cli::serve::{ServeConfig, ServedEngine};
use tether_core::engine::{BoxFuture, ChunkStream, EngineConfig, GenerateContext, LlmEngine};
use tether_core::error::EngineError;
use tether_core::protocol::{Chunk, FinishReason, Request, Usage};

use crate::serve_support::*;
use crate::{json_of, LIMIT};

/// A completion request whose text is `prompt` again (up to `max_tokens` bytes).
fn echo(prompt: &str, max_tokens: usize, stop: &Value, stream: bool) -> Value {
    json!({
        "model": "sim", "prompt": prompt, "max_tokens": max_tokens, "stream": stream,
        "stop": stop, "annotations": ["sim:echo"],
    })
}

/// The text and the finish reason of a streamed completion's body, checking that the
/// finish reason comes once, last, and `[DONE]` after it.
fn streamed(body: &str) -> (String, String) {
    let events = sse_data(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks = crate::data_chunks(&events);
    let text = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    let reasons: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .collect();
    assert!(
        reasons[..reasons.len() - 1].iter().all(|r| r.is_null()),
        "{body}"
    );
    let reason = reasons.last().unwrap().as_str().unwrap().to_owned();
    (text, reason)
}

/// Once settled: `finished` requests, engine aborts received, cancellations counted.
async fn counts(t: &TestServer) -> (u64, u64, f64) {
    t.settled().await;
    let m = t.server.metrics();
    let samples = t.metrics().await;
    let cancelled: f64 = samples
        .iter()
        .filter(|(k, _)| k.starts_with("tether_cancellations_total{"))
        .map(|(_, v)| v)
        .sum();
    (
        m.outcome("finished"),
        t.engine.inner.gauges().aborts_received,
        cancelled,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_byte_stop_string_split_across_chunks_ends_the_stream_without_its_text() {
    within(LIMIT, async {
        let t = start().await;
        // 9 bytes before the stop string, 9 in it: the 18th token completes the match.
        let prompt = "物語の終わりです 🦀 and more text after the end";
        let body = echo(prompt, 2000, &json!(["終わり"]), true);
        let mut body_with_usage = body.clone();
        body_with_usage["stream_options"] = json!({"include_usage": true});
        let resp = t.post("/v1/completions", &body_with_usage).await;
        assert_eq!(resp.status(), 200);
        let raw = resp.text().await.unwrap();
        let events = sse_data(&raw);
        // The usage chunk: the tokens generated up to the match, which ends in token 18.
        let usage = json_of(&events[events.len() - 2]);
        assert_eq!(usage["usage"]["completion_tokens"], 18, "{raw}");
        let without_usage = events[..events.len() - 2]
            .iter()
            .chain(std::iter::once(&"[DONE]".to_owned()))
            .map(|e| format!("data: {e}\n\n"))
            .collect::<String>();
        assert_eq!(
            streamed(&without_usage),
            ("物語の".to_owned(), "stop".to_owned())
        );
        // Finished, the engine aborted exactly once, nothing counted as cancelled.
        assert_eq!(counts(&t).await, (1, 1, 0.0));
        assert_eq!(t.server.metrics().aborts(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_requests_stop_at_the_first_completed_of_four_stop_strings() {
    within(LIMIT, async {
        let t = start().await;
        let stops = json!(["🦀", "\n\nUser:", "never", "e: h"]);
        let resp = t
            .post(
                "/v1/completions",
                &echo("Hi there\n\nUser: hello 🦀", 2000, &stops, false),
            )
            .await;
        assert_eq!(resp.status(), 200);
        let body = json_of(&resp.text().await.unwrap());
        // "e: h" would end after "\n\nUser:" was complete: the first completed wins.
        assert_eq!(body["choices"][0]["text"], "Hi there");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["completion_tokens"], 15);
        assert_eq!(counts(&t).await, (1, 1, 0.0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_held_back_for_a_possible_match_is_sent_when_none_comes() {
    within(LIMIT, async {
        let t = start().await;
        // "wor" may begin "world" until the stream ends at 9 tokens: it is held, then
        // sent with the last chunk.
        let resp = t
            .post(
                "/v1/completions",
                &echo("hello wor", 9, &json!("world"), true),
            )
            .await;
        let (text, reason) = streamed(&resp.text().await.unwrap());
        assert_eq!((text.as_str(), reason.as_str()), ("hello wor", "length"));
        let resp = t
            .post(
                "/v1/completions",
                &echo("hello wor", 9, &json!("world"), false),
            )
            .await;
        let body = json_of(&resp.text().await.unwrap());
        assert_eq!(body["choices"][0]["text"], "hello wor");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        // Natural ends: nothing aborted.
        assert_eq!(counts(&t).await, (2, 0, 0.0));
    })
    .await;
}

/// Answers every request with one chunk: the prompt's tokens and `Length`, and counts
/// aborts (there must be none: the request is over with that chunk).
#[derive(Debug, Default)]
struct OneChunkEngine {
    aborts: AtomicUsize,
}

impl LlmEngine for OneChunkEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move { Ok(EngineConfig::new("one", worker_id)) })
    }
    fn generate(
        &self,
        request: Request,
        _: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        let n = u32::try_from(request.token_ids.len()).unwrap();
        let mut chunk = Chunk::tokens(request.token_ids);
        chunk.finish_reason = Some(FinishReason::Length);
        let chunk = chunk.with_usage(Usage::new(n, n));
        Box::pin(async move {
            let stream: ChunkStream = Box::pin(futures_util::stream::iter([Ok(chunk)]));
            Ok(stream)
        })
    }
    fn abort(&self, _: GenerateContext) -> BoxFuture<'_, ()> {
        self.aborts.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {})
    }
    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_match_in_the_engines_last_chunk_is_a_stop_without_an_abort() {
    within(LIMIT, async {
        let engine = Arc::new(OneChunkEngine::default());
        let server =
            serve_engine(ServedEngine::other(engine.clone()), ServeConfig::default()).await;
        let client = reqwest::Client::new();
        for stream in [true, false] {
            let body = json!({
                "model": "one", "prompt": "ab!cd", "stream": stream, "stop": ["!", "zz"],
            });
            let resp = client
                .post(format!("http://{}/v1/completions", server.local_addr()))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let text = resp.text().await.unwrap();
            // The text ends before the stop string, which is why it ends: `stop`, not
            // the engine's `length`.
            let (text, reason) = if stream {
                streamed(&text)
            } else {
                let body = json_of(&text);
                let choice = &body["choices"][0];
                (
                    choice["text"].as_str().unwrap().to_owned(),
                    choice["finish_reason"].as_str().unwrap().to_owned(),
                )
            };
            assert_eq!((text.as_str(), reason.as_str()), ("ab", "stop"));
        }
        assert!(
            eventually(LIMIT, || server.metrics().outcome("finished") == 2).await,
            "two finished requests"
        );
        assert_eq!(engine.aborts.load(Ordering::SeqCst), 0);
        assert_eq!(server.metrics().aborts(), 0);
        server.shutdown();
        assert!(server.wait().await.cleanup.is_ok());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_token_completing_a_match_still_aborts_the_unfinished_request() {
    within(LIMIT, async {
        let t = start().await;
        // SimEngine sends its terminal after the last token, in a chunk of its own: the
        // match completes before the engine's end, so the request is finished early
        // and the engine aborted, as for any other match.
        let resp = t
            .post("/v1/completions", &echo("ab!cd", 3, &json!("!"), true))
            .await;
        let (text, reason) = streamed(&resp.text().await.unwrap());
        assert_eq!((text.as_str(), reason.as_str()), ("ab", "stop"));
        assert_eq!(counts(&t).await, (1, 1, 0.0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_stop_too() {
    within(LIMIT, async {
        let t = start().await;
        let body = json!({
            "model": "sim",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2000, "stream": true, "stop": "user", "annotations": ["sim:echo"],
        });
        let resp = t.post("/v1/chat/completions", &body).await;
        let events = sse_data(&resp.text().await.unwrap());
        let chunks = crate::data_chunks(&events);
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        // The echoed prompt is the chat template: "<|user|>\nx\n<|assistant|>\n".
        assert_eq!(text, "<|");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        assert_eq!(counts(&t).await, (1, 1, 0.0));
    })
    .await;
}
