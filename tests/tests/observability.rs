//! The `engine.generate` span (SPEC.md section 6) and `worker_trace_link`, on both
//! runtimes. Every scenario in this binary installs its own capturing subscriber
//! (thread-local), so no test here ever runs without one.

use std::time::Duration;
use tether_core::AbortStatus;

use tether_core::{
    AdapterConfig, Annotated, Chunk, Context, EngineError, FinishReason, Mode, Outcome, TraceLink,
    Usage,
};
use tether_tests::{
    data, on_both_runtimes, sleep, CapturedSpan, Harness, ScenarioRuntime, SpanCapture, DEADLINE,
};

fn tokens(t: &[u32]) -> Annotated<Chunk> {
    data(Chunk::tokens(t.to_vec()))
}

/// The link derived from a span with no migration link: trace `id << 64 | id`.
fn own_link(span: &CapturedSpan) -> Option<TraceLink> {
    TraceLink::from_ids(u128::from(span.id) << 64 | u128::from(span.id), span.id)
}

/// A `%.2f` rendering of a non-negative number.
fn is_2dp(v: Option<&str>) -> bool {
    v.and_then(|v| v.split_once('.'))
        .is_some_and(|(int, frac)| {
            !int.is_empty() && int.chars().all(|c| c.is_ascii_digit()) && frac.len() == 2
        })
}

fn ms(v: Option<&str>) -> f64 {
    v.and_then(|v| v.parse().ok()).expect("a number")
}

on_both_runtimes!(
    span_records_request_fields,
    dropped_stream_span_records_cancelled_dropped,
    first_token_chunk_carries_worker_trace_link,
    migration_link_sets_trace_of_worker_trace_link,
    prefill_terminal_carries_worker_trace_link_when_no_token_did,
    timed_out_span_records_error_kind,
    setup_error_span_records_failure,
);

async fn span_records_request_fields<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    // Tokens at 5, 15, 35 and 65 ms: gaps 10, 20, 30.
    for (wait, token) in [(5, 1), (10, 2), (20, 3), (30, 4)] {
        sleep(&h.rt, Duration::from_millis(wait)).await;
        script.tokens(&[token]);
        assert!(h.next(&mut s).await.is_some());
    }
    script.terminal(FinishReason::Eos);
    assert!(h.next(&mut s).await.is_some_and(|t| t.is_terminal()));
    let span = capture.only();
    assert_eq!(span.name, "engine.generate");
    assert_eq!(span.get("model"), Some("m"));
    assert_eq!(span.get("input_tokens"), Some("3"));
    assert_eq!(span.get("disagg_role"), Some("agg"));
    assert_eq!(span.get("output_tokens"), Some("4"));
    assert_eq!(span.get("finish_reason"), Some("eos"));
    assert_eq!(span.get("cancelled"), Some("false"));
    assert_eq!(span.get("error_kind"), None);
    assert_eq!(span.get("migration_trace_id"), None);
    let timed = [
        "ttft_ms",
        "avg_itl_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "itl_max_ms",
    ];
    for field in timed {
        assert!(is_2dp(span.get(field)), "{field}: {:?}", span.get(field));
    }
    let rec = h.observer.record("r");
    assert_eq!(rec.itl.count, 3);
    if h.rt.exact_clock() {
        assert_eq!(span.get("ttft_ms"), Some("5.00"));
        assert_eq!(span.get("avg_itl_ms"), Some("20.00"));
        assert_eq!(span.get("itl_p50_ms"), Some("20.00"));
        assert_eq!(span.get("itl_p99_ms"), Some("30.00"));
        assert_eq!(span.get("itl_max_ms"), Some("30.00"));
        assert_eq!(rec.ttft, Some(Duration::from_millis(5)));
        assert_eq!(
            (
                rec.itl.avg_ms,
                rec.itl.p50_ms,
                rec.itl.p99_ms,
                rec.itl.max_ms
            ),
            (20.0, 20.0, 30.0, 30.0)
        );
    } else {
        assert!(ms(span.get("ttft_ms")) >= 5.0);
        assert!(ms(span.get("itl_max_ms")) >= 30.0);
        assert!(ms(span.get("itl_p50_ms")) <= ms(span.get("itl_p99_ms")));
    }
    h.assert_clean().await;
}

async fn dropped_stream_span_records_cancelled_dropped<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert!(h.next(&mut s).await.is_some());
    drop(s);
    let span = capture.only();
    assert_eq!(span.get("cancelled"), Some("true"));
    assert_eq!(span.get("finish_reason"), Some("Dropped"));
    assert_eq!(span.get("output_tokens"), Some("1"));
    assert!(span.closed);
    assert_eq!(h.observer.record("r").outcome, Outcome::Dropped);
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

