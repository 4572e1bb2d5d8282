//! The books without llama.cpp: admission, the step's tokens, the ends, and the order
//! of a removal and its last item.

use tether_core::engine::GenerateContext;
use tether_core::error::{BackendError, ErrorKind};
use tether_core::protocol::{SamplingOptions, StopConditions};
use tether_core::Context;

use super::*;

const LIMITS: Limits = Limits {
    n_ctx: 100,
    batch_tokens: 8,
};

fn books(slots: usize) -> Books {
    let mut b = Books::new();
    let (_tx, done) = async_channel::bounded(1);
    b.begin_start(slots, done);
    b
}

fn admission(prompt: usize, max_tokens: u32) -> Admission {
    Admission {
        max_tokens,
        cells: LIMITS.n_ctx.min(prompt + max_tokens as usize),
        sampling: Sampling::of(&SamplingOptions::default()).unwrap(),
        eos: vec![99],
    }
}

fn insert(b: &mut Books, id: &str, prompt: usize, max_tokens: u32) -> (u64, Receiver<Item>) {
    let request = Request::new(id, "m", (0..prompt as u32).collect());
    let gctx = GenerateContext::new(Context::new(id), id);
    b.insert(request, admission(prompt, max_tokens), gctx)
}

fn terminal(rx: &Receiver<Item>) -> Chunk {
    let item = rx.try_recv().expect("an item").expect("not an error");
    assert!(item.is_terminal(), "{item:?}");
    item
}

/// Run `b`'s next step, sampling `token` for every sequence that emits.
fn step(b: &mut Books, token: u32) -> (Step, Effects) {
    let step = b.plan(LIMITS).expect("a step");
    let sampled = step.work.iter().map(|w| w.emits.then_some(token)).collect();
    let mut fx = Effects::default();
    b.apply(&step.work, Ok(sampled), LIMITS, &mut fx);
    (step, fx)
}

#[test]
fn decode_tokens_come_first_then_prompt_chunks_within_the_batch() {
    let mut b = books(4);
    let (a, _ra) = insert(&mut b, "a", 5, 10);
    let (first, _) = step(&mut b, 7);
    assert_eq!(first.admitted.len(), 1);
    assert_eq!(first.scheduled.len(), 1, "its prefill starts");
    assert_eq!(first.work[0].tokens.len(), 5);
    assert!(first.work[0].emits);
    let (c, _rc) = insert(&mut b, "c", 20, 10);
    let (second, _) = step(&mut b, 7);
    // `a` decodes its token at position 5; `c` gets the 7 tokens left of 8.
    assert_eq!(second.work[0].seq, a);
    assert_eq!(
        (second.work[0].tokens.clone(), second.work[0].pos0),
        (vec![7], 5)
    );
    assert_eq!(second.work[1].seq, c);
    assert_eq!((second.work[1].tokens.len(), second.work[1].pos0), (7, 0));
    assert!(!second.work[1].emits);
    let (third, _) = step(&mut b, 7);
    assert_eq!(
        third.work[1].pos0, 7,
        "the next chunk goes on where it stopped"
    );
    assert!(third.scheduled.is_empty(), "told once");
    assert_eq!(b.gauges(0, 0).prefill_tokens, 5 + 7 + 7);
}

#[test]
fn admission_waits_for_a_slot_and_for_cells() {
    let mut b = books(1);
    let (_a, _ra) = insert(&mut b, "a", 10, 10);
    let (_c, _rc) = insert(&mut b, "c", 10, 10);
    step(&mut b, 1);
    assert_eq!(b.gauges(0, 0).queue_len, 1, "one slot");
    let mut b = books(4);
    let (_a, _ra) = insert(&mut b, "a", 10, 80);
    let (_c, _rc) = insert(&mut b, "c", 10, 20);
    step(&mut b, 1);
    let g = b.gauges(0, 0);
    assert_eq!(
        (g.live_sequences, g.queue_len, g.reserved_cells),
        (1, 1, 90)
    );
}

