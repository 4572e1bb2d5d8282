//! The HTTP side of `tether load --url`: a pooled keep-alive HTTP/1.1 client
//! (hyper-util's legacy `Client`, `TCP_NODELAY` on its connector) and one request run
//! to its end: read to `[DONE]` (streaming) or to the whole JSON body (unary), or cut
//! short by the planned disconnect, which drops the response (and so closes the
//! connection: the pool never reuses a connection whose body was not read out).
//!
//! Owns the wire and what the client saw of one request; it must not judge a run
//! (that is [`super::check`]).

use std::future::poll_fn;
use std::pin::Pin;
use std::time::{Duration, Instant};

use hyper::body::{Body as _, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::sse::{SseEvent, SseSplitter};

/// The pooled client.
pub(crate) type HttpClient = Client<HttpConnector, String>;

/// A keep-alive client that holds up to `pool` idle connections to the server.
pub(crate) fn build(pool: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    // Every SSE event is a small write: Nagle would hold requests back.
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(pool)
        .build(connector)
}

/// Why a request did not complete (the client's view).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Failure {
    /// No connection (refused, reset before a response).
    Connect,
    /// No end within `--request-timeout` (the connection was dropped).
    Timeout,
    /// A status other than 200.
    Status(u16),
    /// An event or body that is not the JSON expected.
    Malformed,
    /// The body ended (or broke off) without `[DONE]`.
    StreamCut,
    /// An `{"error": ...}` event in a 200 stream.
    ErrorEvent,
}

impl Failure {
    /// The error kind's name in the report.
    pub(crate) fn label(self) -> String {
        match self {
            Failure::Connect => "connect".to_owned(),
            Failure::Timeout => "timeout".to_owned(),
            Failure::Status(code) => format!("http_{code}"),
            Failure::Malformed => "malformed".to_owned(),
            Failure::StreamCut => "stream_cut".to_owned(),
            Failure::ErrorEvent => "error_event".to_owned(),
        }
    }
}

/// How one request ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// A whole response: `[DONE]` after a finish, or a unary 200 with a finish reason.
    Complete,
    /// The planned disconnect: the client dropped the response.
    Disconnected,
    /// Something went wrong.
    Failed(Failure),
}

/// When the client leaves a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Disconnect {
    /// It reads to the end.
    Never,
    /// Streaming: after this many data events (0: right after the response head).
    AfterEvents(u32),
    /// Unary: after this long without a response.
    After(Duration),
}

/// One request to send.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    /// `http://host:port/v1/...`.
    pub(crate) uri: hyper::Uri,
    /// The JSON body.
    pub(crate) body: String,
    /// `Authorization: Bearer ...`, if any.
    pub(crate) bearer: Option<String>,
    /// Streamed (SSE) or unary.
    pub(crate) stream: bool,
    /// When to leave.
    pub(crate) disconnect: Disconnect,
    /// The longest the request may take.
    pub(crate) timeout: Duration,
}

/// What the client saw of one request.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    /// How it ended.
    pub(crate) ending: Ending,
    /// The response status, if a head arrived.
    pub(crate) status: Option<u16>,
    /// Streaming: time to the first event with text.
    pub(crate) ttft: Option<Duration>,
    /// Time to the whole response (complete requests).
    pub(crate) latency: Option<Duration>,
    /// Gaps between events with text, in microseconds.
    pub(crate) gaps_us: Vec<u32>,
    /// Tokens: the usage's `completion_tokens` when given, else events with text.
    pub(crate) tokens: u64,
}

impl Seen {
    fn new(ending: Ending) -> Seen {
        Seen {
            ending,
            status: None,
            ttft: None,
            latency: None,
            gaps_us: Vec::new(),
            tokens: 0,
        }
    }

    /// Whether the client closed the connection in the middle of the request (a planned
    /// disconnect or a timeout): the server sees a disconnect.
    pub(crate) fn left(&self) -> bool {
        matches!(
            self.ending,
            Ending::Disconnected | Ending::Failed(Failure::Timeout)
        )
    }
}

/// The first model id `GET {base}/v1/models` lists.
pub(crate) async fn first_model(
    client: &HttpClient,
    base: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<String, String> {
    let (status, body) = get(client, &format!("{base}/v1/models"), bearer, timeout).await?;
    if status != 200 {
        return Err(format!("GET /v1/models answered {status}"));
    }
    let v: Value =
        serde_json::from_slice(&body).map_err(|e| format!("GET /v1/models: not JSON: {e}"))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "GET /v1/models lists no model (data[0].id)".to_owned())
}

/// `GET uri`: the status and the whole body.
pub(crate) async fn get(
    client: &HttpClient,
    uri: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let uri: hyper::Uri = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
    let mut req = Request::builder().method(Method::GET).uri(uri.clone());
    if let Some(key) = bearer {
        req = req.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    let req = req.body(String::new()).map_err(|e| e.to_string())?;
    let fetch = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("GET {uri}: {e}"))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut bytes = Vec::new();
        while let Some(frame) = next_frame(&mut body).await {
            let frame = frame.map_err(|e| format!("GET {uri}: {e}"))?;
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("GET {uri}: no answer within {timeout:?}"))?
}

