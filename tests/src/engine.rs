//! [`ScriptEngine`]: an engine whose every stream is driven by the test through a
//! [`Script`], and which records what tether did to it (aborts, polls, drops).
//!
//! The bookkeeping is the point: an abort is checked against whether the engine had
//! already ended its stream, a poll after the stream's end is counted, and every
//! stream handed out is tracked until it is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context as TaskContext, Poll, Waker};

use futures_core::Stream;
use tether_core::engine::BoxFuture;
use tether_core::{
    Chunk, ChunkStream, EngineConfig, EngineError, FinishReason, GenerateContext, LlmEngine,
    Request,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One instruction for a scripted stream, carried out when tether polls it.
pub enum Step {
    /// Yield this item (a terminal chunk or an `Err` ends the engine's stream).
    Item(Result<Chunk, EngineError>),
    /// Panic inside `poll_next` with this message.
    Panic(String),
    /// Call [`GenerateContext::notify_first_token`] from inside `poll_next`, then go on.
    Hint,
    /// Run this with the request's [`GenerateContext`] from inside `poll_next`, then go on
    /// (for races that happen while the engine is being polled).
    Run(Box<dyn FnOnce(&GenerateContext) + Send>),
    /// End the stream (`None`) without a terminal.
    Close,
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Item(item) => f.debug_tuple("Item").field(item).finish(),
            Step::Panic(msg) => f.debug_tuple("Panic").field(msg).finish(),
            Step::Hint => f.write_str("Hint"),
            Step::Run(_) => f.write_str("Run(..)"),
            Step::Close => f.write_str("Close"),
        }
    }
}

/// A step of the engine (`generate`'s setup, `abort`) that a test holds pending until
/// it lets it go.
#[derive(Debug, Default)]
struct Hold {
    held: bool,
    waker: Option<Waker>,
}

impl Hold {
    /// Ready unless held; held, the waker is kept for [`Hold::release`].
    fn wait(&mut self, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.held {
            self.waker = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Stop holding; the waker of whoever waits, to wake outside the lock.
    fn release(&mut self) -> Option<Waker> {
        self.held = false;
        self.waker.take()
    }
}

/// What the engine knows about one request id.
#[derive(Debug, Default)]
struct Slot {
    steps: VecDeque<Step>,
    waker: Option<Waker>,
    setup_error: Option<EngineError>,
    /// `generate` waits (pending) while this is held, as a slow admission would.
    setup_hold: Hold,
    /// `generate` panics with this message.
    setup_panic: Option<String>,
    /// The stream panics with this message when dropped.
    drop_panic: Option<String>,
    abort_reply: Vec<Step>,
    /// `abort` does not return while this is held (an abort stuck in the engine).
    abort_hold: Hold,
    /// `abort` panics with this message once it has counted itself.
    abort_panic: Option<String>,
    context: Option<GenerateContext>,
    abort_context: Option<GenerateContext>,
    generates: u32,
    /// The stream yielded its terminal, an error, its end, or panicked.
    ended: bool,
    aborts: u32,
    aborts_after_end: u32,
    polls_after_end: u32,
}

#[derive(Default)]
struct EngineState {
    slots: Mutex<BTreeMap<String, Arc<Mutex<Slot>>>>,
    counters: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    live_streams: usize,
    aborts: u32,
    waiters: Vec<Waker>,
}

impl EngineState {
    fn slot(&self, id: &str) -> Arc<Mutex<Slot>> {
        lock(&self.slots).entry(id.to_owned()).or_default().clone()
    }

    fn bump(&self, f: impl FnOnce(&mut Counters)) {
        let waiters = {
            let mut c = lock(&self.counters);
            f(&mut c);
            std::mem::take(&mut c.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }
}

/// A test-driven [`LlmEngine`]. Cheap to clone; clones share everything.
///
/// Each `generate(request)` returns a stream that yields what the test pushes on
/// [`ScriptEngine::script`]`(request.id)`, in order, and waits (`Pending`) when there
/// is nothing queued. `abort` does nothing to the stream unless
/// [`Script::reply_to_abort`] says so: by default this engine ignores aborts, as a
/// hung engine would.
#[derive(Clone, Default)]
pub struct ScriptEngine {
    state: Arc<EngineState>,
}

impl fmt::Debug for ScriptEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptEngine")
            .field("requests", &lock(&self.state.slots).len())
            .field("counters", &*lock(&self.state.counters))
            .finish()
    }
}

impl ScriptEngine {
    /// An engine with no requests.
    pub fn new() -> ScriptEngine {
        ScriptEngine::default()
    }

    /// The script of request `id` (created if new; push before or after `generate`).
    pub fn script(&self, id: &str) -> Script {
        Script {
            id: id.to_owned(),
            slot: self.state.slot(id),
            engine: self.clone(),
        }
    }

    /// Ids of every request `generate` was called for.
    pub fn generated_ids(&self) -> Vec<String> {
        lock(&self.state.slots)
            .iter()
            .filter(|(_, slot)| lock(slot).generates > 0)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Streams handed out and not dropped yet.
    pub fn live_streams(&self) -> usize {
        lock(&self.state.counters).live_streams
    }

    /// `abort` calls entered so far, over all requests.
    pub fn total_aborts(&self) -> u32 {
        lock(&self.state.counters).aborts
    }

    /// Whether the stream of request `id` has ended (terminal, error, end or panic).
    /// `false` for an unknown id.
    pub fn ended(&self, id: &str) -> bool {
        lock(&self.state.slots)
            .get(id)
            .is_some_and(|slot| lock(slot).ended)
    }

    /// Resolves once `cond` holds; re-checked after every abort entered and every
    /// stream dropped.
    pub fn until<'a>(
        &'a self,
        mut cond: impl FnMut(&ScriptEngine) -> bool + 'a,
    ) -> impl Future<Output = ()> + 'a {
        poll_fn(move |cx| {
            if cond(self) {
                return Poll::Ready(());
            }
            {
                let mut c = lock(&self.state.counters);
                if !c.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    c.waiters.push(cx.waker().clone());
                }
            }
            // Re-check: the event may have landed between the check and the registration.
            if cond(self) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

impl LlmEngine for ScriptEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            Ok(EngineConfig::new("script".to_owned(), worker_id).with_max_concurrency(None))
        })
    }

