//! Per-request timing and outcome: what the driver measures while a stream runs
//! ([`StatsRecorder`]) and what it reports once the request is over ([`RequestRecord`]
//! to an [`Observer`]). Pure bookkeeping over instants handed in; no clock here.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::time::{Duration, Instant};

use crate::context::Cause;
use crate::error::ErrorKind;
use crate::lifecycle::Abort;
use crate::protocol::FinishReason;

/// How a request ended. Exactly one per request reaches the [`Observer`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The engine finished with this reason (anything but `Cancelled`).
    Finished(FinishReason),
    /// Stopped or killed; the consumer got a `Cancelled` terminal.
    Cancelled,
    /// An engine error (or a stream that ended without a terminal) reached the consumer.
    Failed(ErrorKind),
    /// The consumer dropped the stream before a terminal.
    Dropped,
    /// A first-token or inter-token timeout ended it.
    TimedOut,
}

impl Outcome {
    /// A short lowercase label (`finished`, `cancelled`, `failed`, `dropped`, `timed_out`).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Finished(_) => "finished",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed(_) => "failed",
            Outcome::Dropped => "dropped",
            Outcome::TimedOut => "timed_out",
        }
    }
}

/// Inter-token latency summary in milliseconds; percentiles are nearest-rank with
/// `idx = round((n - 1) * q)` over the per-token gaps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ItlStats {
    /// How many gaps were measured.
    pub count: u32,
    /// Mean gap.
    pub avg_ms: f64,
    /// Median gap.
    pub p50_ms: f64,
    /// 99th percentile gap.
    pub p99_ms: f64,
    /// Largest gap.
    pub max_ms: f64,
}

/// What became of the engine abort, as it stood when a request's outcome was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AbortStatus {
    /// No abort was due (the engine ended by itself, or nothing cancelled it).
    NotNeeded,
    /// Due but held back (decode mode, before the first token): it is sent at the first
    /// token, the hint or the deferral deadline, unless the engine ends first.
    Deferred,
    /// Handed to the adapter's abort task, which enters `LlmEngine::abort`.
    Sent,
    /// Was deferred, and the engine ended by itself first: never sent.
    Discarded,
}

impl AbortStatus {
    /// A short lowercase label (`not_needed`, `deferred`, `sent`, `discarded`).
    pub fn label(self) -> &'static str {
        match self {
            AbortStatus::NotNeeded => "not_needed",
            AbortStatus::Deferred => "deferred",
            AbortStatus::Sent => "sent",
            AbortStatus::Discarded => "discarded",
        }
    }
}

impl From<Abort> for AbortStatus {
    fn from(abort: Abort) -> AbortStatus {
        match abort {
            Abort::None => AbortStatus::NotNeeded,
            Abort::Deferred => AbortStatus::Deferred,
            Abort::Sent => AbortStatus::Sent,
            Abort::Discarded => AbortStatus::Discarded,
        }
    }
}

/// Everything the driver knows about a request once it is over.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RequestRecord {
    /// The request id (shared with the request: a clone copies no text).
    pub id: std::sync::Arc<str>,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it was cancelled, if it was: the first cause given to its context
    /// ([`crate::Context::stop_with`], [`crate::Context::kill_with`]), or
    /// [`Cause::Timeout`] for tether's own first-token and inter-token timeouts. A
    /// request stopped gracefully that still finished has its outcome `Finished` and
    /// the stop's cause here.
    pub cause: Option<Cause>,
    /// Time to the first non-empty chunk, if one arrived.
    pub ttft: Option<Duration>,
    /// Time in the engine's queue: from the request's creation to the engine's
    /// scheduling signal ([`GenerateContext::notify_scheduled`](crate::GenerateContext::notify_scheduled),
    /// or a token-less chunk before the first token). `None` when the engine gave
    /// none (the first token is not taken for it: that is [`ttft`](RequestRecord::ttft)).
    pub queue_time: Option<Duration>,
    /// Inter-token latencies.
    pub itl: ItlStats,
    /// Tokens forwarded to the consumer.
    pub output_tokens: u32,
    /// The engine abort as it stood when the outcome was recorded (a deferred abort
    /// may still be released later by the first-token hint or the deadline; the
    /// observer hears of it through [`Observer::on_abort`]).
    pub abort: AbortStatus,
}

impl RequestRecord {
    /// A record for `id` with `outcome` and nothing measured (for observers' tests and
    /// for code that replays records); set the public fields to fill in the rest.
    pub fn new(id: impl Into<std::sync::Arc<str>>, outcome: Outcome) -> RequestRecord {
        RequestRecord {
            id: id.into(),
            outcome,
            cause: None,
            ttft: None,
            queue_time: None,
            itl: ItlStats::default(),
            output_tokens: 0,
            abort: AbortStatus::NotNeeded,
        }
    }
}

/// Receives one [`RequestRecord`] per request, however it ends, and each abort sent.
/// Called inline on the thread that ended the request: keep it cheap.
pub trait Observer: Send + Sync + 'static {
    /// The request is over.
    fn on_record(&self, record: &RequestRecord);
    /// An abort for `request_id` was handed to the runtime.
    fn on_abort(&self, request_id: &str) {
        let _ = request_id;
    }
}

