//! `tether_axum::sse` behind a real axum server on a random localhost port, read by a
//! hand-written HTTP/1.1 client over a `TcpStream` (so a disconnect is exactly a
//! closed socket), against SimEngine.
//!
//! Real sockets need real time, so nothing here waits for a duration to pass: every
//! wait is for an observable event (a record, an abort receipt, the body's drop, a
//! server that stopped), under a guard that fails the test when it fires.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use tether_core::drive::{Observer, RequestRecord};
use tether_core::protocol::{Annotated, Chunk, FinishReason, Request};
use tether_core::{AbortStatus, Adapter, AdapterConfig, BackendError, Cause, ErrorKind, Outcome};
use tether_engines::{AbortReceipt, SimConfig, SimEngine};
use tether_tokio::TokioRuntime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The guard on every wait: far above what any of them takes.
const LIMIT: Duration = Duration::from_secs(10);

/// `future`'s output, or a failed test naming what never happened.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, future).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {LIMIT:?} waiting for {what}"),
    }
}

/// The adapter's observer: every record and every abort sent.
struct Watch {
    records: mpsc::UnboundedSender<RequestRecord>,
    aborts_sent: AtomicU64,
}

impl Observer for Watch {
    fn on_record(&self, record: &RequestRecord) {
        let _ = self.records.send(record.clone());
    }

    fn on_abort(&self, _request_id: &str) {
        self.aborts_sent.fetch_add(1, Ordering::SeqCst);
    }
}

/// Tells the test when the server dropped a response body (and the mapping in it).
struct BodyGone(mpsc::UnboundedSender<String>, String);

impl Drop for BodyGone {
    fn drop(&mut self) {
        let _ = self.0.send(self.1.clone());
    }
}

struct AppState {
    adapter: Adapter,
    next_id: AtomicU64,
    keep_alive: Duration,
    /// Each event's text as the handler's mapping made it, in order.
    mapped: mpsc::UnboundedSender<String>,
    body_gone: mpsc::UnboundedSender<String>,
}

/// The wire text of an item: the mapping under test.
fn item_text(item: &Annotated<Chunk>) -> Option<String> {
    match (&item.data, &item.error) {
        (_, Some(err)) => Some(format!("event: error\ndata: {}", err.kind())),
        (Some(chunk), None) => Some(format!(
            "data: {:?} {:?}",
            chunk.token_ids, chunk.finish_reason
        )),
        (None, None) => None,
    }
}

fn event_of(text: &str) -> Event {
    match text.strip_prefix("event: error\ndata: ") {
        Some(data) => Event::default().event("error").data(data),
        None => Event::default().data(text.strip_prefix("data: ").unwrap_or(text)),
    }
}

