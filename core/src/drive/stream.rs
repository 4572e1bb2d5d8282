//! [`ResponseStream`]: the consumer's side of one request (the poller, setup, `Drop`).
//! What other threads reach is in [`super::shared`]; what integrators call on a stream
//! (early finish, its record, the result view) is in [`super::request`].
//!
//! The driver loop (`poll_next`, and `poll_setup` while `generate` is pending) is "feed
//! events, then carry out actions until there is an item to yield or nothing left to
//! do": the owed terminal first, then the engine, then (only while the consumer waits on
//! a silent engine) the token deadlines. Every decision comes from [`SharedState::apply`], so
//! the poller, the listener (on whatever thread calls `stop`/`kill`), the hint, `Drop`
//! and the watchdog never decide the same thing twice.

use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};

use futures_core::Stream;
use pin_project::{pin_project, pinned_drop};
use tracing::Span;

use super::ended::Ended;
use super::log;
use super::request::{Own, RecordFn};
use super::shared::{Shared, SharedExtras};
use super::slot::{release, EngineSlot, Item, SetupFuture};
use super::span::{self, SpanNote};
use super::stats::{ItlStats, Outcome, RequestRecord, StatsRecorder};
use super::timers::Timer;
use super::AdapterInner;
use crate::context::{Cause, Context, ListenerId, Signal};
use crate::error::{BackendError, EngineError, ErrorKind};
use crate::lifecycle::deadlines::{Due, Silence};
use crate::lifecycle::{
    Actions, Delivery, Event, OutcomeKind, SharedState, State, StepCache, Synthesized, Timeout,
};
use crate::protocol::{Annotated, Chunk, FinishReason, Mode, Request, TraceLink};
use crate::sync::{downgrade, Arc};

/// The consumer's stream for one request: engine chunks as [`Annotated`] items, ending
/// with exactly one terminal (a chunk with a finish reason, or an error item).
///
/// Dropping it before its terminal aborts the engine (see the lifecycle rules) and
/// records [`Outcome::Dropped`], or, with [kill-on-drop](ResponseStream::set_kill_on_drop),
/// kills the request's context with [`Cause::ClientDisconnect`] and records
/// [`Outcome::Cancelled`]. `Send + 'static`: return it from a handler or move it to a
/// task.
#[pin_project(PinnedDrop)]
pub struct ResponseStream {
    pub(super) shared: Arc<Shared>,
    pub(super) local: Local,
}

/// What only the consumer's side (poller, setup, `Drop`) touches.
pub(super) struct Local {
    engine: Option<EngineSlot>,
    stats: StatsRecorder,
    listener: Option<ListenerId>,
    /// The waker last registered in `shared.waker` (skips the lock on repeat polls).
    registered: Option<Waker>,
    stamped: bool,
    pub(super) done: bool,
    step_cache: StepCache,
    /// A drop before the terminal is a kill with cause client disconnect (rule 4).
    pub(super) kill_on_drop: bool,
    /// What few requests use (token timeouts, a record callback, an attached value, an
    /// enabled span, a terminal decided before the first poll): boxed, so every other
    /// stream stays small (streams are moved on their way to the consumer, and every
    /// idle request carries one).
    pub(super) extras: Option<Box<Extras>>,
    /// How the request ended, once it did (the rest of its record is in `stats`).
    pub(super) ended: Option<Ended>,
}

/// The token timeouts (rule 11) and the one timer that runs them.
struct SilenceClock {
    silence: Silence,
    timer: Timer,
}

impl SilenceClock {
    /// The clock for these limits, `None` when neither is set.
    fn for_limits(
        first_token: Option<std::time::Duration>,
        inter_token: Option<std::time::Duration>,
    ) -> Option<SilenceClock> {
        let silence = Silence::new(first_token, inter_token);
        silence.any().then(|| SilenceClock {
            silence,
            timer: Timer::default(),
        })
    }
}

