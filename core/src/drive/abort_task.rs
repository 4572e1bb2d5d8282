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
//! the cancel clocks the same step started (a stop's grace) and times them itself: one
//! runtime timer per adapter, armed at the earliest grace of a heap of
//! `(deadline, weak request)`, so a stop costs no watchdog task and no timer of its own
//! (a request that already has a watchdog, for a deferred abort, is timed by it). A
//! grace that passes is fed to the request's machine exactly as the watchdog would; one
//! whose request ended is dropped when it comes up, or earlier when the heap grows. A
//! panic in the engine's `abort` is logged as engine misbehaviour and does not stop
//! the task.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Instant;

use super::log;
use super::shared::Shared;
use super::timers::Timer;
use super::watchdog;
use super::{AdapterInner, Runtime};
use crate::engine::GenerateContext;
use crate::lifecycle::deadlines;
use crate::lifecycle::Actions;
use crate::sync::{downgrade, is_dead, lock, upgrade, Arc, Mutex, Weak};

/// Aborts run per poll before the task yields to its executor (a killed parent with
/// thousands of children queues thousands at once).
const BUDGET: usize = 64;

/// The grace heap's size below which ended requests are left until their grace comes
/// up; above it, they are swept out whenever the heap doubled since the last sweep.
const SWEEP_FLOOR: usize = 64;

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
    /// The task took a job and has not parked or yielded since: the abort may still be
    /// running, or its grace not yet on the timer.
    busy: bool,
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

    /// Aborts queued or being carried out (entered, and their graces put on the timer).
    pub(crate) fn unfinished(&self) -> usize {
        let state = lock(&self.state);
        state.jobs.len() + usize::from(state.busy)
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
    /// The graces this task times, earliest first.
    graces: BinaryHeap<Grace>,
    /// Armed at the earliest grace (created at the first, kept afterwards).
    timer: Timer,
    /// The heap's size at which ended requests are next swept out.
    sweep_at: usize,
}

/// A cancel deadline of one request, timed by the abort task. The request is held
/// weakly: its grace does not keep it (or its adapter) alive.
struct Grace {
    at: Instant,
    shared: Weak<Shared>,
}

impl Ord for Grace {
    /// Reversed: `BinaryHeap` is a max-heap, the earliest deadline comes first.
    fn cmp(&self, other: &Grace) -> Ordering {
        other.at.cmp(&self.at)
    }
}

impl PartialOrd for Grace {
    fn partial_cmp(&self, other: &Grace) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Grace {
    fn eq(&self, other: &Grace) -> bool {
        self.at == other.at
    }
}

impl Eq for Grace {}

impl<F: Future<Output = ()> + Send + 'static> AbortTask<F> {
    fn new(queue: Arc<AbortQueue>, call: fn(Arc<AdapterInner>, GenerateContext) -> F) -> Self {
        AbortTask {
            queue,
            call,
            spare: None,
            graces: BinaryHeap::new(),
            timer: Timer::default(),
            sweep_at: SWEEP_FLOOR,
        }
    }

    /// Carry out one abort: enter the engine's `abort` (its first poll, here), then
    /// start the clocks the step started: timed here, unless the request's watchdog
    /// runs (it is woken: it has new anchors, or its deadline or draining is over).
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
        match poll_abort(abort.as_mut(), cx, &shared) {
            Some(Poll::Ready(())) => self.spare = Some(abort),
            // An unfinished abort moves to a task of its own.
            Some(Poll::Pending) => shared.adapter.runtime.spawn(abort),
            None => {
                // Dropping what panicked may panic again: nothing of it is kept.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(abort)));
            }
        }
        // With no watchdog running, the clocks are this task's to time (none is marked
        // started: a later handover of the engine still starts one); a running one
        // gets the new anchors, or its deadline or draining is over: it is woken.
        let timing = Shared::with_clocks(&shared, acts, None, |off| {
            if off.spawned {
                Err(off.waker.clone())
            } else {
                Ok(off.anchors)
            }
        });
        match timing {
            Some(Ok(anchors)) => {
                let next = deadlines::poll_timeout(shared.cell.load(), shared.limits(), &anchors);
                if let Some(at) = next {
                    self.time(at, &shared);
                }
            }
            Some(Err(Some(waker))) => waker.wake(),
            Some(Err(None)) | None => Shared::wake_watchdog(&shared),
        }
    }

    /// Time a cancel deadline of `shared`'s request, at `at`.
    fn time(&mut self, at: Instant, shared: &Arc<Shared>) {
        if self.graces.len() >= self.sweep_at {
            self.graces.retain(|g| !is_dead(&g.shared));
            self.sweep_at = SWEEP_FLOOR.max(2 * self.graces.len());
        }
        self.graces.push(Grace {
            at,
            shared: downgrade(shared),
        });
    }

    /// Fire the graces that passed, then arm the timer at the next one (registering
    /// the task's waker with it).
    fn tend_graces(&mut self, cx: &mut TaskContext<'_>) {
        while let Some(first) = self.graces.peek() {
            let at = first.at;
            let Some(shared) = upgrade(&first.shared) else {
                // The request ended: its grace no longer matters.
                self.graces.pop();
                continue;
            };
            let rt = &*shared.adapter.runtime;
            if !self.timer.poll_until(at, cx, rt) {
                return;
            }
            // The timer fired at its armed deadline, which may be earlier than `at`
            // (the earliest grace ended meanwhile): re-armed on the next turn.
            let now = rt.now();
            if at > now {
                continue;
            }
            self.graces.pop();
            if let Some(next) = fire_due(&shared, now) {
                self.time(next, &shared);
            }
        }
    }
}

