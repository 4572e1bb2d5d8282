//! [`Adapter`] as a `tower::Service<Request>` (feature `tower`), so load shedding,
//! concurrency limits and timeouts come from `tower`'s layers.
//!
//! `call` starts the request under a new context named after the request id (reach it
//! with [`ResponseStream::context`]); the future is [`Generating`], so a `tower`
//! timeout that drops it records the request and aborts the engine (rule 10).
//!
//! A `ConcurrencyLimit` layer releases its permit when the call's future resolves, that
//! is when the stream is returned, not when generation ends: to bound running
//! generations, hold a permit in the stream with [`ResponseStream::attach`] (it is
//! dropped when the request is over for the consumer).

use std::task::{Context as TaskContext, Poll};

use super::{Adapter, Generating, ResponseStream};
use crate::error::EngineError;
use crate::protocol::Request;

impl tower_service::Service<Request> for Adapter {
    type Response = ResponseStream;
    type Error = EngineError;
    type Future = Generating;

    /// Always ready: the adapter queues nothing (put a `tower` limit in front of it).
    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), EngineError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Generating {
        std::future::IntoFuture::into_future(self.request(request))
    }
}
