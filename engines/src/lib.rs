//! # tether-engines
//!
//! Engines that tether drives: `SimEngine`, a continuous-batching simulator.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
