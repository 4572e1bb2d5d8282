//! tether's log events (SPEC.md section 6: target `tether`, each with `request_id`,
//! debug on the normal path, warn for timeouts and engine misbehaviour), on both
//! runtimes. The capture is this binary's global subscriber (events come from listener
//! threads, the watchdog and abort tasks), so every test reads only its own request
//! ids, made unique with [`unique_id`].

use std::time::Duration;

use tether_core::{AdapterConfig, Context, EngineError, FinishReason, Mode};
use tether_tests::{
    on_both_runtimes, sleep, unique_id, CapturedEvent, Harness, LogCapture, ScenarioRuntime,
    DEADLINE,
};
use tracing::Level;

const DEBUG: Level = Level::DEBUG;
const WARN: Level = Level::WARN;

fn messages(id: &str) -> Vec<(Level, String)> {
    LogCapture::global().messages_for(id)
}

fn event(id: &str, message: &str) -> CapturedEvent {
    let events = LogCapture::global().events_for(id);
    let mut matching = events.iter().filter(|e| e.message == message);
    let found = matching
        .next()
        .unwrap_or_else(|| panic!("no {message:?} event for {id}: {events:?}"))
        .clone();
    assert!(matching.next().is_none(), "{message:?} twice for {id}");
    found
}

fn expect(pairs: &[(Level, &str)]) -> Vec<(Level, String)> {
    pairs.iter().map(|(l, m)| (*l, (*m).to_owned())).collect()
}

on_both_runtimes!(
    a_stopped_request_logs_the_stop_the_abort_and_its_end,
    a_kill_on_drop_stream_logs_the_client_disconnect,
    a_decode_kill_logs_the_deferral_then_the_deadline,
    a_first_token_timeout_is_a_warning,
    an_expired_cancel_grace_is_a_warning,
    an_engine_that_ends_without_a_terminal_is_a_warning,
    an_engine_panic_is_a_warning,
    an_abort_panic_is_a_warning,
    a_setup_failure_logs_its_end_as_setup_failed,
    a_malformed_migration_link_is_a_warning,
    a_finished_request_logs_only_its_end,
);

async fn a_stopped_request_logs_the_stop_the_abort_and_its_end<R: ScenarioRuntime>(rt: R) {
    LogCapture::global();
    let h = Harness::new(rt);
    let id = unique_id("stopped");
    let (mut s, script, ctx) = h.start(&id).await;
    script.tokens(&[1]);
    assert!(h.next(&mut s).await.is_some());
    sleep(&h.rt, Duration::from_millis(7)).await;
    ctx.stop();
    h.wait_aborts(&script, 1).await;
    script.terminal(FinishReason::Cancelled);
    drop(h.collect(&mut s).await);
    h.assert_clean().await;
    assert_eq!(
        messages(&id),
        expect(&[
            (DEBUG, "cancellation seen"),
            (DEBUG, "abort sent"),
            (DEBUG, "stream complete"),
        ])
    );
    let seen = event(&id, "cancellation seen");
    assert_eq!(seen.get("signal"), Some("stop"));
    assert_eq!(seen.get("cause"), Some("caller"));
    assert_eq!(seen.get("model"), Some("m"));
    assert_eq!(seen.get("mode"), Some("agg"));
    let end = event(&id, "stream complete");
    assert_eq!(end.get("outcome"), Some("cancelled"));
    assert_eq!(end.get("cause"), Some("caller"));
    assert_eq!(end.get("output_tokens"), Some("1"));
    assert_eq!(end.get("abort"), Some("sent"));
    assert_eq!(end.get("setup_failed"), Some("false"));
    assert_eq!(end.get("finish_reason"), None);
    if h.rt.exact_clock() {
        assert_eq!(seen.get("elapsed_ms"), Some("7"));
        assert_eq!(end.get("ttft_ms"), Some("0"));
    }
}

async fn a_kill_on_drop_stream_logs_the_client_disconnect<R: ScenarioRuntime>(rt: R) {
    LogCapture::global();
    let h = Harness::with_config(rt, AdapterConfig::default().kill_on_drop(true));
    let id = unique_id("disconnect");
    let (mut s, script, _ctx) = h.start(&id).await;
    script.tokens(&[1]);
    assert!(h.next(&mut s).await.is_some());
    drop(s);
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
    assert_eq!(
        messages(&id),
        expect(&[
            (
                DEBUG,
                "client disconnect: stream dropped before its terminal, request killed"
            ),
            (DEBUG, "cancellation seen"),
            (DEBUG, "abort sent"),
            (DEBUG, "stream complete"),
        ])
    );
    let seen = event(&id, "cancellation seen");
    assert_eq!(seen.get("signal"), Some("kill"));
    assert_eq!(seen.get("cause"), Some("client_disconnect"));
    let end = event(&id, "stream complete");
    assert_eq!(end.get("outcome"), Some("cancelled"));
    assert_eq!(end.get("cause"), Some("client_disconnect"));
}

