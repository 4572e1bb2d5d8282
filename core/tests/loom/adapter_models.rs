//! Models of the adapter's enders racing each other: stop, kill, kill-on-drop and early
//! finish against the engine's final chunk, the consumer's drop and each other; every
//! ender at once; and a kill racing a slow setup.

use std::sync::atomic::Ordering::SeqCst;
use std::task::Poll;
use std::time::Duration;
use tether_core::AbortStatus;

use loom::future::block_on;
use loom::thread;
use tether_core::context::Signal;
use tether_core::lifecycle::Abort;
use tether_core::{
    Cause, Chunk, Context, EngineError, ErrorKind, FinishReason, Mode, Outcome, Request,
};

use crate::rig::{collect, one_terminal_last, poll_once, reason, Gate, Rig};
use crate::{model, std_lock, Seen, StdArc, StdMutex};

/// A stop lands while the engine's worker pushes its final chunk. Whichever wins, the
/// engine's own terminal reaches the consumer (stop is graceful), the abort is sent
/// only if the stop was decided before that terminal was seen, and the parked
/// consumer is woken by the worker.
#[test]
fn stop_races_final_chunk() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let stream = race_stop_with_final_chunk(&rig);
        assert_eq!(
            rig.aborts(),
            usize::from(stream.state().abort() == Abort::Sent)
        );
        reached.saw(format!("aborts={}", rig.aborts()));
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["aborts=0", "aborts=1"]);
}

/// The race of [`stop_races_final_chunk`] on `rig`: the engine's own terminal reaches
/// the consumer either way, and the request is recorded finished. Returns the stream.
fn race_stop_with_final_chunk(rig: &Rig) -> tether_core::ResponseStream {
    let (mut stream, gctx) = rig.start();
    drop(gctx);
    rig.chan.push(Ok(Chunk::tokens(vec![7])), false);
    let chan = rig.chan.clone();
    let worker = thread::spawn(move || {
        chan.push(Ok(Chunk::terminal(FinishReason::Length)), true);
    });
    let ctx = rig.ctx.clone();
    let stopper = thread::spawn(move || ctx.stop());
    let items = collect(&mut stream);
    worker.join().unwrap();
    stopper.join().unwrap();
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(
        reason(one_terminal_last(&items)),
        Some(FinishReason::Length)
    );
    assert_eq!(
        rig.record().outcome,
        Outcome::Finished(FinishReason::Length)
    );
    stream
}

/// `stop_races_final_chunk` with a cancel grace: the stop that sends the abort also
/// starts the grace, which the adapter's abort task times itself after entering the
/// engine's abort. Whichever wins, a task is spawned only with the abort (the abort
/// task), and once the request is over only that parked task is left, and it ends
/// with the adapter.
#[test]
fn stop_with_grace_races_final_chunk() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::with_grace(Mode::Aggregated, Duration::from_secs(5));
        let stream = race_stop_with_final_chunk(&rig);
        let aborts = rig.aborts();
        assert_eq!(
            rig.rt.spawns(),
            aborts,
            "the abort task, only with the abort"
        );
        rig.rt.run_pending();
        assert_eq!(
            rig.rt.pending(),
            rig.adapter.background_tasks(),
            "a task outlived its request"
        );
        reached.saw(format!("aborts={aborts}"));
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["aborts=0", "aborts=1"]);
}

/// A stop with a cancel grace races a kill: one abort, the synthesized `Cancelled`, and
/// the abort task only (when the stop came first, it also times the grace, on its own
/// timer, for as long as it matters).
#[test]
fn stop_with_grace_races_kill() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::with_grace(Mode::Aggregated, Duration::from_secs(5));
        let signals = StdArc::new(StdMutex::new(Vec::new()));
        let s = signals.clone();
        rig.ctx
            .add_listener(move |signal| std_lock(&s).push(signal));
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        let ctx = rig.ctx.clone();
        let stopper = thread::spawn(move || ctx.stop());
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill());
        let items = collect(&mut stream);
        stopper.join().unwrap();
        killer.join().unwrap();
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        assert_eq!(rig.rt.spawns(), 1, "the abort task, whoever sent the abort");
        rig.rt.run_pending();
        assert_eq!(rig.rt.pending(), 1, "a task outlived its request");
        assert_eq!(rig.adapter.background_tasks(), 1);
        reached.saw(format!("{:?}", std_lock(&signals)));
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["[Stop, Kill]", "[Kill]"]);
}

