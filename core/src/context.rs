//! The cancellation handle ([`Context`]) shared by client, router and engine.
//!
//! Owns: the forward-only `Live → Stopped → Killed` level of one request, the weak links
//! to its child contexts, its synchronous listeners, the wakers of its [`Signalled`]
//! futures, and the order in which all of them are told about a level change.
//! Must not touch: any runtime, clock, task or thread (waiting is done through
//! [`Waker`]s only), nor what a stop *means* for a request (that is the lifecycle
//! machine's business).
//!
//! # Delivery protocol
//!
//! `level`, `delivered` and `delivering` live under one mutex. Whoever raises the level
//! while nobody is delivering becomes the single *deliverer* for that context; anyone
//! raising it meanwhile only raises it and returns. The deliverer works in rounds, each
//! one taken under the lock and run outside it: children (in link order), then
//! listeners (in registration order), then waiters. It loops until `delivered == level`.
//! One deliverer at a time is what guarantees a listener sees each level at most once and
//! never `Kill` before `Stop`, even when `stop()` and `kill()` race; and since no callback
//! ever runs under the lock, a listener may call `stop`, `kill`, `add_listener` or
//! `remove_listener` on the same context without deadlocking.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context as TaskContext, Poll, Waker};
use std::mem;

use crate::sync::atomic::{AtomicU8, Ordering};
use crate::sync::{downgrade, lock, upgrade, Arc, Mutex, MutexGuard, Weak};

/// How far a context has been cancelled. Ordered: `Live < Stopped < Killed`, and a
/// context only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Not cancelled.
    Live,
    /// Asked to stop gracefully: finish soon and emit a terminal.
    Stopped,
    /// Asked to stop immediately.
    Killed,
}

impl Level {
    const fn from_u8(v: u8) -> Level {
        // Only the three discriminants below are ever stored in the atomic mirror.
        match v {
            0 => Level::Live,
            1 => Level::Stopped,
            _ => Level::Killed,
        }
    }

    const fn signal(self) -> Signal {
        match self {
            // Never delivered: a round only runs for a level above `Live`.
            Level::Live | Level::Stopped => Signal::Stop,
            Level::Killed => Signal::Kill,
        }
    }
}

/// What a listener is told when its context's level rises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// The context was stopped (graceful).
    Stop,
    /// The context was killed (immediate). A listener that never saw `Stop` gets only this.
    Kill,
}

/// Handle to a listener registered with [`Context::add_listener`]; only meaningful for
/// the context that issued it (ids are numbered per context).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerId(u64);

type ListenerFn = Box<dyn Fn(Signal) + Send + Sync + 'static>;

/// Cheap clonable cancellation handle for one request. Clones share the same state.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    /// Lock-free mirror of `State::level`; written only under the lock.
    level: AtomicU8,
    state: Mutex<State>,
}

struct State {
    level: Level,
    /// The level of the round most recently started by a deliverer.
    delivered: Level,
    delivering: bool,
    /// A listener was added after `delivered` rose above `Live` and still needs it.
    late: bool,
    next_listener: u64,
    /// Held weakly so a long-lived parent does not keep every request alive.
    children: Vec<Weak<Inner>>,
    listeners: Vec<Listener>,
    stop_waiters: Vec<Waker>,
    kill_waiters: Vec<Waker>,
}

struct Listener {
    id: ListenerId,
    /// Highest level this listener has been (or is being) told about.
    seen: Level,
    /// `None` while the deliverer has it out to call it without the lock.
    f: Option<ListenerFn>,
}

impl Context {
    /// Create a live context named `id` (used in logs and `Debug` only).
    pub fn new(id: impl Into<String>) -> Context {
        Context {
            inner: Arc::new(Inner {
                id: id.into(),
                level: AtomicU8::new(Level::Live as u8),
                state: Mutex::new(State {
                    level: Level::Live,
                    delivered: Level::Live,
                    delivering: false,
                    late: false,
                    next_listener: 0,
                    children: Vec::new(),
                    listeners: Vec::new(),
                    stop_waiters: Vec::new(),
                    kill_waiters: Vec::new(),
                }),
            }),
        }
    }

    /// The id given to [`Context::new`].
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Current level (one atomic load, no lock).
    pub fn level(&self) -> Level {
        self.inner.load()
    }

    /// Ask for a graceful stop. No-op if already stopped or killed.
    pub fn stop(&self) {
        self.inner.raise(Level::Stopped);
    }

    /// Ask for an immediate stop. No-op if already killed.
    pub fn kill(&self) {
        self.inner.raise(Level::Killed);
    }

    /// True once the context has been stopped **or** killed.
    pub fn is_stopped(&self) -> bool {
        self.level() >= Level::Stopped
    }

    /// True once the context has been killed.
    pub fn is_killed(&self) -> bool {
        self.level() == Level::Killed
    }

