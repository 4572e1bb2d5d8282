//! An arbitrary engine script (chunks, token-less chunks, terminals, errors, end,
//! pending, panic, hint) interleaved with an arbitrary canceller script (stop, kill,
//! hint, drop, time advance), run through the REAL `Adapter` on a deterministic
//! single-threaded executor with a manual clock. The harness's ghost model checks what
//! the consumer saw and what the engine was told after every op. The harness is the
//! one the property tests use (core/tests/common/script.rs).
#![no_main]

#[path = "../../core/tests/common/script.rs"]
mod script;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The scripted engine panic is expected (the adapter catches it); libFuzzer's hook
    // would abort on it, so it is silenced, and only it.
    script::quiet_scripted_panics();
    let s = script::Script::from_bytes(data);
    if let Err(e) = script::run(&s) {
        panic!("{e}\nscript: {s:?}");
    }
});
