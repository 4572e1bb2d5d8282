use super::*;

use std::fmt;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::admission::{ACCEPT_BACKOFF_MAX, ACCEPT_ERROR_LOG_INTERVAL, REFUSAL};
use super::in_flight::InFlight;

const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

const TIMEOUTS: Timeouts = Timeouts {
    header_read: Duration::from_secs(10),
    idle: Duration::from_secs(75),
    write: Duration::from_secs(30),
};

/// A `TimedIo` over one end of an in-memory pipe of `capacity` bytes, the other end, and
/// the connection's state.
fn timed(capacity: usize) -> (TimedIo<DuplexStream>, DuplexStream, Arc<ConnState>) {
    timed_counted(capacity, Arc::default())
}

/// [`timed`], counting the requests in flight in `tracker`.
fn timed_counted(
    capacity: usize,
    tracker: Arc<Tracker>,
) -> (TimedIo<DuplexStream>, DuplexStream, Arc<ConnState>) {
    let (server, client) = tokio::io::duplex(capacity);
    let state = Arc::new(ConnState::new(tracker));
    (
        TimedIo::new(server, PEER, TIMEOUTS, state.clone()),
        client,
        state,
    )
}

/// The error of a read or write that failed, or a panic naming what it gave instead.
fn timed_out<T: fmt::Debug>(result: io::Result<T>) -> String {
    match result {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => e.to_string(),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn accepted_sockets_have_nodelay_set() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = TcpStream::connect(addr).await.unwrap();
    // The default, which `accept` must change.
    assert!(!client.nodelay().unwrap());
    let (accepted, peer) = accept(&listener).await.unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    assert!(accepted.nodelay().unwrap());
}

#[test]
fn the_default_connection_limit_follows_the_open_file_limit() {
    for (soft_limit, expected) in [
        (None, FALLBACK_MAX_CONNECTIONS),
        (Some(1024), 960),
        (Some(129), 65),
        (Some(128), 64),
        (Some(100), 50),
        (Some(1), 1),
        (Some(0), 1),
        (Some(4160), 4096),
        (Some(4161), 4096),
        (Some(1_048_576), MAX_CONNECTIONS_CAP),
        (Some(u64::MAX), MAX_CONNECTIONS_CAP),
    ] {
        assert_eq!(max_connections_for(soft_limit), expected, "{soft_limit:?}");
    }
    // This process's, whatever it is, is within the bounds.
    assert!((1..=MAX_CONNECTIONS_CAP).contains(&default_max_connections()));
}

#[test]
fn the_open_file_soft_limit_is_read_from_proc_limits() {
    let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                  Max cpu time              unlimited            unlimited            seconds   \n\
                  Max open files            1024                 524288               files     \n\
                  Max locked memory         8388608              8388608              bytes     \n";
    assert_eq!(open_files_soft_limit(limits), Some(1024));
    let unlimited = limits.replace("1024   ", "unlimited");
    assert_eq!(open_files_soft_limit(&unlimited), Some(u64::MAX));
    assert_eq!(
        open_files_soft_limit("Max open files  lots  lots files"),
        None
    );
    assert_eq!(open_files_soft_limit("Max open files"), None);
    assert_eq!(open_files_soft_limit(""), None);
    assert_eq!(open_files_soft_limit("Max cpu time 1 1 seconds"), None);
    // This machine's file parses.
    let real = std::fs::read_to_string("/proc/self/limits").unwrap();
    assert!(open_files_soft_limit(&real).is_some(), "{real}");
}

#[test]
fn bad_connection_settings_are_refused_with_the_flag_named() {
    let good = ConnConfig {
        header_read_timeout: TIMEOUTS.header_read,
        idle_timeout: TIMEOUTS.idle,
        write_timeout: TIMEOUTS.write,
        max_connections: 1,
    };
    assert_eq!(good.check(), Ok(()));
    let cases = [
        (
            ConnConfig {
                header_read_timeout: Duration::ZERO,
                ..good
            },
            "--header-read-timeout must be above 0",
        ),
        (
            ConnConfig {
                idle_timeout: Duration::ZERO,
                ..good
            },
            "--idle-timeout must be above 0",
        ),
        (
            ConnConfig {
                write_timeout: Duration::ZERO,
                ..good
            },
            "--write-timeout must be above 0",
        ),
        (
            ConnConfig {
                max_connections: 0,
                ..good
            },
            "--max-connections must be at least 1",
        ),
    ];
    for (config, message) in cases {
        assert_eq!(config.check(), Err(message.to_owned()));
    }
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_sends_nothing_times_out_idle() {
    let (mut io, _client, _state) = timed(1024);
    let start = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(timed_out(io.read(&mut buf).await), "idle timeout expired");
    assert_eq!(start.elapsed(), TIMEOUTS.idle);
    // It stays failed.
    assert_eq!(timed_out(io.read(&mut buf).await), "idle timeout expired");
    assert_eq!(timed_out(io.write(b"x").await), "idle timeout expired");
}

#[tokio::test(start_paused = true)]
async fn a_started_head_has_the_header_timeout_from_its_first_byte() {
    let (mut io, mut client, _state) = timed(1024);
    let mut buf = [0u8; 64];
    tokio::time::sleep(Duration::from_secs(60)).await;
    client.write_all(b"GET / HT").await.unwrap();
    let first_byte = Instant::now();
    assert_eq!(io.read(&mut buf).await.unwrap(), 8);
    // More bytes do not extend it.
    tokio::time::sleep(Duration::from_secs(9)).await;
    client.write_all(b"TP/1.1\r\n").await.unwrap();
    assert_eq!(io.read(&mut buf).await.unwrap(), 8);
    assert_eq!(
        timed_out(io.read(&mut buf).await),
        "header-read timeout expired"
    );
    assert_eq!(first_byte.elapsed(), TIMEOUTS.header_read);
}

#[tokio::test(start_paused = true)]
async fn no_read_deadline_while_a_request_is_in_flight_and_idle_counts_from_its_end() {
    let tracker = Arc::new(Tracker::default());
    let (mut io, mut client, state) = timed_counted(1024, tracker.clone());
    let mut buf = [0u8; 64];
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(io.read(&mut buf).await.unwrap(), 18);
    // hyper parsed the head and called the service.
    let request = InFlight::new(state.clone());
    assert_eq!(tracker.requests.load(Ordering::Relaxed), 1);
    // An hour with nothing received is fine while the request runs.
    let pending = tokio::time::timeout(Duration::from_secs(3600), io.read(&mut buf)).await;
    assert!(pending.is_err(), "the read ended: {pending:?}");
    drop(request);
    assert_eq!(tracker.requests.load(Ordering::Relaxed), 0);
    let idle_from = Instant::now();
    assert_eq!(timed_out(io.read(&mut buf).await), "idle timeout expired");
    assert_eq!(idle_from.elapsed(), TIMEOUTS.idle);
}

#[tokio::test(start_paused = true)]
async fn the_end_of_a_request_wakes_a_pending_read_to_arm_the_idle_deadline() {
    let (io, _client, state) = timed(1024);
    let request = InFlight::new(state.clone());
    let reader = tokio::spawn(async move {
        let mut io = io;
        let mut buf = [0u8; 8];
        let result = io.read(&mut buf).await;
        (result.map_err(|e| e.to_string()), Instant::now())
    });
    // Let the read run and wait with no deadline (the request is in flight).
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!reader.is_finished());
    let ended = Instant::now();
    drop(request);
    let (result, at) = tokio::time::timeout(Duration::from_secs(3600), reader)
        .await
        .expect("the read was never woken to arm its idle deadline")
        .unwrap();
    assert_eq!(result, Err("idle timeout expired".to_owned()));
    assert_eq!(at - ended, TIMEOUTS.idle);
}

#[tokio::test(start_paused = true)]
async fn a_write_pending_for_the_write_timeout_fails() {
    let (mut io, _client, state) = timed(16);
    let _request = InFlight::new(state);
    let start = Instant::now();
    // 16 bytes fit; the rest waits for a reader that never reads.
    assert_eq!(
        timed_out(io.write_all(&[b'x'; 64]).await),
        "write timeout expired"
    );
    assert_eq!(start.elapsed(), TIMEOUTS.write);
}

#[tokio::test(start_paused = true)]
async fn a_flush_between_stalled_writes_does_not_restart_the_write_deadline() {
    let (mut io, _client, state) = timed(16);
    let _request = InFlight::new(state);
    io.write_all(&[b'x'; 16]).await.unwrap();
    let stalled = Instant::now();
    let pending = tokio::time::timeout(TIMEOUTS.write / 2, io.write(b"y")).await;
    assert!(pending.is_err(), "{pending:?}");
    // A pipe's flush (like a socket's) is ready at once: no write made progress.
    io.flush().await.unwrap();
    assert_eq!(timed_out(io.write(b"y").await), "write timeout expired");
    assert_eq!(stalled.elapsed(), TIMEOUTS.write);
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_that_keeps_reading_never_hits_the_write_timeout() {
    let (mut io, mut client, state) = timed(16);
    let _request = InFlight::new(state);
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut buf = [0u8; 16];
        while got < 256 {
            // Each stall is below the write timeout; all of them together are not.
            tokio::time::sleep(TIMEOUTS.write / 2).await;
            got += client.read(&mut buf).await.unwrap();
        }
        got
    });
    let start = Instant::now();
    io.write_all(&[b'x'; 256]).await.unwrap();
    assert!(
        start.elapsed() > TIMEOUTS.write * 2,
        "{:?}",
        start.elapsed()
    );
    assert_eq!(reader.await.unwrap(), 256);
}

