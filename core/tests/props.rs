//! Property tests: the same oracles the fuzz targets use, run by proptest in the normal
//! test suite so that a regression is caught without a fuzzer.
//!
//! - random event sequences (all modes, up to 40 events, longer than the exhaustive
//!   depth-6 walk) through the invariant oracle;
//! - `SharedState::apply` agrees with `step`;
//! - protocol values round-trip through serde_json, and arbitrary bytes or strings
//!   never panic the decoders (whatever decodes re-encodes to the same value);
//! - scripted engine and canceller runs through the real `Adapter` on a manual,
//!   single-threaded executor (`common/script.rs`, shared with the `stream` fuzz target).
#![cfg(not(tether_loom))]

#[path = "common/script.rs"]
mod script;

use std::str::FromStr;

use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tether_core::lifecycle::oracle::check_sequence;
use tether_core::lifecycle::{step, Event, SharedState, State};
use tether_core::protocol::{SamplingOptions, StopConditions};
use tether_core::{
    Annotated, Chunk, EngineError, ErrorKind, FinishReason, Mode, Request, TraceLink, Usage,
};

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::Aggregated),
        Just(Mode::Prefill),
        Just(Mode::Decode)
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop::sample::select(Event::ALL.to_vec())
}

fn events(max: usize) -> impl Strategy<Value = Vec<Event>> {
    prop::collection::vec(event(), 0..=max)
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        // Never write regression files into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------
// The pure machine.

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn random_sequences_satisfy_the_oracle(mode in mode(), events in events(40)) {
        if let Err(v) = check_sequence(mode, &events) {
            prop_assert!(false, "{v} in {mode:?} {events:?}");
        }
    }

    #[test]
    fn cell_apply_agrees_with_step(mode in mode(), events in events(40)) {
        let cell = SharedState::new(State::new(mode));
        let mut state = State::new(mode);
        for event in events {
            let (want, want_acts) = step(state, event);
            let (got, got_acts) = cell.apply(event);
            prop_assert_eq!(got, want, "state after {:?}", event);
            prop_assert_eq!(got_acts, want_acts, "actions of {:?}", event);
            prop_assert_eq!(cell.load(), want);
            prop_assert_eq!(State::unpack(want.pack()), Some(want));
            state = want;
        }
    }
}

// ---------------------------------------------------------------------------------
// Protocol values.

fn text() -> impl Strategy<Value = String> {
    // Mostly ASCII with escapes, sometimes any Unicode.
    prop_oneof![
        3 => "[a-z0-9 _\"\\\\/\n\t-]{0,12}",
        1 => any::<String>(),
    ]
}

fn trace_link() -> impl Strategy<Value = TraceLink> {
    (1..=u128::MAX, 1..=u64::MAX).prop_map(|(t, s)| TraceLink::from_ids(t, s).unwrap())
}

fn finish_reason() -> impl Strategy<Value = FinishReason> {
    prop_oneof![
        Just(FinishReason::Eos),
        Just(FinishReason::Length),
        Just(FinishReason::Stop),
        text().prop_map(FinishReason::Error),
        Just(FinishReason::Cancelled),
        Just(FinishReason::ContentFilter),
    ]
}

fn kind() -> impl Strategy<Value = ErrorKind> {
    prop::sample::select(ErrorKind::ALL.to_vec())
}

fn engine_error() -> impl Strategy<Value = EngineError> {
    // A cause chain up to four deep.
    prop::collection::vec((kind(), text()), 1..=4).prop_map(|chain| {
        chain
            .into_iter()
            .rev()
            .fold(None::<EngineError>, |cause, (kind, msg)| {
                let err = EngineError::new(kind, msg);
                Some(match cause {
                    Some(c) => err.with_source(c),
                    None => err,
                })
            })
            .unwrap()
    })
}

fn finite_f32() -> impl Strategy<Value = Option<f32>> {
    prop::option::of(prop_oneof![
        any::<f32>().prop_filter("finite", |v| v.is_finite()),
        -2.0f32..2.0,
    ])
}

