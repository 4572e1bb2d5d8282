//! # tether-engines
//!
//! Engines that tether drives: [`SimEngine`], a continuous-batching simulator with
//! chaos hooks, for tests, the conformance kit and `tether load`; and [`TinyEngine`], a
//! tiny real transformer (CPU always, CUDA behind the `cuda` feature); and, behind the
//! `llama-cpp` feature, `llama::LlamaCppEngine`, llama.cpp serving a GGUF model.
// deny, not forbid: only `tiny::cuda` (the `cuda` feature's backend) allows it, for its
// kernel launches; nothing else in this crate may use `unsafe`.
#![deny(unsafe_code)]
#![deny(missing_docs)]

mod abort;
mod ends;
pub mod gguf;
#[cfg(feature = "llama-cpp")]
pub mod llama;
pub mod sim;
mod stream;
pub mod tiny;
mod util;

pub use abort::{AbortHook, AbortReceipt};
#[cfg(feature = "llama-cpp")]
pub use llama::{LlamaCppConfig, LlamaCppEngine, LlamaCppGauges, LlamaTokenizer};
pub use sim::{Chaos, ChaosParseError, SimConfig, SimConfigError, SimEngine, SimGauges};
pub use tiny::{Device, TinyConfig, TinyEngine, TinyGauges};
