//! The `engine.generate` span (SPEC.md section 6) and `worker_trace_link`, on both
//! runtimes. Every scenario in this binary installs its own capturing subscriber
//! (thread-local), so no test here ever runs without one.

use std::sync::Arc;
use std::time::Duration;

use tether_core::protocol::RawTraceLink;
use tether_core::AbortStatus;

use std::future::IntoFuture;

use tether_core::engine::Metadata;
use tether_core::{
    AdapterConfig, Annotated, Chunk, Context, EngineError, FinishReason, Mode, Outcome, TraceLink,
    Usage,
};
use tether_tests::{
    data, on_both_runtimes, sleep, Harness, ScenarioRuntime, SpanCapture, SpanIdHook, DEADLINE,
};

fn tokens(t: &[u32]) -> Annotated<Chunk> {
    data(Chunk::tokens(t.to_vec()))
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
    first_token_chunk_carries_the_hooks_trace_link,
    without_a_hook_no_trace_link_is_invented,
    a_link_the_engine_set_is_kept,
    migration_link_is_on_the_span_from_its_creation,
    malformed_migration_link_becomes_attributes_not_a_rejection,
    prefill_terminal_carries_the_trace_link_even_after_tokens,
    timed_out_span_records_error_kind,
    setup_error_span_records_failure,
    failed_stream_span_is_an_error_a_cancelled_one_is_not,
    the_clients_request_id_is_on_the_span_and_in_the_metadata,
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
    assert_eq!(span.get("request_id"), Some("r"));
    assert_eq!(span.get("client_request_id"), None);
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

/// A harness whose adapter asks `hook` for trace ids.
fn hooked<R: ScenarioRuntime>(rt: R, hook: &Arc<SpanIdHook>, config: AdapterConfig) -> Harness<R> {
    Harness::with_config(rt, config.trace_id_hook(hook.clone()))
}

async fn first_token_chunk_carries_the_hooks_trace_link<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let hook = Arc::new(SpanIdHook::default());
    let h = hooked(rt, &hook, AdapterConfig::default());
    let (mut s, script, _ctx) = h.start("r").await;
    script
        .tokens(&[])
        .tokens(&[1])
        .tokens(&[2])
        .terminal(FinishReason::Eos);
    let items = h.collect(&mut s).await;
    let span = capture.only();
    let mut first = Chunk::tokens(vec![1]);
    first.worker_trace_link = SpanIdHook::link_for(&span);
    assert!(first.worker_trace_link.is_some());
    assert_eq!(
        items,
        vec![
            tokens(&[]),
            data(first),
            tokens(&[2]),
            data(Chunk::terminal(FinishReason::Eos)),
        ]
    );
    assert_eq!(hook.calls(), 1, "asked once, for the first token only");
    h.assert_clean().await;
}

async fn without_a_hook_no_trace_link_is_invented<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1]).terminal(FinishReason::Eos);
    let items = h.collect(&mut s).await;
    assert_eq!(
        capture.spans().len(),
        1,
        "the span exists, its ids are not used"
    );
    assert_eq!(
        items,
        vec![tokens(&[1]), data(Chunk::terminal(FinishReason::Eos))]
    );
    h.assert_clean().await;
}

async fn a_link_the_engine_set_is_kept<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let hook = Arc::new(SpanIdHook::default());
    let h = hooked(rt, &hook, AdapterConfig::default().spans(false));
    let own = TraceLink::parse("0123456789abcdef0123456789abcdef", "00000000000000aa")
        .expect("valid link");
    let (mut s, script, _ctx) = h.start("r").await;
    let mut first = Chunk::tokens(vec![1]);
    first.worker_trace_link = Some(own);
    script.chunk(first.clone()).terminal(FinishReason::Eos);
    let items = h.collect(&mut s).await;
    assert_eq!(
        items,
        vec![data(first), data(Chunk::terminal(FinishReason::Eos))],
        "kept as the engine set it, spans off or not"
    );
    assert_eq!(hook.calls(), 0, "no need to ask");
    h.assert_clean().await;
}

async fn migration_link_is_on_the_span_from_its_creation<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let hook = Arc::new(SpanIdHook::default());
    let h = hooked(rt, &hook, AdapterConfig::default());
    let migrated = TraceLink::parse("0123456789abcdef0123456789abcdef", "00000000000000aa")
        .expect("valid link");
    let mut request = h.request("r");
    request.migration_link = Some(migrated);
    let mut s = h
        .generate(request, Context::new("r"))
        .await
        .expect("generate");
    // Before any record: the fields came with the span's attributes.
    let span = capture.only();
    assert_eq!(
        span.get("migration_trace_id"),
        Some("0123456789abcdef0123456789abcdef")
    );
    assert_eq!(span.get("migration_span_id"), Some("00000000000000aa"));
    h.engine
        .script("r")
        .tokens(&[1])
        .terminal(FinishReason::Eos);
    let first = h.next(&mut s).await.and_then(|i| i.data).expect("a chunk");
    assert_eq!(first.worker_trace_link, SpanIdHook::link_for(&span));
    drop(h.collect(&mut s).await);
    h.assert_clean().await;
}

