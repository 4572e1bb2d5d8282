//! [`TinyStream`]: the engine side of one request's stream, reading what the scheduler
//! sends through the request's channel.
//!
//! Owns only the reader's end: once it has read its sequence's last item it is done,
//! and if it is dropped before that, it frees the sequence and its KV cache.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_channel::Receiver;
use futures_core::Stream;

use super::state::{Effects, Item};
use super::Core;

pub(crate) struct TinyStream {
    rx: Pin<Box<Receiver<Item>>>,
    core: Arc<Core>,
    seq: u64,
    ended: bool,
}

impl TinyStream {
    pub(crate) fn new(core: Arc<Core>, seq: u64, rx: Receiver<Item>) -> TinyStream {
        TinyStream {
            rx: Box::pin(rx),
            core,
            seq,
            ended: false,
        }
    }
}

impl Stream for TinyStream {
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
        let last = match &item {
            Some(Ok(chunk)) => chunk.is_terminal(),
            Some(Err(_)) | None => true,
        };
        if last {
            self.ended = true;
        }
        Poll::Ready(item)
    }
}

impl Drop for TinyStream {
    fn drop(&mut self) {
        if !self.ended {
            let mut fx = Effects::default();
            self.core.lock().detach(self.seq, &mut fx);
            self.core.settle(fx);
        }
    }
}
