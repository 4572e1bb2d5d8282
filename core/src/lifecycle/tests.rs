use super::oracle::Oracle;
use super::*;
use Event::*;

mod proof;
mod shared_state;

fn run(mode: Mode, events: &[Event]) -> (State, Vec<Actions>) {
    let mut s = State::new(mode);
    let mut out = Vec::new();
    for &e in events {
        let (n, a) = step(s, e);
        out.push(a);
        s = n;
    }
    (s, out)
}

fn aborts(acts: &[Actions]) -> usize {
    acts.iter().filter(|a| a.abort).count()
}

#[test]
fn pack_round_trips_every_reachable_state() {
    let mut seen = std::collections::HashSet::new();
    let mut frontier = vec![
        State::new(Mode::Aggregated),
        State::new(Mode::Prefill),
        State::new(Mode::Decode),
    ];
    while let Some(s) = frontier.pop() {
        if !seen.insert(s) {
            continue;
        }
        assert_eq!(State::unpack(s.pack()), Some(s));
        for e in Event::ALL {
            frontier.push(step(s, e).0);
        }
    }
    // The reachable state space is small: that is what makes exhaustive checking cheap.
    assert!(
        seen.len() > 50 && seen.len() < 1000,
        "{} states",
        seen.len()
    );
}

/// Every constructible state, reachable or not, round-trips through the shared word
/// (the reachable ones are a subset: a packing bug in an unreachable corner would still
/// be a bug the day the machine reaches it).
#[test]
fn pack_round_trips_every_constructible_state() {
    let mut words = std::collections::HashSet::new();
    for mode in [Mode::Aggregated, Mode::Prefill, Mode::Decode] {
        for phase in [
            Phase::Pending,
            Phase::Streaming,
            Phase::Cancelling,
            Phase::Terminal,
            Phase::Dropped,
        ] {
            for cancel in [Cancel::None, Cancel::Stop, Cancel::Kill] {
                for abort in [Abort::None, Abort::Deferred, Abort::Sent, Abort::Discarded] {
                    for owed in [
                        None,
                        Some(Synthesized::Cancelled),
                        Some(Synthesized::FirstTokenTimeout),
                        Some(Synthesized::InterTokenTimeout),
                        Some(Synthesized::Incomplete),
                    ] {
                        for (first_token, engine_done) in
                            [(false, false), (false, true), (true, false), (true, true)]
                        {
                            let s = State {
                                mode,
                                phase,
                                cancel,
                                abort,
                                pending_terminal: owed,
                                first_token,
                                engine_done,
                            };
                            assert_eq!(State::unpack(s.pack()), Some(s), "{s:?}");
                            assert!(words.insert(s.pack()), "two states share a word");
                        }
                    }
                }
            }
        }
    }
    assert_eq!(words.len(), 3 * 5 * 3 * 4 * 5 * 4);
}

#[test]
fn debug_and_accessors_show_every_field() {
    let (s, a) = step(State::new(Mode::Decode), Kill);
    assert_eq!(s.mode(), Mode::Decode);
    assert_eq!(
        format!("{s:?}"),
        "State { mode: Decode, phase: Cancelling, cancel: Kill, abort: Deferred, \
         pending_terminal: Some(Cancelled), first_token: false, engine_done: false }"
    );
    assert!(s.is_cancelling() && !s.is_terminal() && !s.is_over());
    assert!(!a.is_empty());
    assert!(Actions::default().is_empty());
    let (t, _) = step(s, ConsumerPoll);
    assert!(t.is_terminal() && !t.is_cancelling() && t.is_over());
    let (d, _) = step(State::new(Mode::Aggregated), ConsumerDropped);
    assert!(!d.is_terminal() && d.is_over());
}

#[test]
fn unpack_rejects_words_no_state_packs_to() {
    assert_eq!(State::unpack(1 << 14), None);
    assert_eq!(State::unpack(0b11), None); // mode 3
    assert_eq!(State::unpack(0b111 << 2), None); // phase 7
}

#[test]
fn happy_path_forwards_and_finishes_once() {
    let (s, acts) = run(
        Mode::Aggregated,
        &[TokenlessChunk, Chunk, Chunk, TerminalChunk],
    );
    assert!(acts.iter().all(Actions::forward));
    assert_eq!(acts[3].record(), Some(OutcomeKind::Finished));
    assert_eq!(acts.iter().filter(|a| a.record().is_some()).count(), 1);
    assert_eq!(aborts(&acts), 0);
    assert_eq!(s.phase(), Phase::Terminal);
}

