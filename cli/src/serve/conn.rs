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
//! Each connection's IO (`TimedIo`) holds one resettable timer for three deadlines:
//! - **idle** ([`ServeConfig::idle_timeout`]): no request in flight and not a byte of a
//!   new one received, counted from the accept or the end of the previous response;
//! - **header read** ([`ServeConfig::header_read_timeout`]): a request head whose first
//!   byte arrived must be complete in this time (slowloris);
//! - **write** ([`ServeConfig::write_timeout`]): a write to the socket that stays
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
//! Beyond [`ServeConfig::max_connections`] open connections, a new one is answered a
//! complete `503` with an OpenAI error object (`code: too_many_connections`) and
//! closed, on its own task and within a second; the first refusal logs a warning
//! (target [`TARGET`]), and the next warning comes only after the limit cleared.
//!
//! # Shutdown
//! `accept_until` stops accepting; `Connections::drain` asks every connection to
//! shut down gracefully (connections idle between requests or still waiting for their
//! first one close at once, the others after their response), waits for the grace
//! period, then kills the requests still running, closes the connections that have no
//! request in flight, and drops the rest after at most the kill wait. So neither a
//! silent client, a half-sent head, an idle keep-alive connection nor a client that
//! stopped reading keeps the process from exiting.

mod admission;
mod in_flight;
#[cfg(test)]
mod tests;
mod timed_io;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::metrics::Metrics;
#[cfg(doc)]
use super::ServeConfig;
use admission::{refuse, AcceptErrors, LimitLog};
use in_flight::{ConnState, Tracked};
use timed_io::{TimedIo, Timeouts};

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

/// The counts every connection shares with the accept loop and the shutdown. Each is a
/// plain counter that publishes no other memory: `Relaxed` is enough wherever it is
/// read or written.
#[derive(Debug, Default)]
struct Tracker {
    /// Connections being served (refused ones not included).
    open: AtomicUsize,
    /// Requests in flight over every connection.
    requests: AtomicUsize,
    /// Refused connections whose 503 is being written.
    refusing: AtomicUsize,
}

/// One open connection, counted while it lives.
struct OpenGuard {
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
}

impl OpenGuard {
    fn new(tracker: Arc<Tracker>, metrics: Arc<Metrics>) -> OpenGuard {
        // Relaxed: a plain counter (see `Tracker`).
        tracker.open.fetch_add(1, Ordering::Relaxed);
        metrics.connection_opened();
        OpenGuard { tracker, metrics }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        // Relaxed: a plain counter (see `Tracker`).
        self.tracker.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.connection_closed();
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
