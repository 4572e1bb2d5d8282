//! Drive the adapter on an executor tether has no shim for (`futures::executor`), using
//! only the `Runtime` trait: "any async runtime" is a few lines of glue, not a port.
//!
//! The runtime here is deliberately naive: a spawned task gets a thread that runs it with
//! `block_on`, and a timer is a thread that sleeps until its deadline (re-reading it after
//! a `reset`). tether spawns only when an abort is due and creates at most one timer per
//! request, only when a deadline is configured, so this is enough.
//!
//! It first checks the runtime with `run_runtime_conformance` (and exits non-zero if it
//! breaks the contract), then drives two requests through the adapter.
//!
//! Run: `cargo run -p tether-tests --example third_executor`

use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use futures::executor::block_on;
use futures::StreamExt;
use tether_core::drive::{AsyncTimer, SpawnFuture};
use tether_core::engine::BoxFuture;
use tether_core::{
    run_runtime_conformance, Adapter, AdapterConfig, Chunk, ChunkStream, Context, EngineConfig,
    EngineError, FinishReason, GenerateContext, LlmEngine, Request, Runtime,
};

/// Tasks on threads, timers on threads, the system clock.
#[derive(Debug, Clone, Copy)]
struct ThreadRuntime;

impl Runtime for ThreadRuntime {
    fn spawn(&self, future: SpawnFuture) {
        std::thread::spawn(move || block_on(future));
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(ThreadTimer::new(deadline))
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[derive(Debug, Default)]
struct TimerState {
    deadline: Option<Instant>,
    waker: Option<Waker>,
    fired: bool,
    dropped: bool,
}

/// One sleeper thread per timer; `reset` moves its deadline in place.
#[derive(Debug)]
struct ThreadTimer {
    shared: Arc<(Mutex<TimerState>, Condvar)>,
}

impl ThreadTimer {
    fn new(deadline: Instant) -> ThreadTimer {
        let shared = Arc::new((
            Mutex::new(TimerState {
                deadline: Some(deadline),
                ..TimerState::default()
            }),
            Condvar::new(),
        ));
        let sleeper = shared.clone();
        std::thread::spawn(move || {
            let (lock, cvar) = &*sleeper;
            let mut st = lock.lock().expect("timer lock");
            loop {
                if st.dropped {
                    return;
                }
                match st.deadline {
                    Some(at) if !st.fired => {
                        let now = Instant::now();
                        if now >= at {
                            st.fired = true;
                            if let Some(w) = st.waker.take() {
                                w.wake();
                            }
                        } else {
                            st = cvar.wait_timeout(st, at - now).expect("timer lock").0;
                        }
                    }
                    _ => st = cvar.wait(st).expect("timer lock"),
                }
            }
        });
        ThreadTimer { shared }
    }
}

impl AsyncTimer for ThreadTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let (lock, cvar) = &*self.shared;
        let mut st = lock.lock().expect("timer lock");
        st.deadline = Some(deadline);
        st.fired = false;
        cvar.notify_one();
    }

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let mut st = self.shared.0.lock().expect("timer lock");
        if st.fired {
            Poll::Ready(())
        } else {
            st.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.shared;
        lock.lock().expect("timer lock").dropped = true;
        cvar.notify_one();
    }
}

/// An engine that yields a token every 5 ms until it is told to stop (or 50 tokens).
struct Ticker {
    aborts: Arc<Mutex<u32>>,
}

impl LlmEngine for Ticker {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move { Ok(EngineConfig::new("ticker", worker_id)) })
    }

    fn generate(
        &self,
        _request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async move {
            let ticks = futures::stream::unfold(0u32, move |n| {
                let context = context.clone();
                async move {
                    if n == 50 {
                        return None;
                    }
                    let timer =
                        ThreadRuntime.sleep_until(Instant::now() + Duration::from_millis(5));
                    TimerFuture(timer).await;
                    let chunk = if context.is_stopped() {
                        Chunk::terminal(FinishReason::Cancelled)
                    } else if n == 49 {
                        Chunk::terminal(FinishReason::Length)
                    } else {
                        Chunk::tokens(vec![n])
                    };
                    let next = if chunk.is_terminal() { 50 } else { n + 1 };
                    Some((Ok(chunk), next))
                }
            });
            Ok(Box::pin(ticks) as ChunkStream)
        })
    }

    fn abort(&self, _context: GenerateContext) -> BoxFuture<'_, ()> {
        let aborts = self.aborts.clone();
        Box::pin(async move { *aborts.lock().expect("abort count") += 1 })
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

/// An `AsyncTimer` as a future (for the engine's own pacing).
struct TimerFuture(Pin<Box<dyn AsyncTimer>>);

impl std::future::Future for TimerFuture {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

fn main() {
    // The glue first: a runtime that breaks the timer or spawn contract would make the
    // requests below fail (or pass) for the wrong reason.
    let started = Instant::now();
    let report = match block_on(run_runtime_conformance(&ThreadRuntime)) {
        Ok(report) => report,
        Err(failure) => panic!("ThreadRuntime breaks the runtime contract: {failure}"),
    };
    println!(
        "third executor (futures::executor): runtime contract, {} checks passed in {:?}",
        report.checks,
        started.elapsed()
    );

    let aborts = Arc::new(Mutex::new(0));
    let engine = Arc::new(Ticker {
        aborts: aborts.clone(),
    });
    let adapter = Adapter::new(
        engine,
        ThreadRuntime,
        AdapterConfig::default().first_token_timeout(Some(Duration::from_secs(5))),
    );

    // A request that runs to its end: 49 tokens, then `Length`, no abort.
    let finished = block_on(async {
        let mut s = adapter
            .generate(Request::new("a", "ticker", vec![1]), Context::new("a"))
            .await
            .expect("generate");
        let mut items = Vec::new();
        while let Some(item) = s.next().await {
            items.push(item);
        }
        items
    });
    let last = finished.last().and_then(|i| i.data.clone());
    assert_eq!(finished.len(), 50);
    assert_eq!(
        last.and_then(|c| c.finish_reason),
        Some(FinishReason::Length)
    );

    // A request killed from another thread after 3 tokens: a synthesized `Cancelled`
    // terminal, and the engine's abort called exactly once (on a spawned thread).
    let context = Context::new("b");
    let killed = block_on(async {
        let mut s = adapter
            .generate(Request::new("b", "ticker", vec![1]), context.clone())
            .await
            .expect("generate");
        let mut items = Vec::new();
        while let Some(item) = s.next().await {
            if items.len() == 2 {
                let ctx = context.clone();
                std::thread::spawn(move || ctx.kill())
                    .join()
                    .expect("killer");
            }
            items.push(item);
        }
        items
    });
    let reason = killed
        .last()
        .and_then(|i| i.data.clone())
        .and_then(|c| c.finish_reason);
    assert_eq!(reason, Some(FinishReason::Cancelled));
    // The abort runs on its own thread: wait for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    while *aborts.lock().expect("abort count") == 0 && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(*aborts.lock().expect("abort count"), 1);
    println!(
        "third executor (futures::executor): finished with {} items; killed after {} items with Cancelled; aborts: 1",
        finished.len(),
        killed.len()
    );
}
