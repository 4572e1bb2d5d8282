//! Rules 6 to 9 of SPEC.md section 4 on both runtimes: exactly one terminal however the
//! engine fails (ends early, errors, panics, fails setup, hangs past a timeout or a
//! cancel grace), nothing after a terminal, exactly one record per request; plus the
//! probe adapter and the `ResponseStream` bounds.

use std::future::IntoFuture;
use std::task::Poll;
use tether_core::{AbortStatus, Request};

use tether_core::drive::ProbeAdapter;
use tether_core::{
    AdapterConfig, Annotated, BackendError, Chunk, EngineError, ErrorKind, FinishReason, Outcome,
    ResponseStream,
};
use tether_tests::{
    data, error_kind, guarded, on_both_runtimes, poll_once, Harness, ScenarioRuntime, DEADLINE,
};

fn tokens(t: &[u32]) -> Annotated<Chunk> {
    data(Chunk::tokens(t.to_vec()))
}

fn terminal(reason: FinishReason) -> Annotated<Chunk> {
    data(Chunk::terminal(reason))
}

on_both_runtimes!(
    engine_end_without_terminal_yields_stream_incomplete,
    engine_error_mid_stream_is_forwarded_and_ends_stream,
    engine_panic_becomes_error_item_and_consumer_keeps_working,
    setup_error_is_returned_without_abort_and_recorded_failed,
    first_token_timeout_yields_error_and_aborts_once,
    tokenless_chunk_does_not_meet_first_token_timeout,
    inter_token_timeout_yields_error_and_aborts_once,
    cancel_grace_expiry_after_stop_forces_cancelled,
    cancel_grace_expires_while_the_engines_abort_never_returns,
    cancel_grace_expires_after_the_engines_abort_panicked,
    graces_of_several_requests_each_expire_at_their_own_deadline,
    nothing_is_yielded_after_terminal,
    one_record_per_request_across_mixed_batch,
    probe_reports_unhealthy_on_error_finish_reason,
);

async fn engine_end_without_terminal_yields_stream_incomplete<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1]).close();
    assert_eq!(
        h.collect(&mut s).await,
        vec![
            tokens(&[1]),
            Annotated::from_error(EngineError::stream_incomplete())
        ]
    );
    let rec = h.observer.record("r");
    assert_eq!(
        rec.outcome,
        Outcome::Failed(ErrorKind::Backend(BackendError::StreamIncomplete))
    );
    assert_eq!((rec.output_tokens, rec.abort), (1, AbortStatus::NotNeeded));
    assert_eq!(h.observer.aborts("r"), 0);
    assert_eq!(h.counting.spawned(), 0);
    h.assert_clean().await;
}

async fn engine_error_mid_stream_is_forwarded_and_ends_stream<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    let err = EngineError::new(
        ErrorKind::Backend(BackendError::EngineShutdown),
        "engine is shutting down",
    );
    script
        .tokens(&[1])
        .error(err.clone())
        .tokens(&[2])
        .terminal(FinishReason::Eos);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[1]), Annotated::from_error(err)]
    );
    assert_eq!(poll_once(&mut s).await, Poll::Ready(None));
    assert_eq!(script.queued(), 2, "nothing is polled after the error");
    assert_eq!(h.engine.live_streams(), 0);
    let rec = h.observer.record("r");
    assert_eq!(
        rec.outcome,
        Outcome::Failed(ErrorKind::Backend(BackendError::EngineShutdown))
    );
    assert_eq!(rec.abort, AbortStatus::NotNeeded);
    assert_eq!(h.observer.aborts("r"), 0);
    h.assert_clean().await;
}

