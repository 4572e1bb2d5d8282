//! The HTTP handlers: the two generation endpoints (streamed as SSE or answered as
//! one JSON body), `/v1/models`, `/metrics` and the fallbacks (health checks and the
//! other operator endpoints are [`super::ops`]'s).
//!
//! Owns the mapping from a request's items to the wire; validation is
//! [`super::api`]'s, the request's start and its disconnect rule are
//! [`super::generation`]'s, counting responses and the access log are
//! [`super::access`]'s.
//!
//! A generation request's id (`cmpl-…`, `chatcmpl-…`; `health-…` for a health canary;
//! see [`RequestIds`]: unique across restarts) is the response object's `id`, the
//! `request_id` of the access log, of tether's log events and of the request's span,
//! and the `x-request-id` response header unless the client sent its own `x-request-id`
//! (then that one is echoed, logged as `client_request_id` and put on the span:
//! clients reuse ids, so it never replaces ours).
//!
//! SSE responses carry `X-Accel-Buffering: no`, so nginx passes each event on as it is
//! written instead of buffering the stream.
//!
//! A streamed request answers `200` with `text/event-stream` as soon as the engine
//! accepted it (a [`tether_axum::sse`] response). Each chunk is a `data: {json}` event;
//! a natural end (a finish reason) sends the last chunk, an optional usage chunk, then
//! `data: [DONE]` exactly once (the SSE stream's trailer).
//! An error, a timeout or a server-side cancel sends one `data: {"error": {...}}`
//! event instead and ends the stream without `[DONE]`. Unary requests map the same
//! ends to `200`, `500`/`504`, and `503`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Extension, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tether_core::error::{BackendError, EngineError, ErrorKind};
use tether_core::protocol::{Annotated, Chunk, FinishReason, Usage};
use tether_core::ResponseStream;

use super::access::RequestIdSlot;
use super::api::{ChatRequest, CompletionRequest, Endpoint, Prepared};
use super::error::{ApiError, OpenAiJson};
use super::generation::{self, TokenClock};
use super::metrics::RequestLabels;
use super::responses::{self, openai_finish_reason, Head, TextChunks, UsageBody};
use super::stop::StopMatcher;
use super::traceparent::Traceparent;
use super::{tokenizer, App};

const JSON: &str = "application/json";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) async fn completions(
    State(app): State<Arc<App>>,
    Extension(slot): Extension<RequestIdSlot>,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Response {
    match body.prepare(&app.limits) {
        Ok(prepared) => run(app, prepared, &headers, &slot).await,
        Err(err) => err.into_response(),
    }
}

pub(crate) async fn chat_completions(
    State(app): State<Arc<App>>,
    Extension(slot): Extension<RequestIdSlot>,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<ChatRequest>,
) -> Response {
    match body.prepare(&app.limits) {
        Ok(prepared) => run(app, prepared, &headers, &slot).await,
        Err(err) => err.into_response(),
    }
}

async fn run(
    app: Arc<App>,
    prepared: Prepared,
    headers: &HeaderMap,
    slot: &RequestIdSlot,
) -> Response {
    if app.draining.load(Ordering::Acquire) {
        return ApiError::shutting_down().into_response();
    }
    let id = app.ids.next(match prepared.endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    });
    slot.set(&id);
    let mut request = prepared.request;
    request.id = id.clone();
    request.model = app.limits.model.clone();
    if let Some(value) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        Traceparent::parse(value).apply(&mut request);
    }
    let prompt_tokens = u32::try_from(request.token_ids.len()).unwrap_or(u32::MAX);
    let head = Head {
        id,
        created: unix_now(),
        model: app.limits.model.clone(),
        endpoint: prepared.endpoint,
    };
    let labels = RequestLabels {
        endpoint: prepared.endpoint.label(),
        stream: prepared.stream,
    };
    let mut response = match generation::start(&app, request, labels, slot.client()).await {
        Ok(stream) => {
            let reply = Reply {
                clock: TokenClock::new(&app),
                head,
                texts: None,
                decoder: app.limits.tokenizer.decoder(),
                stops: StopMatcher::new(&prepared.stops),
                finish_asked: false,
                prompt_tokens,
                completion_tokens: 0,
            };
            if prepared.stream {
                stream_reply(stream, reply, prepared.include_usage, &app)
            } else {
                unary_reply(stream, reply).await
            }
        }
        Err(err) => ApiError::from_engine(&err).into_response(),
    };
    response.headers_mut().extend(slot.header());
    response
}

