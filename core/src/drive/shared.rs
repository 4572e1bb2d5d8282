//! [`Shared`]: the part of a request that the context listener, the first-token hint,
//! the consumer's `Drop` and the watchdog reach from other threads, and the actions they
//! carry out off the consumer's poller (queue the abort, arm the cancel deadlines, wake
//! the consumer).

use std::task::Waker;
use std::time::{Duration, Instant};

use super::abort_task::AbortQueue;
use super::log;
use super::slot::EngineSlot;
use super::watchdog::{OffPoller, Watch, Watchdog};
use super::AdapterInner;
use crate::context::{Context, Signal};
use crate::engine::{GenerateContext, HintHandle, HintSink, Metadata};
use crate::lifecycle::deadlines::CancelLimits;
use crate::lifecycle::{Actions, Delivery, Event, SharedState};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{downgrade, lock, Arc, Mutex};

/// The part of a request reachable from other threads.
pub(crate) struct Shared {
    pub(super) cell: SharedState,
    /// The consumer's waker (the poller's, or `generate`'s during setup).
    pub(super) waker: Mutex<Option<Waker>>,
    pub(super) adapter: Arc<AdapterInner>,
    pub(super) context: Context,
    /// The watchdog's side: `None` until a cancel deadline is armed or the engine is
    /// handed over, so the happy path carries one empty word here.
    pub(super) off: Mutex<Option<Box<OffPoller>>>,
    /// When the request was created, on the runtime's clock.
    pub(super) start: Instant,
    /// When the engine said the request was scheduled, as nanoseconds after `start`
    /// plus one (0: not yet; `ENDED_UNSCHEDULED`: the request ended without one). The
    /// first signal wins, and none counts after the end.
    scheduled: AtomicU64,
    /// What few requests carry: the caller's metadata, the model (only while tether's
    /// log events are listened to), cancel limits of their own, an id their context
    /// does not have. `None` on the hot path.
    pub(super) extras: Option<Box<SharedExtras>>,
}

/// `Shared::scheduled` of a request that ended with no scheduling signal (0: none yet;
/// any other code is the signal's time after the start in ns, plus one).
const ENDED_UNSCHEDULED: u64 = u64::MAX;

fn decode_queue_time(code: u64) -> Option<Duration> {
    match code {
        0 | ENDED_UNSCHEDULED => None,
        code => Some(Duration::from_nanos(code - 1)),
    }
}

/// The rarely present parts of [`Shared`].
#[derive(Debug, Default)]
pub(crate) struct SharedExtras {
    pub(super) metadata: Option<std::sync::Arc<Metadata>>,
    pub(super) model: Option<Box<str>>,
    /// This request's own cancel limits, when they differ from the adapter's.
    pub(super) cancel: Option<CancelLimits>,
    /// The request's id, when its context has another (a router's child context named
    /// otherwise); when they are equal, the context's is used.
    pub(super) request_id: Option<std::sync::Arc<str>>,
}

impl Shared {
    /// The shared part of a new request, created at `start`.
    pub(super) fn new(
        cell: SharedState,
        adapter: Arc<AdapterInner>,
        context: Context,
        extras: Option<Box<SharedExtras>>,
        start: Instant,
    ) -> Shared {
        Shared {
            cell,
            waker: Mutex::new(None),
            adapter,
            context,
            off: Mutex::new(None),
            start,
            scheduled: AtomicU64::new(0),
            extras,
        }
    }

    /// The request's id: its context's, unless the two differ.
    pub(super) fn request_id(&self) -> &std::sync::Arc<str> {
        match self.extras.as_ref().and_then(|e| e.request_id.as_ref()) {
            Some(own) => own,
            None => self.context.id_shared(),
        }
    }

    /// The model, for log events (`None` unless they were listened to at creation).
    pub(super) fn model(&self) -> Option<&str> {
        self.extras.as_ref()?.model.as_deref()
    }

