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
