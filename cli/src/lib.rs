//! # tether-cli
//!
//! The library behind the `tether` command, so that its jobs can run in-process in
//! tests: [`load`] (the main job: requests with chaos through the adapter against
//! SimEngine or TinyEngine, every invariant checked, leaks proven absent), [`serve`]
//! (an OpenAI-compatible HTTP server over an engine), [`conformance`] (the engine
//! conformance kit on a chosen runtime), [`engine`] (the `--engine`/`--device` choice
//! and the one constructor all three share) and [`runtime`] (building tokio or smol,
//! waiting on its clock).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod conformance;
pub mod engine;
pub mod load;
pub mod runtime;
pub mod serve;

/// Keep the panics SimEngine injects on purpose (`--panic`) off stderr; every other
/// panic still goes to the previous hook. The panic hook is process-wide, so only a
/// binary should call this.
pub fn quiet_chaos_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = tether_core::error::panic_message(info.payload());
        if !tether_engines::sim::is_chaos_panic(message) {
            previous(info);
        }
    }));
}
