//! The operator's endpoints: liveness (`GET /health`, `GET`/`POST /ping`), the engine
//! canary (`GET /health/canary`), `GET /version`, and the tokenizer
//! (`POST /tokenize`, `POST /detokenize`, in vLLM's shapes).
//!
//! Owns these handlers and what "alive" means ([`Liveness`]); generation is
//! [`super::handlers`]'s, and the key and CORS checks in front of the routes are
//! [`super::auth`]'s.
//!
//! # Liveness and the canary
//! `/health` (and `/ping`, as vLLM and SageMaker name it) answers at once and queues
//! nothing: 200 `{"status": "ok", "model"}` while the server is not shutting down, the
//! engine was not cleaned up and the engine's own liveness check (if it has one,
//! [`super::ServedEngine::alive`]) passes; otherwise 503
//! `{"status": "unhealthy", "model", "error"}` naming the first check that failed. For
//! SimEngine and TinyEngine the check is: started, and their scheduler loop still
//! exists (it did not panic, its runtime did not drop it). An engine without a check
//! is alive while it is started and not shut down. A busy engine is alive: an
//! orchestrator's probe must not restart a server at its peak.
//!
//! `/health/canary` runs a one-token request through the engine ([`ProbeAdapter`],
//! id `health-…`, sent back as `x-request-id`) and waits for it at most
//! `--health-timeout`: it proves that the engine generates, and so it waits in the
//! engine's queue like any request (a 503 when it takes longer, or when the engine
//! fails it).
//!
//! # Tokenizer
//! `POST /tokenize` takes `{"model", "prompt": "text"}` or `{"model", "messages": [...]}`
//! (a conversation, validated and rendered with the chat template exactly as
//! `/v1/chat/completions` does) and answers `{"count", "max_model_len", "tokens"}`,
//! where `max_model_len` is the longest prompt the server accepts. A prompt longer
//! than that is still counted (knowing by how much it is over is the point).
//! `add_special_tokens` is accepted and changes nothing (byte tokens have no special
//! tokens). `POST /detokenize` takes `{"model", "tokens": [...]}` and answers
//! `{"prompt": "text"}` (bytes that are not UTF-8 become U+FFFD). An unknown model is a
//! 404, a token id outside `0..=255` a 400 naming `tokens[i]`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tether_core::drive::ProbeAdapter;
use tether_core::protocol::Request;

use super::access::RequestIdSlot;
use super::api::{ChatRequest, Limits};
use super::error::{parse_value, ApiError, OpenAiJson};
use super::App;

const JSON: &str = "application/json";

/// An engine's own liveness check for `GET /health`: `Err(reason)` when it is not
/// alive. Called on every probe, on the HTTP runtime: it must be cheap and must not
/// block (read a flag, never run a request).
pub type LivenessFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What `/health` checks besides the shutdown: the engine's cleanup and the engine's
/// own check.
pub(crate) struct Liveness {
    alive: Option<LivenessFn>,
    /// Set just before the engine's `cleanup` is called.
    cleaned_up: AtomicBool,
}

impl Liveness {
    /// A started engine, checked with `alive` if it has a check.
    pub(crate) fn new(alive: Option<LivenessFn>) -> Liveness {
        Liveness {
            alive,
            cleaned_up: AtomicBool::new(false),
        }
    }

    /// The engine is about to be cleaned up: it is not alive from now on.
    pub(crate) fn engine_cleaned_up(&self) {
        // Release: pairs with the Acquire in `check`.
        self.cleaned_up.store(true, Ordering::Release);
    }

    /// `Ok` when alive; else why not. `draining`: a shutdown began.
    pub(crate) fn check(&self, draining: bool) -> Result<(), String> {
        if draining {
            return Err("the server is shutting down".to_owned());
        }
        // Acquire: pairs with the Release in `engine_cleaned_up`.
        if self.cleaned_up.load(Ordering::Acquire) {
            return Err("the engine was cleaned up".to_owned());
        }
        match &self.alive {
            Some(alive) => alive(),
            None => Ok(()),
        }
    }
}

/// The answer of a health check: 200 `ok` or 503 `unhealthy` with the reason.
fn health_answer(model: &str, result: Result<(), String>) -> Response {
    match result {
        Ok(()) => {
            let body = serde_json::json!({"status": "ok", "model": model});
            ([(header::CONTENT_TYPE, JSON)], body.to_string()).into_response()
        }
        Err(reason) => {
            let body = serde_json::json!({"status": "unhealthy", "model": model, "error": reason});
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, JSON)],
                body.to_string(),
            )
                .into_response()
        }
    }
}

/// `GET /health`, `GET /ping`, `POST /ping`: liveness, answered at once (see the
/// [module docs](self)).
pub(crate) async fn health(State(app): State<Arc<App>>) -> Response {
    // Acquire: pairs with the Release of `run_server` that begins a shutdown.
    let draining = app.draining.load(Ordering::Acquire);
    health_answer(&app.limits.model, app.liveness.check(draining))
}

/// `GET /health/canary`: a one-token request through the engine ([`ProbeAdapter`]).
pub(crate) async fn canary(
    State(app): State<Arc<App>>,
    Extension(slot): Extension<RequestIdSlot>,
) -> Response {
    let mut response = health_answer(&app.limits.model, run_canary(&app, &slot).await);
    response.headers_mut().extend(slot.header());
    response
}