async fn next_frame(
    body: &mut Incoming,
) -> Option<Result<hyper::body::Frame<hyper::body::Bytes>, hyper::Error>> {
    poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
}

/// Run `job` to its end.
pub(crate) async fn run(client: &HttpClient, job: &Job) -> Seen {
    let start = Instant::now();
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(job.uri.clone())
        .header(CONTENT_TYPE, "application/json");
    if let Some(key) = &job.bearer {
        req = req.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    let Ok(req) = req.body(job.body.clone()) else {
        return Seen::new(Ending::Failed(Failure::Connect));
    };
    let exchange = async {
        match client.request(req).await {
            Ok(resp) if job.stream => streamed(resp, job.disconnect, start).await,
            Ok(resp) => unary(resp, start).await,
            Err(_) => Seen::new(Ending::Failed(Failure::Connect)),
        }
    };
    let leave = match job.disconnect {
        Disconnect::After(d) if !job.stream => d.min(job.timeout),
        _ => job.timeout,
    };
    match tokio::time::timeout(leave, exchange).await {
        Ok(seen) => seen,
        Err(_) if leave < job.timeout => Seen::new(Ending::Disconnected),
        Err(_) => Seen::new(Ending::Failed(Failure::Timeout)),
    }
}

/// The text of a chunk's first choice (`text` or `delta.content`).
fn chunk_text(v: &Value) -> &str {
    let choice = &v["choices"][0];
    choice["text"]
        .as_str()
        .or_else(|| choice["delta"]["content"].as_str())
        .or_else(|| choice["message"]["content"].as_str())
        .unwrap_or("")
}

fn has_finish(v: &Value) -> bool {
    v["choices"][0]["finish_reason"].is_string()
}

fn usage_tokens(v: &Value) -> Option<u64> {
    v["usage"]["completion_tokens"].as_u64()
}

async fn streamed(resp: Response<Incoming>, disconnect: Disconnect, start: Instant) -> Seen {
    let status = resp.status().as_u16();
    let mut seen = Seen::new(Ending::Complete);
    seen.status = Some(status);
    if status != 200 {
        seen.ending = Ending::Failed(Failure::Status(status));
        return seen;
    }
    let leave_after = match disconnect {
        Disconnect::AfterEvents(k) => Some(k),
        Disconnect::Never | Disconnect::After(_) => None,
    };
    let mut body = resp.into_body();
    let mut sse = SseSplitter::default();
    let (mut events, mut text_events, mut done, mut finished) = (0u32, 0u64, false, false);
    let mut usage = None;
    let mut failure = None;
    let mut last: Option<Instant> = None;
    if leave_after == Some(0) {
        // Dropping the body closes the connection: the server sees the client leave.
        seen.ending = Ending::Disconnected;
        return seen;
    }
    loop {
        let frame = match next_frame(&mut body).await {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(_)) => {
                failure.get_or_insert(Failure::StreamCut);
                break;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for event in sse.push(&data) {
            let SseEvent::Data(data) = event else {
                failure.get_or_insert(Failure::Malformed);
                continue;
            };
            if data == "[DONE]" {
                if done || !finished {
                    failure.get_or_insert(Failure::Malformed);
                }
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                failure.get_or_insert(Failure::Malformed);
                continue;
            };
            if done {
                failure.get_or_insert(Failure::Malformed);
            }
            if v.get("error").is_some() {
                failure.get_or_insert(Failure::ErrorEvent);
                continue;
            }
            events += 1;
            finished |= has_finish(&v);
            usage = usage_tokens(&v).or(usage);
            if !chunk_text(&v).is_empty() {
                text_events += 1;
                let now = Instant::now();
                match last {
                    None => seen.ttft = Some(now - start),
                    Some(prev) => seen
                        .gaps_us
                        .push(u32::try_from((now - prev).as_micros()).unwrap_or(u32::MAX)),
                }
                last = Some(now);
            }
            if leave_after == Some(events) {
                // Events can share a read: the client leaves right after the k-th,
                // dropping the body (and so the connection) with the rest unread.
                seen.ending = Ending::Disconnected;
                seen.tokens = text_events;
                return seen;
            }
        }
    }
    seen.tokens = usage.unwrap_or(text_events);
    seen.ending = match failure {
        Some(f) => Ending::Failed(f),
        None if !done || sse.has_partial() => Ending::Failed(Failure::StreamCut),
        None => {
            seen.latency = Some(start.elapsed());
            Ending::Complete
        }
    };
    seen
}

async fn unary(resp: Response<Incoming>, start: Instant) -> Seen {
    let status = resp.status().as_u16();
    let mut seen = Seen::new(Ending::Complete);
    seen.status = Some(status);
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = next_frame(&mut body).await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            Err(_) => {
                seen.ending = Ending::Failed(Failure::StreamCut);
                return seen;
            }
        }
    }
    if status != 200 {
        seen.ending = Ending::Failed(Failure::Status(status));
        return seen;
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) if has_finish(&v) => {
            seen.tokens = usage_tokens(&v).unwrap_or(0);
            seen.latency = Some(start.elapsed());
        }
        _ => seen.ending = Ending::Failed(Failure::Malformed),
    }
    seen
}
