//! Context models: linking a child to a router's parent racing the parent's stop and
//! the child's drop, the listener registration racing a stop, and the loom `Weak` the
//! links rely on.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use loom::future::block_on;
use loom::thread;
use tether_core::context::Signal;
use tether_core::sync::{downgrade, upgrade, Arc, Weak};
use tether_core::{Chunk, Context, FinishReason, Mode, Outcome};

use crate::rig::{collect, one_terminal_last, reason, Rig};
use crate::{model, Seen, StdArc};

/// A router's parent context is stopped while a request's context is being linked to
/// it. Either the link sees the stopped parent and stops the child itself, or the
/// parent's delivery reaches the child, before the parent's own listeners. The child's
/// `stopped()` waiter, parked first, is woken; the request behind the child is aborted
/// once and its consumer, parked on the engine, gets the engine's answer.
#[test]
fn link_child_races_parent_stop() {
    model(|| {
        let parent = Context::new("parent");
        let child = Context::new("child");
        let rig = Rig::with_context(
            Mode::Aggregated,
            Some(Chunk::terminal(FinishReason::Cancelled)),
            child.clone(),
        );
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        let linked = StdArc::new(AtomicBool::new(false));
        let (l, c) = (linked.clone(), child.clone());
        parent.add_listener(move |_| {
            assert!(
                !l.load(SeqCst) || c.is_stopped(),
                "a linked child is signalled before the parent's listeners"
            );
        });
        let (p, c, l) = (parent.clone(), child.clone(), linked.clone());
        let linker = thread::spawn(move || {
            p.link_child(&c);
            l.store(true, SeqCst);
        });
        let p = parent.clone();
        let stopper = thread::spawn(move || p.stop());
        block_on(child.stopped());
        let items = collect(&mut stream);
        linker.join().unwrap();
        stopper.join().unwrap();
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        drop(stream);
        rig.shutdown();
    });
}

/// One upgrade for `upgrades_race_last_owner_drop`: whether no owner was left when it
/// started, and what it got. `live` moves right next to the loom operation it mirrors.
fn upgrade_once(weak: &Weak<u32>, live: &AtomicUsize) -> (bool, Option<u32>) {
    let none_left = live.load(SeqCst) == 0;
    let got = upgrade(weak);
    if got.is_some() {
        live.fetch_add(1, SeqCst);
    }
    let value = got.as_deref().copied();
    if let Some(arc) = got {
        drop(arc);
        live.fetch_sub(1, SeqCst);
    }
    (none_left, value)
}

/// The loom `Weak` model itself (`tether_core::sync`): two upgrades (each dropping what
/// it got) race the drop of the original owner, with the drop on the model's main thread
/// or on a spawned one (loom starts from different schedules). An upgrade that starts
/// once no owner is left fails, even while the other upgrade holds its probe; one that
/// succeeds hands out a working `Arc`. `live` counts the owners.
#[test]
fn upgrades_race_last_owner_drop() {
    for drop_on_main in [true, false] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let owner = Arc::new(7_u32);
            let weak = downgrade(&owner);
            let live = StdArc::new(AtomicUsize::new(1));
            let l = live.clone();
            let drop_owner = move || {
                drop(owner);
                l.fetch_sub(1, SeqCst);
            };
            let spawn_upgrade = || {
                let (w, live) = (weak.clone(), live.clone());
                thread::spawn(move || upgrade_once(&w, &live))
            };
            let mut results = Vec::new();
            if drop_on_main {
                let upgraders = [spawn_upgrade(), spawn_upgrade()];
                drop_owner();
                results.extend(upgraders.map(|u| u.join().unwrap()));
            } else {
                let dropper = thread::spawn(drop_owner);
                let upgrader = spawn_upgrade();
                results.push(upgrade_once(&weak, &live));
                dropper.join().unwrap();
                results.push(upgrader.join().unwrap());
            }
            for result in results {
                match result {
                    (true, value) => {
                        assert_eq!(value, None, "upgraded after the last owner left");
                        reached.saw("after the last owner");
                    }
                    (false, value) => {
                        assert!(matches!(value, None | Some(7)), "{value:?}");
                        reached.saw(format!("{value:?}"));
                    }
                }
            }
            assert!(upgrade(&weak).is_none());
        });
        seen.expect(&["Some(7)", "None", "after the last owner"]);
    }
}

