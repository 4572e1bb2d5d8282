//! The `tether` binary: exit codes and output formats.

mod serve_support;

use serve_support::{stderr, tether};

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let cases: [(&[&str], &str); 14] = [
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
        (&["load", "--engine", "gpt"], "gpt"),
        (&["load", "--device", "cuda"], "needs --engine tiny"),
        (
            &["conformance", "--device", "cuda:1"],
            "needs --engine tiny",
        ),
        (&["load", "--engine", "tiny", "--device", "tpu"], "tpu"),
        (
            &["conformance", "--interleaved", "0"],
            "--interleaved is zero",
        ),
        (
            &["conformance", "--check-timeout", "0"],
            "--check-timeout is zero",
        ),
        (
            &["conformance", "--cancel-within", "30s"],
            "--cancel-within (30s) is not shorter than --check-timeout (30s)",
        ),
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
    for engine in ["sim", "tiny"] {
        for runtime in ["tokio", "smol"] {
            let out = tether(&["conformance", "--engine", engine, "--runtime", runtime]);
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            let text = String::from_utf8_lossy(&out.stdout);
            for check in tether_core::conformance::CHECKS {
                assert!(text.contains(&format!("ok  {check}")), "{text}");
            }
            assert!(
                text.contains(&format!("engine `{engine}` passed 6/6 checks on {runtime}")),
                "{text}"
            );
        }
    }
}

#[test]
fn conformance_takes_its_limits_as_flags() {
    let out = tether(&[
        "conformance",
        "--engine",
        "sim",
        "--runtime",
        "smol",
        "--start-timeout",
        "2m",
        "--check-timeout",
        "10s",
        "--cancel-within",
        "1s",
        "--stop-max-tokens",
        "500",
        "--interleaved",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("engine `sim` passed 6/6 checks on smol"),
        "{text}"
    );
}

/// A tiny run: the default model is slow unoptimized, so few, short requests.
const TINY: [&str; 10] = [
    "load",
    "--engine",
    "tiny",
    "--requests",
    "12",
    "--prompt-max",
    "8",
    "--max-tokens",
    "4",
    "--no-progress",
];

#[test]
fn tiny_load_with_default_chaos_notes_the_change_and_passes() {
    let out = tether(&TINY);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "note: --engine tiny has no engine faults: error, hang, panic chaos set to 0"
        ),
        "{}",
        stderr(&out)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("engine tiny on cpu"), "{table}");
    assert!(table.contains("error 0  hang 0  panic 0"), "{table}");
    assert!(table.contains("ok: every invariant held"), "{table}");
}

#[test]
fn tiny_load_with_engine_faults_exits_2() {
    for extra in [
        &["--error", "0.1"][..],
        &["--chaos", "stop=0.1,panic=0.1"],
        &["--hang", "0.01"],
    ] {
        let args: Vec<&str> = TINY.iter().copied().chain(extra.iter().copied()).collect();
        let out = tether(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--engine tiny cannot inject engine faults"),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
}

/// Whether this machine (and this build) can run TinyEngine on CUDA.
fn cuda_available() -> bool {
    let cfg = tether_engines::TinyConfig {
        device: tether_engines::Device::Cuda(0),
        ..tether_engines::TinyConfig::default()
    };
    tether_engines::tiny::TinyModel::new(&cfg).is_ok()
}

#[test]
fn an_unavailable_cuda_device_exits_2_with_a_message() {
    if cuda_available() {
        eprintln!("skipped: CUDA is available here, so --device cuda is not refused");
        return;
    }
    let load: Vec<&str> = TINY.iter().copied().chain(["--device", "cuda"]).collect();
    let conformance = ["conformance", "--engine", "tiny", "--device", "cuda"];
    let serve = [
        "serve",
        "--engine",
        "tiny",
        "--device",
        "cuda",
        "--addr",
        "127.0.0.1:0",
    ];
    for args in [&load[..], &conformance[..], &serve[..]] {
        let out = tether(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--device cuda:0 is unavailable"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}

/// Without the `llama-cpp` feature, `--engine llama-cpp` is a usage error that says how
/// to build a tether that has it; with it, a missing model file is one.
#[test]
fn llama_cpp_without_the_feature_or_the_file_exits_2_saying_why() {
    for command in ["load", "conformance"] {
        let out = tether(&[
            command,
            "--engine",
            "llama-cpp",
            "--model",
            "/nonexistent.gguf",
        ]);
        assert_eq!(out.status.code(), Some(2), "{command}: {}", stderr(&out));
        let expected = if cfg!(feature = "llama-cpp") {
            "no model file at /nonexistent.gguf"
        } else {
            "--engine llama-cpp needs a tether built with the `llama-cpp` feature"
        };
        assert!(
            stderr(&out).contains(expected),
            "{command}: {}",
            stderr(&out)
        );
    }
    let out = tether(&["load", "--ctx-size", "512", "--no-progress"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("--ctx-size, --batch-size and --compute-threads need --engine llama-cpp"),
        "{}",
        stderr(&out)
    );
}
