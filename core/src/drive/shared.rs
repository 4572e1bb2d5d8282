//! [`Shared`]: the part of a request that the context listener, the first-token hint,
//! the consumer's `Drop` and the watchdog reach from other threads, and the actions they
//! carry out off the consumer's poller (spawn the abort, arm the cancel deadlines, wake
//! the consumer).

use std::task::Waker;

use super::slot::EngineSlot;
use super::timers::Timer;
use super::watchdog::{OffPoller, Watchdog};
use super::AdapterInner;
use crate::context::{Context, Signal};
use crate::engine::{FirstTokenSink, GenerateContext, HintHandle};
use crate::lifecycle::deadlines::CancelLimits;
use crate::lifecycle::{Actions, Delivery, Event, SharedState};
use crate::sync::{downgrade, lock, Arc, Mutex};

/// The part of a request reachable from other threads.
pub(crate) struct Shared {
    pub(super) cell: SharedState,
    /// The consumer's waker (the poller's, or `generate`'s during setup).
    pub(super) waker: Mutex<Option<Waker>>,
    pub(super) adapter: Arc<AdapterInner>,
    pub(super) context: Context,
    pub(super) request_id: std::sync::Arc<str>,
    /// This request's own cancel limits, when they differ from the adapter's (boxed:
    /// most requests use the adapter's, and every request carries this word).
    pub(super) cancel_override: Option<Box<CancelLimits>>,
    /// The watchdog's side: `None` until a cancel deadline is armed or the engine is
    /// handed over, so the happy path carries one empty word here.
    pub(super) off: Mutex<Option<Box<OffPoller>>>,
}

impl Shared {
    /// The cancel limits this request runs under.
    pub(super) fn limits(&self) -> &CancelLimits {
        self.cancel_override
            .as_deref()
            .unwrap_or(&self.adapter.limits.cancel)
    }

    /// The engine's out-of-band first-token hint.
    fn first_token_hint(this: &Arc<Self>) {
        let (_, acts) = this.cell.apply(Event::FirstTokenHint);
        Shared::perform_off_consumer(this, acts);
    }

    pub(super) fn signal(this: &Arc<Self>, signal: Signal) {
        let event = match signal {
            Signal::Stop => Event::Stop,
            Signal::Kill => Event::Kill,
        };
        let (_, acts) = this.cell.apply(event);
        Shared::perform_off_consumer(this, acts);
    }

    /// Carry out actions decided away from the poller (listener, hint, watchdog).
    /// Those events never forward, emit or finish: that is the consumer's side.
    pub(super) fn perform_off_consumer(this: &Arc<Self>, acts: Actions) {
        debug_assert_eq!(acts.deliver, Delivery::Nothing);
        Shared::abort_and_arm(this, acts);
        if acts.wake {
            if let Some(w) = lock(&this.waker).as_ref() {
                w.wake_by_ref();
            }
        }
    }

    /// The engine-facing half of any actor's actions: spawn the abort if one is due,
    /// and start the cancel clocks they start.
    pub(super) fn abort_and_arm(this: &Arc<Self>, acts: Actions) {
        if acts.abort {
            Shared::spawn_abort(this);
        }
        Shared::arm(this, acts, None);
    }

    fn spawn_abort(this: &Arc<Self>) {
        if let Some(obs) = &this.adapter.config.observer {
            obs.on_abort(&this.request_id);
        }
        let ctx = Shared::generate_context(this);
        let adapter = this.adapter.clone();
        this.adapter
            .runtime
            .spawn(Box::pin(async move { adapter.engine.abort(ctx).await }));
        // A watchdog waiting on this abort's deadline, or draining for it, is done.
        Shared::wake_watchdog(this);
    }

    /// Arm the cancel deadlines `acts` asks for and hand over `engine` for draining;
    /// spawn the watchdog the first time, wake it afterwards. Nothing (no clock read,
    /// no lock) when there is nothing to arm or hand over.
    pub(super) fn arm(this: &Arc<Self>, acts: Actions, engine: Option<EngineSlot>) {
        // Which clocks start, and how long they run, is the pure layer's call.
        if !this.limits().started_by(&acts) && engine.is_none() {
            return;
        }
        let rt = &this.adapter.runtime;
        let now = rt.now();
        let (spawn, waker) = {
            let mut off = lock(&this.off);
            let off = off.get_or_insert_with(Box::default);
            off.anchors.start(&acts, now);
            if engine.is_some() {
                off.handoff = engine;
            }
            let spawn = !off.spawned;
            off.spawned = true;
            (spawn, off.waker.clone())
        };
        if spawn {
            rt.spawn(Box::pin(Watchdog {
                shared: this.clone(),
                timer: Timer::default(),
                engine: None,
            }));
        } else if let Some(w) = waker {
            w.wake();
        }
    }

    pub(super) fn wake_watchdog(this: &Arc<Self>) {
        let waker = lock(&this.off).as_ref().and_then(|off| off.waker.clone());
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub(super) fn generate_context(this: &Arc<Self>) -> GenerateContext {
        #[cfg(not(tether_loom))]
        let hint: HintHandle = downgrade::<Shared>(this);
        #[cfg(tether_loom)]
        let hint: HintHandle = std::sync::Arc::new(LoomHint(downgrade(this)));
        GenerateContext::with_hint(this.context.clone(), this.request_id.clone(), hint)
    }

    /// Store the consumer's waker (only [`register`] calls this, when it changed).
    pub(super) fn register(&self, waker: &Waker) {
        *lock(&self.waker) = Some(waker.clone());
    }
}

#[cfg(not(tether_loom))]
impl FirstTokenSink for Shared {
    fn first_token(self: Arc<Self>) {
        Shared::first_token_hint(&self);
    }
}

/// The loom build's hint handle: the model's weak reference in a plain `std` allocation.
#[cfg(tether_loom)]
struct LoomHint(crate::sync::Weak<Shared>);

#[cfg(tether_loom)]
impl FirstTokenSink for LoomHint {
    fn first_token(self: std::sync::Arc<Self>) {
        if let Some(shared) = crate::sync::upgrade(&self.0) {
            Shared::first_token_hint(&shared);
        }
    }
}
