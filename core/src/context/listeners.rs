//! The listener list of a context, and of one delivery round.
//!
//! Owns: the listeners in registration order, with the first one held inline. Most
//! contexts have exactly one listener (the driver's), so registering it, removing it and
//! taking it out for a delivery round allocate nothing; a second listener moves the list
//! to a `Vec`.
//! Must not touch: the context's lock, the level, or the calling of listeners. The
//! context does all of that; this is storage.

use std::mem;

/// Listeners in registration order: none, one held inline, or several in a `Vec`.
#[derive(Default)]
pub(super) enum Listeners<L> {
    #[default]
    None,
    One(L),
    Many(Vec<L>),
}

impl<L> Listeners<L> {
    /// Append `listener` (registration order is delivery order).
    pub(super) fn push(&mut self, listener: L) {
        *self = match mem::take(self) {
            Listeners::None => Listeners::One(listener),
            Listeners::One(first) => Listeners::Many(vec![first, listener]),
            Listeners::Many(mut all) => {
                all.push(listener);
                Listeners::Many(all)
            }
        };
    }

    /// The listeners, in registration order.
    pub(super) fn as_slice(&self) -> &[L] {
        match self {
            Listeners::None => &[],
            Listeners::One(one) => std::slice::from_ref(one),
            Listeners::Many(all) => all,
        }
    }

    /// The listeners, in registration order, to change in place.
    pub(super) fn as_mut_slice(&mut self) -> &mut [L] {
        match self {
            Listeners::None => &mut [],
            Listeners::One(one) => std::slice::from_mut(one),
            Listeners::Many(all) => all,
        }
    }

    /// Take out the first listener `matches` picks, if any.
    pub(super) fn remove_first(&mut self, matches: impl Fn(&L) -> bool) -> Option<L> {
        match self {
            Listeners::None => None,
            Listeners::One(one) if matches(one) => match mem::take(self) {
                Listeners::One(one) => Some(one),
                // The arm above matched `One`.
                other => {
                    *self = other;
                    None
                }
            },
            Listeners::One(_) => None,
            Listeners::Many(all) => {
                let at = all.iter().position(matches)?;
                Some(all.remove(at))
            }
        }
    }

    /// Keep only the listeners `keep` says yes to (it may change them).
    pub(super) fn retain_mut(&mut self, mut keep: impl FnMut(&mut L) -> bool) {
        match self {
            Listeners::None => {}
            Listeners::One(one) => {
                if !keep(one) {
                    *self = Listeners::None;
                }
            }
            Listeners::Many(all) => all.retain_mut(keep),
        }
    }
}

impl<L> FromIterator<L> for Listeners<L> {
    fn from_iter<I: IntoIterator<Item = L>>(iter: I) -> Self {
        let mut listeners = Listeners::None;
        for listener in iter {
            listeners.push(listener);
        }
        listeners
    }
}

#[cfg(all(test, not(tether_loom)))]
mod tests {
    use super::Listeners;

    fn ids(l: &Listeners<u32>) -> Vec<u32> {
        l.as_slice().to_vec()
    }

    #[test]
    fn keeps_registration_order_across_its_shapes() {
        let mut l = Listeners::default();
        assert!(ids(&l).is_empty());
        l.push(1);
        assert!(
            matches!(l, Listeners::One(1)),
            "the first listener is inline"
        );
        l.push(2);
        l.push(3);
        assert_eq!(ids(&l), [1, 2, 3]);
        for x in l.as_mut_slice() {
            *x *= 10;
        }
        assert_eq!(ids(&l), [10, 20, 30]);
        let collected: Listeners<u32> = [4, 5].into_iter().collect();
        assert_eq!(ids(&collected), [4, 5]);
        let one: Listeners<u32> = [6].into_iter().collect();
        assert!(matches!(one, Listeners::One(6)));
    }

    #[test]
    fn removes_only_what_matches() {
        let mut l: Listeners<u32> = [1].into_iter().collect();
        assert_eq!(l.remove_first(|&x| x == 2), None);
        assert_eq!(ids(&l), [1]);
        assert_eq!(l.remove_first(|&x| x == 1), Some(1));
        assert!(matches!(l, Listeners::None));
        assert_eq!(l.remove_first(|&x| x == 1), None);
        let mut l: Listeners<u32> = [1, 2, 3, 2].into_iter().collect();
        assert_eq!(l.remove_first(|&x| x == 2), Some(2));
        assert_eq!(ids(&l), [1, 3, 2]);
    }

    #[test]
    fn retains_what_it_is_told_to_keep() {
        let mut l: Listeners<u32> = [1].into_iter().collect();
        l.retain_mut(|x| {
            *x += 1;
            true
        });
        assert_eq!(ids(&l), [2]);
        l.retain_mut(|_| false);
        assert!(matches!(l, Listeners::None));
        let mut l: Listeners<u32> = [1, 2, 3, 4].into_iter().collect();
        l.retain_mut(|x| *x % 2 == 0);
        assert_eq!(ids(&l), [2, 4]);
    }
}
