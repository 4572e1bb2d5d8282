//! Parameters that change the output, over HTTP: one the engine does not honour is a
//! 400 naming it (and never reaches the engine), its default is accepted, and what the
//! engine honours works: SimEngine's seed, TinyEngine's seeded sampling.

use serde_json::{json, Value};

use crate::serve_support::*;
use crate::{error_object, json_of, LIMIT};

fn chat_body() -> Value {
    json!({"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
}

fn completion_body() -> Value {
    json!({"model": "sim", "prompt": "hello", "max_tokens": 4})
}

/// `base` with `extra`'s fields set.
fn with(mut base: Value, extra: Value) -> Value {
    let Value::Object(fields) = extra else {
        panic!("not an object: {extra}");
    };
    for (k, v) in fields {
        base[k] = v;
    }
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parameter_the_engine_ignores_is_a_400_naming_it() {
    within(LIMIT, async {
        let t = start().await;
        let cases = [
            (
                "/v1/completions",
                with(completion_body(), json!({"presence_penalty": 0.5})),
                "presence_penalty",
            ),
            (
                "/v1/completions",
                with(completion_body(), json!({"temperature": 0.7})),
                "temperature",
            ),
            (
                "/v1/completions",
                with(completion_body(), json!({"top_p": 0.5, "stream": true})),
                "top_p",
            ),
            (
                "/v1/completions",
                with(completion_body(), json!({"top_k": 40})),
                "top_k",
            ),
            (
                "/v1/completions",
                with(completion_body(), json!({"best_of": 3})),
                "best_of",
            ),
            (
                "/v1/completions",
                with(completion_body(), json!({"suffix": "end"})),
                "suffix",
            ),
            (
                "/v1/completions",
                with(completion_body(), json!({"logit_bias": {"65": 10}})),
                "logit_bias",
            ),
            (
                "/v1/chat/completions",
                with(chat_body(), json!({"frequency_penalty": 1, "stream": true})),
                "frequency_penalty",
            ),
            (
                "/v1/chat/completions",
                with(
                    chat_body(),
                    json!({"response_format": {"type": "json_object"}}),
                ),
                "response_format",
            ),
            (
                "/v1/chat/completions",
                with(chat_body(), json!({"tool_choice": "required"})),
                "tool_choice",
            ),
            (
                "/v1/chat/completions",
                with(chat_body(), json!({"repetition_penalty": 1.2})),
                "repetition_penalty",
            ),
        ];
        for (path, body, param) in &cases {
            let (status, v) = t.post_raw(path, &body.to_string()).await;
            assert_eq!(status, 400, "{path} {body}: {v}");
            let err = error_object(&v);
            assert_eq!(err["param"], *param, "{body}: {v}");
            assert_eq!(err["code"], "unsupported_parameter", "{body}: {v}");
            assert_eq!(err["type"], "invalid_request_error");
        }
        // Out of range is invalid whatever the engine honours.
        let (status, v) = t
            .post_raw(
                "/v1/completions",
                &with(completion_body(), json!({"min_tokens": 5})).to_string(),
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(
            (&error_object(&v)["param"], &v["error"]["code"]),
            (&json!("min_tokens"), &json!("invalid_value"))
        );
        t.settled().await;
        assert_eq!(
            t.engine.inner.gauges().accepted,
            0,
            "no refused request reached the engine"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_are_accepted_and_sim_honours_its_own() {
    within(LIMIT, async {
        let t = start().await;
        let defaults = json!({
            "temperature": 1, "top_p": 1, "top_k": -1, "presence_penalty": 0,
            "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": {},
            "response_format": {"type": "text"}, "min_tokens": 0, "ignore_eos": false,
        });
        let (status, v) = t
            .post_raw(
                "/v1/completions",
                &with(
                    with(completion_body(), defaults.clone()),
                    json!({"best_of": 1, "suffix": ""}),
                )
                .to_string(),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 4);
        let plain = t
            .post_raw("/v1/completions", &completion_body().to_string())
            .await
            .1;
        assert_eq!(
            v["choices"][0]["text"], plain["choices"][0]["text"],
            "defaults change nothing"
        );
        for choice in ["none", "auto"] {
            let body = with(
                with(chat_body(), defaults.clone()),
                json!({"tool_choice": choice}),
            );
            let (status, v) = t.post_raw("/v1/chat/completions", &body.to_string()).await;
            assert_eq!(status, 200, "{choice}: {v}");
        }
        // SimEngine honours a seed (another seed, other tokens), min_tokens and ignore_eos.
        let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_owned();
        let seeded = |seed: u64| {
            with(
                completion_body(),
                json!({"seed": seed, "max_tokens": 12, "min_tokens": 2, "ignore_eos": true}),
            )
        };
        let a = t
            .post_raw("/v1/completions", &seeded(5).to_string())
            .await
            .1;
        let b = t
            .post_raw("/v1/completions", &seeded(5).to_string())
            .await
            .1;
        let c = t
            .post_raw("/v1/completions", &seeded(6).to_string())
            .await
            .1;
        assert_eq!(text(&a), text(&b));
        assert_ne!(text(&a), text(&c));
        t.settled().await;
        assert_eq!(t.engine.inner.gauges().accepted, 7);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_seeded_sampling_reproduces_over_http() {
    within(LIMIT, async {
        let (server, _engine, url) = crate::tiny_server().await;
        let client = reqwest::Client::new();
        let post = |extra: Value| {
            let body = with(json!({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 16}), extra);
            let (client, url) = (client.clone(), url.clone());
            async move {
                let resp = client.post(&url).header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
                let status = resp.status().as_u16();
                let v = json_of(&resp.text().await.unwrap());
                assert_eq!(status, 200, "{body}: {v}");
                assert_eq!(v["usage"]["completion_tokens"], 16, "{v}");
                v["choices"][0]["text"].as_str().unwrap().to_owned()
            }
        };
        let greedy = post(json!({})).await;
        let sampled = post(json!({"temperature": 0.9, "seed": 11})).await;
        assert_eq!(post(json!({"temperature": 0.9, "seed": 11})).await, sampled, "same seed, same text");
        assert_ne!(sampled, greedy, "temperature 0.9 samples");
        assert_ne!(post(json!({"temperature": 0.9, "seed": 12})).await, sampled, "another seed, other text");
        // What must stay greedy does.
        assert_eq!(post(json!({"temperature": 0})).await, greedy);
        assert_eq!(post(json!({"temperature": 1.5, "top_k": 1, "seed": 3})).await, greedy);
        assert_eq!(post(json!({"temperature": 1.5, "top_p": 1e-9, "seed": 3})).await, greedy);
        // Streamed, the same seed gives the same text.
        let body = json!({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0.9, "seed": 11, "stream": true});
        let events = sse_data(&client.post(&url).header("content-type", "application/json").body(body.to_string()).send().await.unwrap().text().await.unwrap());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let streamed: String = events[..events.len() - 1]
            .iter()
            .map(|e| json_of(e)["choices"][0]["text"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(streamed, sampled);
        // TinyEngine honours sampling, but penalties have no field: still refused.
        let body = json!({"model": "tiny", "prompt": "x", "temperature": 0.9, "presence_penalty": 1});
        let resp = client.post(&url).header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(json_of(&resp.text().await.unwrap())["error"]["param"], "presence_penalty");
        server.shutdown();
        assert!(server.wait().await.cleanup.is_ok());
    })
    .await;
}
