//! Regression tests for the bugs an outside review found in a version that passed every
//! proof (issue 12), one scenario each on tokio (paused clock) and smol. Each failed on
//! that version; the failure it gave is quoted above it.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;
use tether_core::AbortStatus;

use tether_core::lifecycle::{Cancel, Synthesized};
use tether_core::{AdapterConfig, Chunk, Context, ErrorKind, FinishReason, Mode, Outcome};
use tether_tests::{
    data, error_kind, on_both_runtimes, poll_once, sleep, Harness, ScenarioRuntime, DEADLINE,
};

const HOUR: Duration = Duration::from_secs(3600);

fn tokens(t: &[u32]) -> tether_core::Annotated<Chunk> {
    data(Chunk::tokens(t.to_vec()))
}

fn terminal(reason: FinishReason) -> tether_core::Annotated<Chunk> {
    data(Chunk::terminal(reason))
}

fn decode(deferral: Duration, grace: Option<Duration>) -> AdapterConfig {
    AdapterConfig::default()
        .mode(Mode::Decode)
        .deferral_deadline(deferral)
        .cancel_grace(grace)
}

/// On an exact clock, `waited` is exactly `want`; on a real one, at least `want`.
fn assert_waited<R: ScenarioRuntime>(rt: &R, waited: Duration, want: Duration) {
    if rt.exact_clock() {
        assert_eq!(waited, want);
    } else {
        assert!(waited >= want, "after {waited:?}, wanted {want:?}");
    }
}

on_both_runtimes!(
    bug1_grace_fires_after_the_deferral_deadline_fired,
    bug1_inter_token_timeout_fires_after_the_deferral_deadline_fired,
    bug2_kill_interrupts_a_slow_setup,
    bug2_dropping_generate_during_setup_records_dropped_and_aborts,
    bug2_decode_drop_during_setup_defers_the_abort_to_the_deadline,
    bug3_dropped_context_futures_release_their_wakers,
    bug4_deferral_deadline_fires_while_the_consumer_stalls,
    bug4_cancel_grace_fires_while_the_consumer_stalls,
    bug4_a_stalled_consumer_never_times_the_engine_out,
    bug5_decode_kill_then_drop_still_owes_the_abort,
    bug5_decode_kill_keeps_the_engine_stream_until_the_abort,
    bug6_panic_in_generate_is_a_typed_setup_error,
    bug6_panic_in_the_engine_streams_drop_is_contained,
    bug7_stop_from_a_foreign_thread_counts_the_grace_on_the_runtime_clock,
);

// Old smol: hung (the fired one-shot timer was reused for the grace): "timed out after
// 5s waiting for the next stream item".
async fn bug1_grace_fires_after_the_deferral_deadline_fired<R: ScenarioRuntime>(rt: R) {
    let grace = DEADLINE * 3;
    let h = Harness::with_config(rt, decode(DEADLINE, Some(grace)));
    let (mut s, script, ctx) = h.start("r").await;
    let stopped = h.rt.now();
    ctx.stop();
    // The engine ignores the abort released at the deferral deadline, and stays silent.
    assert_eq!(h.drive_until_abort(&mut s, &script).await, vec![]);
    assert_waited(&h.rt, h.rt.now() - stopped, DEADLINE);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert_waited(&h.rt, h.rt.now() - stopped, grace);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Cancelled, AbortStatus::Sent)
    );
    h.assert_clean().await;
}

// Old smol: hung for the same reason, with an inter-token timeout instead of a grace.
async fn bug1_inter_token_timeout_fires_after_the_deferral_deadline_fired<R: ScenarioRuntime>(
    rt: R,
) {
    let itl = DEADLINE * 3;
    let h = Harness::with_config(rt, decode(DEADLINE, None).inter_token_timeout(Some(itl)));
    let (mut s, script, ctx) = h.start("r").await;
    ctx.stop();
    assert_eq!(h.drive_until_abort(&mut s, &script).await, vec![]);
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    let last = h.rt.now();
    let end = h.collect(&mut s).await;
    assert_eq!(end.len(), 1);
    assert_eq!(error_kind(&end[0]), Some(ErrorKind::InterTokenTimeout));
    assert_waited(&h.rt, h.rt.now() - last, itl);
    assert_eq!(h.observer.record("r").outcome, Outcome::TimedOut);
    h.assert_clean().await;
}