async fn a_decode_kill_logs_the_deferral_then_the_deadline<R: ScenarioRuntime>(rt: R) {
    LogCapture::global();
    let h = Harness::with_config(
        rt,
        AdapterConfig::default()
            .mode(Mode::Decode)
            .deferral_deadline(DEADLINE),
    );
    let id = unique_id("deferred");
    let (mut s, script, ctx) = h.start(&id).await;
    ctx.kill();
    // The consumer gets its terminal at once; the abort waits for the deadline.
    drop(h.collect(&mut s).await);
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
    assert_eq!(
        messages(&id),
        expect(&[
            (DEBUG, "cancellation seen"),
            (DEBUG, "abort deferred until the first token"),
            (DEBUG, "stream complete"),
            (
                WARN,
                "deferral deadline hit: no first token, abort sent anyway"
            ),
            (DEBUG, "abort sent"),
        ])
    );
    assert_eq!(
        event(&id, "abort deferred until the first token").get("deferral_deadline_ms"),
        Some("20")
    );
    assert_eq!(event(&id, "stream complete").get("abort"), Some("deferred"));
    assert_eq!(event(&id, "cancellation seen").get("mode"), Some("decode"));
    if h.rt.exact_clock() {
        assert_eq!(
            event(
                &id,
                "deferral deadline hit: no first token, abort sent anyway"
            )
            .get("elapsed_ms"),
            Some("20")
        );
    }
}

async fn a_first_token_timeout_is_a_warning<R: ScenarioRuntime>(rt: R) {
    LogCapture::global();
    let h = Harness::with_config(
        rt,
        AdapterConfig::default().first_token_timeout(Some(DEADLINE)),
    );
    let id = unique_id("ttft");
    let (mut s, script, _ctx) = h.start(&id).await;
    drop(h.collect(&mut s).await);
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
    assert_eq!(
        messages(&id),
        expect(&[
            (WARN, "first-token timeout fired: request killed"),
            (DEBUG, "abort sent"),
            (DEBUG, "stream complete"),
        ])
    );
    let fired = event(&id, "first-token timeout fired: request killed");
    assert_eq!(fired.get("timeout"), Some("first_token"));
    assert_eq!(fired.get("limit_ms"), Some("20"));
    let end = event(&id, "stream complete");
    assert_eq!(end.get("outcome"), Some("timed_out"));
    assert_eq!(end.get("cause"), Some("timeout"));
}

async fn an_expired_cancel_grace_is_a_warning<R: ScenarioRuntime>(rt: R) {
    let id = stopped_until_the_grace_runs_out(rt, "grace", |_| {}).await;
    assert_eq!(
        messages(&id),
        expect(&[
            (DEBUG, "cancellation seen"),
            (DEBUG, "abort sent"),
            (WARN, "cancel grace expired: the stopped request is killed"),
            (DEBUG, "stream complete"),
        ])
    );
    assert_eq!(
        event(&id, "cancel grace expired: the stopped request is killed").get("cancel_grace_ms"),
        Some("20")
    );
}

/// A request (named after `name`) with a grace of [`DEADLINE`] whose engine, set up by
/// `script` besides its one token, never ends: its first token is read, it is stopped
/// and read to its end while the grace runs out. Returns its id, for its log events.
async fn stopped_until_the_grace_runs_out<R: ScenarioRuntime>(
    rt: R,
    name: &str,
    script: impl FnOnce(&tether_tests::Script),
) -> String {
    LogCapture::global();
    let h = Harness::with_config(rt, AdapterConfig::default().cancel_grace(Some(DEADLINE)));
    let id = unique_id(name);
    let (mut s, engine, ctx) = h.start(&id).await;
    script(engine.tokens(&[1]));
    assert!(h.next(&mut s).await.is_some());
    ctx.stop();
    drop(h.collect(&mut s).await);
    h.assert_clean().await;
    id
}