/// The rarely used per-request extras.
#[derive(Default)]
pub(super) struct Extras {
    /// The token timeouts and their timer, when a limit is set.
    silence: Option<SilenceClock>,
    /// The per-request record callback, called once at the end.
    pub(super) on_record: Option<RecordFn>,
    /// Kept alive until the request is over for the consumer (a concurrency permit).
    pub(super) attached: Option<Box<dyn std::any::Any + Send>>,
    /// The request's span, only when it is enabled (spans on, and listened to).
    pub(super) span: Option<Span>,
    /// The terminal decided before the consumer's first poll (while `generate` was
    /// pending, or by an early finish), for that poll (boxed: an inline
    /// `Annotated<Chunk>` would make every `Extras` as large).
    pub(super) stash: Option<Box<Annotated<Chunk>>>,
    /// The text of the engine's `FinishReason::Error`, once the request ended so (the
    /// rest of how it ended is in `Local::ended`).
    pub(super) finish_text: Option<String>,
}

impl Local {
    /// The token timeouts' clock, when a limit is set.
    fn silence(&self) -> Option<&SilenceClock> {
        self.extras.as_ref()?.silence.as_ref()
    }

    /// [`silence`](Self::silence), to advance or time.
    #[inline]
    fn silence_mut(&mut self) -> Option<&mut SilenceClock> {
        self.extras.as_deref_mut()?.silence.as_mut()
    }

    /// The request's span, when it is enabled.
    fn span(&self) -> Option<&Span> {
        self.extras.as_ref()?.span.as_ref()
    }

    /// Keep `item`, the terminal of a stream that is over, for the consumer's next
    /// poll.
    pub(super) fn stash(&mut self, item: Annotated<Chunk>) {
        debug_assert!(self.done, "only a terminal is stashed");
        self.extras.get_or_insert_with(Box::default).stash = Some(Box::new(item));
    }

    /// The stashed terminal, once.
    fn take_stash(&mut self) -> Option<Annotated<Chunk>> {
        Some(*self.extras.as_mut()?.stash.take()?)
    }

    /// The finished request's record (`None` before its end): the stats are read
    /// again, without disturbing them.
    pub(super) fn record(&self, shared: &Shared) -> Option<RequestRecord> {
        let ended = self.ended.as_ref()?;
        let text = self.extras.as_ref().and_then(|e| e.finish_text.as_deref());
        let outcome = ended.outcome(text);
        Some(self.record_of(shared, ended, outcome, self.stats.itl_snapshot()))
    }

    /// The record of a request that ended as `ended` with `outcome`, with its stats and
    /// `itl` (its queue time was kept as it stood at the end: [`Shared::end_queue_time`]).
    fn record_of(
        &self,
        shared: &Shared,
        ended: &Ended,
        outcome: Outcome,
        itl: ItlStats,
    ) -> RequestRecord {
        RequestRecord {
            id: shared.request_id().clone(),
            outcome,
            cause: ended.cause,
            ttft: self.stats.ttft(),
            queue_time: shared.queue_time(),
            itl,
            output_tokens: self.stats.output_tokens(),
            abort: ended.abort,
        }
    }
}

impl fmt::Debug for ResponseStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseStream")
            .field("request_id", self.shared.request_id())
            .field("state", &self.shared.cell.load())
            .field("done", &self.local.done)
            .finish_non_exhaustive()
    }
}

