//! Rules 1 to 5 of SPEC.md section 4 on both runtimes: abort at most once and never
//! after the end, the decode-mode deferral, token-less chunks, consumer drops, stop and
//! kill. Every scenario asserts the exact items, the exact record and the exact number
//! of aborts (decided, via the observer, and entered, via the engine).

use std::task::Poll;
use std::time::Duration;
use tether_core::AbortStatus;

use futures_util::future::join;
use tether_core::lifecycle::{Abort, Phase};
use tether_core::{AdapterConfig, Chunk, Context, FinishReason, Mode, Outcome, Usage};
use tether_tests::{
    data, guarded, on_both_runtimes, poll_once, sleep, yield_now, Harness, ScenarioRuntime, Step,
    DEADLINE,
};

const HOUR: Duration = Duration::from_secs(3600);

fn decode(deferral_deadline: Duration) -> AdapterConfig {
    AdapterConfig::default()
        .mode(Mode::Decode)
        .deferral_deadline(deferral_deadline)
}

fn tokens(t: &[u32]) -> tether_core::Annotated<Chunk> {
    data(Chunk::tokens(t.to_vec()))
}

fn terminal(reason: FinishReason) -> tether_core::Annotated<Chunk> {
    data(Chunk::terminal(reason))
}

on_both_runtimes!(
    happy_path_forwards_chunks_then_terminal_without_spawns_or_timers,
    timeouts_create_a_timer_only_when_the_consumer_waits,
    terminal_chunk_with_tokens_is_forwarded_and_counted,
    stop_before_terminal_aborts_once_and_chunks_flow_to_engine_terminal,
    stop_answered_by_engine_cancelled_terminal_records_cancelled,
    stop_then_engine_ends_without_terminal_synthesizes_cancelled,
    kill_yields_cancelled_at_next_poll_and_aborts_once,
    kill_wakes_a_pending_consumer,
    kill_before_queued_final_chunk_is_polled_wins_with_one_terminal,
    final_chunk_consumed_before_kill_finishes_without_abort,
    kill_inside_engine_poll_racing_final_chunk_yields_one_terminal,
    stop_then_kill_aborts_once,
    stop_after_terminal_does_not_abort,
    a_watchdog_ends_with_its_request,
    context_killed_before_generate_yields_cancelled,
    context_stopped_before_generate_aborts_once_and_keeps_flowing,
    tokenless_chunks_are_not_the_first_token,
    decode_stop_before_first_token_defers_abort_until_token,
    decode_stop_before_first_token_defers_abort_until_hint,
    decode_stop_before_first_token_defers_abort_until_in_stream_hint,
    decode_stop_before_first_token_aborts_at_deferral_deadline,
    decode_kill_before_first_token_cancels_now_and_aborts_on_hint,
    decode_kill_before_first_token_aborts_at_deadline_after_stream_ended,
    decode_engine_terminal_discards_deferred_abort,
    decode_drop_before_first_token_aborts_at_the_deadline,
    decode_drop_before_first_token_aborts_at_the_drained_first_token,
    decode_drop_then_engine_end_discards_the_abort,
    decode_stop_then_drop_before_first_token_aborts_at_the_deadline,
    drop_before_terminal_aborts_once_and_records_dropped,
    drop_before_first_poll_aborts_once,
    drop_after_stop_does_not_abort_twice,
    drop_after_terminal_does_nothing,
);

async fn happy_path_forwards_chunks_then_terminal_without_spawns_or_timers<R: ScenarioRuntime>(
    rt: R,
) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    let usage = Usage::new(3, 3);
    script
        .tokens(&[10, 11])
        .tokens(&[12])
        .chunk(Chunk::terminal(FinishReason::Eos).with_usage(usage));
    let items = h.collect(&mut s).await;
    assert_eq!(
        items,
        vec![
            tokens(&[10, 11]),
            tokens(&[12]),
            data(Chunk::terminal(FinishReason::Eos).with_usage(usage)),
        ]
    );
    assert_eq!(poll_once(&mut s).await, Poll::Ready(None));
    assert_eq!(s.state().phase(), Phase::Terminal);
    // The engine's stream is released at the terminal, not when the consumer drops.
    assert_eq!(h.engine.live_streams(), 0);
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Finished(FinishReason::Eos));
    assert_eq!(rec.output_tokens, 3);
    assert_eq!(rec.abort, AbortStatus::NotNeeded);
    assert_eq!(rec.itl.count, 1);
    if h.rt.exact_clock() {
        assert_eq!(rec.ttft, Some(Duration::ZERO));
        assert_eq!(rec.itl.max_ms, 0.0);
    } else {
        assert!(rec.ttft.is_some());
    }
    assert_eq!((h.counting.spawned(), h.counting.timers()), (0, 0));
    assert_eq!(h.observer.total_aborts(), 0);
    drop(s);
    assert_eq!((h.counting.spawned(), h.counting.timers()), (0, 0));
    h.assert_clean().await;
}

