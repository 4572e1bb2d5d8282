//! [`TokioRuntime`]: tether's [`Runtime`] on tokio, and [`adapter`], [`run_conformance`]
//! ([`run_conformance_with`]) and [`run_runtime_conformance`] on the current runtime
//! (panicking outside one).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use pin_project::pin_project;
pub use tether_core::conformance::{ConformanceConfig, ConformanceFailure, ConformanceReport};
use tether_core::drive::{AsyncTimer, SpawnFuture};
pub use tether_core::drive::{RuntimeCheckFailure, RuntimeCheckReport};
pub use tether_core::{Adapter, AdapterConfig, LlmEngine, Runtime};

/// tether's [`Runtime`] on tokio's tasks, timers and clock (paused under `start_paused`).
#[derive(Debug, Clone)]
pub struct TokioRuntime(tokio::runtime::Handle);

impl TokioRuntime {
    /// The runtime of the current tokio context.
    pub fn current() -> TokioRuntime {
        TokioRuntime(tokio::runtime::Handle::current())
    }
    /// The runtime behind `handle`.
    pub fn new(handle: tokio::runtime::Handle) -> TokioRuntime {
        TokioRuntime(handle)
    }
}

impl Runtime for TokioRuntime {
    fn spawn(&self, future: SpawnFuture) {
        // A tokio JoinHandle detaches on drop: the task runs to completion.
        drop(self.0.spawn(future));
    }
    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        // Timers bind to the runtime whose context they are created in.
        let _guard = self.0.enter();
        Box::pin(TokioTimer(tokio::time::sleep_until(deadline.into())))
    }
    fn now(&self) -> Instant {
        // Entered, so a caller off the runtime reads its (paused) clock, not the wall clock.
        let _guard = self.0.enter();
        tokio::time::Instant::now().into_std()
    }
}

#[pin_project]
#[derive(Debug)]
struct TokioTimer(#[pin] tokio::time::Sleep);

impl AsyncTimer for TokioTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.project().0.reset(deadline.into());
    }
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        std::future::Future::poll(self.project().0, cx)
    }
}

/// An [`Adapter`] for `engine` on the current tokio runtime.
pub fn adapter(engine: Arc<dyn LlmEngine>, config: AdapterConfig) -> Adapter {
    Adapter::new(engine, TokioRuntime::current(), config)
}

/// [`run_conformance_on`](tether_core::conformance::run_conformance_on) the current
/// runtime, with the default [`ConformanceConfig`].
///
/// On a paused clock (`#[tokio::test(start_paused = true)]`) the kit's limits cost no
/// real time, but only for an engine that works on this runtime's tasks and timers: a
/// paused clock jumps to the next timer whenever the runtime is idle, and it is idle
/// while an engine computes on its own threads (a real model), so every deadline would
/// fire at once. Check such an engine on a real clock (no `start_paused`).
pub async fn run_conformance(
    factory: impl Fn() -> Arc<dyn LlmEngine> + Send + Sync,
) -> Result<ConformanceReport, ConformanceFailure> {
    run_conformance_with(factory, &ConformanceConfig::default()).await
}

/// [`run_conformance_with`](tether_core::conformance::run_conformance_with) the current
/// runtime and `config` (a real model wants a longer
/// [`start_timeout`](ConformanceConfig::start_timeout)). Mind the paused clock: see
/// [`run_conformance`].
pub async fn run_conformance_with(
    factory: impl Fn() -> Arc<dyn LlmEngine> + Send + Sync,
    config: &ConformanceConfig,
) -> Result<ConformanceReport, ConformanceFailure> {
    let runtime = TokioRuntime::current();
    tether_core::conformance::run_conformance_with(&runtime, &factory, config).await
}

/// [`run_runtime_conformance`](tether_core::run_runtime_conformance) on the current runtime.
pub async fn run_runtime_conformance() -> Result<RuntimeCheckReport, RuntimeCheckFailure> {
    tether_core::run_runtime_conformance(&TokioRuntime::current()).await
}