/// A stopped request's cancel grace, timed by the adapter's abort task, runs out (a
/// thread moves the clock and runs the woken tasks) while the engine's worker pushes
/// the final chunk. Exactly one terminal, last: the engine's (`Finished`) when the
/// consumer saw it first, the synthesized `Cancelled` when the grace won. The consumer
/// is woken either way, one abort (the stop's), and the abort task is the only task.
#[test]
fn grace_expiry_races_the_engines_final_chunk() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::with_grace(Mode::Aggregated, Duration::from_secs(5));
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        rig.chan.push(Ok(Chunk::tokens(vec![7])), false);
        assert!(matches!(poll_once(&mut stream), Poll::Ready(Some(_))));
        rig.ctx.stop();
        assert_eq!(rig.aborts(), 1, "the stop's abort, entered inline");
        let rt = rig.rt.clone();
        let clock = thread::spawn(move || {
            rt.advance(Duration::from_secs(5));
            rt.run_woken();
        });
        let chan = rig.chan.clone();
        let worker = thread::spawn(move || {
            chan.push(Ok(Chunk::terminal(FinishReason::Length)), true);
        });
        let items = collect(&mut stream);
        clock.join().unwrap();
        worker.join().unwrap();
        assert_eq!(items.len(), 1, "{items:?}");
        let ended = reason(one_terminal_last(&items));
        let outcome = rig.record().outcome;
        match ended {
            Some(FinishReason::Length) => {
                assert_eq!(outcome, Outcome::Finished(FinishReason::Length));
            }
            Some(FinishReason::Cancelled) => assert_eq!(outcome, Outcome::Cancelled),
            other => panic!("terminal {other:?}"),
        }
        assert_eq!(rig.aborts(), 1);
        rig.rt.run_woken();
        assert_eq!(
            (rig.rt.spawns(), rig.rt.pending()),
            (1, 1),
            "the abort task only"
        );
        reached.saw(format!("{ended:?}"));
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["Some(Length)", "Some(Cancelled)"]);
}

/// A kill races the consumer dropping the stream on another thread (after at most one
/// poll). Exactly one abort (aggregated mode, the engine never ends), exactly one
/// record: `Cancelled` if the consumer's poll saw the kill, `Dropped` otherwise.
#[test]
fn kill_races_consumer_drop() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        assert!(poll_once(&mut stream).is_pending());
        let consumer = thread::spawn(move || {
            let polled = poll_once(&mut stream);
            drop(stream);
            polled
        });
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill());
        let polled = consumer.join().unwrap();
        killer.join().unwrap();
        let record = rig.record();
        match polled {
            Poll::Ready(Some(item)) => {
                assert_eq!(reason(&item), Some(FinishReason::Cancelled), "{item:?}");
                assert_eq!(record.outcome, Outcome::Cancelled);
            }
            Poll::Pending => assert_eq!(record.outcome, Outcome::Dropped),
            Poll::Ready(None) => panic!("rule 6: the stream ended without a terminal"),
        }
        assert_eq!(rig.aborts(), 1, "rule 1/4: exactly one abort");
        reached.saw(record.outcome.label());
        rig.shutdown();
    });
    seen.expect(&["cancelled", "dropped"]);
}

/// Kill-on-drop (rule 4's opt-in): the consumer drops its stream while another thread
/// kills the context for a shutdown, so the drop's own kill may find the listener
/// mid-delivery. Whichever cause came first is the record's, the outcome is always
/// `Cancelled` (never `Dropped`), and there is exactly one abort and one record.
#[test]
fn kill_on_drop_races_kill() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        stream.set_kill_on_drop(true);
        let consumer = thread::spawn(move || drop(stream));
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill_with(Cause::Shutdown));
        consumer.join().unwrap();
        killer.join().unwrap();
        let record = rig.record();
        assert_eq!(record.outcome, Outcome::Cancelled, "rule 4: never Dropped");
        assert_eq!(record.cause, rig.ctx.cause(), "the first cause is recorded");
        assert_eq!(rig.aborts(), 1, "rule 1: exactly one abort");
        reached.saw(format!("{:?}", record.cause));
        rig.shutdown();
    });
    seen.expect(&["Some(ClientDisconnect)", "Some(Shutdown)"]);
}