/// `POST /generate`, body `"<max_tokens> [annotation…]"`: SimEngine's tokens as SSE,
/// a leading `start` event with the request id, `data: [DONE]` after a normal finish
/// (with the word `record-trailer`: an `end` event with the outcome and the tokens,
/// after any end; with `finish-after=N`: the mapping ends the request with
/// `FinishReason::Stop` once it mapped N chunks, through `sse_with`).
async fn generate(State(app): State<Arc<AppState>>, body: String) -> Response {
    let mut words = body.split_whitespace();
    let Some(max_tokens) = words.next().and_then(|w| w.parse().ok()) else {
        return (StatusCode::BAD_REQUEST, "max_tokens first").into_response();
    };
    let id = format!("req-{}", app.next_id.fetch_add(1, Ordering::SeqCst));
    let mut request = Request::new(id.clone(), "sim", vec![1, 2, 3]).with_max_tokens(max_tokens);
    let mut record_trailer = false;
    let mut finish_after = None;
    for word in words {
        match word {
            "record-trailer" => record_trailer = true,
            w if w.starts_with("finish-after=") => {
                finish_after = w["finish-after=".len()..].parse::<usize>().ok();
            }
            annotation => request.annotations.push(annotation.to_owned()),
        }
    }
    // Without `.kill_on_drop(true)` here (an application would set it, for a client
    // gone during setup): the disconnect tests prove that `sse` turns it on.
    let stream = match app.adapter.request(request).await {
        Ok(stream) => stream,
        Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    };
    let mapped = app.mapped.clone();
    let gone = BodyGone(app.body_gone.clone(), id.clone());
    let mut seen = 0;
    let events = tether_axum::sse_with(stream, move |item, finisher| {
        let _alive = &gone;
        let text = item_text(&item)?;
        let _ = mapped.send(text.clone());
        seen += 1;
        if finish_after == Some(seen) {
            assert!(
                finisher.finish(FinishReason::Stop),
                "the finish was refused"
            );
        }
        Some(event_of(&text))
    })
    .leading(Event::default().event("start").data(id));
    let events = if record_trailer {
        events.trailer_with(|record| {
            let text = format!("{} {}", record.outcome.label(), record.output_tokens);
            Some(Event::default().event("end").data(text))
        })
    } else {
        events.trailer(Event::default().data("[DONE]"))
    };
    events
        .into_sse()
        .keep_alive(KeepAlive::new().interval(app.keep_alive))
        .into_response()
}

struct Fixture {
    addr: std::net::SocketAddr,
    engine: Arc<SimEngine>,
    watch: Arc<Watch>,
    records: mpsc::UnboundedReceiver<RequestRecord>,
    aborts: mpsc::UnboundedReceiver<(String, AbortReceipt)>,
    mapped: mpsc::UnboundedReceiver<String>,
    body_gone: mpsc::UnboundedReceiver<String>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
}

/// SimEngine (a token every `decode_step_cost`) behind axum on 127.0.0.1:0.
async fn serve(keep_alive: Duration) -> Fixture {
    let (records_tx, records) = mpsc::unbounded_channel();
    let (aborts_tx, aborts) = mpsc::unbounded_channel();
    let (mapped_tx, mapped) = mpsc::unbounded_channel();
    let (gone_tx, body_gone) = mpsc::unbounded_channel();
    let hook = Arc::new(move |id: &str, receipt: AbortReceipt| {
        let _ = aborts_tx.send((id.to_owned(), receipt));
    });
    let config = SimConfig {
        decode_step_cost: Duration::from_millis(2),
        ..SimConfig::default()
    };
    let engine = Arc::new(SimEngine::new(config, TokioRuntime::current()).with_abort_hook(hook));
    let watch = Arc::new(Watch {
        records: records_tx,
        aborts_sent: AtomicU64::new(0),
    });
    let adapter = tether_tokio::adapter(
        engine.clone(),
        AdapterConfig::default().observer(watch.clone()),
    );
    adapter.start(0).await.expect("SimEngine starts");
    let state = Arc::new(AppState {
        adapter,
        next_id: AtomicU64::new(1),
        keep_alive,
        mapped: mapped_tx,
        body_gone: gone_tx,
    });
    let router = Router::new()
        .route("/generate", post(generate))
        .with_state(state);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let addr = listener.local_addr().expect("the bound address");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Fixture {
        addr,
        engine,
        watch,
        records,
        aborts,
        mapped,
        body_gone,
        stop,
        server,
    }
}

impl Fixture {
    /// Stop accepting and wait until every connection closed: a response body the
    /// server still held would keep this waiting (and fail the test).
    async fn shut_down(self) -> Ended {
        let _ = self.stop.send(());
        within("the server to stop", self.server)
            .await
            .expect("the server task")
            .expect("the server");
        Ended {
            engine: self.engine,
            watch: self.watch,
            records: self.records,
            aborts: self.aborts,
        }
    }
}

/// What is left to check once the server stopped.
struct Ended {
    engine: Arc<SimEngine>,
    watch: Arc<Watch>,
    records: mpsc::UnboundedReceiver<RequestRecord>,
    aborts: mpsc::UnboundedReceiver<(String, AbortReceipt)>,
}

