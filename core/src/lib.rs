//! # tether-core
//!
//! The request-lifecycle layer between an LLM inference engine and whatever serves
//! it. This crate owns no runtime, no clock and no I/O.
//!
//! ## The public surface
//!
//! - Running requests ([`drive`]): [`Adapter`] (`new`, `start`, `cleanup`, `generate`,
//!   `request`), its [`AdapterConfig`], the per-request builder [`Generate`] and its
//!   future [`Generating`], the consumer's [`ResponseStream`] (`finish`, `record`,
//!   `attach`, `set_kill_on_drop`, `context`, `results` → [`Results`]), what a request
//!   reports ([`Observer`], [`RequestRecord`], [`Outcome`], [`AbortStatus`],
//!   [`drive::ItlStats`]), the [`Runtime`] and [`AsyncTimer`] traits a runtime shim
//!   implements, [`run_runtime_conformance`], [`drive::CountingRuntime`] and
//!   [`drive::ProbeAdapter`] with its [`drive::Canary`], the [`TraceIdHook`] that names
//!   a request's distributed trace. With feature `tower`, [`Adapter`] is a
//!   `tower::Service<Request>`.
//! - Cancellation ([`context`]): [`Context`] and its [`Cause`].
//! - Engines ([`engine`]): [`LlmEngine`], [`GenerateContext`] (with the caller's
//!   [`Metadata`]), [`EngineConfig`], [`ChunkStream`].
//! - Logs: `tracing` events of target `tether` ([`drive::LOG_TARGET`]), one span per
//!   request of target `request_span` ([`drive::SPAN_TARGET`]).
//! - Wire types ([`protocol`], [`error`]): [`Request`], [`Chunk`], [`Annotated`],
//!   [`FinishReason`], [`Mode`], [`TraceLink`], [`EngineError`], [`ErrorKind`].
//! - Checking an engine ([`conformance`]).
//!
//! The lifecycle machine that makes every decision (a pure transition function over a
//! small `Copy` state in one atomic word) and the sync facade are internals: public only
//! with the `internals` feature, for tether's own proofs.
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
    RequestRecord, ResponseStream, Results, Runtime, TraceIdHook,
};
pub use engine::{
    ChunkStream, EngineConfig, GenerateContext, LlmEngine, Metadata, SupportedParams,
};
pub use error::{BackendError, EngineError, ErrorKind};
pub use protocol::{
    Annotated, Chunk, FinishReason, Mode, Request, SamplingOptions, StopConditions, TraceLink,
    Usage,
};
