//! The plain path (chunks forwarded, the terminal last and counted, no task or timer
//! unless one is needed) and token-less chunks (rule 3).

use std::task::Poll;
use std::time::Duration;
use tether_core::AbortStatus;

use tether_core::lifecycle::{Abort, Phase};
use tether_core::{AdapterConfig, Chunk, FinishReason, Outcome, Usage};
use tether_tests::{data, poll_once, Harness, ScenarioRuntime};

use crate::{decode, terminal, tokens, HOUR};

pub(crate) async fn happy_path_forwards_chunks_then_terminal_without_spawns_or_timers<
    R: ScenarioRuntime,
>(
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

pub(crate) async fn timeouts_create_a_timer_only_when_the_consumer_waits<R: ScenarioRuntime>(
    rt: R,
) {
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

pub(crate) async fn terminal_chunk_with_tokens_is_forwarded_and_counted<R: ScenarioRuntime>(rt: R) {
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

pub(crate) async fn tokenless_chunks_are_not_the_first_token<R: ScenarioRuntime>(rt: R) {
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