/// Early finish (rule 12) races a kill from another thread. The consumer gets exactly
/// one terminal, last: its own `Stop` if the finish won (outcome `Finished(Stop)`), the
/// synthesized `Cancelled` if the kill did (outcome `Cancelled`, and `finish` said
/// no). Exactly one abort either way.
#[test]
fn early_finish_races_kill() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        let consumer = thread::spawn(move || {
            let finished = stream.finish(FinishReason::Stop);
            let items = collect(&mut stream);
            (finished, items)
        });
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill());
        let (finished, items) = consumer.join().unwrap();
        killer.join().unwrap();
        let last = reason(one_terminal_last(&items));
        let record = rig.record();
        if finished {
            assert_eq!(last, Some(FinishReason::Stop));
            assert_eq!(record.outcome, Outcome::Finished(FinishReason::Stop));
        } else {
            assert_eq!(last, Some(FinishReason::Cancelled));
            assert_eq!(record.outcome, Outcome::Cancelled);
        }
        assert_eq!(rig.aborts(), 1, "rule 1: exactly one abort");
        reached.saw(record.outcome.label());
        rig.shutdown();
    });
    seen.expect(&["finished", "cancelled"]);
}

/// Stop and kill race each other from two threads while the consumer is parked on a
/// silent engine: only the listener's wake-up can unpark it. The consumer gets one
/// synthesized `Cancelled`, the engine one abort, the context's listener sees
/// `Stop, Kill` or `Kill` alone.
#[test]
fn stop_races_kill() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let seen = StdArc::new(StdMutex::new(Vec::new()));
        let s = seen.clone();
        rig.ctx
            .add_listener(move |signal| std_lock(&s).push(signal));
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        let ctx = rig.ctx.clone();
        let stopper = thread::spawn(move || ctx.stop());
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill());
        let items = collect(&mut stream);
        stopper.join().unwrap();
        killer.join().unwrap();
        let last = one_terminal_last(&items);
        assert_eq!(reason(last), Some(FinishReason::Cancelled));
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        let seen = std_lock(&seen).clone();
        assert!(
            seen == [Signal::Stop, Signal::Kill] || seen == [Signal::Kill],
            "listener saw {seen:?}"
        );
        reached.saw(format!("{seen:?}"));
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["[Stop, Kill]", "[Kill]"]);
}

/// Every ender at once: the engine's worker delivers its terminal (or an error), a
/// killer kills, the consumer polls once and drops the stream, and (third variant) a
/// clock thread moves time past the time-to-first-token limit. Exactly one record, and
/// it says what the consumer saw: the engine's terminal (`Finished` / `Failed`, and
/// then no abort ever), the synthesized `Cancelled`, the timeout (`TimedOut`), or
/// `Dropped`.
#[test]
fn observer_record_exactly_once_under_all_enders() {
    const TTFT: Duration = Duration::from_secs(1);
    for (engine_error, timeout) in [(false, false), (true, false), (false, true)] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let ctx = Context::new("loom");
            let rig = Rig::build(Mode::Aggregated, None, ctx, timeout.then_some(TTFT));
            let (mut stream, gctx) = rig.start();
            drop(gctx);
            let chan = rig.chan.clone();
            let worker = thread::spawn(move || {
                let item = if engine_error {
                    Err(EngineError::new(ErrorKind::Unavailable, "worker lost"))
                } else {
                    Ok(Chunk::terminal(FinishReason::Eos))
                };
                chan.push(item, true);
            });
            let ctx = rig.ctx.clone();
            let killer = thread::spawn(move || ctx.kill());
            let clock = timeout.then(|| {
                let rt = rig.rt.clone();
                thread::spawn(move || rt.advance(TTFT))
            });
            let polled = poll_once(&mut stream);
            drop(stream);
            worker.join().unwrap();
            killer.join().unwrap();
            if let Some(clock) = clock {
                clock.join().unwrap();
            }
            let record = rig.record();
            match polled {
                Poll::Ready(Some(item)) if item.is_error() => {
                    let kind = item.error.as_ref().map(EngineError::kind);
                    if kind == Some(ErrorKind::FirstTokenTimeout) {
                        assert!(timeout, "{item:?}");
                        assert_eq!(record.outcome, Outcome::TimedOut);
                        assert_eq!(rig.aborts(), 1, "rule 8: a timeout kills");
                    } else {
                        assert!(engine_error, "{item:?}");
                        assert_eq!(record.outcome, Outcome::Failed(ErrorKind::Unavailable));
                        assert_eq!(rig.aborts(), 0, "rule 1: no abort after the terminal");
                    }
                }
                Poll::Ready(Some(item)) => match reason(&item) {
                    Some(FinishReason::Eos) => {
                        assert_eq!(record.outcome, Outcome::Finished(FinishReason::Eos));
                        assert_eq!(rig.aborts(), 0, "rule 1: no abort after the terminal");
                    }
                    Some(FinishReason::Cancelled) => {
                        assert_eq!(record.outcome, Outcome::Cancelled);
                        assert_eq!(rig.aborts(), 1);
                    }
                    other => panic!("unexpected item {item:?} ({other:?})"),
                },
                Poll::Pending => {
                    assert_eq!(record.outcome, Outcome::Dropped);
                    assert_eq!(rig.aborts(), usize::from(record.abort == AbortStatus::Sent));
                }
                Poll::Ready(None) => panic!("rule 6: the stream ended without a terminal"),
            }
            reached.saw(record.outcome.label());
            rig.shutdown();
        });
        let ender = if engine_error { "failed" } else { "finished" };
        let mut all = vec![ender, "cancelled", "dropped"];
        if timeout {
            all.push("timed_out");
        }
        seen.expect(&all);
    }
}

