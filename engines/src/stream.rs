//! [`SeqStream`]: the engine side of one request's stream, shared by TinyEngine and the
//! llama.cpp engine: it reads what the engine sends through the request's channel, is
//! done once it has read the sequence's last item, and if it is dropped before that,
//! tells its engine to forget the sequence ([`Detach`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_channel::Receiver;
use futures_core::Stream;
use tether_core::error::EngineError;
use tether_core::protocol::Chunk;

/// What flows through a request's channel to its stream.
pub(crate) type Item = Result<Chunk, EngineError>;

/// An engine's books, as a stream dropped before its end sees them.
pub(crate) trait Detach: Send + Sync + 'static {
    /// The stream of sequence `seq` was dropped before its end: forget the sequence
    /// and free what it holds.
    fn detach(&self, seq: u64);
}

/// One sequence's stream (see the module docs).
pub(crate) struct SeqStream<E: Detach> {
    rx: Pin<Box<Receiver<Item>>>,
    engine: Arc<E>,
    seq: u64,
    ended: bool,
}

impl<E: Detach> SeqStream<E> {
    pub(crate) fn new(engine: Arc<E>, seq: u64, rx: Receiver<Item>) -> SeqStream<E> {
        SeqStream {
            rx: Box::pin(rx),
            engine,
            seq,
            ended: false,
        }
    }
}

impl<E: Detach> Stream for SeqStream<E> {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = match self.rx.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        // A terminal, an error, or the channel closed: the sequence already left the
        // engine's books either way.
        self.ended = match &item {
            Some(Ok(chunk)) => chunk.is_terminal(),
            Some(Err(_)) | None => true,
        };
        Poll::Ready(item)
    }
}

impl<E: Detach> Drop for SeqStream<E> {
    fn drop(&mut self) {
        if !self.ended {
            self.engine.detach(self.seq);
        }
    }
}