#[test]
fn rule1_stop_after_terminal_does_not_abort() {
    let (s, acts) = run(Mode::Aggregated, &[Chunk, TerminalChunk, Stop, Kill]);
    assert_eq!(aborts(&acts), 0);
    assert_eq!(s.abort(), Abort::None);
}

#[test]
fn rule1_stop_then_kill_aborts_once() {
    let (_, acts) = run(Mode::Aggregated, &[Chunk, Stop, Kill, ConsumerPoll]);
    assert_eq!(aborts(&acts), 1);
    assert!(acts[1].abort);
}

#[test]
fn rule2_decode_stop_before_first_token_defers_until_chunk() {
    let (s, acts) = run(Mode::Decode, &[Stop, TokenlessChunk]);
    assert_eq!(aborts(&acts), 0);
    assert_eq!(s.abort(), Abort::Deferred);
    let (s, a) = step(s, Chunk);
    assert!(a.abort && a.forward());
    assert_eq!(s.abort(), Abort::Sent);
}

#[test]
fn rule2_decode_deferred_abort_released_by_hint() {
    let (_, acts) = run(Mode::Decode, &[Stop, FirstTokenHint]);
    assert_eq!(
        acts.iter().map(|a| a.abort).collect::<Vec<_>>(),
        [false, true]
    );
}

#[test]
fn rule2_decode_deferred_abort_released_by_deadline() {
    let (_, acts) = run(Mode::Decode, &[Kill, DeferralDeadline]);
    assert!(!acts[0].abort);
    assert!(acts[1].abort);
}

#[test]
fn rule2_deferred_abort_survives_a_drop_and_is_released_by_the_hint() {
    let (s, acts) = run(
        Mode::Decode,
        &[Stop, ConsumerDropped, FirstTokenHint, DeferralDeadline],
    );
    assert_eq!(
        acts.iter().map(|a| a.abort).collect::<Vec<_>>(),
        [false, false, true, false]
    );
    assert_eq!(s.abort(), Abort::Sent);
    assert_eq!(acts[1].record(), Some(OutcomeKind::Dropped));
    assert!(acts[0].arm_deferral && !acts[1].arm_deferral);
}

#[test]
fn rule2_dropped_stream_is_drained_until_its_first_token_releases_the_abort() {
    let (s, acts) = run(Mode::Decode, &[Kill, ConsumerDropped]);
    assert!(s.drains_engine());
    assert_eq!(acts[1].record(), Some(OutcomeKind::Dropped));
    let (s, a) = step(s, TokenlessChunk);
    assert!(a.is_empty() && s.drains_engine());
    let (s, a) = step(s, Chunk);
    assert!(a.abort && !a.forward() && a.emit().is_none() && a.record().is_none());
    assert!(!s.drains_engine());
    assert_eq!(s.abort(), Abort::Sent);
}

#[test]
fn rule2_drained_engine_end_discards_the_abort_for_good() {
    let (s, acts) = run(Mode::Decode, &[ConsumerDropped, EngineEnded]);
    assert!(acts[0].arm_deferral);
    assert_eq!(s.abort(), Abort::Discarded);
    assert!(!s.drains_engine());
    for e in Event::ALL {
        let (_, a) = step(s, e);
        assert!(!a.abort, "{e:?}: a discarded abort is final");
    }
}

#[test]
fn rule2_deferred_abort_discarded_when_engine_finishes() {
    let (s, acts) = run(Mode::Decode, &[Stop, TerminalChunk, FirstTokenHint]);
    assert_eq!(aborts(&acts), 0);
    assert_eq!(s.abort(), Abort::Discarded);
}

#[test]
fn rule2_decode_kill_delivers_cancelled_and_keeps_abort_owed() {
    let (s, acts) = run(Mode::Decode, &[Kill, ConsumerPoll]);
    assert_eq!(acts[1].emit(), Some(Synthesized::Cancelled));
    assert_eq!(s.abort(), Abort::Deferred);
    // The consumer is gone, the engine is still mid-transfer: the hint releases it.
    assert!(s.drains_engine());
    let (s, a) = step(s, ConsumerDropped);
    assert!(a.is_empty());
    let (_, a) = step(s, FirstTokenHint);
    assert!(a.abort);
}

