//! The per-request ledger: what the client saw, the record the adapter reported, the
//! aborts the adapter sent and those the engine received, and the checks that compare
//! all of them with the plan.
//!
//! Owns the bookkeeping and the invariants; it must not drive requests (that is
//! [`super::client`]) nor format results (that is [`super::report`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use tether_core::error::{BackendError, EngineError, ErrorKind};
use tether_core::protocol::{FinishReason, Mode};
use tether_core::{AbortStatus, Observer, Outcome, RequestRecord};
use tether_engines::AbortReceipt;

use super::plan::{expected_aborts, Action, Planned};

/// The request id of request number `index`.
pub(crate) fn request_id(index: usize) -> String {
    format!("r{index}")
}

/// How the client's stream ended.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Terminal {
    /// A terminal chunk with this reason.
    Finish(Option<FinishReason>),
    /// An error item.
    Error(EngineError),
}

/// What the client of one request saw.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    /// `generate` failed with this.
    pub(crate) setup_error: Option<EngineError>,
    /// Items received before (and including) the first terminal.
    pub(crate) items: u32,
    /// Tokens received.
    pub(crate) tokens: u32,
    /// Terminal items received.
    pub(crate) terminals: u32,
    /// Items received after the terminal.
    pub(crate) after_terminal: u32,
    /// The first terminal.
    pub(crate) terminal: Option<Terminal>,
    /// The stream returned `None`.
    pub(crate) ended: bool,
    /// The client dropped the stream.
    pub(crate) dropped: bool,
    /// The planned client action happened.
    pub(crate) acted: bool,
}

#[derive(Debug, Default)]
struct Slot {
    records: AtomicU32,
    record: OnceLock<RequestRecord>,
    aborts_sent: AtomicU32,
    engine_aborts: AtomicU32,
    engine_late: AtomicU32,
    seen: OnceLock<Seen>,
}

/// Everything known about every request of a run.
///
/// Every counter is `Relaxed`: each is a tally on its own, and they are only compared
/// after the run settled, which the clients' completion channel and the task counters'
/// Release/Acquire pair order after every write.
#[derive(Debug)]
pub(crate) struct Ledger {
    slots: Vec<Slot>,
    /// Records and aborts for ids that are not requests of this run.
    stray: AtomicU64,
    started: AtomicI64,
    recorded: AtomicI64,
    aborts_sent: AtomicU64,
}

/// Totals over all requests, computed by [`Ledger::check`].
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) outcomes: BTreeMap<&'static str, u64>,
    pub(crate) finish_reasons: BTreeMap<String, u64>,
    pub(crate) failures: BTreeMap<String, u64>,
    pub(crate) aborts_expected: u64,
    pub(crate) ttft_ms: Vec<f64>,
}

impl Ledger {
    pub(crate) fn new(requests: usize) -> Ledger {
        Ledger {
            slots: (0..requests).map(|_| Slot::default()).collect(),
            stray: AtomicU64::new(0),
            started: AtomicI64::new(0),
            recorded: AtomicI64::new(0),
            aborts_sent: AtomicU64::new(0),
        }
    }

