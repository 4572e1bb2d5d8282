//! Who may call the server: `--api-key` on `/v1/*`, `/tokenize` and `/detokenize`
//! (401 with an OpenAI error object otherwise; the operator's endpoints stay open),
//! and CORS, off by default and answered before the key check when on.

use reqwest::header::HeaderMap;
use serde_json::json;
use tether_cli::serve::{self, ApiKey, ServeConfig, ServeError};

use crate::serve_support::*;
use crate::{completion, json_of, LIMIT};

const KEY: &str = "sk-test-0123456789";

fn keyed() -> ServeConfig {
    ServeConfig {
        api_key: Some(ApiKey::new(KEY)),
        ..ServeConfig::default()
    }
}

/// Send `method path` with `authorization` (if any) and `origin` (if any).
async fn send(
    t: &TestServer,
    method: reqwest::Method,
    path: &str,
    authorization: Option<&str>,
    body: Option<String>,
) -> (u16, HeaderMap, String) {
    let mut req = t.client.request(method, format!("{}{path}", t.base));
    if let Some(value) = authorization {
        req = req.header("authorization", value);
    }
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_required_on_v1_and_the_tokenizer_and_compared_exactly() {
    within(LIMIT, async {
        let t = start_with(keyed(), sim_config()).await;
        let get = reqwest::Method::GET;
        let right = format!("Bearer {KEY}");
        let refused = [
            (None, "no API key: send it as the header `Authorization: Bearer KEY`"),
            (Some("Bearer sk-test-012345678"), "incorrect API key"),
            (Some("Bearer sk-test-0123456789x"), "incorrect API key"),
            (Some("Bearer SK-TEST-0123456789"), "incorrect API key"),
            (
                Some("Basic c2stdGVzdDo="),
                "the Authorization header must use the Bearer scheme: `Authorization: Bearer KEY`",
            ),
            (
                Some(KEY),
                "the Authorization header must use the Bearer scheme: `Authorization: Bearer KEY`",
            ),
        ];
        for (authorization, message) in refused {
            let (status, headers, body) = send(&t, get.clone(), "/v1/models", authorization, None).await;
            assert_eq!(status, 401, "{authorization:?}: {body}");
            assert_eq!(headers["www-authenticate"], "Bearer");
            assert_eq!(
                json_of(&body),
                json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}),
                "{authorization:?}"
            );
            // The answer never quotes the key, the right one or the one sent.
            assert!(!body.contains("sk-test"), "{body}");
        }
        let (status, _, body) = send(&t, get.clone(), "/v1/models", Some(&right), None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(json_of(&body)["data"][0]["id"], "sim");
        // The scheme is case-insensitive.
        let lower = format!("bearer {KEY}");
        let (status, _, _) = send(&t, get.clone(), "/v1/models", Some(&lower), None).await;
        assert_eq!(status, 200);

        // Generation: refused before it reaches the engine.
        let post = reqwest::Method::POST;
        let body = Some(completion(2, false).to_string());
        let (status, _, _) = send(&t, post.clone(), "/v1/completions", None, body.clone()).await;
        assert_eq!(status, 401);
        assert!(t.engine.links.lock().unwrap().is_empty());
        assert_eq!(t.server.metrics().in_flight(), 0);
        let (status, _, reply) =
            send(&t, post.clone(), "/v1/completions", Some(&right), body).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(t.engine.links.lock().unwrap().len(), 1);

        // The tokenizer is under the key too (as in vLLM), and so is every /v1/ path.
        let tokenize = Some(json!({"model": "sim", "prompt": "x"}).to_string());
        let (status, _, _) = send(&t, post.clone(), "/tokenize", None, tokenize.clone()).await;
        assert_eq!(status, 401);
        let (status, _, _) = send(&t, post.clone(), "/tokenize", Some(&right), tokenize).await;
        assert_eq!(status, 200);
        let detokenize = Some(json!({"model": "sim", "tokens": [120]}).to_string());
        let (status, _, _) = send(&t, post.clone(), "/detokenize", None, detokenize).await;
        assert_eq!(status, 401);
        let (status, _, _) = send(&t, get.clone(), "/v1/nope", None, None).await;
        assert_eq!(status, 401);
        let (status, _, _) = send(&t, get.clone(), "/v1/nope", Some(&right), None).await;
        assert_eq!(status, 404);

        // The operator's endpoints stay open.
        for path in ["/health", "/health/canary", "/ping", "/version", "/metrics"] {
            let (status, _, body) = send(&t, get.clone(), path, None, None).await;
            assert_eq!(status, 200, "{path}: {body}");
        }
        let (status, _, _) = send(&t, post.clone(), "/ping", None, None).await;
        assert_eq!(status, 200);

        // Refusals are counted like any answer.
        let m = t.metrics().await;
        assert_eq!(
            sample(&m, "tether_http_responses_total{endpoint=\"/v1/models\",status=\"401\"}"),
            6.0
        );
        assert_eq!(
            sample(&m, "tether_http_responses_total{endpoint=\"/v1/completions\",status=\"401\"}"),
            1.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_nothing_is_asked_for() {
    within(LIMIT, async {
        let t = start().await;
        let (status, _, _) = send(&t, reqwest::Method::GET, "/v1/models", None, None).await;
        assert_eq!(status, 200);
        // A header that would be wrong with a key changes nothing without one.
        let (status, _, _) = send(
            &t,
            reqwest::Method::GET,
            "/v1/models",
            Some("Bearer anything"),
            None,
        )
        .await;
        assert_eq!(status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_keys_and_malformed_origins_are_refused_at_start() {
    within(LIMIT, async {
        let runtime: std::sync::Arc<dyn tether_core::Runtime> =
            std::sync::Arc::new(tether_tokio::TokioRuntime::current());
        let cases = [
            (
                ServeConfig {
                    api_key: Some(ApiKey::new("")),
                    ..ServeConfig::default()
                },
                "--api-key must not be empty",
            ),
            (
                ServeConfig {
                    api_key: Some(ApiKey::new("two words")),
                    ..ServeConfig::default()
                },
                "--api-key must be visible ASCII without spaces (a bearer token)",
            ),
            (
                ServeConfig {
                    cors_allow_origins: vec!["https://app.example/".to_owned()],
                    ..ServeConfig::default()
                },
                "--cors-allow-origin \"https://app.example/\" is not an origin",
            ),
        ];
        for (config, message) in cases {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let engine = std::sync::Arc::new(tether_engines::SimEngine::new(
                sim_config(),
                runtime.clone(),
            ));
            let err = serve::start(
                serve::ServedEngine::sim(engine),
                runtime.clone(),
                listener,
                config,
            )
            .await
            .unwrap_err();
            match err {
                ServeError::InvalidOptions(m) => assert!(m.starts_with(message), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
}

fn cors_headers(headers: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect();
    names.sort();
    names
}

/// A preflight for a chat completion from `origin`.
async fn preflight(t: &TestServer, origin: &str) -> (u16, HeaderMap) {
    let resp = t
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", t.base),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.headers().clone())
}

/// A simple (non-preflighted) request from `origin`.
async fn from_origin(
    t: &TestServer,
    origin: &str,
    authorization: Option<&str>,
) -> (u16, HeaderMap) {
    let mut req = t
        .client
        .get(format!("{}/v1/models", t.base))
        .header("origin", origin);
    if let Some(value) = authorization {
        req = req.header("authorization", value);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.headers().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default() {
    within(LIMIT, async {
        let t = start().await;
        let (status, headers) = preflight(&t, "https://app.example").await;
        // No CORS: OPTIONS is just a method the endpoint does not have.
        assert_eq!(status, 405);
        assert_eq!(cors_headers(&headers), Vec::<String>::new());
        let (status, headers) = from_origin(&t, "https://app.example", None).await;
        assert_eq!(status, 200);
        assert_eq!(cors_headers(&headers), Vec::<String>::new());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflights_before_the_key_check_and_marks_allowed_origins() {
    within(LIMIT, async {
        let config = ServeConfig {
            cors_allow_origins: vec![
                "https://App.Example".to_owned(),
                "http://localhost:3000".to_owned(),
            ],
            ..keyed()
        };
        let t = start_with(config, sim_config()).await;
        // The preflight carries no key and is answered by the CORS layer.
        let (status, headers) = preflight(&t, "https://app.example").await;
        assert_eq!(status, 200);
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://app.example"
        );
        assert_eq!(headers["access-control-allow-methods"], "GET,POST,OPTIONS");
        assert_eq!(
            headers["access-control-allow-headers"],
            "authorization,content-type,x-request-id,traceparent"
        );
        assert!(headers.get("access-control-expose-headers").is_none());

        // A simple request from an allowed origin: answered with its CORS headers, a
        // refusal included (so the page can read why).
        let right = format!("Bearer {KEY}");
        let (status, headers) = from_origin(&t, "http://localhost:3000", Some(&right)).await;
        assert_eq!(status, 200);
        assert_eq!(
            headers["access-control-allow-origin"],
            "http://localhost:3000"
        );
        assert_eq!(headers["access-control-expose-headers"], "x-request-id");
        let (status, headers) = from_origin(&t, "http://localhost:3000", None).await;
        assert_eq!(status, 401);
        assert_eq!(
            headers["access-control-allow-origin"],
            "http://localhost:3000"
        );

        // Another origin gets no allow-origin: the browser keeps the answer from it.
        let (status, headers) = preflight(&t, "https://evil.example").await;
        assert_eq!(status, 200);
        assert!(headers.get("access-control-allow-origin").is_none());
        let (status, headers) = from_origin(&t, "https://evil.example", Some(&right)).await;
        assert_eq!(status, 200);
        assert!(headers.get("access-control-allow-origin").is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_star_allows_any_origin() {
    within(LIMIT, async {
        let config = ServeConfig {
            cors_allow_origins: vec!["*".to_owned()],
            ..ServeConfig::default()
        };
        let t = start_with(config, sim_config()).await;
        let (status, headers) = preflight(&t, "https://anywhere.example").await;
        assert_eq!(status, 200);
        assert_eq!(headers["access-control-allow-origin"], "*");
        let (status, headers) = from_origin(&t, "https://anywhere.example", None).await;
        assert_eq!(status, 200);
        assert_eq!(headers["access-control-allow-origin"], "*");
        assert_eq!(headers["access-control-expose-headers"], "x-request-id");
    })
    .await;
}