/// What a response accumulates while it reads its request's stream.
struct Reply {
    clock: TokenClock,
    head: Head,
    /// A streamed reply's text chunks (`None`: a unary reply, which has none).
    texts: Option<TextChunks>,
    decoder: tokenizer::TextDecoder,
    /// The request's stop strings, if it has any.
    stops: Option<StopMatcher>,
    /// The early finish a matched stop string needs was asked for.
    finish_asked: bool,
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// How a generation ended, as far as the wire cares.
enum End {
    /// A normal end with this OpenAI finish reason and usage.
    Finished(&'static str, UsageBody),
    /// An error (engine error, timeout, server-side cancel, or a broken stream).
    Failed(ApiError),
}

impl Reply {
    /// `text` through the stop strings: what may be sent now.
    fn unstopped(&mut self, text: String) -> String {
        match &mut self.stops {
            Some(stops) => stops.push(&text).text,
            None => text,
        }
    }

    /// The end of the text: what the decoder and the stop strings still hold.
    fn rest(&mut self) -> String {
        let held = self.decoder.finish();
        let mut out = self.unstopped(held);
        if let Some(stops) = &mut self.stops {
            out.push_str(&stops.finish());
        }
        out
    }

    /// Whether a stop string just matched and the request must now be finished early
    /// (SPEC rule 12); `true` once.
    fn must_finish(&mut self) -> bool {
        let stopped = self.stops.as_ref().is_some_and(StopMatcher::stopped);
        stopped && !std::mem::replace(&mut self.finish_asked, true)
    }

    /// Take the next item: `Ok(text)` for text to send (maybe empty), `Err(end)` once
    /// the request is over (with the last text in `tail`). After an `Ok`,
    /// [`Reply::must_finish`] says whether a stop string ended the text.
    fn take(&mut self, item: Annotated<Chunk>, tail: &mut String) -> Result<String, End> {
        self.clock.read(&item);
        if let Some(err) = &item.error {
            tail.push_str(&self.rest());
            return Err(End::Failed(ApiError::from_engine(err)));
        }
        let Some(chunk) = item.data else {
            return Ok(String::new());
        };
        let n = u32::try_from(chunk.token_ids.len()).unwrap_or(u32::MAX);
        self.completion_tokens = self.completion_tokens.saturating_add(n);
        let decoded = self.decoder.push(&chunk.token_ids);
        let text = self.unstopped(decoded);
        let Some(mut reason) = chunk.finish_reason else {
            return Ok(text);
        };
        tail.push_str(&text);
        tail.push_str(&self.rest());
        if self.stops.as_ref().is_some_and(StopMatcher::stopped)
            && openai_finish_reason(&reason).is_some()
        {
            // A stop string in the engine's last chunk: that is why the text ends.
            reason = FinishReason::Stop;
        }
        match openai_finish_reason(&reason) {
            Some(fr) => {
                let usage = chunk
                    .usage
                    .unwrap_or(Usage::new(self.prompt_tokens, self.completion_tokens));
                Err(End::Finished(fr, usage.into()))
            }
            None => Err(End::Failed(match reason {
                FinishReason::Error(msg) => {
                    ApiError::from_engine(&EngineError::new(ErrorKind::Unknown, msg))
                }
                // Only the server cancels a request whose client is still listening:
                // the grace period of a shutdown expired.
                _ => ApiError::shutting_down(),
            })),
        }
    }

    /// A chunk carrying `text` and no finish reason, as JSON text.
    fn text_chunk(&self, text: &str) -> String {
        match &self.texts {
            Some(texts) => texts.chunk(text),
            None => self.head.chunk(text, None, false),
        }
    }