async fn malformed_migration_link_becomes_attributes_not_a_rejection<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::new(rt);
    let json = r#"{"id":"r","model":"m","token_ids":[1,2,3],
        "migration_link":{"trace_id":"NOT-HEX","span_id":"00000000000000aa"}}"#;
    let request: tether_core::Request = serde_json::from_str(json).expect("not rejected");
    assert_eq!(request.migration_link, None);
    assert_eq!(
        request.malformed_migration_link,
        Some(RawTraceLink {
            trace_id: "NOT-HEX".into(),
            span_id: "00000000000000aa".into()
        })
    );
    let mut s = h
        .generate(request, Context::new("r"))
        .await
        .expect("the request runs");
    let span = capture.only();
    assert_eq!(span.get("migration_trace_id"), Some("NOT-HEX"));
    assert_eq!(span.get("migration_span_id"), Some("00000000000000aa"));
    h.engine
        .script("r")
        .tokens(&[1])
        .terminal(FinishReason::Eos);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[1]), data(Chunk::terminal(FinishReason::Eos))]
    );
    h.assert_clean().await;
}

async fn prefill_terminal_carries_the_trace_link_even_after_tokens<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let hook = Arc::new(SpanIdHook::default());
    let h = hooked(rt, &hook, AdapterConfig::default().mode(Mode::Prefill));
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
    last.worker_trace_link = SpanIdHook::link_for(&span);
    assert!(last.worker_trace_link.is_some());
    assert_eq!(items, vec![tokens(&[]), data(last)]);

    // One that yields a token: the token carries it, and so does the terminal.
    let (mut s, script, _ctx) = h.start("p2").await;
    script.tokens(&[1]).terminal(FinishReason::Length);
    let items = h.collect(&mut s).await;
    let span = capture.spans().remove(1);
    let mut first = Chunk::tokens(vec![1]);
    first.worker_trace_link = SpanIdHook::link_for(&span);
    let mut last = Chunk::terminal(FinishReason::Length);
    last.worker_trace_link = SpanIdHook::link_for(&span);
    assert_eq!(items, vec![data(first), data(last)]);

    // A terminal that brought its own link keeps it.
    let own = TraceLink::parse("0123456789abcdef0123456789abcdef", "00000000000000aa")
        .expect("valid link");
    let (mut s, script, _ctx) = h.start("p3").await;
    let mut last = Chunk::terminal(FinishReason::Length);
    last.worker_trace_link = Some(own);
    script.chunk(last.clone());
    assert_eq!(h.collect(&mut s).await, vec![data(last)]);
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
    assert_eq!(span.get("otel.status_code"), Some("ERROR"));
    assert_eq!(
        span.get("otel.status_description"),
        Some("FirstTokenTimeout")
    );
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
    assert_eq!(span.get("error_kind"), Some("setup_failed"));
    assert_eq!(span.get("otel.status_code"), Some("ERROR"));
    assert_eq!(
        span.get("otel.status_description"),
        Some("setup failed: InvalidArgument")
    );
    assert!(span.closed);
    h.assert_clean().await;
}

async fn failed_stream_span_is_an_error_a_cancelled_one_is_not<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::new(rt);
    // Mid-stream failure: an error, with the engine's kind (not setup_failed).
    let (mut s, script, _ctx) = h.start("failed").await;
    script
        .tokens(&[1])
        .error(EngineError::invalid_argument("bad"));
    drop(h.collect(&mut s).await);
    // A stop: cancelled, and no error status.
    let (mut s, script, ctx) = h.start("stopped").await;
    script.tokens(&[1]);
    assert!(h.next(&mut s).await.is_some());
    ctx.stop();
    h.wait_aborts(&script, 1).await;
    script.terminal(FinishReason::Cancelled);
    drop(h.collect(&mut s).await);
    // A drop: no error status either.
    let (mut s, script, _ctx) = h.start("dropped").await;
    script.tokens(&[1]);
    assert!(h.next(&mut s).await.is_some());
    drop(s);
    let spans = capture.spans();
    assert_eq!(spans.len(), 3);
    assert_eq!(spans[0].get("error_kind"), Some("InvalidArgument"));
    assert_eq!(spans[0].get("otel.status_code"), Some("ERROR"));
    assert_eq!(
        spans[0].get("otel.status_description"),
        Some("InvalidArgument")
    );
    for span in &spans[1..] {
        assert_eq!(span.get("cancelled"), Some("true"));
        assert_eq!(span.get("otel.status_code"), None, "{span:?}");
        assert_eq!(span.get("error_kind"), None, "{span:?}");
    }
    h.wait_aborts(&h.engine.script("dropped"), 1).await;
    h.assert_clean().await;
}

async fn the_clients_request_id_is_on_the_span_and_in_the_metadata<R: ScenarioRuntime>(rt: R) {
    let capture = SpanCapture::new();
    let _guard = capture.install();
    let h = Harness::new(rt);
    let generate = h
        .adapter
        .request(h.request("internal-7"))
        .client_request_id("retry-of-42")
        .into_future();
    let mut s = h.generate_from(generate).await.expect("generate");
    // On the span from its creation, beside the request's own (unique) id.
    let span = capture.only();
    assert_eq!(span.get("request_id"), Some("internal-7"));
    assert_eq!(span.get("client_request_id"), Some("retry-of-42"));
    // The engine sees it too, under the well-known key.
    let script = h.engine.script("internal-7");
    let gctx = script.generate_context().expect("generate was called");
    assert_eq!(
        gctx.metadata().get(Metadata::CLIENT_REQUEST_ID),
        Some("retry-of-42")
    );
    script.tokens(&[1]).terminal(FinishReason::Eos);
    drop(h.collect(&mut s).await);
    h.assert_clean().await;
}