impl ResponseStream {
    /// Everything of a request but the engine's progress: the listener is registered
    /// here, before `generate` is entered, so a kill during setup is seen (rule 10).
    pub(super) fn new(
        adapter: &Arc<AdapterInner>,
        request: Request,
        context: Context,
        own: Option<Own>,
    ) -> Self {
        // `None`: the adapter's limits (the hot path: nothing to compare or box).
        let (limits, cancel, on_record, metadata) = match own {
            None => (adapter.limits, None, None, None),
            Some(own) => (
                own.limits,
                (own.limits.cancel != adapter.limits.cancel).then_some(own.limits.cancel),
                own.on_record,
                (!own.metadata.is_empty()).then(|| std::sync::Arc::new(own.metadata)),
            ),
        };
        let start = adapter.runtime.now();
        if let Some(raw) = &request.malformed_migration_link {
            log::malformed_migration_link(&request.id, &raw.trace_id, &raw.span_id);
        }
        let span = if adapter.config.spans {
            let client_id = metadata
                .as_deref()
                .and_then(|m| m.get(crate::engine::Metadata::CLIENT_REQUEST_ID));
            span::open(&request, limits.mode, client_id)
        } else {
            Span::none()
        };
        // The model is kept only while tether's log events are listened to.
        let model = tracing::enabled!(target: "tether", tracing::Level::WARN)
            .then(|| Box::from(request.model.as_str()));
        // The context's id is the request's, unless it is named otherwise.
        let request_id =
            (context.id() != request.id).then(|| std::sync::Arc::from(request.id.as_str()));
        let extras =
            (metadata.is_some() || model.is_some() || cancel.is_some() || request_id.is_some())
                .then(|| {
                    Box::new(SharedExtras {
                        metadata,
                        model,
                        cancel,
                        request_id,
                    })
                });
        let shared = Arc::new(Shared::new(
            SharedState::new(State::new(limits.mode)),
            adapter.clone(),
            context,
            extras,
            start,
        ));
        let gctx = Shared::generate_context(&shared);
        let engine = adapter.engine.clone();
        // The engine's setup runs inside the request span.
        let span = (!span.is_disabled()).then_some(span);
        let setup: SetupFuture = match &span {
            None => Box::pin(async move { engine.generate(request, gctx).await }),
            Some(span) => Box::pin(tracing::Instrument::instrument(
                async move { engine.generate(request, gctx).await },
                span.clone(),
            )),
        };
        // A context already stopped or killed calls it at once.
        let listener = listen(&shared);
        let silence =
            SilenceClock::for_limits(limits.first_token_timeout, limits.inter_token_timeout);
        ResponseStream {
            shared,
            local: Local {
                engine: Some(EngineSlot::Setup(setup)),
                stats: StatsRecorder::new(),
                listener: Some(listener),
                registered: None,
                stamped: false,
                done: false,
                step_cache: StepCache::default(),
                kill_on_drop: limits.kill_on_drop,
                extras: (silence.is_some() || on_record.is_some() || span.is_some()).then(|| {
                    Box::new(Extras {
                        silence,
                        on_record,
                        span,
                        ..Extras::default()
                    })
                }),
                ended: None,
            },
        }
    }

