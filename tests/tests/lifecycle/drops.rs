//! Consumer drops (rule 4): one abort and a `Dropped` record before the terminal,
//! nothing more after a stop or after the terminal.

use tether_core::AbortStatus;

use tether_core::{FinishReason, Outcome};
use tether_tests::{Harness, ScenarioRuntime};

use crate::{terminal, tokens};

pub(crate) async fn drop_before_terminal_aborts_once_and_records_dropped<R: ScenarioRuntime>(
    rt: R,
) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1, 2]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1, 2])));
    script.tokens(&[3]);
    drop(s);
    assert_eq!(h.observer.aborts("r"), 1);
    assert_eq!(h.engine.live_streams(), 0);
    let rec = h.observer.record("r");
    assert_eq!(rec.outcome, Outcome::Dropped);
    assert_eq!((rec.output_tokens, rec.abort), (2, AbortStatus::Sent));
    h.wait_aborts(&script, 1).await;
    assert_eq!(h.counting.spawned(), 1);
    h.assert_clean().await;
}

pub(crate) async fn drop_before_first_poll_aborts_once<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (s, script, _ctx) = h.start("r").await;
    drop(s);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Dropped, AbortStatus::Sent)
    );
    assert_eq!((rec.ttft, rec.output_tokens), (None, 0));
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

pub(crate) async fn drop_after_stop_does_not_abort_twice<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, ctx) = h.start("r").await;
    script.tokens(&[1]);
    assert_eq!(h.next(&mut s).await, Some(tokens(&[1])));
    ctx.stop();
    h.wait_aborts(&script, 1).await;
    drop(s);
    assert_eq!(h.observer.aborts("r"), 1);
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Dropped, AbortStatus::Sent)
    );
    // The abort task only: it times the stop's grace itself (no task for it).
    assert_eq!(h.counting.spawned(), 1);
    h.assert_clean().await;
}

pub(crate) async fn drop_after_terminal_does_nothing<R: ScenarioRuntime>(rt: R) {
    let h = Harness::new(rt);
    let (mut s, script, _ctx) = h.start("r").await;
    script.tokens(&[1]).terminal(FinishReason::Eos);
    assert_eq!(
        h.collect(&mut s).await,
        vec![tokens(&[1]), terminal(FinishReason::Eos)]
    );
    drop(s);
    assert_eq!(h.observer.aborts("r"), 0);
    assert_eq!(h.counting.spawned(), 0);
    assert_eq!(
        h.observer.record("r").outcome,
        Outcome::Finished(FinishReason::Eos)
    );
    h.assert_clean().await;
}