    /// The engine's scheduling signal arrived at `now` (only the first one counts).
    pub(super) fn mark_scheduled(&self, now: Instant) {
        let after = now.saturating_duration_since(self.start);
        // At most `ENDED_UNSCHEDULED - 1`: 0 is "none yet", `ENDED_UNSCHEDULED` is "ended".
        let code = u64::try_from(after.as_nanos())
            .unwrap_or(u64::MAX)
            .min(ENDED_UNSCHEDULED - 2)
            + 1;
        let _ = self
            .scheduled
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// How long the request waited in the engine's queue, if the engine said.
    pub(super) fn queue_time(&self) -> Option<Duration> {
        decode_queue_time(self.scheduled.load(Ordering::Acquire))
    }

    /// The queue time as the request ends, kept as it is from now on: a scheduling
    /// signal after the end (an engine that reports late) no longer changes it, so the
    /// record the observer got and [`ResponseStream::record`](super::ResponseStream::record)
    /// agree.
    pub(super) fn end_queue_time(&self) {
        let _ = self.scheduled.compare_exchange(
            0,
            ENDED_UNSCHEDULED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The cancel limits this request runs under.
    pub(super) fn limits(&self) -> &CancelLimits {
        self.extras
            .as_ref()
            .and_then(|extras| extras.cancel.as_ref())
            .unwrap_or(&self.adapter.limits.cancel)
    }

    /// The engine's out-of-band first-token hint.
    fn first_token_hint(this: &Arc<Self>) {
        let (_, acts) = this.cell.apply(Event::FirstTokenHint);
        Shared::perform_off_consumer(this, acts);
    }

    /// The context listener: a stop or kill reached this request.
    pub(super) fn heard(this: &Arc<Self>, signal: Signal) {
        log::cancellation_seen(this, signal);
        Shared::signal(this, signal);
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

    /// The engine-facing half of any actor's actions: queue the abort if one is due
    /// (the adapter's abort task enters it, then starts the cancel clocks the step
    /// started), otherwise start those clocks here.
    pub(super) fn abort_and_arm(this: &Arc<Self>, acts: Actions) {
        if !acts.abort {
            if acts.arm_deferral {
                log::abort_deferred(this);
            }
            Shared::arm(this, acts, None);
            return;
        }
        log::abort_sent(this);
        if let Some(obs) = &this.adapter.config.observer {
            obs.on_abort(this.request_id());
        }
        AbortQueue::push(&this.adapter.aborts, &*this.adapter.runtime, this, acts);
    }

    /// Arm the cancel deadlines `acts` asks for and hand over `engine` for draining;
    /// spawn the watchdog the first time, wake it afterwards. Nothing (no clock read,
    /// no lock) when there is nothing to arm or hand over.
    pub(super) fn arm(this: &Arc<Self>, acts: Actions, engine: Option<EngineSlot>) {
        let watch = Shared::with_clocks(this, acts, engine, |off| {
            if off.spawned {
                return off.waker.clone().map_or(Watch::Nothing, Watch::Wake);
            }
            off.spawned = true;
            Watch::Spawn
        });
        match watch.unwrap_or(Watch::Nothing) {
            Watch::Nothing => {}
            Watch::Wake(waker) => waker.wake(),
            Watch::Spawn => this
                .adapter
                .runtime
                .spawn(Box::pin(Watchdog::new(this.clone()))),
        }
    }

    /// Start the clocks `acts` starts and hand over `engine`, then let `decide` say,
    /// under the watchdog's lock, what follows (start a watchdog, wake it, time the
    /// clocks itself). `None`, with no clock read and no lock, when there is nothing to
    /// start or hand over.
    pub(super) fn with_clocks<R>(
        this: &Arc<Self>,
        acts: Actions,
        engine: Option<EngineSlot>,
        decide: impl FnOnce(&mut OffPoller) -> R,
    ) -> Option<R> {
        // Which clocks start, and how long they run, is the pure layer's call.
        if !this.limits().started_by(&acts) && engine.is_none() {
            return None;
        }
        let now = this.adapter.runtime.now();
        let mut off = lock(&this.off);
        let off = off.get_or_insert_with(Box::default);
        off.anchors.start(&acts, now);
        if engine.is_some() {
            off.handoff = engine;
        }
        Some(decide(off))
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
        let metadata = this.extras.as_ref().and_then(|e| e.metadata.clone());
        GenerateContext::with_hint(
            this.context.clone(),
            this.request_id().clone(),
            metadata,
            hint,
        )
    }

    /// Store the consumer's waker (only [`register`] calls this, when it changed).
    pub(super) fn register(&self, waker: &Waker) {
        *lock(&self.waker) = Some(waker.clone());
    }
}

#[cfg(not(tether_loom))]
impl crate::context::Sink for Shared {
    fn signal(self: Arc<Self>, signal: Signal) {
        Shared::heard(&self, signal);
    }
}

#[cfg(not(tether_loom))]
impl HintSink for Shared {
    fn first_token(self: Arc<Self>) {
        Shared::first_token_hint(&self);
    }
    fn scheduled(self: Arc<Self>) {
        self.mark_scheduled(self.adapter.runtime.now());
    }
}

/// The loom build's hint handle: the model's weak reference in a plain `std` allocation.
#[cfg(tether_loom)]
struct LoomHint(crate::sync::Weak<Shared>);

#[cfg(tether_loom)]
impl HintSink for LoomHint {
    fn first_token(self: std::sync::Arc<Self>) {
        if let Some(shared) = crate::sync::upgrade(&self.0) {
            Shared::first_token_hint(&shared);
        }
    }
    fn scheduled(self: std::sync::Arc<Self>) {
        if let Some(shared) = crate::sync::upgrade(&self.0) {
            shared.mark_scheduled(shared.adapter.runtime.now());
        }
    }
}
