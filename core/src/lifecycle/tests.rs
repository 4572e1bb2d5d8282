use super::oracle::{check_sequence, Oracle};
use super::*;
use Event::*;

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
    assert!(acts.iter().all(|a| a.forward));
    assert_eq!(acts[3].finish, Some(OutcomeKind::Finished));
    assert_eq!(acts.iter().filter(|a| a.finish.is_some()).count(), 1);
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
    assert!(a.abort && a.forward);
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
fn rule2_deferred_abort_discarded_when_dropped_first() {
    let (s, acts) = run(
        Mode::Decode,
        &[Stop, ConsumerDropped, FirstTokenHint, DeferralDeadline],
    );
    assert_eq!(aborts(&acts), 0);
    assert_eq!(s.abort(), Abort::Discarded);
    assert_eq!(acts[1].finish, Some(OutcomeKind::Dropped));
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
    assert_eq!(acts[1].emit, Some(Synth::Cancelled));
    assert_eq!(s.abort(), Abort::Deferred);
    // The consumer is gone, the engine is still mid-transfer: the hint releases it.
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
    assert_eq!(a.finish, Some(OutcomeKind::Dropped));
    assert_eq!(s.phase(), Phase::Dropped);
}

#[test]
fn rule4_drop_in_decode_before_first_token_does_not_abort() {
    let (s, a) = step(State::new(Mode::Decode), ConsumerDropped);
    assert!(!a.abort);
    assert_eq!(a.finish, Some(OutcomeKind::Dropped));
    assert_eq!(s.abort(), Abort::Discarded);
}

#[test]
fn rule4_drop_after_terminal_changes_nothing() {
    let (s, _) = run(Mode::Aggregated, &[Chunk, TerminalChunk]);
    let (s2, a) = step(s, ConsumerDropped);
    assert!(a.is_empty());
    assert_eq!(s2, s);
}

#[test]
fn rule5_kill_synthesizes_cancelled_at_next_poll() {
    let (s, acts) = run(Mode::Aggregated, &[Chunk, Kill]);
    assert!(acts[1].abort && acts[1].wake);
    assert_eq!(s.owed(), Some(Synth::Cancelled));
    assert!(!s.polls_engine());
    let (s, a) = step(s, ConsumerPoll);
    assert_eq!(a.emit, Some(Synth::Cancelled));
    assert_eq!(a.finish, Some(OutcomeKind::Cancelled));
    assert_eq!(s.phase(), Phase::Terminal);
}

#[test]
fn rule5_kill_racing_a_chunk_replaces_it_with_cancelled() {
    let (_, acts) = run(Mode::Aggregated, &[Kill, Chunk]);
    assert!(!acts[1].forward);
    assert_eq!(acts[1].emit, Some(Synth::Cancelled));
}

#[test]
fn rule5_stop_keeps_chunks_flowing_until_engine_terminal() {
    let (s, acts) = run(
        Mode::Aggregated,
        &[Chunk, Stop, Chunk, Chunk, TerminalChunk],
    );
    assert!(acts[2].forward && acts[3].forward && acts[4].forward);
    assert_eq!(acts[4].finish, Some(OutcomeKind::Finished));
    assert_eq!(s.phase(), Phase::Terminal);
}

#[test]
fn rule5_stop_then_engine_end_synthesizes_cancelled() {
    let (_, acts) = run(Mode::Aggregated, &[Stop, EngineEnded]);
    assert_eq!(acts[1].emit, Some(Synth::Cancelled));
    assert_eq!(acts[1].finish, Some(OutcomeKind::Cancelled));
}

#[test]
fn rule5_cancel_grace_forces_a_stopped_request_like_kill() {
    let (s, acts) = run(
        Mode::Aggregated,
        &[
            Chunk,
            Stop,
            Timeout(super::Timeout::CancelGrace),
            ConsumerPoll,
        ],
    );
    assert_eq!(aborts(&acts), 1);
    assert_eq!(acts[3].emit, Some(Synth::Cancelled));
    assert_eq!(s.cancel(), Cancel::Kill);
}

#[test]
fn rule5_cancel_grace_without_stop_is_ignored() {
    let (_, a) = step(
        State::new(Mode::Aggregated),
        Timeout(super::Timeout::CancelGrace),
    );
    assert!(a.is_empty());
}

#[test]
fn rule6_engine_end_without_terminal_is_incomplete_error() {
    let (s, acts) = run(
        Mode::Aggregated,
        &[Chunk, EngineEnded, Chunk, TerminalChunk],
    );
    assert_eq!(acts[1].emit, Some(Synth::Incomplete));
    assert_eq!(acts[1].finish, Some(OutcomeKind::Failed));
    assert!(acts[2].is_empty() && acts[3].is_empty());
    assert_eq!(s.phase(), Phase::Terminal);
}

#[test]
fn rule6_engine_error_is_forwarded_and_ends() {
    let (_, acts) = run(Mode::Aggregated, &[Chunk, EngineError, Chunk]);
    assert!(acts[1].forward);
    assert_eq!(acts[1].finish, Some(OutcomeKind::Failed));
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
    assert_eq!(acts[2].emit, Some(Synth::FirstTokenTimeout));
    assert_eq!(acts[2].finish, Some(OutcomeKind::TimedOut));
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
    assert_eq!(acts[2].emit, Some(Synth::InterTokenTimeout));
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
        let finishes: Vec<_> = acts.iter().filter_map(|a| a.finish).collect();
        assert_eq!(finishes, [outcome], "{events:?}");
    }
}