impl Ended {
    /// Nothing leaked and nothing more happened: no slot, no queue, no hung sequence,
    /// no further record, and exactly `aborts` aborts sent and received.
    fn assert_quiet(mut self, aborts: u64) {
        let g = self.engine.gauges();
        assert_eq!(
            (g.live_slots, g.queue_len, g.hung, g.kv_blocks_used),
            (0, 0, 0, 0),
            "{g:?}"
        );
        assert_eq!((g.aborts_received, g.late_aborts), (aborts, 0), "{g:?}");
        assert_eq!(self.watch.aborts_sent.load(Ordering::SeqCst), aborts);
        assert!(self.records.try_recv().is_err(), "a second record");
        assert!(self.aborts.try_recv().is_err(), "another abort");
    }
}

/// A hand-written HTTP/1.1 client reading one SSE response.
struct SseClient {
    tcp: TcpStream,
    /// Bytes read and not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked body bytes not yet split into events.
    body: Vec<u8>,
    /// The last (zero-length) chunk arrived.
    ended: bool,
}

impl SseClient {
    /// `POST /generate` with `body`; reads and checks the response head.
    async fn post(addr: std::net::SocketAddr, body: &str) -> SseClient {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /generate HTTP/1.1\r\nhost: {addr}\r\ncontent-type: text/plain\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(head.as_bytes()).await.expect("send");
        let mut client = SseClient {
            tcp,
            raw: Vec::new(),
            body: Vec::new(),
            ended: false,
        };
        let end = loop {
            if let Some(at) = find(&client.raw, b"\r\n\r\n") {
                break at;
            }
            assert!(client.read().await, "the connection closed before the head");
        };
        let head = String::from_utf8(client.raw.drain(..end + 4).collect()).expect("utf-8");
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"), "{head}");
        let headers: Vec<String> = lines.map(str::to_ascii_lowercase).collect();
        for want in [
            "content-type: text/event-stream",
            "transfer-encoding: chunked",
        ] {
            assert!(headers.iter().any(|h| h == want), "no {want:?} in {head}");
        }
        client
    }

    /// Read more bytes; `false` at the end of the connection.
    async fn read(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let n = self.tcp.read(&mut buf).await.expect("read");
        self.raw.extend_from_slice(&buf[..n]);
        n > 0
    }

    /// Move whole chunks from `raw` to `body`; `false` when more bytes are needed.
    fn dechunk(&mut self) -> bool {
        let Some(line) = find(&self.raw, b"\r\n") else {
            return false;
        };
        let size = std::str::from_utf8(&self.raw[..line])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or_else(|| panic!("a bad chunk size line in {:?}", self.raw));
        let start = line + 2;
        if self.raw.len() < start + size + 2 {
            return false;
        }
        assert_eq!(&self.raw[start + size..start + size + 2], b"\r\n");
        self.body.extend_from_slice(&self.raw[start..start + size]);
        self.raw.drain(..start + size + 2);
        if size == 0 {
            self.ended = true;
        }
        true
    }