fn request() -> impl Strategy<Value = Request> {
    let stop = (
        prop::option::of(any::<u32>()),
        prop::collection::vec(any::<u32>(), 0..4),
        prop::option::of(any::<u32>()),
        any::<bool>(),
        prop::collection::vec(text(), 0..3),
    )
        .prop_map(
            |(max_tokens, stop_token_ids, min_tokens, ignore_eos, strings)| {
                let mut stop = StopConditions::default();
                stop.max_tokens = max_tokens;
                stop.stop_token_ids = stop_token_ids;
                stop.min_tokens = min_tokens;
                stop.ignore_eos = ignore_eos;
                stop.stop = strings;
                stop
            },
        );
    let sampling = (
        finite_f32(),
        finite_f32(),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(temperature, top_p, top_k, seed)| {
            let mut sampling = SamplingOptions::default();
            sampling.temperature = temperature;
            sampling.top_p = top_p;
            sampling.top_k = top_k;
            sampling.seed = seed;
            sampling
        });
    (
        text(),
        text(),
        prop::collection::vec(any::<u32>(), 0..8),
        stop,
        sampling,
        prop::collection::vec(any::<u32>(), 0..3),
        prop::option::of(trace_link()),
        prop::collection::vec(text(), 0..3),
    )
        .prop_map(
            |(id, model, token_ids, stop, sampling, eos_token_ids, migration_link, annotations)| {
                let mut request = Request::new(id, model, token_ids)
                    .with_stop(stop)
                    .with_sampling(sampling);
                request.eos_token_ids = eos_token_ids;
                request.migration_link = migration_link;
                request.annotations = annotations;
                request
            },
        )
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        prop::collection::vec(any::<u32>(), 0..6),
        prop::option::of(text()),
        prop::option::of(finish_reason()),
        prop::option::of((any::<u32>(), any::<u32>())),
        any::<u32>(),
        prop::option::of(trace_link()),
    )
        .prop_map(
            |(token_ids, text, finish_reason, usage, index, worker_trace_link)| {
                let mut chunk = Chunk::tokens(token_ids);
                chunk.text = text;
                chunk.finish_reason = finish_reason;
                chunk.usage = usage.map(|(prompt, completion)| Usage::new(prompt, completion));
                chunk.index = index;
                chunk.worker_trace_link = worker_trace_link;
                chunk
            },
        )
}

fn annotated() -> impl Strategy<Value = Annotated<Chunk>> {
    (
        prop::option::of(chunk()),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(prop::collection::vec(text(), 0..3)),
        prop::option::of(engine_error()),
    )
        .prop_map(|(data, id, event, comment, error)| Annotated {
            data,
            id,
            event,
            comment,
            error,
        })
}

fn round_trips<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_string(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = serde_json::from_str(&json)
        .map_err(|e| TestCaseError::fail(format!("{e} decoding {json}")))?;
    prop_assert_eq!(&back, value, "via {}", json);
    // And the encoding is stable.
    prop_assert_eq!(serde_json::to_string(&back).unwrap(), json);
    Ok(())
}

/// Decoding `bytes` as `T` never panics; a value that decodes re-encodes and decodes
/// back to itself.
fn decodes_stably<T>(bytes: &[u8]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(value) = serde_json::from_slice::<T>(bytes) {
        round_trips(&value)?;
    }
    Ok(())
}

fn decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    decodes_stably::<Request>(bytes)?;
    decodes_stably::<Chunk>(bytes)?;
    decodes_stably::<Annotated<Chunk>>(bytes)?;
    decodes_stably::<EngineError>(bytes)?;
    decodes_stably::<TraceLink>(bytes)?;
    decodes_stably::<FinishReason>(bytes)?;
    decodes_stably::<Mode>(bytes)?;
    decodes_stably::<ErrorKind>(bytes)?;
    Ok(())
}

