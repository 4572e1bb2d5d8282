//! The `tether serve` binary's logs on stderr: one access log line per HTTP request
//! (streams included, whether read to their end or cut), the adapter's warnings by
//! default, its per-request events under `RUST_LOG=tether=debug`, requests refused
//! for their API key logged (and the key never), and a bad `RUST_LOG` refused.

mod serve_support;

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::json;
use serve_support::{short_ids, spawn_serve_logging, spawn_serve_with, stop_serve, SseReader};

const LIMIT: Duration = Duration::from_secs(20);

/// SIGTERM the child, wait (bounded) for it to exit 0, and return its stderr.
fn stop(child: Child) -> String {
    stop_serve(child, LIMIT)
}

/// The fields of an access log line (`None` for any other line).
fn access(line: &str) -> Option<BTreeMap<String, String>> {
    let (_, fields) = line.split_once(" INFO tether::access: ")?;
    Some(
        fields
            .split_whitespace()
            .map(|f| {
                let (k, v) = f.split_once('=').unwrap_or_else(|| panic!("field {f:?}"));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
    )
}

/// The access lines' fields but `duration_ms` (checked to be a number), sorted.
fn access_lines(stderr: &str) -> Vec<String> {
    let mut lines: Vec<String> = stderr
        .lines()
        .filter_map(access)
        .map(|mut f| {
            let ms: f64 = f
                .remove("duration_ms")
                .expect("duration_ms")
                .parse()
                .unwrap();
            assert!(ms >= 0.0, "{ms}");
            let order = [
                "method",
                "path",
                "status",
                "request_id",
                "client_request_id",
                "client_gone",
            ];
            assert!(f.keys().all(|k| order.contains(&k.as_str())), "{f:?}");
            order
                .iter()
                .filter_map(|k| Some(format!("{k}={}", f.get(*k)?)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    lines.sort();
    lines
}

/// Wait until `/metrics` shows `needle`.
async fn metrics_show(client: &reqwest::Client, base: &str, needle: &str) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.lines().any(|l| l == needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_line_per_request_and_warnings_show_by_default() {
    let (child, addr) = spawn_serve_logging(&["--addr", "127.0.0.1:0", "--step-us", "200"], None);
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let post = |body: String| {
        client
            .post(format!("{base}/v1/completions"))
            .header("content-type", "application/json")
            .body(body)
    };
    let completion = |max_tokens: u32, stream: bool| {
        json!({"model": "sim", "prompt": "hi", "max_tokens": max_tokens, "stream": stream})
            .to_string()
    };
    // 1: unary, with a malformed traceparent (a warning; the request is served).
    let resp = post(completion(2, false))
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    // 2: a stream read to its end, with the client's own request id.
    let resp = post(completion(3, true))
        .header("x-request-id", "client-7")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-7");
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    // 3: a stream cut after two events.
    let mut reader = SseReader::new(post(completion(4000, true)).send().await.unwrap());
    reader.next().await.unwrap();
    reader.next().await.unwrap();
    drop(reader);
    // 4: rejected before it got an id; 5: no such path; 6 and more: scrapes.
    let resp = post("{".to_owned()).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let resp = client.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    metrics_show(
        &client,
        &base,
        "tether_client_disconnects_total{endpoint=\"/v1/completions\"} 1",
    )
    .await;
    let stderr = short_ids(&stop(child));
    let lines = access_lines(&stderr);
    let scrapes = lines
        .iter()
        .filter(|l| l.as_str() == "method=GET path=/metrics status=200 client_gone=false")
        .count();
    assert!(scrapes >= 1, "{stderr}");
    let mut expected = vec![
        "method=POST path=/v1/completions status=200 request_id=cmpl-1 client_gone=false",
        "method=POST path=/v1/completions status=200 request_id=cmpl-2 client_request_id=client-7 client_gone=false",
        "method=POST path=/v1/completions status=200 request_id=cmpl-3 client_gone=true",
        "method=POST path=/v1/completions status=400 client_gone=false",
        "method=GET path=/nope status=404 client_gone=false",
    ];
    expected.extend(std::iter::repeat_n(
        "method=GET path=/metrics status=200 client_gone=false",
        scrapes,
    ));
    expected.sort_unstable();
    assert_eq!(lines, expected, "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].ends_with(
            " WARN tether: malformed migration link skipped (kept as span attributes) \
             request_id=\"cmpl-1\" migration_trace_id=\"0af7651916cd43dd8448eb211c80319z\" \
             migration_span_id=\"b7ad6b7169203331\""
        ),
        "{stderr}"
    );
    // The adapter's per-request events are debug: not shown by default.
    assert!(!stderr.contains(" DEBUG "), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_debug_logs_a_cut_streams_cancellation_once() {
    let (child, addr) = spawn_serve_logging(
        &["--addr", "127.0.0.1:0", "--step-us", "200"],
        Some("tether=debug"),
    );
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(
            json!({"model": "sim", "prompt": "hi", "max_tokens": 4000, "stream": true}).to_string(),
        )
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap();
    drop(reader);
    metrics_show(
        &client,
        &base,
        "tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"completions\",stream=\"true\"} 1",
    )
    .await;
    let stderr = short_ids(&stop(child));
    let mine: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" request_id=cmpl-1 "))
        .collect();
    let message = |m: &str| mine.iter().filter(|l| l.contains(m)).count();
    for m in [
        " DEBUG tether: client disconnect: stream dropped before its terminal, request killed ",
        " DEBUG tether: cancellation seen ",
        " DEBUG tether: abort sent ",
        " DEBUG tether: stream complete ",
        " INFO tether::access: method=POST path=/v1/completions status=200 ",
        // The engine's own side, logged by its abort hook.
        " DEBUG tether::engine: engine abort received request_id=cmpl-1 receipt=",
    ] {
        assert_eq!(message(m), 1, "{m:?} in\n{stderr}");
    }
    assert_eq!(mine.len(), 6, "{stderr}");
    // The stream is dropped on the consumer's thread as the abort is spawned: the abort
    // finds the sequence dropped (almost always) or still live, never unknown (late).
    let engine = mine.iter().find(|l| l.contains("tether::engine")).unwrap();
    assert!(
        engine.ends_with(" receipt=\"after_end\"") || engine.ends_with(" receipt=\"live\""),
        "{engine}"
    );
    let complete = mine.iter().find(|l| l.contains("stream complete")).unwrap();
    for field in [
        "outcome=\"cancelled\"",
        "cause=\"client_disconnect\"",
        "abort=\"sent\"",
        "mode=\"agg\"",
        "model=\"sim\"",
    ] {
        assert!(complete.contains(field), "{field} in {complete}");
    }
    assert!(mine
        .iter()
        .any(|l| l.contains("tether::access") && l.ends_with(" client_gone=true")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_logged_as_401_and_the_key_never_is() {
    const KEY: &str = "sk-from-the-environment-4242";
    const GUESS: &str = "sk-a-wrong-guess-1717";
    // The key comes from `TETHER_API_KEY`, with everything logged that can be.
    let (child, addr) = spawn_serve_with(&["--addr", "127.0.0.1:0", "--step-us", "200"], |cmd| {
        cmd.env("TETHER_API_KEY", KEY).env("RUST_LOG", "debug");
    });
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let models = |authorization: Option<String>| {
        let mut req = client.get(format!("{base}/v1/models"));
        if let Some(value) = authorization {
            req = req.header("authorization", value);
        }
        req
    };
    let resp = models(None).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = models(Some(format!("Bearer {GUESS}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = models(Some(format!("Bearer {KEY}"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let stderr = stop(child);
    assert_eq!(
        access_lines(&stderr),
        [
            "method=GET path=/health status=200 client_gone=false",
            "method=GET path=/v1/models status=200 client_gone=false",
            "method=GET path=/v1/models status=401 client_gone=false",
            "method=GET path=/v1/models status=401 client_gone=false",
        ],
        "{stderr}"
    );
    assert!(!stderr.contains(KEY) && !stderr.contains(GUESS), "{stderr}");
}

#[test]
fn a_bad_rust_log_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env("RUST_LOG", "tether=loud")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("RUST_LOG=\"tether=loud\""), "{stderr}");
}