#[test]
fn the_limit_is_logged_once_until_it_clears() {
    let mut log = LimitLog::default();
    assert_eq!(log.accepted(), None);
    assert!(log.refused());
    assert!(!log.refused());
    assert!(!log.refused());
    assert_eq!(log.accepted(), Some(3));
    assert_eq!(log.accepted(), None);
    assert!(log.refused());
    assert_eq!(log.accepted(), Some(1));
}

#[test]
fn failed_accepts_back_off_and_log_at_most_once_an_interval() {
    let mut errors = AcceptErrors::default();
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    assert_eq!(errors.failed(t0), Some(0));
    assert_eq!(errors.backoff(), ms(10));
    assert_eq!(errors.failed(t0 + ms(10)), None);
    assert_eq!(errors.backoff(), ms(20));
    assert_eq!(errors.failed(t0 + ms(30)), None);
    assert_eq!(errors.backoff(), ms(40));
    for n in 4..=8 {
        assert_eq!(errors.failed(t0 + ms(100 * n)), None);
    }
    assert_eq!(errors.backoff(), ACCEPT_BACKOFF_MAX);
    for _ in 0..100 {
        errors.failed(t0 + ms(900));
    }
    assert_eq!(errors.backoff(), ACCEPT_BACKOFF_MAX);
    // Due again after the interval, with the count it did not log.
    assert_eq!(errors.failed(t0 + ACCEPT_ERROR_LOG_INTERVAL), Some(107));
    // A success ends the streak, not the rate limit.
    errors.succeeded();
    assert_eq!(errors.failed(t0 + ACCEPT_ERROR_LOG_INTERVAL + ms(1)), None);
    assert_eq!(errors.backoff(), ms(10));
}

#[test]
fn the_refusal_is_a_complete_503_with_an_openai_error() {
    let text = std::str::from_utf8(&REFUSAL).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    assert_eq!(lines.next(), Some("HTTP/1.1 503 Service Unavailable"));
    let mut headers: Vec<&str> = lines.collect();
    headers.sort_unstable();
    let length = format!("content-length: {}", body.len());
    assert_eq!(
        headers,
        [
            "connection: close",
            length.as_str(),
            "content-type: application/json",
            "retry-after: 1",
        ]
    );
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": {
            "message": "the server has too many open connections; retry later",
            "type": "service_unavailable_error",
            "param": null,
            "code": "too_many_connections",
        }})
    );
}
