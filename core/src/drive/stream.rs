//! [`ResponseStream`]: the consumer's side of one request, and [`Shared`], the part of
//! it that the context listener, the first-token hint and the abort task also reach.
//!
//! The driver loop in `poll_next` is "feed events, then carry out actions until there
//! is an item to yield or nothing left to do": the owed terminal first, then the
//! timers, then the engine. Every decision comes from [`Cell::apply`], so the poller,
//! the listener (on whatever thread calls `stop`/`kill`), the hint and `Drop` never
//! decide the same thing twice.

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Instant;

use futures_core::Stream;
use pin_project::{pin_project, pinned_drop};
use tracing::Span;

use super::span;
use super::stats::{Outcome, RequestRecord, StatsRecorder};
use super::timers::Timers;
use super::{AdapterInner, AsyncTimer};
use crate::context::{Context, ListenerId, Signal};
use crate::engine::{ChunkStream, GenerateContext};
use crate::error::{BackendError, EngineError, ErrorKind};
use crate::lifecycle::{Actions, Cancel, Cell, Event, OutcomeKind, State, StepCache, Synth};
use crate::protocol::{Annotated, Chunk, FinishReason, Mode, Request, TraceLink};
use crate::sync::{downgrade, lock, upgrade, Arc, Mutex};

/// The part of a request reachable from other threads.
pub(crate) struct Shared {
    cell: Cell,
    /// The poller's waker (after the stream ends: the deferred-abort waiter's).
    waker: Mutex<Option<Waker>>,
    adapter: Arc<AdapterInner>,
    context: Context,
    request_id: std::sync::Arc<str>,
    /// When the first stop or kill landed: the cancel grace and the deferral deadline
    /// count from here, not from the consumer's next poll (a consumer held back by
    /// backpressure must not stretch them). Written once, on the cancel path only.
    cancelled_at: Mutex<Option<Instant>>,
}

impl Shared {
    /// The engine's out-of-band first-token hint.
    pub(crate) fn first_token_hint(this: &Arc<Self>) {
        let (_, acts) = this.cell.apply(Event::FirstTokenHint);
        Shared::act_off_poller(this, acts);
    }

    fn signal(this: &Arc<Self>, signal: Signal) {
        let event = match signal {
            Signal::Stop => Event::Stop,
            Signal::Kill => Event::Kill,
        };
        let (state, acts) = this.cell.apply(event);
        if state.is_cancelling() {
            let mut at = lock(&this.cancelled_at);
            if at.is_none() {
                *at = Some(this.adapter.runtime.now());
            }
        }
        Shared::act_off_poller(this, acts);
    }

    /// When the request was first stopped or killed, if it was.
    fn cancelled_at(&self) -> Option<Instant> {
        *lock(&self.cancelled_at)
    }

    /// Carry out actions decided away from the poller (listener, hint, deadline
    /// waiter). Those events never forward, emit or finish: that is the poller's.
    fn act_off_poller(this: &Arc<Self>, acts: Actions) {
        debug_assert!(!acts.forward && acts.emit.is_none() && acts.finish.is_none());
        if acts.abort {
            Shared::spawn_abort(this);
        }
        if acts.wake || acts.abort {
            if let Some(w) = lock(&this.waker).as_ref() {
                w.wake_by_ref();
            }
        }
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
    }

    fn generate_context(this: &Arc<Self>) -> GenerateContext {
        GenerateContext::with_hint(
            this.context.clone(),
            this.request_id.clone(),
            downgrade(this),
        )
    }

    fn register(&self, waker: &Waker) {
        let mut slot = lock(&self.waker);
        match &*slot {
            Some(old) if old.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }
}

/// What the engine's poll produced, kept until the machine decides about it.
enum Item {
    Chunk(Chunk),
    Error(EngineError),
    None,
}

/// The consumer's stream for one request: engine chunks as [`Annotated`] items, ending
/// with exactly one terminal (a chunk with a finish reason, or an error item).
///
/// Dropping it before its terminal aborts the engine (see the lifecycle rules) and
/// records [`Outcome::Dropped`]. `Send + 'static`: return it from a handler or move it
/// to a task.
#[pin_project(PinnedDrop)]
pub struct ResponseStream {
    shared: Arc<Shared>,
    local: Local,
}

/// What only the poller (and `Drop`) touches.
struct Local {
    engine: Option<ChunkStream>,
    timers: Timers,
    stats: StatsRecorder,
    span: Span,
    listener: Option<ListenerId>,
    /// The waker last registered in `shared.waker` (skips the lock on repeat polls).
    registered: Option<Waker>,
    migration_link: Option<TraceLink>,
    stamped: bool,
    done: bool,
    step_cache: StepCache,
}

impl fmt::Debug for ResponseStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseStream")
            .field("request_id", &self.shared.request_id)
            .field("state", &self.shared.cell.load())
            .field("done", &self.local.done)
            .finish_non_exhaustive()
    }
}

