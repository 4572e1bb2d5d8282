//! An engine that works on its own threads, as one with a real model does: each
//! `generate` spawns a `std::thread` that produces a token every [`STEP`] of real time
//! and sends the chunks through a channel. The kit must pass it on a real clock (smol,
//! and tokio without `start_paused`); a paused tokio clock fires the kit's deadlines
//! early against it, which is why the docs say to use a real clock for such engines.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::StreamExt;
use tether_core::conformance::{cancelling_context, ConformanceFailure, CHECK_TIMEOUT};
use tether_core::engine::BoxFuture;
use tether_core::Cause;
use tether_core::{
    Chunk, ChunkStream, EngineConfig, EngineError, FinishReason, GenerateContext, LlmEngine,
    Request,
};

use crate::{passed, MODEL, NATURAL_LEN};

/// Real time per token on the engine's thread.
const STEP: Duration = Duration::from_millis(2);

#[derive(Debug)]
pub(crate) struct ThreadedEngine {
    /// Tokens until the model "hits EOS" (unless `max_tokens` is lower).
    natural_len: u32,
    started: AtomicBool,
    /// Ids of aborted requests, shared with the threads.
    aborted: Arc<Mutex<HashSet<String>>>,
}

impl ThreadedEngine {
    fn new(natural_len: u32) -> ThreadedEngine {
        ThreadedEngine {
            natural_len,
            started: AtomicBool::new(false),
            aborted: Arc::default(),
        }
    }
}

impl LlmEngine for ThreadedEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            self.started.store(true, Ordering::SeqCst);
            Ok(EngineConfig::new(MODEL, worker_id))
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
            let max = request.stop.max_tokens.unwrap_or(self.natural_len);
            let (len, reason) = if max <= self.natural_len {
                (max, FinishReason::Length)
            } else {
                (self.natural_len, FinishReason::Eos)
            };
            let (tx, rx) = mpsc::unbounded();
            let aborted = Arc::clone(&self.aborted);
            std::thread::spawn(move || {
                let id = context.request_id().to_owned();
                for token in 0..len {
                    std::thread::sleep(STEP);
                    if context.context().is_stopped() || aborted.lock().unwrap().contains(&id) {
                        let cancelled = Chunk::terminal(FinishReason::Cancelled);
                        let _ = tx.unbounded_send(Ok(cancelled));
                        return;
                    }
                    // A send fails once the stream is dropped: the request is over.
                    if tx.unbounded_send(Ok(Chunk::tokens(vec![token]))).is_err() {
                        return;
                    }
                }
                let _ = tx.unbounded_send(Ok(Chunk::terminal(reason)));
            });
            let stream: ChunkStream = Box::pin(rx);
            Ok(stream)
        })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let id = context.request_id().to_owned();
            self.aborted.lock().unwrap().insert(id);
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

fn threaded() -> Arc<dyn LlmEngine> {
    Arc::new(ThreadedEngine::new(NATURAL_LEN))
}

#[test]
fn threaded_engine_passes_on_smol() {
    let report = smol::block_on(tether_smol::run_conformance(threaded));
    assert_eq!(report, Ok(passed()));
}

#[tokio::test]
async fn threaded_engine_passes_on_tokio_with_a_real_clock() {
    assert_eq!(tether_tokio::run_conformance(threaded).await, Ok(passed()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threaded_engine_passes_on_multi_threaded_tokio() {
    assert_eq!(tether_tokio::run_conformance(threaded).await, Ok(passed()));
}

/// Why the docs say "real clock": the runtime is idle while the engine's thread works,
/// so a paused clock jumps straight to the check's 30 s deadline.
#[tokio::test(start_paused = true)]
async fn paused_clock_fires_deadlines_early_against_a_threaded_engine() {
    let expected = ConformanceFailure::Hung {
        check: "single_generate",
        after: CHECK_TIMEOUT,
    };
    assert_eq!(tether_tokio::run_conformance(threaded).await, Err(expected));
}

/// `cancelling_context` in an engine author's own test: a request on the engine's
/// thread that only a stop can end (no EOS, a `max_tokens` of 2000 s), stopped from a
/// runtime timer, ends with `Cancelled`.
#[test]
fn cancelling_context_stops_a_threaded_engine() {
    smol::block_on(async {
        let engine: Arc<dyn LlmEngine> = Arc::new(ThreadedEngine::new(u32::MAX));
        engine.start(0).await.unwrap();
        let runtime = tether_smol::SmolRuntime::global();
        let context = cancelling_context(&runtime, "long", STEP * 3);
        let request = Request::new("long", MODEL, vec![1]).with_max_tokens(1_000_000);
        let gctx = GenerateContext::new(context.clone(), "long");
        let stream = engine.generate(request, gctx).await.unwrap();
        let items: Vec<_> = stream.collect().await;
        let last = items.last().cloned().unwrap().unwrap();
        assert_eq!(last.finish_reason, Some(FinishReason::Cancelled));
        assert_eq!(context.cause(), Some(Cause::Caller));
    });
}