async fn run_canary(app: &App, slot: &RequestIdSlot) -> Result<(), String> {
    if app.draining.load(Ordering::Acquire) {
        return Err("the server is shutting down".to_owned());
    }
    let id = app.ids.next("health");
    slot.set(&id);
    let canary = Request::new(
        id,
        app.limits.model.clone(),
        app.limits.tokenizer.encode("ok"),
    )
    .with_max_tokens(1);
    match tokio::time::timeout(app.health_timeout, app.probe.probe(canary)).await {
        Ok(Ok(items)) if ProbeAdapter::is_healthy(&items) => Ok(()),
        Ok(Ok(items)) => Err(items
            .iter()
            .find_map(|i| i.error.as_ref().map(ToString::to_string))
            .unwrap_or_else(|| "the canary ended without a terminal".to_owned())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the canary took longer than {:?}",
            app.health_timeout
        )),
    }
}

/// `GET /version`: the version of this build of tether.
pub(crate) async fn version() -> Response {
    let body = serde_json::json!({"version": env!("CARGO_PKG_VERSION")});
    ([(header::CONTENT_TYPE, JSON)], body.to_string()).into_response()
}

/// The fields of a `/tokenize` body this handler reads itself (`messages` is read as
/// a chat request's).
#[derive(Debug, Deserialize)]
struct TokenizeFields {
    model: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<serde::de::IgnoredAny>,
    /// Accepted for vLLM's clients; byte tokens have no special tokens to add.
    #[serde(default)]
    #[allow(dead_code)]
    add_special_tokens: Option<bool>,
}

/// `POST /tokenize`.
pub(crate) async fn tokenize(
    State(app): State<Arc<App>>,
    OpenAiJson(body): OpenAiJson<serde_json::Value>,
) -> Response {
    match tokenize_body(&app.limits, body) {
        Ok(tokens) => {
            let body = serde_json::json!({
                "count": tokens.len(),
                "max_model_len": app.limits.max_prompt_tokens,
                "tokens": tokens,
            });
            ([(header::CONTENT_TYPE, JSON)], body.to_string()).into_response()
        }
        Err(err) => err.into_response(),
    }
}

fn tokenize_body(limits: &Limits, body: serde_json::Value) -> Result<Vec<u32>, ApiError> {
    // Serde would read a struct from an array too, by position: not a body shape.
    if !body.is_object() {
        return Err(ApiError::invalid(
            "invalid_type",
            None,
            "the body must be a JSON object",
        ));
    }
    let fields: TokenizeFields = parse_value(body.clone())?;
    check_model(&fields.model, limits)?;
    match (fields.prompt, fields.messages) {
        (Some(prompt), None) => Ok(limits.tokenizer.encode(&prompt)),
        (None, Some(_)) => {
            // The chat endpoint's own validation and template; only the length limit
            // is lifted: an over-long conversation is counted, not refused.
            let unlimited = Limits {
                max_prompt_tokens: usize::MAX,
                ..limits.clone()
            };
            let chat: ChatRequest = parse_value(body)?;
            Ok(chat.prepare(&unlimited)?.request.token_ids)
        }
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "invalid_value",
            Some("messages"),
            "give `prompt` or `messages`, not both",
        )),
        (None, None) => Err(ApiError::invalid(
            "missing_required_parameter",
            Some("prompt"),
            "missing required parameter `prompt` (or `messages`)",
        )),
    }
}

/// The body of `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub(crate) struct DetokenizeRequest {
    model: String,
    tokens: Vec<i64>,
}

/// `POST /detokenize`.
pub(crate) async fn detokenize(
    State(app): State<Arc<App>>,
    OpenAiJson(body): OpenAiJson<DetokenizeRequest>,
) -> Response {
    match detokenize_body(&app.limits, body) {
        Ok(prompt) => {
            let body = serde_json::json!({"prompt": prompt});
            ([(header::CONTENT_TYPE, JSON)], body.to_string()).into_response()
        }
        Err(err) => err.into_response(),
    }
}

fn detokenize_body(limits: &Limits, body: DetokenizeRequest) -> Result<String, ApiError> {
    check_model(&body.model, limits)?;
    let mut ids = Vec::with_capacity(body.tokens.len());
    for (i, id) in body.tokens.into_iter().enumerate() {
        match u32::try_from(id) {
            Ok(t) if t < limits.tokenizer.vocab_size() => ids.push(t),
            _ => {
                return Err(ApiError::invalid(
                    "invalid_value",
                    Some(&format!("tokens[{i}]")),
                    format!("token id {id} is not {}", limits.tokenizer.id_range()),
                ))
            }
        }
    }
    let mut decoder = limits.tokenizer.decoder();
    let mut text = decoder.push(&ids);
    text.push_str(&decoder.finish());
    Ok(text)
}

fn check_model(model: &str, limits: &Limits) -> Result<(), ApiError> {
    if model == limits.model {
        Ok(())
    } else {
        Err(ApiError::unknown_model(model, &limits.model))
    }
}

#[cfg(test)]
mod tests;
