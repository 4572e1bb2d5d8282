//! `tether load` in-process: every mode, every chaos kind, on tokio (paused clock and
//! real multi-threaded) and smol, with a fixed seed: zero violations, zero leaks, and
//! the counts the seeded plan implies. The same against TinyEngine, with the client
//! chaos it takes (stop, kill, drop).

use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use tether_cli::engine::EngineKind;
use tether_cli::load::plan::{Action, Planned};
use tether_cli::load::{self, ChaosRates, LoadOptions, PlanCounts, Report};
use tether_cli::runtime::RuntimeKind;
use tether_core::protocol::Mode;
use tether_engines::{SimConfig, TinyConfig};

const MODES: [Mode; 3] = [Mode::Aggregated, Mode::Prefill, Mode::Decode];

/// 1000 requests, seed 42, every chaos kind, small step costs.
fn options(mode: Mode, runtime: RuntimeKind, timeout: Duration) -> LoadOptions {
    LoadOptions {
        requests: 1000,
        concurrency: 64,
        runtime,
        threads: 2,
        mode,
        max_tokens: 12,
        prompt_tokens: (4, 24),
        chaos: ChaosRates {
            stop: 0.1,
            kill: 0.1,
            drop: 0.1,
            error: 0.05,
            hang: 0.05,
            panic: 0.05,
        },
        seed: 42,
        first_token_timeout: Some(timeout),
        inter_token_timeout: Some(timeout),
        deferral_deadline: Duration::from_millis(20),
        sim: SimConfig {
            decode_step_cost: Duration::from_micros(200),
            batch_cost_per_sequence: Duration::from_nanos(100),
            prefill_cost_per_token: Duration::from_nanos(100),
            ..SimConfig::default()
        },
        settle_timeout: Duration::from_secs(5),
        ..LoadOptions::default()
    }
}

/// The seeded plan of `opts`, checked against the report's counts.
fn plan_of(opts: &LoadOptions, r: &Report) -> (Vec<Planned>, PlanCounts) {
    let (planned, p) = opts.plan();
    assert_eq!(r.plan, p);
    (planned, p)
}

/// Every abort sent was received, exactly as many as the plan calls for.
fn assert_aborts_fit_plan(opts: &LoadOptions, r: &Report, planned: &[Planned], p: &PlanCounts) {
    assert_eq!(r.aborts_sent, r.aborts_received);
    assert_eq!(r.aborts_sent, r.aborts_expected);
    assert_eq!(r.late_aborts, 0);
    let certain = p.stop + p.kill + p.hang;
    let drops_at_0 = planned
        .iter()
        .filter(|x| x.action == Action::Drop(0))
        .count() as u64;
    if opts.mode == Mode::Decode {
        // A drop before the first token aborts only if the engine's first-token hint
        // won the race; everything else is exact.
        let low = certain + p.drop - drops_at_0;
        assert!(
            (low..=low + drops_at_0).contains(&r.aborts_expected),
            "{} not in {low}..={}",
            r.aborts_expected,
            low + drops_at_0
        );
    } else {
        assert_eq!(r.aborts_expected, certain + p.drop);
    }
}

/// What the seeded plan says must have happened.
fn assert_counts_fit_plan(opts: &LoadOptions, r: &Report) {
    assert!(r.passed(), "{}", r.table());
    assert!(r.leaks.is_clean(), "{:?}", r.leaks);
    let (planned, p) = plan_of(opts, r);
    for kind in [p.stop, p.kill, p.drop, p.error, p.hang, p.panic] {
        assert!(kind > 20, "every chaos kind is exercised: {p:?}");
    }
    let hang_at_0 = planned
        .iter()
        .filter(|x| x.action == Action::Hang(0))
        .count();
    assert!(hang_at_0 > 0, "hangs before the first token are exercised");
    let o = r.outcomes;
    assert_eq!(o.dropped, p.drop);
    assert_eq!(o.timed_out, p.hang);
    assert_eq!(o.failed, p.error + p.panic);
    assert_eq!(r.failures.get("BackendUnknown"), Some(&(p.error + p.panic)));
    assert_eq!(o.finished + o.cancelled, p.none + p.stop + p.kill);
    assert!(o.cancelled >= p.kill && o.cancelled <= p.kill + p.stop);
    assert_eq!(r.finish_reasons.get("length"), Some(&o.finished));
    assert_aborts_fit_plan(opts, r, &planned, &p);
    assert_eq!(r.requests, 1000);
    assert!(r.tokens > 0 && r.ttft_ms.count > 0 && r.itl_ms.count > 0);
}