#[test]
fn a_queued_abort_ends_at_once_and_a_running_one_after_its_removal() {
    let mut b = books(1);
    let (_a, ra) = insert(&mut b, "a", 4, 10);
    let (_q, rq) = insert(&mut b, "q", 4, 10);
    step(&mut b, 1);
    let mut fx = Effects::default();
    assert!(b.abort("q", &mut fx));
    assert!(!fx.wake, "nothing for the thread to remove");
    send_all_for_test(fx.outgoing);
    assert_eq!(terminal(&rq).finish_reason, Some(FinishReason::Cancelled));
    assert_eq!(abort_counts(&b), (0, 1));

    let mut fx = Effects::default();
    assert!(b.abort("a", &mut fx));
    assert!(fx.wake);
    assert!(fx.outgoing.is_empty());
    assert_eq!(ra.try_recv().unwrap().unwrap().token_ids, [1]);
    assert!(
        ra.try_recv().is_err(),
        "no terminal before the cells are removed"
    );
    let removals = b.take_removals();
    assert_eq!(removals.len(), 1);
    assert_eq!(b.gauges(0, 0).reserved_cells, 14, "held until released");
    send_all_for_test(b.released(removals));
    let end = terminal(&ra);
    assert_eq!(end.finish_reason, Some(FinishReason::Cancelled));
    assert_eq!(end.usage, Some(Usage::new(4, 1)));
    let g = b.gauges(0, 0);
    assert_eq!(
        (g.reserved_cells, g.live_sequences, g.aborts_running),
        (0, 0, 1)
    );
    assert!(!b.abort("a", &mut Effects::default()), "gone");
    assert!(b.is_idle(LIMITS));
}

/// The thread's part: take the removals and release them (their cells were removed).
fn release_all(b: &mut Books) -> Vec<Outgoing> {
    let removals = b.take_removals();
    b.released(removals)
}

/// Aborts that ended a running and a queued sequence.
fn abort_counts(b: &Books) -> (u64, u64) {
    let g = b.gauges(0, 0);
    (g.aborts_running, g.aborts_queued)
}

fn send_all_for_test(out: Vec<Outgoing>) {
    for (tx, item) in out {
        tx.try_send(item).unwrap();
    }
}

#[test]
fn a_sequence_that_finishes_in_a_step_is_removed_before_its_terminal() {
    let mut b = books(2);
    let (_a, ra) = insert(&mut b, "a", 3, 2);
    step(&mut b, 5);
    let (_, fx) = step(&mut b, 6);
    assert!(fx.outgoing.is_empty());
    assert_eq!(ra.try_recv().unwrap().unwrap().token_ids, [5]);
    assert_eq!(ra.try_recv().unwrap().unwrap().token_ids, [6]);
    assert!(ra.try_recv().is_err());
    send_all_for_test(release_all(&mut b));
    let end = terminal(&ra);
    assert_eq!(end.finish_reason, Some(FinishReason::Length));
    assert_eq!(end.usage, Some(Usage::new(3, 2)));
}

#[test]
fn stop_and_eos_wait_for_min_tokens_and_the_context_ends_with_length() {
    let run = |stop: StopConditions, eos: Vec<u32>, prompt: usize, tokens: &[u32]| {
        let mut b = books(1);
        let mut request = Request::new("r", "m", (0..prompt as u32).collect());
        request.stop = stop;
        let max_tokens = request.stop.max_tokens.unwrap_or(50);
        let mut adm = admission(prompt, max_tokens);
        adm.eos = eos;
        let gctx = GenerateContext::new(Context::new("r"), "r");
        let (_, rx) = b.insert(request, adm, gctx);
        for &t in tokens {
            let Some(step) = b.plan(LIMITS) else {
                break;
            };
            let sampled = step.work.iter().map(|w| w.emits.then_some(t)).collect();
            b.apply(&step.work, Ok(sampled), LIMITS, &mut Effects::default());
            send_all_for_test(release_all(&mut b));
        }
        let mut items = Vec::new();
        while let Ok(item) = rx.try_recv() {
            items.push(item.unwrap());
        }
        let end = items.pop().unwrap();
        (items.len(), end.finish_reason)
    };
    let mut stop = StopConditions::default();
    stop.stop_token_ids = vec![4];
    assert_eq!(
        run(stop.clone(), vec![], 2, &[1, 4, 4]),
        (2, Some(FinishReason::Stop))
    );
    stop.min_tokens = Some(3);
    assert_eq!(
        run(stop, vec![], 2, &[4, 4, 4, 4]),
        (3, Some(FinishReason::Stop))
    );
    assert_eq!(
        run(StopConditions::default(), vec![9], 2, &[1, 9]),
        (2, Some(FinishReason::Eos))
    );
    // The context: 98 prompt tokens (13 steps of prefill) leave room for 2 outputs.
    assert_eq!(
        run(StopConditions::default(), vec![], 98, &[1; 20]),
        (2, Some(FinishReason::Length))
    );
}