#[test]
fn rule2_aggregated_and_prefill_abort_at_once() {
    for mode in [Mode::Aggregated, Mode::Prefill] {
        let (_, a) = step(State::new(mode), Stop);
        assert!(a.abort, "{mode:?}");
    }
}

#[test]
fn rule3_tokenless_chunks_are_not_the_first_token() {
    let (s, acts) = run(Mode::Decode, &[TokenlessChunk, TokenlessChunk, Stop]);
    assert_eq!(s.phase(), Phase::Cancelling);
    assert!(!s.first_token());
    assert_eq!(aborts(&acts), 0);
    assert_eq!(s.abort(), Abort::Deferred);
}

#[test]
fn rule4_drop_before_terminal_aborts_and_records_dropped() {
    let (s, a) = step(run(Mode::Aggregated, &[Chunk]).0, ConsumerDropped);
    assert!(a.abort);
    assert_eq!(a.record(), Some(OutcomeKind::Dropped));
    assert_eq!(s.phase(), Phase::Dropped);
}

#[test]
fn rule4_drop_in_decode_before_first_token_defers_the_abort() {
    let (s, a) = step(State::new(Mode::Decode), ConsumerDropped);
    assert!(!a.abort && a.arm_deferral);
    assert_eq!(a.record(), Some(OutcomeKind::Dropped));
    assert_eq!(s.abort(), Abort::Deferred);
    let (s, a) = step(s, DeferralDeadline);
    assert!(a.abort);
    assert_eq!(s.abort(), Abort::Sent);
}

#[test]
fn rule4_kill_then_drop_and_kill_poll_drop_owe_the_same_abort() {
    let (a, _) = run(Mode::Decode, &[Kill, ConsumerDropped]);
    let (b, _) = run(Mode::Decode, &[Kill, ConsumerPoll, ConsumerDropped]);
    assert_eq!((a.abort(), b.abort()), (Abort::Deferred, Abort::Deferred));
    assert!(a.drains_engine() && b.drains_engine());
}

#[test]
fn rule4_drop_after_terminal_changes_nothing() {
    let (s, _) = run(Mode::Aggregated, &[Chunk, TerminalChunk]);
    let (s2, a) = step(s, ConsumerDropped);
    assert!(a.is_empty());
    assert_eq!(s2, s);
}

#[test]
fn rule5_stop_arms_the_grace_and_wakes_nobody() {
    let (_, a) = step(State::new(Mode::Aggregated), Stop);
    assert!(a.abort && a.arm_grace && !a.wake && !a.arm_deferral);
    let (_, a) = step(State::new(Mode::Decode), Stop);
    assert!(!a.abort && a.arm_grace && !a.wake && a.arm_deferral);
}

#[test]
fn rule5_kill_synthesizes_cancelled_at_next_poll() {
    let (s, acts) = run(Mode::Aggregated, &[Chunk, Kill]);
    assert!(acts[1].abort && acts[1].wake);
    assert_eq!(s.pending_terminal(), Some(Synthesized::Cancelled));
    assert!(!s.polls_engine());
    let (s, a) = step(s, ConsumerPoll);
    assert_eq!(a.emit(), Some(Synthesized::Cancelled));
    assert_eq!(a.record(), Some(OutcomeKind::Cancelled));
    assert_eq!(s.phase(), Phase::Terminal);
}

#[test]
fn rule5_kill_racing_a_chunk_replaces_it_with_cancelled() {
    let (_, acts) = run(Mode::Aggregated, &[Kill, Chunk]);
    assert!(!acts[1].forward());
    assert_eq!(acts[1].emit(), Some(Synthesized::Cancelled));
}

#[test]
fn rule5_stop_keeps_chunks_flowing_until_engine_terminal() {
    let (s, acts) = run(
        Mode::Aggregated,
        &[Chunk, Stop, Chunk, Chunk, TerminalChunk],
    );
    assert!(acts[2].forward() && acts[3].forward() && acts[4].forward());
    assert_eq!(acts[4].record(), Some(OutcomeKind::Finished));
    assert_eq!(s.phase(), Phase::Terminal);
}

#[test]
fn rule5_stop_then_engine_end_synthesizes_cancelled() {
    let (_, acts) = run(Mode::Aggregated, &[Stop, EngineEnded]);
    assert_eq!(acts[1].emit(), Some(Synthesized::Cancelled));
    assert_eq!(acts[1].record(), Some(OutcomeKind::Cancelled));
}

