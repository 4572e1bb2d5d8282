//! [`Minimal`]: the least any correct lifecycle layer must do per chunk, to compare
//! tether's per-chunk cost against: one clock read through the [`Runtime`] (for
//! inter-token latency), one atomic compare-exchange (to decide, race-free against a
//! cancelling thread, whether the chunk may be forwarded), and one push of the gap.
//! It yields the same item type as tether (`Annotated<Chunk>`).
//!
//! It is not a correct layer (no abort, no terminal synthesis, no record): it is the
//! floor, not a competitor.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use futures_core::Stream;
use tether_core::drive::Runtime;
use tether_core::engine::ChunkStream;
use tether_core::protocol::{Annotated, Chunk};

const PENDING: u32 = 0;
const STREAMING: u32 = 1;
const DONE: u32 = 2;

/// The floor wrapper around an engine stream (see the module doc).
pub struct Minimal {
    engine: ChunkStream,
    runtime: Arc<dyn Runtime>,
    /// Shared with whoever would cancel the request (nobody, in the bench).
    state: Arc<AtomicU32>,
    expected: u32,
    last: Option<Instant>,
    gaps_us: Vec<u32>,
}

impl std::fmt::Debug for Minimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minimal")
            .field("expected", &self.expected)
            .field("gaps", &self.gaps_us.len())
            .finish_non_exhaustive()
    }
}

impl Minimal {
    /// Wrap `engine`, reading the clock from `runtime`.
    pub fn new(engine: ChunkStream, runtime: Arc<dyn Runtime>) -> Minimal {
        Minimal {
            engine,
            runtime,
            state: Arc::new(AtomicU32::new(PENDING)),
            expected: PENDING,
            last: None,
            gaps_us: Vec::new(),
        }
    }

    /// The inter-token gaps recorded so far, in microseconds.
    pub fn gaps_us(&self) -> &[u32] {
        &self.gaps_us
    }
}

impl Stream for Minimal {
    type Item = Annotated<Chunk>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.expected == DONE {
            return Poll::Ready(None);
        }
        let chunk = match this.engine.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => chunk,
            Poll::Ready(Some(Err(err))) => {
                this.expected = DONE;
                return Poll::Ready(Some(Annotated::from_error(err)));
            }
            Poll::Ready(None) => {
                this.expected = DONE;
                return Poll::Ready(None);
            }
        };
        let now = this.runtime.now();
        let next = if chunk.is_terminal() { DONE } else { STREAMING };
        // AcqRel/Acquire: publish this decision to, and see, a cancelling thread.
        if let Err(actual) =
            this.state
                .compare_exchange(this.expected, next, Ordering::AcqRel, Ordering::Acquire)
        {
            // Someone cancelled meanwhile: a real layer would synthesize a terminal.
            this.expected = actual;
            return Poll::Ready(None);
        }
        this.expected = next;
        if let Some(last) = this.last {
            let gap = now.saturating_duration_since(last).as_micros();
            this.gaps_us.push(u32::try_from(gap).unwrap_or(u32::MAX));
        }
        this.last = Some(now);
        Poll::Ready(Some(Annotated::from_data(chunk)))
    }
}