    /// Drive `generate` until the stream exists (`Ok`), the engine refused (`Err`,
    /// rule 7), or a kill or timeout ended the request first (`Ok`: the stream yields
    /// its terminal). The engine is always entered (polled once) before a cancellation
    /// that was already there is honoured, so an abort refers to a request it saw.
    pub(super) fn poll_setup(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), EngineError>> {
        let (shared, local) = (&self.shared, &mut self.local);
        register(shared, local, cx);
        let rt = &*shared.adapter.runtime;
        loop {
            let Some(engine) = local.engine.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match engine.poll_setup(cx, shared) {
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(err)) => {
                    let (state, acts) = shared.cell.apply(Event::EngineError);
                    if acts.forward() {
                        // Rule 7: typed back to the caller; recorded once, no abort.
                        let outcome = Outcome::Failed(err.kind());
                        end_for_consumer(shared, local, outcome, state, SpanNote::SetupFailed);
                        return Poll::Ready(Err(err));
                    }
                    // A kill won the race: the stream yields what is owed.
                    if let Some(item) = perform(shared, local, acts, state, None) {
                        local.stash(item);
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => {}
            }
            let state = shared.cell.load();
            if state.pending_terminal().is_some() || state.is_over() {
                return Poll::Ready(Ok(()));
            }
            if !poll_silence(shared, local, cx, rt) {
                return Poll::Pending;
            }
        }
    }
}

/// Register the request with its context: a weak handle, so a context that outlives
/// the request does not keep it alive.
fn listen(shared: &Arc<Shared>) -> ListenerId {
    #[cfg(not(tether_loom))]
    {
        let weak: std::sync::Weak<Shared> = downgrade(shared);
        shared.context.add_sink(weak)
    }
    #[cfg(tether_loom)]
    {
        let weak = downgrade(shared);
        shared.context.add_listener(move |signal| {
            if let Some(shared) = crate::sync::upgrade(&weak) {
                Shared::heard(&shared, signal);
            }
        })
    }
}

/// Register the consumer's waker before reading the state: an actor that changes it
/// after the read finds this waker (no lost wake-up).
#[inline]
pub(super) fn register(shared: &Shared, local: &mut Local, cx: &TaskContext<'_>) {
    if !local
        .registered
        .as_ref()
        .is_some_and(|w| w.will_wake(cx.waker()))
    {
        shared.register(cx.waker());
        local.registered = Some(cx.waker().clone());
    }
}

/// The consumer waits on a silent engine: run the token deadlines (rule 11: only
/// while it waits). `true` when one fired and the machine was told (poll again).
fn poll_silence(
    shared: &Arc<Shared>,
    local: &mut Local,
    cx: &mut TaskContext<'_>,
    rt: &dyn super::Runtime,
) -> bool {
    let Some(clock) = local.silence_mut() else {
        return false;
    };
    if shared.cell.load().first_token() {
        // A hint without a token: the first-token limit is met.
        clock.silence.first_token_seen();
    }
    if clock.silence.needs_wait_start() {
        clock.silence.waiting(rt.now());
    }
    loop {
        let Some(next) = clock.silence.poll_timeout() else {
            return false;
        };
        if !clock.timer.poll_until(next, cx, rt) {
            return false;
        }
        // Fired for a deadline that moved later since: the next turn re-arms.
        if let Some(due) = clock.silence.handle_timeout(rt.now()) {
            let (state, acts) = shared.cell.apply(due.event());
            if let (
                Due::Timeout(which),
                Some(Synthesized::FirstTokenTimeout | Synthesized::InterTokenTimeout),
            ) = (due, state.pending_terminal())
            {
                let (first, inter) = clock.silence.limits();
                let first_token = which == Timeout::FirstToken;
                let limit = if first_token { first } else { inter };
                log::timeout_fired(shared, first_token, limit.unwrap_or_default());
            }
            // Timer events never forward; a timeout owes a terminal that the next
            // turn of the poller's loop delivers.
            let _ = perform(shared, local, acts, state, None);
            return true;
        }
    }
}

impl Stream for ResponseStream {
    type Item = Annotated<Chunk>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        let (shared, local): (&Arc<Shared>, &mut Local) = (this.shared, this.local);
        if local.done {
            // A terminal decided before this poll is the stream's last item.
            return Poll::Ready(local.take_stash());
        }
        register(shared, local, cx);
        loop {
            if !shared.cell.is_steady_cached(&local.step_cache) {
                let state = shared.cell.load();
                if state.is_over() {
                    local.done = true;
                    return Poll::Ready(None);
                }
                if state.pending_terminal().is_some() {
                    let (state, acts) = shared.cell.apply(Event::ConsumerPoll);
                    if let Some(item) = perform(shared, local, acts, state, None) {
                        return Poll::Ready(Some(item));
                    }
                    continue;
                }
            }
            let Some(engine) = local.engine.as_mut() else {
                // Unreachable by the machine (engine_done implies finished), kept total.
                let (state, acts) = shared.cell.apply(Event::EngineEnded);
                if let Some(item) = perform(shared, local, acts, state, None) {
                    return Poll::Ready(Some(item));
                }
                continue;
            };
            // The engine first: an item it already has wins over a deadline, so a
            // consumer that was slow to come back never times the engine out.
            let mut item = None;
            let event = match engine.poll_event(cx, shared, &mut item) {
                Poll::Ready(event) => event,
                Poll::Pending => {
                    if poll_silence(shared, local, cx, &*shared.adapter.runtime) {
                        continue;
                    }
                    return Poll::Pending;
                }
            };
            // `None`: the steady step once more, nothing decided and nothing to check.
            if let Some((state, acts)) = shared.cell.apply_steady(event, &mut local.step_cache) {
                if state.engine_done() {
                    // Never poll a finished (or panicked) engine stream again: an item
                    // after the terminal reaches nobody (the conformance kit reports such
                    // engines).
                    release(local.engine.take(), shared.request_id());
                }
                if !acts.is_steady() {
                    if let Some(item) = perform(shared, local, acts, state, item) {
                        return Poll::Ready(Some(item));
                    }
                    continue;
                }
            }
            // The steady state, kept in this frame so that the chunk is moved once: a
            // non-terminal chunk to pass on, nothing else to do.
            if let Some(Ok(chunk)) = &mut item {
                note_chunk(shared, local, chunk);
            }
            if let Some(Ok(chunk)) = item {
                return Poll::Ready(Some(Annotated::from_data(chunk)));
            }
        }
    }
}

