//! The `tether serve` binary's connection layer as an operator sees it: the connection
//! limit's warning (once per episode), failed accepts when file descriptors run out
//! (logged, and the server recovers), a connection closed by a timeout (a debug line),
//! the connection flags refused when they make no sense, and a second SIGTERM during
//! the shutdown (an exit at once, code 1).

mod serve_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use serve_support::{
    signal, spawn_serve_logging, spawn_serve_nofile, stop_serve, wait_exit, SseReader,
};

const LIMIT: Duration = Duration::from_secs(20);

/// Wait (bounded) for the child to exit.
fn wait(child: &mut Child) -> ExitStatus {
    wait_exit(child, LIMIT)
}

/// SIGTERM the child, wait (bounded) for it to exit 0, and return its stderr.
fn stop(child: Child) -> String {
    stop_serve(child, LIMIT)
}

/// A blocking connection to `addr`, reads bounded by [`LIMIT`].
fn connect(addr: &str) -> TcpStream {
    let conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(LIMIT)).unwrap();
    conn
}

/// `GET /health` on `conn` (keep-alive); the status line of the answer. The answer is
/// read whole, so `conn` can carry the next request.
fn health(conn: &mut TcpStream) -> String {
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: tether\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |l| l.trim().parse().unwrap());
            if body.len() >= length {
                return head.lines().next().unwrap().to_owned();
            }
        }
    }
}

