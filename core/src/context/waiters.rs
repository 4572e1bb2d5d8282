//! The keyed waker list behind [`Signalled`](super::Signalled) futures.
//!
//! Owns: the wakers parked for one target level of one context, in registration order,
//! each under a key that its future keeps, so that a re-poll replaces that future's own
//! waker and a dropped future takes its waker out (bug 3: a plain `Vec` kept the waker of
//! every dropped future, and with it that future's task, until the level changed).
//! Must not touch: the context's lock or any waking. The context calls in here under its
//! lock and wakes what a drained list yields only after releasing it; wakers displaced
//! by [`Waiters::replace`] or [`Waiters::remove`] are handed back for the same reason
//! (dropping a waker can run arbitrary code, such as freeing a task).

use core::task::Waker;
use std::mem;

/// Where one parked future's waker lives. Valid from [`Waiters::insert`] until that slot
/// is removed or the list is drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Key(u32);

/// "No slot": the end of a chain.
const NIL: u32 = u32::MAX;

/// A doubly linked list threaded through a slab: insertion at the tail, replacement and
/// removal by key are O(1), and draining yields the wakers in registration order, the
/// order in which the `Vec` this replaces woke them. Indices are `u32` to keep the two
/// lists in every context small.
pub(super) struct Waiters {
    slots: Vec<Slot>,
    head: u32,
    tail: u32,
    /// First free slot; free slots are chained through `Slot::next`.
    free: u32,
    len: u32,
}

struct Slot {
    /// `None` exactly while the slot is on the free list.
    waker: Option<Waker>,
    prev: u32,
    next: u32,
}

/// An emptied list drops its slab if it grew past this many slots: a burst of parked
/// futures must not pin its peak memory for the rest of a long-lived context, while a
/// context that parks one or two futures at a time keeps reusing its slab.
const KEEP_CAPACITY: usize = 16;

impl Waiters {
    pub(super) const fn new() -> Waiters {
        Waiters {
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
            free: NIL,
            len: 0,
        }
    }

    /// How many wakers are parked.
    pub(super) fn len(&self) -> usize {
        self.len as usize
    }

    /// Park `waker` at the tail.
    pub(super) fn insert(&mut self, waker: Waker) -> Key {
        let i = if self.free == NIL {
            let i = u32::try_from(self.slots.len())
                .ok()
                .filter(|&i| i != NIL)
                .expect("fewer than u32::MAX futures parked on one context");
            self.slots.push(Slot {
                waker: None,
                prev: NIL,
                next: NIL,
            });
            i
        } else {
            let i = self.free;
            self.free = self.slots[i as usize].next;
            i
        };
        let slot = &mut self.slots[i as usize];
        slot.waker = Some(waker);
        slot.prev = self.tail;
        slot.next = NIL;
        match self.tail {
            NIL => self.head = i,
            tail => self.slots[tail as usize].next = i,
        }
        self.tail = i;
        self.len += 1;
        Key(i)
    }

    /// Make `key`'s slot hold `waker`, keeping its place in the order. Returns the waker it
    /// displaced, if any, for the caller to drop outside its lock; a waker that would wake
    /// the same task is kept and nothing is cloned.
    pub(super) fn replace(&mut self, key: Key, waker: &Waker) -> Option<Waker> {
        let parked = self
            .slots
            .get_mut(key.0 as usize)
            .and_then(|s| s.waker.as_mut())
            .expect("a parked future's key stays valid until its list is drained");
        if parked.will_wake(waker) {
            return None;
        }
        Some(mem::replace(parked, waker.clone()))
    }

