//! The connection layer over raw sockets: keep-alive reuse, the idle, header-read and
//! write timeouts, the connection limit's 503, and connections at shutdown.
//!
//! Timeouts are set small (tens of milliseconds) and each test waits, bounded, for
//! what the timeout does (the socket reaches its end, a counter moves); none asserts
//! how long it took.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tether_cli::serve::ServeConfig;
use tether_core::Runtime;
use tether_engines::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::serve_support::*;
use crate::{completion, error_object, json_of, LIMIT};

const LONG: Duration = Duration::from_secs(600);

/// A config whose connection timeouts are all long but `f`'s.
fn config(f: impl FnOnce(&mut ServeConfig)) -> ServeConfig {
    let mut config = ServeConfig {
        header_read_timeout: LONG,
        idle_timeout: LONG,
        write_timeout: LONG,
        shutdown_grace: LONG,
        ..chaos_config()
    };
    f(&mut config);
    config
}

/// `POST path` with a JSON body, as raw HTTP/1.1 on a keep-alive connection.
fn post(path: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nhost: tether\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn connect(t: &TestServer) -> TcpStream {
    TcpStream::connect(t.server.local_addr()).await.unwrap()
}

/// Read from `stream` into `buf` until `buf` holds `needle`; returns where it ends.
/// Panics if the connection ends first.
async fn read_until(stream: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) -> usize {
    loop {
        if let Some(i) = buf.windows(needle.len()).position(|w| w == needle) {
            return i + needle.len();
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "the connection ended before {:?}; got {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Read one response with a `content-length` body off `stream`: (head, body).
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let end = read_until(stream, &mut buf, b"\r\n\r\n").await;
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap_or_else(|| panic!("no content-length in {head}"))
        .trim()
        .parse()
        .unwrap();
    let mut body = buf[end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection ended mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), length, "more than the body arrived");
    (head, String::from_utf8(body).unwrap())
}

/// Everything the server sends until it closes the connection (a reset counts as the
/// end too).
async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Wait (bounded) until the server counts `n` open connections.
async fn open_connections(t: &TestServer, n: i64) {
    let m = t.server.metrics().clone();
    let ok = eventually(LIMIT, || m.connections() == n).await;
    assert!(ok, "open connections: {} (waited for {n})", m.connections());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_request_on_a_reused_connection_gets_its_first_event() {
    within(LIMIT, async {
        let t = start_with(config(|_| {}), sim_config()).await;
        let mut conn = connect(&t).await;
        conn.write_all(&post("/v1/completions", &completion(3, false)))
            .await
            .unwrap();
        let (head, body) = read_response(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(json_of(&body)["usage"]["completion_tokens"], 3);

        // The same connection, now idle between requests, carries a stream.
        for _ in 0..2 {
            conn.write_all(&post("/v1/completions", &completion(4, true)))
                .await
                .unwrap();
            let mut buf = Vec::new();
            let head_end = read_until(&mut conn, &mut buf, b"\r\n\r\n").await;
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            let first_end = read_until(&mut conn, &mut buf, b"\n\n").await;
            let first = sse_data(&String::from_utf8_lossy(&buf[head_end..first_end]));
            assert_eq!(first.len(), 1, "{first:?}");
            assert!(json_of(&first[0])["choices"][0]["text"].is_string());
            // The rest, up to the end of the chunked body.
            read_until(&mut conn, &mut buf, b"data: [DONE]\n\n").await;
            read_until(&mut conn, &mut buf, b"\r\n0\r\n\r\n").await;
            assert_eq!(t.server.metrics().connections(), 1);
        }
        assert_eq!(t.server.metrics().outcome("finished"), 3);
        drop(conn);
        open_connections(&t, 0).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    within(LIMIT, async {
        let t = start_with(
            config(|c| c.idle_timeout = Duration::from_millis(200)),
            sim_config(),
        )
        .await;
        // Never a byte sent.
        let mut silent = connect(&t).await;
        assert_eq!(read_to_end(&mut silent).await, b"");
        // Idle after a request: the idle time counts from the response's end.
        let mut used = connect(&t).await;
        used.write_all(&post("/v1/completions", &completion(2, false)))
            .await
            .unwrap();
        let (head, _) = read_response(&mut used).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(read_to_end(&mut used).await, b"");
        open_connections(&t, 0).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_not_completed_in_time_is_closed_without_an_answer() {
    within(LIMIT, async {
        let t = start_with(
            config(|c| c.header_read_timeout = Duration::from_millis(200)),
            sim_config(),
        )
        .await;
        let mut slow = connect(&t).await;
        slow.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: tether\r\n")
            .await
            .unwrap();
        // Closed by the header timeout (the idle one is ten minutes).
        assert_eq!(read_to_end(&mut slow).await, b"");
        open_connections(&t, 0).await;
        assert_eq!(t.server.metrics().outcome("finished"), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_outlive_the_idle_and_header_timeouts() {
    within(LIMIT, async {
        let short = Duration::from_millis(20);
        let t = start_with(
            config(|c| {
                c.idle_timeout = short;
                c.header_read_timeout = short;
            }),
            SimConfig {
                // 50 tokens take 250 ms, many times either timeout.
                decode_step_cost: Duration::from_millis(5),
                ..sim_config()
            },
        )
        .await;
        let mut conn = connect(&t).await;
        conn.write_all(&post("/v1/completions", &completion(50, true)))
            .await
            .unwrap();
        let mut buf = Vec::new();
        read_until(&mut conn, &mut buf, b"data: [DONE]\n\n").await;
        read_until(&mut conn, &mut buf, b"\r\n0\r\n\r\n").await;
        let events = sse_data(&String::from_utf8_lossy(&buf));
        // 50 tokens, the finish chunk, [DONE].
        assert_eq!(events.len(), 52);
        assert_eq!(
            json_of(&events[50])["choices"][0]["finish_reason"],
            "length"
        );
        conn.write_all(&post("/v1/completions", &completion(50, false)))
            .await
            .unwrap();
        let (head, body) = read_response(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(json_of(&body)["usage"]["completion_tokens"], 50);
        assert_eq!(t.server.metrics().outcome("finished"), 2);
        // Then the idle timeout closes it.
        assert_eq!(read_to_end(&mut conn).await, b"");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_a_503_and_are_closed() {
    within(LIMIT, async {
        let t = start_with(config(|c| c.max_connections = 2), sim_config()).await;
        let held = [connect(&t).await, connect(&t).await];
        open_connections(&t, 2).await;
        for n in 1..=2 {
            let mut extra = connect(&t).await;
            extra
                .write_all(&post("/v1/completions", &completion(2, false)))
                .await
                .unwrap();
            let answer = String::from_utf8(read_to_end(&mut extra).await).unwrap();
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            assert!(
                head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
                "{head}"
            );
            assert!(head.contains("\r\nconnection: close"), "{head}");
            let body = json_of(body);
            let err = error_object(&body);
            assert_eq!(err["code"], "too_many_connections");
            assert_eq!(err["type"], "service_unavailable_error");
            assert_eq!(t.server.metrics().connections_refused(), n);
        }
        // No request reached the router.
        assert_eq!(t.server.metrics().outcome("finished"), 0);
        // One held connection closes: a new one is served.
        let [first, _second] = held;
        drop(first);
        open_connections(&t, 1).await;
        let (status, text) = t.get("/metrics").await;
        assert_eq!(status, 200);
        let s = parse_prometheus(&text);
        assert_eq!(sample(&s, "tether_http_connections"), 2.0);
        assert_eq!(sample(&s, "tether_http_connections_refused_total"), 2.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_the_write_timeout_and_its_request_killed() {
    within(LIMIT, async {
        let t = start_small_buffers(
            config(|c| {
                c.write_timeout = Duration::from_millis(200);
            }),
            SimConfig {
                decode_step_cost: Duration::from_micros(20),
                ..sim_config()
            },
        )
        .await;
        let mut conn = stalled_reader(&t).await;
        let m = t.server.metrics().clone();
        // The server's socket buffer fills, the write stays pending, the connection is
        // closed and the response dropped: a kill with cause client disconnect.
        let cut = eventually(LIMIT, || m.cancellations("client_disconnect") == 1).await;
        assert!(cut, "not cut: {m:?}");
        t.settled().await;
        assert_eq!(m.aborts(), 1);
        assert_eq!(t.engine.inner.gauges().aborts_received, 1);
        assert_eq!(m.outcome("cancelled"), 1);
        assert_eq!(m.in_flight(), 0);
        open_connections(&t, 0).await;
        // What the client had not read is there, then the end.
        let rest = read_to_end(&mut conn).await;
        assert!(!rest.is_empty());
        assert_eq!(m.aborts(), 1);
    })
    .await;
}

/// A server whose accepted sockets have a small send buffer (they inherit it from the
/// listener; autotuning would grow it to megabytes), so a client that stops reading
/// stalls its writes after a few kilobytes.
async fn start_small_buffers(config: ServeConfig, sim: SimConfig) -> TestServer {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(128).unwrap();
    let runtime: Arc<dyn Runtime> = Arc::new(tether_tokio::TokioRuntime::current());
    start_listening(config, sim, runtime, listener).await
}

/// A client with a tiny receive buffer that sends a long stream request, reads its
/// response head and then stops reading.
async fn stalled_reader(t: &TestServer) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(t.server.local_addr()).await.unwrap();
    // 100 000 events of ~190 bytes: far more than the socket buffers hold.
    conn.write_all(&post("/v1/completions", &completion(100_000, true)))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let end = read_until(&mut conn, &mut buf, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&buf[..end]);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_head_or_an_idle_connection_does_not_hold_up_the_shutdown() {
    within(LIMIT, async {
        // The grace period is longer than the test's limit: the shutdown must not wait
        // for it.
        let t = start_with(config(|_| {}), sim_config()).await;
        let mut half = connect(&t).await;
        half.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: tet")
            .await
            .unwrap();
        let mut idle = connect(&t).await;
        idle.write_all(&post("/v1/completions", &completion(2, false)))
            .await
            .unwrap();
        read_response(&mut idle).await;
        let mut silent = connect(&t).await;
        open_connections(&t, 3).await;
        let TestServer { server, engine, .. } = t;
        let metrics = server.metrics().clone();
        server.shutdown();
        let report = server.wait().await;
        assert!(!report.killed_in_flight && report.drained, "{report:?}");
        assert!(report.cleanup.is_ok());
        assert_eq!(engine.cleanups.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.connections(), 0);
        for conn in [&mut half, &mut idle, &mut silent] {
            assert_eq!(read_to_end(conn).await, b"");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_busy_after_the_kill_wait_is_dropped() {
    within(LIMIT, async {
        let t = start_with(
            config(|c| c.shutdown_grace = Duration::from_millis(50)),
            sim_config(),
        )
        .await;
        // A request whose body never arrives: in flight, and no kill can end it (it
        // never reached the engine).
        let mut stuck = connect(&t).await;
        let body = completion(4, false).to_string();
        stuck
            .write_all(
                format!(
                    "POST /v1/completions HTTP/1.1\r\nhost: tether\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                    body.len(),
                    &body[..body.len() / 2]
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        // And a stream in flight, which the kill ends.
        let mut reader = SseReader::new(t.post("/v1/completions", &completion(100_000, true)).await);
        reader.next().await.unwrap();
        let TestServer { server, engine, .. } = t;
        let metrics = server.metrics().clone();
        server.shutdown();
        let report = server.wait().await;
        assert!(report.killed_in_flight && !report.drained, "{report:?}");
        assert_eq!(engine.cleanups.load(Ordering::SeqCst), 1);
        // The stuck connection was dropped: closed without an answer.
        assert_eq!(metrics.connections(), 0);
        assert_eq!(read_to_end(&mut stuck).await, b"");
        // The stream got its cancellation.
        let mut rest = Vec::new();
        while let Some(data) = reader.next().await {
            rest.push(data);
        }
        let last = json_of(rest.last().unwrap());
        assert_eq!(error_object(&last)["code"], "shutting_down");
        assert_eq!(metrics.in_flight(), 0);
        assert_eq!(metrics.cancellations("shutdown"), 1);
        assert_eq!(metrics.aborts(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_settings_that_make_no_sense_are_refused() {
    let runtime: Arc<dyn Runtime> = Arc::new(tether_tokio::TokioRuntime::current());
    for (config, message) in [
        (
            config(|c| c.idle_timeout = Duration::ZERO),
            "--idle-timeout must be above 0",
        ),
        (
            config(|c| c.max_connections = 0),
            "--max-connections must be at least 1",
        ),
    ] {
        let engine = Arc::new(tether_engines::SimEngine::new(
            sim_config(),
            runtime.clone(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = tether_cli::serve::start(
            tether_cli::serve::ServedEngine::sim(engine),
            runtime.clone(),
            listener,
            config,
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), message);
    }
}