#[test]
fn rule5_cancel_grace_forces_a_stopped_request_like_kill() {
    let (s, acts) = run(
        Mode::Aggregated,
        &[Chunk, Stop, CancelGraceExpired, ConsumerPoll],
    );
    assert_eq!(aborts(&acts), 1);
    assert_eq!(acts[3].emit(), Some(Synthesized::Cancelled));
    assert_eq!(s.cancel(), Cancel::Kill);
}

#[test]
fn rule5_cancel_grace_without_stop_is_ignored() {
    let (_, a) = step(State::new(Mode::Aggregated), CancelGraceExpired);
    assert!(a.is_empty());
}

#[test]
fn rule6_engine_end_without_terminal_is_incomplete_error() {
    let (s, acts) = run(
        Mode::Aggregated,
        &[Chunk, EngineEnded, Chunk, TerminalChunk],
    );
    assert_eq!(acts[1].emit(), Some(Synthesized::Incomplete));
    assert_eq!(acts[1].record(), Some(OutcomeKind::Failed));
    assert!(acts[2].is_empty() && acts[3].is_empty());
    assert_eq!(s.phase(), Phase::Terminal);
}

#[test]
fn rule6_engine_error_is_forwarded_and_ends() {
    let (_, acts) = run(Mode::Aggregated, &[Chunk, EngineError, Chunk]);
    assert!(acts[1].forward());
    assert_eq!(acts[1].record(), Some(OutcomeKind::Failed));
    assert!(acts[2].is_empty());
}

#[test]
fn rule8_first_token_timeout_kills_with_timeout_terminal() {
    let (s, acts) = run(
        Mode::Aggregated,
        &[
            TokenlessChunk,
            Timeout(super::Timeout::FirstToken),
            ConsumerPoll,
        ],
    );
    assert!(acts[1].abort);
    assert_eq!(acts[2].emit(), Some(Synthesized::FirstTokenTimeout));
    assert_eq!(acts[2].record(), Some(OutcomeKind::TimedOut));
    assert!(s.is_terminal());
}

#[test]
fn rule8_stale_timeouts_are_ignored() {
    let (_, acts) = run(
        Mode::Aggregated,
        &[Chunk, Timeout(super::Timeout::FirstToken)],
    );
    assert!(acts[1].is_empty());
    let (_, a) = step(
        State::new(Mode::Aggregated),
        Timeout(super::Timeout::InterToken),
    );
    assert!(a.is_empty());
}

#[test]
fn rule8_inter_token_timeout_after_first_token() {
    let (_, acts) = run(
        Mode::Aggregated,
        &[Chunk, Timeout(super::Timeout::InterToken), ConsumerPoll],
    );
    assert!(acts[1].abort);
    assert_eq!(acts[2].emit(), Some(Synthesized::InterTokenTimeout));
}

#[test]
fn rule9_every_end_records_exactly_one_outcome() {
    for (events, outcome) in [
        (&[TerminalChunk][..], OutcomeKind::Finished),
        (&[EngineError][..], OutcomeKind::Failed),
        (&[EngineEnded][..], OutcomeKind::Failed),
        (&[Kill, ConsumerPoll][..], OutcomeKind::Cancelled),
        (&[ConsumerDropped][..], OutcomeKind::Dropped),
        (
            &[Timeout(super::Timeout::FirstToken), ConsumerPoll][..],
            OutcomeKind::TimedOut,
        ),
    ] {
        let (_, acts) = run(Mode::Aggregated, events);
        let finishes: Vec<_> = acts.iter().filter_map(Actions::record).collect();
        assert_eq!(finishes, [outcome], "{events:?}");
    }
}

#[test]
fn oracle_catches_a_double_abort() {
    let mut o = Oracle::new(Mode::Aggregated);
    let s = State::new(Mode::Aggregated);
    let (s1, a) = step(s, Stop);
    o.observe(Stop, a, s1).unwrap();
    let (s2, mut forged) = step(s1, Kill);
    forged.abort = true;
    let v = o.observe(Kill, forged, s2).unwrap_err();
    assert_eq!((v.rule, v.what), (1, "abort issued twice"));
}

#[test]
fn oracle_catches_an_undeferred_decode_abort() {
    let mut o = Oracle::new(Mode::Decode);
    let forged = Actions {
        abort: true,
        arm_grace: true,
        ..Actions::default()
    };
    let v = o
        .observe(Stop, forged, step(State::new(Mode::Decode), Stop).0)
        .unwrap_err();
    assert_eq!(v.rule, 2);
}

