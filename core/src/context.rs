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
//!
//! A [`Signalled`] future parks its waker in its target level's list under a key, and a
//! dropped future takes its waker back out. Keys are only used while the level is below
//! their target: once it got there, the list was or is about to be drained and is never
//! filled again, so a key can never reach another future's waker.

use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context as TaskContext, Poll, Waker};
use std::mem;

use crate::sync::atomic::{AtomicU8, Ordering};
use crate::sync::{downgrade, is_dead, lock, upgrade, Arc, Mutex, MutexGuard, Weak};

use listeners::Listeners;
use waiters::{Key, Waiters};

mod cause;
mod listeners;
mod waiters;

pub use cause::Cause;

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
/// the context that issued it (ids are numbered per context, from 1: non-zero, so an
/// `Option<ListenerId>` takes no more room than the id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerId(std::num::NonZeroU64);

type ListenerFn = Box<dyn Fn(Signal) + Send + Sync + 'static>;

/// A listener that is a weakly held object rather than a closure: the driver's
/// request, registered with no allocation of its own ([`Context::add_sink`]).
#[cfg(not(tether_loom))]
pub(crate) trait Sink: Send + Sync + 'static {
    /// A stop or kill reached the context.
    fn signal(self: std::sync::Arc<Self>, signal: Signal);
}

/// What a listener calls: a boxed closure, or a weakly held [`Sink`] (upgraded for the
/// call, skipped once it is gone).
enum Callback {
    Fn(ListenerFn),
    // The loom build registers its sinks as closures: loom's `Weak` does not coerce to
    // a trait object.
    #[cfg(not(tether_loom))]
    Sink(std::sync::Weak<dyn Sink>),
}

impl Callback {
    fn call(&self, signal: Signal) {
        match self {
            Callback::Fn(f) => f(signal),
            #[cfg(not(tether_loom))]
            Callback::Sink(sink) => {
                if let Some(sink) = sink.upgrade() {
                    sink.signal(signal);
                }
            }
        }
    }
}

/// Cheap clonable cancellation handle for one request. Clones share the same state.
#[derive(Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared with the request driven under this context when their ids are equal.
    id: std::sync::Arc<str>,
    /// Lock-free mirror of `State::level` (low 2 bits) and of the cause (the next 2
    /// bits, meaningful once the level is above `Live`); written only under the lock.
    level: AtomicU8,
    state: Mutex<State>,
}

struct State {
    level: Level,
    /// Why the level first rose; meaningless while `Live`.
    cause: Cause,
    /// The level of the round most recently started by a deliverer.
    delivered: Level,
    delivering: bool,
    /// A listener was added after `delivered` rose above `Live` and still needs it.
    late: bool,
    next_listener: u64,
    /// Held weakly so a long-lived parent does not keep every request alive.
    children: Vec<Weak<Inner>>,
    listeners: Listeners<Listener>,
    stop_waiters: Waiters,
    kill_waiters: Waiters,
}

struct Listener {
    id: ListenerId,
    /// Highest level this listener has been (or is being) told about.
    seen: Level,
    /// `None` while the deliverer has it out to call it without the lock.
    f: Option<Callback>,
}

impl Context {
    /// Create a live context named `id` (used in logs and `Debug` only).
    ///
    /// A request driven under a context with its own id shares the context's copy of
    /// the id (no second allocation): name a request's context after the request.
    pub fn new(id: impl Into<std::sync::Arc<str>>) -> Context {
        Context {
            inner: Arc::new(Inner {
                id: id.into(),
                level: AtomicU8::new(Level::Live as u8),
                state: Mutex::new(State {
                    level: Level::Live,
                    cause: Cause::Caller,
                    delivered: Level::Live,
                    delivering: false,
                    late: false,
                    next_listener: 0,
                    children: Vec::new(),
                    listeners: Listeners::default(),
                    stop_waiters: Waiters::new(),
                    kill_waiters: Waiters::new(),
                }),
            }),
        }
    }

    /// The id given to [`Context::new`].
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The id, shared (for a request whose id it equals).
    pub(crate) fn id_shared(&self) -> &std::sync::Arc<str> {
        &self.inner.id
    }

    /// Current level (one atomic load, no lock).
    pub fn level(&self) -> Level {
        self.inner.load()
    }

