//! What an engine tells tether and what it is told beyond the request, on both
//! runtimes: the scheduling signal and the queue time it ends, the caller's metadata in
//! `generate` and in `abort`, and the minimal health-check canary.

use std::time::Duration;

use tether_core::drive::{Canary, ProbeAdapter, CANARY_ID, CANARY_MAX_TOKENS, CANARY_MODEL};
use tether_core::{Chunk, Context, FinishReason, GenerateContext, Metadata, Request};
use tether_tests::{data, on_both_runtimes, sleep, Harness, ScenarioRuntime};

on_both_runtimes!(
    notify_scheduled_ends_the_queue_time,
    a_tokenless_chunk_before_the_first_token_ends_the_queue_time,
    without_a_signal_there_is_no_queue_time,
    a_signal_after_the_end_changes_no_record,
    a_tokenless_terminal_is_no_scheduling_signal,
    metadata_reaches_generate_and_abort,
    the_minimal_canary_probes_with_health_check_defaults,
);

async fn notify_scheduled_ends_the_queue_time<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    sleep(&h.rt, Duration::from_millis(7)).await;
    script.notify_scheduled();
    sleep(&h.rt, Duration::from_millis(5)).await;
    // Only the first signal counts.
    script.notify_scheduled();
    script.tokens(&[1]).terminal(FinishReason::Eos);
    drop(h.collect(&mut s).await);
    let rec = h.observer.record("r");
    let queue = rec.queue_time.expect("the engine signalled");
    if h.rt.exact_clock() {
        assert_eq!(queue, Duration::from_millis(7));
        assert_eq!(rec.ttft, Some(Duration::from_millis(12)));
    } else {
        assert!(queue >= Duration::from_millis(7), "{queue:?}");
        assert!(rec
            .ttft
            .is_some_and(|t| t >= queue + Duration::from_millis(5)));
    }
    h.assert_clean().await;
}

async fn a_tokenless_chunk_before_the_first_token_ends_the_queue_time<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    sleep(&h.rt, Duration::from_millis(3)).await;
    script.tokens(&[]);
    assert_eq!(h.next(&mut s).await, Some(data(Chunk::tokens(vec![]))));
    sleep(&h.rt, Duration::from_millis(4)).await;
    script.tokens(&[1]);
    assert!(h.next(&mut s).await.is_some());
    sleep(&h.rt, Duration::from_millis(4)).await;
    // A token-less chunk after the first token is not a scheduling signal.
    script.tokens(&[]).terminal(FinishReason::Eos);
    drop(h.collect(&mut s).await);
    let rec = h.observer.record("r");
    if h.rt.exact_clock() {
        assert_eq!(rec.queue_time, Some(Duration::from_millis(3)));
        assert_eq!(rec.ttft, Some(Duration::from_millis(7)));
    } else {
        let queue = rec.queue_time.expect("the handshake chunk");
        assert!(rec
            .ttft
            .is_some_and(|t| t >= queue + Duration::from_millis(4)));
    }
    h.assert_clean().await;
}

async fn without_a_signal_there_is_no_queue_time<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    // The first token is TTFT, not a scheduling signal.
    script.tokens(&[1]).terminal(FinishReason::Eos);
    drop(h.collect(&mut s).await);
    let rec = h.observer.record("r");
    assert_eq!(rec.queue_time, None);
    assert!(rec.ttft.is_some());
    h.assert_clean().await;
}

async fn a_signal_after_the_end_changes_no_record<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1]).terminal(FinishReason::Eos);
    drop(h.collect(&mut s).await);
    sleep(&h.rt, Duration::from_millis(2)).await;
    // An engine that reports late: the request is over, its record stays as it was.
    script.notify_scheduled();
    let rec = h.observer.record("r");
    assert_eq!(rec.queue_time, None);
    assert_eq!(
        s.record(),
        Some(rec),
        "the stream's record is the observer's"
    );
    h.assert_clean().await;
}

async fn a_tokenless_terminal_is_no_scheduling_signal<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    sleep(&h.rt, Duration::from_millis(3)).await;
    // The engine ends at once, with no token: the end is not "scheduled".
    script.terminal(FinishReason::Length);
    assert_eq!(
        h.collect(&mut s).await,
        vec![data(Chunk::terminal(FinishReason::Length))]
    );
    let rec = h.observer.record("r");
    assert_eq!((rec.queue_time, rec.ttft), (None, None));
    h.assert_clean().await;
}

async fn metadata_reaches_generate_and_abort<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let mut s = h
        .adapter
        .request(h.request("r"))
        .context(Context::new("r"))
        .metadata("tenant", "acme")
        .metadata("priority", "low")
        .metadata("priority", "high")
        .await
        .expect("generate");
    let script = h.engine.script("r");
    script.tokens(&[1]);
    assert!(h.next(&mut s).await.is_some());
    let expected: Metadata = [
        ("tenant", "acme"),
        ("priority", "low"),
        ("priority", "high"),
    ]
    .into_iter()
    .collect();
    let gctx = script.generate_context().expect("generate was called");
    assert_eq!(gctx.metadata(), &expected);
    assert_eq!(gctx.metadata().get("priority"), Some("high"));
    assert_eq!(gctx.metadata().get("region"), None);
    drop(s);
    h.wait_aborts(&script, 1).await;
    let actx = script.abort_context().expect("abort was called");
    assert_eq!(actx.metadata(), &expected);
    // A request without metadata gives the engine an empty one.
    let (mut s, script, _ctx) = h.start("plain").await;
    script.terminal(FinishReason::Eos);
    drop(h.collect(&mut s).await);
    let plain = script.generate_context().expect("generate was called");
    assert!(plain.metadata().is_empty());
    assert!(GenerateContext::new(Context::new("d"), "d")
        .metadata()
        .is_empty());
    h.assert_clean().await;
}

async fn the_minimal_canary_probes_with_health_check_defaults<R: ScenarioRuntime>(rt: R) {
    let canary: Canary = serde_json::from_str(r#"{"token_ids":[1]}"#).expect("minimal canary");
    assert_eq!(canary, Canary::new(vec![1]));
    let request = canary.clone().into_request();
    let mut expected = Request::new(CANARY_ID, CANARY_MODEL, vec![1]);
    expected.stop.max_tokens = Some(CANARY_MAX_TOKENS);
    assert_eq!(request, expected);
    // Named fields win over the defaults; a canary without token_ids is an error.
    let named: Canary = serde_json::from_str(
        r#"{"token_ids":[5],"id":"hc-1","model":"m","stop":{"max_tokens":3}}"#,
    )
    .expect("named canary");
    assert_eq!(
        (
            named.id.as_str(),
            named.model.as_str(),
            named.stop.max_tokens
        ),
        ("hc-1", "m", Some(3))
    );
    assert!(serde_json::from_str::<Canary>(r#"{"id":"x"}"#).is_err());

    let h = Harness::new(rt);
    h.engine
        .script(CANARY_ID)
        .tokens(&[7])
        .terminal(FinishReason::Length);
    let items = ProbeAdapter::new(h.adapter.clone())
        .probe_canary(canary)
        .await
        .expect("the engine takes the canary");
    assert!(ProbeAdapter::is_healthy(&items));
    assert_eq!(h.engine.generated_ids(), vec![CANARY_ID.to_owned()]);
    h.assert_clean().await;
}
