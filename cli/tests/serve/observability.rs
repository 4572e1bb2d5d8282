//! What the server tells about its requests: a disconnect during the engine's setup
//! counted like any other, the `x-request-id` header, and a client's `traceparent`
//! handed to the engine (a malformed one kept aside, the request still served).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::json;
use tether_cli::serve::{ServeConfig, ServedEngine};
use tether_core::protocol::{RawTraceLink, TraceLink};

use crate::serve_support::*;
use crate::{chat, completion, json_of, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_during_the_engines_setup_is_a_counted_cancellation() {
    within(LIMIT, async {
        let engine = Arc::new(StuckSetupEngine::default());
        let server = serve_engine(ServedEngine::other(engine.clone()), ServeConfig::default()).await;
        let url = format!("http://{}", server.local_addr());
        let client = {
            let url = url.clone();
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(format!("{url}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(chat(4, true).to_string())
                    .send()
                    .await
            })
        };
        let m = server.metrics().clone();
        assert!(
            eventually(LIMIT, || engine.setups.load(Ordering::SeqCst) == 1
                && m.in_flight() == 1)
            .await
        );
        client.abort();
        assert!(client.await.unwrap_err().is_cancelled());
        assert!(
            eventually(LIMIT, || m.in_flight() == 0
                && engine.aborts.load(Ordering::SeqCst) == 1)
            .await,
            "in flight {}, aborts {}",
            m.in_flight(),
            engine.aborts.load(Ordering::SeqCst)
        );
        assert_eq!(m.aborts(), 1);
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            lines_of(&text, "tether_requests_total", true),
            ["tether_requests_total{outcome=\"cancelled\",endpoint=\"chat\",stream=\"true\"} 1"]
        );
        assert_eq!(
            lines_of(&text, "tether_cancellations_total", true),
            ["tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"chat\",stream=\"true\"} 1"]
        );
        assert_eq!(
            lines_of(&text, "tether_client_disconnects_total", true),
            ["tether_client_disconnects_total{endpoint=\"/v1/chat/completions\"} 1"]
        );
        assert_eq!(
            lines_of(&text, "tether_http_responses_total", true),
            ["tether_http_responses_total{endpoint=\"/v1/chat/completions\",status=\"499\"} 1"]
        );
        assert_eq!(
            lines_of(&text, "tether_requests_in_flight", false),
            ["tether_requests_in_flight 0"]
        );
        // Never scheduled, never a token: a duration and a prompt, no queue time.
        let s = parse_prometheus(&text);
        assert_eq!(sample(&s, "tether_request_duration_seconds_count"), 1.0);
        assert_eq!(sample(&s, "tether_prompt_tokens_count"), 1.0);
        assert_eq!(sample(&s, "tether_queue_time_seconds_count"), 0.0);
        assert_eq!(sample(&s, "tether_time_to_first_token_seconds_count"), 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_a_unique_request_id_or_the_clients_own() {
    within(LIMIT, async {
        let t = start().await;
        let resp = t.post("/v1/completions", &completion(2, false)).await;
        assert_eq!(resp.status(), 200);
        let header = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let body = json_of(&resp.text().await.unwrap());
        assert_eq!(body["id"], json!(header));
        let (kind, n, nonce) = id_parts(&header);
        assert_eq!((kind.as_str(), n), ("cmpl", 1));
        let resp = t.post("/v1/chat/completions", &chat(2, true)).await;
        let header = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id_parts(&header), ("chatcmpl".to_owned(), 2, nonce.clone()));
        let events = sse_data(&resp.text().await.unwrap());
        assert_eq!(json_of(&events[0])["id"], json!(header));
        // A client's own id is echoed as it came; ours stays in the body (and in the
        // logs and on the span), unique.
        for _ in 0..2 {
            let resp = t
                .client
                .post(format!("{}/v1/completions", t.base))
                .header("content-type", "application/json")
                .header("x-request-id", "retry-me")
                .body(completion(2, false).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-request-id"], "retry-me");
            let body = json_of(&resp.text().await.unwrap());
            let (kind, _, same) = id_parts(body["id"].as_str().unwrap());
            assert_eq!((kind.as_str(), same), ("cmpl", nonce.clone()));
        }
        // The engine got the client's id beside ours (the span records both).
        let ids: Vec<(String, Option<String>)> = t
            .engine
            .client_ids
            .lock()
            .unwrap()
            .iter()
            .map(|(id, client)| (short_ids(id), client.clone()))
            .collect();
        let retry = Some("retry-me".to_owned());
        assert_eq!(
            ids,
            [
                ("cmpl-1".to_owned(), None),
                ("chatcmpl-2".to_owned(), None),
                ("cmpl-3".to_owned(), retry.clone()),
                ("cmpl-4".to_owned(), retry),
            ]
        );
        // A request refused before it got an id has none, unless the client gave one.
        let resp = t
            .post("/v1/completions", &json!({"model": "sim", "prompt": ""}))
            .await;
        assert_eq!(resp.status(), 400);
        assert!(resp.headers().get("x-request-id").is_none());
        // Another server (a restart) draws another nonce: its ids are not these.
        let other = start().await;
        let resp = other.post("/v1/completions", &completion(2, false)).await;
        let header = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let (_, n, other_nonce) = id_parts(&header);
        assert_eq!(n, 1);
        assert_ne!(other_nonce, nonce);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_is_kept_aside_and_the_request_still_runs() {
    within(LIMIT, async {
        let t = start().await;
        let send = |traceparent: &'static str| {
            t.client
                .post(format!("{}/v1/completions", t.base))
                .header("traceparent", traceparent)
                .header("content-type", "application/json")
                .body(completion(2, false).to_string())
                .send()
        };
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        for traceparent in [
            good,
            "00-0af7651916cd43dd8448eb211c80319z-00f067aa0ba902b7-01",
            "nonsense",
        ] {
            let resp = send(traceparent).await.unwrap();
            assert_eq!(resp.status(), 200, "{traceparent}");
            resp.text().await.unwrap();
        }
        let links: Vec<_> = t
            .engine
            .links
            .lock()
            .unwrap()
            .iter()
            .map(|(id, link, raw)| (short_ids(id), *link, raw.clone()))
            .collect();
        assert_eq!(
            links,
            [
                (
                    "cmpl-1".to_owned(),
                    Some(
                        TraceLink::parse("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
                            .unwrap()
                    ),
                    None
                ),
                (
                    "cmpl-2".to_owned(),
                    None,
                    Some(RawTraceLink {
                        trace_id: "0af7651916cd43dd8448eb211c80319z".to_owned(),
                        span_id: "00f067aa0ba902b7".to_owned(),
                    })
                ),
                // Not a trace context at all: ignored.
                ("cmpl-3".to_owned(), None, None),
            ]
        );
        t.settled().await;
        assert_eq!(t.server.metrics().outcome("finished"), 3);
    })
    .await;
}