    /// The SSE events for `item`; `[DONE]` is the stream's trailer, not one of them.
    fn events(
        &mut self,
        item: Annotated<Chunk>,
        include_usage: bool,
    ) -> impl Iterator<Item = Event> {
        let mut tail = String::new();
        let events = match self.take(item, &mut tail) {
            Ok(text) if text.is_empty() => [None, None],
            Ok(text) => [Some(data_event(&self.text_chunk(&text))), None],
            Err(End::Finished(reason, usage)) => [
                Some(data_event(&self.head.chunk(&tail, Some(reason), false))),
                include_usage.then(|| data_event(&self.head.usage_chunk(usage))),
            ],
            Err(End::Failed(err)) => [
                (!tail.is_empty()).then(|| data_event(&self.text_chunk(&tail))),
                Some(Event::default().data(err.to_json())),
            ],
        };
        events.into_iter().flatten()
    }
}

fn data_event(json: &str) -> Event {
    Event::default().data(json)
}

/// The SSE response: the chat role first, one event per chunk with text, then the end
/// (the last chunk and the usage chunk, or an error event), and `[DONE]` after a normal
/// finish only. A client that leaves before the terminal was read kills the request.
fn stream_reply(
    stream: ResponseStream,
    mut reply: Reply,
    include_usage: bool,
    app: &App,
) -> Response {
    reply.texts = Some(TextChunks::new(&reply.head));
    // The role comes first, as OpenAI sends it.
    let role = (reply.head.endpoint == Endpoint::Chat)
        .then(|| data_event(&reply.head.chunk("", None, true)));
    let mut events = tether_axum::sse_with(stream, move |item, finisher| {
        let events = reply.events(item, include_usage);
        if reply.must_finish() {
            // The next item is the terminal with `Stop`.
            finisher.finish(FinishReason::Stop);
        }
        events
    });
    if let Some(role) = role {
        events = events.leading(role);
    }
    let mut response = events
        .trailer(Event::default().data("[DONE]"))
        .into_sse()
        .keep_alive(KeepAlive::new().interval(app.keep_alive))
        .into_response();
    // nginx buffers proxied responses unless told not to: events must go out as made.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    response
}

/// One JSON body once the request is over. A client that leaves first drops this
/// future, and with it the stream: a kill (the adapter is kill-on-drop).
async fn unary_reply(mut stream: ResponseStream, mut reply: Reply) -> Response {
    let mut text = String::new();
    loop {
        let Some(item) = stream.next().await else {
            // The adapter guarantees a terminal; this is defence in depth.
            let err = EngineError::new(
                ErrorKind::Backend(BackendError::StreamIncomplete),
                "the stream ended without a terminal",
            );
            return ApiError::from_engine(&err).into_response();
        };
        let mut tail = String::new();
        match reply.take(item, &mut tail) {
            Ok(t) => {
                text.push_str(&t);
                if reply.must_finish() {
                    // The next item is the terminal with `Stop`.
                    stream.finish(FinishReason::Stop);
                }
            }
            Err(End::Finished(reason, usage)) => {
                text.push_str(&tail);
                let body = reply.head.full(&text, reason, usage);
                return ([(header::CONTENT_TYPE, JSON)], body).into_response();
            }
            Err(End::Failed(err)) => return err.into_response(),
        }
    }
}

pub(crate) async fn models(State(app): State<Arc<App>>) -> Response {
    let body = responses::models_body(&app.limits.model, app.started_at);
    ([(header::CONTENT_TYPE, JSON)], body.to_string()).into_response()
}

pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, OPENMETRICS)], app.metrics.encode()).into_response()
}

pub(crate) async fn no_route(req: HttpRequest) -> Response {
    ApiError::no_route(req.uri().path()).into_response()
}

pub(crate) async fn wrong_method() -> Response {
    ApiError::wrong_method().into_response()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn started_at() -> u64 {
    unix_now()
}

/// Makes request ids: `{kind}-{nonce}{n}`, a random 64-bit nonce drawn when the server
/// starts (so ids do not repeat across restarts, as a bare counter would) and a
/// counter, both in hex.
#[derive(Debug)]
pub(crate) struct RequestIds {
    nonce: u64,
    next: AtomicU64,
}

impl RequestIds {
    /// A new nonce, from the standard library's per-process random hash keys and the
    /// time (no extra dependency for a non-cryptographic id).
    pub(crate) fn new() -> RequestIds {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        RequestIds {
            nonce: h.finish(),
            next: AtomicU64::new(1),
        }
    }

    /// The next id of `kind` (`cmpl`, `chatcmpl`, `health`).
    pub(crate) fn next(&self, kind: &str) -> String {
        // Relaxed: only uniqueness matters.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{kind}-{:016x}{n:x}", self.nonce)
    }
}
