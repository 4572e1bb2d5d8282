//! Runs bench bodies on each executor ([`Flavor`]): a tokio current-thread runtime, a
//! tokio multi-thread runtime (as many workers as cores), and a smol executor driven
//! by the bench thread. Also the [`Spawner`] the baseline uses, with an optional
//! [`TaskCount`] so a bench can wait until the tasks it caused have run.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_lite::future::yield_now;
use tether_core::drive::{Adapter, AdapterConfig, Runtime};
use tether_core::engine::LlmEngine;
use tether_smol::SmolRuntime;
use tether_tokio::TokioRuntime;

/// The executors every bench runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// tokio, `new_current_thread`.
    TokioCt,
    /// tokio, `new_multi_thread` with one worker per core.
    TokioMt,
    /// A `smol::Executor` run by the bench thread (`block_on(ex.run(..))`).
    Smol,
}

impl Flavor {
    /// All flavors, in report order.
    pub const ALL: [Flavor; 3] = [Flavor::TokioCt, Flavor::TokioMt, Flavor::Smol];

    /// The name used in bench ids and reports.
    pub fn name(self) -> &'static str {
        match self {
            Flavor::TokioCt => "tokio_ct",
            Flavor::TokioMt => "tokio_mt",
            Flavor::Smol => "smol",
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One executor of a [`Flavor`], ready to run bench bodies.
#[derive(Debug)]
pub struct Harness {
    flavor: Flavor,
    tokio: Option<tokio::runtime::Runtime>,
    smol: Option<Arc<smol::Executor<'static>>>,
}

impl Harness {
    /// Build the executor.
    ///
    /// # Panics
    /// If tokio cannot build its runtime (no threads available).
    pub fn new(flavor: Flavor) -> Harness {
        let tokio = match flavor {
            Flavor::TokioCt => Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("tokio current-thread runtime"),
            ),
            Flavor::TokioMt => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .enable_time()
                    .build()
                    .expect("tokio multi-thread runtime"),
            ),
            Flavor::Smol => None,
        };
        let smol = (flavor == Flavor::Smol).then(|| Arc::new(smol::Executor::new()));
        Harness {
            flavor,
            tokio,
            smol,
        }
    }

    /// Which executor this is.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Run `body` as a task of this executor (on tokio: spawned, so on multi-thread it
    /// runs on a worker like any request handler) and wait for its output.
    ///
    /// # Panics
    /// If `body` panics.
    pub fn block_on<F>(&self, body: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match (&self.tokio, &self.smol) {
            (Some(rt), _) => rt.block_on(rt.spawn(body)).expect("bench task panicked"),
            (None, Some(ex)) => smol::block_on(ex.run(body)),
            (None, None) => unreachable!("a harness has an executor"),
        }
    }

    /// tether's [`Runtime`] for this executor.
    pub fn runtime(&self) -> Arc<dyn Runtime> {
        match (&self.tokio, &self.smol) {
            (Some(rt), _) => Arc::new(TokioRuntime::new(rt.handle().clone())),
            (None, Some(ex)) => Arc::new(SmolRuntime::with_executor(ex.clone())),
            (None, None) => unreachable!("a harness has an executor"),
        }
    }

    /// A tether [`Adapter`] on this executor (the runtime passed by value, as an
    /// application would).
    pub fn adapter(&self, engine: Arc<dyn LlmEngine>, config: AdapterConfig) -> Adapter {
        match (&self.tokio, &self.smol) {
            (Some(rt), _) => Adapter::new(engine, TokioRuntime::new(rt.handle().clone()), config),
            (None, Some(ex)) => {
                Adapter::new(engine, SmolRuntime::with_executor(ex.clone()), config)
            }
            (None, None) => unreachable!("a harness has an executor"),
        }
    }

    /// A spawner for this executor (what the baseline spawns its monitor tasks with).
    pub fn spawner(&self, count: Option<Arc<TaskCount>>) -> Spawner {
        let exec = match (&self.tokio, &self.smol) {
            (Some(rt), _) => Exec::Tokio(rt.handle().clone()),
            (None, Some(ex)) => Exec::Smol(ex.clone()),
            (None, None) => unreachable!("a harness has an executor"),
        };
        Spawner { exec, count }
    }
}

#[derive(Clone, Debug)]
enum Exec {
    Tokio(tokio::runtime::Handle),
    Smol(Arc<smol::Executor<'static>>),
}

/// Spawns detached tasks with the future unboxed, as `tokio::spawn` does in the
/// reference design; counts them in a [`TaskCount`] when it has one.
#[derive(Clone, Debug)]
pub struct Spawner {
    exec: Exec,
    count: Option<Arc<TaskCount>>,
}

impl Spawner {
    /// Spawn `task` detached.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.count {
            None => self.spawn_raw(task),
            Some(count) => {
                let live = Live::new(count.clone());
                self.spawn_raw(async move {
                    live.started();
                    task.await;
                    drop(live);
                });
            }
        }
    }

    fn spawn_raw<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.exec {
            Exec::Tokio(handle) => drop(handle.spawn(task)),
            Exec::Smol(ex) => ex.spawn(task).detach(),
        }
    }
}

/// How many counted tasks were spawned, have started, and are still alive.
#[derive(Debug, Default)]
pub struct TaskCount {
    started: AtomicUsize,
    live: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl TaskCount {
    /// A fresh counter.
    pub fn new() -> Arc<TaskCount> {
        Arc::new(TaskCount::default())
    }

    /// Tasks polled at least once since the last [`reset_started`](Self::reset_started).
    pub fn started(&self) -> usize {
        // Relaxed: a statistic read after the bench waited; nothing is published by it.
        self.started.load(Ordering::Relaxed)
    }

    /// Start counting first polls from zero.
    pub fn reset_started(&self) {
        self.started.store(0, Ordering::Relaxed);
    }

    /// Wait until every counted task has ended.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            // Acquire: pairs with the AcqRel decrement of the last task.
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Wait (yielding) until `n` counted tasks have started.
    pub async fn wait_started(&self, n: usize) {
        while self.started() < n {
            yield_now().await;
        }
    }
}

/// One counted task: live from spawn to drop.
struct Live(Arc<TaskCount>);

impl Live {
    fn new(count: Arc<TaskCount>) -> Live {
        count.live.fetch_add(1, Ordering::Relaxed);
        Live(count)
    }

    fn started(&self) {
        self.0.started.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // AcqRel: publishes the task's work to `wait_idle`.
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}
