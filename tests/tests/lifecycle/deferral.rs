//! Decode mode (rule 2): an abort before the first token is deferred until the token,
//! the hint or the deferral deadline, and discarded when the engine ends first.

use std::task::Poll;
use tether_core::AbortStatus;

use tether_core::lifecycle::Abort;
use tether_core::{FinishReason, Outcome};
use tether_tests::{guarded, poll_once, sleep, Harness, ScenarioRuntime, DEADLINE};

use crate::{decode, terminal, tokens, HOUR};

pub(crate) async fn decode_stop_before_first_token_defers_abort_until_token<R: ScenarioRuntime>(
    rt: R,
) {
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

pub(crate) async fn decode_stop_before_first_token_defers_abort_until_hint<R: ScenarioRuntime>(
    rt: R,
) {
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

pub(crate) async fn decode_stop_before_first_token_defers_abort_until_in_stream_hint<
    R: ScenarioRuntime,
>(
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

pub(crate) async fn decode_stop_before_first_token_aborts_at_deferral_deadline<
    R: ScenarioRuntime,
>(
    rt: R,
) {
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

pub(crate) async fn decode_kill_before_first_token_cancels_now_and_aborts_on_hint<
    R: ScenarioRuntime,
>(
    rt: R,
) {
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

pub(crate) async fn decode_kill_before_first_token_aborts_at_deadline_after_stream_ended<
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

pub(crate) async fn decode_engine_terminal_discards_deferred_abort<R: ScenarioRuntime>(rt: R) {
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

/// A deferral's watchdog ends when its request does. A decode-mode stop before the
/// first token defers the abort and starts the watchdog (the deferral and the grace,
/// both an hour here); the first token releases the abort, and the watchdog then waits
/// on the grace alone. The engine's own terminal ends the request: the consumer's end
/// wakes the watchdog, which retires with no time passing.
pub(crate) async fn a_deferrals_watchdog_ends_with_its_request<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, decode(HOUR).cancel_grace(Some(HOUR)));
    let (mut s, script, ctx) = h.start("r").await;
    ctx.stop();
    assert_eq!(
        (h.counting.spawned(), h.counting.live()),
        (1, 1),
        "the watchdog, spawned by the stop that deferred the abort"
    );
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    h.wait_aborts(&script, 1).await;
    script.terminal(FinishReason::Length);
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Length)]
    );
    let before = h.rt.now();
    guarded(
        &h.rt,
        "the watchdog to end",
        h.counting.until_live_at_most(h.adapter.background_tasks()),
    )
    .await;
    // On the paused clock, a watchdog left asleep would have waited out the hour.
    if h.rt.exact_clock() {
        assert_eq!(h.rt.now(), before);
    }
    assert_eq!(h.observer.record("r").abort, AbortStatus::Sent);
    assert_eq!((h.counting.spawned(), script.aborts()), (2, 1));
    h.assert_clean().await;
}

pub(crate) async fn decode_drop_before_first_token_aborts_at_the_deadline<R: ScenarioRuntime>(
    rt: R,
) {
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

pub(crate) async fn decode_drop_before_first_token_aborts_at_the_drained_first_token<
    R: ScenarioRuntime,
>(
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

pub(crate) async fn decode_drop_then_engine_end_discards_the_abort<R: ScenarioRuntime>(rt: R) {
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

pub(crate) async fn decode_stop_then_drop_before_first_token_aborts_at_the_deadline<
    R: ScenarioRuntime,
>(
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
