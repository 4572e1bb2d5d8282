//! Which async runtime a command runs on, how to build it, and [`wait_until`], a bounded
//! wait on its clock. (The load job counts spawned tasks with tether-core's
//! [`CountingRuntime`](tether_core::drive::CountingRuntime).)
//!
//! Owns runtime construction; nothing here knows about requests.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tether_core::drive::AsyncTimer;
use tether_core::Runtime;

/// The async runtimes tether ships shims for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// tokio's multi-threaded runtime.
    #[default]
    Tokio,
    /// smol's executor, run on as many threads.
    Smol,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuntimeKind::Tokio => "tokio",
            RuntimeKind::Smol => "smol",
        })
    }
}

/// Build a `kind` runtime with `threads` worker threads and run the future `make`
/// returns for the runtime's [`Runtime`] handle to completion.
pub fn block_on<T, F, Fut>(kind: RuntimeKind, threads: usize, make: F) -> std::io::Result<T>
where
    F: FnOnce(Arc<dyn Runtime>) -> Fut,
    Fut: Future<Output = T>,
{
    let threads = threads.max(1);
    match kind {
        RuntimeKind::Tokio => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_time()
                .build()?;
            let handle: Arc<dyn Runtime> =
                Arc::new(tether_tokio::TokioRuntime::new(rt.handle().clone()));
            let out = rt.block_on(make(handle));
            // Anything still running now is a leak the caller already reported.
            rt.shutdown_timeout(Duration::from_secs(1));
            Ok(out)
        }
        RuntimeKind::Smol => {
            let ex = Arc::new(smol::Executor::new());
            let (stop, stopped) = smol::channel::unbounded::<()>();
            let mut workers = Vec::with_capacity(threads.saturating_sub(1));
            for n in 1..threads {
                let ex = ex.clone();
                let stopped = stopped.clone();
                let worker = std::thread::Builder::new()
                    .name(format!("smol-{n}"))
                    .spawn(move || smol::block_on(ex.run(stopped.recv())))?;
                workers.push(worker);
            }
            let handle: Arc<dyn Runtime> =
                Arc::new(tether_smol::SmolRuntime::with_executor(ex.clone()));
            let out = smol::block_on(ex.run(make(handle)));
            stop.close();
            for w in workers {
                let _ = w.join();
            }
            Ok(out)
        }
    }
}

/// The number of threads to use by default: the machine's parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

/// Wait on `runtime`'s timer, polling `done` every millisecond, until it holds or
/// `limit` passed; returns whether it holds.
pub async fn wait_until(
    runtime: &dyn Runtime,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let start = runtime.now();
    let deadline = start.checked_add(limit).unwrap_or(start);
    let mut timer: Option<Pin<Box<dyn AsyncTimer>>> = None;
    loop {
        if done() {
            return true;
        }
        let now = runtime.now();
        if now >= deadline {
            return false;
        }
        let next = now
            .checked_add(Duration::from_millis(1))
            .unwrap_or(deadline)
            .min(deadline);
        let t = match &mut timer {
            Some(t) => {
                t.as_mut().reset(next);
                t
            }
            None => timer.insert(runtime.sleep_until(next)),
        };
        std::future::poll_fn(|cx| t.as_mut().poll(cx)).await;
    }
}