    /// A future that resolves once the context is stopped or killed.
    pub fn stopped(&self) -> Signalled {
        Signalled {
            inner: self.inner.clone(),
            target: Level::Stopped,
        }
    }

    /// A future that resolves once the context is killed.
    pub fn killed(&self) -> Signalled {
        Signalled {
            inner: self.inner.clone(),
            target: Level::Killed,
        }
    }

    /// Link `child` so that it is stopped/killed whenever this context is, in link order
    /// and before this context's listeners and waiters. The link is weak: a dropped child
    /// is pruned. If this context is already stopped or killed, the child is signalled
    /// at once.
    pub fn link_child(&self, child: &Context) {
        let level = {
            let mut st = lock(&self.inner.state);
            // A killed context never signals again, so it need not remember the child.
            if st.level < Level::Killed {
                // Prune only when the push would grow the Vec: amortised O(1), and a
                // long-lived parent keeps at most about twice its live children.
                if st.children.len() == st.children.capacity() {
                    st.children.retain(|w| !is_dead(w));
                }
                st.children.push(downgrade(&child.inner));
            }
            st.level
        };
        // Outside the lock: the child may be this context (a cycle), and its level check
        // is what ends the recursion. A later round may signal it again; that is a no-op.
        if level > Level::Live {
            child.inner.raise(level);
        }
    }

    /// Register a synchronous callback run by whichever thread delivers a level change.
    ///
    /// If the context is already stopped/killed, the listener is called once with the
    /// delivered signal (at once, or by the thread currently delivering, so that it never
    /// sees `Kill` before `Stop`). A context that is killed releases its listeners after
    /// calling them, since nothing can follow `Kill`.
    pub fn add_listener(&self, f: impl Fn(Signal) + Send + Sync + 'static) -> ListenerId {
        let mut st = lock(&self.inner.state);
        let id = ListenerId(st.next_listener);
        st.next_listener += 1;
        st.listeners.push(Listener {
            id,
            seen: Level::Live,
            f: Some(Box::new(f)),
        });
        // Check and push under the same lock, so a racing stop() either includes this
        // listener in its round or leaves `delivered` raised for us to see here.
        if st.delivered > Level::Live {
            st.late = true;
            if !st.delivering {
                st.delivering = true;
                self.inner.deliver(st);
            }
        }
        id
    }

    /// Unregister a listener. Returns `false` if it was not registered (already removed,
    /// another context's id, or released after `Kill`). A delivery already in progress on
    /// another thread may still make its current call.
    pub fn remove_listener(&self, id: ListenerId) -> bool {
        let removed = {
            let mut st = lock(&self.inner.state);
            let pos = st.listeners.iter().position(|l| l.id == id);
            pos.map(|i| st.listeners.remove(i))
        };
        // Dropped here, outside the lock: the closure's captures may run arbitrary code.
        removed.is_some()
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.id())
            .field("level", &self.level())
            .finish()
    }
}

impl Inner {
    fn load(&self) -> Level {
        // Acquire: pairs with the Release store in `raise`, so a reader that sees the new
        // level also sees what the stopping thread wrote before calling stop()/kill().
        Level::from_u8(self.level.load(Ordering::Acquire))
    }

    fn raise(&self, target: Level) {
        if self.load() >= target {
            return;
        }
        let mut st = lock(&self.state);
        if st.level >= target {
            return;
        }
        st.level = target;
        // Release: pairs with the Acquire load in `load`.
        self.level.store(target as u8, Ordering::Release);
        // Someone else is delivering: they loop until they have delivered this level.
        if !st.delivering {
            st.delivering = true;
            self.deliver(st);
        }
    }

    /// Run delivery rounds until nothing is left. The caller has set `delivering`.
    fn deliver(&self, first: MutexGuard<'_, State>) {
        // Declared before `st` so that, when unwinding, the lock is released first.
        let mut guard = DeliveryGuard {
            inner: self,
            armed: true,
            in_flight: Vec::new(),
        };
        let mut st = first;
        let mut wake: Vec<Waker> = Vec::new();
        let mut orphans: Vec<Listener> = Vec::new();
        loop {
            let target = st.level;
            let fresh = target > st.delivered;
            if !fresh && !st.late {
                st.delivering = false;
                drop(st);
                guard.armed = false;
                drop(orphans);
                wake.into_iter().for_each(Waker::wake);
                return;
            }
            st.late = false;
            st.delivered = target;
            let Round {
                children,
                listeners,
            } = Round::take(&mut st, target, fresh);
            // Parked in the guard so a panicking child or listener does not lose them.
            guard.in_flight = listeners;
            drop(st);
            // The previous round's leftovers, now that the lock is released.
            drop(mem::take(&mut orphans));
            mem::take(&mut wake).into_iter().for_each(Waker::wake);

            for w in &children {
                if let Some(child) = upgrade(w) {
                    child.raise(target);
                }
            }
            drop(children);
            let signal = target.signal();
            for l in &guard.in_flight {
                if let Some(f) = &l.f {
                    f(signal);
                }
            }
            let mut back = mem::take(&mut guard.in_flight);
            if target == Level::Killed {
                // Nothing follows `Kill`: release them here, outside the lock.
                back = Vec::new();
            }

            st = lock(&self.state);
            orphans = put_back(&mut st, back);
            if fresh {
                // Taken after the listeners ran but equal to the set at `raise` time: a
                // waiter polled since then saw the raised level under the lock and did
                // not register.
                wake = take_waiters(&mut st, target);
            }
        }
    }
}

