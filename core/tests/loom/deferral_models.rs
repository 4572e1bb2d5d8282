//! Decode-mode models: the deferred abort, released by the first-token hint (in or out
//! of the stream, or drained by the watchdog) or by the deferral deadline, raced by
//! drops and stops, also on the pure `SharedState` with the oracle; and the hint racing the
//! request's teardown.

use std::sync::atomic::Ordering::SeqCst;

use loom::thread;
use tether_core::lifecycle::oracle::Oracle;
use tether_core::lifecycle::{step, Actions, Event, SharedState, State};
use tether_core::sync::Arc;
use tether_core::{Chunk, FinishReason, Mode, Outcome};

use crate::rig::{collect, one_terminal_last, poll_once, reason, Rig};
use crate::{model, std_lock, Seen, StdArc, DEFERRAL};

/// Decode mode, before the first token: the consumer drops the stream while the
/// engine sends its first-token hint, with and without a stop before. A drop that wins
/// keeps the abort deferred (the engine may be mid KV transfer, and the work must not
/// leak) and the hint then releases it; a hint that wins makes the drop (or the stop)
/// abort at once. Either way exactly one abort, never before the hint.
#[test]
fn drop_races_first_token_hint() {
    for stop_first in [false, true] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let rig = Rig::new(Mode::Decode, None);
            let (mut stream, gctx) = rig.start();
            if stop_first {
                rig.ctx.stop();
                assert_eq!(rig.aborts(), 0, "rule 2: deferred");
            }
            assert!(poll_once(&mut stream).is_pending());
            let log = rig.log.clone();
            let hinter = thread::spawn(move || {
                log.hinted.store(true, SeqCst);
                gctx.notify_first_token();
            });
            let dropper = thread::spawn(move || drop(stream));
            hinter.join().unwrap();
            dropper.join().unwrap();
            let record = rig.record();
            assert_eq!(record.outcome, Outcome::Dropped);
            assert_eq!(rig.aborts(), 1, "rule 4: the dropped request is aborted");
            reached.saw(format!("recorded {:?}", record.abort));
            rig.shutdown();
        });
        seen.expect(&["recorded Deferred", "recorded Sent"]);
    }
}

/// Decode mode: a stop (deferred: no first token yet) races the engine's hint. Either
/// order ends in exactly one abort, after the hint; the engine answers the abort with
/// its terminal, which wakes the parked consumer. A lost abort or wake-up deadlocks.
#[test]
fn first_token_hint_races_deferred_stop() {
    model(|| {
        let rig = Rig::new(Mode::Decode, Some(Chunk::terminal(FinishReason::Cancelled)));
        let (mut stream, gctx) = rig.start();
        let ctx = rig.ctx.clone();
        let stopper = thread::spawn(move || ctx.stop());
        let log = rig.log.clone();
        let hinter = thread::spawn(move || {
            log.hinted.store(true, SeqCst);
            gctx.notify_first_token();
        });
        let items = collect(&mut stream);
        stopper.join().unwrap();
        hinter.join().unwrap();
        let last = one_terminal_last(&items);
        assert_eq!(reason(last), Some(FinishReason::Cancelled));
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        drop(stream);
        rig.shutdown();
    });
}

/// Decode mode, stopped before the first token: the deferral deadline (the watchdog's
/// timer, fired by another thread moving the clock, which then runs the watchdog as an
/// executor would) races the first-token hint. The consumer never polls for it. One
/// abort, after one of them; the parked consumer is woken by whichever wins.
/// Then the same race inside one decision, on the pure `SharedState`: the deadline, the hint
/// and a first chunk applied from three threads release the abort exactly once, and
/// the outcome is linearizable and passes the oracle.
#[test]
fn deferral_deadline_races_first_token() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Decode, Some(Chunk::terminal(FinishReason::Cancelled)));
        let (mut stream, gctx) = rig.start();
        // Arms the deferral deadline at t0 + 30 s, on the watchdog.
        rig.ctx.stop();
        assert!(poll_once(&mut stream).is_pending());
        assert_eq!(rig.aborts(), 0, "rule 2: deferred");
        let (rt, log) = (rig.rt.clone(), rig.log.clone());
        let clock = thread::spawn(move || {
            log.deadline_passed.store(true, SeqCst);
            rt.advance(DEFERRAL);
            rt.run_pending();
        });
        let log = rig.log.clone();
        let hinter = thread::spawn(move || {
            log.hinted.store(true, SeqCst);
            gctx.notify_first_token();
        });
        let items = collect(&mut stream);
        clock.join().unwrap();
        hinter.join().unwrap();
        one_terminal_last(&items);
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        match *std_lock(&rig.log.evidence) {
            Some((true, false)) => reached.saw("hint released"),
            Some((false, true)) => reached.saw("deadline released"),
            _ => {}
        }
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["hint released", "deadline released"]);

    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let cell = Arc::new(SharedState::new(State::new(Mode::Decode)));
        let (after_stop, stop_acts) = cell.apply(Event::Stop);
        assert!(after_stop.abort_deferred() && !stop_acts.abort);
        let racers = [Event::DeferralDeadline, Event::FirstTokenHint];
        let handles: Vec<_> = racers
            .into_iter()
            .map(|event| {
                let cell = cell.clone();
                thread::spawn(move || {
                    let (state, acts) = cell.apply(event);
                    (event, state, acts)
                })
            })
            .collect();
        let (state, acts) = cell.apply(Event::Chunk);
        let mut applied = vec![(Event::Chunk, state, acts)];
        applied.extend(handles.into_iter().map(|h| h.join().unwrap()));
        let aborts = applied.iter().filter(|(_, _, a)| a.abort).count();
        assert_eq!(aborts, 1, "rule 1/2: one release: {applied:?}");
        check_linearizable(
            Mode::Decode,
            &[(Event::Stop, after_stop, stop_acts)],
            &applied,
        );
        for (event, _, acts) in &applied {
            if acts.abort {
                reached.saw(format!("{event:?}"));
            }
        }
    });
    seen.expect(&["DeferralDeadline", "FirstTokenHint", "Chunk"]);
}