// Old code: "timed out after 5s waiting for generate" (the listener was registered only
// after the engine's `generate` returned).
async fn bug2_kill_interrupts_a_slow_setup<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let script = h.engine.script("r");
    script.hold_setup();
    let ctx = Context::new("r");
    let killer = ctx.clone();
    let mut generate = pin!(h.adapter.generate(h.request("r"), ctx));
    let first = poll_fn(|cx| Poll::Ready(generate.as_mut().poll(cx).is_ready())).await;
    assert!(!first, "setup is held");
    assert_eq!(script.generates(), 1, "the engine's generate was entered");
    killer.kill();
    let mut s = h
        .generate_from(generate)
        .await
        .expect("a killed setup is a stream that yields the terminal");
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert_eq!(h.observer.record("r").outcome, Outcome::Cancelled);
    h.wait_aborts(&script, 1).await;
    assert_eq!(h.engine.live_streams(), 0);
    h.assert_clean().await;
}

// Old code: "records of r: [] left: 0 right: 1" (nothing recorded, nothing aborted).
async fn bug2_dropping_generate_during_setup_records_dropped_and_aborts<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let script = h.engine.script("r");
    script.hold_setup();
    {
        let mut generate = pin!(h.adapter.generate(h.request("r"), Context::new("r")));
        let ready = poll_fn(|cx| Poll::Ready(generate.as_mut().poll(cx).is_ready())).await;
        assert!(!ready);
        // A caller's timeout or a client hanging up: the future goes away.
    }
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Dropped, AbortStatus::Sent)
    );
    h.wait_aborts(&script, 1).await;
    assert_eq!(h.observer.aborts("r"), 1);
    h.assert_clean().await;
}

// Old code: "records of r: [] left: 0 right: 1".
async fn bug2_decode_drop_during_setup_defers_the_abort_to_the_deadline<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(DEADLINE, None));
    let script = h.engine.script("r");
    script.hold_setup();
    let dropped = {
        let mut generate = pin!(h.adapter.generate(h.request("r"), Context::new("r")));
        let ready = poll_fn(|cx| Poll::Ready(generate.as_mut().poll(cx).is_ready())).await;
        assert!(!ready);
        h.rt.now()
    };
    assert_eq!(h.observer.record("r").abort, AbortStatus::Deferred);
    assert_eq!(h.observer.aborts("r"), 0);
    // The setup (a KV transfer) is kept alive and drained; the deadline releases it.
    h.wait_aborts(&script, 1).await;
    assert_waited(&h.rt, h.rt.now() - dropped, DEADLINE);
    h.assert_clean().await;
}

// Old code (with a `waiters()` that counts the old lists): "dropped futures left their
// wakers parked, left: 10000, right: 0" (core/src/context/tests.rs has the unit twin).
async fn bug3_dropped_context_futures_release_their_wakers<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    // A long-lived context, and many short waits on it that give up (a select! whose
    // other branch won, a request timeout): each parks a waker, then goes away.
    for i in 0..10_000 {
        let mut waiter = if i % 2 == 0 {
            ctx.stopped()
        } else {
            ctx.killed()
        };
        let parked = poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut waiter).poll(cx))).await;
        assert!(parked.is_pending());
        assert_eq!(ctx.waiters(), 1);
    }
    assert_eq!(
        ctx.waiters(),
        0,
        "every dropped future took its waker with it"
    );
    // One that stays parked is still woken by the stop.
    let mut kept = ctx.stopped();
    let parked = poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut kept).poll(cx))).await;
    assert!(parked.is_pending());
    assert_eq!(ctx.waiters(), 1);
    ctx.stop();
    assert_eq!(ctx.waiters(), 0);
    kept.await;
    h.wait_aborts(&script, 1).await;
    script.terminal(FinishReason::Cancelled);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    h.assert_clean().await;
}

// Old code: "timed out after 5s waiting for the engine abort" (0 aborts until the
// consumer's next poll).
async fn bug4_deferral_deadline_fires_while_the_consumer_stalls<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(DEADLINE, None));
    let (mut s, script, ctx) = h.start("r").await;
    assert_eq!(poll_once(&mut s).await, Poll::Pending);
    let killed = h.rt.now();
    ctx.kill();
    // The consumer does not poll (a full socket); the abort goes out on time anyway.
    h.wait_aborts(&script, 1).await;
    assert_waited(&h.rt, h.rt.now() - killed, DEADLINE);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    h.assert_clean().await;
}

