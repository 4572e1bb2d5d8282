//! Stop and kill (rules 1 and 5): one abort at most and never after the end, the
//! engine's or a synthesized `Cancelled`, the consumer woken, and a context already
//! cancelled before `generate`.

use std::sync::Arc;
use std::task::Poll;
use tether_core::AbortStatus;

use futures_util::future::join;
use tether_core::lifecycle::Phase;
use tether_core::{Adapter, AdapterConfig, Chunk, Context, FinishReason, Outcome, Usage};
use tether_tests::{data, guarded, poll_once, yield_now, Harness, ScenarioRuntime, Step};

use crate::{terminal, tokens, HOUR};

pub(crate) async fn stop_before_terminal_aborts_once_and_chunks_flow_to_engine_terminal<
    R: ScenarioRuntime,
>(
    rt: R,
) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    ctx.stop();
    // Decided synchronously in the context listener, no poll needed.
    assert_eq!(h.observer.aborts("r"), 1);
    assert_eq!(s.state().phase(), Phase::Cancelling);
    h.wait_aborts(&script, 1).await;
    script
        .tokens(&[2])
        .tokens(&[3])
        .terminal(FinishReason::Length);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[2]), tokens(&[3]), terminal(FinishReason::Length)]
    );
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Finished(FinishReason::Length));
    assert_eq!((rec.output_tokens, rec.abort), (3, AbortStatus::Sent));
    // One task, the adapter's abort task, which also times the 5 s cancel grace on its
    // one timer: a stop's grace needs no task of its own.
    assert_eq!((h.counting.spawned(), h.counting.timers()), (1, 1));
    assert_eq!(script.aborts(), 1);
    h.assert_clean().await;
}

pub(crate) async fn stop_answered_by_engine_cancelled_terminal_records_cancelled<
    R: ScenarioRuntime,
>(
    rt: R,
) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    let answer = Chunk::terminal(FinishReason::Cancelled).with_usage(Usage::new(3, 1));
    script.reply_to_abort(vec![Step::Item(Ok(answer.clone()))]);
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    ctx.stop();
    assert_eq!(h.collect(&mut s).await, vec![data(answer)]);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Cancelled, AbortStatus::Sent)
    );
    assert_eq!(script.aborts(), 1);
    h.assert_clean().await;
}

pub(crate) async fn stop_then_engine_ends_without_terminal_synthesizes_cancelled<
    R: ScenarioRuntime,
>(
    rt: R,
) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    ctx.stop();
    h.wait_aborts(&script, 1).await;
    script.tokens(&[2]).close();
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[2]), terminal(FinishReason::Cancelled)]
    );
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Cancelled);
    assert_eq!((rec.output_tokens, rec.abort), (2, AbortStatus::Sent));
    assert_eq!(h.observer.aborts("r"), 1);
    h.assert_clean().await;
}

pub(crate) async fn kill_yields_cancelled_at_next_poll_and_aborts_once<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    script.tokens(&[2]).tokens(&[3]);
    ctx.kill();
    assert_eq!(h.observer.aborts("r"), 1);
    assert_eq!(
        h.next(&mut s).await,
        Some(terminal(FinishReason::Cancelled))
    );
    assert_eq!(h.next(&mut s).await, None);
    assert_eq!(poll_once(&mut s).await, Poll::Ready(None));
    // The engine's queued chunks were never polled, and its stream is released.
    assert_eq!(script.queued(), 2);
    assert_eq!(h.engine.live_streams(), 0);
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Cancelled);
    assert_eq!((rec.output_tokens, rec.abort), (1, AbortStatus::Sent));
    h.wait_aborts(&script, 1).await;
    assert_eq!(h.counting.spawned(), 1);
    h.assert_clean().await;
}

pub(crate) async fn kill_wakes_a_pending_consumer<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    // The consumer waits on an engine with nothing to say; the kill must wake it.
    let (item, ()) = join(h.next(&mut s), async {
        yield_now().await;
        ctx.kill();
    })
    .await;
    assert_eq!(item, Some(terminal(FinishReason::Cancelled)));
    assert_eq!(h.next(&mut s).await, None);
    let rec = h.observer.record("r");
    assert_eq!((rec.outcome, rec.ttft), (Outcome::Cancelled, None));
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

pub(crate) async fn kill_before_queued_final_chunk_is_polled_wins_with_one_terminal<
    R: ScenarioRuntime,
>(
    rt: R,
) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    script.terminal(FinishReason::Eos);
    ctx.kill();
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert!(!script.ended(), "the engine's terminal is never polled");
    assert_eq!(h.observer.record("r").outcome, Outcome::Cancelled);
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

pub(crate) async fn final_chunk_consumed_before_kill_finishes_without_abort<R: ScenarioRuntime>(
    rt: R,
) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]).terminal(FinishReason::Eos);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    assert_eq!(h.next(&mut s).await, Some(terminal(FinishReason::Eos)));
    ctx.kill();
    assert_eq!(h.next(&mut s).await, None);
    assert_eq!(h.observer.aborts("r"), 0);
    assert_eq!(h.counting.spawned(), 0);
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Finished(FinishReason::Eos));
    assert_eq!(rec.abort, AbortStatus::NotNeeded);
    h.assert_clean().await;
}

