//! The `tether` binary: exit codes and output formats.

use std::process::{Command, Output};

fn tether(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .expect("run tether")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let cases: [(&[&str], &str); 7] = [
        (&["load", "--concurrency", "0"], "concurrency"),
        (&["load", "--stop", "1.5"], "--stop"),
        (&["load", "--kill", "-0.1"], ""),
        (
            &["load", "--hang", "0.1", "--inter-token-timeout", "none"],
            "needs a timeout",
        ),
        (&["load", "--runtime", "tokyo"], "tokyo"),
        (&["load", "--chaos", "boom=0.1"], "unknown kind"),
        (&["load", "--mode", "sideways"], "sideways"),
    ];
    for (args, needle) in cases {
        let out = tether(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn a_clean_run_exits_0_and_prints_json() {
    let out = tether(&[
        "load",
        "--requests",
        "300",
        "--concurrency",
        "32",
        "--step-us",
        "200",
        "--inter-token-timeout",
        "1s",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"], 300);
    for key in ["finished", "cancelled", "failed", "dropped", "timed_out"] {
        assert!(v["outcomes"][key].is_u64(), "{key}");
    }
    for key in ["engine_slots", "kv_blocks", "in_flight", "tasks"] {
        assert_eq!(v["leaks"][key], 0, "{key}");
    }
    for key in ["p50", "p90", "p99", "max"] {
        assert!(v["ttft_ms"][key].is_f64(), "{key}");
        assert!(v["itl_ms"][key].is_f64(), "{key}");
    }
    assert_eq!(v["aborts_sent"], v["aborts_expected"]);
    assert!(v["requests_per_s"].is_f64() && v["tokens_per_s"].is_f64());
    assert_eq!(v["violations"], serde_json::json!([]));
}

#[test]
fn a_broken_invariant_exits_1_and_names_it() {
    let out = tether(&[
        "load",
        "--requests",
        "40",
        "--chaos",
        "none",
        "--first-token-timeout",
        "50us",
        "--no-progress",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("FAILED"), "{table}");
    assert!(table.contains("does not fit the plan"), "{table}");
}

#[test]
fn conformance_lists_the_checks() {
    for runtime in ["tokio", "smol"] {
        let out = tether(&["conformance", "--runtime", runtime]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        for check in tether_core::conformance::CHECKS {
            assert!(text.contains(&format!("ok  {check}")), "{text}");
        }
        assert!(text.contains("passed 6/6 checks"), "{text}");
    }
}
