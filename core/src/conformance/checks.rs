//! The generate checks (single, interleaved, stop) on an already started engine, and
//! the [`Tally`] that judges one stream. Owns no clock of its own: deadlines come from
//! the [`Kit`]'s runtime and config. Must not start or clean up the engine.

use std::future::{poll_fn, Future};
use std::task::{Context as TaskContext, Poll};

use super::{ConformanceFailure, Kit};
use crate::context::Context;
use crate::drive::AsyncTimer;
use crate::engine::{BoxFuture, ChunkStream, GenerateContext, LlmEngine};
use crate::error::EngineError;
use crate::protocol::{Chunk, FinishReason, Request};

/// `max_tokens` of the interleaved requests, which are meant to finish on their own.
const SHORT_MAX_TOKENS: u32 = 16;
const PROMPT: [u32; 3] = [1, 2, 3];
/// How many ready items the kit takes in one poll before it yields. A stream that is
/// always ready (an endless engine) would otherwise never let a deadline be checked.
const ITEMS_PER_POLL: usize = 64;

/// The request ids the kit uses (engines may log them).
pub(super) const SINGLE_ID: &str = "conformance-single";
pub(super) const STOP_ID: &str = "conformance-stop";
pub(super) const INTERLEAVED_ID: &str = "conformance-interleaved";

/// One request with no `max_tokens`: the engine's own limit ends it.
pub(super) async fn single_generate(
    engine: &dyn LlmEngine,
    model: &str,
) -> Result<(), ConformanceFailure> {
    let (request, gctx) = request(SINGLE_ID, model, None);
    let mut stream = engine
        .generate(request, gctx)
        .await
        .map_err(ConformanceFailure::GenerateFailed)?;
    let mut tally = Tally::default();
    while let Some(item) = next(&mut stream).await {
        tally.observe(item).map_err(|flaw| match flaw {
            ItemFlaw::AfterTerminal(index) => ConformanceFailure::ChunkAfterTerminal { index },
            ItemFlaw::Error(error) => ConformanceFailure::StreamYieldedError(error),
        })?;
        if tally.items % ITEMS_PER_POLL == 0 {
            yield_now().await;
        }
    }
    tally.finish(ConformanceFailure::NoChunksYielded)
}

/// Where one interleaved request is.
enum Slot<'e> {
    SettingUp(BoxFuture<'e, Result<ChunkStream, EngineError>>),
    Streaming(ChunkStream),
    Done,
}

