//! [`EngineSlot`]: the engine's side of one request, from the moment its `generate` is
//! entered to the end of its stream, as one source of lifecycle events.
//!
//! Setup is part of the engine's stream here: the `generate` future is polled in place
//! until it yields the stream, so a kill, a timeout or a drop during setup is handled by
//! the same machine as after it (SPEC.md rule 10), and an engine that must not be
//! dropped mid KV transfer is kept alive (and drained) the same way in both phases.
//! Every poll and every drop of engine code is guarded: a panic becomes a typed error
//! (in a poll) or a warning (in a drop), never an unwinding consumer.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use super::log;
use super::shared::Shared;
use crate::engine::ChunkStream;
use crate::error::{panic_message, EngineError};
use crate::lifecycle::Event;
use crate::protocol::Chunk;

/// The engine's `generate`, owned (it holds its own handle on the engine).
pub(crate) type SetupFuture =
    Pin<Box<dyn Future<Output = Result<ChunkStream, EngineError>> + Send>>;

/// What the engine produced, kept until the machine decides about it: a chunk, an
/// error, or the end of the stream (`None`). It is the stream's own item type, so a
/// chunk is not moved into another shape on its way (each move copies the chunk).
pub(crate) type Item = Option<Result<Chunk, EngineError>>;

/// The engine while `generate` is pending, then its stream.
pub(crate) enum EngineSlot {
    Setup(SetupFuture),
    Stream(ChunkStream),
}

impl EngineSlot {
    /// Drive setup: `Ready(None)` once the stream exists, `Ready(Some(error))` when
    /// `generate` failed or panicked.
    pub(crate) fn poll_setup(
        &mut self,
        cx: &mut TaskContext<'_>,
        shared: &Shared,
    ) -> Poll<Option<EngineError>> {
        let EngineSlot::Setup(setup) = self else {
            return Poll::Ready(None);
        };
        match catch_unwind(AssertUnwindSafe(|| setup.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(stream))) => {
                // The finished setup future is dropped here, inside the same guard.
                let done = std::mem::replace(self, EngineSlot::Stream(stream));
                if catch_unwind(AssertUnwindSafe(move || drop(done))).is_err() {
                    log::engine_misbehaved(shared, "its generate future panicked when dropped");
                    return Poll::Ready(Some(EngineError::engine_panicked(
                        "generate future panicked when dropped".to_owned(),
                    )));
                }
                Poll::Ready(None)
            }
            Ok(Poll::Ready(Err(err))) => Poll::Ready(Some(err)),
            Err(panic) => Poll::Ready(Some(panicked(shared, "generate", panic.as_ref()))),
        }
    }

    /// The next engine event (setup first, then the stream's items), with its item put
    /// in `item` (an out-parameter: a chunk returned in a tuple would be copied on its
    /// way out, on every chunk).
    #[inline]
    pub(crate) fn poll_event(
        &mut self,
        cx: &mut TaskContext<'_>,
        shared: &Shared,
        item: &mut Item,
    ) -> Poll<Event> {
        if let EngineSlot::Setup(_) = self {
            match self.poll_setup(cx, shared) {
                Poll::Ready(None) => {}
                Poll::Ready(Some(err)) => {
                    *item = Some(Err(err));
                    return Poll::Ready(Event::EngineError);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        let EngineSlot::Stream(stream) = self else {
            // `poll_setup` answers `Ready(None)` only once the stream exists.
            return Poll::Pending;
        };
        // The closure stores the item itself: one returned through `catch_unwind` would
        // be copied out of its result.
        let ready = catch_unwind(AssertUnwindSafe(|| match stream.as_mut().poll_next(cx) {
            Poll::Ready(polled) => {
                *item = polled;
                true
            }
            Poll::Pending => false,
        }));
        Poll::Ready(match ready {
            Ok(false) => return Poll::Pending,
            Ok(true) => match item {
                Some(Ok(chunk)) if chunk.is_terminal() => Event::TerminalChunk,
                Some(Ok(chunk)) if chunk.has_tokens() => Event::Chunk,
                Some(Ok(_)) => Event::TokenlessChunk,
                Some(Err(_)) => Event::EngineError,
                None => Event::EngineEnded,
            },
            Err(panic) => {
                *item = Some(Err(panicked(shared, "stream", panic.as_ref())));
                Event::EngineError
            }
        })
    }
}

/// The engine panicked in its `what`: warn, and make the typed error.
#[cold]
fn panicked(shared: &Shared, what: &str, payload: &(dyn std::any::Any + Send)) -> EngineError {
    let message = panic_message(payload);
    log::engine_misbehaved(shared, &format!("its {what} panicked: {message}"));
    EngineError::engine_panicked(message)
}

/// Let go of the engine (setup future or stream). Engines that cancel on drop do their
/// cancelling here; a panic in that `Drop` is logged, never propagated.
pub(crate) fn release(slot: Option<EngineSlot>, request_id: &str) {
    if slot.is_none() {
        return;
    }
    if let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(slot))) {
        tracing::warn!(
            target: "tether",
            request_id,
            panic = %panic_message(panic.as_ref()),
            "engine stream panicked when dropped"
        );
    }
}