/// Sets its flag when dropped: tells a model when a context's state was freed (its
/// listeners go with it).
struct DropFlag(StdArc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// A child listener that counts its calls (each must be `Stop`) and flags when it is freed.
fn count_stops(ctx: &Context) -> (StdArc<AtomicUsize>, StdArc<AtomicBool>) {
    let (calls, freed) = (
        StdArc::new(AtomicUsize::new(0)),
        StdArc::new(AtomicBool::new(false)),
    );
    let (c, flag) = (calls.clone(), DropFlag(freed.clone()));
    ctx.add_listener(move |signal| {
        let _owned = &flag;
        assert_eq!(signal, Signal::Stop);
        c.fetch_add(1, SeqCst);
    });
    (calls, freed)
}

/// A request's context (the child) is dropped on one thread while its router's parent
/// context is stopped on another: the parent's link is weak, so it signals the child only
/// if its upgrade beat the drop. A child dropped before the stop began is never
/// signalled, one that outlived the whole stop always is, and the parent's own delivery
/// completes either way. Run with the drop on the main thread and with the stop there.
#[test]
fn child_drop_races_parent_stop() {
    for drop_on_main in [true, false] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let parent = Context::new("parent");
            let child = Context::new("child");
            parent.link_child(&child);
            let (calls, _) = count_stops(&child);
            let (parent_calls, _) = count_stops(&parent);
            let dropped = StdArc::new(AtomicBool::new(false));
            let stopped = StdArc::new(AtomicBool::new(false));
            let (d, s) = (dropped.clone(), stopped.clone());
            // The last owner: the parent's link alone does not keep the child alive.
            let drop_child = move || {
                let stopped_before = s.load(SeqCst);
                drop(child);
                d.store(true, SeqCst);
                stopped_before
            };
            let (p, d, s) = (parent.clone(), dropped.clone(), stopped.clone());
            let stop_parent = move || {
                let dropped_before = d.load(SeqCst);
                p.stop();
                s.store(true, SeqCst);
                dropped_before
            };
            let (stopped_before, dropped_before) = if drop_on_main {
                let stopper = thread::spawn(stop_parent);
                (drop_child(), stopper.join().unwrap())
            } else {
                let dropper = thread::spawn(drop_child);
                let dropped_before = stop_parent();
                (dropper.join().unwrap(), dropped_before)
            };
            let calls = calls.load(SeqCst);
            assert!(calls <= 1, "child signalled {calls} times");
            if dropped_before {
                assert_eq!(calls, 0, "a dead child was signalled");
            }
            if stopped_before {
                assert_eq!(calls, 1, "a child alive through the stop was not signalled");
            }
            assert_eq!(parent_calls.load(SeqCst), 1);
            reached.saw(if calls == 1 { "signalled" } else { "skipped" });
        });
        seen.expect(&["signalled", "skipped"]);
    }
}

/// A parent links a new child while another thread drops an earlier child, whose link
/// the new one's push may prune (four links fill the `Vec`, so the fifth prunes dead
/// ones first). The dead child's state is freed by that prune or, if the prune still saw
/// it alive, by the parent's next stop; the stop never signals it, and signals every
/// live child. Run with the drop on the main thread and with the link there.
#[test]
fn link_child_races_child_drop() {
    for drop_on_main in [true, false] {
        let seen = Seen::default();
        let reached = seen.clone();
        model(move || {
            let parent = Context::new("parent");
            let gone = Context::new("gone");
            parent.link_child(&gone);
            let (gone_calls, gone_freed) = count_stops(&gone);
            let kept: Vec<Context> = (0..3).map(|i| Context::new(format!("kept{i}"))).collect();
            kept.iter().for_each(|k| parent.link_child(k));
            let late = Context::new("late");
            if drop_on_main {
                let (p, l) = (parent.clone(), late.clone());
                let linker = thread::spawn(move || p.link_child(&l));
                drop(gone);
                linker.join().unwrap();
            } else {
                let dropper = thread::spawn(move || drop(gone));
                parent.link_child(&late);
                dropper.join().unwrap();
            }
            let pruned_by_link = gone_freed.load(SeqCst);
            parent.stop();
            assert!(gone_freed.load(SeqCst), "the stop prunes a dead link");
            assert_eq!(gone_calls.load(SeqCst), 0, "a dead child was signalled");
            assert!(kept.iter().all(Context::is_stopped));
            assert!(late.is_stopped());
            reached.saw(if pruned_by_link {
                "pruned by link"
            } else {
                "pruned by stop"
            });
        });
        seen.expect(&["pruned by link", "pruned by stop"]);
    }
}

/// `generate` registers the request's context listener while another thread stops
/// the context. The registration either sees the stop (and is called at once) or is
/// included in the stop's delivery: the engine is aborted exactly once and answers with
/// its terminal, waking the consumer. A missed stop leaves the consumer parked forever.
#[test]
fn listener_registration_races_stop() {
    model(|| {
        let rig = Rig::new(
            Mode::Aggregated,
            Some(Chunk::terminal(FinishReason::Cancelled)),
        );
        let ctx = rig.ctx.clone();
        let stopper = thread::spawn(move || ctx.stop());
        let (mut stream, gctx) = rig.start();
        drop(gctx);
        let items = collect(&mut stream);
        stopper.join().unwrap();
        assert_eq!(
            reason(one_terminal_last(&items)),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(rig.record().outcome, Outcome::Cancelled);
        assert_eq!(rig.aborts(), 1);
        drop(stream);
        rig.shutdown();
    });
}