async fn engine_panic_becomes_error_item_and_consumer_keeps_working<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]).panic("boom").tokens(&[2]);
    assert_eq!(
        h.collect(&mut s).await,
        vec![
            tokens(&[1]),
            Annotated::from_error(EngineError::engine_panicked("boom"))
        ]
    );
    assert_eq!(poll_once(&mut s).await, Poll::Ready(None));
    let rec = h.observer.record("r");
    assert_eq!(
        rec.outcome,
        Outcome::Failed(ErrorKind::Backend(BackendError::Unknown))
    );
    assert_eq!(rec.abort, AbortStatus::NotNeeded);
    // The panicked engine stream is released, never polled again, never aborted.
    assert_eq!(h.engine.live_streams(), 0);
    ctx.kill();
    assert_eq!(h.observer.aborts("r"), 0);
    // The consumer (this task) goes on: the next request works.
    let (mut s2, script2, _ctx2) = h.start("r2").await;
    script2.tokens(&[3]).terminal(FinishReason::Eos);
    assert_eq!(
        h.collect(&mut s2).await,
        vec![tokens(&[3]), terminal(FinishReason::Eos)]
    );
    h.assert_clean().await;
}

async fn setup_error_is_returned_without_abort_and_recorded_failed<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let err = EngineError::invalid_argument("prompt too long");
    let script = h.engine.script("r");
    script.fail_setup(err.clone());
    let ctx = tether_core::Context::new("r");
    let got = h.generate(h.request("r"), ctx.clone()).await;
    assert_eq!(got.err(), Some(err));
    assert_eq!(script.generates(), 1);
    // Nothing is left listening on the context: a later kill aborts nothing.
    ctx.kill();
    assert_eq!(h.observer.aborts("r"), 0);
    assert_eq!(h.counting.spawned(), 0);
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Failed(ErrorKind::InvalidArgument));
    assert_eq!(
        (rec.ttft, rec.output_tokens, rec.abort),
        (None, 0, AbortStatus::NotNeeded)
    );
    h.assert_clean().await;
}

async fn first_token_timeout_yields_error_and_aborts_once<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(
        rt,
        AdapterConfig::default().first_token_timeout(Some(DEADLINE)),
    );
    let before = h.rt.now();
    let (mut s, script, _ctx) = h.start("r").await;
    let item = h.next(&mut s).await.expect("an item");
    assert_eq!(
        item,
        Annotated::from_error(EngineError::first_token_timeout(DEADLINE))
    );
    assert_eq!(error_kind(&item), Some(ErrorKind::FirstTokenTimeout));
    let waited = h.rt.now() - before;
    if h.rt.exact_clock() {
        assert_eq!(waited, DEADLINE);
    } else {
        assert!(waited >= DEADLINE, "fired after {waited:?}");
    }
    assert_eq!(h.next(&mut s).await, None);
    // A token that comes too late goes nowhere.
    script.tokens(&[1]);
    assert_eq!(poll_once(&mut s).await, Poll::Ready(None));
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::TimedOut, AbortStatus::Sent)
    );
    assert_eq!((rec.ttft, rec.output_tokens), (None, 0));
    h.wait_aborts(&script, 1).await;
    assert_eq!((h.counting.spawned(), h.counting.timers()), (1, 1));
    h.assert_clean().await;
}

async fn tokenless_chunk_does_not_meet_first_token_timeout<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(
        rt,
        AdapterConfig::default().first_token_timeout(Some(DEADLINE)),
    );
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[]);
    assert_eq!(
        h.collect(&mut s).await,
        vec![
            tokens(&[]),
            Annotated::from_error(EngineError::first_token_timeout(DEADLINE))
        ]
    );
    let rec = h.observer.record("r");
    assert_eq!((rec.outcome, rec.ttft), (Outcome::TimedOut, None));
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

async fn inter_token_timeout_yields_error_and_aborts_once<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(
        rt,
        AdapterConfig::default().inter_token_timeout(Some(DEADLINE)),
    );
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1]);
    // Read before the token is forwarded, so `waited` never undercounts on a real clock.
    let last_token = h.rt.now();
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    let item = h.next(&mut s).await.expect("an item");
    assert_eq!(
        item,
        Annotated::from_error(EngineError::inter_token_timeout(DEADLINE))
    );
    let waited = h.rt.now() - last_token;
    if h.rt.exact_clock() {
        assert_eq!(waited, DEADLINE);
    } else {
        assert!(waited >= DEADLINE, "fired after {waited:?}");
    }
    assert_eq!(h.next(&mut s).await, None);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::TimedOut, AbortStatus::Sent)
    );
    assert_eq!(rec.output_tokens, 1);
    assert!(rec.ttft.is_some());
    h.wait_aborts(&script, 1).await;
    assert_eq!((h.counting.spawned(), h.counting.timers()), (1, 1));
    h.assert_clean().await;
}

