//! # tether-tokio
//!
//! [`TokioRuntime`]: tether's [`Runtime`] for tokio. Nothing else of substance lives
//! here; the driver is in `tether-core`.
//!
//! ```no_run
//! # async fn demo(engine: std::sync::Arc<dyn tether_core::LlmEngine>) {
//! let adapter = tether_tokio::adapter(engine, tether_core::AdapterConfig::default());
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use pin_project::pin_project;
use tether_core::drive::{AsyncTimer, SpawnFuture};
use tether_core::LlmEngine;
pub use tether_core::{Adapter, AdapterConfig, Runtime};

/// tether's [`Runtime`] on a tokio runtime. Uses tokio's clock, so a paused test clock
/// (`#[tokio::test(start_paused = true)]`) drives every tether deadline.
#[derive(Debug, Clone)]
pub struct TokioRuntime {
    handle: tokio::runtime::Handle,
}

impl TokioRuntime {
    /// The runtime of the current tokio context.
    ///
    /// # Panics
    /// Outside a tokio runtime (as `tokio::runtime::Handle::current` does).
    pub fn current() -> TokioRuntime {
        TokioRuntime::new(tokio::runtime::Handle::current())
    }

    /// The runtime behind `handle`.
    pub fn new(handle: tokio::runtime::Handle) -> TokioRuntime {
        TokioRuntime { handle }
    }
}

impl Runtime for TokioRuntime {
    fn spawn(&self, future: SpawnFuture) {
        // A tokio JoinHandle detaches on drop: the task runs to completion.
        drop(self.handle.spawn(future));
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        // Timers bind to the runtime whose context they are created in.
        let _guard = self.handle.enter();
        Box::pin(TokioTimer {
            sleep: tokio::time::sleep_until(deadline.into()),
        })
    }

    fn now(&self) -> Instant {
        // tokio reads its (possibly paused) clock from the runtime in context; a caller
        // on a foreign thread (a `stop()` from a non-runtime thread) would otherwise get
        // the wall clock, which a paused test clock may be hours ahead of.
        let _guard = self.handle.enter();
        tokio::time::Instant::now().into_std()
    }
}

#[pin_project]
#[derive(Debug)]
struct TokioTimer {
    #[pin]
    sleep: tokio::time::Sleep,
}

impl AsyncTimer for TokioTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.project().sleep.reset(deadline.into());
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        std::future::Future::poll(self.project().sleep, cx)
    }
}

/// An [`Adapter`] for `engine` on the current tokio runtime.
///
/// # Panics
/// Outside a tokio runtime.
pub fn adapter(engine: Arc<dyn LlmEngine>, config: AdapterConfig) -> Adapter {
    Adapter::new(engine, TokioRuntime::current(), config)
}

pub use tether_core::conformance::{ConformanceFailure, ConformanceReport};

/// Run tether's conformance kit ([`tether_core::conformance`]) against engines made by
/// `factory`, on the current tokio runtime. Its 2 s and 30 s limits use tokio's clock,
/// so under a paused test clock they cost no real time.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use tether_core::LlmEngine;
/// # fn make_engine() -> Arc<dyn LlmEngine> { unimplemented!() }
/// # async fn demo() {
/// // In an engine crate: #[tokio::test(start_paused = true)]
/// let report = tether_tokio::run_conformance(make_engine).await.expect("conformant");
/// assert_eq!(report.checks, tether_core::conformance::CHECKS);
/// # }
/// ```
///
/// # Panics
/// Outside a tokio runtime.
pub async fn run_conformance(
    factory: impl Fn() -> Arc<dyn LlmEngine> + Send + Sync,
) -> Result<ConformanceReport, ConformanceFailure> {
    let runtime = TokioRuntime::current();
    tether_core::conformance::run_conformance_on(&runtime, &factory).await
}

pub use tether_core::drive::{RuntimeCheckFailure, RuntimeCheckReport};

/// Check [`TokioRuntime`] on the current tokio runtime against tether's runtime
/// contract ([`tether_core::run_runtime_conformance`]: timers, clock, spawn). Its
/// deadlines use tokio's clock, so under a paused test clock it costs no real time.
///
/// ```no_run
/// # async fn demo() {
/// // In a test: #[tokio::test(start_paused = true)]
/// let report = tether_tokio::run_runtime_conformance().await.expect("conformant");
/// assert_eq!(report.checks, tether_core::drive::RUNTIME_CHECKS);
/// # }
/// ```
///
/// # Panics
/// Outside a tokio runtime.
pub async fn run_runtime_conformance() -> Result<RuntimeCheckReport, RuntimeCheckFailure> {
    tether_core::run_runtime_conformance(&TokioRuntime::current()).await
}