/// Strings that look like JSON, to get past the first byte of each decoder.
fn jsonish() -> impl Strategy<Value = String> {
    "[{}\\[\\]\":,0-9a-fA-F_ .eE+-]{0,48}|\\{\"(id|model|token_ids|data|error|kind|message|source|trace_id|span_id|finish_reason|sampling|temperature)\": ?[{}\\[\\]\":,0-9a-z_. -]{0,32}\\}"
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn requests_round_trip(value in request()) {
        round_trips(&value)?;
    }

    #[test]
    fn chunks_round_trip(value in chunk()) {
        round_trips(&value)?;
    }

    #[test]
    fn annotated_chunks_round_trip(value in annotated()) {
        round_trips(&value)?;
    }

    #[test]
    fn engine_errors_round_trip_with_their_cause_chain(value in engine_error()) {
        round_trips(&value)?;
        let mut depth = 0;
        let mut cur = Some(&value);
        while let Some(e) = cur {
            depth += 1;
            cur = e.cause();
        }
        let back: EngineError = serde_json::from_str(&serde_json::to_string(&value).unwrap()).unwrap();
        let mut back_depth = 0;
        let mut cur = Some(&back);
        while let Some(e) = cur {
            back_depth += 1;
            cur = e.cause();
        }
        prop_assert_eq!(depth, back_depth);
    }

    #[test]
    fn trace_links_round_trip(value in trace_link()) {
        round_trips(&value)?;
        prop_assert_eq!(TraceLink::parse(&value.trace_id_hex(), &value.span_id_hex()), Ok(value));
    }

    #[test]
    fn finish_reasons_round_trip(value in finish_reason()) {
        round_trips(&value)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        decode_all(&bytes)?;
    }

    #[test]
    fn json_like_strings_never_panic_the_decoders(s in jsonish()) {
        decode_all(s.as_bytes())?;
    }

    #[test]
    fn mutated_encodings_never_panic_the_decoders(
        value in annotated(),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        truncate in any::<prop::sample::Index>(),
    ) {
        let mut bytes = serde_json::to_vec(&value).unwrap();
        for (at, b) in cuts {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        decode_all(&bytes)?;
        let keep = truncate.index(bytes.len() + 1);
        decode_all(&bytes[..keep])?;
    }

    #[test]
    fn arbitrary_strings_never_panic_the_parsers(a in any::<String>(), b in any::<String>()) {
        let _ = TraceLink::parse(&a, &b);
        let _ = Mode::from_str(&a);
        let _ = ErrorKind::from_str(&a);
        decode_all(a.as_bytes())?;
    }

    #[test]
    fn hex_like_ids_parse_or_fail_cleanly(a in "[0-9a-fA-F]{30,34}", b in "[0-9a-gA-G]{14,18}") {
        if let Ok(link) = TraceLink::parse(&a, &b) {
            prop_assert_eq!(link.trace_id_hex(), a);
            prop_assert_eq!(link.span_id_hex(), b);
        }
    }
}

// ---------------------------------------------------------------------------------
// The real adapter, scripted.

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn scripted_streams_keep_every_rule(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        script::quiet_scripted_panics();
        let s = script::Script::from_bytes(&bytes);
        if let Err(e) = script::run(&s) {
            prop_assert!(false, "{e}\nscript: {s:?}");
        }
    }
}

/// The byte decoding reaches every kind of ending, and both aborted and not: a guard
/// against a harness that silently checks nothing.
#[test]
fn scripted_runs_cover_every_outcome() {
    script::quiet_scripted_panics();
    let mut seen = std::collections::BTreeSet::new();
    let mut aborted = [false; 2];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..4000 {
        let bytes: Vec<u8> = (0..48)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let s = script::Script::from_bytes(&bytes);
        let summary = script::run(&s).unwrap_or_else(|e| panic!("{e}\nscript: {s:?}"));
        seen.insert(summary.outcome);
        aborted[usize::from(summary.aborted)] = true;
    }
    for label in ["finished", "cancelled", "failed", "dropped", "timed_out"] {
        assert!(seen.contains(label), "no run ended {label}: {seen:?}");
    }
    assert_eq!(aborted, [true, true]);
}

