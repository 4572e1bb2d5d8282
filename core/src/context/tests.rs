use super::*;
use crate::sync::atomic::AtomicUsize;
use std::sync::Barrier;
use std::task::Wake;

fn recorder(ctx: &Context) -> (Arc<Mutex<Vec<Signal>>>, ListenerId) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let id = ctx.add_listener(move |s| lock(&l).push(s));
    (log, id)
}

fn seen(log: &Arc<Mutex<Vec<Signal>>>) -> Vec<Signal> {
    lock(log).clone()
}

#[derive(Default)]
struct CountWake(AtomicUsize);

impl Wake for CountWake {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting_waker() -> (Arc<CountWake>, Waker) {
    let c = Arc::new(CountWake::default());
    (c.clone(), Waker::from(c))
}

fn poll_once(fut: &mut Signalled, waker: &Waker) -> Poll<()> {
    Pin::new(fut).poll(&mut TaskContext::from_waker(waker))
}

#[test]
fn stop_then_kill_moves_forward() {
    let ctx = Context::new("r1");
    assert_eq!(ctx.id(), "r1");
    assert_eq!(ctx.level(), Level::Live);
    assert!(!ctx.is_stopped());
    ctx.stop();
    assert_eq!(ctx.level(), Level::Stopped);
    assert!(ctx.is_stopped());
    assert!(!ctx.is_killed());
    ctx.kill();
    assert_eq!(ctx.level(), Level::Killed);
    assert!(ctx.is_killed());
    assert_eq!(format!("{ctx:?}"), "Context { id: \"r1\", level: Killed }");
}

#[test]
fn stop_after_kill_stays_killed() {
    let ctx = Context::new("r");
    ctx.kill();
    ctx.stop();
    assert_eq!(ctx.level(), Level::Killed);
}

#[test]
fn kill_counts_as_stopped() {
    let ctx = Context::new("r");
    ctx.kill();
    assert!(ctx.is_stopped());
    assert!(ctx.is_killed());
}

#[test]
fn listener_sees_stop_then_kill_once_each() {
    let ctx = Context::new("r");
    let (log, _) = recorder(&ctx);
    ctx.stop();
    assert_eq!(seen(&log), vec![Signal::Stop]);
    ctx.stop();
    ctx.kill();
    ctx.kill();
    ctx.stop();
    assert_eq!(seen(&log), vec![Signal::Stop, Signal::Kill]);
}

#[test]
fn kill_from_live_delivers_kill_alone() {
    let ctx = Context::new("r");
    let (log, _) = recorder(&ctx);
    ctx.kill();
    ctx.stop();
    assert_eq!(seen(&log), vec![Signal::Kill]);
}

#[test]
fn racing_stop_and_kill_deliver_each_level_at_most_once_in_order() {
    for _ in 0..1000 {
        let ctx = Context::new("r");
        let (log, _) = recorder(&ctx);
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = [Level::Stopped, Level::Killed]
            .into_iter()
            .map(|lvl| {
                let (ctx, barrier) = (ctx.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    if lvl == Level::Killed {
                        ctx.kill();
                    } else {
                        ctx.stop();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("racing thread panicked");
        }
        let got = seen(&log);
        assert!(
            got == [Signal::Stop, Signal::Kill] || got == [Signal::Kill],
            "bad delivery {got:?}"
        );
        assert_eq!(ctx.level(), Level::Killed);
    }
}

#[test]
fn listener_added_racing_stop_gets_stop_exactly_once() {
    for _ in 0..1000 {
        let ctx = Context::new("r");
        let barrier = Arc::new(Barrier::new(2));
        let stopper = {
            let (ctx, barrier) = (ctx.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                ctx.stop();
            })
        };
        barrier.wait();
        let (log, _) = recorder(&ctx);
        stopper.join().expect("stopper panicked");
        assert_eq!(seen(&log), vec![Signal::Stop]);
    }
}

#[test]
fn children_signalled_before_parent_listeners() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let parent = Context::new("p");
    let child = Context::new("c");
    parent.link_child(&child);
    let o = order.clone();
    parent.add_listener(move |s| lock(&o).push(("parent", s)));
    let o = order.clone();
    child.add_listener(move |s| lock(&o).push(("child", s)));
    parent.stop();
    parent.kill();
    assert_eq!(
        *lock(&order),
        vec![
            ("child", Signal::Stop),
            ("parent", Signal::Stop),
            ("child", Signal::Kill),
            ("parent", Signal::Kill),
        ]
    );
}

#[test]
fn children_signalled_in_link_order() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let parent = Context::new("p");
    let kids: Vec<Context> = (0..3).map(|i| Context::new(format!("c{i}"))).collect();
    for (i, kid) in kids.iter().enumerate() {
        parent.link_child(kid);
        let o = order.clone();
        kid.add_listener(move |_| lock(&o).push(i));
    }
    parent.stop();
    assert_eq!(*lock(&order), vec![0, 1, 2]);
    assert!(kids.iter().all(Context::is_stopped));
}

#[test]
fn linking_to_stopped_parent_stops_child_at_once() {
    let parent = Context::new("p");
    parent.stop();
    let child = Context::new("c");
    parent.link_child(&child);
    assert_eq!(child.level(), Level::Stopped);
    parent.kill();
    assert_eq!(child.level(), Level::Killed);
}

#[test]
fn linking_to_killed_parent_kills_child_at_once() {
    let parent = Context::new("p");
    parent.kill();
    let child = Context::new("c");
    parent.link_child(&child);
    assert_eq!(child.level(), Level::Killed);
}

#[test]
fn dropped_child_is_pruned_and_does_not_block_signalling() {
    let parent = Context::new("p");
    let kept = Context::new("kept");
    for i in 0..100 {
        let gone = Context::new(format!("gone{i}"));
        parent.link_child(&gone);
    }
    parent.link_child(&kept);
    // Dead links are pruned whenever a push would grow the Vec, so a long-lived
    // parent does not accumulate one entry per finished request.
    assert!(lock(&parent.inner.state).children.capacity() <= 8);
    let (log, _) = recorder(&parent);
    parent.stop();
    assert_eq!(kept.level(), Level::Stopped);
    assert_eq!(seen(&log), vec![Signal::Stop]);
    assert_eq!(lock(&parent.inner.state).children.len(), 1);
}

#[test]
fn cycle_stop_terminates() {
    let a = Context::new("a");
    let b = Context::new("b");
    a.link_child(&b);
    b.link_child(&a);
    let (log_a, _) = recorder(&a);
    let (log_b, _) = recorder(&b);
    a.stop();
    assert_eq!(a.level(), Level::Stopped);
    assert_eq!(b.level(), Level::Stopped);
    b.kill();
    assert_eq!(a.level(), Level::Killed);
    assert_eq!(seen(&log_a), vec![Signal::Stop, Signal::Kill]);
    assert_eq!(seen(&log_b), vec![Signal::Stop, Signal::Kill]);
}

#[test]
fn reentrant_kill_inside_stop_delivery_yields_stop_then_kill_once() {
    let ctx = Context::new("r");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (l, c) = (log.clone(), ctx.clone());
    ctx.add_listener(move |s| {
        lock(&l).push(s);
        if s == Signal::Stop {
            c.kill();
        }
    });
    ctx.stop();
    assert_eq!(*lock(&log), vec![Signal::Stop, Signal::Kill]);
    assert_eq!(ctx.level(), Level::Killed);
}

#[test]
fn reentrant_add_listener_inside_delivery_gets_current_signal() {
    let ctx = Context::new("r");
    let inner_log = Arc::new(Mutex::new(Vec::new()));
    let (l, c) = (inner_log.clone(), ctx.clone());
    ctx.add_listener(move |s| {
        if s == Signal::Stop {
            let l = l.clone();
            c.add_listener(move |s| lock(&l).push(s));
        }
    });
    ctx.stop();
    assert_eq!(*lock(&inner_log), vec![Signal::Stop]);
    ctx.kill();
    assert_eq!(*lock(&inner_log), vec![Signal::Stop, Signal::Kill]);
}

#[test]
fn stopped_future_pending_then_ready_after_stop() {
    let ctx = Context::new("r");
    let (count, waker) = counting_waker();
    let mut fut = ctx.stopped();
    assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
    assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
    ctx.stop();
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
    assert_eq!(poll_once(&mut fut, &waker), Poll::Ready(()));
}

#[test]
fn waiter_registered_before_stop_is_woken_exactly_once() {
    let ctx = Context::new("r");
    let (count, waker) = counting_waker();
    let mut fut = ctx.stopped();
    assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
    ctx.stop();
    ctx.kill();
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
}

#[test]
fn killed_future_not_ready_after_stop_only() {
    let ctx = Context::new("r");
    let (count, waker) = counting_waker();
    let mut fut = ctx.killed();
    assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
    ctx.stop();
    assert_eq!(count.0.load(Ordering::SeqCst), 0);
    assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
    ctx.kill();
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
    assert_eq!(poll_once(&mut fut, &waker), Poll::Ready(()));
    assert_eq!(poll_once(&mut ctx.stopped(), &waker), Poll::Ready(()));
}

#[test]
fn remove_listener_stops_delivery_and_is_false_the_second_time() {
    let ctx = Context::new("r");
    let (log, id) = recorder(&ctx);
    let (other, _) = recorder(&ctx);
    assert!(ctx.remove_listener(id));
    assert!(!ctx.remove_listener(id));
    ctx.stop();
    assert_eq!(seen(&log), Vec::<Signal>::new());
    assert_eq!(seen(&other), vec![Signal::Stop]);
}

#[test]
fn listener_added_after_stop_is_called_once_with_stop() {
    let ctx = Context::new("r");
    ctx.stop();
    let (log, _) = recorder(&ctx);
    assert_eq!(seen(&log), vec![Signal::Stop]);
    ctx.stop();
    assert_eq!(seen(&log), vec![Signal::Stop]);
    ctx.kill();
    assert_eq!(seen(&log), vec![Signal::Stop, Signal::Kill]);
}

#[test]
fn panicking_listener_does_not_wedge_later_delivery() {
    let ctx = Context::new("r");
    let (count, waker) = counting_waker();
    let mut fut = ctx.stopped();
    assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
    ctx.add_listener(|s| assert_ne!(s, Signal::Stop, "listener boom"));
    let (log, _) = recorder(&ctx);
    let c = ctx.clone();
    let res = std::thread::spawn(move || c.stop()).join();
    assert!(res.is_err());
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
    ctx.kill();
    assert_eq!(seen(&log), vec![Signal::Kill]);
}

/// A waker that appends its id to a shared log when woken, to check wake order.
struct OrderWake {
    id: usize,
    log: Arc<Mutex<Vec<usize>>>,
}

impl Wake for OrderWake {
    fn wake(self: Arc<Self>) {
        lock(&self.log).push(self.id);
    }
}

fn woken(count: &CountWake) -> usize {
    count.0.load(Ordering::SeqCst)
}

/// Poll a fresh future once with a waker made from `count`, then drop both.
fn park_and_drop(fut: Signalled, count: &Arc<CountWake>) {
    let mut fut = fut;
    let waker = Waker::from(count.clone());
    assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
}

#[test]
fn ten_thousand_dropped_stopped_futures_release_their_wakers() {
    let ctx = Context::new("r");
    let counts: Vec<Arc<CountWake>> = (0..10_000).map(|_| Arc::default()).collect();
    for count in &counts {
        park_and_drop(ctx.stopped(), count);
    }
    assert_eq!(ctx.waiters(), 0, "dropped futures left their wakers parked");
    assert!(counts.iter().all(|c| Arc::strong_count(c) == 1));
    ctx.stop();
    assert_eq!(counts.iter().map(|c| woken(c)).sum::<usize>(), 0);
}

#[test]
fn ten_thousand_dropped_killed_futures_release_their_wakers() {
    let ctx = Context::new("r");
    let counts: Vec<Arc<CountWake>> = (0..10_000).map(|_| Arc::default()).collect();
    for (i, count) in counts.iter().enumerate() {
        // Half of them dropped after a stop: the kill list is still theirs to leave.
        if i == 5_000 {
            ctx.stop();
        }
        park_and_drop(ctx.killed(), count);
    }
    assert_eq!(ctx.waiters(), 0, "dropped futures left their wakers parked");
    assert!(counts.iter().all(|c| Arc::strong_count(c) == 1));
    ctx.kill();
    assert_eq!(counts.iter().map(|c| woken(c)).sum::<usize>(), 0);
}

#[test]
fn dropped_stopped_future_is_not_woken_and_live_one_is() {
    let ctx = Context::new("r");
    let (gone, live) = (Arc::<CountWake>::default(), Arc::<CountWake>::default());
    park_and_drop(ctx.stopped(), &gone);
    let mut fut = ctx.stopped();
    let waker = Waker::from(live.clone());
    assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
    assert_eq!(ctx.waiters(), 1);
    ctx.stop();
    assert_eq!((woken(&gone), woken(&live)), (0, 1));
    assert_eq!(ctx.waiters(), 0);
    assert_eq!(poll_once(&mut fut, &waker), Poll::Ready(()));
}

#[test]
fn dropped_killed_future_is_not_woken_and_live_one_is() {
    let ctx = Context::new("r");
    let (gone, live) = (Arc::<CountWake>::default(), Arc::<CountWake>::default());
    park_and_drop(ctx.killed(), &gone);
    let mut fut = ctx.killed();
    let waker = Waker::from(live.clone());
    assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
    ctx.stop();
    assert_eq!(ctx.waiters(), 1);
    ctx.kill();
    assert_eq!((woken(&gone), woken(&live)), (0, 1));
    assert_eq!(ctx.waiters(), 0);
}

#[test]
fn repolling_with_the_same_waker_parks_it_once() {
    let ctx = Context::new("r");
    let (count, waker) = counting_waker();
    let mut stop = ctx.stopped();
    let mut kill = ctx.killed();
    for _ in 0..3 {
        assert_eq!(poll_once(&mut stop, &waker), Poll::Pending);
        assert_eq!(poll_once(&mut kill, &waker), Poll::Pending);
    }
    assert_eq!(ctx.waiters(), 2);
    ctx.kill();
    assert_eq!(woken(&count), 2);
    assert_eq!(ctx.waiters(), 0);
}

#[test]
fn repolling_with_another_waker_replaces_the_first() {
    for target in [Level::Stopped, Level::Killed] {
        let ctx = Context::new("r");
        let (first, second) = (Arc::<CountWake>::default(), Arc::<CountWake>::default());
        let mut fut = if target == Level::Killed {
            ctx.killed()
        } else {
            ctx.stopped()
        };
        for count in [&first, &second] {
            let waker = Waker::from(count.clone());
            assert_eq!(poll_once(&mut fut, &waker), Poll::Pending);
        }
        assert_eq!(ctx.waiters(), 1);
        // The context no longer holds the first waker.
        assert_eq!(Arc::strong_count(&first), 1);
        assert_eq!(Arc::strong_count(&second), 2);
        ctx.kill();
        assert_eq!((woken(&first), woken(&second)), (0, 1), "{target:?}");
    }
}

#[test]
fn future_dropped_after_its_level_rose_leaves_the_others_parked() {
    let ctx = Context::new("r");
    let (a, b, c) = (counting_waker(), counting_waker(), counting_waker());
    let mut stop = ctx.stopped();
    let mut kill_b = ctx.killed();
    let mut kill_c = ctx.killed();
    assert_eq!(poll_once(&mut stop, &a.1), Poll::Pending);
    assert_eq!(poll_once(&mut kill_b, &b.1), Poll::Pending);
    assert_eq!(poll_once(&mut kill_c, &c.1), Poll::Pending);
    assert_eq!(ctx.waiters(), 3);
    ctx.stop();
    assert_eq!(ctx.waiters(), 2);
    // Its key points into the drained stop list: dropping it must touch nothing.
    drop(stop);
    assert_eq!(ctx.waiters(), 2);
    drop(kill_b);
    assert_eq!(ctx.waiters(), 1);
    ctx.kill();
    assert_eq!((woken(&a.0), woken(&b.0), woken(&c.0)), (1, 0, 1));
    assert_eq!(poll_once(&mut kill_c, &c.1), Poll::Ready(()));
    drop(kill_c);
    assert_eq!(ctx.waiters(), 0);
}

#[test]
fn future_dropped_during_delivery_does_not_unpark_another() {
    let ctx = Context::new("r");
    let (a, b) = (counting_waker(), counting_waker());
    let mut dropped = ctx.stopped();
    let mut live = ctx.stopped();
    assert_eq!(poll_once(&mut dropped, &a.1), Poll::Pending);
    assert_eq!(poll_once(&mut live, &b.1), Poll::Pending);
    // Dropped by a listener: after the level rose, before the deliverer took the list.
    let slot = Arc::new(Mutex::new(Some(dropped)));
    let s = slot.clone();
    ctx.add_listener(move |_| drop(lock(&s).take()));
    ctx.stop();
    assert!(lock(&slot).is_none());
    // The deliverer wakes the stale waker once; the live future is not disturbed.
    assert_eq!((woken(&a.0), woken(&b.0)), (1, 1));
    assert_eq!(ctx.waiters(), 0);
    assert_eq!(poll_once(&mut live, &b.1), Poll::Ready(()));
}

#[test]
fn waiters_are_woken_in_registration_order_across_reused_slots() {
    let ctx = Context::new("r");
    let log = Arc::new(Mutex::new(Vec::new()));
    let waker = |id| {
        Waker::from(Arc::new(OrderWake {
            id,
            log: log.clone(),
        }))
    };
    let mut futs: Vec<(usize, Signalled)> = Vec::new();
    for id in 0..4 {
        let mut fut = if id == 0 { ctx.killed() } else { ctx.stopped() };
        assert_eq!(poll_once(&mut fut, &waker(id)), Poll::Pending);
        futs.push((id, fut));
    }
    // Frees the second stop slot; the next future reuses it but is still woken last.
    futs.retain(|(id, _)| *id != 2);
    let mut late = ctx.stopped();
    assert_eq!(poll_once(&mut late, &waker(4)), Poll::Pending);
    assert_eq!(ctx.waiters(), 4);
    ctx.kill();
    // Stop waiters first, then kill waiters, each in the order they were parked.
    assert_eq!(*lock(&log), vec![1, 3, 4, 0]);
}

#[test]
fn a_killed_context_does_not_remember_children() {
    let parent = Context::new("p");
    parent.kill();
    let child = Context::new("c");
    parent.link_child(&child);
    assert_eq!(child.level(), Level::Killed);
    // Nothing can follow Kill, so the link would only hold memory.
    assert_eq!(lock(&parent.inner.state).children.len(), 0);
    let stopped = Context::new("s");
    stopped.stop();
    stopped.link_child(&child);
    assert_eq!(lock(&stopped.inner.state).children.len(), 1);
}

#[test]
fn the_first_listener_is_held_inline() {
    let ctx = Context::new("r");
    let (_log, id) = recorder(&ctx);
    // The driver's one listener per request: no allocation for the list.
    assert!(matches!(
        lock(&ctx.inner.state).listeners,
        listeners::Listeners::One(_)
    ));
    let (_second, _) = recorder(&ctx);
    assert!(matches!(
        lock(&ctx.inner.state).listeners,
        listeners::Listeners::Many(_)
    ));
    assert!(ctx.remove_listener(id));
    assert!(!ctx.remove_listener(id), "removed once");
}

#[test]
fn signalled_debug_names_its_context_and_target() {
    let ctx = Context::new("r7");
    assert_eq!(
        format!("{:?}", ctx.killed()),
        "Signalled { id: \"r7\", target: Killed }"
    );
    assert_eq!(format!("{ctx:?}"), "Context { id: \"r7\", level: Live }");
}