/// One round of delivery, taken under the lock and run outside it.
struct Round {
    children: Vec<Weak<Inner>>,
    listeners: Vec<Listener>,
}

impl Round {
    fn take(st: &mut State, target: Level, fresh: bool) -> Round {
        let children = if !fresh {
            // A late-listener round: children already have this level.
            Vec::new()
        } else if target == Level::Killed {
            mem::take(&mut st.children)
        } else {
            st.children.retain(|w| !is_dead(w));
            st.children.clone()
        };
        let listeners = if target == Level::Killed {
            // Nothing follows `Kill`: hand them all out and never put them back.
            mem::take(&mut st.listeners)
        } else {
            st.listeners
                .iter_mut()
                .filter(|l| l.seen < target)
                .filter_map(|l| {
                    l.seen = target;
                    let f = l.f.take()?;
                    Some(Listener {
                        id: l.id,
                        seen: target,
                        f: Some(f),
                    })
                })
                .collect()
        };
        Round {
            children,
            listeners,
        }
    }
}

/// Return called listeners to their entries; those removed meanwhile come back as
/// orphans, to be dropped once the lock is released.
fn put_back(st: &mut State, mut back: Vec<Listener>) -> Vec<Listener> {
    back.retain_mut(|l| match st.listeners.iter_mut().find(|e| e.id == l.id) {
        Some(entry) => {
            entry.f = l.f.take();
            false
        }
        None => true,
    });
    back
}

fn take_waiters(st: &mut State, level: Level) -> Vec<Waker> {
    let mut woken = match level {
        Level::Live => Vec::new(),
        Level::Stopped | Level::Killed => mem::take(&mut st.stop_waiters),
    };
    if level == Level::Killed {
        if woken.is_empty() {
            woken = mem::take(&mut st.kill_waiters);
        } else {
            woken.append(&mut st.kill_waiters);
        }
    }
    woken
}

/// Whether a child link can never be upgraded again.
#[cfg(not(tether_loom))]
fn is_dead(w: &Weak<Inner>) -> bool {
    w.strong_count() == 0
}

/// Under loom `Weak` is a strong `Arc` (see `crate::sync`), so no link ever dies.
#[cfg(tether_loom)]
fn is_dead(_: &Weak<Inner>) -> bool {
    false
}

/// Keeps a panicking listener, child or waker from wedging the context: without it
/// `delivering` would stay set and no later level change would ever be delivered.
struct DeliveryGuard<'a> {
    inner: &'a Inner,
    armed: bool,
    /// Listeners taken out for the current round, returned to their entries on unwind.
    in_flight: Vec<Listener>,
}

impl Drop for DeliveryGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (woken, orphans) = {
            let mut st = lock(&self.inner.state);
            st.delivering = false;
            st.late = false;
            let level = st.level;
            let orphans = put_back(&mut st, mem::take(&mut self.in_flight));
            (take_waiters(&mut st, level), orphans)
        };
        drop(orphans);
        // Waiters must still learn about the level that is already visible to them.
        woken.into_iter().for_each(Waker::wake);
    }
}

/// Future returned by [`Context::stopped`] and [`Context::killed`]; resolves once the
/// context reaches the awaited level. Owns a clone of the context, so it is `'static`.
#[must_use = "futures do nothing unless polled"]
pub struct Signalled {
    inner: Arc<Inner>,
    target: Level,
}

impl Future for Signalled {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.inner.load() >= this.target {
            return Poll::Ready(());
        }
        let mut st = lock(&this.inner.state);
        // `raise` changes the level under this lock, so either it runs after our push
        // and its deliverer wakes us, or we see its level here.
        if st.level >= this.target {
            return Poll::Ready(());
        }
        let list = if this.target == Level::Killed {
            &mut st.kill_waiters
        } else {
            &mut st.stop_waiters
        };
        match list.iter_mut().find(|w| w.will_wake(cx.waker())) {
            Some(w) => w.clone_from(cx.waker()),
            None => list.push(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl fmt::Debug for Signalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signalled")
            .field("id", &self.inner.id)
            .field("target", &self.target)
            .finish()
    }
}

#[cfg(all(test, not(tether_loom)))]
mod tests {
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
}