/// Hand-written scripts for the paths the rules single out.
#[test]
fn scripted_regressions() {
    use script::{EngineStep as E, Op, Script};
    script::quiet_scripted_panics();
    let base = Script {
        mode: Mode::Aggregated,
        ttft: None,
        itl: None,
        grace: None,
        setup_error: None,
        engine: vec![],
        ops: vec![],
    };
    let cases = [
        // Happy path: no abort, no task.
        Script {
            engine: vec![E::Tokenless, E::Tokens(2), E::Terminal(FinishReason::Eos)],
            ops: vec![Op::Poll; 5],
            ..base.clone()
        },
        // Decode: kill before the first token, the hint releases the abort later.
        Script {
            mode: Mode::Decode,
            engine: vec![E::Pending],
            ops: vec![
                Op::Poll,
                Op::Kill,
                Op::Poll,
                Op::Poll,
                Op::Hint,
                Op::RunSpawned,
            ],
            ..base.clone()
        },
        // Decode: kill before the first token, the deadline releases it.
        Script {
            mode: Mode::Decode,
            ops: vec![Op::Poll, Op::Kill, Op::Poll, Op::Advance(script::DEFERRAL)],
            ..base.clone()
        },
        // Decode: stop, then the deferral deadline on the poller's own timer.
        Script {
            mode: Mode::Decode,
            ops: vec![Op::Stop, Op::Poll, Op::Advance(script::DEFERRAL), Op::Poll],
            ..base.clone()
        },
        // Stop, the engine ends without a terminal: a synthesized Cancelled.
        Script {
            engine: vec![E::Tokens(1), E::Pending, E::End],
            ops: vec![Op::Poll, Op::Poll, Op::Stop, Op::Poll, Op::Poll],
            ..base.clone()
        },
        // Stop, the grace expires: forced like a kill.
        Script {
            grace: Some(script::GRACE),
            engine: vec![E::Tokens(1)],
            ops: vec![
                Op::Poll,
                Op::Stop,
                Op::Poll,
                Op::Advance(script::GRACE),
                Op::Poll,
            ],
            ..base.clone()
        },
        // First-token and inter-token timeouts.
        Script {
            ttft: Some(script::TTFT),
            ops: vec![Op::Poll, Op::Advance(script::TTFT), Op::Poll, Op::Poll],
            ..base.clone()
        },
        Script {
            itl: Some(script::ITL),
            engine: vec![E::Tokens(3)],
            ops: vec![Op::Poll, Op::Poll, Op::Advance(script::ITL), Op::Poll],
            ..base.clone()
        },
        // A panic, an error, an incomplete stream.
        Script {
            engine: vec![E::Tokens(1), E::Panic],
            ops: vec![Op::Poll; 3],
            ..base.clone()
        },
        Script {
            engine: vec![E::Error(ErrorKind::ResourceExhausted)],
            ops: vec![Op::Poll; 2],
            ..base.clone()
        },
        Script {
            engine: vec![E::End],
            ops: vec![Op::Poll; 2],
            ..base.clone()
        },
        // Drop mid-stream; drop in decode before the first token (no abort).
        Script {
            engine: vec![E::Tokens(1)],
            ops: vec![Op::Poll, Op::Drop],
            ..base.clone()
        },
        Script {
            mode: Mode::Decode,
            ops: vec![Op::Poll, Op::Stop, Op::Drop, Op::Hint],
            ..base.clone()
        },
        // The engine's own hint releases a deferred stop.
        Script {
            mode: Mode::Decode,
            engine: vec![E::Pending, E::Hint, E::Tokenless],
            ops: vec![Op::Stop, Op::Poll, Op::Poll, Op::Poll],
            ..base.clone()
        },
        // A setup error.
        Script {
            setup_error: Some(ErrorKind::Unavailable),
            ..base.clone()
        },
    ];
    for s in &cases {
        if let Err(e) = script::run(s) {
            panic!("{e}\nscript: {s:?}");
        }
    }
}

/// The committed fuzz seeds (fuzz/seeds/<target>/) pass the same oracles here, so a
/// regression shows up without a fuzzer.
#[test]
fn fuzz_seeds_pass() {
    script::quiet_scripted_panics();
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let files = |target: &str| -> Vec<(String, Vec<u8>)> {
        let Ok(dir) = std::fs::read_dir(seeds.join(target)) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .map(|e| {
                (
                    e.path().display().to_string(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    };
    for (name, bytes) in files("lifecycle") {
        let (mode, events) =
            bytes
                .split_first()
                .map_or((Mode::Aggregated, &[][..]), |(m, rest)| {
                    let mode = [Mode::Aggregated, Mode::Prefill, Mode::Decode][usize::from(*m) % 3];
                    (mode, rest)
                });
        let events: Vec<Event> = events
            .iter()
            .map(|&b| Event::ALL[usize::from(b) % Event::ALL.len()])
            .collect();
        check_sequence(mode, &events).unwrap_or_else(|v| panic!("{name}: {v}"));
    }
    for (name, bytes) in files("stream") {
        let s = script::Script::from_bytes(&bytes);
        script::run(&s).unwrap_or_else(|e| panic!("{name}: {e}\nscript: {s:?}"));
    }
    for (name, bytes) in files("protocol_json") {
        decode_all(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
