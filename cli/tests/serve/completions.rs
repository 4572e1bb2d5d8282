//! Completions that go right: streaming and unary on both endpoints, client chaos
//! annotations stripped, the adapter on smol and the tiny engine behind the byte
//! tokenizer.

use std::sync::Arc;

use serde_json::{json, Value};
use tether_core::Runtime;

use crate::serve_support::*;
use crate::{chat, completion, json_of, LIMIT};

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
        let chunks = crate::data_chunks(&events);
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
        let chunks = crate::data_chunks(&events);
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
        let (server, engine, url) = crate::tiny_server().await;
        let client = reqwest::Client::new();
        let body = json!({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8});
        let text = |v: Value| v["choices"][0]["text"].as_str().unwrap().to_owned();
        let a: Value = json_of(
            &client
                .post(&url)
                .header("content-type", "application/json")
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
                .header("content-type", "application/json")
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