    /// The next event's text (its lines, without the blank line that ends it),
    /// skipping keep-alive comments; `None` at the end of the body.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(at) = find(&self.body, b"\n\n") {
                let event: Vec<u8> = self.body.drain(..at + 2).collect();
                let text = String::from_utf8(event).expect("utf-8");
                let text = text.trim_end_matches('\n');
                if text.lines().all(|l| l.starts_with(':')) {
                    continue;
                }
                return Some(text.to_owned());
            }
            if self.ended {
                assert!(self.body.is_empty(), "a partial event: {:?}", self.body);
                return None;
            }
            if !self.dechunk() && !self.read().await {
                panic!("the connection closed inside the body");
            }
        }
    }

    /// Every event until the end of the body.
    async fn rest(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The one abort was for `req-1` and reached the engine while the request was its
/// own: the sequence was still running (`Live`), or the drop had already let the
/// engine's stream go, which SimEngine also takes as the end (`AfterEnd`: the abort is
/// spawned, the stream is released in the drop itself, and either may come first on a
/// multi-threaded runtime). Never `Late` (an abort for a request that ended normally).
fn assert_abort_reached_a_live_request(abort: Option<(String, AbortReceipt)>) {
    let (id, receipt) = abort.expect("an abort");
    assert_eq!(id, "req-1");
    assert!(
        matches!(receipt, AbortReceipt::Live | AbortReceipt::AfterEnd),
        "{receipt:?}"
    );
}

/// Everything sent on `rx` so far.
fn drain(rx: &mut mpsc::UnboundedReceiver<String>) -> Vec<String> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_arrives_as_events_in_order_with_the_trailer() {
    let mut f = serve(Duration::from_secs(60)).await;
    let mut client = SseClient::post(f.addr, "8").await;
    let events = within("the whole body", client.rest()).await;

    let record = within("the record", f.records.recv())
        .await
        .expect("a record");
    assert_eq!(&*record.id, "req-1");
    assert_eq!(record.outcome, Outcome::Finished(FinishReason::Length));
    assert_eq!(record.cause, None);
    assert_eq!(record.output_tokens, 8);
    assert_eq!(record.abort, AbortStatus::NotNeeded);
    let gone = within("the body's drop", f.body_gone.recv()).await;
    assert_eq!(gone.as_deref(), Some("req-1"));

    // Exactly what the mapping made, in order, between the leading event and the
    // trailer: 8 tokens, the last chunk saying `Length`.
    let mapped = drain(&mut f.mapped);
    let mut expected = vec!["event: start\ndata: req-1".to_owned()];
    expected.extend(mapped.iter().cloned());
    expected.push("data: [DONE]".to_owned());
    assert_eq!(events, expected);
    let tokens: usize = mapped
        .iter()
        .map(|e| e.matches(',').count() + usize::from(!e.starts_with("data: []")))
        .sum();
    assert_eq!(tokens, 8, "{mapped:?}");
    assert!(
        mapped.last().is_some_and(|e| e.ends_with(" Some(Length)")),
        "{mapped:?}"
    );
    assert!(mapped[..mapped.len() - 1]
        .iter()
        .all(|e| e.ends_with(" None")));

    f.shut_down().await.assert_quiet(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_that_finishes_early_ends_the_stream_with_its_reason_and_aborts_once() {
    let mut f = serve(Duration::from_secs(60)).await;
    // About 100 s of tokens: only the early finish can end it within the guard.
    let mut client = SseClient::post(f.addr, "50000 finish-after=3").await;
    let events = within("the whole body", client.rest()).await;

    let record = within("the record", f.records.recv())
        .await
        .expect("a record");
    assert_eq!(record.outcome, Outcome::Finished(FinishReason::Stop));
    assert_eq!(record.cause, None);
    assert_eq!(record.abort, AbortStatus::Sent);
    assert_abort_reached_a_live_request(within("the abort", f.aborts.recv()).await);
    // Three mapped chunks, then the terminal the finish made: no tokens, `Stop`; the
    // trailer follows, as after any normal finish.
    let mapped = drain(&mut f.mapped);
    assert_eq!(mapped.len(), 4, "{mapped:?}");
    assert!(
        mapped[..3].iter().all(|e| e.ends_with(" None")),
        "{mapped:?}"
    );
    assert_eq!(mapped[3], "data: [] Some(Stop)");
    let mut expected = vec!["event: start\ndata: req-1".to_owned()];
    expected.extend(mapped.iter().cloned());
    expected.push("data: [DONE]".to_owned());
    assert_eq!(events, expected);
    f.shut_down().await.assert_quiet(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_cancels_the_request_once() {
    let mut f = serve(Duration::from_secs(60)).await;
    // About 100 s of tokens: only the disconnect can end it within the guard.
    let mut client = SseClient::post(f.addr, "50000").await;
    assert_eq!(
        within("the start", client.next()).await.as_deref(),
        Some("event: start\ndata: req-1")
    );
    for _ in 0..3 {
        let event = within("a token", client.next())
            .await
            .expect("a token event");
        assert!(event.ends_with(" None"), "{event}");
    }
    drop(client); // the socket closes mid-stream

    let record = within("the record", f.records.recv())
        .await
        .expect("a record");
    assert_eq!(&*record.id, "req-1");
    assert_eq!(record.outcome, Outcome::Cancelled);
    assert_eq!(record.cause, Some(Cause::ClientDisconnect));
    assert_eq!(record.abort, AbortStatus::Sent);
    assert!(record.output_tokens >= 3, "{record:?}");
    let abort = within("the engine's abort", f.aborts.recv()).await;
    assert_abort_reached_a_live_request(abort);
    let gone = within("the body's drop", f.body_gone.recv()).await;
    assert_eq!(gone.as_deref(), Some("req-1"));
    // The request was killed before its terminal: no mapped event says it finished.
    assert!(drain(&mut f.mapped).iter().all(|e| e.ends_with(" None")));

    f.shut_down().await.assert_quiet(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_item_ends_the_stream_without_the_trailer() {
    let mut f = serve(Duration::from_secs(60)).await;
    let mut client = SseClient::post(f.addr, "8 chaos:error@2").await;
    let events = within("the whole body", client.rest()).await;

    let record = within("the record", f.records.recv())
        .await
        .expect("a record");
    let kind = ErrorKind::Backend(BackendError::Unknown);
    assert_eq!(record.outcome, Outcome::Failed(kind));
    assert_eq!(record.abort, AbortStatus::NotNeeded);
    let mapped = drain(&mut f.mapped);
    assert_eq!(mapped.len(), 3, "{mapped:?}");
    assert_eq!(mapped[2], format!("event: error\ndata: {kind}"));
    let mut expected = vec!["event: start\ndata: req-1".to_owned()];
    expected.extend(mapped);
    assert_eq!(events, expected);

    f.shut_down().await.assert_quiet(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_while_the_engine_is_silent_cancels_the_request() {
    // The engine hangs after 2 tokens and the keep-alive is far off: nothing is
    // written after the disconnect, so the server notices the closed socket by
    // reading its end, and the request must not leak until a write fails.
    let mut f = serve(Duration::from_secs(60)).await;
    let mut client = SseClient::post(f.addr, "100 chaos:hang@2").await;
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(within("an event", client.next()).await.expect("an event"));
    }
    assert_eq!(events[0], "event: start\ndata: req-1");
    drop(client); // no token follows the second: the engine is (or is about to be) hung

    let record = within("the record", f.records.recv())
        .await
        .expect("a record");
    assert_eq!(record.outcome, Outcome::Cancelled);
    assert_eq!(record.cause, Some(Cause::ClientDisconnect));
    assert_eq!(record.output_tokens, 2);
    let abort = within("the engine's abort", f.aborts.recv()).await;
    assert_abort_reached_a_live_request(abort);
    within("the body's drop", f.body_gone.recv()).await;

    f.shut_down().await.assert_quiet(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailer_from_the_record_follows_any_end() {
    let mut f = serve(Duration::from_secs(60)).await;
    let mut client = SseClient::post(f.addr, "8 chaos:error@2 record-trailer").await;
    let events = within("the whole body", client.rest()).await;

    let record = within("the record", f.records.recv())
        .await
        .expect("a record");
    assert_eq!(record.outcome.label(), "failed");
    let mut expected = vec!["event: start\ndata: req-1".to_owned()];
    expected.extend(drain(&mut f.mapped));
    expected.push("event: end\ndata: failed 2".to_owned());
    assert_eq!(events, expected);

    f.shut_down().await.assert_quiet(0);
}
