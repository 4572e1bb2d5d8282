//! The watchdog: the one task a request may get, and only on the cancel path. It owns
//! what must happen whether or not the consumer polls (SPEC.md rule 11):
//!
//! - the cancel grace after a stop, and the deferral deadline of a deferred abort
//!   (the pure `lifecycle::deadlines::poll_timeout` / `handle_timeout` over the request's
//!   limits and the anchors the arming steps recorded), on one resettable timer;
//! - the engine after the consumer's end while a deferred abort is still owed (rule 2):
//!   the stream (or the pending `generate`) is handed over and drained, so its first
//!   token releases the abort and its own end discards it, and it is dropped only once
//!   the abort was sent or discarded.
//!
//! It is spawned by whichever actor first arms a cancel deadline or hands over the
//! engine, and ends as soon as nothing it owns still matters. A stop's grace alone,
//! started by the adapter's abort task right after it entered the engine's `abort`,
//! needs none: that task times it (`abort_task`), with [`fire`] as here. It must
//! not forward, emit or record anything: the consumer's side is over or is the poller's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};

use super::log;
use super::shared::Shared;
use super::slot::{release, EngineSlot};
use super::timers::Timer;
use crate::lifecycle::deadlines::{self, CancelAnchors, Due};
use crate::lifecycle::Actions;
use crate::sync::{lock, Arc};

/// The watchdog's mailbox in [`Shared`]: created on the cancel path only.
#[derive(Default)]
pub(crate) struct OffPoller {
    /// When the cancel clocks started.
    pub(crate) anchors: CancelAnchors,
    /// The running watchdog's waker.
    pub(crate) waker: Option<Waker>,
    /// An engine handed over by the consumer's side, for draining.
    pub(crate) handoff: Option<EngineSlot>,
    pub(crate) spawned: bool,
}

pub(crate) struct Watchdog {
    pub(crate) shared: Arc<Shared>,
    pub(crate) timer: Timer,
    pub(crate) engine: Option<EngineSlot>,
}

/// What arming the cancel clocks asks of the caller.
pub(crate) enum Watch {
    /// Nothing to time or drain.
    Nothing,
    /// A watchdog runs: wake it (it has new anchors or an engine).
    Wake(Waker),
    /// No watchdog runs: start one (the lock already marked it spawned).
    Spawn,
}

impl Watchdog {
    /// A watchdog for `shared`'s request, not started.
    pub(crate) fn new(shared: Arc<Shared>) -> Watchdog {
        Watchdog {
            shared,
            timer: Timer::default(),
            engine: None,
        }
    }

    /// Nothing is left to do: step down under the lock, so that an engine handed over
    /// after this point finds no watchdog and spawns a new one (which lets it go at
    /// once) instead of waiting forever in the mailbox. `false` if one arrived first.
    fn retire(shared: &Shared) -> bool {
        let mut off = lock(&shared.off);
        let Some(off) = off.as_mut() else {
            return true;
        };
        if off.handoff.is_some() {
            return false;
        }
        off.spawned = false;
        off.waker = None;
        true
    }
}

impl Future for Watchdog {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        let shared = &this.shared;
        let rt = &*shared.adapter.runtime;
        loop {
            // Register, then read: an actor that changes the state after our read
            // finds this waker (it wakes after its own state change).
            let anchors = {
                let mut off = lock(&shared.off);
                let Some(off) = off.as_mut() else {
                    return Poll::Ready(());
                };
                if !off.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    off.waker = Some(cx.waker().clone());
                }
                if let Some(slot) = off.handoff.take() {
                    this.engine = Some(slot);
                }
                off.anchors
            };
            let limits = shared.limits();
            let mut state = shared.cell.load();
            if let Some(engine) = this.engine.as_mut() {
                if state.drains_engine() {
                    if let Poll::Ready(event) = engine.poll_event(cx, shared, &mut None) {
                        // The item itself goes nowhere: the consumer is over.
                        let (_, acts) = shared.cell.apply(event);
                        Shared::perform_off_consumer(shared, acts);
                        continue;
                    }
                    // The poll may have released the abort (an in-stream hint).
                    state = shared.cell.load();
                }
                if !state.drains_engine() {
                    // The abort was sent or discarded: now the engine may go (rule 2).
                    release(this.engine.take(), shared.request_id());
                }
            }
            // The deadlines: wait for the next one that still matters, fire what is due.
            loop {
                let Some(next) = deadlines::poll_timeout(state, limits, &anchors) else {
                    if state.abort_deferred() {
                        // A deferral that never expires: the hint, the drained engine
                        // or a handover settles it, and each of them wakes us.
                        return Poll::Pending;
                    }
                    if Watchdog::retire(shared) {
                        return Poll::Ready(());
                    }
                    break; // an engine was handed over meanwhile: see to it first
                };
                if !this.timer.poll_until(next, cx, rt) {
                    return Poll::Pending;
                }
                // The timer fired at its armed deadline; if nothing is due (it moved
                // later), the next turn re-arms.
                if let Some(due) = deadlines::handle_timeout(state, limits, &anchors, rt.now()) {
                    fire(shared, due);
                    break;
                }
            }
        }
    }
}

