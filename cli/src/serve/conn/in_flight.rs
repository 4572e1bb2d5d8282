//! Which requests are in flight on a connection: the router wrapped as a hyper service
//! ([`Tracked`]) marks a request in flight from the arrival of its head (the service
//! call) to the end or drop of its response body, in the connection's [`ConnState`].
//!
//! Owns that bookkeeping only; the timeouts that read it are `TimedIo`'s, and what a
//! request does is the router's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use axum::body::{Body, Bytes};
use axum::Router;
use futures_util::task::AtomicWaker;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::{Request, Response};

use super::Tracker;

/// One connection's request state, shared by its IO, its service and its response
/// bodies, which all run on the connection's task.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    tracker: Arc<Tracker>,
    /// Requests in flight (HTTP/1.1: at most one, but a count is exact whatever hyper
    /// does with pipelined requests).
    in_flight: AtomicUsize,
    /// Bumped each time `in_flight` returns to 0: the IO re-arms its idle deadline when
    /// it sees a new value.
    idle_gen: AtomicU64,
    /// The task's waker from the last read, woken when the connection becomes idle so
    /// the read side arms its deadline even if hyper is not reading.
    read_waker: AtomicWaker,
}

impl ConnState {
    pub(super) fn new(tracker: Arc<Tracker>) -> ConnState {
        ConnState {
            tracker,
            ..ConnState::default()
        }
    }

    /// Requests in flight on this connection.
    pub(super) fn in_flight(&self) -> usize {
        // Relaxed: written and read on the connection's own task only.
        self.in_flight.load(Ordering::Relaxed)
    }

    /// How many times the connection became idle after a request.
    pub(super) fn idle_gen(&self) -> u64 {
        // Relaxed: as `in_flight`.
        self.idle_gen.load(Ordering::Relaxed)
    }

    /// Wake `waker` when the connection next becomes idle.
    pub(super) fn wake_when_idle(&self, waker: &Waker) {
        self.read_waker.register(waker);
    }
}

/// One request in flight on a connection: from its head's arrival (the service call)
/// to the end or drop of its response body.
pub(super) struct InFlight(Arc<ConnState>);

impl InFlight {
    pub(super) fn new(state: Arc<ConnState>) -> InFlight {
        // Relaxed: see `ConnState::in_flight`; `requests` is a plain counter.
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.tracker.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let state = &self.0;
        state.tracker.requests.fetch_sub(1, Ordering::Relaxed);
        // Relaxed: see `ConnState::in_flight`.
        if state.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            state.idle_gen.fetch_add(1, Ordering::Relaxed);
            state.read_waker.wake();
        }
    }
}

/// The router as a hyper service that marks each request in flight until its response
/// body ends or is dropped.
#[derive(Clone)]
pub(super) struct Tracked {
    pub(super) router: Router,
    pub(super) state: Arc<ConnState>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = InFlight::new(self.state.clone());
        let mut router = self.router.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| {
                tower_service::Service::<Request<Incoming>>::poll_ready(&mut router, cx)
            })
            .await?;
            let response = tower_service::Service::call(&mut router, request).await?;
            Ok(response.map(|inner| TrackedBody {
                inner,
                guard: Some(guard),
            }))
        })
    }
}

/// A response body that keeps its request in flight until it ends or is dropped.
pub(super) struct TrackedBody {
    inner: Body,
    guard: Option<InFlight>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.guard = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