/// Everything until the server closes the connection.
fn read_to_end(conn: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The log lines of `stderr` that contain `needle`.
fn lines_with<'a>(stderr: &'a str, needle: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn the_connection_limit_is_warned_about_once_until_it_clears() {
    let (child, addr) =
        spawn_serve_logging(&["--addr", "127.0.0.1:0", "--max-connections", "1"], None);
    let mut held = connect(&addr);
    assert_eq!(health(&mut held), "HTTP/1.1 200 OK");
    for _ in 0..2 {
        let answer = read_to_end(&mut connect(&addr));
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    }
    drop(held);
    // Served again once the server saw the held connection close (the attempts before
    // that get 503s).
    let deadline = Instant::now() + LIMIT;
    let held = loop {
        let mut conn = connect(&addr);
        conn.write_all(b"GET /health HTTP/1.1\r\nhost: tether\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 12];
        conn.read_exact(&mut first).unwrap();
        if &first == b"HTTP/1.1 200" {
            break conn;
        }
        assert!(Instant::now() < deadline, "never served again");
        std::thread::sleep(Duration::from_millis(5));
    };
    let answer = read_to_end(&mut connect(&addr));
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    held.shutdown(std::net::Shutdown::Both).unwrap();
    let stderr = stop(child);
    let warnings = lines_with(&stderr, " WARN ");
    assert_eq!(warnings.len(), 2, "{stderr}");
    for w in warnings {
        assert!(
            w.ends_with(
                " WARN tether::serve: connection limit reached: new connections get a 503 \
                 until one closes max_connections=1"
            ),
            "{w}"
        );
    }
    let cleared = lines_with(&stderr, "connection limit cleared");
    assert_eq!(cleared.len(), 1, "{stderr}");
    assert!(
        cleared[0].contains(
            " INFO tether::serve: connection limit cleared: accepting connections again refused="
        ),
        "{stderr}"
    );
}

#[test]
fn running_out_of_file_descriptors_is_logged_and_the_server_recovers() {
    // Few descriptors, and a connection limit above them: accept itself fails.
    let (child, addr) = spawn_serve_nofile(
        48,
        &[
            "--addr",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--max-connections",
            "1000",
        ],
        None,
    );
    let mut conns: Vec<TcpStream> = (0..80).map(|_| connect(&addr)).collect();
    // The first ones are served (each answers); the rest wait in the listen backlog.
    assert_eq!(health(&mut conns[0]), "HTTP/1.1 200 OK");
    drop(conns);
    // Every connection is closed: the server frees its descriptors and serves again.
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Ok(mut conn) = TcpStream::connect(&addr) {
            conn.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut first = [0u8; 12];
            let answered = conn
                .write_all(b"GET /health HTTP/1.1\r\nhost: tether\r\n\r\n")
                .and_then(|()| conn.read_exact(&mut first));
            if answered.is_ok() && &first == b"HTTP/1.1 200" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "never served again");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stderr = stop(child);
    let errors = lines_with(&stderr, " ERROR ");
    assert!(!errors.is_empty(), "{stderr}");
    for e in &errors {
        assert!(
            e.contains(" ERROR tether::serve: cannot accept connections; backing off error=Too many open files (os error 24) suppressed="),
            "{stderr}"
        );
    }
}

#[test]
fn a_connection_closed_by_a_timeout_is_logged_at_debug() {
    let (child, addr) = spawn_serve_logging(
        &["--addr", "127.0.0.1:0", "--idle-timeout", "50ms"],
        Some("tether::serve=debug"),
    );
    let mut conn = connect(&addr);
    let local = conn.local_addr().unwrap();
    assert_eq!(read_to_end(&mut conn), "");
    let stderr = stop(child);
    let closed = lines_with(&stderr, "closing the connection");
    assert_eq!(closed.len(), 1, "{stderr}");
    assert!(
        closed[0].ends_with(&format!(
            " DEBUG tether::serve: closing the connection: its idle timeout (50ms) expired peer={local} timeout=\"idle\""
        )),
        "{stderr}"
    );
}

#[test]
fn connection_flags_that_make_no_sense_exit_2() {
    for (args, needle) in [
        (
            &["--idle-timeout", "soon"][..],
            "invalid value 'soon' for '--idle-timeout",
        ),
        (
            &["--header-read-timeout", "0s"][..],
            "--header-read-timeout must be above 0",
        ),
        (
            &["--write-timeout", "0ms"][..],
            "--write-timeout must be above 0",
        ),
        (
            &["--max-connections", "0"][..],
            "--max-connections must be at least 1",
        ),
        (&["--max-connections", "-3"][..], "-3"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_the_shutdown_exits_at_once_with_code_1() {
    let (mut child, addr) = spawn_serve_logging(
        &[
            "--addr",
            "127.0.0.1:0",
            "--allow-chaos",
            "--shutdown-grace",
            "600s",
        ],
        None,
    );
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // A stream whose engine hangs: the shutdown would wait its whole grace period.
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(
            json!({"model": "sim", "prompt": "hi", "max_tokens": 100, "stream": true,
                   "annotations": ["chaos:hang@1"]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap();
    signal(&child, "TERM");
    // The second signal only once the first was handled (two pending signals would be
    // seen as one).
    let mut seen = Vec::new();
    loop {
        let line = lines.recv_timeout(LIMIT).expect("no shutdown line");
        seen.push(line);
        if seen.last().unwrap() == "tether serve: SIGTERM: shutting down (grace 600s)" {
            break;
        }
    }
    signal(&child, "TERM");
    let status = wait(&mut child);
    seen.extend(lines.iter());
    let stderr = seen.join("\n");
    assert_eq!(status.code(), Some(1), "{stderr}");
    // In this order (the access log's line of the dropped stream may come between).
    let forced = [
        "tether serve: SIGTERM during the shutdown: exiting now, without waiting for requests in flight or the engine's cleanup",
        "tether serve: error: SIGTERM during the shutdown: exited without draining or cleaning up",
    ];
    let at: Vec<usize> = forced
        .iter()
        .map(|line| {
            assert_eq!(seen.iter().filter(|l| l == line).count(), 1, "{stderr}");
            seen.iter().position(|l| l == line).unwrap()
        })
        .collect();
    assert!(at[0] < at[1], "{stderr}");
    assert!(!stderr.contains("tether serve: stopped"), "{stderr}");
    drop(reader);
}
