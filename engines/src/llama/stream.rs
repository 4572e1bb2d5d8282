//! [`LlamaStream`]: the engine side of one request's stream, reading what the engine's
//! thread sends through the request's channel. Dropped before its end, it forgets the
//! sequence (a queued one at once; one in the batch at the thread's next step, which
//! removes its cells).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_channel::Receiver;
use futures_core::Stream;

use super::books::{Effects, Item};
use super::Shared;

pub(crate) struct LlamaStream {
    rx: Pin<Box<Receiver<Item>>>,
    shared: Arc<Shared>,
    seq: u64,
    ended: bool,
}

impl LlamaStream {
    pub(crate) fn new(shared: Arc<Shared>, seq: u64, rx: Receiver<Item>) -> LlamaStream {
        LlamaStream {
            rx: Box::pin(rx),
            shared,
            seq,
            ended: false,
        }
    }
}

impl Stream for LlamaStream {
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
        // books either way.
        self.ended = match &item {
            Some(Ok(chunk)) => chunk.is_terminal(),
            Some(Err(_)) | None => true,
        };
        Poll::Ready(item)
    }
}

impl Drop for LlamaStream {
    fn drop(&mut self) {
        if !self.ended {
            let mut fx = Effects::default();
            self.shared.lock().detach(self.seq, &mut fx);
            self.shared.settle(fx);
        }
    }
}
