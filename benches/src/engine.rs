//! [`BenchEngine`]: a tiny in-memory engine. Its stream hands out chunks prepared in
//! a `Vec` (so the bench measures the layer above, not an engine), and its `abort`
//! records the instant it was entered (what `cancel_latency` measures up to).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use futures_core::Stream;
use tether_core::engine::{BoxFuture, ChunkStream, EngineConfig, GenerateContext, LlmEngine};
use tether_core::error::EngineError;
use tether_core::protocol::{Chunk, FinishReason, Request};

/// What the engine stream does once its prepared chunks are out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// End the stream (the prepared chunks normally end with a terminal).
    End,
    /// Stay pending forever: an idle in-flight request, or one waiting to be cancelled.
    Hang,
}

/// `n` single-token chunks followed by a `Length` terminal.
pub fn script(n: usize) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = (0..n)
        .map(|i| Chunk::tokens(vec![u32::try_from(i).unwrap_or(u32::MAX)]))
        .collect();
    chunks.push(Chunk::terminal(FinishReason::Length));
    chunks
}

/// The in-memory engine. `generate` streams the next prepared script if one was
/// [`prepare`](BenchEngine::prepare)d, otherwise builds `max_tokens` single-token
/// chunks plus a terminal (`Tail::Hang`: no terminal), allocating them inside the
/// measured region for every layer alike.
#[derive(Debug)]
pub struct BenchEngine {
    tail: Tail,
    prepared: Mutex<Vec<Vec<Chunk>>>,
    aborts: AtomicU64,
    abort_entered: Mutex<Option<Instant>>,
    abort_notify: tokio::sync::Notify,
}

impl BenchEngine {
    /// An engine whose streams end (`Tail::End`) or hang (`Tail::Hang`) after their chunks.
    pub fn new(tail: Tail) -> Arc<BenchEngine> {
        Arc::new(BenchEngine {
            tail,
            prepared: Mutex::new(Vec::new()),
            aborts: AtomicU64::new(0),
            abort_entered: Mutex::new(None),
            abort_notify: tokio::sync::Notify::new(),
        })
    }

    /// Queue `chunks` for a later `generate` (last prepared, first served).
    pub fn prepare(&self, chunks: Vec<Chunk>) {
        self.prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(chunks);
    }

    /// How many times `abort` was entered.
    pub fn aborts(&self) -> u64 {
        self.aborts.load(Ordering::Relaxed)
    }

    /// Wait until `abort` is entered (or was, since the last call) and return the
    /// instant it was entered.
    pub async fn abort_entered(&self) -> Instant {
        loop {
            let notified = self.abort_notify.notified();
            if let Some(at) = self
                .abort_entered
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                return at;
            }
            notified.await;
        }
    }

    fn chunks_for(&self, request: &Request) -> Vec<Chunk> {
        if let Some(chunks) = self
            .prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
        {
            return chunks;
        }
        let n = request.stop.max_tokens.unwrap_or(0) as usize;
        match self.tail {
            Tail::End => script(n),
            Tail::Hang => script(n).into_iter().take(n).collect(),
        }
    }
}

impl LlmEngine for BenchEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            Ok(EngineConfig::new("bench".to_owned(), worker_id).with_max_concurrency(None))
        })
    }

    fn generate(
        &self,
        request: Request,
        _context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        let stream = ScriptStream {
            chunks: self.chunks_for(&request).into_iter(),
            hang: self.tail == Tail::Hang,
        };
        Box::pin(async move { Ok(Box::pin(stream) as ChunkStream) })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        // First thing: the instant `cancel_latency` measures up to.
        let at = Instant::now();
        self.aborts.fetch_add(1, Ordering::Relaxed);
        *self
            .abort_entered
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(at);
        self.abort_notify.notify_one();
        drop(context);
        Box::pin(async {})
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The engine's stream: the prepared chunks, then the end or nothing ever.
#[derive(Debug)]
struct ScriptStream {
    chunks: std::vec::IntoIter<Chunk>,
    hang: bool,
}

impl Stream for ScriptStream {
    type Item = Result<Chunk, EngineError>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.chunks.next() {
            Some(chunk) => Poll::Ready(Some(Ok(chunk))),
            // A hung stream never wakes: only a drop (or nothing) ends it.
            None if this.hang => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}
