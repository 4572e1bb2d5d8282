//! [`SimStream`]: the engine side of one request's stream, reading the chunks the
//! scheduler sends through the request's channel.
//!
//! Owns the reader's half of the bookkeeping: it tells the engine when the sequence's
//! end was read (and whether the request was being cancelled then), frees the sequence
//! when the stream is dropped early, and carries out a `Panic` chaos inside `poll_next`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_channel::Receiver;
use futures_core::Stream;
use tether_core::engine::GenerateContext;

use super::chaos::CHAOS_PANIC_MESSAGE;
use super::state::Item;
use super::Core;

pub(crate) struct SimStream {
    rx: Pin<Box<Receiver<Item>>>,
    core: Arc<Core>,
    seq: u64,
    gctx: GenerateContext,
    panic_at: Option<u32>,
    tokens: u32,
    end_read: bool,
    panicked: bool,
}

impl SimStream {
    pub(crate) fn new(
        core: Arc<Core>,
        seq: u64,
        rx: Receiver<Item>,
        gctx: GenerateContext,
        panic_at: Option<u32>,
    ) -> SimStream {
        SimStream {
            rx: Box::pin(rx),
            core,
            seq,
            gctx,
            panic_at,
            tokens: 0,
            end_read: false,
            panicked: false,
        }
    }

    fn read_end(&mut self) {
        self.end_read = true;
        let cancelling = self.gctx.is_stopped();
        self.core
            .lock()
            .read_end(&self.core.config, self.seq, cancelling);
    }
}

impl Stream for SimStream {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if self.end_read || self.panicked {
            return Poll::Ready(None);
        }
        let item = match self.rx.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        match &item {
            Some(Ok(chunk)) if chunk.has_tokens() => {
                if self.panic_at == Some(self.tokens) {
                    // The lock is not held here; `Drop` frees the sequence.
                    self.panicked = true;
                    panic!("{CHAOS_PANIC_MESSAGE} at step {}", self.tokens);
                }
                let n = u32::try_from(chunk.token_ids.len()).unwrap_or(u32::MAX);
                self.tokens = self.tokens.saturating_add(n);
                if chunk.is_terminal() {
                    self.read_end();
                }
            }
            Some(Ok(chunk)) if !chunk.is_terminal() => {}
            // A terminal, an error, or the channel closed (the engine shut down or the
            // sequence was forgotten): the end either way.
            _ => self.read_end(),
        }
        Poll::Ready(item)
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        if !self.end_read {
            self.core
                .lock()
                .detach(&self.core.config, self.seq, self.panicked);
        }
    }
}