/// The request's cancel deadlines at `now`: fire the first that passed, say when the
/// next one that still matters is due (the watchdog's turn, without draining).
fn fire_due(shared: &Arc<Shared>, now: Instant) -> Option<Instant> {
    let anchors = lock(&shared.off).as_ref()?.anchors;
    let limits = shared.limits();
    if let Some(due) = deadlines::handle_timeout(shared.cell.load(), limits, &anchors, now) {
        watchdog::fire(shared, due);
    }
    deadlines::poll_timeout(shared.cell.load(), limits, &anchors)
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
                match state.jobs.pop_front() {
                    Some(job) => {
                        state.busy = true;
                        job
                    }
                    // Every request is gone: so is every grace that mattered.
                    None if state.closed => {
                        state.busy = false;
                        return Poll::Ready(());
                    }
                    None => {
                        if !state
                            .waker
                            .as_ref()
                            .is_some_and(|w| w.will_wake(cx.waker()))
                        {
                            state.waker = Some(cx.waker().clone());
                        }
                        let busy = state.busy;
                        drop(state);
                        // A grace that fires may queue an abort: it finds the waker.
                        this.tend_graces(cx);
                        if busy {
                            // Only now are the aborts' graces on the timer.
                            lock(&this.queue.state).busy = false;
                        }
                        return Poll::Pending;
                    }
                }
            };
            this.run(job, cx);
        }
        // Let the executor run others; the queue is looked at again right away. The
        // graces are tended here too: a flood of aborts that never empties the queue
        // must not hold them back.
        this.tend_graces(cx);
        lock(&this.queue.state).busy = false;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Poll an engine's abort once, catching a panic: `None` if it panicked (logged as
/// engine misbehaviour for `shared`'s request; the caller drops it, itself under
/// `catch_unwind`).
fn poll_abort<F: Future<Output = ()> + ?Sized>(
    abort: Pin<&mut F>,
    cx: &mut TaskContext<'_>,
    shared: &Shared,
) -> Option<Poll<()>> {
    match catch_unwind(AssertUnwindSafe(|| abort.poll(cx))) {
        Ok(polled) => Some(polled),
        Err(_) => {
            log::engine_misbehaved(shared, "abort panicked");
            None
        }
    }
}

