//! Synchronization primitives, mapped to [loom](https://docs.rs/loom) under
//! `cfg(tether_loom)` so the races in [`crate::context`] and [`crate::drive`] can be
//! model-checked. Every atomic, `Arc` and `Mutex` in this crate comes from here; nothing
//! outside this module may name `std::sync` directly for shared state.
//!
//! The cfg is project-specific (`--cfg tether_loom`, not `--cfg loom`) because a global
//! `--cfg loom` changes the code of some of smol's dependencies and breaks their build.
//!
//! # `Weak` under loom
//!
//! loom has no `Weak`, so the loom build models one on top of loom's `Arc` (the crate's
//! [`Arc`] stays loom's own, and no code outside this module changes): a [`Weak`] holds a
//! loom `Arc` clone, and each allocation counts, on the side, how many of its loom `Arc`s
//! are held by `Weak`s. Its *owners* are all its other loom `Arc`s, so
//! `Arc::strong_count` minus that count is exactly the strong count `std` would have.
//! [`upgrade`] first takes a probe (a clone counted as weak, so that two racing upgrades
//! never mistake each other's probe for an owner), then reads the owner count: zero
//! gives `None`, otherwise the probe becomes the returned `Arc` with no loom operation in
//! between, which is what `std`'s compare-and-swap on the strong count guarantees.
//! [`is_dead`] is the same probe and read. Bookkeeping happens next to a loom `Arc` clone
//! or drop with no loom operation in between, so no loom thread ever sees one without
//! the other.
//!
//! loom's scheduler treats an `Arc` drop as independent of an earlier `strong_count`
//! read, so from a schedule where the read came first it would never try the owner's
//! drop before it (measured: with the drop on a spawned thread, the failed upgrade was
//! never explored). The probe therefore also calls loom's `Arc::get_mut` before the read,
//! which loom orders against every drop in both directions.
//!
//! What it explores: an upgrade (or `is_dead`) that fails because the last owner was
//! dropped concurrently, one that wins just before that drop, and racing upgrades.
//!
//! What it cannot:
//! - the value is not dropped when its last owner goes, only when its last `Weak` goes
//!   too (the `Weak`s keep loom's allocation alive): a model cannot observe side effects
//!   of that drop at the point `std` would run them (it runs later, possibly on another
//!   thread or under another lock, such as a parent context's when a dead link is
//!   pruned), and a cycle through a `Weak` is a real cycle, which loom reports as a leak;
//! - each upgrade and `is_dead` costs four loom operations where `std` has one atomic,
//!   so models that upgrade often explore more interleavings than the code has;
//! - `Weak::new`, `weak_count` and `ptr_eq` are not modelled (the crate uses none).
#![cfg_attr(not(any(feature = "internals", tether_loom)), allow(unreachable_pub))]

#[cfg(not(tether_loom))]
pub use std::sync::{Arc, Mutex, MutexGuard, Weak};

#[cfg(tether_loom)]
pub use loom::sync::{Arc, Mutex, MutexGuard};

#[cfg(tether_loom)]
pub use loom_weak::{downgrade, is_dead, upgrade, Weak};

/// Atomic integer and boolean types.
pub mod atomic {
    #[cfg(not(tether_loom))]
    pub use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
    // Used by tests and models only.
    #[cfg(all(not(tether_loom), any(test, feature = "internals")))]
    pub use std::sync::atomic::AtomicBool;

    #[cfg(tether_loom)]
    pub use loom::sync::atomic::{
        AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
    };
}

/// Lock a mutex, recovering the data if another thread panicked while holding it.
///
/// A panic inside an engine callback must not turn every later cancellation into a
/// second panic: the data guarded here (waker lists, listener lists) stays consistent
/// across a panic because every critical section is a handful of pushes and takes.
#[cfg(not(tether_loom))]
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lock a mutex (loom build: loom's mutex does not poison in a way we can recover).
#[cfg(tether_loom)]
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("loom mutex poisoned")
}

/// Make a weak reference (under loom: the model described in the module doc).
#[cfg(not(tether_loom))]
pub fn downgrade<T: ?Sized>(a: &Arc<T>) -> Weak<T> {
    Arc::downgrade(a)
}

/// Upgrade a weak reference: `None` once every strong owner is gone.
#[cfg(not(tether_loom))]
pub fn upgrade<T: ?Sized>(w: &Weak<T>) -> Option<Arc<T>> {
    w.upgrade()
}