/// An engine chunk on its way to the consumer: time its tokens, end the silence, take a
/// token-less chunk before the first token as the scheduling signal, and stamp
/// `worker_trace_link` (from the [`TraceIdHook`](super::TraceIdHook)) on the first token
/// and, in prefill mode, on the terminal, wherever the engine set none itself. The
/// chunk is changed in place: the caller moves it once, into the item it yields.
#[inline(always)]
fn note_chunk(shared: &Shared, local: &mut Local, chunk: &mut Chunk) {
    let adapter = &shared.adapter;
    let n = u32::try_from(chunk.token_ids.len()).unwrap_or(u32::MAX);
    let terminal = chunk.is_terminal();
    if n > 0 {
        let now = adapter.runtime.now();
        local.stats.tokens(n, now, shared.start);
        if let Some(clock) = local.silence_mut() {
            clock.silence.token();
        }
    } else if !terminal && local.stats.ttft().is_none() {
        shared.mark_scheduled(adapter.runtime.now());
    }
    let stamp = if n > 0 && !local.stamped {
        local.stamped = true;
        true
    } else {
        terminal && shared.cell.load().mode() == Mode::Prefill
    };
    if stamp && chunk.worker_trace_link.is_none() {
        if let Some(hook) = &adapter.config.trace_id_hook {
            chunk.worker_trace_link = trace_link(&**hook, local.span());
        }
    }
}

/// The hook's trace link for the request's span (a disabled span when it has none).
/// Once or twice per request: out of line.
#[cold]
fn trace_link(hook: &dyn super::TraceIdHook, span: Option<&Span>) -> Option<TraceLink> {
    match span {
        Some(span) => hook.trace_link(span),
        None => hook.trace_link(&Span::none()),
    }
}

/// [`note_chunk`], then the chunk as the item to yield.
fn forward_chunk(shared: &Shared, local: &mut Local, mut chunk: Chunk) -> Annotated<Chunk> {
    note_chunk(shared, local, &mut chunk);
    Annotated::from_data(chunk)
}

/// Carry out the consumer side's actions; returns the item to yield, if any.
pub(super) fn perform(
    shared: &Arc<Shared>,
    local: &mut Local,
    acts: Actions,
    state: State,
    item: Item,
) -> Option<Annotated<Chunk>> {
    // The steady state (a chunk to pass on, nothing else to do) never gets here:
    // `poll_next` passes it on itself.
    Shared::abort_and_arm(shared, acts);
    let (out, outcome, note) = match acts.deliver {
        Delivery::Nothing => return None,
        Delivery::Forward => return pass_on(shared, local, item),
        Delivery::ForwardLast(_) => {
            let (out, outcome) = forward_last(shared, local, item);
            (out, outcome, SpanNote::None)
        }
        Delivery::Synthesize(synth) => {
            if synth == Synthesized::Incomplete {
                log::engine_misbehaved(shared, "its stream ended without a terminal chunk");
            }
            let (out, outcome, note) = synthesize(local, synth);
            (Some(out), outcome, note)
        }
        Delivery::End(kind) => {
            // Only a drop gets here: an early finish is recorded by
            // `ResponseStream::finish`, which holds its reason.
            debug_assert_eq!(kind, OutcomeKind::Dropped);
            (None, Outcome::Dropped, SpanNote::None)
        }
    };
    end_for_consumer(shared, local, outcome, state, note);
    out
}

/// A non-terminal engine chunk, passed on.
fn pass_on(shared: &Shared, local: &mut Local, item: Item) -> Option<Annotated<Chunk>> {
    match item {
        Some(Ok(chunk)) => Some(forward_chunk(shared, local, chunk)),
        Some(Err(_)) | None => None,
    }
}

/// The engine's last item (its terminal or its error) and the outcome it makes.
fn forward_last(
    shared: &Shared,
    local: &mut Local,
    item: Item,
) -> (Option<Annotated<Chunk>>, Outcome) {
    match item {
        Some(Ok(chunk)) => {
            let outcome = match &chunk.finish_reason {
                Some(FinishReason::Cancelled) => Outcome::Cancelled,
                Some(reason) => Outcome::Finished(reason.clone()),
                // `Event::TerminalChunk` is decided from this chunk's finish reason
                // (`EngineSlot::poll_event`), so it has one.
                None => Outcome::Failed(ErrorKind::Backend(BackendError::StreamIncomplete)),
            };
            (Some(forward_chunk(shared, local, chunk)), outcome)
        }
        Some(Err(err)) => {
            let kind = err.kind();
            (Some(Annotated::from_error(err)), Outcome::Failed(kind))
        }
        // The machine forwards only engine items (`EngineSlot::poll_event` pairs each
        // event with its item).
        None => (
            None,
            Outcome::Failed(ErrorKind::Backend(BackendError::StreamIncomplete)),
        ),
    }
}