/// A cancel deadline passed: feed it to the machine, log it if it did something, and
/// carry out what it decided. The caller read the state before this step, so the
/// deadline may have lost a race meanwhile (a kill, the engine's end): it then decides
/// nothing and logs nothing.
pub(crate) fn fire(shared: &Arc<Shared>, due: Due) {
    let (_, acts) = shared.cell.apply(due.event());
    match due {
        Due::Deferral if acts.abort => log::deferral_deadline_hit(shared),
        Due::CancelGrace if acts != Actions::default() => log::cancel_grace_expired(shared),
        _ => {}
    }
    Shared::perform_off_consumer(shared, acts);
}

#[cfg(all(test, not(tether_loom)))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event as TracingEvent, Metadata, Subscriber};

    use super::*;
    use crate::drive::tests::{shared_part, Frozen, Idle};
    use crate::drive::{Adapter, AdapterConfig};
    use crate::lifecycle::Event;
    use crate::protocol::Mode;

    /// Counts the warnings of tether's target.
    #[derive(Default)]
    struct Warnings(AtomicUsize);

    impl Subscriber for &'static Warnings {
        fn enabled(&self, _metadata: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _span: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _span: &Id, _values: &Record<'_>) {}
        fn record_follows_from(&self, _span: &Id, _follows: &Id) {}
        fn event(&self, event: &TracingEvent<'_>) {
            let meta = event.metadata();
            if meta.target() == log::TARGET && *meta.level() == tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn enter(&self, _span: &Id) {}
        fn exit(&self, _span: &Id) {}
    }

    /// A stopped request of `mode`, its stop applied (not carried out).
    fn stopped(adapter: &Adapter, mode: Mode) -> Arc<Shared> {
        let shared = shared_part(adapter, mode, Instant::now());
        let _ = shared.cell.apply(Event::Stop);
        shared
    }

    /// A deadline is logged only when feeding it did something: one that lost a race
    /// (here, fed again after it fired) is silent.
    #[test]
    fn a_deadline_that_decides_nothing_is_not_logged() {
        let warnings: &'static Warnings = Box::leak(Box::default());
        let adapter = Adapter::new(
            std::sync::Arc::new(Idle),
            Frozen(Instant::now()),
            AdapterConfig::default(),
        );
        let count = || warnings.0.load(Ordering::SeqCst);
        tracing::subscriber::with_default(warnings, || {
            let shared = stopped(&adapter, Mode::Aggregated);
            fire(&shared, Due::CancelGrace);
            assert_eq!(count(), 1, "the grace that forced the request");
            fire(&shared, Due::CancelGrace);
            assert_eq!(count(), 1, "a repeat");
            // No deferred abort: the deadline releases nothing.
            fire(&shared, Due::Deferral);
            assert_eq!(count(), 1, "a deferral deadline with nothing deferred");
            // Decode mode before the first token: the stop deferred the abort.
            let deferred = stopped(&adapter, Mode::Decode);
            fire(&deferred, Due::Deferral);
            assert_eq!(count(), 2, "the deferral deadline that sent the abort");
            fire(&deferred, Due::Deferral);
            assert_eq!(count(), 2, "a repeat");
        });
    }
}
