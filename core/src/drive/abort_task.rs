//! The adapter's abort task: where the aborts an adapter decides are carried out.
//!
//! A stop must reach the engine's `abort` at least as fast as the reference design's
//! parked monitor task does, without a task per request on the happy path. Spawning
//! the abort at the stop put a task allocation on the stop's path (tokio: about 1 100
//! instructions, more than the reference design's whole stop). So each adapter starts
//! one task at its first abort and parks it between aborts: a decided abort is queued
//! and the parked task woken, and its next poll enters the engine's `abort`. The task
//! ends once the adapter and every request of it are gone (a queued abort holds its
//! request, which holds the adapter, so no abort is ever queued to a task that ended).
//!
//! An abort that does not finish in its first poll moves on to a task of its own, so a
//! slow abort never holds up the next one. After an abort's first poll, the task starts
//! the cancel clocks the same step started (a stop's grace) and the request's watchdog
//! when one is due: that work is off the stop's path. A panic in the engine's `abort`
//! is logged as engine misbehaviour and does not stop the task.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};

use super::log;
use super::shared::Shared;
use pin_project::pin_project;

use super::watchdog::{Watch, Watchdog};
use super::{AdapterInner, Runtime, SpawnFuture};
use crate::engine::GenerateContext;
use crate::lifecycle::Actions;
use crate::sync::{lock, Arc, Mutex};

/// Aborts run per poll before the task yields to its executor (a killed parent with
/// thousands of children queues thousands at once).
const BUDGET: usize = 64;

/// The queue between the deciders of aborts (any thread) and the adapter's abort task.
#[derive(Default)]
pub(crate) struct AbortQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// The parked task's waker.
    waker: Option<Waker>,
    /// The task took a job and has not come back for the next one yet.
    running_job: bool,
    /// The task was spawned (it stays until `closed`).
    started: bool,
    /// The adapter is gone: the task ends once the queue is empty.
    closed: bool,
}

/// One decided abort: the request, and the step's actions (which clocks it started).
struct Job {
    shared: Arc<Shared>,
    acts: Actions,
}

impl AbortQueue {
    /// Queue the abort `acts` decided for `shared`'s request and wake the abort task,
    /// spawning it on `runtime` the first time.
    pub(crate) fn push(
        this: &Arc<AbortQueue>,
        runtime: &dyn Runtime,
        shared: &Arc<Shared>,
        acts: Actions,
    ) {
        let (spawn, waker) = {
            let mut state = lock(&this.state);
            state.jobs.push_back(Job {
                shared: shared.clone(),
                acts,
            });
            let spawn = !state.started;
            state.started = true;
            (spawn, state.waker.take())
        };
        if spawn {
            // Outside the lock: a runtime may poll the task inline.
            runtime.spawn(Box::pin(AbortTask::new(this.clone(), call_abort)));
        } else if let Some(waker) = waker {
            waker.wake();
        }
        // Otherwise the task is running, or spawned and not yet polled: it looks at the
        // queue before it parks, under the lock.
    }

