//! The integrator's API (issue 13) on tokio (paused clock) and smol: early finish (SPEC
//! rule 12), kill-on-drop (rule 4's opt-in), cancellation causes, per-request settings,
//! the stream's own record, the `Result` view and attached values.

use std::future::{poll_fn, Future, IntoFuture};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_util::TryStreamExt;
use tether_core::{
    AbortStatus, AdapterConfig, Cause, Chunk, Context, EngineError, ErrorKind, FinishReason, Mode,
    Outcome, RequestRecord, ResponseStream,
};
use tether_tests::{data, guarded, on_both_runtimes, Harness, ScenarioRuntime, DEADLINE};

const HOUR: Duration = Duration::from_secs(3600);

fn tokens(t: &[u32]) -> tether_core::Annotated<Chunk> {
    data(Chunk::tokens(t.to_vec()))
}

fn terminal(reason: FinishReason) -> tether_core::Annotated<Chunk> {
    data(Chunk::terminal(reason))
}

/// The stream ends with a synthesized `Cancelled`, recorded as `Cancelled` with `cause`.
async fn ends_cancelled<R: ScenarioRuntime>(h: &Harness<R>, s: &mut ResponseStream, cause: Cause) {
    assert_eq!(h.collect(s).await, vec![terminal(FinishReason::Cancelled)]);
    let rec = h.observer.record(s.request_id());
    assert_eq!((rec.outcome, rec.cause), (Outcome::Cancelled, Some(cause)));
}

on_both_runtimes!(
    early_finish_ends_the_stream_with_the_reason_and_aborts_once,
    early_finish_in_decode_before_the_first_token_defers_the_abort_and_drains,
    early_finish_loses_to_a_kill_that_came_first,
    kill_on_drop_records_cancelled_with_cause_client_disconnect,
    kill_on_drop_during_setup_records_cancelled_and_aborts,
    kill_on_drop_after_the_terminal_kills_nothing,
    without_kill_on_drop_a_drop_is_dropped,
    the_first_cause_reaches_the_record,
    a_timeout_records_cause_timeout_and_per_request_limits_apply,
    per_request_mode_overrides_the_adapter,
    the_record_reaches_the_stream_and_the_callback_once,
    results_view_gives_chunks_as_ok_and_the_error_as_err,
    an_attached_value_lives_until_the_request_is_over,
    a_request_without_a_context_gets_its_own,
    a_context_named_otherwise_keeps_the_request_id,
    the_streams_record_keeps_an_error_finish_text,
);

async fn early_finish_ends_the_stream_with_the_reason_and_aborts_once<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1, 2]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1, 2])));
    assert!(!s.is_done());
    // A stop string matched in the text so far: the edge ends the request itself.
    assert!(s.finish(FinishReason::Stop));
    assert!(
        !s.finish(FinishReason::Length),
        "a second finish changes nothing"
    );
    assert!(s.is_done());
    assert_eq!(h.collect(&mut s).await, vec![terminal(FinishReason::Stop)]);
    let rec = h.observer.record("r");
    assert_eq!(
        (&rec.outcome, rec.abort, rec.cause, rec.output_tokens),
        (
            &Outcome::Finished(FinishReason::Stop),
            AbortStatus::Sent,
            None,
            2
        )
    );
    assert_eq!(s.record().as_ref(), Some(&rec));
    h.wait_aborts(&script, 1).await;
    // The engine's late chunks reach nobody.
    script.tokens(&[3]).terminal(FinishReason::Eos);
    assert_eq!(h.next(&mut s).await, None);
    assert_eq!(h.observer.aborts("r"), 1);
    h.assert_clean().await;
}

async fn early_finish_in_decode_before_the_first_token_defers_the_abort_and_drains<
    R: ScenarioRuntime,
>(
    rt: R,
) {
    let h = Harness::with_config(
        rt,
        AdapterConfig::default()
            .mode(Mode::Decode)
            .deferral_deadline(HOUR),
    );
    let (mut s, script, _ctx) = h.start("r").await;
    assert!(s.finish(FinishReason::Length));
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Length)]
    );
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (
            Outcome::Finished(FinishReason::Length),
            AbortStatus::Deferred
        )
    );
    // Mid KV transfer: the engine's stream is kept, not dropped, and no abort yet.
    assert_eq!((h.engine.live_streams(), h.observer.aborts("r")), (1, 0));
    // Its first token (drained off the consumer's path) releases the abort.
    script.tokens(&[7]);
    h.wait_aborts(&script, 1).await;
    assert_eq!(h.observer.aborts("r"), 1);
    h.assert_clean().await;
}