async fn first_token_chunk_carries_worker_trace_link<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script
        .tokens(&[])
        .tokens(&[1])
        .tokens(&[2])
        .terminal(FinishReason::Eos);
    let items = h.collect(&mut s).await;
    let span = capture.only();
    let link = own_link(&span);
    assert!(link.is_some());
    let mut first = Chunk::tokens(vec![1]);
    first.worker_trace_link = link;
    assert_eq!(
        items,
        vec![
            tokens(&[]),
            data(first),
            tokens(&[2]),
            data(Chunk::terminal(FinishReason::Eos)),
        ]
    );
    h.assert_clean().await;
}

async fn migration_link_sets_trace_of_worker_trace_link<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::new(rt);
    let migrated = TraceLink::parse("0123456789abcdef0123456789abcdef", "00000000000000aa")
        .expect("valid link");
    let mut request = h.request("r");
    request.migration_link = Some(migrated);
    let mut s = h
        .generate(request, Context::new("r"))
        .await
        .expect("generate");
    h.engine
        .script("r")
        .tokens(&[1])
        .terminal(FinishReason::Eos);
    let first = h.next(&mut s).await.and_then(|i| i.data).expect("a chunk");
    let span = capture.spans().remove(0);
    assert_eq!(
        span.get("migration_trace_id"),
        Some("0123456789abcdef0123456789abcdef")
    );
    assert_eq!(span.get("migration_span_id"), Some("00000000000000aa"));
    assert_eq!(
        first.worker_trace_link,
        TraceLink::from_ids(migrated.trace_id(), span.id)
    );
    drop(h.collect(&mut s).await);
    h.assert_clean().await;
}

async fn prefill_terminal_carries_worker_trace_link_when_no_token_did<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::with_config(rt, AdapterConfig::default().mode(Mode::Prefill));
    // A prefill worker that yields no token: its terminal carries the link.
    let usage = Usage::new(3, 0);
    let (mut s, script, _ctx) = h.start("p1").await;
    script
        .tokens(&[])
        .chunk(Chunk::terminal(FinishReason::Length).with_usage(usage));
    let items = h.collect(&mut s).await;
    let span = capture.spans().remove(0);
    assert_eq!(span.get("disagg_role"), Some("prefill"));
    let mut last = Chunk::terminal(FinishReason::Length).with_usage(usage);
    last.worker_trace_link = own_link(&span);
    assert!(last.worker_trace_link.is_some());
    assert_eq!(items, vec![tokens(&[]), data(last)]);

    // One that yields a token: the token carries it, the terminal does not.
    let (mut s, script, _ctx) = h.start("p2").await;
    script.tokens(&[1]).terminal(FinishReason::Length);
    let items = h.collect(&mut s).await;
    let span = capture.spans().remove(1);
    let mut first = Chunk::tokens(vec![1]);
    first.worker_trace_link = own_link(&span);
    assert_eq!(
        items,
        vec![data(first), data(Chunk::terminal(FinishReason::Length))]
    );
    h.assert_clean().await;
}

async fn timed_out_span_records_error_kind<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::with_config(
        rt,
        AdapterConfig::default().first_token_timeout(Some(DEADLINE)),
    );
    let (mut s, script, _ctx) = h.start("r").await;
    assert_eq!(
        h.collect(&mut s).await,
        vec![Annotated::from_error(EngineError::first_token_timeout(
            DEADLINE
        ))]
    );
    let span = capture.only();
    assert_eq!(span.get("finish_reason"), Some("error"));
    assert_eq!(span.get("cancelled"), Some("true"));
    assert_eq!(span.get("error_kind"), Some("FirstTokenTimeout"));
    assert_eq!(span.get("output_tokens"), Some("0"));
    assert_eq!(span.get("ttft_ms"), None);
    assert_eq!(span.get("avg_itl_ms"), None);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::TimedOut, AbortStatus::Sent)
    );
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

async fn setup_error_span_records_failure<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::new(rt);
    h.engine
        .script("r")
        .fail_setup(EngineError::invalid_argument("no"));
    assert!(h.generate(h.request("r"), Context::new("r")).await.is_err());
    let span = capture.only();
    assert_eq!(span.get("finish_reason"), Some("error"));
    assert_eq!(span.get("cancelled"), Some("false"));
    assert_eq!(span.get("error_kind"), Some("InvalidArgument"));
    assert!(span.closed);
    h.assert_clean().await;
}
