//! The packed state and the atomic cell agree with [`step`](super::super::step).

use super::super::oracle::check_sequence;
use super::super::*;
use Event::*;

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
    let cell = SharedState::new(State::new(Mode::Decode));
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
fn cell_apply_steady_agrees_with_step() {
    fn walk(mode: Mode, path: &mut Vec<Event>, depth: usize) {
        let steady_cell = SharedState::new(State::new(mode));
        let mut steady_cache = StepCache::default();
        let mut s = State::new(mode);
        for &e in path.iter() {
            let expected = step(s, e);
            match steady_cell.apply_steady(e, &mut steady_cache) {
                // Only a step that changes nothing and only forwards may be skipped.
                None => assert!(
                    expected.0 == s && expected.1.is_steady() && !s.engine_done(),
                    "{path:?}"
                ),
                Some(got) => assert_eq!(got, expected, "{path:?}"),
            }
            assert_eq!(steady_cell.load(), expected.0, "{path:?}");
            if steady_cell.is_steady_cached(&steady_cache) {
                let now = steady_cell.load();
                assert!(
                    now.is_live() && now.pending_terminal().is_none(),
                    "{path:?}"
                );
            }
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

/// The steady step is skipped from its second time on, and only while the word and the
/// event stay the same: a stop between two chunks is stepped again.
#[test]
fn apply_steady_skips_only_the_repeated_steady_step() {
    let cell = SharedState::new(State::new(Mode::Aggregated));
    let mut cache = StepCache::default();
    let first = cell
        .apply_steady(Chunk, &mut cache)
        .expect("the first chunk is stepped");
    assert!(first.1.is_steady());
    let second = cell
        .apply_steady(Chunk, &mut cache)
        .expect("the first token changed the state");
    assert!(second.1.is_steady());
    assert_eq!(
        cell.apply_steady(Chunk, &mut cache),
        None,
        "the same no-op again"
    );
    assert!(
        cell.is_steady_cached(&cache),
        "the word is the steady step's"
    );
    assert!(
        cell.apply_steady(TokenlessChunk, &mut cache).is_some(),
        "another event"
    );
    let (stopped, _) = cell.apply(Stop);
    assert!(!cell.is_steady_cached(&cache), "a stop changed the word");
    let after_stop = cell
        .apply_steady(Chunk, &mut cache)
        .expect("the word changed");
    assert_eq!(after_stop, step(stopped, Chunk));
}