/// Whether `w` can never be upgraded again (no strong owner is left).
#[cfg(not(tether_loom))]
pub fn is_dead<T: ?Sized>(w: &Weak<T>) -> bool {
    w.strong_count() == 0
}

/// The loom build's `Weak` (see the module doc).
#[cfg(tether_loom)]
mod loom_weak {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::fmt;

    use super::Arc;

    std::thread_local! {
        /// Per allocation (keyed by its address), how many of its loom `Arc`s `Weak`s
        /// hold. Thread-local because loom runs every thread of a model as a coroutine on
        /// the OS thread that called `model`: the map is shared by one model's threads
        /// and by no other test, so neither a concurrent test reusing a freed address nor
        /// a failed model's leftovers can skew another model's counts.
        static WEAK_HELD: RefCell<BTreeMap<usize, usize>> = const { RefCell::new(BTreeMap::new()) };
    }

    fn address<T: ?Sized>(a: &Arc<T>) -> usize {
        Arc::as_ptr(a).cast::<()>() as usize
    }

    fn weak_held(addr: usize) -> usize {
        WEAK_HELD.with(|m| m.borrow().get(&addr).copied().unwrap_or(0))
    }

    /// One loom `Arc` counted as held by a `Weak`; uncounted on drop.
    struct Held(usize);

    impl Held {
        /// Count a clone just taken, with no loom operation since: together they are one
        /// step for every other loom thread.
        fn count(addr: usize) -> Held {
            WEAK_HELD.with(|m| *m.borrow_mut().entry(addr).or_insert(0) += 1);
            Held(addr)
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            WEAK_HELD.with(|m| {
                let mut m = m.borrow_mut();
                let n = m
                    .get_mut(&self.0)
                    .expect("a counted weak reference is in the map");
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.0);
                }
            });
        }
    }

    /// Loom model of `std::sync::Weak` (see the module doc of [`crate::sync`]).
    pub struct Weak<T: ?Sized> {
        // Declared first, so dropped first: the loom `Arc` is released (a loom operation)
        // before `held` uncounts it (none), so no loom thread can see the count lowered
        // while the `Arc` is still there, which would make a dead value look owned.
        arc: Arc<T>,
        held: Held,
    }

    impl<T: ?Sized> Weak<T> {
        /// A clone to decide with, counted as weak so that a racing upgrade does not take
        /// it for an owner, and fenced (see below) so that loom tries the owner's drop on
        /// both sides of the decision.
        fn probe(&self) -> Weak<T> {
            let mut probe = self.clone();
            // loom's scheduler sees an `Arc` drop as independent of an earlier
            // `strong_count` read, so from a schedule where the read came first it would
            // never try the drop first. `get_mut` (never `Some` here: `self` holds another
            // clone) counts as a drop for that purpose, and drops are ordered both ways.
            let fenced = Arc::get_mut(&mut probe.arc).is_none();
            debug_assert!(fenced, "a probe is never the only loom Arc");
            probe
        }

        /// Strong owners left: every loom `Arc` of the allocation that no `Weak` holds.
        /// One loom operation (the `strong_count` read) and a map read right after it.
        fn owners(&self) -> usize {
            let all = Arc::strong_count(&self.arc);
            all.checked_sub(weak_held(self.held.0))
                .expect("every counted weak reference holds a loom Arc")
        }
    }

    impl<T: ?Sized> Clone for Weak<T> {
        fn clone(&self) -> Weak<T> {
            let arc = self.arc.clone();
            let held = Held::count(self.held.0);
            Weak { arc, held }
        }
    }

    impl<T: ?Sized> fmt::Debug for Weak<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("(Weak)")
        }
    }

    /// Make a weak reference.
    pub fn downgrade<T: ?Sized>(a: &Arc<T>) -> Weak<T> {
        let arc = a.clone();
        let held = Held::count(address(&arc));
        Weak { arc, held }
    }

    /// Upgrade a weak reference: `None` once every strong owner is gone.
    pub fn upgrade<T: ?Sized>(w: &Weak<T>) -> Option<Arc<T>> {
        let probe = w.probe();
        if probe.owners() == 0 {
            return None;
        }
        // No loom operation between the read above and this promotion: together they
        // are std's compare-and-swap from a non-zero strong count.
        let Weak { arc, held } = probe;
        drop(held);
        Some(arc)
    }

    /// Whether `w` can never be upgraded again (no strong owner is left).
    pub fn is_dead<T: ?Sized>(w: &Weak<T>) -> bool {
        w.probe().owners() == 0
    }
}