/// Some order of the racing applications replays through `step` to exactly what each
/// actor got, and that order passes the oracle.
fn check_linearizable(
    mode: Mode,
    prefix: &[(Event, State, Actions)],
    applied: &[(Event, State, Actions)],
) {
    let mut start = State::new(mode);
    let mut oracle = Oracle::new(mode);
    for &(event, state, acts) in prefix {
        oracle.observe(event, acts, state).unwrap();
        start = state;
    }
    let n = applied.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut found = false;
    permute(&mut order, 0, &mut |order| {
        let mut state = start;
        let mut o = oracle.clone();
        for &i in order {
            let (event, got_state, got_acts) = applied[i];
            let (next, acts) = step(state, event);
            if (next, acts) != (got_state, got_acts) {
                // A no-op application reads the state without writing it: it may have
                // happened anywhere the state matched, which this order does not show.
                return;
            }
            if let Err(v) = o.observe(event, acts, next) {
                panic!("oracle: {v} in {order:?} of {applied:?}");
            }
            state = next;
        }
        found = true;
    });
    assert!(found, "not linearizable: {applied:?}");
}

fn permute(items: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
    if k == items.len() {
        f(items);
        return;
    }
    for i in k..items.len() {
        items.swap(k, i);
        permute(items, k + 1, f);
        items.swap(k, i);
    }
}

/// Decode mode, killed before the first token: the consumer takes its `Cancelled` and
/// is gone, the abort is still owed and the watchdog drains the engine. The engine's
/// first token (pushed on one thread) races the deferral deadline (the clock moved on
/// another); each thread then lets the executor run the watchdog. Exactly one abort,
/// released by the token or by the deadline, and the engine stream is let go after it.
#[test]
fn deferral_deadline_races_drained_first_token() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Decode, None);
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        rig.ctx.kill();
        let items = collect(&mut stream);
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(rig.aborts(), 0, "rule 2: deferred past the consumer's end");
        drop(stream);
        // Each thread then runs the executor's turn for the watchdog it woke.
        let (chan, log, rt) = (rig.chan.clone(), rig.log.clone(), rig.rt.clone());
        let engine = thread::spawn(move || {
            log.hinted.store(true, SeqCst);
            chan.push(Ok(Chunk::tokens(vec![1])), false);
            rt.run_pending();
        });
        let (rt, log) = (rig.rt.clone(), rig.log.clone());
        let clock = thread::spawn(move || {
            log.deadline_passed.store(true, SeqCst);
            rt.advance(DEFERRAL);
            rt.run_pending();
        });
        engine.join().unwrap();
        clock.join().unwrap();
        // A turn that found the watchdog busy on the other thread did nothing; this
        // last turn must find nothing left to do.
        rig.rt.run_pending();
        assert_eq!(rig.aborts(), 1, "rule 2: released once");
        assert_eq!(
            std_lock(&rig.rt.0.pending).len(),
            rig.adapter.background_tasks(),
            "the watchdog ended once the abort was sent (the abort task stays parked)"
        );
        assert_eq!(rig.adapter.background_tasks(), 1);
        match *std_lock(&rig.log.evidence) {
            Some((true, false)) => reached.saw("token released"),
            Some((false, true)) => reached.saw("deadline released"),
            Some((true, true)) => reached.saw("both passed"),
            _ => {}
        }
        rig.shutdown();
    });
    seen.expect(&["token released", "deadline released"]);
}

/// The engine's first-token hint (through the `GenerateContext`'s weak handle on the
/// request) races the consumer dropping a finished stream: the hint upgrades a request
/// that is being torn down, or fails to upgrade one that is gone (the loom model of
/// `Weak` explores the failed upgrade). Either way nothing is aborted, nothing panics,
/// and the one record stands.
#[test]
fn first_token_hint_races_request_teardown() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        rig.chan
            .push(Ok(Chunk::terminal(FinishReason::Length)), true);
        let items = collect(&mut stream);
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Length)
        );
        let dropped = StdArc::new(loom::sync::atomic::AtomicBool::new(false));
        let flag = dropped.clone();
        let dropper = thread::spawn(move || {
            drop(stream);
            flag.store(true, SeqCst);
        });
        let hinter = thread::spawn(move || {
            let late = dropped.load(SeqCst);
            gctx.notify_first_token();
            drop(gctx);
            late
        });
        dropper.join().unwrap();
        let hinted_after_drop = hinter.join().unwrap();
        assert_eq!(rig.aborts(), 0, "rule 1: nothing after the terminal");
        assert_eq!(
            rig.record().outcome,
            Outcome::Finished(FinishReason::Length)
        );
        reached.saw(if hinted_after_drop { "late" } else { "early" });
        rig.shutdown();
    });
    seen.expect(&["early", "late"]);
}