async fn an_engine_that_ends_without_a_terminal_is_a_warning<R: ScenarioRuntime>(rt: R) {
    LogCapture::global();
    let h = Harness::new(rt);
    let id = unique_id("incomplete");
    let (mut s, script, _ctx) = h.start(&id).await;
    script.tokens(&[1]).close();
    drop(h.collect(&mut s).await);
    h.assert_clean().await;
    assert_eq!(
        messages(&id),
        expect(&[
            (
                WARN,
                "engine misbehaviour: its stream ended without a terminal chunk"
            ),
            (DEBUG, "stream complete"),
        ])
    );
    assert_eq!(event(&id, "stream complete").get("outcome"), Some("failed"));
}

async fn an_engine_panic_is_a_warning<R: ScenarioRuntime>(rt: R) {
    LogCapture::global();
    let h = Harness::new(rt);
    let id = unique_id("panic");
    let (mut s, script, _ctx) = h.start(&id).await;
    script.tokens(&[1]).panic("boom");
    drop(h.collect(&mut s).await);
    h.assert_clean().await;
    assert_eq!(
        messages(&id),
        expect(&[
            (WARN, "engine misbehaviour: its stream panicked: boom"),
            (DEBUG, "stream complete"),
        ])
    );
}

async fn an_abort_panic_is_a_warning<R: ScenarioRuntime>(rt: R) {
    let id = stopped_until_the_grace_runs_out(rt, "abort-panic", |script| {
        script.panic_in_abort("abort boom");
    })
    .await;
    assert_eq!(
        messages(&id),
        expect(&[
            (DEBUG, "cancellation seen"),
            (DEBUG, "abort sent"),
            (WARN, "engine misbehaviour: abort panicked"),
            (WARN, "cancel grace expired: the stopped request is killed"),
            (DEBUG, "stream complete"),
        ])
    );
}

async fn a_setup_failure_logs_its_end_as_setup_failed<R: ScenarioRuntime>(rt: R) {
    LogCapture::global();
    let h = Harness::new(rt);
    let id = unique_id("setup");
    h.engine
        .script(&id)
        .fail_setup(EngineError::invalid_argument("no"));
    assert!(h
        .generate(h.request(&id), Context::new(id.as_str()))
        .await
        .is_err());
    h.assert_clean().await;
    assert_eq!(messages(&id), expect(&[(DEBUG, "stream complete")]));
    let end = event(&id, "stream complete");
    assert_eq!(end.get("outcome"), Some("failed"));
    assert_eq!(end.get("setup_failed"), Some("true"));
    assert_eq!(end.get("abort"), Some("not_needed"));
}

async fn a_malformed_migration_link_is_a_warning<R: ScenarioRuntime>(rt: R) {
    LogCapture::global();
    // Logged whether or not the adapter makes spans.
    let h = Harness::with_config(rt, AdapterConfig::default().spans(false));
    let id = unique_id("link");
    let mut request = h.request(&id);
    request.malformed_migration_link = Some(tether_core::protocol::RawTraceLink {
        trace_id: "zz".into(),
        span_id: "0000000000000001".into(),
    });
    let mut s = h
        .generate(request, Context::new(id.as_str()))
        .await
        .expect("the request runs");
    h.engine
        .script(&id)
        .tokens(&[1])
        .terminal(FinishReason::Eos);
    drop(h.collect(&mut s).await);
    h.assert_clean().await;
    assert_eq!(
        messages(&id),
        expect(&[
            (
                WARN,
                "malformed migration link skipped (kept as span attributes)"
            ),
            (DEBUG, "stream complete"),
        ])
    );
    let warned = event(
        &id,
        "malformed migration link skipped (kept as span attributes)",
    );
    assert_eq!(warned.get("migration_trace_id"), Some("zz"));
    assert_eq!(warned.get("migration_span_id"), Some("0000000000000001"));
}

async fn a_finished_request_logs_only_its_end<R: ScenarioRuntime>(rt: R) {
    LogCapture::global();
    let h = Harness::new(rt);
    let id = unique_id("finished");
    let (mut s, script, _ctx) = h.start(&id).await;
    script
        .run(tether_core::GenerateContext::notify_scheduled)
        .tokens(&[1, 2])
        .terminal(FinishReason::Eos);
    drop(h.collect(&mut s).await);
    h.assert_clean().await;
    assert_eq!(messages(&id), expect(&[(DEBUG, "stream complete")]));
    let end = event(&id, "stream complete");
    assert_eq!(end.get("outcome"), Some("finished"));
    assert_eq!(end.get("finish_reason"), Some("eos"));
    assert_eq!(end.get("cause"), Some("none"));
    assert_eq!(end.get("output_tokens"), Some("2"));
    assert_eq!(end.get("abort"), Some("not_needed"));
    if h.rt.exact_clock() {
        assert_eq!(end.get("queue_ms"), Some("0"));
    }
}
