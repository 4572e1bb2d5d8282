//! # tether-core
//!
//! The request-lifecycle layer between an LLM inference engine and whatever serves
//! it. This crate owns no runtime, no clock and no I/O:
//!
//! - [`protocol`] and [`error`]: the wire types an engine produces and a frontend consumes;
//! - [`context`]: the cancellation handle ([`Context`]) shared by client, router and engine;
//! - [`lifecycle`]: the pure transition function that decides, for every event, what
//!   must happen (forward, abort, synthesize a terminal, record the outcome);
//! - [`engine`]: the object-safe [`LlmEngine`] trait engines implement;
//! - [`drive`]: the executor-agnostic [`Adapter`] that runs the machine over an
//!   engine stream on any [`Runtime`], and [`run_runtime_conformance`], which checks a
//!   [`Runtime`] against the timer and spawn contract the driver relies on;
//! - [`conformance`]: a kit that checks any engine against the contract.
//!
//! Runtime shims (`tether-tokio`, `tether-smol`) implement [`Runtime`] in a few lines.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod conformance;
pub mod context;
pub mod drive;
pub mod engine;
pub mod error;
#[cfg(any(feature = "internals", tether_loom))]
pub mod lifecycle;
#[cfg(not(any(feature = "internals", tether_loom)))]
mod lifecycle;
pub mod protocol;
#[cfg(any(feature = "internals", tether_loom))]
pub mod sync;
#[cfg(not(any(feature = "internals", tether_loom)))]
mod sync;

pub use context::{Cause, Context};
pub use drive::run_runtime_conformance;
pub use drive::{
    AbortStatus, Adapter, AdapterConfig, AsyncTimer, Generate, Generating, Observer, Outcome,
    RequestRecord, ResponseStream, Results, Runtime,
};
pub use engine::{ChunkStream, EngineConfig, GenerateContext, LlmEngine};
pub use error::{BackendError, EngineError, ErrorKind};
pub use protocol::{
    Annotated, Chunk, FinishReason, Mode, Request, SamplingOptions, StopConditions, TraceLink,
    Usage,
};
