//! The connection layer of `tether serve`: its own accept loop over hyper 1's HTTP/1.1
//! server connections (instead of `axum::serve`), so it can set what `axum::serve`
//! does not.
//!
//! Owns, for every accepted socket: its options (`TCP_NODELAY`, so an SSE event is
//! sent when it is written instead of waiting ~40 ms for the client's delayed ACK on a
//! reused connection), the connection limit and its 503, the per-connection timeouts,
//! the back-off after a failed `accept`, the `tether_http_connections*` metrics and
//! closing connections at shutdown. It must not touch requests: routing, the access
//! log and the request lifecycle are the router's; this module only knows whether a
//! connection has a request in flight (from the request head's arrival to the end or
//! drop of its response body).
//!
//! # Timeouts
//! Each connection's IO ([`TimedIo`]) holds one resettable timer for three deadlines:
//! - **idle** ([`ConnConfig::idle_timeout`]): no request in flight and not a byte of a
//!   new one received, counted from the accept or the end of the previous response;
//! - **header read** ([`ConnConfig::header_read_timeout`]): a request head whose first
//!   byte arrived must be complete in this time (slowloris);
//! - **write** ([`ConnConfig::write_timeout`]): a write to the socket that stays
//!   pending this long (the client stopped reading).
//!
//! A deadline that passes fails the IO with [`io::ErrorKind::TimedOut`]: hyper then
//! closes the connection and drops a response still in progress, which kills its
//! request (cause client disconnect; the adapter is kill-on-drop, SPEC rule 4). While
//! a request is in flight neither the idle nor the header deadline applies (a long
//! generation or a slow request body is not an idle connection). hyper's own
//! `header_read_timeout` is left off: it starts when hyper starts waiting for a head,
//! so it would merge the idle and the header deadlines.
//!
//! # Shutdown
//! [`accept_until`] stops accepting; [`Connections::drain`] asks every connection to
//! shut down gracefully (connections idle between requests or still waiting for their
//! first one close at once, the others after their response), waits for the grace
//! period, then kills the requests still running, closes the connections that have no
//! request in flight, and drops the rest after at most the kill wait. So neither a
//! silent client, a half-sent head, an idle keep-alive connection nor a client that
//! stopped reading keeps the process from exiting.

#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use futures_util::task::AtomicWaker;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use super::metrics::Metrics;

/// The tracing target of this module's events: the connection limit (warn), failed
/// accepts (error), and each connection closed by a timeout (debug).
pub const TARGET: &str = "tether::serve";

/// `--header-read-timeout`'s default.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `--idle-timeout`'s default: above nginx's upstream keep-alive timeout (60 s), so a
/// proxy in front closes its idle connections before the server does and never sends a
/// request on a connection the server is closing.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// `--write-timeout`'s default.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// File descriptors [`default_max_connections`] leaves to the rest of the process (the
/// listener, the runtime, logs, the 503s being written).
pub const FD_RESERVE: u64 = 64;
/// The highest default connection limit.
pub const MAX_CONNECTIONS_CAP: usize = 4096;
/// The default connection limit when the open-file limit cannot be read.
pub const FALLBACK_MAX_CONNECTIONS: usize = 1024;

/// How long the 503 of a refused connection may take to write.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Refused connections whose 503 is being written at once; beyond this a refused
/// connection is closed without one (each holds a file descriptor).
const MAX_REFUSING: usize = 32;
/// At most one error line per this interval while `accept` keeps failing.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// The first back-off after a failed `accept`; it doubles up to the maximum.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// `--max-connections`'s default: the process's open-file soft limit (read from
/// `/proc/self/limits`) as [`max_connections_for`] turns it into a connection count.
pub fn default_max_connections() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").ok();
    max_connections_for(limits.as_deref().and_then(open_files_soft_limit))
}

/// The default connection limit for an open-file soft limit (`None`: unknown): the limit
/// minus [`FD_RESERVE`] (half the limit when it is below twice the reserve), at least 1
/// and at most [`MAX_CONNECTIONS_CAP`]; [`FALLBACK_MAX_CONNECTIONS`] when unknown.
pub fn max_connections_for(soft_limit: Option<u64>) -> usize {
    let Some(limit) = soft_limit else {
        return FALLBACK_MAX_CONNECTIONS;
    };
    let usable = if limit > 2 * FD_RESERVE {
        limit - FD_RESERVE
    } else {
        limit / 2
    };
    usize::try_from(usable)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_CONNECTIONS_CAP)
}