async fn cancel_grace_expiry_after_stop_forces_cancelled<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, AdapterConfig::default().cancel_grace(Some(DEADLINE)));
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    stop_and_wait_out_the_grace(&h, &mut s, &script, &ctx).await;
    assert_eq!(h.observer.aborts("r"), 1);
    // One task and one timer: the adapter's abort task runs the grace off the
    // consumer's path (rule 11), on its own timer, once it entered the engine's abort.
    assert_eq!(h.counting.spawned(), 1);
    assert_eq!(h.counting.timers(), 1);
    h.assert_clean().await;
}

/// Read the first token, stop, and see the engine (which ignores the abort and goes
/// silent) cut off exactly when the grace runs out, counted from the stop itself, not
/// from the consumer's next poll: the synthesized `Cancelled`, recorded with the abort
/// sent.
async fn stop_and_wait_out_the_grace<R: ScenarioRuntime>(
    h: &Harness<R>,
    s: &mut ResponseStream,
    script: &tether_tests::Script,
    ctx: &tether_core::Context,
) {
    assert_eq!(h.next(s).await, Some(tokens(&[1])));
    let stopped = h.rt.now();
    ctx.stop();
    h.wait_aborts(script, 1).await;
    assert_eq!(h.collect(s).await, vec![terminal(FinishReason::Cancelled)]);
    let waited = h.rt.now() - stopped;
    if h.rt.exact_clock() {
        assert_eq!(waited, DEADLINE);
    } else {
        assert!(waited >= DEADLINE, "forced after {waited:?}");
    }
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Cancelled, AbortStatus::Sent)
    );
}

/// An abort stuck in the engine moves from the adapter's abort task to a task of its
/// own: it must not hold the grace back (the abort task times it).
async fn cancel_grace_expires_while_the_engines_abort_never_returns<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, AdapterConfig::default().cancel_grace(Some(DEADLINE)));
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]).hold_abort();
    stop_and_wait_out_the_grace(&h, &mut s, &script, &ctx).await;
    // The abort task, and the stuck abort's own task, still in the engine's abort: it
    // ends once the engine lets go.
    assert_eq!(h.counting.spawned(), 2);
    assert_eq!(h.counting.live(), 2);
    script.release_abort();
    h.assert_clean().await;
    assert_eq!(script.aborts(), 1);
}

/// An engine's abort that panics is dropped (a warning, see the logs tests); the
/// adapter's abort task survives it and still times the grace.
async fn cancel_grace_expires_after_the_engines_abort_panicked<R: ScenarioRuntime>(rt: R) {
    let h = Harness::with_config(rt, AdapterConfig::default().cancel_grace(Some(DEADLINE)));
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]).panic_in_abort("abort boom");
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    ctx.stop();
    h.wait_aborts(&script, 1).await;
    assert_eq!(
        h.collect(&mut s).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    assert_eq!(h.observer.record("r").outcome, Outcome::Cancelled);
    // The abort task, which timed the grace on its timer.
    assert_eq!((h.counting.spawned(), h.counting.timers()), (1, 1));
    h.assert_clean().await;
    assert_eq!(script.aborts(), 1);
}