#[test]
fn oracle_catches_a_double_abort() {
    let mut o = Oracle::new(Mode::Aggregated);
    let s = State::new(Mode::Aggregated);
    let (s1, a) = step(s, Stop);
    o.observe(Stop, a, s1).unwrap();
    let forged = Actions {
        abort: true,
        ..Actions::default()
    };
    let v = o.observe(Kill, forged, step(s1, Kill).0).unwrap_err();
    assert_eq!(v.rule, 1);
}

#[test]
fn oracle_catches_an_undeferred_decode_abort() {
    let mut o = Oracle::new(Mode::Decode);
    let forged = Actions {
        abort: true,
        wake: true,
        ..Actions::default()
    };
    let v = o
        .observe(Stop, forged, step(State::new(Mode::Decode), Stop).0)
        .unwrap_err();
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

/// Every sequence of up to 7 events (6 in prefill mode, which differs from aggregated
/// only in where the trace link is stamped), with the oracle after every step and a
/// closing drop after every prefix. Prefixes are shared (depth-first), so each step is
/// computed once; one thread per mode.
#[test]
fn exhaustive_sequences_satisfy_every_rule() {
    fn walk(state: State, oracle: &Oracle, path: &mut Vec<Event>, depth: usize, count: &mut u64) {
        // Close here: the consumer drops the stream after this prefix.
        let mut closing = oracle.clone();
        let (s, a) = step(state, ConsumerDropped);
        closing
            .observe(ConsumerDropped, a, s)
            .and_then(|()| closing.close())
            .unwrap_or_else(|v| panic!("{v} after {path:?}"));
        *count += 1;
        if depth == 0 {
            return;
        }
        for e in Event::ALL {
            let (next, acts) = step(state, e);
            let mut o = oracle.clone();
            path.push(e);
            o.observe(e, acts, next)
                .unwrap_or_else(|v| panic!("{v} in {path:?}"));
            walk(next, &o, path, depth - 1, count);
            path.pop();
        }
    }
    let plan = [(Mode::Aggregated, 7), (Mode::Decode, 7), (Mode::Prefill, 6)];
    let handles: Vec<_> = plan
        .into_iter()
        .map(|(mode, depth)| {
            std::thread::spawn(move || {
                let mut count = 0;
                walk(
                    State::new(mode),
                    &Oracle::new(mode),
                    &mut Vec::new(),
                    depth,
                    &mut count,
                );
                (mode, depth, count)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        let (mode, depth, count) = h.join().expect("walker");
        // every prefix of length 0..=depth over the 14 events
        assert_eq!(
            count,
            (0..=depth as u32).map(|k| 14u64.pow(k)).sum::<u64>(),
            "{mode:?}"
        );
        println!("{mode:?}: {count} sequences of up to {depth} events checked");
        total += count;
    }
    println!("exhaustive walk: {total} sequences checked");
}

#[test]
fn state_fits_in_a_u64() {
    assert!(std::mem::size_of::<State>() <= 8);
    // and its packed form in the low 14 bits of the shared word
    let mut s = State::new(Mode::Decode);
    for e in [Stop, Chunk, Kill, ConsumerPoll] {
        s = step(s, e).0;
        assert_eq!(s.pack() >> 14, 0);
    }
}

#[test]
fn check_sequence_reports_the_final_state() {
    let s = check_sequence(Mode::Decode, &[Kill, ConsumerPoll]).unwrap();
    assert!(s.is_terminal());
    assert_eq!(s.abort(), Abort::Deferred);
}

#[test]
fn cell_apply_agrees_with_step() {
    let cell = Cell::new(State::new(Mode::Decode));
    let mut s = State::new(Mode::Decode);
    for e in [
        TokenlessChunk,
        Stop,
        Chunk,
        Kill,
        ConsumerPoll,
        ConsumerDropped,
    ] {
        let (expect, expect_acts) = step(s, e);
        let (got, acts) = cell.apply(e);
        assert_eq!((got, acts), (expect, expect_acts), "{e:?}");
        assert_eq!(cell.load(), expect);
        s = expect;
    }
}

/// The poller's memoized transitions must decide exactly what `step` decides, for every
/// sequence of up to 5 events in every mode (the cache sees repeats, changes and misses).
#[test]
fn cell_apply_cached_agrees_with_step() {
    fn walk(mode: Mode, path: &mut Vec<Event>, depth: usize) {
        let cell = Cell::new(State::new(mode));
        let mut cache = StepCache::default();
        let mut s = State::new(mode);
        for &e in path.iter() {
            let expected = step(s, e);
            assert_eq!(cell.apply_cached(e, &mut cache), expected, "{path:?}");
            assert_eq!(cell.load_cached(&mut cache), expected.0, "{path:?}");
            s = expected.0;
        }
        if depth > 0 {
            for e in Event::ALL {
                path.push(e);
                walk(mode, path, depth - 1);
                path.pop();
            }
        }
    }
    for mode in [Mode::Aggregated, Mode::Prefill, Mode::Decode] {
        walk(mode, &mut Vec::new(), 4);
    }
}