/// A kill lands while the engine's `generate` is still pending (a slow admission) and
/// the engine finishes its setup on another thread. Rule 10: the context is watched
/// before `generate` is entered, so a kill that wins resolves `generate` at once with a
/// stream that yields `Cancelled`; a setup that wins gives a stream the kill then ends.
/// Either way one `Cancelled` terminal, one record, one abort, and no lost wake-up of
/// the caller parked in `generate`.
#[test]
fn kill_races_slow_setup() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let gate = StdArc::new(Gate::default());
        let rig = Rig::build_gated(
            Mode::Aggregated,
            None,
            Context::new("loom"),
            None,
            Some(gate.clone()),
        );
        let ctx = rig.ctx.clone();
        let killer = thread::spawn(move || ctx.kill());
        let opener = {
            let gate = gate.clone();
            thread::spawn(move || gate.open())
        };
        let request = Request::new("loom", "loom", vec![1]);
        let mut stream = block_on(rig.adapter.generate(request, rig.ctx.clone()))
            .expect("a kill is not a setup error");
        let setup_done = gate.passed.load(SeqCst);
        drop(std_lock(&rig.gctx).take());
        let items = collect(&mut stream);
        killer.join().unwrap();
        opener.join().unwrap();
        let last = one_terminal_last(&items);
        assert_eq!(reason(last), Some(FinishReason::Cancelled));
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        reached.saw(if setup_done {
            "killed after setup"
        } else {
            "killed during setup"
        });
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["killed after setup", "killed during setup"]);
}

/// The engine's scheduling signal (from its own thread) races the request's end. The
/// end freezes the queue time: whichever wins, the record the observer got and the
/// stream's record agree, and a signal after the end counts for nothing.
#[test]
fn scheduling_signal_races_the_end() {
    let seen = Seen::default();
    let reached = seen.clone();
    model(move || {
        let rig = Rig::new(Mode::Aggregated, None);
        let (mut stream, gctx) = rig.start();
        let signaller = thread::spawn(move || gctx.notify_scheduled());
        rig.chan
            .push(Ok(Chunk::terminal(FinishReason::Length)), true);
        let items = collect(&mut stream);
        signaller.join().unwrap();
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Length)
        );
        let record = rig.record();
        assert_eq!(
            stream.record(),
            Some(record.clone()),
            "one record, read twice"
        );
        reached.saw(format!(
            "queue time {:?}",
            record.queue_time.map(|_| "kept")
        ));
        drop(stream);
        rig.shutdown();
    });
    seen.expect(&["queue time None", "queue time Some(\"kept\")"]);
}
