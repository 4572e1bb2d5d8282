//! The reachable-state proof: every (machine state, oracle state) pair reachable from a
//! fresh request is enumerated and every event from every pair is judged, which covers
//! event sequences of every length (both halves are finite).

use super::super::oracle::Oracle;
use super::super::*;
use Event::*;

/// What a search of the reachable pairs covered.
#[derive(Debug, Default)]
struct Searched {
    states: std::collections::HashSet<State>,
    pairs: usize,
    transitions: u64,
}

/// A broken rule, with the shortest event sequence (closing drop aside) that breaks it.
type Counterexample = (super::oracle::Violation, Vec<Event>);

/// Breadth-first search of every pair (machine state, oracle state) reachable from a
/// fresh request in `mode` under `step_fn`: every event from every pair, judged by the
/// oracle, and a closing consumer drop at every pair.
fn search(
    mode: Mode,
    step_fn: impl Fn(State, Event) -> (State, Actions),
    into: &mut Searched,
) -> Result<(), Counterexample> {
    use std::collections::hash_map::{Entry, HashMap};
    type Key = (State, super::oracle::OracleState);
    let start = (State::new(mode), Oracle::new(mode));
    // How each pair was first reached, for counterexamples.
    let mut parent: HashMap<Key, Option<(Key, Event)>> = HashMap::new();
    parent.insert((start.0, start.1.state()), None);
    let mut queue = std::collections::VecDeque::from([start]);
    let path_to = |parent: &HashMap<Key, Option<(Key, Event)>>, mut key: Key| {
        let mut path = Vec::new();
        while let Some(Some((prev, e))) = parent.get(&key) {
            path.push(*e);
            key = *prev;
        }
        path.reverse();
        path
    };
    while let Some((state, oracle)) = queue.pop_front() {
        into.states.insert(state);
        let key = (state, oracle.state());
        // Close here: the consumer drops the stream now.
        let mut closing = oracle.clone();
        let (s, a) = step_fn(state, ConsumerDropped);
        if let Err(v) = closing
            .observe(ConsumerDropped, a, s)
            .and_then(|()| closing.close())
        {
            return Err((v, path_to(&parent, key)));
        }
        for e in Event::ALL {
            into.transitions += 1;
            let (next, acts) = step_fn(state, e);
            let mut o = oracle.clone();
            if let Err(v) = o.observe(e, acts, next) {
                let mut path = path_to(&parent, key);
                path.push(e);
                return Err((v, path));
            }
            if let Entry::Vacant(slot) = parent.entry((next, o.state())) {
                slot.insert(Some((key, e)));
                queue.push_back((next, o));
            }
        }
    }
    into.pairs += parent.len();
    Ok(())
}

/// The proof for sequences of every length: the search above in every mode. Both
/// halves of a pair are finite, so once no new pair appears every event sequence of any
/// length has been judged: a sequence longer than the search's depth only revisits
/// pairs already checked. A violation prints the shortest sequence that reaches it.
#[test]
fn every_reachable_pair_satisfies_every_rule() {
    let started = std::time::Instant::now();
    let mut searched = Searched::default();
    for mode in [Mode::Aggregated, Mode::Prefill, Mode::Decode] {
        let before = searched.pairs;
        if let Err((v, path)) = search(mode, step, &mut searched) {
            panic!("{v} in {mode:?} after {path:?}");
        }
        println!(
            "{mode:?}: {} reachable (state, oracle) pairs",
            searched.pairs - before
        );
    }
    println!(
        "reachable-state proof: {} machine states, {} pairs, {} transitions judged in {:?}",
        searched.states.len(),
        searched.pairs,
        searched.transitions,
        started.elapsed()
    );
    // The counts are what make this a proof rather than a sample: pin them, so a
    // change to the machine or the oracle that changes the space is seen.
    assert_eq!(
        (searched.states.len(), searched.pairs),
        (EXPECTED_STATES, EXPECTED_PAIRS)
    );
}

// 86 before rule 12; an early finish adds the terminal states with no cancellation and
// an abort sent or deferred (and, in decode mode, their drained successors).
const EXPECTED_STATES: usize = 102;
const EXPECTED_PAIRS: usize = 102;

/// The search must be able to fail: a machine with one rule broken is caught, with the
/// shortest sequence that shows it.
#[test]
fn the_reachable_pair_search_catches_a_broken_machine() {
    // The old rule 4: a decode-mode drop before the first token discards the abort.
    let broken = |s: State, e: Event| {
        let (mut n, a) = step(s, e);
        if e == ConsumerDropped && n.abort == Abort::Deferred {
            n.abort = Abort::Discarded;
        }
        (n, a)
    };
    let (v, path) = search(Mode::Decode, broken, &mut Searched::default()).unwrap_err();
    assert_eq!((v.rule, v.event, path), (2, ConsumerDropped, vec![]));
}

/// Rule 12 is checked by the search too: a machine whose early finish forgets the abort
/// is caught at once.
#[test]
fn the_reachable_pair_search_catches_an_early_finish_that_leaks_the_engine() {
    let broken = |s: State, e: Event| {
        let (mut n, mut a) = step(s, e);
        if e == EarlyFinish && a.abort {
            a.abort = false;
            n.abort = Abort::None;
        }
        (n, a)
    };
    let (v, path) = search(Mode::Aggregated, broken, &mut Searched::default()).unwrap_err();
    assert_eq!((v.rule, v.event, path), (2, EarlyFinish, vec![EarlyFinish]));
}