/// A machine that swallows a chunk after a stop (the bug the old oracle let through).
#[test]
fn oracle_catches_a_swallowed_chunk() {
    let mut o = Oracle::new(Mode::Aggregated);
    let (s, a) = step(State::new(Mode::Aggregated), Stop);
    o.observe(Stop, a, s).unwrap();
    let (s2, _) = step(s, Chunk);
    let v = o.observe(Chunk, Actions::default(), s2).unwrap_err();
    assert_eq!(
        (v.rule, v.what),
        (6, "a non-terminal chunk was not forwarded")
    );
}

#[test]
fn oracle_catches_a_missing_and_a_spurious_wake() {
    let s = State::new(Mode::Aggregated);
    let (k, mut a) = step(s, Kill);
    a.wake = false;
    let v = Oracle::new(Mode::Aggregated)
        .observe(Kill, a, k)
        .unwrap_err();
    assert_eq!(v.rule, 5);
    let (c, mut a) = step(s, Chunk);
    a.wake = true;
    let v = Oracle::new(Mode::Aggregated)
        .observe(Chunk, a, c)
        .unwrap_err();
    assert_eq!(v.rule, 5);
}

#[test]
fn oracle_catches_a_revived_discarded_abort() {
    let mut o = Oracle::new(Mode::Decode);
    let mut s = State::new(Mode::Decode);
    for e in [Stop, EngineEnded] {
        let (n, a) = step(s, e);
        o.observe(e, a, n).unwrap();
        s = n;
    }
    let forged = Actions {
        abort: true,
        ..Actions::default()
    };
    let v = o.observe(DeferralDeadline, forged, s).unwrap_err();
    assert_eq!(v.rule, 1);
}

#[test]
fn oracle_catches_a_deadline_that_waits_for_the_consumer() {
    let mut o = Oracle::new(Mode::Decode);
    let (s, a) = step(State::new(Mode::Decode), Kill);
    o.observe(Kill, a, s).unwrap();
    // The deadline passed but the abort is left for the consumer's next poll.
    let v = o
        .observe(DeferralDeadline, Actions::default(), s)
        .unwrap_err();
    assert_eq!((v.rule, v.what), (11, "deferred abort not released"));
}

#[test]
fn oracle_catches_an_abort_discarded_by_a_drop() {
    let mut o = Oracle::new(Mode::Decode);
    let mut forged = State::new(Mode::Decode);
    forged.phase = Phase::Dropped;
    forged.abort = Abort::Discarded;
    let acts = Actions {
        deliver: Delivery::End(OutcomeKind::Dropped),
        ..Actions::default()
    };
    let v = o.observe(ConsumerDropped, acts, forged).unwrap_err();
    assert_eq!(v.rule, 2);
}

#[test]
fn oracle_catches_a_missing_outcome_on_drop() {
    let mut o = Oracle::new(Mode::Aggregated);
    let forged = Actions {
        abort: true,
        ..Actions::default()
    };
    let v = o
        .observe(
            ConsumerDropped,
            forged,
            step(State::new(Mode::Aggregated), ConsumerDropped).0,
        )
        .unwrap_err();
    assert_eq!(v.rule, 9);
}

#[test]
fn early_finish_records_finished_and_aborts_once() {
    let (s, a) = step(State::new(Mode::Aggregated), EarlyFinish);
    assert!(s.is_terminal());
    assert_eq!(
        (a.record(), a.abort, a.emit(), a.forward()),
        (Some(OutcomeKind::Finished), true, None, false)
    );
    // Nothing after it: a later kill, drop or engine end decides nothing.
    for e in [Kill, ConsumerDropped, EngineEnded, EarlyFinish] {
        assert!(step(s, e).1.is_empty(), "{e:?}");
    }
}

#[test]
fn early_finish_in_decode_before_the_first_token_defers_and_drains() {
    let (s, a) = step(State::new(Mode::Decode), EarlyFinish);
    assert_eq!(
        (a.record(), a.abort, a.arm_deferral),
        (Some(OutcomeKind::Finished), false, true)
    );
    assert!(s.drains_engine());
    let (s, a) = step(s, Chunk);
    assert!(a.abort && !a.forward() && s.abort() == Abort::Sent && !s.drains_engine());
}

#[test]
fn early_finish_loses_to_an_owed_terminal() {
    let (s, _) = step(State::new(Mode::Aggregated), Kill);
    let (after, a) = step(s, EarlyFinish);
    assert_eq!((after, a.is_empty()), (s, true));
}