async fn early_finish_loses_to_a_kill_that_came_first<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    ctx.kill();
    assert!(!s.finish(FinishReason::Stop));
    ends_cancelled(&h, &mut s, Cause::Caller).await;
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

async fn kill_on_drop_records_cancelled_with_cause_client_disconnect<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, AdapterConfig::default().kill_on_drop(true));
    let (mut s, script, ctx) = h.start("r").await;
    let child = Context::new("r-child");
    ctx.link_child(&child);
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    drop(s); // the client hung up
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.cause, rec.abort, rec.output_tokens),
        (
            Outcome::Cancelled,
            Some(Cause::ClientDisconnect),
            AbortStatus::Sent,
            1
        )
    );
    assert!(ctx.is_killed() && child.is_killed());
    assert_eq!(child.cause(), Some(Cause::ClientDisconnect));
    h.wait_aborts(&script, 1).await;
    assert_eq!(h.observer.aborts("r"), 1);
    h.assert_clean().await;
}

async fn kill_on_drop_during_setup_records_cancelled_and_aborts<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let script = h.engine.script("r");
    script.hold_setup();
    let ctx = Context::new("r");
    {
        let mut generate = pin!(h
            .adapter
            .request(h.request("r"))
            .context(ctx.clone())
            .kill_on_drop(true)
            .into_future());
        let ready = poll_fn(|cx| Poll::Ready(generate.as_mut().poll(cx).is_ready())).await;
        assert!(!ready);
    }
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.cause, rec.abort),
        (
            Outcome::Cancelled,
            Some(Cause::ClientDisconnect),
            AbortStatus::Sent
        )
    );
    assert!(ctx.is_killed());
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

async fn kill_on_drop_after_the_terminal_kills_nothing<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, AdapterConfig::default().kill_on_drop(true));
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]).terminal(FinishReason::Eos);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[1]), terminal(FinishReason::Eos)]
    );
    drop(s);
    assert_eq!((ctx.is_stopped(), ctx.cause()), (false, None));
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.cause, rec.abort),
        (
            Outcome::Finished(FinishReason::Eos),
            None,
            AbortStatus::NotNeeded
        )
    );
    h.assert_clean().await;
}

async fn without_kill_on_drop_a_drop_is_dropped<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    // Turned on, then off again: the last word counts.
    s.set_kill_on_drop(true);
    s.set_kill_on_drop(false);
    drop(s);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.cause, rec.abort),
        (Outcome::Dropped, None, AbortStatus::Sent)
    );
    assert!(!ctx.is_stopped());
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

async fn the_first_cause_reaches_the_record<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    ctx.stop_with(Cause::Shutdown);
    ctx.kill_with(Cause::ClientDisconnect); // escalates, but the first cause stays
    assert_eq!(ctx.cause(), Some(Cause::Shutdown));
    ends_cancelled(&h, &mut s, Cause::Shutdown).await;
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

async fn a_timeout_records_cause_timeout_and_per_request_limits_apply<R: ScenarioRuntime>(rt: R) {
    // The adapter has no limit; this one request has a first-token limit.
    let h = Harness::new(rt);
    let ctx = Context::new("r");
    let mut s = guarded(
        &h.rt,
        "generate",
        h.adapter
            .request(h.request("r"))
            .context(ctx.clone())
            .first_token_timeout(Some(DEADLINE))
            .into_future(),
    )
    .await
    .expect("generate succeeds");
    let items = h.collect(&mut s).await;
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0].error.as_ref().map(EngineError::kind),
        Some(ErrorKind::FirstTokenTimeout)
    );
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.cause),
        (Outcome::TimedOut, Some(Cause::Timeout))
    );
    // tether's own timeout does not cancel the caller's context.
    assert_eq!(ctx.cause(), None);
    h.wait_aborts(&h.engine.script("r"), 1).await;
    h.assert_clean().await;
}

async fn per_request_mode_overrides_the_adapter<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt); // aggregated
    let ctx = Context::new("r");
    let s = guarded(
        &h.rt,
        "generate",
        h.adapter
            .request(h.request("r"))
            .context(ctx.clone())
            .mode(Mode::Decode)
            .deferral_deadline(HOUR)
            .into_future(),
    )
    .await
    .expect("generate succeeds");
    let script = h.engine.script("r");
    ctx.kill();
    drop(s);
    // Decode before the first token: the abort waits for the token.
    assert_eq!(h.observer.record("r").abort, AbortStatus::Deferred);
    assert_eq!(h.observer.aborts("r"), 0);
    script.notify_first_token();
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