    /// The adapter is gone: let the task end (at once if it is parked).
    pub(crate) fn close(&self) {
        let waker = {
            let mut state = lock(&self.state);
            state.closed = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether the abort task was started (and the adapter still exists).
    pub(crate) fn started(&self) -> bool {
        lock(&self.state).started
    }

    /// Aborts queued or being carried out.
    pub(crate) fn unfinished(&self) -> usize {
        let state = lock(&self.state);
        state.jobs.len() + usize::from(state.running_job)
    }
}

/// The engine's abort of one request, as a future that owns what it borrows.
async fn call_abort(adapter: Arc<AdapterInner>, ctx: GenerateContext) {
    adapter.engine.abort(ctx).await;
}

/// The adapter's abort task. `F` is [`call_abort`]'s future (a type with no name).
struct AbortTask<F> {
    queue: Arc<AbortQueue>,
    call: fn(Arc<AdapterInner>, GenerateContext) -> F,
    /// The allocation of the last abort that finished in its first poll, reused for
    /// the next one (a finished `async fn` future holds nothing, not even its adapter).
    spare: Option<Pin<Box<F>>>,
}

impl<F: Future<Output = ()> + Send + 'static> AbortTask<F> {
    fn new(queue: Arc<AbortQueue>, call: fn(Arc<AdapterInner>, GenerateContext) -> F) -> Self {
        AbortTask {
            queue,
            call,
            spare: None,
        }
    }

    /// Carry out one abort: enter the engine's `abort` (its first poll, here), then
    /// start the clocks the step started and the watchdog if one is due.
    fn run(&mut self, job: Job, cx: &mut TaskContext<'_>) {
        let Job { shared, acts } = job;
        let fresh = (self.call)(shared.adapter.clone(), Shared::generate_context(&shared));
        let mut abort = match self.spare.take() {
            Some(mut spare) => {
                spare.as_mut().set(fresh);
                spare
            }
            None => Box::pin(fresh),
        };
        let unfinished: Option<SpawnFuture> = match poll_abort(abort.as_mut(), cx, Some(&shared)) {
            Some(Poll::Ready(())) => {
                self.spare = Some(abort);
                None
            }
            Some(Poll::Pending) => Some(abort),
            None => {
                // Dropping what panicked may panic again: nothing of it is kept.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(abort)));
                None
            }
        };
        // The cancel clocks this step started (a stop's grace), timed by the request's
        // watchdog: started here when none runs yet, woken when one does. A running
        // watchdog waiting on this abort's deadline, or draining for it, is done: it
        // is woken either way.
        let watchdog = match Shared::record_clocks(&shared, acts, None) {
            Watch::Spawn => Some(Watchdog::new(shared.clone())),
            Watch::Wake(waker) => {
                waker.wake();
                None
            }
            Watch::Nothing => {
                Shared::wake_watchdog(&shared);
                None
            }
        };
        let runtime = &*shared.adapter.runtime;
        match (unfinished, watchdog) {
            // An unfinished abort moves to a task of its own; the watchdog rides along.
            (Some(abort), Some(watchdog)) => {
                runtime.spawn(Box::pin(AbortAndWatch::new(abort, watchdog)));
            }
            (Some(abort), None) => runtime.spawn(abort),
            (None, Some(watchdog)) => runtime.spawn(Box::pin(watchdog)),
            (None, None) => {}
        }
    }
}

impl<F: Future<Output = ()> + Send + 'static> Future for AbortTask<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        for _ in 0..BUDGET {
            // Take the next job, or park under the lock: a job queued after this look
            // finds the waker and wakes us.
            let job = {
                let mut state = lock(&this.queue.state);
                let job = state.jobs.pop_front();
                state.running_job = job.is_some();
                match job {
                    Some(job) => job,
                    None if state.closed => return Poll::Ready(()),
                    None => {
                        if !state
                            .waker
                            .as_ref()
                            .is_some_and(|w| w.will_wake(cx.waker()))
                        {
                            state.waker = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                }
            };
            this.run(job, cx);
        }
        // Let the executor run others; the queue is looked at again right away.
        lock(&this.queue.state).running_job = false;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Poll an engine's abort once, catching a panic: `None` if it panicked (logged as
/// engine misbehaviour for `shared`'s request when given; the caller drops it, itself
/// under `catch_unwind`).
fn poll_abort<F: Future<Output = ()> + ?Sized>(
    abort: Pin<&mut F>,
    cx: &mut TaskContext<'_>,
    shared: Option<&Shared>,
) -> Option<Poll<()>> {
    match catch_unwind(AssertUnwindSafe(|| abort.poll(cx))) {
        Ok(polled) => Some(polled),
        Err(_) => {
            if let Some(shared) = shared {
                log::engine_misbehaved(shared, "abort panicked");
            }
            None
        }
    }
}

/// An engine's abort that did not finish in its first poll and the request's watchdog
/// in one task: the abort is polled first, then the watchdog; the task ends when both
/// have. An abort that panics is logged as engine misbehaviour and dropped: the
/// watchdog's clocks still run.
#[pin_project]
struct AbortAndWatch<F> {
    #[pin]
    abort: Option<F>,
    watchdog: Option<Watchdog>,
}

impl<F: Future<Output = ()>> AbortAndWatch<F> {
    fn new(abort: F, watchdog: Watchdog) -> Self {
        AbortAndWatch {
            abort: Some(abort),
            watchdog: Some(watchdog),
        }
    }
}

impl<F: Future<Output = ()>> Future for AbortAndWatch<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let mut this = self.project();
        if let Some(abort) = this.abort.as_mut().as_pin_mut() {
            let shared = this.watchdog.as_ref().map(|w| &*w.shared);
            match poll_abort(abort, cx, shared) {
                Some(Poll::Pending) => {}
                Some(Poll::Ready(())) => this.abort.set(None),
                // Dropping what panicked may panic again: nothing of it is kept.
                None => drop(catch_unwind(AssertUnwindSafe(|| this.abort.set(None)))),
            }
        }
        if let Some(watchdog) = this.watchdog.as_mut() {
            if Pin::new(watchdog).poll(cx).is_ready() {
                *this.watchdog = None;
            }
        }
        if this.abort.is_none() && this.watchdog.is_none() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