    fn generate(
        &self,
        request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async move {
            let slot = self.state.slot(&request.id);
            {
                let mut s = lock(&slot);
                s.generates += 1;
                s.context = Some(context.clone());
            }
            poll_fn(|cx| lock(&slot).setup_hold.wait(cx)).await;
            {
                let mut s = lock(&slot);
                if let Some(msg) = s.setup_panic.take() {
                    drop(s);
                    panic!("{msg}");
                }
                if let Some(err) = s.setup_error.take() {
                    return Err(err);
                }
            }
            self.state.bump(|c| c.live_streams += 1);
            let stream: ChunkStream = Box::pin(ScriptStream {
                slot,
                state: self.state.clone(),
                context,
            });
            Ok(stream)
        })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let slot = self.state.slot(context.request_id());
            let waker = {
                let mut s = lock(&slot);
                s.aborts += 1;
                s.abort_context = Some(context.clone());
                if s.ended {
                    s.aborts_after_end += 1;
                }
                let reply = std::mem::take(&mut s.abort_reply);
                if reply.is_empty() {
                    None
                } else {
                    s.steps.extend(reply);
                    s.waker.take()
                }
            };
            if let Some(w) = waker {
                w.wake();
            }
            self.state.bump(|c| c.aborts += 1);
            if let Some(msg) = lock(&slot).abort_panic.take() {
                panic!("{msg}");
            }
            poll_fn(|cx| lock(&slot).abort_hold.wait(cx)).await;
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The stream a [`ScriptEngine`] hands out.
struct ScriptStream {
    slot: Arc<Mutex<Slot>>,
    state: Arc<EngineState>,
    context: GenerateContext,
}

impl Stream for ScriptStream {
    type Item = Result<Chunk, EngineError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut slot = lock(&this.slot);
        if slot.ended {
            slot.polls_after_end += 1;
        }
        loop {
            match slot.steps.pop_front() {
                None => {
                    slot.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Some(Step::Item(item)) => {
                    if item.as_ref().map_or(true, Chunk::is_terminal) {
                        slot.ended = true;
                    }
                    return Poll::Ready(Some(item));
                }
                Some(Step::Close) => {
                    slot.ended = true;
                    return Poll::Ready(None);
                }
                Some(Step::Panic(msg)) => {
                    slot.ended = true;
                    drop(slot);
                    panic!("{msg}");
                }
                Some(Step::Hint) => {
                    // Unlocked: the hint may decide an abort, whose observer looks here.
                    drop(slot);
                    this.context.notify_first_token();
                    slot = lock(&this.slot);
                }
                Some(Step::Run(f)) => {
                    drop(slot);
                    f(&this.context);
                    slot = lock(&this.slot);
                }
            }
        }
    }
}

impl Drop for ScriptStream {
    fn drop(&mut self) {
        self.state.bump(|c| c.live_streams -= 1);
        let panic = lock(&self.slot).drop_panic.take();
        if let Some(msg) = panic {
            panic!("{msg}");
        }
    }
}

/// The test's handle on one request of a [`ScriptEngine`].
#[derive(Clone)]
pub struct Script {
    id: String,
    slot: Arc<Mutex<Slot>>,
    engine: ScriptEngine,
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("id", &self.id)
            .field("slot", &*lock(&self.slot))
            .finish()
    }
}

impl Script {
    /// The request id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The engine this script belongs to.
    pub fn engine(&self) -> &ScriptEngine {
        &self.engine
    }

