//! # tether-engines
//!
//! Engines that tether drives: [`SimEngine`], a continuous-batching simulator with
//! chaos hooks, for tests, the conformance kit and `tether load`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod sim;

pub use sim::{
    AbortHook, AbortReceipt, Chaos, ChaosParseError, SimConfig, SimConfigError, SimEngine,
    SimGauges,
};