impl ResponseStream {
    pub(super) async fn start(
        adapter: Arc<AdapterInner>,
        request: Request,
        context: Context,
    ) -> Result<ResponseStream, EngineError> {
        let cfg = &adapter.config;
        let start = adapter.runtime.now();
        let span = if cfg.spans {
            span::open(&request, cfg.mode)
        } else {
            Span::none()
        };
        let shared = Arc::new(Shared {
            cell: Cell::new(State::new(cfg.mode)),
            waker: Mutex::new(None),
            adapter: adapter.clone(),
            context: context.clone(),
            request_id: std::sync::Arc::from(request.id.as_str()),
            cancelled_at: Mutex::new(None),
        });
        let migration_link = request.migration_link;
        let engine = match adapter
            .engine
            .generate(request, Shared::generate_context(&shared))
            .await
        {
            Ok(engine) => engine,
            Err(err) => {
                // Rule 7: a setup error is returned typed; no abort, no stream. It is
                // still a request that ended, so it gets its one record.
                let rec = RequestRecord {
                    id: String::from(&*shared.request_id),
                    outcome: Outcome::Failed(err.kind()),
                    ttft: None,
                    itl: Default::default(),
                    output_tokens: 0,
                    abort: crate::lifecycle::Abort::None,
                };
                span::record(&span, &rec, None);
                if let Some(obs) = &cfg.observer {
                    obs.on_record(&rec);
                }
                return Err(err);
            }
        };
        let weak = downgrade(&shared);
        // Registered after `generate` so a setup error leaves nothing behind; a context
        // already stopped calls it at once.
        let listener = context.add_listener(move |signal| {
            if let Some(shared) = upgrade(&weak) {
                Shared::signal(&shared, signal);
            }
        });
        Ok(ResponseStream {
            shared,
            local: Local {
                timers: Timers::new(start, cfg.first_token_timeout),
                stats: StatsRecorder::new(start),
                engine: Some(engine),
                span,
                listener: Some(listener),
                registered: None,
                migration_link,
                stamped: false,
                done: false,
                step_cache: StepCache::default(),
            },
        })
    }

    /// The request's current lifecycle state (for diagnostics and tests).
    pub fn state(&self) -> State {
        self.shared.cell.load()
    }

    /// The id of the request.
    pub fn request_id(&self) -> &str {
        &self.shared.request_id
    }
}