    /// The slot of request `id`, or `None` (counted as stray) for an id of no request.
    fn slot_or_stray(&self, id: &str) -> Option<&Slot> {
        let slot = id
            .strip_prefix('r')
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|index| self.slots.get(index));
        if slot.is_none() {
            self.stray.fetch_add(1, Ordering::Relaxed);
        }
        slot
    }

    pub(crate) fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests started and not yet recorded (negative if some were recorded twice).
    pub(crate) fn in_flight(&self) -> i64 {
        self.started.load(Ordering::Relaxed) - self.recorded.load(Ordering::Relaxed)
    }

    pub(crate) fn aborts_sent(&self) -> u64 {
        self.aborts_sent.load(Ordering::Relaxed)
    }

    pub(crate) fn client_done(&self, index: usize, seen: Seen) {
        if let Some(slot) = self.slots.get(index) {
            let _ = slot.seen.set(seen);
        }
    }

    /// The engine's abort hook.
    pub(crate) fn engine_abort(&self, id: &str, receipt: AbortReceipt) {
        if let Some(slot) = self.slot_or_stray(id) {
            slot.engine_aborts.fetch_add(1, Ordering::Relaxed);
            if receipt == AbortReceipt::Late {
                slot.engine_late.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Check every request against its plan; returns the violations and the totals.
    pub(crate) fn check(
        &self,
        plan: &[Planned],
        mode: Mode,
        max_tokens: u32,
    ) -> (Vec<String>, Totals) {
        let mut v = Vec::new();
        let mut totals = Totals::default();
        for (index, (slot, planned)) in self.slots.iter().zip(plan).enumerate() {
            check_one(index, slot, planned, mode, max_tokens, &mut v, &mut totals);
        }
        let stray = self.stray.load(Ordering::Relaxed);
        if stray > 0 {
            v.push(format!(
                "{stray} records or aborts named a request this run never made"
            ));
        }
        (v, totals)
    }
}

impl Observer for Ledger {
    fn on_record(&self, record: &RequestRecord) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.slot_or_stray(&record.id) {
            slot.records.fetch_add(1, Ordering::Relaxed);
            let _ = slot.record.set(record.clone());
        }
    }

    fn on_abort(&self, request_id: &str) {
        self.aborts_sent.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.slot_or_stray(request_id) {
            slot.aborts_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn check_one(
    index: usize,
    slot: &Slot,
    planned: &Planned,
    mode: Mode,
    max_tokens: u32,
    v: &mut Vec<String>,
    totals: &mut Totals,
) {
    let action = planned.action;
    let tag = format!("{} ({action})", request_id(index));
    let records = slot.records.load(Ordering::Relaxed);
    if records != 1 {
        v.push(format!("{tag}: {records} records, expected exactly 1"));
    }
    let record = slot.record.get();
    if let Some(rec) = record {
        *totals.outcomes.entry(rec.outcome.label()).or_default() += 1;
        match &rec.outcome {
            Outcome::Finished(reason) => {
                *totals.finish_reasons.entry(reason.to_string()).or_default() += 1;
            }
            Outcome::Failed(kind) => *totals.failures.entry(kind.to_string()).or_default() += 1,
            _ => {}
        }
        if let Some(ttft) = rec.ttft {
            totals.ttft_ms.push(ttft.as_secs_f64() * 1000.0);
        }
    }

    // Aborts: at most one, each sent one received, none late, as many as the plan says.
    let sent = slot.aborts_sent.load(Ordering::Relaxed);
    let received = slot.engine_aborts.load(Ordering::Relaxed);
    let late = slot.engine_late.load(Ordering::Relaxed);
    let expected = expected_aborts(action, mode, max_tokens)
        .unwrap_or_else(|| u32::from(record.is_some_and(|r| r.abort == AbortStatus::Sent)));
    totals.aborts_expected += u64::from(expected);
    if sent > 1 {
        v.push(format!("{tag}: aborted {sent} times"));
    }
    if received != sent {
        v.push(format!(
            "{tag}: the adapter sent {sent} aborts, the engine received {received}"
        ));
    }
    if late > 0 {
        v.push(format!("{tag}: the engine received {late} late aborts"));
    }
    if sent != expected {
        v.push(format!(
            "{tag}: expected {expected} aborts, the adapter sent {sent}"
        ));
    }

    let Some(seen) = slot.seen.get() else {
        v.push(format!("{tag}: the client never finished"));
        return;
    };
    if let Some(err) = &seen.setup_error {
        v.push(format!("{tag}: generate failed: {err}"));
        return;
    }
    if action.client_at().is_some() && !seen.acted {
        v.push(format!("{tag}: the stream ended before the planned action"));
    }
    // The stream's shape: one terminal, last; none at all when the client dropped it.
    if matches!(action, Action::Drop(_)) {
        if !seen.dropped || seen.terminals != 0 {
            v.push(format!(
                "{tag}: expected a drop before any terminal, saw {} terminals",
                seen.terminals
            ));
        }
    } else {
        if seen.terminals != 1 {
            v.push(format!(
                "{tag}: saw {} terminals, expected 1",
                seen.terminals
            ));
        }
        if seen.after_terminal > 0 {
            v.push(format!(
                "{tag}: {} items after the terminal",
                seen.after_terminal
            ));
        }
        if !seen.ended {
            v.push(format!("{tag}: the stream did not end after its terminal"));
        }
    }
    let Some(rec) = record else {
        return;
    };
    if rec.output_tokens != seen.tokens {
        v.push(format!(
            "{tag}: the record counts {} tokens, the client saw {}",
            rec.output_tokens, seen.tokens
        ));
    }
    if !terminal_matches(&rec.outcome, seen.terminal.as_ref()) {
        v.push(format!(
            "{tag}: outcome {:?} does not match the terminal the client saw ({:?})",
            rec.outcome, seen.terminal
        ));
    }
    if !outcome_fits_plan(action, &rec.outcome, seen, max_tokens) {
        v.push(format!(
            "{tag}: outcome {:?} with {} tokens does not fit the plan",
            rec.outcome, seen.tokens
        ));
    }
}

/// Whether the recorded outcome is what the client's terminal says.
fn terminal_matches(outcome: &Outcome, terminal: Option<&Terminal>) -> bool {
    match (outcome, terminal) {
        (Outcome::Dropped, None) => true,
        (Outcome::Cancelled, Some(Terminal::Finish(Some(FinishReason::Cancelled)))) => true,
        (Outcome::Finished(r), Some(Terminal::Finish(Some(t)))) => r == t,
        (Outcome::Failed(kind), Some(Terminal::Error(e))) => *kind == e.kind(),
        (Outcome::TimedOut, Some(Terminal::Error(e))) => matches!(
            e.kind(),
            ErrorKind::FirstTokenTimeout | ErrorKind::InterTokenTimeout
        ),
        _ => false,
    }
}

/// Whether `outcome` is one the plan allows for `action`.
fn outcome_fits_plan(action: Action, outcome: &Outcome, seen: &Seen, max_tokens: u32) -> bool {
    let error = match &seen.terminal {
        Some(Terminal::Error(e)) => Some(e),
        _ => None,
    };
    let unknown = ErrorKind::Backend(BackendError::Unknown);
    match (action, outcome) {
        (Action::None, Outcome::Finished(FinishReason::Length)) => seen.tokens == max_tokens,
        // A stop races the engine's natural end: either is fine.
        (Action::Stop(j), Outcome::Cancelled | Outcome::Finished(FinishReason::Length)) => {
            seen.tokens >= j
        }
        (Action::Kill(j), Outcome::Cancelled) | (Action::Drop(j), Outcome::Dropped) => {
            seen.tokens == j
        }
        (Action::Error(k), Outcome::Failed(kind)) => {
            *kind == unknown
                && seen.tokens == k
                && error.is_some_and(|e| e.message().contains("injected engine error"))
        }
        (Action::Panic(k), Outcome::Failed(kind)) => {
            *kind == unknown
                && seen.tokens == k
                && error.is_some_and(|e| e.message().starts_with("engine panicked"))
        }
        (Action::Hang(k), Outcome::TimedOut) => {
            let want = if k == 0 {
                ErrorKind::FirstTokenTimeout
            } else {
                ErrorKind::InterTokenTimeout
            };
            seen.tokens == k && error.is_some_and(|e| e.kind() == want)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Tamper = Box<dyn FnOnce(&Ledger, &mut Seen)>;

    fn planned(action: Action) -> Planned {
        Planned {
            prompt_len: 4,
            action,
        }
    }

    fn record(id: &str, outcome: Outcome, tokens: u32, abort: AbortStatus) -> RequestRecord {
        let mut record = RequestRecord::new(id, outcome);
        record.output_tokens = tokens;
        record.abort = abort;
        record
    }

    fn finished(tokens: u32) -> Seen {
        Seen {
            items: tokens + 1,
            tokens,
            terminals: 1,
            terminal: Some(Terminal::Finish(Some(FinishReason::Length))),
            ended: true,
            ..Seen::default()
        }
    }

    /// A clean untouched request, then `tamper` applied; returns the violations.
    fn violations(action: Action, tamper: impl FnOnce(&Ledger, &mut Seen)) -> Vec<String> {
        let ledger = Ledger::new(1);
        ledger.started();
        let mut seen = finished(4);
        ledger.on_record(&record(
            "r0",
            Outcome::Finished(FinishReason::Length),
            4,
            AbortStatus::NotNeeded,
        ));
        tamper(&ledger, &mut seen);
        ledger.client_done(0, seen);
        ledger.check(&[planned(action)], Mode::Aggregated, 4).0
    }

    #[test]
    fn a_clean_request_has_no_violations() {
        assert_eq!(violations(Action::None, |_, _| {}), Vec::<String>::new());
    }

    #[test]
    fn each_broken_invariant_is_named() {
        let cases: Vec<(&str, Tamper)> = vec![
            (
                "2 records",
                Box::new(|l, _| {
                    l.on_record(&record("r0", Outcome::Dropped, 4, AbortStatus::NotNeeded));
                }),
            ),
            (
                "expected 0 aborts, the adapter sent 1",
                Box::new(|l, _| {
                    l.on_abort("r0");
                    l.engine_abort("r0", AbortReceipt::AfterEnd);
                }),
            ),
            (
                "the adapter sent 1 aborts, the engine received 0",
                Box::new(|l, _| l.on_abort("r0")),
            ),
            (
                "late aborts",
                Box::new(|l, _| l.engine_abort("r0", AbortReceipt::Late)),
            ),
            (
                "items after the terminal",
                Box::new(|_, s| s.after_terminal = 1),
            ),
            ("saw 2 terminals", Box::new(|_, s| s.terminals = 2)),
            ("did not end", Box::new(|_, s| s.ended = false)),
            ("the client saw 3", Box::new(|_, s| s.tokens = 3)),
            (
                "does not match the terminal",
                Box::new(|_, s| s.terminal = Some(Terminal::Finish(Some(FinishReason::Stop)))),
            ),
            ("never made", Box::new(|l, _| l.on_abort("elsewhere-7"))),
        ];
        for (needle, tamper) in cases {
            let v = violations(Action::None, tamper);
            assert!(v.iter().any(|m| m.contains(needle)), "{needle}: {v:?}");
        }
    }

    #[test]
    fn aborted_twice_is_a_violation() {
        let v = violations(Action::Kill(2), |l, s| {
            *s = Seen {
                items: 3,
                tokens: 2,
                terminals: 1,
                terminal: Some(Terminal::Finish(Some(FinishReason::Cancelled))),
                ended: true,
                acted: true,
                ..Seen::default()
            };
            for _ in 0..2 {
                l.on_abort("r0");
                l.engine_abort("r0", AbortReceipt::Live);
            }
        });
        assert!(v.iter().any(|m| m.contains("aborted 2 times")), "{v:?}");
    }

    #[test]
    fn a_missing_abort_is_a_violation() {
        let ledger = Ledger::new(1);
        ledger.on_record(&record("r0", Outcome::Dropped, 1, AbortStatus::Sent));
        ledger.client_done(
            0,
            Seen {
                items: 1,
                tokens: 1,
                dropped: true,
                acted: true,
                ..Seen::default()
            },
        );
        let (v, totals) = ledger.check(&[planned(Action::Drop(1))], Mode::Aggregated, 4);
        assert_eq!(totals.aborts_expected, 1);
        assert!(
            v.iter()
                .any(|m| m.contains("expected 1 aborts, the adapter sent 0")),
            "{v:?}"
        );
    }
}