async fn timeouts_create_a_timer_only_when_the_consumer_waits<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(
        rt,
        AdapterConfig::default()
            .first_token_timeout(Some(HOUR))
            .inter_token_timeout(Some(HOUR)),
    );
    // The engine always has the next item ready: the consumer never waits, so the
    // silence limits (rule 11) never start and no timer exists.
    let (mut s, script, _ctx) = h.start("r0").await;
    script
        .tokens(&[1])
        .tokens(&[2])
        .terminal(FinishReason::Length);
    assert_eq!(h.collect(&mut s).await.len(), 3);
    assert_eq!(h.counting.timers(), 0);
    // Each request whose consumer waits on the engine gets one timer, re-armed in place.
    for i in 1..3 {
        let id = format!("r{i}");
        let (mut s, script, _ctx) = h.start(&id).await;
        assert_eq!(poll_once(&mut s).await, Poll::Pending);
        // Spurious polls while the engine is silent: the deadline does not move, so
        // the timer is not touched.
        assert_eq!(poll_once(&mut s).await, Poll::Pending);
        assert_eq!(poll_once(&mut s).await, Poll::Pending);
        script.tokens(&[1]);
        assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
        assert_eq!(poll_once(&mut s).await, Poll::Pending);
        script.tokens(&[2]).terminal(FinishReason::Length);
        let items = h.collect(&mut s).await;
        assert_eq!(items, vec![tokens(&[2]), terminal(FinishReason::Length)]);
        assert_eq!(
            h.observer.record(&id).outcome,
            Outcome::Finished(FinishReason::Length)
        );
        assert_eq!(h.counting.timers(), i, "one timer per waiting request");
        // Later deadlines are armed lazily, when the earlier one fires: no resets.
        assert_eq!(h.counting.resets(), 0);
    }
    assert_eq!(h.counting.spawned(), 0);
    h.assert_clean().await;
}

async fn terminal_chunk_with_tokens_is_forwarded_and_counted<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    let mut last = Chunk::tokens(vec![4, 5, 6]);
    last.finish_reason = Some(FinishReason::Stop);
    script.chunk(last.clone()).tokens(&[7]);
    assert_eq!(h.collect(&mut s).await, vec![data(last)]);
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Finished(FinishReason::Stop));
    assert_eq!(rec.output_tokens, 3);
    assert!(rec.ttft.is_some());
    assert_eq!(script.queued(), 1);
    h.assert_clean().await;
}

async fn stop_before_terminal_aborts_once_and_chunks_flow_to_engine_terminal<R: ScenarioRuntime>(
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
    // The abort, and the watchdog holding the 5 s cancel grace (ended by the terminal).
    assert_eq!(h.counting.spawned(), 2);
    assert_eq!(script.aborts(), 1);
    h.assert_clean().await;
}