/// On a paused clock the run is instant and the timeouts exact.
async fn paused_tokio(mode: Mode) -> (LoadOptions, Report) {
    let opts = options(mode, RuntimeKind::Tokio, Duration::from_millis(200));
    let rt = Arc::new(tether_tokio::TokioRuntime::current());
    let report = load::run_on(&opts, rt, ProgressBar::hidden())
        .await
        .unwrap();
    (opts, report)
}

#[tokio::test(start_paused = true)]
async fn agg_on_paused_tokio() {
    let (opts, r) = paused_tokio(Mode::Aggregated).await;
    assert_counts_fit_plan(&opts, &r);
}

#[tokio::test(start_paused = true)]
async fn prefill_on_paused_tokio() {
    let (opts, r) = paused_tokio(Mode::Prefill).await;
    assert_counts_fit_plan(&opts, &r);
}

#[tokio::test(start_paused = true)]
async fn decode_on_paused_tokio() {
    let (opts, r) = paused_tokio(Mode::Decode).await;
    assert_counts_fit_plan(&opts, &r);
}

#[tokio::test(start_paused = true)]
async fn paused_tokio_runs_are_repeatable() {
    let (_, a) = paused_tokio(Mode::Aggregated).await;
    let (_, b) = paused_tokio(Mode::Aggregated).await;
    assert_eq!((a.outcomes, a.tokens), (b.outcomes, b.tokens));
    assert_eq!(a.aborts_sent, b.aborts_sent);
}

/// Real time, real threads: generous timeouts so a busy machine cannot fire them.
fn real(mode: Mode, runtime: RuntimeKind) {
    let opts = options(mode, runtime, Duration::from_millis(500));
    let report = load::run(&opts, false).unwrap();
    assert_counts_fit_plan(&opts, &report);
}

#[test]
fn every_mode_on_smol() {
    for mode in MODES {
        real(mode, RuntimeKind::Smol);
    }
}

#[test]
fn every_mode_on_multi_threaded_tokio() {
    for mode in MODES {
        real(mode, RuntimeKind::Tokio);
    }
}

#[tokio::test(start_paused = true)]
async fn broken_expectations_are_reported() {
    // A first-token limit shorter than a step: every request times out, which no plan
    // allows for a request that does not hang.
    let opts = LoadOptions {
        requests: 50,
        chaos: ChaosRates::NONE,
        first_token_timeout: Some(Duration::from_micros(50)),
        ..options(
            Mode::Aggregated,
            RuntimeKind::Tokio,
            Duration::from_millis(200),
        )
    };
    let rt = Arc::new(tether_tokio::TokioRuntime::current());
    let r = load::run_on(&opts, rt, ProgressBar::hidden())
        .await
        .unwrap();
    assert!(!r.passed());
    assert_eq!(r.outcomes.timed_out, 50);
    assert!(r
        .violations
        .iter()
        .any(|v| v.contains("does not fit the plan")));
    // Each timeout aborted the engine once: the plan did not expect those aborts.
    assert_eq!(
        (r.aborts_sent, r.aborts_received, r.aborts_expected),
        (50, 50, 0)
    );
    assert!(r.leaks.is_clean(), "{:?}", r.leaks);
    assert!(r.table().contains("FAILED"));
}

#[test]
fn bad_options_are_rejected() {
    let base = LoadOptions::default();
    let cases = [
        LoadOptions {
            concurrency: 0,
            ..base.clone()
        },
        LoadOptions {
            chaos: ChaosRates {
                stop: 1.5,
                ..ChaosRates::NONE
            },
            ..base.clone()
        },
        LoadOptions {
            chaos: ChaosRates {
                stop: 0.6,
                kill: 0.6,
                ..ChaosRates::NONE
            },
            ..base.clone()
        },
        LoadOptions {
            first_token_timeout: None,
            inter_token_timeout: None,
            ..base.clone()
        },
        LoadOptions {
            max_tokens: 1,
            ..base.clone()
        },
        LoadOptions {
            prompt_tokens: (0, 4),
            ..base.clone()
        },
    ];
    for opts in cases {
        let err = load::run(&opts, false).unwrap_err();
        assert!(
            matches!(err, load::LoadError::InvalidOptions(_)),
            "{opts:?}: {err}"
        );
    }
}

