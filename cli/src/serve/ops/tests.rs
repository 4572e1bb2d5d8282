use axum::body::to_bytes;
use serde_json::json;

use super::*;

fn limits() -> Limits {
    Limits {
        model: "sim".to_owned(),
        max_prompt_tokens: 8,
        max_tokens_limit: 100,
        default_max_tokens: 16,
        allow_chaos: false,
        supported: tether_engines::SimEngine::SUPPORTED,
        tokenizer: crate::serve::tokenizer::Tokenizer::bytes(),
    }
}

async fn answer(response: Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[test]
fn liveness_fails_on_a_shutdown_a_cleanup_or_the_engines_own_check() {
    let plain = Liveness::new(None);
    assert_eq!(plain.check(false), Ok(()));
    assert_eq!(
        plain.check(true),
        Err("the server is shutting down".to_owned())
    );
    plain.engine_cleaned_up();
    assert_eq!(
        plain.check(false),
        Err("the engine was cleaned up".to_owned())
    );

    let verdict = Arc::new(std::sync::Mutex::new(Ok(())));
    let seen = verdict.clone();
    let checked = Liveness::new(Some(Arc::new(move || seen.lock().unwrap().clone())));
    assert_eq!(checked.check(false), Ok(()));
    *verdict.lock().unwrap() = Err("the scheduler loop is not running".to_owned());
    assert_eq!(
        checked.check(false),
        Err("the scheduler loop is not running".to_owned())
    );
    // The shutdown is named first: it explains everything after it.
    assert_eq!(
        checked.check(true),
        Err("the server is shutting down".to_owned())
    );
}

#[tokio::test]
async fn health_is_a_503_naming_the_shutdown_once_one_began() {
    // What `health` answers once `run_server` set the draining flag.
    let liveness = Liveness::new(None);
    let (status, body) = answer(health_answer("sim", liveness.check(true))).await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        json!({"status": "unhealthy", "model": "sim", "error": "the server is shutting down"})
    );
    let (status, body) = answer(health_answer("sim", liveness.check(false))).await;
    assert_eq!(
        (status, body),
        (200, json!({"status": "ok", "model": "sim"}))
    );
}

#[test]
fn tokenize_encodes_a_prompt_or_renders_a_conversation() {
    let tokens = |body: serde_json::Value| tokenize_body(&limits(), body);
    assert_eq!(
        tokens(json!({"model": "sim", "prompt": "hé"})).unwrap(),
        vec![104, 0xc3, 0xa9]
    );
    assert_eq!(
        tokens(json!({"model": "sim", "prompt": "", "add_special_tokens": false})).unwrap(),
        Vec::<u32>::new()
    );
    // Longer than max_prompt_tokens (8): counted, not refused.
    assert_eq!(
        tokens(json!({"model": "sim", "prompt": "0123456789"}))
            .unwrap()
            .len(),
        10
    );
    assert_eq!(
        tokens(json!({"model": "sim", "messages": [{"role": "user", "content": "hi"}]})).unwrap(),
        crate::serve::tokenizer::encode("<|user|>\nhi\n<|assistant|>\n")
    );
}

#[test]
fn tokenize_refuses_what_it_cannot_read() {
    let err = |body: serde_json::Value| {
        let shown = body.to_string();
        tokenize_body(&limits(), body).expect_err(&shown)
    };
    let e = err(json!({"model": "gpt-9", "prompt": "x"}));
    assert_eq!(
        (e.status.as_u16(), e.body.code, e.body.param.as_deref()),
        (404, Some("model_not_found"), Some("model"))
    );
    let cases = [
        (
            json!({"model": "sim"}),
            "missing_required_parameter",
            "prompt",
        ),
        (
            json!({"model": "sim", "prompt": "x", "messages": []}),
            "invalid_value",
            "messages",
        ),
        (
            json!({"model": "sim", "prompt": 3}),
            "invalid_type",
            "prompt",
        ),
        (
            json!({"model": "sim", "prompt": "x", "add_special_tokens": "yes"}),
            "invalid_type",
            "add_special_tokens",
        ),
        (
            json!({"model": "sim", "messages": [{"role": "robot", "content": "x"}]}),
            "invalid_value",
            "messages[0].role",
        ),
        (
            json!({"model": "sim", "messages": [{"role": 1}]}),
            "invalid_type",
            "messages[0].role",
        ),
        (
            json!({"model": "sim", "messages": []}),
            "invalid_value",
            "messages",
        ),
        (
            json!({"prompt": "x"}),
            "missing_required_parameter",
            "model",
        ),
    ];
    for (body, code, param) in cases {
        let e = err(body.clone());
        assert_eq!(e.status.as_u16(), 400, "{body}");
        assert_eq!(
            (e.body.code, e.body.param.as_deref()),
            (Some(code), Some(param)),
            "{body}"
        );
    }
    let e = err(json!(["sim", "x"]));
    assert_eq!(
        (e.status.as_u16(), e.body.code),
        (400, Some("invalid_type"))
    );
}

#[test]
fn detokenize_decodes_bytes_and_names_the_bad_token() {
    let detokenize = |model: &str, tokens: Vec<i64>| {
        detokenize_body(
            &limits(),
            DetokenizeRequest {
                model: model.to_owned(),
                tokens,
            },
        )
    };
    assert_eq!(detokenize("sim", vec![104, 0xc3, 0xa9]).unwrap(), "hé");
    assert_eq!(detokenize("sim", vec![]).unwrap(), "");
    // An incomplete sequence at the end is not lost: it becomes U+FFFD.
    assert_eq!(
        detokenize("sim", vec![97, 0xe2, 0x9c]).unwrap(),
        "a\u{fffd}"
    );
    for (tokens, param) in [
        (vec![1, 256], "tokens[1]"),
        (vec![-1], "tokens[0]"),
        (vec![1, 2, i64::MAX], "tokens[2]"),
    ] {
        let e = detokenize("sim", tokens.clone()).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.body.code, e.body.param.as_deref()),
            (400, Some("invalid_value"), Some(param)),
            "{tokens:?}"
        );
    }
    let e = detokenize("gpt-9", vec![1]).unwrap_err();
    assert_eq!(e.status.as_u16(), 404);
}