    /// Queue `step` and wake the stream.
    pub fn push(&self, step: Step) -> &Self {
        let waker = {
            let mut s = lock(&self.slot);
            s.steps.push_back(step);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        self
    }

    /// Queue a chunk.
    pub fn chunk(&self, chunk: Chunk) -> &Self {
        self.push(Step::Item(Ok(chunk)))
    }

    /// Queue a non-terminal chunk with these tokens (none: a handshake chunk).
    pub fn tokens(&self, tokens: &[u32]) -> &Self {
        self.chunk(Chunk::tokens(tokens.to_vec()))
    }

    /// Queue a token-less terminal chunk.
    pub fn terminal(&self, reason: FinishReason) -> &Self {
        self.chunk(Chunk::terminal(reason))
    }

    /// Queue a typed mid-stream error.
    pub fn error(&self, err: EngineError) -> &Self {
        self.push(Step::Item(Err(err)))
    }

    /// Queue a panic in `poll_next`.
    pub fn panic(&self, msg: &str) -> &Self {
        self.push(Step::Panic(msg.to_owned()))
    }

    /// Queue a first-token hint given from inside `poll_next`.
    pub fn hint_in_stream(&self) -> &Self {
        self.push(Step::Hint)
    }

    /// Queue a closure run from inside `poll_next`.
    pub fn run(&self, f: impl FnOnce(&GenerateContext) + Send + 'static) -> &Self {
        self.push(Step::Run(Box::new(f)))
    }

    /// Queue the end of the stream without a terminal.
    pub fn close(&self) -> &Self {
        self.push(Step::Close)
    }

    /// Make the next `generate` for this id fail with `err`.
    pub fn fail_setup(&self, err: EngineError) -> &Self {
        lock(&self.slot).setup_error = Some(err);
        self
    }

    /// Make `generate` for this id wait (pending) until [`Script::release_setup`], as a
    /// slow admission or KV transfer would.
    pub fn hold_setup(&self) -> &Self {
        lock(&self.slot).setup_hold.held = true;
        self
    }

    /// Let a held `generate` go on.
    pub fn release_setup(&self) -> &Self {
        let waker = lock(&self.slot).setup_hold.release();
        if let Some(w) = waker {
            w.wake();
        }
        self
    }

    /// Make `generate` for this id panic with `msg`.
    pub fn panic_in_setup(&self, msg: &str) -> &Self {
        lock(&self.slot).setup_panic = Some(msg.to_owned());
        self
    }

    /// Make this request's stream panic with `msg` when it is dropped.
    pub fn panic_on_drop(&self, msg: &str) -> &Self {
        lock(&self.slot).drop_panic = Some(msg.to_owned());
        self
    }

    /// Make `abort` for this id stay pending (after counting itself) until
    /// [`Script::release_abort`].
    pub fn hold_abort(&self) -> &Self {
        lock(&self.slot).abort_hold.held = true;
        self
    }

    /// Let a held `abort` return.
    pub fn release_abort(&self) -> &Self {
        let waker = lock(&self.slot).abort_hold.release();
        if let Some(w) = waker {
            w.wake();
        }
        self
    }

    /// Make `abort` for this id panic with `msg` (after counting itself).
    pub fn panic_in_abort(&self, msg: &str) -> &Self {
        lock(&self.slot).abort_panic = Some(msg.to_owned());
        self
    }

    /// When `abort` is entered, queue `steps` (an engine that honours aborts).
    pub fn reply_to_abort(&self, steps: Vec<Step>) -> &Self {
        lock(&self.slot).abort_reply = steps;
        self
    }

    /// Give the first-token hint now, from outside any poll (as an engine's transfer
    /// thread would).
    ///
    /// # Panics
    /// If `generate` was not called for this id.
    pub fn notify_first_token(&self) {
        let context = lock(&self.slot)
            .context
            .clone()
            .expect("generate was called for this request");
        context.notify_first_token();
    }

    /// Give the scheduling signal now, from outside any poll (as an engine's scheduler
    /// thread would).
    ///
    /// # Panics
    /// If `generate` was not called for this id.
    pub fn notify_scheduled(&self) {
        let context = lock(&self.slot)
            .context
            .clone()
            .expect("generate was called for this request");
        context.notify_scheduled();
    }

    /// The context `abort` received last, if it was called.
    pub fn abort_context(&self) -> Option<GenerateContext> {
        lock(&self.slot).abort_context.clone()
    }

    /// The context `generate` received, if it was called.
    pub fn generate_context(&self) -> Option<GenerateContext> {
        lock(&self.slot).context.clone()
    }

    /// How many times `generate` was called for this id.
    pub fn generates(&self) -> u32 {
        lock(&self.slot).generates
    }

    /// `abort` calls entered for this request.
    pub fn aborts(&self) -> u32 {
        lock(&self.slot).aborts
    }

    /// `abort` calls entered after the stream had ended (always a bug when the abort
    /// was also decided after the end; see [`RecordingObserver`](crate::RecordingObserver)).
    pub fn aborts_after_end(&self) -> u32 {
        lock(&self.slot).aborts_after_end
    }

    /// Polls of the stream after it had ended (a bug: tether must stop polling).
    pub fn polls_after_end(&self) -> u32 {
        lock(&self.slot).polls_after_end
    }

    /// Whether the stream ended (terminal, error, end or panic).
    pub fn ended(&self) -> bool {
        lock(&self.slot).ended
    }

    /// Steps queued and not yet consumed by a poll.
    pub fn queued(&self) -> usize {
        lock(&self.slot).steps.len()
    }
}
