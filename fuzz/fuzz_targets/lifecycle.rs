//! Arbitrary event sequences, in every mode, through the pure lifecycle machine with
//! the invariant oracle judging every step (SPEC.md section 4, rules 1 to 9); the
//! atomic `SharedState` must agree with `step` at every step.
//!
//! Input: byte 0 picks the mode, every further byte one of `Event::ALL`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_core::lifecycle::oracle::{check_sequence, Oracle};
use tether_core::lifecycle::{step, SharedState, Event, State};
use tether_core::Mode;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let mode = match head % 3 {
        0 => Mode::Aggregated,
        1 => Mode::Prefill,
        _ => Mode::Decode,
    };
    let events: Vec<Event> = rest
        .iter()
        .map(|&b| Event::ALL[usize::from(b) % Event::ALL.len()])
        .collect();

    if let Err(v) = check_sequence(mode, &events) {
        panic!("{v} in {mode:?} {events:?}");
    }

    // Step by step, with the cell beside the pure function and the oracle watching
    // every prefix closed by a drop.
    let cell = SharedState::new(State::new(mode));
    let mut state = State::new(mode);
    let mut oracle = Oracle::new(mode);
    for (i, &event) in events.iter().enumerate() {
        let (next, acts) = step(state, event);
        assert_eq!(cell.apply(event), (next, acts), "cell disagrees at {i}");
        assert_eq!(State::unpack(next.pack()), Some(next));
        if let Err(v) = oracle.observe(event, acts, next) {
            panic!("{v} in {mode:?} {events:?}");
        }
        let mut closed = oracle.clone();
        let (end, end_acts) = step(next, Event::ConsumerDropped);
        if let Err(v) = closed
            .observe(Event::ConsumerDropped, end_acts, end)
            .and_then(|()| closed.close())
        {
            panic!("{v} closing after {i} of {mode:?} {events:?}");
        }
        state = next;
    }
});
