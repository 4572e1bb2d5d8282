//! Synchronization primitives, mapped to [loom](https://docs.rs/loom) under
//! `cfg(tether_loom)` so the races in [`crate::context`] and [`crate::drive`] can be
//! model-checked. Every atomic, `Arc` and `Mutex` in this crate comes from here; nothing
//! outside this module may name `std::sync` directly for shared state.
//!
//! The cfg is project-specific (`--cfg tether_loom`, not `--cfg loom`) because a global
//! `--cfg loom` changes the code of some of smol's dependencies and breaks their build.

#[cfg(not(tether_loom))]
pub use std::sync::{Arc, Mutex, MutexGuard, Weak};

#[cfg(tether_loom)]
pub use loom::sync::{Arc, Mutex, MutexGuard};

/// `loom` has no `Weak`; under loom the crate uses a strong `Arc` in its place (the
/// models are short-lived, so the cycle this could create does not matter there).
#[cfg(tether_loom)]
pub type Weak<T> = Arc<T>;

/// Atomic integer and boolean types.
pub mod atomic {
    #[cfg(not(tether_loom))]
    pub use std::sync::atomic::{
        AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
    };

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

/// Make a weak reference (under loom: a strong clone, see [`Weak`]).
#[cfg(not(tether_loom))]
pub fn downgrade<T: ?Sized>(a: &Arc<T>) -> Weak<T> {
    Arc::downgrade(a)
}

/// Upgrade a weak reference.
#[cfg(not(tether_loom))]
pub fn upgrade<T: ?Sized>(w: &Weak<T>) -> Option<Arc<T>> {
    w.upgrade()
}

/// Make a weak reference (under loom: a strong clone, see [`Weak`]).
#[cfg(tether_loom)]
pub fn downgrade<T: ?Sized>(a: &Arc<T>) -> Weak<T> {
    a.clone()
}

/// Upgrade a weak reference.
#[cfg(tether_loom)]
pub fn upgrade<T: ?Sized>(w: &Weak<T>) -> Option<Arc<T>> {
    Some(w.clone())
}