/// Two stopped requests whose graces the adapter's abort task times on its one timer:
/// `a` under the adapter's long grace, then `b` under a short one of its own (a later
/// deadline queued first, an earlier one after it). Each is forced exactly when its own
/// grace runs out, counted from its own stop.
async fn graces_of_several_requests_each_expire_at_their_own_deadline<R: ScenarioRuntime>(rt: R) {
    let long = 10 * DEADLINE;
    let h = Harness::with_config(rt, AdapterConfig::default().cancel_grace(Some(long)));
    let (mut a, script_a, ctx_a) = h.start("a").await;
    let ctx_b = tether_core::Context::new("b");
    let generate = h
        .adapter
        .request(h.request("b"))
        .cancel_grace(Some(DEADLINE))
        .context(ctx_b.clone());
    let mut b = h
        .generate_from(generate.into_future())
        .await
        .expect("generate succeeds");
    let script_b = h.engine.script("b");
    let stopped = h.rt.now();
    ctx_a.stop();
    h.wait_aborts(&script_a, 1).await;
    ctx_b.stop();
    h.wait_aborts(&script_b, 1).await;
    let b_from = h.rt.now();
    assert_eq!(
        h.collect(&mut b).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let b_waited = h.rt.now() - b_from;
    assert_eq!(
        h.collect(&mut a).await,
        vec![terminal(FinishReason::Cancelled)]
    );
    let a_waited = h.rt.now() - stopped;
    if h.rt.exact_clock() {
        assert_eq!((b_waited, a_waited), (DEADLINE, long));
    } else {
        assert!(
            b_waited >= DEADLINE && a_waited >= long,
            "{b_waited:?} {a_waited:?}"
        );
    }
    for id in ["a", "b"] {
        let rec = h.observer.record(id);
        assert_eq!(
            (rec.outcome, rec.abort),
            (Outcome::Cancelled, AbortStatus::Sent)
        );
    }
    // One task, one timer (re-armed for each grace).
    assert_eq!((h.counting.spawned(), h.counting.timers()), (1, 1));
    h.assert_clean().await;
}

async fn nothing_is_yielded_after_terminal<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script
        .tokens(&[1])
        .terminal(FinishReason::Eos)
        .tokens(&[2])
        .terminal(FinishReason::Length)
        .close();
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[1]), terminal(FinishReason::Eos)]
    );
    for _ in 0..3 {
        assert_eq!(poll_once(&mut s).await, Poll::Ready(None));
    }
    ctx.kill();
    assert_eq!(poll_once(&mut s).await, Poll::Ready(None));
    assert_eq!(script.queued(), 3);
    assert_eq!(h.observer.aborts("r"), 0);
    h.assert_clean().await;
}

/// What the mixed batch does to request `i`.
fn batch_kind(i: usize) -> usize {
    i % 10
}