/// The soft limit of the `Max open files` line of a `/proc/<pid>/limits` text
/// (`unlimited`: `u64::MAX`), `None` if there is no such line or it does not parse.
pub(crate) fn open_files_soft_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line["Max open files".len()..].split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        soft => soft.parse().ok(),
    }
}

/// What the connection layer is configured with (from [`super::ServeConfig`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnConfig {
    /// Time a started request head has to complete.
    pub(crate) header_read_timeout: Duration,
    /// Time a connection may sit with no request in flight and nothing received.
    pub(crate) idle_timeout: Duration,
    /// Time a write to the socket may stay pending.
    pub(crate) write_timeout: Duration,
    /// Open connections at most; more are answered 503 and closed.
    pub(crate) max_connections: usize,
}

impl ConnConfig {
    /// Why these settings make no sense, if they do not (the message names the flag).
    pub(crate) fn check(&self) -> Result<(), String> {
        for (flag, value) in [
            ("--header-read-timeout", self.header_read_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--write-timeout", self.write_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{flag} must be above 0"));
            }
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// Which deadline closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expired {
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

/// The counts every connection shares with the accept loop and the shutdown.
#[derive(Debug, Default)]
struct Tracker {
    /// Connections being served (refused ones not included).
    open: AtomicUsize,
    /// Requests in flight over every connection.
    requests: AtomicUsize,
    /// Refused connections whose 503 is being written.
    refusing: AtomicUsize,
}

// Every count below is a plain counter: no other memory is published through it, so
// `Relaxed` is enough for each of them.

/// One open connection, counted while it lives.
struct OpenGuard {
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
}

impl OpenGuard {
    fn new(tracker: Arc<Tracker>, metrics: Arc<Metrics>) -> OpenGuard {
        tracker.open.fetch_add(1, Ordering::Relaxed);
        metrics.connection_opened();
        OpenGuard { tracker, metrics }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.tracker.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.connection_closed();
    }
}

/// One connection's request state, shared by its IO, its service and its response
/// bodies, which all run on the connection's task.
#[derive(Debug, Default)]
pub(crate) struct ConnState {
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
    fn new(tracker: Arc<Tracker>) -> ConnState {
        ConnState {
            tracker,
            ..ConnState::default()
        }
    }

    fn in_flight(&self) -> usize {
        // Relaxed: written and read on the connection's own task only.
        self.in_flight.load(Ordering::Relaxed)
    }