pub(crate) async fn kill_inside_engine_poll_racing_final_chunk_yields_one_terminal<
    R: ScenarioRuntime,
>(
    rt: R,
) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    // The kill lands while the engine is being polled, just before it yields its
    // terminal: the kill wins (it was first), the engine's terminal is swallowed.
    let killer = ctx.clone();
    script
        .run(move |_| killer.kill())
        .terminal(FinishReason::Eos);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Cancelled, AbortStatus::Sent)
    );
    assert_eq!(h.observer.aborts("r"), 1);
    h.wait_aborts(&script, 1).await;
    h.assert_clean_allowing_late_abort_entry().await;
}

pub(crate) async fn stop_then_kill_aborts_once<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    ctx.stop();
    ctx.kill();
    assert_eq!(h.observer.aborts("r"), 1);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert_eq!(h.observer.record("r").outcome, Outcome::Cancelled);
    h.wait_aborts(&script, 1).await;
    // The abort task only. It started the stop's grace after the kill (on tokio's one
    // thread: the stop only queued the abort), when it no longer mattered: no timer.
    assert_eq!(h.counting.spawned(), 1);
    if h.rt.exact_clock() {
        assert_eq!(h.counting.timers(), 0);
    }
    assert_eq!(script.aborts(), 1);
    h.assert_clean().await;
}

pub(crate) async fn a_grace_ends_with_its_request<R: ScenarioRuntime>(rt: R) {
    // A grace far longer than any guard, timed by the abort task of an adapter the
    // test can drop: once the request is over, the grace must not hold the request or
    // its adapter, so the task ends with the adapter, with no time passing.
    let config = AdapterConfig::default().cancel_grace(Some(HOUR));
    let h = Harness::with_config(rt, config.clone());
    let adapter = Adapter::new(Arc::new(h.engine.clone()), h.counting.clone(), config);
    let (mut s, script, ctx) = h.start_on(&adapter, "r").await;
    assert_eq!(s.request_id(), "r");
    ctx.stop();
    h.wait_aborts_on(&adapter, &script, 1).await;
    assert_eq!(
        (h.counting.spawned(), h.counting.live(), h.counting.timers()),
        (1, 1, 1),
        "the parked abort task, timing the grace on its timer"
    );
    let shown = format!("{s:?}");
    assert!(
        shown.starts_with("ResponseStream { request_id: \"r\", state: State {"),
        "{shown}"
    );
    script.terminal(FinishReason::Cancelled);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let before = h.rt.now();
    drop((s, adapter));
    guarded(&h.rt, "the abort task to end", h.counting.until_idle()).await;
    // On the paused clock, a grace that kept the adapter would have been waited out.
    if h.rt.exact_clock() {
        assert_eq!(h.rt.now(), before);
    }
    assert_eq!(script.aborts(), 1);
}

pub(crate) async fn stop_after_terminal_does_not_abort<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]).terminal(FinishReason::Stop);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[1]), terminal(FinishReason::Stop)]
    );
    ctx.stop();
    assert_eq!(s.state().phase(), Phase::Terminal);
    assert_eq!(poll_once(&mut s).await, Poll::Ready(None));
    assert_eq!(h.observer.aborts("r"), 0);
    assert_eq!(h.counting.spawned(), 0);
    assert_eq!(
        h.observer.record("r").outcome,
        Outcome::Finished(FinishReason::Stop)
    );
    h.assert_clean().await;
}

pub(crate) async fn context_killed_before_generate_yields_cancelled<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let ctx = Context::new("r");
    ctx.kill();
    let script = h.engine.script("r");
    script.tokens(&[1]).terminal(FinishReason::Eos);
    let mut s = h.generate(h.request("r"), ctx).await.expect("generate");
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let rec = h.observer.record("r");
    assert_eq!((rec.outcome, rec.output_tokens), (Outcome::Cancelled, 0));
    // The engine did get the request, so it is told to drop it, once.
    assert_eq!(h.observer.aborts("r"), 1);
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

pub(crate) async fn context_stopped_before_generate_aborts_once_and_keeps_flowing<
    R: ScenarioRuntime,
>(
    rt: R,
) {
    let h = Harness::new(rt);
    let ctx = Context::new("r");
    ctx.stop();
    let mut s = h.generate(h.request("r"), ctx).await.expect("generate");
    let script = h.engine.script("r");
    assert_eq!(h.observer.aborts("r"), 1);
    h.wait_aborts(&script, 1).await;
    script.tokens(&[1]).terminal(FinishReason::Cancelled);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[1]), terminal(FinishReason::Cancelled)]
    );
    assert_eq!(h.observer.record("r").outcome, Outcome::Cancelled);
    h.assert_clean().await;
}