async fn stop_answered_by_engine_cancelled_terminal_records_cancelled<R: ScenarioRuntime>(rt: R) {
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

async fn stop_then_engine_ends_without_terminal_synthesizes_cancelled<R: ScenarioRuntime>(rt: R) {
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

async fn kill_yields_cancelled_at_next_poll_and_aborts_once<R: ScenarioRuntime>(rt: R) {
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

async fn kill_wakes_a_pending_consumer<R: ScenarioRuntime>(rt: R) {
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

async fn kill_before_queued_final_chunk_is_polled_wins_with_one_terminal<R: ScenarioRuntime>(
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

async fn final_chunk_consumed_before_kill_finishes_without_abort<R: ScenarioRuntime>(rt: R) {
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

async fn kill_inside_engine_poll_racing_final_chunk_yields_one_terminal<R: ScenarioRuntime>(rt: R) {
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

async fn stop_then_kill_aborts_once<R: ScenarioRuntime>(rt: R) {
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
    // The abort, and the stop's grace watchdog.
    assert_eq!(h.counting.spawned(), 2);
    assert_eq!(script.aborts(), 1);
    h.assert_clean().await;
}

async fn a_watchdog_ends_with_its_request<R: ScenarioRuntime>(rt: R) {
    // A grace far longer than any guard: the watchdog holding it must end when the
    // request does, not when the grace runs out.
    let h = Harness::with_config(rt, AdapterConfig::default().cancel_grace(Some(HOUR)));
    let (mut s, script, ctx) = h.start("r").await;
    assert_eq!(s.request_id(), "r");
    ctx.stop();
    h.wait_aborts(&script, 1).await;
    // On smol the abort task may still be ending on another thread after the engine
    // counted its abort: wait for that task alone.
    guarded(&h.rt, "the abort task to end", async {
        while h.counting.live() > 1 {
            yield_now().await;
        }
    })
    .await;
    assert_eq!(h.counting.live(), 1, "the watchdog holds the grace");
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
    // Woken by the end: no time passes (on the paused clock) before it is gone.
    let before = h.rt.now();
    h.assert_clean().await;
    if h.rt.exact_clock() {
        assert_eq!(h.rt.now(), before);
    }
}

async fn stop_after_terminal_does_not_abort<R: ScenarioRuntime>(rt: R) {
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

async fn context_killed_before_generate_yields_cancelled<R: ScenarioRuntime>(rt: R) {
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

async fn context_stopped_before_generate_aborts_once_and_keeps_flowing<R: ScenarioRuntime>(rt: R) {
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

async fn tokenless_chunks_are_not_the_first_token<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(HOUR));
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[])));
    assert_eq!(s.state().phase(), Phase::Pending);
    assert!(!s.state().first_token());
    ctx.stop();
    assert_eq!(s.state().abort(), Abort::Deferred);
    script.tokens(&[]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[])));
    assert_eq!(s.state().abort(), Abort::Deferred);
    assert_eq!(h.observer.aborts("r"), 0);
    // Only the watchdog, holding the grace and the deferral deadline.
    assert_eq!(h.counting.spawned(), 1);
    script.tokens(&[7]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[7])));
    assert_eq!(h.observer.aborts("r"), 1);
    h.wait_aborts(&script, 1).await;
    script.terminal(FinishReason::Cancelled);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Cancelled);
    assert_eq!((rec.output_tokens, rec.abort), (1, AbortStatus::Sent));
    h.assert_clean().await;
}

async fn decode_stop_before_first_token_defers_abort_until_token<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(HOUR));
    let (mut s, script, ctx) = h.start("r").await;
    ctx.stop();
    assert_eq!(poll_once(&mut s).await, Poll::Pending);
    assert_eq!(h.observer.aborts("r"), 0);
    assert_eq!(s.state().abort(), Abort::Deferred);
    script.tokens(&[5]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[5])));
    assert_eq!(h.observer.aborts("r"), 1);
    assert_eq!(s.state().abort(), Abort::Sent);
    h.wait_aborts(&script, 1).await;
    script.tokens(&[6]).terminal(FinishReason::Cancelled);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[6]), terminal(FinishReason::Cancelled)]
    );
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Cancelled, AbortStatus::Sent)
    );
    h.assert_clean().await;
}

async fn decode_stop_before_first_token_defers_abort_until_hint<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(HOUR));
    let (mut s, script, ctx) = h.start("r").await;
    ctx.stop();
    assert_eq!(poll_once(&mut s).await, Poll::Pending);
    assert_eq!(h.observer.aborts("r"), 0);
    // The KV transfer completed on another thread of the engine: no token yet.
    script.notify_first_token();
    assert_eq!(h.observer.aborts("r"), 1);
    h.wait_aborts(&script, 1).await;
    script.close();
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Cancelled, AbortStatus::Sent)
    );
    // The hint is not a token.
    assert_eq!((rec.ttft, rec.output_tokens), (None, 0));
    h.assert_clean().await;
}