    fn idle_gen(&self) -> u64 {
        // Relaxed: as `in_flight`.
        self.idle_gen.load(Ordering::Relaxed)
    }
}

/// One request in flight on a connection: from its head's arrival (the service call)
/// to the end or drop of its response body.
pub(crate) struct InFlight(Arc<ConnState>);

impl InFlight {
    pub(crate) fn new(state: Arc<ConnState>) -> InFlight {
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
struct Tracked {
    router: Router,
    state: Arc<ConnState>,
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
struct TrackedBody {
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

/// The three timeouts of a connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub(crate) header_read: Duration,
    pub(crate) idle: Duration,
    pub(crate) write: Duration,
}

/// `now + d`, or `None` (never) when that is beyond what an `Instant` holds.
fn after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// A connection's socket with its idle, header-read and write deadlines (see the
/// [module docs](self)); a passed deadline fails the IO with `TimedOut`.
pub(crate) struct TimedIo<T> {
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
    pub(crate) fn new(
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

    /// After a write or flush: arm the write deadline while it is pending, disarm it
    /// once it made progress.
    fn wrote<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if result.is_ready() {
            self.write = None;
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
        this.state.read_waker.register(cx.waker());
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
        this.wrote(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        let result = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.wrote(cx, result)
    }
}

/// Set up an accepted socket: `TCP_NODELAY`, so each write (an SSE event) leaves at
/// once instead of waiting for the ACK of the previous one (Nagle's algorithm meets the
/// client's delayed ACK: ~40 ms a response on a reused connection).
pub(crate) fn prepare(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

/// Accept one connection and [`prepare`] it (a socket that cannot be set up is served
/// anyway; it is most likely already closed).
pub(crate) async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (stream, peer) = listener.accept().await?;
    if let Err(e) = prepare(&stream) {
        tracing::debug!(target: TARGET, %peer, error = %e, "cannot set TCP_NODELAY");
    }
    Ok((stream, peer))
}

/// Whether a failed `accept` concerns only the connection being accepted (the next
/// accept may succeed at once), rather than the process (out of file descriptors or
/// memory).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// When to log the connection limit: once when it is reached, and again only after a
/// connection was accepted below it.
#[derive(Debug, Default)]
pub(crate) struct LimitLog {
    /// Refused since the limit was last reached; `None` while below it.
    refused: Option<u64>,
}

impl LimitLog {
    /// A connection was refused; `true` if this is the first since the limit cleared
    /// (log it).
    pub(crate) fn refused(&mut self) -> bool {
        let first = self.refused.is_none();
        *self.refused.get_or_insert(0) += 1;
        first
    }

    /// A connection was accepted below the limit; the count refused meanwhile if the
    /// limit was reached before (log that it cleared).
    pub(crate) fn accepted(&mut self) -> Option<u64> {
        self.refused.take()
    }
}

/// A streak of failed accepts: its back-off and its rate-limited log.
#[derive(Debug, Default)]
pub(crate) struct AcceptErrors {
    streak: u32,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    /// An accept failed at `now`: `Some(n)` if it is to be logged, with the `n` failures
    /// not logged since the last line.
    pub(crate) fn failed(&mut self, now: Instant) -> Option<u64> {
        self.streak = self.streak.saturating_add(1);
        let due = self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_ERROR_LOG_INTERVAL);
        if due {
            self.last_logged = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// How long to wait before the next accept: doubling with the streak, capped.
    pub(crate) fn backoff(&self) -> Duration {
        let doublings = self.streak.saturating_sub(1).min(16);
        ACCEPT_BACKOFF_MIN
            .saturating_mul(1 << doublings)
            .min(ACCEPT_BACKOFF_MAX)
    }

    /// An accept succeeded: the streak is over (the log's rate limit is kept).
    pub(crate) fn succeeded(&mut self) {
        self.streak = 0;
    }
}

/// The complete answer to a connection beyond the limit.
pub(crate) static REFUSAL: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let body = serde_json::json!({"error": {
        "message": "the server has too many open connections; retry later",
        "type": "service_unavailable_error",
        "param": null,
        "code": "too_many_connections",
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Answer a connection beyond the limit with [`REFUSAL`] on its own task, bounded by
/// [`REFUSAL_TIMEOUT`], then close it.
fn refuse(stream: TcpStream, tracker: &Arc<Tracker>, metrics: &Metrics) {
    metrics.connection_refused();
    if tracker.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        tracker.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let tracker = tracker.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, write_refusal(stream)).await;
        tracker.refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

async fn write_refusal(mut stream: TcpStream) -> io::Result<()> {
    stream.write_all(&REFUSAL).await?;
    stream.shutdown().await?;
    // Read what the client sent until it closes: closing a socket with unread data
    // resets the connection, and the client could lose the 503 before reading it.
    let mut sink = [0u8; 1024];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

/// Where the server is in its life, as every connection task sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Finish the request in flight, then close (hyper's graceful shutdown); close now
    /// if no request came yet.
    Draining,
    /// The grace period is over: close now unless a request is in flight.
    Killing,
}

/// Serve one connection until it closes, or until the shutdown closes it.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    timeouts: Timeouts,
    open: OpenGuard,
    mut phase: watch::Receiver<Phase>,
) {
    let state = Arc::new(ConnState::new(open.tracker.clone()));
    let io = TokioIo::new(TimedIo::new(stream, peer, timeouts, state.clone()));
    let service = Tracked {
        router,
        state: state.clone(),
    };
    let mut builder = http1::Builder::new();
    // Off: `TimedIo` keeps the header-read and the idle deadlines apart (module docs).
    builder.header_read_timeout(None);
    let mut conn = pin!(builder.serve_connection(io, service));
    let mut graceful = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(target: TARGET, %peer, error = %e, "connection closed on an error");
                }
                break;
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *phase.borrow_and_update();
                if now >= Phase::Draining && !graceful {
                    graceful = true;
                    conn.as_mut().graceful_shutdown();
                }
                // hyper closes a connection idle between requests, not one still
                // waiting for its first request (a silent client, a half-sent head):
                // that one is closed here. Once the grace period is over, so is any
                // connection without a request in flight.
                let idle = state.in_flight() == 0;
                let first_request_pending = idle && state.idle_gen() == 0;
                if first_request_pending || (now == Phase::Killing && idle) {
                    break;
                }
            }
        }
    }
    drop(open);
}

/// The connections being served, once the accept loop stopped.
#[derive(Debug)]
pub(crate) struct Connections {
    tasks: JoinSet<()>,
    phase: watch::Sender<Phase>,
    tracker: Arc<Tracker>,
}

/// How the connections ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Drained {
    /// The grace period expired while requests were in flight; they were killed.
    pub(crate) killed_in_flight: bool,
    /// Every connection closed by itself; `false`: some had to be dropped after the
    /// kill wait.
    pub(crate) drained: bool,
}

/// Log a connection task that panicked (hyper and axum catch nothing at this level).
fn joined(result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result {
        if e.is_panic() {
            tracing::error!(target: TARGET, "a connection task panicked");
        }
    }
}

/// Accept connections on `listener` and serve them with `router` until `stop`
/// completes, then stop accepting (the listener is closed) and return the connections
/// still open.
pub(crate) async fn accept_until(
    listener: TcpListener,
    router: Router,
    config: ConnConfig,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) -> Connections {
    let timeouts = Timeouts {
        header_read: config.header_read_timeout,
        idle: config.idle_timeout,
        write: config.write_timeout,
    };
    let (phase, _) = watch::channel(Phase::Serving);
    let tracker = Arc::new(Tracker::default());
    let mut tasks = JoinSet::new();
    let mut limit = LimitLog::default();
    let mut errors = AcceptErrors::default();
    let mut backoff = pin!(tokio::time::sleep(Duration::ZERO));
    let mut backing_off = false;
    let mut stop = pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            Some(result) = tasks.join_next(), if !tasks.is_empty() => joined(result),
            () = &mut backoff, if backing_off => backing_off = false,
            accepted = accept(&listener), if !backing_off => match accepted {
                Ok((stream, peer)) => {
                    errors.succeeded();
                    // Relaxed: a count; being one off for an instant is harmless.
                    let open = tracker.open.load(Ordering::Relaxed);
                    if open >= config.max_connections {
                        if limit.refused() {
                            tracing::warn!(
                                target: TARGET,
                                max_connections = config.max_connections,
                                "connection limit reached: new connections get a 503 until one closes"
                            );
                        }
                        refuse(stream, &tracker, &metrics);
                        continue;
                    }
                    if let Some(refused) = limit.accepted() {
                        tracing::info!(
                            target: TARGET,
                            refused,
                            "connection limit cleared: accepting connections again"
                        );
                    }
                    let open = OpenGuard::new(tracker.clone(), metrics.clone());
                    tasks.spawn(serve_connection(
                        stream,
                        peer,
                        router.clone(),
                        timeouts,
                        open,
                        phase.subscribe(),
                    ));
                }
                Err(e) if is_per_connection(&e) => {
                    tracing::debug!(target: TARGET, error = %e, "accept failed for one connection");
                }
                Err(e) => {
                    if let Some(suppressed) = errors.failed(Instant::now()) {
                        tracing::error!(
                            target: TARGET,
                            error = %e,
                            suppressed,
                            "cannot accept connections; backing off"
                        );
                    }
                    backoff.as_mut().reset(Instant::now() + errors.backoff());
                    backing_off = true;
                }
            },
        }
    }
    drop(listener);
    Connections {
        tasks,
        phase,
        tracker,
    }
}

impl Connections {
    /// Close every connection: gracefully first (each finishes its request in flight),
    /// then, once `grace` passed, `kill` (which ends the requests still running) and
    /// close the connections without a request in flight at once and the others once
    /// they are done, dropping what is still open after `kill_wait`.
    pub(crate) async fn drain(
        mut self,
        grace: Duration,
        kill_wait: Duration,
        kill: impl FnOnce(),
    ) -> Drained {
        self.phase.send_replace(Phase::Draining);
        let mut report = Drained {
            killed_in_flight: false,
            drained: true,
        };
        if tokio::time::timeout(grace, self.closed()).await.is_ok() {
            return report;
        }
        // Relaxed: a snapshot for the report.
        report.killed_in_flight = self.tracker.requests.load(Ordering::Relaxed) > 0;
        kill();
        self.phase.send_replace(Phase::Killing);
        if tokio::time::timeout(kill_wait, self.closed())
            .await
            .is_err()
        {
            report.drained = false;
            // Drops every remaining connection (and the response it was writing).
            self.tasks.shutdown().await;
        }
        report
    }

    /// Wait until every connection task ended.
    async fn closed(&mut self) {
        while let Some(result) = self.tasks.join_next().await {
            joined(result);
        }
    }
}
