//! Who gets in: the connection limit's refusal (a complete 503, written on its own
//! task within [`REFUSAL_TIMEOUT`]) and when to log it, and the back-off and the
//! rate-limited log after failed accepts.
//!
//! Owns these policies; the accept loop that applies them is the `conn` module's.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Tracker;
use crate::serve::metrics::Metrics;

/// How long the 503 of a refused connection may take to write.
pub(super) const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Refused connections whose 503 is being written at once; beyond this a refused
/// connection is closed without one (each holds a file descriptor).
pub(super) const MAX_REFUSING: usize = 32;
/// At most one error line per this interval while `accept` keeps failing.
pub(super) const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// The first back-off after a failed `accept`; it doubles up to the maximum.
pub(super) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest back-off after failed accepts.
pub(super) const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// When to log the connection limit: once when it is reached, and again only after a
/// connection was accepted below it.
#[derive(Debug, Default)]
pub(super) struct LimitLog {
    /// Refused since the limit was last reached; `None` while below it.
    refused: Option<u64>,
}

impl LimitLog {
    /// A connection was refused; `true` if this is the first since the limit cleared
    /// (log it).
    pub(super) fn refused(&mut self) -> bool {
        let first = self.refused.is_none();
        *self.refused.get_or_insert(0) += 1;
        first
    }

    /// A connection was accepted below the limit; the count refused meanwhile if the
    /// limit was reached before (log that it cleared).
    pub(super) fn accepted(&mut self) -> Option<u64> {
        self.refused.take()
    }
}

/// A streak of failed accepts: its back-off and its rate-limited log.
#[derive(Debug, Default)]
pub(super) struct AcceptErrors {
    streak: u32,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    /// An accept failed at `now`: `Some(n)` if it is to be logged, with the `n` failures
    /// not logged since the last line.
    pub(super) fn failed(&mut self, now: Instant) -> Option<u64> {
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
    pub(super) fn backoff(&self) -> Duration {
        let doublings = self.streak.saturating_sub(1).min(16);
        ACCEPT_BACKOFF_MIN
            .saturating_mul(1 << doublings)
            .min(ACCEPT_BACKOFF_MAX)
    }

    /// An accept succeeded: the streak is over (the log's rate limit is kept).
    pub(super) fn succeeded(&mut self) {
        self.streak = 0;
    }
}

/// The complete answer to a connection beyond the limit.
pub(super) static REFUSAL: LazyLock<Vec<u8>> = LazyLock::new(|| {
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
pub(super) fn refuse(stream: TcpStream, tracker: &Arc<Tracker>, metrics: &Metrics) {
    metrics.connection_refused();
    // Relaxed: a plain counter (see `Tracker`).
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
