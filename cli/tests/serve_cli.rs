//! The `tether serve` binary: it prints where it listens, serves, and on SIGTERM shuts
//! down gracefully and exits 0; bad arguments exit 2.

mod serve_support;

use std::process::{Child, Command};
use std::time::Duration;

use serve_support::{spawn_serve, wait_exit};

/// Wait (at most `limit`) for the child to exit.
fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    wait_exit(child, limit)
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_then_exits_0_on_sigterm_after_cleanup() {
    let (mut child, addr) = spawn_serve(&["--addr", "127.0.0.1:0", "--step-us", "200"]);
    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let resp = client
        .post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model": "sim", "prompt": "hi", "max_tokens": 4}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    signal(&child, "TERM");
    let status = wait(&mut child, Duration::from_secs(20));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(stderr.contains("engine cleanup: ok"), "{stderr}");
}

#[test]
fn sigint_also_shuts_down_cleanly() {
    let (mut child, _) = spawn_serve(&[
        "--addr",
        "127.0.0.1:0",
        "--engine",
        "tiny",
        "--runtime",
        "smol",
    ]);
    signal(&child, "INT");
    let status = wait(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn bad_serve_arguments_exit_2() {
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--engine", "gpt"], "gpt"),
        (vec!["--addr", "nowhere"], "nowhere"),
        (vec!["--first-token-timeout", "soon"], "soon"),
        (vec!["--max-tokens-limit", "-1"], "-1"),
        (vec!["--device", "tpu"], "tpu"),
        (vec!["--device", "cuda"], "needs --engine tiny"),
        (vec!["--max-seqs", "0"], "max_sequences must be at least 1"),
        (vec!["--prefill-ns", "-5"], "-5"),
        // Checked once the address is bound: any free port.
        (
            vec![
                "--addr",
                "127.0.0.1:0",
                "--cors-allow-origin",
                "app.example",
            ],
            "is not an origin",
        ),
        (
            vec!["--addr", "127.0.0.1:0", "--api-key", ""],
            "--api-key must not be empty",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("serve")
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    if cfg!(not(feature = "otel")) {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--otlp-endpoint",
                "http://127.0.0.1:4318",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("otel"));
    }
}