async fn the_record_reaches_the_stream_and_the_callback_once<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let seen: Arc<Mutex<Vec<RequestRecord>>> = Arc::default();
    let sink = seen.clone();
    let mut s = guarded(
        &h.rt,
        "generate",
        h.adapter
            .request(h.request("r"))
            .on_record(move |rec| sink.lock().unwrap().push(rec.clone()))
            .into_future(),
    )
    .await
    .expect("generate succeeds");
    let script = h.engine.script("r");
    script
        .tokens(&[1])
        .tokens(&[2, 3])
        .terminal(FinishReason::Length);
    assert_eq!(s.record(), None, "no record before the end");
    assert_eq!(h.collect(&mut s).await.len(), 3);
    let rec = h.observer.record("r");
    assert_eq!(rec.output_tokens, 3);
    assert_eq!(s.record().as_ref(), Some(&rec));
    assert_eq!(*seen.lock().unwrap(), vec![rec]);
    h.assert_clean().await;
}

async fn results_view_gives_chunks_as_ok_and_the_error_as_err<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (s, script, _ctx) = h.start("r").await;
    script
        .tokens(&[4])
        .error(EngineError::new(ErrorKind::ResourceExhausted, "kv full"));
    let mut results = s.results();
    let first = guarded(&h.rt, "the first result", results.try_next()).await;
    assert_eq!(first.ok(), Some(Some(Chunk::tokens(vec![4]))));
    let second = guarded(&h.rt, "the error", results.try_next()).await;
    assert_eq!(
        second.err().map(|e| e.kind()),
        Some(ErrorKind::ResourceExhausted)
    );
    let end = guarded(&h.rt, "the end", results.try_next()).await;
    assert_eq!(end.ok(), Some(None));
    assert_eq!(
        results.get_ref().record().map(|r| r.outcome.clone()),
        Some(Outcome::Failed(ErrorKind::ResourceExhausted))
    );
    h.assert_clean().await;
}

async fn an_attached_value_lives_until_the_request_is_over<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    let permit = Arc::new(());
    s.attach(permit.clone());
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    assert_eq!(Arc::strong_count(&permit), 2, "held while generating");
    script.terminal(FinishReason::Eos);
    assert_eq!(h.next(&mut s).await, Some(terminal(FinishReason::Eos)));
    // Released at the terminal, while the stream itself is still alive.
    assert_eq!(Arc::strong_count(&permit), 1);
    // Attached to a finished stream: dropped at once.
    s.attach(permit.clone());
    assert_eq!(Arc::strong_count(&permit), 1);
    drop(s);
    h.assert_clean().await;
}

async fn a_request_without_a_context_gets_its_own<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let mut s = guarded(
        &h.rt,
        "generate",
        h.adapter.request(h.request("r")).into_future(),
    )
    .await
    .expect("generate succeeds");
    assert_eq!((s.context().id(), s.request_id()), ("r", "r"));
    s.context().kill();
    ends_cancelled(&h, &mut s, Cause::Caller).await;
    h.wait_aborts(&h.engine.script("r"), 1).await;
    h.assert_clean().await;
}

async fn a_context_named_otherwise_keeps_the_request_id<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    // A router's child context, named after the route, not the request.
    let ctx = Context::new("route-7");
    let mut s = guarded(
        &h.rt,
        "generate",
        h.adapter.generate(h.request("r"), ctx.clone()),
    )
    .await
    .expect("generate succeeds");
    assert_eq!((s.context().id(), s.request_id()), ("route-7", "r"));
    // The engine is told the request's id (its script is found by it), in `generate`
    // and in `abort`; the record and the abort's report carry it too.
    let script = h.engine.script("r");
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    ctx.kill();
    ends_cancelled(&h, &mut s, Cause::Caller).await;
    h.wait_aborts(&script, 1).await;
    assert_eq!(&*h.observer.record("r").id, "r");
    assert_eq!(h.observer.aborts("r"), 1);
    h.assert_clean().await;
}

async fn the_streams_record_keeps_an_error_finish_text<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    let reason = FinishReason::Error("the sampler gave up".to_owned());
    script.tokens(&[1]).terminal(reason.clone());
    assert_eq!(h.collect(&mut s).await.len(), 2);
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Finished(reason));
    assert_eq!(s.record().as_ref(), Some(&rec), "read again, with its text");
    h.assert_clean().await;
}