async fn one_record_per_request_across_mixed_batch<R: ScenarioRuntime>(rt: R) {
    const N: usize = 50;
    let h = Harness::new(rt);
    let shutdown = EngineError::new(ErrorKind::Backend(BackendError::EngineShutdown), "bye");
    let mut streams = Vec::new();
    for i in 0..N {
        let id = format!("b{i}");
        let script = h.engine.script(&id);
        if batch_kind(i) == 7 {
            script.fail_setup(EngineError::invalid_argument("bad"));
        }
        let ctx = tether_core::Context::new(id.clone());
        let stream = h.generate(h.request(&id), ctx.clone()).await.ok();
        assert_eq!(stream.is_none(), batch_kind(i) == 7);
        script.tokens(&[u32::try_from(i).expect("small")]);
        streams.push((stream, script, ctx));
    }
    // Everyone gets a first token, interleaved.
    for (stream, script, _) in &mut streams {
        if let Some(s) = stream {
            let first = h.next(s).await.expect("first token");
            assert_eq!(
                first.data.expect("data").token_ids.len(),
                1,
                "{}",
                script.id()
            );
        }
    }
    for (i, (stream, script, ctx)) in streams.iter_mut().enumerate() {
        match batch_kind(i) {
            0 => drop(script.terminal(FinishReason::Eos)),
            1 | 8 => ctx.stop(),
            2 => ctx.kill(),
            3 => *stream = None,
            4 => drop(script.error(shutdown.clone())),
            5 => drop(script.close()),
            6 => drop(script.panic("batch panic")),
            9 => drop(script.tokens(&[1, 2]).terminal(FinishReason::Length)),
            _ => {}
        }
    }
    for (i, (_, script, _)) in streams.iter().enumerate() {
        match batch_kind(i) {
            1 => {
                h.wait_aborts(script, 1).await;
                script.tokens(&[9]).terminal(FinishReason::Cancelled);
            }
            8 => {
                h.wait_aborts(script, 1).await;
                script.close();
            }
            _ => {}
        }
    }
    for (i, (stream, script, _)) in streams.iter_mut().enumerate() {
        let Some(s) = stream else { continue };
        let items = h.collect(s).await;
        let terminals = items.iter().filter(|it| it.is_terminal()).count();
        assert_eq!(terminals, 1, "{}: {items:?}", script.id());
        assert!(items.last().is_some_and(Annotated::is_terminal));
        let expect_last = match batch_kind(i) {
            0 => terminal(FinishReason::Eos),
            1 | 2 | 8 => terminal(FinishReason::Cancelled),
            4 => Annotated::from_error(shutdown.clone()),
            5 => Annotated::from_error(EngineError::stream_incomplete()),
            6 => Annotated::from_error(EngineError::engine_panicked("batch panic")),
            9 => terminal(FinishReason::Length),
            k => unreachable!("kind {k} has no stream"),
        };
        assert_eq!(items.last(), Some(&expect_last), "{}", script.id());
    }
    drop(streams);
    let records = h.observer.records();
    assert_eq!(records.len(), N);
    for i in 0..N {
        let id = format!("b{i}");
        let (outcome, aborts) = match batch_kind(i) {
            0 => (Outcome::Finished(FinishReason::Eos), 0),
            1 | 2 | 8 => (Outcome::Cancelled, 1),
            3 => (Outcome::Dropped, 1),
            4 => (
                Outcome::Failed(ErrorKind::Backend(BackendError::EngineShutdown)),
                0,
            ),
            5 => (
                Outcome::Failed(ErrorKind::Backend(BackendError::StreamIncomplete)),
                0,
            ),
            6 => (
                Outcome::Failed(ErrorKind::Backend(BackendError::Unknown)),
                0,
            ),
            7 => (Outcome::Failed(ErrorKind::InvalidArgument), 0),
            _ => (Outcome::Finished(FinishReason::Length), 0),
        };
        assert_eq!(h.observer.record(&id).outcome, outcome, "{id}");
        assert_eq!(h.observer.aborts(&id), aborts, "{id}");
    }
    assert_eq!(h.observer.total_aborts(), 20);
    h.assert_clean().await;
}

async fn probe_reports_unhealthy_on_error_finish_reason<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let probe = ProbeAdapter::new(h.adapter.clone());
    h.engine
        .script("sick")
        .tokens(&[1])
        .terminal(FinishReason::Error("out of memory".to_owned()));
    let items = guarded(
        &h.rt,
        "probe",
        probe.probe(Request::new("sick", "m", Vec::new())),
    )
    .await
    .expect("probe runs");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0], tokens(&[1]));
    assert!(items[1].is_error(), "{:?}", items[1]);
    assert_eq!(
        items[1].error.as_ref().map(EngineError::message),
        Some("out of memory")
    );
    assert!(!ProbeAdapter::is_healthy(&items));

    h.engine
        .script("well")
        .tokens(&[1])
        .terminal(FinishReason::Eos);
    let items = guarded(
        &h.rt,
        "probe",
        probe.probe(Request::new("well", "m", Vec::new())),
    )
    .await
    .expect("probe runs");
    assert_eq!(items, vec![tokens(&[1]), terminal(FinishReason::Eos)]);
    assert!(ProbeAdapter::is_healthy(&items));

    h.engine.script("mute").close();
    let items = guarded(
        &h.rt,
        "probe",
        probe.probe(Request::new("mute", "m", Vec::new())),
    )
    .await
    .expect("probe runs");
    assert!(!ProbeAdapter::is_healthy(&items));
    h.assert_clean().await;
}

#[test]
fn response_stream_is_send_and_static() {
    fn send_static<T: Send + 'static>() {}
    fn send_sync_static<T: Send + Sync + 'static>() {}
    send_static::<ResponseStream>();
    send_sync_static::<tether_core::Adapter>();
    // It can be moved to a task of either runtime.
    let _ = |s: ResponseStream| {
        drop(tokio::spawn(async move { drop(s) }));
    };
    let _ = |s: ResponseStream| smol::spawn(async move { drop(s) }).detach();
}
