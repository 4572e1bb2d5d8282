//! [`TimedIo`]: a connection's socket with its idle, header-read and write deadlines
//! (see the [`conn` module docs](super)), on one resettable timer.
//!
//! Owns the deadlines and the error a passed one gives (`TimedOut`, which makes hyper
//! close the connection); whether a request is in flight it reads from the
//! connection's [`ConnState`], which it must not change.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::in_flight::ConnState;
use super::TARGET;

/// Which deadline closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expired {
    HeaderRead,
    Idle,
    Write,
}

impl Expired {
    fn label(self) -> &'static str {
        match self {
            Expired::HeaderRead => "header-read",
            Expired::Idle => "idle",
            Expired::Write => "write",
        }
    }
}

/// The three timeouts of a connection.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timeouts {
    pub(super) header_read: Duration,
    pub(super) idle: Duration,
    pub(super) write: Duration,
}

/// `now + d`, or `None` (never) when that is beyond what an `Instant` holds.
fn after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// A connection's socket with its idle, header-read and write deadlines (see the
/// [module docs](self)); a passed deadline fails the IO with `TimedOut`.
pub(super) struct TimedIo<T> {
    inner: T,
    peer: SocketAddr,
    timeouts: Timeouts,
    state: Arc<ConnState>,
    /// The read side's deadline: `None` while a request is in flight.
    read: Option<(Instant, Expired)>,
    /// The `idle_gen` the read deadline was armed for.
    seen_idle_gen: u64,
    /// A byte of the next request head arrived (the header deadline replaced the idle
    /// one).
    head_started: bool,
    /// The write deadline, armed while a write is pending.
    write: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    /// The deadline `sleep` is set to.
    sleep_at: Option<Instant>,
    /// The deadline that fired (the IO keeps failing with it).
    expired: Option<Expired>,
}

impl<T> fmt::Debug for TimedIo<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimedIo")
            .field("peer", &self.peer)
            .field("read", &self.read)
            .field("write", &self.write)
            .finish_non_exhaustive()
    }
}

impl<T> TimedIo<T> {
    pub(super) fn new(
        inner: T,
        peer: SocketAddr,
        timeouts: Timeouts,
        state: Arc<ConnState>,
    ) -> TimedIo<T> {
        let idle_at = after(timeouts.idle);
        let far = Instant::now() + Duration::from_secs(86_400);
        TimedIo {
            inner,
            peer,
            timeouts,
            seen_idle_gen: state.idle_gen(),
            state,
            read: idle_at.map(|at| (at, Expired::Idle)),
            head_started: false,
            write: None,
            sleep: Box::pin(tokio::time::sleep_until(idle_at.unwrap_or(far))),
            sleep_at: idle_at,
            expired: None,
        }
    }

    /// Bring the read deadline up to date with the connection's request state.
    fn sync_read(&mut self) {
        if self.state.in_flight() > 0 {
            self.read = None;
            return;
        }
        let gen = self.state.idle_gen();
        if gen != self.seen_idle_gen {
            // The connection just became idle: a new wait for a request begins. (Bytes
            // of a pipelined head read while the last request was in flight are in
            // hyper's buffer; the rest of that head gets the idle deadline.)
            self.seen_idle_gen = gen;
            self.head_started = false;
            self.read = after(self.timeouts.idle).map(|at| (at, Expired::Idle));
        }
    }

    /// Poll the timer for the nearest deadline; `Some` if it passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Option<Expired> {
        let write = self.write.map(|at| (at, Expired::Write));
        let (at, which) = match (self.read, write) {
            (Some(r), Some(w)) => {
                if r.0 <= w.0 {
                    r
                } else {
                    w
                }
            }
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => return None,
        };
        if self.sleep_at != Some(at) {
            self.sleep.as_mut().reset(at);
            self.sleep_at = Some(at);
        }
        self.sleep.as_mut().poll(cx).is_ready().then_some(which)
    }

    /// The error of a passed deadline, logged once.
    fn fail(&mut self, which: Expired) -> io::Error {
        if self.expired.is_none() {
            self.expired = Some(which);
            let timeout = match which {
                Expired::HeaderRead => self.timeouts.header_read,
                Expired::Idle => self.timeouts.idle,
                Expired::Write => self.timeouts.write,
            };
            tracing::debug!(
                target: TARGET,
                peer = %self.peer,
                timeout = which.label(),
                "closing the connection: its {} timeout ({timeout:?}) expired",
                which.label(),
            );
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{} timeout expired", which.label()),
        )
    }

    /// Before any IO: the deadlines, brought up to date and polled.
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        if let Some(which) = self.expired {
            return Err(self.fail(which));
        }
        self.sync_read();
        match self.poll_deadline(cx) {
            Some(which) => Err(self.fail(which)),
            None => Ok(()),
        }
    }

    /// After a write, flush or shutdown: arm the write deadline while it is pending;
    /// disarm it once a write made progress (`progress`: `result` is a write's). A
    /// ready flush says nothing about the bytes still waiting (a socket's flush does
    /// nothing), so it leaves the deadline as it is.
    fn wrote<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
        progress: bool,
    ) -> Poll<io::Result<R>> {
        if result.is_ready() {
            if progress {
                self.write = None;
            }
            return result;
        }
        if self.write.is_none() {
            self.write = after(self.timeouts.write);
            // Register the timer for the new deadline.
            if let Some(which) = self.poll_deadline(cx) {
                return Poll::Ready(Err(self.fail(which)));
            }
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.state.wake_when_idle(cx.waker());
        this.check(cx)?;
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got_bytes = buf.filled().len() > before;
        if got_bytes && this.read.is_some() && !this.head_started {
            // The first byte of a request head: it now has the header deadline.
            this.head_started = true;
            this.read = after(this.timeouts.header_read).map(|at| (at, Expired::HeaderRead));
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(cx, result, true)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, result, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(cx, result, false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        let result = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.wrote(cx, result, false)
    }
}