impl Stream for ResponseStream {
    type Item = Annotated<Chunk>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let (shared, local): (&Arc<Shared>, &mut Local) = (this.shared, this.local);
        if local.done {
            return Poll::Ready(None);
        }
        // Register before reading the state: a kill that lands after the read finds
        // this waker and wakes us (no lost wake-up).
        if !local
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            shared.register(cx.waker());
            local.registered = Some(cx.waker().clone());
        }
        let adapter = &*shared.adapter;
        let cfg = &adapter.config;
        let rt = &*adapter.runtime;
        loop {
            let state = shared.cell.load_cached(&mut local.step_cache);
            if state.is_finished() {
                local.done = true;
                return Poll::Ready(None);
            }
            if state.owed().is_some() {
                let (state, acts) = shared.cell.apply(Event::ConsumerPoll);
                if let Some(item) = carry_out(shared, local, acts, state, Item::None) {
                    return Poll::Ready(Some(item));
                }
                continue;
            }
            // Deadlines the state calls for; each armed at most once per request.
            if state.cancel() == Cancel::Stop && !local.timers.deadlines.grace_armed() {
                let at = shared.cancelled_at().unwrap_or_else(|| rt.now());
                local.timers.deadlines.arm_grace(at, cfg.cancel_grace);
            }
            if state.abort_deferred() && !local.timers.deadlines.deferral_armed() {
                let at = shared.cancelled_at().unwrap_or_else(|| rt.now());
                local
                    .timers
                    .deadlines
                    .arm_deferral(at, cfg.deferral_deadline);
            } else if !state.abort_deferred() {
                local.timers.deadlines.disarm_deferral();
            }
            if local.timers.deadlines.any() {
                if let Some(due) = local.timers.poll_due(cx, rt) {
                    let (state, acts) = shared.cell.apply(due.event());
                    // Timer events never forward; a kill-like timeout owes a terminal
                    // that the next turn of the loop delivers.
                    let _ = carry_out(shared, local, acts, state, Item::None);
                    continue;
                }
            }
            let Some(engine) = local.engine.as_mut() else {
                // Unreachable by the machine (engine_done implies finished), kept total.
                let (state, acts) = shared.cell.apply(Event::EngineEnded);
                if let Some(item) = carry_out(shared, local, acts, state, Item::None) {
                    return Poll::Ready(Some(item));
                }
                continue;
            };
            let polled = catch_unwind(AssertUnwindSafe(|| engine.as_mut().poll_next(cx)));
            let (event, item) = match polled {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(Some(Ok(chunk)))) => {
                    let event = if chunk.is_terminal() {
                        Event::TerminalChunk
                    } else if chunk.has_tokens() {
                        Event::Chunk
                    } else {
                        Event::TokenlessChunk
                    };
                    (event, Item::Chunk(chunk))
                }
                Ok(Poll::Ready(Some(Err(err)))) => (Event::EngineError, Item::Error(err)),
                Ok(Poll::Ready(None)) => (Event::EngineEnded, Item::None),
                Err(panic) => {
                    let msg = panic_message(panic.as_ref());
                    (
                        Event::EngineError,
                        Item::Error(EngineError::engine_panicked(msg)),
                    )
                }
            };
            let (state, acts) = shared.cell.apply_cached(event, &mut local.step_cache);
            if state.engine_done() {
                // Never poll a finished (or panicked) engine stream again.
                local.engine = None;
                local.timers.deadlines.engine_done();
            }
            if let Some(item) = carry_out(shared, local, acts, state, item) {
                return Poll::Ready(Some(item));
            }
        }
    }
}

/// The panic payload's text, when it has one (`engine_panicked` adds the prefix).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        String::new()
    }
}

/// Pass an engine chunk on: time its tokens, re-arm the inter-token deadline, stamp
/// the trace link on the first token (or, in prefill mode, on a token-less terminal).
fn forward_chunk(shared: &Shared, local: &mut Local, mut chunk: Chunk) -> Annotated<Chunk> {
    let adapter = &shared.adapter;
    let n = u32::try_from(chunk.token_ids.len()).unwrap_or(u32::MAX);
    if n > 0 {
        let now = adapter.runtime.now();
        local.stats.tokens(n, now);
        local
            .timers
            .deadlines
            .token(now, adapter.config.inter_token_timeout);
    }
    if !local.stamped && (n > 0 || (chunk.is_terminal() && adapter.config.mode == Mode::Prefill)) {
        local.stamped = true;
        chunk.worker_trace_link = span::trace_link(&local.span, local.migration_link);
    }
    Annotated::from_data(chunk)
}