#[test]
fn a_failed_step_ends_its_sequences_with_the_error_after_their_removal() {
    let mut b = books(2);
    let (_a, ra) = insert(&mut b, "a", 3, 10);
    let step = b.plan(LIMITS).unwrap();
    let error = EngineError::new(ErrorKind::Backend(BackendError::Unknown), "decode");
    b.apply(&step.work, Err(error), LIMITS, &mut Effects::default());
    assert!(ra.try_recv().is_err());
    send_all_for_test(release_all(&mut b));
    let err = ra.try_recv().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend(BackendError::Unknown));
}

#[test]
fn failing_ends_every_live_sequence_and_keeps_decided_ends() {
    let mut b = books(1);
    let (_a, ra) = insert(&mut b, "a", 3, 10);
    let (_q, rq) = insert(&mut b, "q", 3, 10);
    step(&mut b, 1);
    let mut fx = Effects::default();
    b.abort("a", &mut fx);
    let error = EngineError::new(ErrorKind::Backend(BackendError::Unknown), "thread died");
    send_all_for_test(b.fail(&error));
    assert!(!b.is_running());
    ra.try_recv().unwrap().unwrap(); // its token
    assert_eq!(terminal(&ra).finish_reason, Some(FinishReason::Cancelled));
    assert_eq!(rq.try_recv().unwrap().unwrap_err().message(), "thread died");
    let g = b.gauges(0, 0);
    assert_eq!(
        (
            g.live_sequences,
            g.queue_len,
            g.reserved_cells,
            g.pending_removals
        ),
        (0, 0, 0, 0)
    );
}

#[test]
fn max_tokens_zero_is_never_queued() {
    let mut b = books(1);
    let (_z, rz) = insert(&mut b, "z", 3, 0);
    assert_eq!(terminal(&rz).finish_reason, Some(FinishReason::Length));
    assert!(b.plan(LIMITS).is_none());
    assert_eq!(b.gauges(0, 0).accepted, 1);
}

#[test]
fn a_dropped_stream_frees_its_sequence_without_an_item() {
    let mut b = books(1);
    let (a, ra) = insert(&mut b, "a", 3, 10);
    step(&mut b, 1);
    let mut fx = Effects::default();
    b.detach(a, &mut fx);
    assert!(fx.wake);
    assert!(release_all(&mut b).is_empty());
    ra.try_recv().unwrap().unwrap();
    assert!(ra.try_recv().is_err());
    assert!(b.is_idle(LIMITS));
}

#[test]
fn requests_sharing_an_id_are_aborted_oldest_first_each_once() {
    let mut b = books(2);
    let (_a, ra) = insert(&mut b, "dup", 3, 10);
    let (_c, rc) = insert(&mut b, "dup", 3, 10);
    let mut fx = Effects::default();
    assert!(b.abort("dup", &mut fx));
    send_all_for_test(fx.outgoing);
    assert_eq!(terminal(&ra).finish_reason, Some(FinishReason::Cancelled));
    assert!(rc.try_recv().is_err(), "the younger one still runs");
    let mut fx = Effects::default();
    assert!(
        b.abort("dup", &mut fx),
        "the second abort finds the younger one"
    );
    send_all_for_test(fx.outgoing);
    assert_eq!(terminal(&rc).finish_reason, Some(FinishReason::Cancelled));
    assert!(!b.abort("dup", &mut Effects::default()));
    assert_eq!(abort_counts(&b), (0, 2));
}
