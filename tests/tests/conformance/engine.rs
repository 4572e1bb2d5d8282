//! The in-file engine the kit runs against: correct by default, broken in exactly one
//! way per [`Flaw`].

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_core::Stream;
use tether_core::engine::BoxFuture;
use tether_core::{
    Chunk, ChunkStream, EngineConfig, EngineError, ErrorKind, FinishReason, GenerateContext,
    LlmEngine, Request, Runtime,
};

use crate::{MODEL, NATURAL_LEN};

/// One way to break the engine contract (or, for `None` and the `Honours*` ones, not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flaw {
    None,
    /// Streams ignore `Context::stop` and only react to `abort` (still conformant).
    HonoursAbortOnly,
    /// `abort` is a no-op; streams react to `Context::stop` (still conformant).
    HonoursStopOnly,
    StartFails,
    EmptyModel,
    StartHangs,
    GenerateFails,
    GenerateHangs,
    EmptyStream,
    ChunkAfterTerminal,
    NoTerminal,
    ErrorItem,
    /// `generate` refuses while another stream is alive.
    OneAtATime,
    /// Streams created while another is alive end at once, empty.
    EmptyUnderLoad,
    /// Streams created while another is alive yield an error item.
    ErrorUnderLoad,
    IgnoresStop,
    StallsOnStop,
    EndsSilentlyOnStop,
    ErrorOnStop,
    AbortHangs,
    CleanupFails,
    SecondCleanupFails,
    CleanupNeedsStart,
    /// Streams are always ready and never end, ignoring `max_tokens` and stop.
    Endless,
    /// `generate` refuses a request without `max_tokens` (the engine has no limit of its own).
    RequiresMaxTokens,
    /// Setup holds a lock across an await, and a setup that finds it held waits for a
    /// wake-up that never comes (a hand-rolled lock that loses its waiters): fine while
    /// setups run one after the other, a deadlock when two overlap.
    OverlappingSetupHangs,
    /// Setup holds a lock across an await, and a setup that finds it held fails.
    OverlappingSetupFails,
}

pub(crate) fn flaw_error() -> EngineError {
    EngineError::new(ErrorKind::Unavailable, "deliberately broken")
}

#[derive(Debug)]
pub(crate) struct TestEngine {
    flaw: Flaw,
    started: AtomicBool,
    starts: AtomicUsize,
    cleanups: AtomicUsize,
    /// `(request id, max_tokens)` of every `generate`, in the order their setups ran.
    seen: Mutex<Vec<(String, Option<u32>)>>,
    /// Held by a setup across its await (the `OverlappingSetup*` flaws).
    setting_up: AtomicBool,
    /// `start` takes this long on this runtime's clock, if set.
    slow_start: Option<(Arc<dyn Runtime>, Duration)>,
    /// Streams alive right now (each holds a [`LiveGuard`]).
    live: Arc<AtomicUsize>,
    /// Ids of aborted requests.
    aborted: Arc<Mutex<HashSet<String>>>,
}

impl TestEngine {
    pub(crate) fn new(flaw: Flaw) -> TestEngine {
        TestEngine {
            flaw,
            started: AtomicBool::new(false),
            starts: AtomicUsize::new(0),
            cleanups: AtomicUsize::new(0),
            seen: Mutex::default(),
            setting_up: AtomicBool::new(false),
            slow_start: None,
            live: Arc::default(),
            aborted: Arc::default(),
        }
    }

    /// A correct engine whose `start` takes `delay` on `runtime`'s clock (a model load).
    pub(crate) fn slow_start(runtime: Arc<dyn Runtime>, delay: Duration) -> TestEngine {
        TestEngine {
            slow_start: Some((runtime, delay)),
            ..TestEngine::new(Flaw::None)
        }
    }

    /// How many times `start` was called.
    pub(crate) fn starts(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }

    /// How many times `cleanup` was called.
    pub(crate) fn cleanups(&self) -> usize {
        self.cleanups.load(Ordering::SeqCst)
    }

    /// `(request id, max_tokens)` of every `generate`, in the order their setups ran.
    pub(crate) fn seen(&self) -> Vec<(String, Option<u32>)> {
        self.seen.lock().unwrap().clone()
    }