/// Carry out the poller's actions; returns the item to yield, if any.
fn carry_out(
    shared: &Arc<Shared>,
    local: &mut Local,
    acts: Actions,
    state: State,
    item: Item,
) -> Option<Annotated<Chunk>> {
    if acts.abort {
        Shared::spawn_abort(shared);
    }
    let cfg = &shared.adapter.config;
    if acts.forward && acts.finish.is_none() {
        // The steady state: a non-terminal chunk to pass on, nothing to record.
        return match item {
            Item::Chunk(chunk) => Some(forward_chunk(shared, local, chunk)),
            Item::Error(_) | Item::None => None,
        };
    }
    let mut timeout_kind = None;
    let (out, outcome) = if acts.forward {
        match item {
            Item::Chunk(chunk) => {
                let outcome = match &chunk.finish_reason {
                    Some(FinishReason::Cancelled) => Some(Outcome::Cancelled),
                    Some(reason) => Some(Outcome::Finished(reason.clone())),
                    None => None,
                };
                (Some(forward_chunk(shared, local, chunk)), outcome)
            }
            Item::Error(err) => {
                let kind = err.kind();
                (
                    Some(Annotated::from_error(err)),
                    Some(Outcome::Failed(kind)),
                )
            }
            Item::None => (None, None),
        }
    } else if let Some(synth) = acts.emit {
        let (annotated, outcome) = match synth {
            Synth::Cancelled => (
                Annotated::from_data(Chunk::terminal(FinishReason::Cancelled)),
                Outcome::Cancelled,
            ),
            Synth::FirstTokenTimeout => {
                let after = cfg.first_token_timeout.unwrap_or_default();
                timeout_kind = Some(ErrorKind::FirstTokenTimeout);
                (
                    Annotated::from_error(EngineError::first_token_timeout(after)),
                    Outcome::TimedOut,
                )
            }
            Synth::InterTokenTimeout => {
                let after = cfg.inter_token_timeout.unwrap_or_default();
                timeout_kind = Some(ErrorKind::InterTokenTimeout);
                (
                    Annotated::from_error(EngineError::inter_token_timeout(after)),
                    Outcome::TimedOut,
                )
            }
            Synth::Incomplete => (
                Annotated::from_error(EngineError::stream_incomplete()),
                Outcome::Failed(ErrorKind::Backend(BackendError::StreamIncomplete)),
            ),
        };
        (Some(annotated), Some(outcome))
    } else {
        (None, None)
    };
    if let Some(kind) = acts.finish {
        let outcome = match kind {
            OutcomeKind::Dropped => Outcome::Dropped,
            _ => outcome.unwrap_or(Outcome::Failed(ErrorKind::Unknown)),
        };
        finish(shared, local, outcome, state, timeout_kind);
    }
    out
}

/// The request is over: record it once, let go of the engine and the context.
fn finish(
    shared: &Arc<Shared>,
    local: &mut Local,
    outcome: Outcome,
    state: State,
    timeout_kind: Option<ErrorKind>,
) {
    local.done = true;
    local.engine = None;
    if let Some(id) = local.listener.take() {
        shared.context.remove_listener(id);
    }
    let rec = RequestRecord {
        id: String::from(&*shared.request_id),
        outcome,
        ttft: local.stats.ttft(),
        itl: local.stats.itl(),
        output_tokens: local.stats.output_tokens(),
        abort: state.abort(),
    };
    span::record(&local.span, &rec, timeout_kind);
    let adapter = &shared.adapter;
    if let Some(obs) = &adapter.config.observer {
        obs.on_record(&rec);
    }
    if state.abort_deferred() {
        // The consumer has its terminal but the engine still owes an abort (decode
        // kill before the first token): wait for the hint or the deadline elsewhere,
        // since nobody may poll this stream again.
        // Counted from the kill, like the poller's deferral timer.
        let from = shared
            .cancelled_at()
            .unwrap_or_else(|| adapter.runtime.now());
        let deadline = from
            .checked_add(adapter.config.deferral_deadline)
            .unwrap_or(from);
        adapter.runtime.spawn(Box::pin(DeferredAbort {
            shared: shared.clone(),
            deadline,
            timer: None,
        }));
    }
}

/// Releases a deferred abort at its deadline after the stream is over, or ends as soon
/// as the first-token hint released (or the engine's end discarded) it.
struct DeferredAbort {
    shared: Arc<Shared>,
    deadline: Instant,
    timer: Option<Pin<Box<dyn AsyncTimer>>>,
}

impl Future for DeferredAbort {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.shared.register(cx.waker());
        if !this.shared.cell.load().abort_deferred() {
            return Poll::Ready(());
        }
        let rt = &*this.shared.adapter.runtime;
        let deadline = this.deadline;
        let timer = this.timer.get_or_insert_with(|| rt.sleep_until(deadline));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let (_, acts) = this.shared.cell.apply(Event::DeferralDeadline);
        Shared::act_off_poller(&this.shared, acts);
        Poll::Ready(())
    }
}

#[pinned_drop]
impl PinnedDrop for ResponseStream {
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        let (shared, local): (&Arc<Shared>, &mut Local) = (this.shared, this.local);
        if local.done {
            return;
        }
        let (state, acts) = shared.cell.apply(Event::ConsumerDropped);
        // Finishes (records Dropped, lets go of the engine and the listener) when the
        // request was live; spawns the abort when one is due.
        let _ = carry_out(shared, local, acts, state, Item::None);
    }
}
