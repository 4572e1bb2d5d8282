//! `bare_sse`: the floor `tether serve`'s CPU per request is compared with
//! (`benches/serve.sh`). A hyper 1 HTTP/1.1 server on tokio multi-thread that answers
//! `POST /v1/completions` with the SSE events `tether serve` writes for a streamed
//! completion (one `text_completion` chunk per token, an empty one with its
//! `finish_reason`, then `data: [DONE]`), with no engine, no router, no metrics, no log
//! and no tether: it parses the request body (every server must) and writes the events.
//!
//! Keep-alive (hyper's default) and `TCP_NODELAY` on every socket, as `tether serve`.
//! Each event is its own write to the socket, as when an engine streams tokens one step
//! apart (the body yields once between events, so hyper flushes each); `--burst`
//! writes them all at once instead.
//!
//! ```text
//! bare_sse [--addr 127.0.0.1:0] [--threads N] [--burst]
//! ```
//! Prints `bare_sse: listening on http://ADDR` on stdout once it accepts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// The fields of a completion request this server reads.
#[derive(Deserialize)]
struct Completion {
    #[allow(dead_code)]
    model: String,
    #[allow(dead_code)]
    prompt: String,
    #[serde(default)]
    max_tokens: Option<u32>,
}

/// One streamed `text_completion` chunk, fields in the order `tether serve` writes
/// them (serde_json's sorted keys).
#[derive(Serialize)]
struct Chunk<'a> {
    choices: [Choice<'a>; 1],
    created: u64,
    id: &'a str,
    model: &'a str,
    object: &'static str,
}

#[derive(Serialize)]
struct Choice<'a> {
    finish_reason: Option<&'static str>,
    index: u32,
    logprobs: Option<()>,
    text: &'a str,
}

/// The response body: `tokens` chunk events, an empty one with the finish reason, then
/// `[DONE]`.
struct Events {
    id: String,
    created: u64,
    tokens: u32,
    next: u32,
    burst: bool,
    yielded: bool,
}

impl Events {
    fn event(&self, n: u32) -> Bytes {
        if n > self.tokens {
            return Bytes::from_static(b"data: [DONE]\n\n");
        }
        // As tether serve: one chunk per token, then an empty one with the reason.
        let last = n == self.tokens;
        let letter = [b'a' + (n % 26) as u8];
        let chunk = Chunk {
            choices: [Choice {
                finish_reason: last.then_some("length"),
                index: 0,
                logprobs: None,
                text: if last {
                    ""
                } else {
                    std::str::from_utf8(&letter).expect("ascii")
                },
            }],
            created: self.created,
            id: &self.id,
            model: "sim",
            object: "text_completion",
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut out, &chunk).expect("a chunk serializes");
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.next > this.tokens + 1 {
            return Poll::Ready(None);
        }
        if !this.burst && this.next > 0 && !std::mem::replace(&mut this.yielded, true) {
            // One write per event: hyper flushes what it has when the body is pending.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yielded = false;
        let event = this.event(this.next);
        this.next += 1;
        Poll::Ready(Some(Ok(Frame::data(event))))
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An empty response with `status`.
fn empty(status: StatusCode) -> Response<Events> {
    let mut r = Response::new(Events {
        id: String::new(),
        created: 0,
        tokens: 0,
        next: 2,
        burst: true,
        yielded: false,
    });
    *r.status_mut() = status;
    r
}

async fn handle(req: Request<Incoming>, burst: bool) -> Result<Response<Events>, Infallible> {
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/completions" {
        return Ok(empty(StatusCode::NOT_FOUND));
    }
    let Ok(body) = req.into_body().collect().await else {
        return Ok(empty(StatusCode::BAD_REQUEST));
    };
    let Ok(request) = serde_json::from_slice::<Completion>(&body.to_bytes()) else {
        return Ok(empty(StatusCode::BAD_REQUEST));
    };
    // Relaxed: only uniqueness matters.
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let id = format!("cmpl-{n:x}");
    let response = Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("x-accel-buffering", "no")
        .header("x-request-id", id.as_str())
        .body(Events {
            id,
            created: unix_now(),
            tokens: request.max_tokens.unwrap_or(16),
            next: 0,
            burst,
            yielded: false,
        })
        .expect("a valid response");
    Ok(response)
}

fn main() {
    let mut addr: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let mut threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut burst = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => {
                addr = args
                    .next()
                    .and_then(|a| a.parse().ok())
                    .expect("--addr ADDR");
            }
            "--threads" => {
                threads = args
                    .next()
                    .and_then(|a| a.parse().ok())
                    .expect("--threads N");
            }
            "--burst" => burst = true,
            other => {
                eprintln!("bare_sse: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        println!(
            "bare_sse: listening on http://{}",
            listener.local_addr().expect("an address")
        );
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, burst));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