impl fmt::Debug for dyn Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn Observer")
    }
}

/// Measures one stream: first token time, per-token gaps, token count.
///
/// Times are kept as nanoseconds after the request's start, plus one (0: none yet):
/// 8 bytes each where an `Option<Instant>` takes 16, on a struct every in-flight
/// request carries.
#[derive(Debug)]
pub(crate) struct StatsRecorder {
    /// The first token's time after the start, in ns, plus one (0: no token yet).
    first: u64,
    /// The last token's time after the start, in ns, plus one (0: no token yet).
    last: u64,
    tokens: u32,
    /// Per-token gaps in microseconds (a multi-token chunk spreads its gap).
    gaps_us: Vec<u32>,
}

/// `now` as nanoseconds after `start`, plus one (so never 0; saturating, 584 years on).
#[inline(always)]
fn offset(now: Instant, start: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(start).as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

impl StatsRecorder {
    pub(crate) fn new() -> StatsRecorder {
        StatsRecorder {
            first: 0,
            last: 0,
            tokens: 0,
            gaps_us: Vec::new(),
        }
    }

    /// A chunk with `n > 0` tokens arrived at `now`, in a request that started at
    /// `start`. Inlined: it is on every chunk's path.
    #[inline(always)]
    pub(crate) fn tokens(&mut self, n: u32, now: Instant, start: Instant) {
        let at = offset(now, start);
        if self.last == 0 {
            self.first = at;
        } else {
            // A clock read before the last one (never, on a monotonic clock) is a 0 gap.
            let gap = at.saturating_sub(self.last) / 1000;
            if n == 1 {
                // The common chunk: no division by n, no loop.
                self.gaps_us.push(u32::try_from(gap).unwrap_or(u32::MAX));
            } else {
                let per = u32::try_from(gap / u64::from(n)).unwrap_or(u32::MAX);
                let len = self.gaps_us.len().saturating_add(n as usize);
                self.gaps_us.resize(len, per);
            }
        }
        self.last = at;
        self.tokens = self.tokens.saturating_add(n);
    }

    pub(crate) fn output_tokens(&self) -> u32 {
        self.tokens
    }

    pub(crate) fn ttft(&self) -> Option<Duration> {
        (self.first != 0).then(|| Duration::from_nanos(self.first - 1))
    }

    /// Summarize the gaps (reorders them in place).
    pub(crate) fn itl(&mut self) -> ItlStats {
        itl_stats(&mut self.gaps_us)
    }

    /// [`itl`](Self::itl) on a copy of the gaps, leaving them as they are.
    pub(crate) fn itl_snapshot(&self) -> ItlStats {
        itl_stats(&mut self.gaps_us.clone())
    }
}

/// Summarize per-token gaps given in microseconds; reorders `gaps_us`.
pub fn itl_stats(gaps_us: &mut [u32]) -> ItlStats {
    let n = gaps_us.len();
    if n == 0 {
        return ItlStats::default();
    }
    let ms = |us: u32| f64::from(us) / 1000.0;
    let sum: u64 = gaps_us.iter().map(|&g| u64::from(g)).sum();
    let rank = |q: f64| ((n - 1) as f64 * q).round() as usize;
    let (k50, k99) = (rank(0.5), rank(0.99));
    // Selection, not a sort: O(n) for the median; then the p99 among the gaps above it.
    let (_, &mut p50, above_p50) = gaps_us.select_nth_unstable(k50);
    let (p99, max) = if k99 == k50 {
        // n < 3: the p99 is the median; the largest is above it, if anywhere.
        (p50, above_p50.iter().copied().max().unwrap_or(p50))
    } else {
        // Above the p99 lie m = n - 1 - k99 gaps (about 1 % of them).
        top_two_ranks(above_p50, n - 1 - k99)
    };
    ItlStats {
        count: u32::try_from(n).unwrap_or(u32::MAX),
        avg_ms: sum as f64 / n as f64 / 1000.0,
        p50_ms: ms(p50),
        p99_ms: ms(p99),
        max_ms: ms(max),
    }
}

/// The (m + 1)-th largest of `gaps` (which holds more than m) and the largest. For
/// the few gaps above a p99 (m = 0 below 51 gaps), the m + 1 largest seen are kept in a
/// min-heap: one comparison for most gaps, where a selection would partition them all.
fn top_two_ranks(gaps: &[u32], m: usize) -> (u32, u32) {
    if m == 0 {
        let largest = gaps.iter().copied().max().unwrap_or(0);
        return (largest, largest);
    }
    let (first, rest) = gaps.split_at((m + 1).min(gaps.len()));
    let mut kept: BinaryHeap<Reverse<u32>> = first.iter().copied().map(Reverse).collect();
    for &gap in rest {
        if let Some(mut least) = kept.peek_mut() {
            if gap > least.0 {
                *least = Reverse(gap);
            }
        }
    }
    let nth = kept.peek().map_or(0, |least| least.0);
    let largest = kept.iter().map(|kept| kept.0).max().unwrap_or(nth);
    (nth, largest)
}

#[cfg(all(test, not(tether_loom)))]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut gaps: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        gaps.reverse();
        let s = itl_stats(&mut gaps);
        assert_eq!(s.count, 100);
        // idx = round(99 * 0.5) = 50 (0-based) -> 51 ms; round(99 * 0.99) = 98 -> 99 ms
        assert_eq!(s.p50_ms, 51.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(s.avg_ms, 50.5);
    }

    proptest::proptest! {
        /// The selection gives what sorting the gaps would: nearest-rank percentiles,
        /// the largest gap and the mean, for any gaps (ties and extremes included).
        #[test]
        fn itl_stats_agree_with_a_sort(
            gaps in proptest::collection::vec(
                proptest::prop_oneof![0u32..4, proptest::num::u32::ANY],
                1..2000,
            )
        ) {
            let mut sorted = gaps.clone();
            sorted.sort_unstable();
            let n = sorted.len();
            let at = |q: f64| f64::from(sorted[((n - 1) as f64 * q).round() as usize]) / 1000.0;
            let sum: u64 = sorted.iter().map(|&g| u64::from(g)).sum();
            let s = itl_stats(&mut gaps.clone());
            proptest::prop_assert_eq!(s.count as usize, n);
            proptest::prop_assert_eq!(s.p50_ms, at(0.5));
            proptest::prop_assert_eq!(s.p99_ms, at(0.99));
            proptest::prop_assert_eq!(s.max_ms, f64::from(sorted[n - 1]) / 1000.0);
            proptest::prop_assert_eq!(s.avg_ms, sum as f64 / n as f64 / 1000.0);
        }
    }

    /// In order and in reverse, the heap of the largest gaps sees every gap enter it
    /// (ascending) or none (descending): both give the nearest-rank p99.
    #[test]
    fn sorted_gaps_give_the_nearest_rank_p99() {
        let ascending: Vec<u32> = (0..1000).collect();
        for mut gaps in [ascending.clone(), ascending.into_iter().rev().collect()] {
            let s = itl_stats(&mut gaps);
            // idx = round(999 * 0.99) = 989; round(999 * 0.5) = 500
            assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (0.5, 0.989, 0.999));
        }
    }

    #[test]
    fn empty_gaps_are_zero() {
        assert_eq!(itl_stats(&mut []), ItlStats::default());
    }

    #[test]
    fn multi_token_chunk_spreads_its_gap() {
        let t0 = Instant::now();
        let mut r = StatsRecorder::new();
        r.tokens(1, t0 + Duration::from_millis(10), t0);
        r.tokens(4, t0 + Duration::from_millis(18), t0);
        assert_eq!(r.ttft(), Some(Duration::from_millis(10)));
        assert_eq!(r.output_tokens(), 5);
        let s = r.itl();
        assert_eq!(s.count, 4);
        assert_eq!((s.p50_ms, s.max_ms, s.avg_ms), (2.0, 2.0, 2.0));
    }

    #[test]
    fn a_token_at_the_start_is_a_first_token_with_zero_ttft() {
        // A paused clock gives the first token the start's own instant.
        let t0 = Instant::now();
        let mut r = StatsRecorder::new();
        r.tokens(1, t0, t0);
        assert_eq!(r.ttft(), Some(Duration::ZERO));
        r.tokens(1, t0 + Duration::from_micros(1_500), t0);
        assert_eq!(
            r.ttft(),
            Some(Duration::ZERO),
            "the first token stays first"
        );
        let s = r.itl();
        assert_eq!((s.count, s.max_ms), (1, 1.5));
    }

    #[test]
    fn gaps_are_whole_microseconds_of_the_exact_difference() {
        // Gaps of 999 ns, then 1 001 ns: 0 us and 1 us, floored.
        let t0 = Instant::now();
        let mut r = StatsRecorder::new();
        r.tokens(1, t0 + Duration::from_nanos(1), t0);
        r.tokens(1, t0 + Duration::from_nanos(1_000), t0);
        r.tokens(1, t0 + Duration::from_nanos(2_001), t0);
        assert_eq!(r.ttft(), Some(Duration::from_nanos(1)));
        let s = r.itl();
        assert_eq!((s.count, s.max_ms, s.avg_ms), (2, 0.001, 0.0005));
    }

    #[test]
    fn cancelled_before_first_token_reports_no_ttft() {
        let mut r = StatsRecorder::new();
        assert_eq!(r.ttft(), None);
        assert_eq!(r.output_tokens(), 0);
        assert_eq!(r.itl(), ItlStats::default());
    }

    #[test]
    fn outcome_labels() {
        assert_eq!(Outcome::Finished(FinishReason::Eos).label(), "finished");
        assert_eq!(Outcome::Failed(ErrorKind::Unknown).label(), "failed");
        assert_eq!(Outcome::TimedOut.label(), "timed_out");
    }
}
