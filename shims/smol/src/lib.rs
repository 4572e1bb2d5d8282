//! # tether-smol
//!
//! [`SmolRuntime`]: tether's [`Runtime`] for smol and async-io. Nothing else of
//! substance lives here; the driver is in `tether-core`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tether_core::drive::{AsyncTimer, SpawnFuture};
use tether_core::LlmEngine;
pub use tether_core::{Adapter, AdapterConfig, Runtime};

/// tether's [`Runtime`] on smol: tasks go to the given executor (or smol's global
/// one), timers are async-io's. smol's `Task` cancels on drop, so every spawned task
/// is detached here: an abort always runs to completion.
#[derive(Debug, Clone, Default)]
pub struct SmolRuntime {
    executor: Option<Arc<smol::Executor<'static>>>,
}

impl SmolRuntime {
    /// Spawn onto smol's global executor.
    pub fn global() -> SmolRuntime {
        SmolRuntime { executor: None }
    }

    /// Spawn onto `executor` (which the caller runs).
    pub fn with_executor(executor: Arc<smol::Executor<'static>>) -> SmolRuntime {
        SmolRuntime {
            executor: Some(executor),
        }
    }
}

impl Runtime for SmolRuntime {
    fn spawn(&self, future: SpawnFuture) {
        match &self.executor {
            Some(ex) => ex.spawn(future).detach(),
            None => smol::spawn(future).detach(),
        }
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(SmolTimer {
            timer: async_io::Timer::at(deadline),
            deadline,
        })
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// async-io's `Timer::at` is one-shot: once it has fired it is pending forever (and
/// registers no waker) until `set_at`. The contract says a fired timer stays ready
/// until reset, so the deadline is kept here and checked first.
#[derive(Debug)]
struct SmolTimer {
    timer: async_io::Timer,
    deadline: Instant,
}

impl AsyncTimer for SmolTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.get_mut();
        this.deadline = deadline;
        this.timer.set_at(deadline);
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.deadline {
            return Poll::Ready(());
        }
        Pin::new(&mut this.timer).poll(cx).map(|_| ())
    }
}

/// An [`Adapter`] for `engine` on smol's global executor.
pub fn adapter(engine: Arc<dyn LlmEngine>, config: AdapterConfig) -> Adapter {
    Adapter::new(engine, SmolRuntime::global(), config)
}

pub use tether_core::conformance::{ConformanceFailure, ConformanceReport};

/// Run tether's conformance kit ([`tether_core::conformance`]) against engines made by
/// `factory`, with async-io timers (real time: a failing stop check takes its full 2 s).
///
/// ```no_run
/// # use std::sync::Arc;
/// # use tether_core::LlmEngine;
/// # fn make_engine() -> Arc<dyn LlmEngine> { unimplemented!() }
/// let report = smol::block_on(tether_smol::run_conformance(make_engine)).expect("conformant");
/// assert_eq!(report.checks, tether_core::conformance::CHECKS);
/// ```
pub async fn run_conformance(
    factory: impl Fn() -> Arc<dyn LlmEngine> + Send + Sync,
) -> Result<ConformanceReport, ConformanceFailure> {
    tether_core::conformance::run_conformance_on(&SmolRuntime::global(), &factory).await
}

pub use tether_core::drive::{RuntimeCheckFailure, RuntimeCheckReport};

/// Check [`SmolRuntime::global`] against tether's runtime contract
/// ([`tether_core::run_runtime_conformance`]: timers, clock, spawn). async-io timers run
/// on the real clock: a passing run takes about 160 ms.
///
/// ```no_run
/// let report = smol::block_on(tether_smol::run_runtime_conformance()).expect("conformant");
/// assert_eq!(report.checks, tether_core::drive::RUNTIME_CHECKS);
/// ```
pub async fn run_runtime_conformance() -> Result<RuntimeCheckReport, RuntimeCheckFailure> {
    tether_core::run_runtime_conformance(&SmolRuntime::global()).await
}