    /// Ask for a graceful stop ([`Cause::Caller`]). No-op if already stopped or killed.
    pub fn stop(&self) {
        self.stop_with(Cause::Caller);
    }

    /// Ask for an immediate stop ([`Cause::Caller`]). No-op if already killed.
    pub fn kill(&self) {
        self.kill_with(Cause::Caller);
    }

    /// [`stop`](Context::stop), saying why. The cause is kept only if this is the
    /// context's first cancellation.
    pub fn stop_with(&self, cause: Cause) {
        self.inner.raise(Level::Stopped, cause);
    }

    /// [`kill`](Context::kill), saying why. The cause is kept only if this is the
    /// context's first cancellation (a kill after a stop keeps the stop's cause).
    pub fn kill_with(&self, cause: Cause) {
        self.inner.raise(Level::Killed, cause);
    }

    /// Why the context was cancelled: `None` while live, else the first cause given
    /// (one atomic load, no lock).
    pub fn cause(&self) -> Option<Cause> {
        let word = self.inner.level.load(Ordering::Acquire);
        (Level::from_u8(word & 0b11) > Level::Live).then(|| Cause::from_code(word >> 2))
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
            key: None,
        }
    }

    /// A future that resolves once the context is killed.
    pub fn killed(&self) -> Signalled {
        Signalled {
            inner: self.inner.clone(),
            target: Level::Killed,
            key: None,
        }
    }

    /// How many [`stopped`](Context::stopped) / [`killed`](Context::killed) futures are
    /// currently parked on this context: polled, pending, and neither woken nor dropped
    /// since. A diagnostic for leak checks; it takes the context's lock.
    pub fn waiters(&self) -> usize {
        let st = lock(&self.inner.state);
        st.stop_waiters.len() + st.kill_waiters.len()
    }

    /// Link `child` so that it is stopped/killed whenever this context is, in link order
    /// and before this context's listeners and waiters. The link is weak: a dropped child
    /// is pruned. If this context is already stopped or killed, the child is signalled
    /// at once.
    pub fn link_child(&self, child: &Context) {
        let (level, cause) = {
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
            (st.level, st.cause)
        };
        // Outside the lock: the child may be this context (a cycle), and its level check
        // is what ends the recursion. A later round may signal it again; that is a no-op.
        if level > Level::Live {
            child.inner.raise(level, cause);
        }
    }

    /// Register a synchronous callback run by whichever thread delivers a level change.
    ///
    /// If the context is already stopped/killed, the listener is called once with the
    /// delivered signal (at once, or by the thread currently delivering, so that it never
    /// sees `Kill` before `Stop`). A context that is killed releases its listeners after
    /// calling them, since nothing can follow `Kill`.
    pub fn add_listener(&self, f: impl Fn(Signal) + Send + Sync + 'static) -> ListenerId {
        self.add_callback(Callback::Fn(Box::new(f)))
    }

    /// [`add_listener`](Self::add_listener) for a weakly held [`Sink`] (nothing
    /// allocated for it, where a closure capturing the weak handle would be boxed).
    #[cfg(not(tether_loom))]
    pub(crate) fn add_sink(&self, sink: std::sync::Weak<dyn Sink>) -> ListenerId {
        self.add_callback(Callback::Sink(sink))
    }

    fn add_callback(&self, f: Callback) -> ListenerId {
        let mut st = lock(&self.inner.state);
        let id = ListenerId(std::num::NonZeroU64::MIN.saturating_add(st.next_listener));
        st.next_listener += 1;
        // Most contexts carry one listener (the driver's): it is held inline.
        st.listeners.push(Listener {
            id,
            seen: Level::Live,
            f: Some(f),
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
            st.listeners.remove_first(|l| l.id == id)
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
        Level::from_u8(self.level.load(Ordering::Acquire) & 0b11)
    }

    fn raise(&self, target: Level, cause: Cause) {
        if self.load() >= target {
            return;
        }
        let mut st = lock(&self.state);
        if st.level >= target {
            return;
        }
        if st.level == Level::Live {
            st.cause = cause; // the first cause wins
        }
        st.level = target;
        // Release: pairs with the Acquire load in `load`.
        self.level
            .store(target as u8 | st.cause.code() << 2, Ordering::Release);
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
            in_flight: Listeners::default(),
        };
        let mut st = first;
        let mut wake = Woken::default();
        let mut orphans: Listeners<Listener> = Listeners::default();
        loop {
            let target = st.level;
            let cause = st.cause;
            let fresh = target > st.delivered;
            if !fresh && !st.late {
                st.delivering = false;
                drop(st);
                guard.armed = false;
                drop(orphans);
                wake.wake_all();
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
            mem::take(&mut wake).wake_all();

            for w in &children {
                if let Some(child) = upgrade(w) {
                    child.raise(target, cause);
                }
            }
            drop(children);
            let signal = target.signal();
            for l in guard.in_flight.as_slice() {
                if let Some(f) = &l.f {
                    f.call(signal);
                }
            }
            let mut back = mem::take(&mut guard.in_flight);
            if target == Level::Killed {
                // Nothing follows `Kill`: release them here, outside the lock.
                back = Listeners::default();
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
    listeners: Listeners<Listener>,
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
                .as_mut_slice()
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
fn put_back(st: &mut State, mut back: Listeners<Listener>) -> Listeners<Listener> {
    back.retain_mut(|l| {
        match st
            .listeners
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.id == l.id)
        {
            Some(entry) => {
                entry.f = l.f.take();
                false
            }
            None => true,
        }
    });
    back
}

/// The waiters a level change releases, taken under the lock and woken outside it.
#[derive(Default)]
struct Woken {
    stop: Waiters,
    kill: Waiters,
}

impl Woken {
    /// Stop waiters first, then kill waiters, each in registration order.
    fn wake_all(self) {
        self.stop.into_iter().chain(self.kill).for_each(Waker::wake);
    }
}

fn take_waiters(st: &mut State, level: Level) -> Woken {
    let mut woken = Woken::default();
    if level >= Level::Stopped {
        woken.stop = mem::take(&mut st.stop_waiters);
    }
    if level == Level::Killed {
        woken.kill = mem::take(&mut st.kill_waiters);
    }
    woken
}

/// Keeps a panicking listener, child or waker from wedging the context: without it
/// `delivering` would stay set and no later level change would ever be delivered.
struct DeliveryGuard<'a> {
    inner: &'a Inner,
    armed: bool,
    /// Listeners taken out for the current round, returned to their entries on unwind.
    in_flight: Listeners<Listener>,
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
        woken.wake_all();
    }
}

/// Future returned by [`Context::stopped`] and [`Context::killed`]; resolves once the
/// context reaches the awaited level. Owns a clone of the context, so it is `'static`.
#[must_use = "futures do nothing unless polled"]
pub struct Signalled {
    inner: Arc<Inner>,
    target: Level,
    /// Where this future's waker is parked; `None` before the first pending poll and
    /// once the future saw its level.
    key: Option<Key>,
}

impl Future for Signalled {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.inner.load() >= this.target {
            // The key (if any) is dead: its list was or is about to be drained.
            this.key = None;
            return Poll::Ready(());
        }
        let mut st = lock(&this.inner.state);
        // `raise` changes the level under this lock, so either it runs after our push
        // and its deliverer wakes us, or we see its level here.
        if st.level >= this.target {
            this.key = None;
            return Poll::Ready(());
        }
        let list = st.waiters_mut(this.target);
        let displaced = match this.key {
            Some(key) => list.replace(key, cx.waker()),
            None => {
                this.key = Some(list.insert(cx.waker().clone()));
                None
            }
        };
        drop(st);
        // Outside the lock: the old waker may be the last handle on another task.
        drop(displaced);
        Poll::Pending
    }
}

impl Drop for Signalled {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let removed = {
            let mut st = lock(&self.inner.state);
            // At or past the target the list holding `key` was or is about to be drained
            // (its deliverer wakes our stale waker once, harmlessly); the key must not be
            // used on what that list holds afterwards.
            if st.level >= self.target {
                return;
            }
            st.waiters_mut(self.target).remove(key)
        };
        // Outside the lock, as in `poll`.
        drop(removed);
    }
}

impl State {
    fn waiters_mut(&mut self, target: Level) -> &mut Waiters {
        if target == Level::Killed {
            &mut self.kill_waiters
        } else {
            &mut self.stop_waiters
        }
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
mod tests;
