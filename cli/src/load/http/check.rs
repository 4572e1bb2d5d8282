//! The invariants `tether load --url` checks from the server's `/metrics` before and
//! after the run, against what the client did.
//!
//! Owns the arithmetic of the checks only; the numbers come from the run
//! ([`super::client`]) and the scrapes ([`super::metrics`]). A check whose metric the
//! server (or the preset) lacks is "not available", never passed.

use serde::Serialize;

use super::metrics::Values;

/// A check's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// It held.
    Passed,
    /// It broke.
    Failed,
    /// A metric it needs is not there.
    NotAvailable,
}

impl CheckStatus {
    /// `Passed` when the compared numbers agree (`held`), `Failed` otherwise.
    fn judged(held: bool) -> CheckStatus {
        if held {
            CheckStatus::Passed
        } else {
            CheckStatus::Failed
        }
    }
}

/// One named check and what it compared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `in_flight_returned`, `cancellations_match_disconnects`,
    /// `aborts_match_cancellations`.
    pub name: &'static str,
    /// The result.
    pub status: CheckStatus,
    /// The numbers compared, or what is missing.
    pub detail: String,
}

/// What the client counted, for the checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClientCounts {
    /// Requests sent that got a connection (connect failures excluded).
    pub sent: u64,
    /// Requests read to their whole response.
    pub complete: u64,
    /// Requests the client left in the middle (planned disconnects and timeouts).
    pub left: u64,
    /// Of those, unary requests (left before any response head: the server may not
    /// have started them).
    pub left_unary: u64,
}

fn delta(before: Option<f64>, after: Option<f64>) -> Option<i64> {
    Some((after? - before?).round() as i64)
}

/// Run every check.
pub(crate) fn checks(before: &Values, after: &Values, client: ClientCounts) -> Vec<Check> {
    let missing = |what: &str| format!("not available: the server exports no {what} metric");
    let mut out = Vec::new();

    out.push(match (before.in_flight, after.in_flight) {
        (Some(b), Some(a)) => Check {
            name: "in_flight_returned",
            status: CheckStatus::judged(a == b),
            detail: format!("in-flight gauge {b} before, {a} after"),
        },
        _ => Check {
            name: "in_flight_returned",
            status: CheckStatus::NotAvailable,
            detail: missing("in-flight"),
        },
    });

    let c = delta(before.cancellations, after.cancellations);
    let f = delta(before.finished, after.finished);
    let r = delta(before.requests, after.requests);
    out.push(match (c, f, r) {
        (Some(c), Some(f), Some(r)) => {
            let d = client.left as i64;
            let early = f - client.complete as i64;
            let unseen = client.sent as i64 - r;
            let ok = c + early + unseen == d
                && (0..=d).contains(&early)
                && (0..=client.left_unary as i64).contains(&unseen);
            Check {
                name: "cancellations_match_disconnects",
                status: CheckStatus::judged(ok),
                detail: format!(
                    "disconnects made {d} = cancelled for client disconnect {c} + finished \
                     before the disconnect {early} + never started {unseen} (unary, at most {})",
                    client.left_unary
                ),
            }
        }
        _ => Check {
            name: "cancellations_match_disconnects",
            status: CheckStatus::NotAvailable,
            detail: missing("cancellation, finished or request counter"),
        },
    });

    let a = delta(before.aborts, after.aborts);
    let t = delta(before.timeouts, after.timeouts);
    out.push(match (a, c) {
        (Some(a), Some(c)) => {
            let t = t.unwrap_or(0);
            Check {
                name: "aborts_match_cancellations",
                status: CheckStatus::judged(a == c + t),
                detail: format!(
                    "aborts {a} = cancellations for client disconnect {c} + server timeouts {t}"
                ),
            }
        }
        _ => Check {
            name: "aborts_match_cancellations",
            status: CheckStatus::NotAvailable,
            detail: missing("abort or cancellation"),
        },
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(in_flight: f64, requests: f64, finished: f64, cancelled: f64, aborts: f64) -> Values {
        Values {
            in_flight: Some(in_flight),
            requests: Some(requests),
            finished: Some(finished),
            cancellations: Some(cancelled),
            timeouts: Some(0.0),
            aborts: Some(aborts),
        }
    }

    fn statuses(checks: &[Check]) -> Vec<CheckStatus> {
        checks.iter().map(|c| c.status).collect()
    }

    #[test]
    fn consistent_counts_pass_and_each_break_is_caught() {
        let client = ClientCounts {
            sent: 100,
            complete: 88,
            left: 12,
            left_unary: 0,
        };
        let before = values(0.0, 5.0, 5.0, 0.0, 0.0);
        // 2 of the 12 disconnects came after the server finished.
        let ok = values(0.0, 105.0, 95.0, 10.0, 10.0);
        use CheckStatus::{Failed, NotAvailable, Passed};
        assert_eq!(
            statuses(&checks(&before, &ok, client)),
            [Passed, Passed, Passed]
        );
        let stuck = Values {
            in_flight: Some(1.0),
            ..ok.clone()
        };
        assert_eq!(
            statuses(&checks(&before, &stuck, client)),
            [Failed, Passed, Passed]
        );
        let miscounted = values(0.0, 105.0, 95.0, 9.0, 10.0);
        assert_eq!(
            statuses(&checks(&before, &miscounted, client)),
            [Passed, Failed, Failed]
        );
        let only_gauge = Values {
            in_flight: Some(0.0),
            ..Values::default()
        };
        assert_eq!(
            statuses(&checks(&only_gauge, &only_gauge, client)),
            [Passed, NotAvailable, NotAvailable]
        );
    }
}