/// TinyEngine: 200 requests, seed 7, stop, kill and drop; a smaller model than the
/// default (the tests run unoptimized) and no timeouts, so that a slow step can never
/// fail a request that has no engine fault to catch.
fn tiny_options(mode: Mode, runtime: RuntimeKind) -> LoadOptions {
    LoadOptions {
        requests: 200,
        concurrency: 24,
        runtime,
        threads: 2,
        mode,
        max_tokens: 8,
        prompt_tokens: (2, 12),
        chaos: ChaosRates {
            stop: 0.15,
            kill: 0.15,
            drop: 0.15,
            ..ChaosRates::NONE
        },
        seed: 7,
        first_token_timeout: None,
        inter_token_timeout: None,
        deferral_deadline: Duration::from_millis(20),
        tiny: TinyConfig {
            d_model: 32,
            heads: 2,
            d_ff: 128,
            max_sequences: 8,
            ..TinyConfig::default()
        },
        ..LoadOptions::for_engine(EngineKind::Tiny)
    }
}

/// What the seeded plan says must have happened on TinyEngine.
fn assert_tiny_counts_fit_plan(opts: &LoadOptions, r: &Report) {
    assert!(r.passed(), "{}", r.table());
    assert!(r.leaks.is_clean(), "{:?}", r.leaks);
    assert_eq!(
        (r.engine, r.device.as_deref()),
        (EngineKind::Tiny, Some("cpu"))
    );
    let (planned, p) = plan_of(opts, r);
    for kind in [p.stop, p.kill, p.drop] {
        assert!(kind > 15, "every client chaos kind is exercised: {p:?}");
    }
    assert_eq!(p.error + p.hang + p.panic, 0);
    let o = r.outcomes;
    assert_eq!((o.failed, o.timed_out), (0, 0));
    assert_eq!(o.dropped, p.drop);
    assert_eq!(o.finished + o.cancelled, p.none + p.stop + p.kill);
    assert!(o.cancelled >= p.kill && o.cancelled <= p.kill + p.stop);
    assert_eq!(r.finish_reasons.get("length"), Some(&o.finished));
    assert_aborts_fit_plan(opts, r, &planned, &p);
    assert_eq!(r.requests, 200);
    assert!(r.tokens > 0 && r.ttft_ms.count > 0 && r.itl_ms.count > 0);
    assert!(r.table().contains("engine tiny on cpu"), "{}", r.table());
}

#[tokio::test(start_paused = true)]
async fn tiny_every_mode_on_paused_tokio() {
    for mode in MODES {
        let opts = tiny_options(mode, RuntimeKind::Tokio);
        let rt = Arc::new(tether_tokio::TokioRuntime::current());
        let r = load::run_on(&opts, rt, ProgressBar::hidden())
            .await
            .unwrap();
        assert_tiny_counts_fit_plan(&opts, &r);
    }
}

#[test]
fn tiny_every_mode_on_smol() {
    for mode in MODES {
        let opts = tiny_options(mode, RuntimeKind::Smol);
        assert_tiny_counts_fit_plan(&opts, &load::run(&opts, false).unwrap());
    }
}

#[test]
fn tiny_on_multi_threaded_tokio() {
    let opts = tiny_options(Mode::Aggregated, RuntimeKind::Tokio);
    assert_tiny_counts_fit_plan(&opts, &load::run(&opts, false).unwrap());
}

#[test]
fn tiny_refuses_engine_faults_and_contexts_it_cannot_hold() {
    let base = tiny_options(Mode::Aggregated, RuntimeKind::Smol);
    for chaos in [
        ChaosRates {
            error: 0.01,
            ..ChaosRates::NONE
        },
        ChaosRates {
            hang: 0.01,
            ..ChaosRates::NONE
        },
        ChaosRates {
            panic: 0.01,
            ..ChaosRates::NONE
        },
    ] {
        let opts = LoadOptions {
            chaos,
            inter_token_timeout: Some(Duration::from_secs(1)),
            ..base.clone()
        };
        let err = load::run(&opts, false).unwrap_err();
        assert!(err.is_usage(), "{err}");
        assert!(
            err.to_string().contains("cannot inject engine faults"),
            "{err}"
        );
    }
    let too_long = LoadOptions {
        prompt_tokens: (2, 510),
        ..base
    };
    let err = load::run(&too_long, false).unwrap_err();
    assert!(err.to_string().contains("context of 512"), "{err}");
}