async fn decode_stop_before_first_token_defers_abort_until_in_stream_hint<R: ScenarioRuntime>(
    rt: R,
) {
    let h = Harness::with_config(rt, decode(HOUR));
    let (mut s, script, ctx) = h.start("r").await;
    ctx.stop();
    assert_eq!(poll_once(&mut s).await, Poll::Pending);
    assert_eq!(h.observer.aborts("r"), 0);
    script.hint_in_stream();
    assert_eq!(poll_once(&mut s).await, Poll::Pending);
    assert_eq!(h.observer.aborts("r"), 1);
    h.wait_aborts(&script, 1).await;
    script.terminal(FinishReason::Cancelled);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert_eq!(h.observer.record("r").abort, AbortStatus::Sent);
    h.assert_clean().await;
}

async fn decode_stop_before_first_token_aborts_at_deferral_deadline<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(DEADLINE).cancel_grace(None));
    let (mut s, script, ctx) = h.start("r").await;
    let before = h.rt.now();
    ctx.stop();
    assert_eq!(h.observer.aborts("r"), 0);
    // Only a polled stream's timer releases it: poll while waiting for the abort.
    assert_eq!(h.drive_until_abort(&mut s, &script).await, vec![]);
    let waited = h.rt.now() - before;
    if h.rt.exact_clock() {
        assert_eq!(waited, DEADLINE);
    } else {
        assert!(waited >= DEADLINE, "released after {waited:?}");
    }
    assert_eq!(h.observer.aborts("r"), 1);
    script.close();
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Cancelled, AbortStatus::Sent)
    );
    assert_eq!(h.counting.timers(), 1);
    h.assert_clean().await;
}

async fn decode_kill_before_first_token_cancels_now_and_aborts_on_hint<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(HOUR));
    let (mut s, script, ctx) = h.start("r").await;
    ctx.kill();
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let rec = h.observer.record("r");
    // The consumer is done, the abort is still owed to the engine.
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Cancelled, AbortStatus::Deferred)
    );
    assert_eq!(h.observer.aborts("r"), 0);
    // Rule 2: the engine may be mid KV transfer; its stream is kept alive (drained by
    // the watchdog), since dropping it would cancel it early.
    assert_eq!(h.engine.live_streams(), 1);
    drop(s);
    assert_eq!(h.engine.live_streams(), 1);
    script.notify_first_token();
    assert_eq!(h.observer.aborts("r"), 1);
    h.wait_aborts(&script, 1).await;
    // One task waits for the hint or the deadline (and drains), one runs the abort;
    // the stream goes once the abort was sent.
    assert_eq!(h.counting.spawned(), 2);
    h.assert_clean().await;
}

async fn decode_kill_before_first_token_aborts_at_deadline_after_stream_ended<
    R: ScenarioRuntime,
>(
    rt: R,
) {
    let h = Harness::with_config(rt, decode(DEADLINE));
    let (mut s, script, ctx) = h.start("r").await;
    let before = h.rt.now();
    ctx.kill();
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    drop(s);
    assert_eq!(h.observer.aborts("r"), 0);
    h.wait_aborts(&script, 1).await;
    let waited = h.rt.now() - before;
    if h.rt.exact_clock() {
        assert_eq!(waited, DEADLINE);
    } else {
        assert!(waited >= DEADLINE, "released after {waited:?}");
    }
    assert_eq!(h.observer.record("r").abort, AbortStatus::Deferred);
    h.assert_clean().await;
}

async fn decode_engine_terminal_discards_deferred_abort<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(DEADLINE));
    let (mut s, script, ctx) = h.start("r").await;
    ctx.stop();
    assert_eq!(poll_once(&mut s).await, Poll::Pending);
    script.terminal(FinishReason::Cancelled);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Cancelled, AbortStatus::Discarded)
    );
    drop(s);
    // Past the deadline, still nothing: the engine ended by itself.
    sleep(&h.rt, DEADLINE * 3).await;
    assert_eq!(h.observer.aborts("r"), 0);
    // The watchdog armed by the stop, ended by the engine's terminal.
    assert_eq!(h.counting.spawned(), 1);
    h.assert_clean().await;
}