/// `requests` requests issued at once: every `generate` future is polled together, as
/// a server's concurrent handlers would, and each stream from the moment it is set up,
/// round-robin. Nothing is spawned: everything is polled in place.
pub(super) async fn interleaved_generates(
    engine: &dyn LlmEngine,
    model: &str,
    requests: usize,
) -> Result<(), ConformanceFailure> {
    let mut slots: Vec<Slot<'_>> = (0..requests)
        .map(|request_no| {
            let id = format!("{INTERLEAVED_ID}-{request_no}");
            let (request, gctx) = request(&id, model, Some(SHORT_MAX_TOKENS));
            Slot::SettingUp(engine.generate(request, gctx))
        })
        .collect();
    let mut tallies: Vec<Tally> = (0..requests).map(|_| Tally::default()).collect();

    // One step (a setup poll, or one item) per live request per pass, passes repeated
    // while any request made progress. Streams are polled while other setups are still
    // pending: an engine whose setup waits for a free slot gets one when an earlier
    // stream ends. An engine that only advances a request when another is polled (a
    // batch scheduler) works here; one that serves them one after the other does too,
    // as long as each future and stream eventually wakes us.
    poll_fn(|cx| {
        let mut taken = 0;
        loop {
            let mut progressed = false;
            for (request_no, slot) in slots.iter_mut().enumerate() {
                if poll_slot(request_no, slot, &mut tallies[request_no], cx)? {
                    progressed = true;
                    taken += 1;
                }
            }
            if slots.iter().all(|slot| matches!(slot, Slot::Done)) {
                return Poll::Ready(Ok(()));
            }
            if !progressed {
                return Poll::Pending;
            }
            if taken >= ITEMS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    })
    .await
}

/// Poll interleaved request `request_no` once (its setup, or its stream once set up);
/// `Ok(true)` when it made progress (set up, yielded an item or ended).
fn poll_slot(
    request_no: usize,
    slot: &mut Slot<'_>,
    tally: &mut Tally,
    cx: &mut TaskContext<'_>,
) -> Result<bool, ConformanceFailure> {
    match slot {
        Slot::Done => Ok(false),
        Slot::SettingUp(setup) => match setup.as_mut().poll(cx) {
            Poll::Pending => Ok(false),
            Poll::Ready(Ok(stream)) => {
                *slot = Slot::Streaming(stream);
                Ok(true)
            }
            Poll::Ready(Err(error)) => Err(ConformanceFailure::ConcurrentGenerateFailed {
                request: request_no,
                error,
            }),
        },
        Slot::Streaming(stream) => match stream.as_mut().poll_next(cx) {
            Poll::Pending => Ok(false),
            Poll::Ready(Some(item)) => {
                tally.observe(item).map_err(|flaw| match flaw {
                    ItemFlaw::AfterTerminal(index) => {
                        ConformanceFailure::ChunkAfterTerminal { index }
                    }
                    ItemFlaw::Error(error) => ConformanceFailure::ConcurrentGenerateFailed {
                        request: request_no,
                        error,
                    },
                })?;
                Ok(true)
            }
            Poll::Ready(None) => {
                *slot = Slot::Done;
                tally.finish(ConformanceFailure::ConcurrentNoChunks {
                    request: request_no,
                })?;
                Ok(true)
            }
        },
    }
}

/// A request with `stop_max_tokens`, stopped and aborted right after `generate` (as
/// the adapter would), must end with a `Cancelled` terminal within `cancel_within`.
pub(super) async fn stop_yields_cancelled(
    kit: &Kit<'_>,
    engine: &dyn LlmEngine,
    model: &str,
) -> Result<(), ConformanceFailure> {
    let (request, gctx) = request(STOP_ID, model, Some(kit.config.stop_max_tokens));
    let mut stream = engine
        .generate(request, gctx.clone())
        .await
        .map_err(ConformanceFailure::GenerateFailed)?;

    // What the adapter does on a client stop: flag the context, then abort the engine.
    // The abort runs alongside the stream, as the adapter's spawned abort would: an
    // engine may need its stream polled for the abort to complete.
    gctx.context().stop();
    let stopped_at = kit.runtime.now();
    let mut deadline = kit.timer(stopped_at, kit.config.cancel_within, "cancel_within")?;
    let mut abort = Some(engine.abort(gctx));
    let mut cancelled = false;

    poll_fn(|cx| {
        if let Some(fut) = abort.as_mut() {
            if fut.as_mut().poll(cx).is_ready() {
                abort = None;
            }
        }
        let mut taken = 0;
        while !cancelled {
            if taken == ITEMS_PER_POLL {
                // Let the deadline below be checked against an always-ready stream.
                cx.waker().wake_by_ref();
                break;
            }
            taken += 1;
            match stream.as_mut().poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(ConformanceFailure::NoTerminalChunk));
                }
                Poll::Ready(Some(Err(error))) => {
                    return Poll::Ready(Err(ConformanceFailure::StreamYieldedError(error)));
                }
                Poll::Ready(Some(Ok(chunk))) => match chunk.finish_reason {
                    None => {}
                    Some(FinishReason::Cancelled) => cancelled = true,
                    Some(reason) => {
                        return Poll::Ready(Err(ConformanceFailure::CancellationIgnored {
                            reason,
                        }));
                    }
                },
            }
        }
        if cancelled {
            // Only the abort is left; it gets the rest of the check's time.
            return if abort.is_none() {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        }
        if AsyncTimer::poll(deadline.as_mut(), cx).is_ready() {
            let after = kit.runtime.now().saturating_duration_since(stopped_at);
            return Poll::Ready(Err(ConformanceFailure::CancellationNotObserved { after }));
        }
        Poll::Pending
    })
    .await
}

/// A request (with its fresh context) for the engine, named `id`.
fn request(id: &str, model: &str, max_tokens: Option<u32>) -> (Request, GenerateContext) {
    let mut request = Request::new(id, model, PROMPT.to_vec());
    if let Some(max_tokens) = max_tokens {
        request = request.with_max_tokens(max_tokens);
    }
    let gctx = GenerateContext::new(Context::new(id), id);
    (request, gctx)
}

fn next(stream: &mut ChunkStream) -> impl Future<Output = Option<Result<Chunk, EngineError>>> + '_ {
    poll_fn(move |cx: &mut TaskContext<'_>| stream.as_mut().poll_next(cx))
}

/// Return `Pending` once (waking at once), so that an enclosing deadline gets polled.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
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

/// What one stream has yielded so far.
#[derive(Debug, Default)]
struct Tally {
    items: usize,
    terminal: bool,
}

/// A bad item, before it is named for the check that saw it.
#[derive(Debug)]
enum ItemFlaw {
    AfterTerminal(usize),
    Error(EngineError),
}

impl Tally {
    fn observe(&mut self, item: Result<Chunk, EngineError>) -> Result<(), ItemFlaw> {
        let index = self.items;
        self.items += 1;
        // Anything after the terminal is the worse fault: even an error item there
        // means the engine did not end its stream where it said it would.
        if self.terminal {
            return Err(ItemFlaw::AfterTerminal(index));
        }
        let chunk = item.map_err(ItemFlaw::Error)?;
        self.terminal = chunk.is_terminal();
        Ok(())
    }

    fn finish(&self, empty: ConformanceFailure) -> Result<(), ConformanceFailure> {
        if self.items == 0 {
            Err(empty)
        } else if !self.terminal {
            Err(ConformanceFailure::NoTerminalChunk)
        } else {
            Ok(())
        }
    }
}