    /// Unpark `key`'s waker and return it, for the caller to drop outside its lock.
    /// `None` if `key` holds nothing (this list was drained since).
    pub(super) fn remove(&mut self, key: Key) -> Option<Waker> {
        let i = key.0;
        let slot = self.slots.get_mut(i as usize)?;
        let waker = slot.waker.take()?;
        let (prev, next) = (slot.prev, slot.next);
        slot.next = self.free;
        self.free = i;
        match prev {
            NIL => self.head = next,
            prev => self.slots[prev as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.slots[next as usize].prev = prev,
        }
        self.len -= 1;
        if self.len == 0 {
            // Nothing is parked, so no key into this list is live: start over.
            if self.slots.capacity() > KEEP_CAPACITY {
                *self = Waiters::new();
            } else {
                self.slots.clear();
                (self.head, self.tail, self.free) = (NIL, NIL, NIL);
            }
        }
        Some(waker)
    }
}

impl Default for Waiters {
    fn default() -> Waiters {
        Waiters::new()
    }
}

/// Drains a list: its wakers in registration order.
pub(super) struct Drain {
    slots: Vec<Slot>,
    next: u32,
}

impl IntoIterator for Waiters {
    type Item = Waker;
    type IntoIter = Drain;

    fn into_iter(self) -> Drain {
        Drain {
            next: self.head,
            slots: self.slots,
        }
    }
}

impl Iterator for Drain {
    type Item = Waker;

    fn next(&mut self) -> Option<Waker> {
        let slot = self.slots.get_mut(self.next as usize)?;
        self.next = slot.next;
        slot.waker.take()
    }
}

#[cfg(all(test, not(tether_loom)))]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::task::Wake;

    /// A waker that logs its id when woken.
    struct Id(usize, Arc<Mutex<Vec<usize>>>);

    impl Wake for Id {
        fn wake(self: Arc<Self>) {
            self.1.lock().expect("test log").push(self.0);
        }
    }

    /// The ids `list` wakes, in order.
    fn drained(list: Waiters, log: &Arc<Mutex<Vec<usize>>>) -> Vec<usize> {
        list.into_iter().for_each(Waker::wake);
        std::mem::take(&mut *log.lock().expect("test log"))
    }

    #[test]
    fn removal_at_head_middle_and_tail_keeps_the_rest_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let waker = |id| Waker::from(Arc::new(Id(id, log.clone())));
        let mut list = Waiters::new();
        let keys: Vec<Key> = (0..5).map(|id| list.insert(waker(id))).collect();
        for i in [0, 2, 4] {
            assert!(list.remove(keys[i]).is_some());
        }
        // Removing twice finds nothing: the slot is on the free list.
        assert!(list.remove(keys[2]).is_none());
        assert_eq!(list.len(), 2);
        // Reuses freed slots, yet is woken after the older survivors.
        list.insert(waker(5));
        list.insert(waker(6));
        assert_eq!(list.slots.len(), 5);
        assert_eq!(list.len(), 4);
        assert_eq!(drained(list, &log), vec![1, 3, 5, 6]);
    }

    #[test]
    fn emptied_list_releases_a_large_slab_and_keeps_a_small_one() {
        let mut list = Waiters::new();
        let keys: Vec<Key> = (0..100)
            .map(|_| list.insert(Waker::noop().clone()))
            .collect();
        keys.into_iter().for_each(|k| drop(list.remove(k)));
        assert_eq!((list.len(), list.slots.capacity()), (0, 0));
        let keys: Vec<Key> = (0..3).map(|_| list.insert(Waker::noop().clone())).collect();
        let kept = list.slots.capacity();
        keys.into_iter().for_each(|k| drop(list.remove(k)));
        assert_eq!((list.slots.len(), list.slots.capacity()), (0, kept));
        assert_eq!(list.insert(Waker::noop().clone()), Key(0));
    }

    #[test]
    fn the_slab_is_kept_up_to_exactly_its_limit() {
        let mut list = Waiters::new();
        let fill = |list: &mut Waiters, n: usize| -> Vec<Key> {
            (0..n).map(|_| list.insert(Waker::noop().clone())).collect()
        };
        let keys = fill(&mut list, KEEP_CAPACITY);
        assert_eq!(list.slots.capacity(), KEEP_CAPACITY);
        keys.into_iter().for_each(|k| drop(list.remove(k)));
        assert_eq!(list.slots.capacity(), KEEP_CAPACITY, "at the limit: kept");
        let keys = fill(&mut list, KEEP_CAPACITY + 1);
        assert!(list.slots.capacity() > KEEP_CAPACITY);
        keys.into_iter().for_each(|k| drop(list.remove(k)));
        assert_eq!(list.slots.capacity(), 0, "past the limit: released");
    }
}
