//! [`SmolRuntime`]: tether's [`Runtime`] on smol and async-io, and [`adapter`],
//! [`run_conformance`] ([`run_conformance_with`]) and [`run_runtime_conformance`] on
//! smol's global executor.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

pub use tether_core::conformance::{ConformanceConfig, ConformanceFailure, ConformanceReport};
use tether_core::drive::{AsyncTimer, SpawnFuture};
pub use tether_core::drive::{RuntimeCheckFailure, RuntimeCheckReport};
pub use tether_core::{Adapter, AdapterConfig, LlmEngine, Runtime};

/// tether's [`Runtime`] on smol: a given executor or the global one, async-io's timers and clock.
#[derive(Debug, Clone, Default)]
pub struct SmolRuntime(Option<Arc<smol::Executor<'static>>>);

impl SmolRuntime {
    /// Spawn onto smol's global executor.
    pub fn global() -> SmolRuntime {
        SmolRuntime(None)
    }
    /// Spawn onto `executor` (which the caller runs).
    pub fn with_executor(executor: Arc<smol::Executor<'static>>) -> SmolRuntime {
        SmolRuntime(Some(executor))
    }
}

impl Runtime for SmolRuntime {
    fn spawn(&self, future: SpawnFuture) {
        // smol's Task cancels on drop: detached, an abort always runs to completion.
        match &self.0 {
            Some(ex) => ex.spawn(future).detach(),
            None => smol::spawn(future).detach(),
        }
    }
    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(SmolTimer(async_io::Timer::at(deadline), deadline))
    }
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// async-io's timer and its deadline, checked first: once fired, a `Timer` pends until reset.
#[derive(Debug)]
struct SmolTimer(async_io::Timer, Instant);

impl AsyncTimer for SmolTimer {
    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        self.1 = deadline;
        self.0.set_at(deadline);
    }
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.1 {
            return Poll::Ready(());
        }
        std::future::Future::poll(Pin::new(&mut self.0), cx).map(drop)
    }
}

/// An [`Adapter`] for `engine` on smol's global executor.
pub fn adapter(engine: Arc<dyn LlmEngine>, config: AdapterConfig) -> Adapter {
    Adapter::new(engine, SmolRuntime::global(), config)
}

/// [`run_conformance_on`](tether_core::conformance::run_conformance_on) smol, with
/// the default [`ConformanceConfig`]. smol's clock is real time, so an engine that
/// computes on its own threads (a real model) is checked as it will run.
pub async fn run_conformance(
    factory: impl Fn() -> Arc<dyn LlmEngine> + Send + Sync,
) -> Result<ConformanceReport, ConformanceFailure> {
    run_conformance_with(factory, &ConformanceConfig::default()).await
}

/// [`run_conformance_with`](tether_core::conformance::run_conformance_with) smol and
/// `config` (a real model wants a longer
/// [`start_timeout`](ConformanceConfig::start_timeout)); real time.
pub async fn run_conformance_with(
    factory: impl Fn() -> Arc<dyn LlmEngine> + Send + Sync,
    config: &ConformanceConfig,
) -> Result<ConformanceReport, ConformanceFailure> {
    let runtime = SmolRuntime::global();
    tether_core::conformance::run_conformance_with(&runtime, &factory, config).await
}

/// [`run_runtime_conformance`](tether_core::run_runtime_conformance) on smol (about 160 ms).
pub async fn run_runtime_conformance() -> Result<RuntimeCheckReport, RuntimeCheckFailure> {
    tether_core::run_runtime_conformance(&SmolRuntime::global()).await
}