async fn decode_drop_before_first_token_aborts_at_the_deadline<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(DEADLINE));
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[])));
    let dropped = h.rt.now();
    drop(s);
    let rec = h.observer.record("r");
    // Rule 4 with rule 2's deferral: the work must not leak, nor be cut mid transfer.
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Dropped, AbortStatus::Deferred)
    );
    assert_eq!(
        h.engine.live_streams(),
        1,
        "kept alive while the abort is owed"
    );
    h.wait_aborts(&script, 1).await;
    let waited = h.rt.now() - dropped;
    if h.rt.exact_clock() {
        assert_eq!(waited, DEADLINE);
    } else {
        assert!(waited >= DEADLINE, "released after {waited:?}");
    }
    assert_eq!(h.observer.aborts("r"), 1);
    assert_eq!(h.counting.spawned(), 2);
    h.assert_clean().await;
}

async fn decode_drop_before_first_token_aborts_at_the_drained_first_token<R: ScenarioRuntime>(
    rt: R,
) {
    let h = Harness::with_config(rt, decode(HOUR));
    let (s, script, _ctx) = h.start("r").await;
    drop(s);
    assert_eq!(h.observer.record("r").abort, AbortStatus::Deferred);
    // Nobody reads the stream any more, but the watchdog drains it: the first token
    // (not the handshake) releases the abort, and the stream is dropped after it.
    script.tokens(&[]);
    script.tokens(&[9]);
    h.wait_aborts(&script, 1).await;
    assert_eq!(script.queued(), 0);
    assert_eq!(h.observer.aborts("r"), 1);
    h.assert_clean().await;
}

async fn decode_drop_then_engine_end_discards_the_abort<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(DEADLINE));
    let (s, script, _ctx) = h.start("r").await;
    drop(s);
    script.terminal(FinishReason::Length);
    h.engine.until(|e| e.live_streams() == 0).await;
    // The engine ended by itself first: the deferred abort is discarded, for good.
    sleep(&h.rt, DEADLINE * 3).await;
    assert_eq!(h.observer.aborts("r"), 0);
    assert_eq!(h.counting.spawned(), 1);
    h.assert_clean().await;
}

async fn decode_stop_then_drop_before_first_token_aborts_at_the_deadline<R: ScenarioRuntime>(
    rt: R,
) {
    let h = Harness::with_config(rt, decode(DEADLINE));
    let (mut s, script, ctx) = h.start("r").await;
    let stopped = h.rt.now();
    ctx.stop();
    assert_eq!(poll_once(&mut s).await, Poll::Pending);
    assert_eq!(s.state().abort(), Abort::Deferred);
    drop(s);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Dropped, AbortStatus::Deferred)
    );
    h.wait_aborts(&script, 1).await;
    // Counted from the stop that deferred it, not from the drop.
    if h.rt.exact_clock() {
        assert_eq!(h.rt.now() - stopped, DEADLINE);
    }
    assert_eq!(h.observer.aborts("r"), 1);
    assert_eq!(h.counting.spawned(), 2);
    h.assert_clean().await;
}

async fn drop_before_terminal_aborts_once_and_records_dropped<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1, 2]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1, 2])));
    script.tokens(&[3]);
    drop(s);
    assert_eq!(h.observer.aborts("r"), 1);
    assert_eq!(h.engine.live_streams(), 0);
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Dropped);
    assert_eq!((rec.output_tokens, rec.abort), (2, AbortStatus::Sent));
    h.wait_aborts(&script, 1).await;
    assert_eq!(h.counting.spawned(), 1);
    h.assert_clean().await;
}

async fn drop_before_first_poll_aborts_once<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (s, script, _ctx) = h.start("r").await;
    drop(s);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Dropped, AbortStatus::Sent)
    );
    assert_eq!((rec.ttft, rec.output_tokens), (None, 0));
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

async fn drop_after_stop_does_not_abort_twice<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    ctx.stop();
    h.wait_aborts(&script, 1).await;
    drop(s);
    assert_eq!(h.observer.aborts("r"), 1);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Dropped, AbortStatus::Sent)
    );
    // The abort, and the stop's grace watchdog (ended by the drop).
    assert_eq!(h.counting.spawned(), 2);
    h.assert_clean().await;
}

async fn drop_after_terminal_does_nothing<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1]).terminal(FinishReason::Eos);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[1]), terminal(FinishReason::Eos)]
    );
    drop(s);
    assert_eq!(h.observer.aborts("r"), 0);
    assert_eq!(h.counting.spawned(), 0);
    assert_eq!(
        h.observer.record("r").outcome,
        Outcome::Finished(FinishReason::Eos)
    );
    h.assert_clean().await;
}
