//! `GET /version`, `POST /tokenize` and `POST /detokenize`: vLLM's shapes over the
//! byte-level tokenizer, and the OpenAI-style errors for what they cannot read.

use serde_json::json;

use crate::serve_support::*;
use crate::{chat, error_object, json_of, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_is_the_crate_version() {
    within(LIMIT, async {
        let t = start().await;
        let (status, body) = t.get("/version").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            json_of(&body),
            json!({"version": env!("CARGO_PKG_VERSION")})
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_counts_a_prompt_and_a_conversation_as_generation_does() {
    within(LIMIT, async {
        let t = start().await;
        let (status, v) = t
            .post_raw(
                "/tokenize",
                &json!({"model": "sim", "prompt": "hé!", "add_special_tokens": true}).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v,
            json!({"count": 4, "max_model_len": 4096, "tokens": [104, 0xc3, 0xa9, 33]})
        );

        // A conversation is rendered with the chat template: its count is the prompt
        // usage the chat endpoint reports for it.
        let conversation = chat(1, false);
        let (status, v) = t
            .post_raw(
                "/tokenize",
                &json!({"model": "sim", "messages": conversation["messages"]}).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        let tokens: Vec<u8> = v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| u8::try_from(t.as_u64().unwrap()).unwrap())
            .collect();
        assert_eq!(
            String::from_utf8(tokens).unwrap(),
            "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
        );
        let (status, reply) = t
            .post_raw("/v1/chat/completions", &conversation.to_string())
            .await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(v["count"], reply["usage"]["prompt_tokens"]);

        // A prompt over the limit is counted, not refused (the count says by how much).
        let t = start_with(
            tether_cli::serve::ServeConfig {
                max_prompt_tokens: 3,
                ..tether_cli::serve::ServeConfig::default()
            },
            sim_config(),
        )
        .await;
        let (status, v) = t
            .post_raw(
                "/tokenize",
                &json!({"model": "sim", "prompt": "hello"}).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!((&v["count"], &v["max_model_len"]), (&json!(5), &json!(3)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detokenize_inverts_tokenize() {
    within(LIMIT, async {
        let t = start().await;
        let text = "héllo, wörld ✓ 🦀";
        let (_, v) = t
            .post_raw(
                "/tokenize",
                &json!({"model": "sim", "prompt": text}).to_string(),
            )
            .await;
        let (status, back) = t
            .post_raw(
                "/detokenize",
                &json!({"model": "sim", "tokens": v["tokens"]}).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{back}");
        assert_eq!(back, json!({"prompt": text}));
        // Bytes that are not UTF-8 become U+FFFD.
        let (status, back) = t
            .post_raw(
                "/detokenize",
                &json!({"model": "sim", "tokens": [104, 255, 105]}).to_string(),
            )
            .await;
        assert_eq!((status, back), (200, json!({"prompt": "h\u{fffd}i"})));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizer_endpoints_refuse_bad_input_with_openai_errors() {
    within(LIMIT, async {
        let t = start().await;
        let cases = [
            (
                "/tokenize",
                json!({"model": "gpt-9", "prompt": "x"}).to_string(),
                404,
                "model_not_found",
                Some("model"),
            ),
            (
                "/detokenize",
                json!({"model": "gpt-9", "tokens": [1]}).to_string(),
                404,
                "model_not_found",
                Some("model"),
            ),
            (
                "/detokenize",
                json!({"model": "sim", "tokens": [1, 256]}).to_string(),
                400,
                "invalid_value",
                Some("tokens[1]"),
            ),
            (
                "/detokenize",
                json!({"model": "sim", "tokens": [-1]}).to_string(),
                400,
                "invalid_value",
                Some("tokens[0]"),
            ),
            (
                "/detokenize",
                json!({"model": "sim", "tokens": [1, "a"]}).to_string(),
                400,
                "invalid_type",
                Some("tokens[1]"),
            ),
            (
                "/detokenize",
                json!({"model": "sim"}).to_string(),
                400,
                "missing_required_parameter",
                Some("tokens"),
            ),
            ("/tokenize", "{".to_owned(), 400, "invalid_json", None),
            (
                "/detokenize",
                "{\"model\":".to_owned(),
                400,
                "invalid_json",
                None,
            ),
            (
                "/tokenize",
                json!({"model": "sim"}).to_string(),
                400,
                "missing_required_parameter",
                Some("prompt"),
            ),
            (
                "/tokenize",
                json!({"model": "sim", "messages": [{"role": "robot", "content": "x"}]})
                    .to_string(),
                400,
                "invalid_value",
                Some("messages[0].role"),
            ),
        ];
        for (path, body, status, code, param) in cases {
            let (got, v) = t.post_raw(path, &body).await;
            assert_eq!(got, status, "{path} {body}: {v}");
            let err = error_object(&v);
            assert_eq!(err["code"], code, "{path} {body}: {v}");
            assert_eq!(err["param"], json!(param), "{path} {body}: {v}");
        }
        let (status, _) = t.get("/tokenize").await;
        assert_eq!(status, 405);
    })
    .await;
}