    /// Run `generate`'s setup under the `OverlappingSetup*` flaws' lock.
    async fn locked_setup(&self) -> Result<(), EngineError> {
        if self.setting_up.swap(true, Ordering::SeqCst) {
            if self.flaw == Flaw::OverlappingSetupFails {
                return Err(flaw_error());
            }
            std::future::pending::<()>().await;
        }
        // The await a real setup does while it holds the lock (a call to its scheduler).
        yield_once().await;
        self.setting_up.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// Return `Pending` once, waking at once.
async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await;
}

impl LlmEngine for TestEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            self.starts.fetch_add(1, Ordering::SeqCst);
            if let Some((runtime, delay)) = &self.slow_start {
                let mut timer = runtime.sleep_until(runtime.now() + *delay);
                std::future::poll_fn(|cx| timer.as_mut().poll(cx)).await;
            }
            match self.flaw {
                Flaw::StartFails => return Err(flaw_error()),
                Flaw::StartHangs => std::future::pending::<()>().await,
                _ => {}
            }
            self.started.store(true, Ordering::SeqCst);
            let model = if self.flaw == Flaw::EmptyModel {
                String::new()
            } else {
                MODEL.to_owned()
            };
            Ok(EngineConfig::new(model, worker_id).with_max_concurrency(None))
        })
    }

    fn generate(
        &self,
        request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async move {
            if !self.started.load(Ordering::SeqCst) {
                return Err(EngineError::invalid_argument("engine not started"));
            }
            assert_eq!(request.model, MODEL);
            let max_tokens = request.stop.max_tokens;
            self.seen
                .lock()
                .unwrap()
                .push((request.id.clone(), max_tokens));
            match self.flaw {
                Flaw::GenerateFails => return Err(flaw_error()),
                Flaw::GenerateHangs => std::future::pending::<()>().await,
                Flaw::RequiresMaxTokens if max_tokens.is_none() => {
                    return Err(EngineError::invalid_argument("max_tokens is required"));
                }
                Flaw::OverlappingSetupHangs | Flaw::OverlappingSetupFails => {
                    self.locked_setup().await?;
                }
                _ => {}
            }
            let under_load = self.live.fetch_add(1, Ordering::SeqCst) > 0;
            let guard = LiveGuard(Arc::clone(&self.live));
            if under_load && self.flaw == Flaw::OneAtATime {
                return Err(flaw_error());
            }
            let max = request.stop.max_tokens.unwrap_or(u32::MAX);
            let stream: ChunkStream = Box::pin(TokenStream {
                flaw: self.flaw,
                context,
                aborted: Arc::clone(&self.aborted),
                under_load,
                len: max.min(NATURAL_LEN),
                reason: if max <= NATURAL_LEN {
                    FinishReason::Length
                } else {
                    FinishReason::Eos
                },
                emitted: 0,
                yielded: false,
                done: false,
                extra_sent: false,
                _live: guard,
            });
            Ok(stream)
        })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match self.flaw {
                Flaw::AbortHangs => std::future::pending::<()>().await,
                Flaw::HonoursStopOnly => return,
                _ => {}
            }
            let mut aborted = self.aborted.lock().unwrap();
            aborted.insert(context.request_id().to_owned());
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let earlier = self.cleanups.fetch_add(1, Ordering::SeqCst);
            let fails = match self.flaw {
                Flaw::CleanupFails => true,
                Flaw::SecondCleanupFails => earlier > 0,
                Flaw::CleanupNeedsStart => !self.started.load(Ordering::SeqCst),
                _ => false,
            };
            if fails {
                Err(flaw_error())
            } else {
                Ok(())
            }
        })
    }
}

#[derive(Debug)]
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Emits `len` tokens, yielding to the executor between items (so interleaving is
/// real), then a terminal with `reason`; on stop or abort, a `Cancelled` terminal.
#[derive(Debug)]
struct TokenStream {
    flaw: Flaw,
    context: GenerateContext,
    aborted: Arc<Mutex<HashSet<String>>>,
    under_load: bool,
    len: u32,
    reason: FinishReason,
    emitted: u32,
    yielded: bool,
    done: bool,
    extra_sent: bool,
    _live: LiveGuard,
}

type Item = Option<Result<Chunk, EngineError>>;

impl TokenStream {
    fn cancelled(&self) -> bool {
        let stopped = self.context.is_stopped() && self.flaw != Flaw::HonoursAbortOnly;
        let aborted = self
            .aborted
            .lock()
            .unwrap()
            .contains(self.context.request_id());
        (stopped || aborted) && self.flaw != Flaw::IgnoresStop
    }

    fn end(&mut self, item: Item) -> Poll<Item> {
        self.done = true;
        Poll::Ready(item)
    }
}

impl Stream for TokenStream {
    type Item = Result<Chunk, EngineError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Item> {
        let this = self.get_mut();
        if this.done {
            if this.flaw == Flaw::ChunkAfterTerminal && !this.extra_sent {
                this.extra_sent = true;
                return Poll::Ready(Some(Ok(Chunk::tokens(vec![7]))));
            }
            return Poll::Ready(None);
        }
        if this.flaw == Flaw::Endless {
            this.emitted = this.emitted.wrapping_add(1);
            return Poll::Ready(Some(Ok(Chunk::tokens(vec![this.emitted]))));
        }
        if !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yielded = false;
        if this.cancelled() {
            return match this.flaw {
                // Never wakes again: the kit's 2 s deadline has to catch it.
                Flaw::StallsOnStop => Poll::Pending,
                Flaw::EndsSilentlyOnStop => this.end(None),
                Flaw::ErrorOnStop => this.end(Some(Err(EngineError::cancelled("stopped")))),
                _ => this.end(Some(Ok(Chunk::terminal(FinishReason::Cancelled)))),
            };
        }
        match this.flaw {
            Flaw::EmptyStream => return this.end(None),
            Flaw::EmptyUnderLoad if this.under_load => return this.end(None),
            Flaw::ErrorUnderLoad if this.under_load => return this.end(Some(Err(flaw_error()))),
            Flaw::ErrorItem if this.emitted == 1 => return this.end(Some(Err(flaw_error()))),
            _ => {}
        }
        if this.emitted == this.len {
            if this.flaw == Flaw::NoTerminal {
                return this.end(None);
            }
            let terminal = Chunk::terminal(this.reason.clone());
            return this.end(Some(Ok(terminal)));
        }
        this.emitted += 1;
        Poll::Ready(Some(Ok(Chunk::tokens(vec![100 + this.emitted]))))
    }
}