/// A terminal of tether's own, the outcome it makes, and the timeout kind for the span.
fn synthesize(local: &Local, synth: Synthesized) -> (Annotated<Chunk>, Outcome, SpanNote) {
    let (first_token_timeout, inter_token_timeout) = local
        .silence()
        .map_or((None, None), |clock| clock.silence.limits());
    match synth {
        Synthesized::Cancelled => (
            Annotated::from_data(Chunk::terminal(FinishReason::Cancelled)),
            Outcome::Cancelled,
            SpanNote::None,
        ),
        Synthesized::FirstTokenTimeout => (
            Annotated::from_error(EngineError::first_token_timeout(
                first_token_timeout.unwrap_or_default(),
            )),
            Outcome::TimedOut,
            SpanNote::Timeout(ErrorKind::FirstTokenTimeout),
        ),
        Synthesized::InterTokenTimeout => (
            Annotated::from_error(EngineError::inter_token_timeout(
                inter_token_timeout.unwrap_or_default(),
            )),
            Outcome::TimedOut,
            SpanNote::Timeout(ErrorKind::InterTokenTimeout),
        ),
        Synthesized::Incomplete => (
            Annotated::from_error(EngineError::stream_incomplete()),
            Outcome::Failed(ErrorKind::Backend(BackendError::StreamIncomplete)),
            SpanNote::None,
        ),
    }
}

/// The request is over for the consumer: record it once, let go of the context, and
/// of the engine, unless an abort is still deferred: then the engine goes to the
/// watchdog, which drains it until the abort is sent or discarded (rule 2).
pub(super) fn end_for_consumer(
    shared: &Arc<Shared>,
    local: &mut Local,
    outcome: Outcome,
    state: State,
    note: SpanNote,
) {
    local.done = true;
    if let Some(id) = local.listener.take() {
        shared.context.remove_listener(id);
    }
    let cause = match (shared.context.cause(), &outcome) {
        (None, Outcome::TimedOut) => Some(Cause::Timeout),
        (cause, _) => cause,
    };
    let (ended, text) = Ended::pack(&outcome, state.abort().into(), cause);
    if let Some(text) = text {
        local.extras.get_or_insert_with(Box::default).finish_text = Some(text);
    }
    shared.end_queue_time();
    let itl = local.stats.itl();
    let rec = local.record_of(shared, &ended, outcome, itl);
    if let Some(span) = local.span() {
        span::record(span, &rec, note);
    }
    log::stream_complete(shared, &rec, note == SpanNote::SetupFailed);
    if let Some(obs) = &shared.adapter.config.observer {
        obs.on_record(&rec);
    }
    if let Some(extras) = local.extras.as_deref_mut() {
        if let Some(f) = extras.on_record.take() {
            f(&rec);
        }
        // Released now that the consumer is done (a concurrency permit frees its slot).
        // The span stays until the stream is dropped.
        drop(extras.attached.take());
    }
    local.ended = Some(ended);
    let engine = local.engine.take();
    if state.drains_engine() && engine.is_some() {
        Shared::arm(shared, Actions::default(), engine);
    } else {
        release(engine, shared.request_id());
        // Here, a watchdog exists only if a stop, kill or timeout armed one (a drop that
        // defers hands the engine over above); one waiting on a grace that no longer
        // matters can end now. The check keeps the happy path off the lock.
        if state.cancel() != crate::lifecycle::Cancel::None {
            Shared::wake_watchdog(shared);
        }
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
        if local.kill_on_drop {
            // Rule 4, kill-on-drop: the drop is a kill with cause client disconnect
            // (linked children are killed too). The listener may be mid-delivery on
            // another thread, so the kill is also applied here (a repeat is a no-op);
            // the owed terminal is then taken at once and the outcome is `Cancelled`.
            log::client_disconnect(shared);
            shared.context.kill_with(Cause::ClientDisconnect);
            Shared::signal(shared, Signal::Kill);
            let (state, acts) = shared.cell.apply(Event::ConsumerPoll);
            let _ = perform(shared, local, acts, state, None);
            if local.done {
                return;
            }
        }
        let (state, acts) = shared.cell.apply(Event::ConsumerDropped);
        // Finishes (records Dropped, lets go of the listener, hands a still-owed
        // engine to the watchdog) and queues the abort when one is due.
        let _ = perform(shared, local, acts, state, None);
    }
}