#[cfg(all(test, not(tether_loom)))]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::drive::tests::{shared_part, Frozen, Idle};
    use crate::drive::{Adapter, AdapterConfig, AsyncTimer, SpawnFuture};
    use crate::lifecycle::Event;
    use crate::protocol::Mode;

    /// A runtime the test drives: spawned futures are kept for it to poll, the clock
    /// moves when it says, and a timer is ready once the clock reached its deadline.
    #[derive(Clone)]
    struct Manual(std::sync::Arc<ManualState>);

    impl std::fmt::Debug for Manual {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Manual")
        }
    }

    struct ManualState {
        tasks: std::sync::Mutex<Vec<SpawnFuture>>,
        now: std::sync::Mutex<Instant>,
    }

    impl Manual {
        fn new(at: Instant) -> Manual {
            Manual(std::sync::Arc::new(ManualState {
                tasks: std::sync::Mutex::new(Vec::new()),
                now: std::sync::Mutex::new(at),
            }))
        }
        fn set(&self, at: Instant) {
            *self.0.now.lock().unwrap() = at;
        }
        fn take(&self) -> SpawnFuture {
            self.0.tasks.lock().unwrap().remove(0)
        }
    }

    #[derive(Debug)]
    struct ManualTimer {
        rt: Manual,
        deadline: Instant,
    }

    impl AsyncTimer for ManualTimer {
        fn reset(self: Pin<&mut Self>, deadline: Instant) {
            self.get_mut().deadline = deadline;
        }
        fn poll(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<()> {
            if self.rt.now() >= self.deadline {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    impl Runtime for Manual {
        fn spawn(&self, future: SpawnFuture) {
            self.0.tasks.lock().unwrap().push(future);
        }
        fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
            Box::pin(ManualTimer {
                rt: self.clone(),
                deadline,
            })
        }
        fn now(&self) -> Instant {
            *self.0.now.lock().unwrap()
        }
    }

    /// Stop `shared`'s request and queue the abort the stop decided.
    fn stop(shared: &Arc<Shared>) {
        let (_, acts) = shared.cell.apply(Event::Stop);
        assert!(acts.abort && acts.arm_grace);
        AbortQueue::push(
            &shared.adapter.aborts,
            &*shared.adapter.runtime,
            shared,
            acts,
        );
    }

    /// A flood of aborts that fills more than one poll's budget, queued while a grace
    /// passes: the poll that stops at the budget still fires the grace.
    #[test]
    fn a_flood_of_aborts_does_not_hold_back_a_grace() {
        let t0 = Instant::now();
        let rt = Manual::new(t0);
        let grace = Duration::from_secs(1);
        let config = AdapterConfig::default().cancel_grace(Some(grace));
        let adapter = Adapter::new(Arc::new(Idle), rt.clone(), config);
        let waker = Waker::noop();
        let mut cx = TaskContext::from_waker(waker);
        let first = request(&adapter, t0);
        stop(&first);
        let mut task = rt.take();
        assert!(task.as_mut().poll(&mut cx).is_pending());
        assert!(first.cell.load().grace_pending(), "the grace runs");
        let flood: Vec<Arc<Shared>> = (0..2 * BUDGET)
            .map(|_| {
                let shared = request(&adapter, t0);
                stop(&shared);
                shared
            })
            .collect();
        rt.set(t0 + 2 * grace);
        assert!(task.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            adapter.unfinished_aborts(),
            BUDGET,
            "one poll's budget carried out"
        );
        assert!(!first.cell.load().grace_pending(), "the grace fired");
        // The flood's own graces run from their aborts, at the new time.
        assert!(task.as_mut().poll(&mut cx).is_pending());
        assert_eq!(adapter.unfinished_aborts(), 0);
        assert!(flood.iter().all(|s| s.cell.load().grace_pending()));
        rt.set(t0 + 3 * grace);
        assert!(task.as_mut().poll(&mut cx).is_pending());
        assert!(flood.iter().all(|s| !s.cell.load().grace_pending()));
    }

    fn request(adapter: &Adapter, at: Instant) -> Arc<Shared> {
        shared_part(adapter, Mode::Aggregated, at)
    }

    /// Graces of requests that ended stay in the heap until they come up, unless the
    /// heap reaches its sweep size: then only live requests' graces are kept, and the
    /// next sweep waits until the heap doubled (never below the floor).
    #[test]
    fn graces_of_ended_requests_are_swept_once_the_heap_doubled() {
        let t0 = Instant::now();
        let adapter = Adapter::new(Arc::new(Idle), Frozen(t0), AdapterConfig::default());
        let mut task = AbortTask::new(adapter.inner.aborts.clone(), call_abort);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut live: Vec<Arc<Shared>> = Vec::new();
        for i in 0..SWEEP_FLOOR {
            let shared = request(&adapter, t0);
            task.time(at(i as u64), &shared);
            if i % 2 == 0 {
                live.push(shared);
            }
        }
        assert_eq!(
            (task.graces.len(), task.sweep_at),
            (SWEEP_FLOOR, SWEEP_FLOOR)
        );
        // The push that finds the heap at its sweep size sweeps first.
        let kept = request(&adapter, t0);
        task.time(at(1000), &kept);
        live.push(kept);
        assert_eq!(task.graces.len(), SWEEP_FLOOR / 2 + 1);
        assert_eq!(task.sweep_at, SWEEP_FLOOR);
        // Earliest first, live ones only.
        assert_eq!(task.graces.peek().map(|g| g.at), Some(at(0)));
        let mut order = Vec::new();
        while let Some(grace) = task.graces.pop() {
            assert!(upgrade(&grace.shared).is_some());
            order.push(grace.at);
        }
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        // A heap of live graces only: the next sweep is at twice its size.
        for shared in &live {
            task.time(at(1), shared);
        }
        for shared in &live[..SWEEP_FLOOR - live.len()] {
            task.time(at(2), shared);
        }
        assert_eq!(task.graces.len(), SWEEP_FLOOR);
        task.time(at(3), &live[0]);
        assert_eq!(
            (task.graces.len(), task.sweep_at),
            (SWEEP_FLOOR + 1, 2 * SWEEP_FLOOR)
        );
        // Graces compare by deadline alone, the earlier one greater (it comes out first).
        let grace = |s: u64| Grace {
            at: at(s),
            shared: downgrade(&live[0]),
        };
        assert!(grace(1) == grace(1) && grace(1) != grace(2));
        assert!(grace(1) > grace(2) && grace(2) < grace(1));
    }
}