// Old code: the state was still `Stop` after the grace (forced only at the next poll).
async fn bug4_cancel_grace_fires_while_the_consumer_stalls<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, AdapterConfig::default().cancel_grace(Some(DEADLINE)));
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    ctx.stop();
    h.wait_aborts(&script, 1).await;
    sleep(&h.rt, DEADLINE * 2).await;
    // Forced like a kill without a poll: the terminal waits for the consumer.
    assert_eq!(s.state().cancel(), Cancel::Kill);
    assert_eq!(s.state().pending_terminal(), Some(Synthesized::Cancelled));
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    h.assert_clean().await;
}

// Old code: the consumer got an inter-token timeout error instead of the chunk the engine
// had ready all along.
async fn bug4_a_stalled_consumer_never_times_the_engine_out<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(
        rt,
        AdapterConfig::default().inter_token_timeout(Some(DEADLINE)),
    );
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    script.tokens(&[2]);
    // The consumer is busy elsewhere for five limits' worth.
    sleep(&h.rt, DEADLINE * 5).await;
    assert_eq!(h.next(&mut s).await, Some(tokens(&[2])));
    script.terminal(FinishReason::Eos);
    assert_eq!(h.collect(&mut s).await, vec![terminal(FinishReason::Eos)]);
    assert_eq!(
        h.observer.record("r").outcome,
        Outcome::Finished(FinishReason::Eos)
    );
    h.assert_clean().await;
}

// Old code: "left: Discarded, right: Deferred" (kill then drop discarded the abort
// forever, while kill, poll, drop sent it).
async fn bug5_decode_kill_then_drop_still_owes_the_abort<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(HOUR, None));
    let (s, script, ctx) = h.start("r").await;
    ctx.kill();
    drop(s);
    assert_eq!(h.observer.record("r").abort, AbortStatus::Deferred);
    script.notify_first_token();
    h.wait_aborts(&script, 1).await;
    assert_eq!(h.observer.aborts("r"), 1);
    h.assert_clean().await;
}

// Old code: "left: 0, right: 1" (the stream was dropped at the synthesized terminal,
// which cancels an engine that cancels on drop, mid KV transfer).
async fn bug5_decode_kill_keeps_the_engine_stream_until_the_abort<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(DEADLINE, None));
    let (mut s, script, ctx) = h.start("r").await;
    ctx.kill();
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert_eq!(h.engine.live_streams(), 1);
    h.wait_aborts(&script, 1).await;
    h.engine.until(|e| e.live_streams() == 0).await;
    h.assert_clean().await;
}

// Old code: the panic unwound out of `generate().await` into the caller.
async fn bug6_panic_in_generate_is_a_typed_setup_error<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let script = h.engine.script("r");
    script.panic_in_setup("setup exploded");
    let err = h
        .generate(h.request("r"), Context::new("r"))
        .await
        .expect_err("a panicking setup is an error");
    assert!(err.message().contains("setup exploded"), "{err}");
    assert_eq!(h.observer.record("r").outcome, Outcome::Failed(err.kind()));
    assert_eq!(h.observer.aborts("r"), 0);
    h.assert_clean().await;
}

// Old code: the panic unwound out of the consumer's `poll_next`.
async fn bug6_panic_in_the_engine_streams_drop_is_contained<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.panic_on_drop("drop exploded");
    script.tokens(&[1]).terminal(FinishReason::Eos);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[1]), terminal(FinishReason::Eos)]
    );
    assert_eq!(h.engine.live_streams(), 0);
    h.assert_clean().await;
}

// Old tokio: the grace ran from the wall clock read on the foreign thread, an hour
// before the paused clock, so it fired at once ("left: 0ns, right: 60ms").
async fn bug7_stop_from_a_foreign_thread_counts_the_grace_on_the_runtime_clock<
    R: ScenarioRuntime,
>(
    rt: R,
) {
    let grace = DEADLINE * 3;
    let h = Harness::with_config(rt, AdapterConfig::default().cancel_grace(Some(grace)));
    // Move the paused clock away from the wall clock (a no-op wait on smol).
    if h.rt.exact_clock() {
        sleep(&h.rt, HOUR).await;
    }
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    let stopped = h.rt.now();
    std::thread::spawn(move || ctx.stop())
        .join()
        .expect("stop from a foreign thread");
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert_waited(&h.rt, h.rt.now() - stopped, grace);
    h.assert_clean().await;
}
