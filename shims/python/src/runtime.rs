//! [`AsyncioRuntime`]: tether's [`Runtime`] on an asyncio event loop, with no tokio and no
//! thread of its own.
//!
//! - `spawn` polls the Rust future from event-loop callbacks. Its waker schedules the
//!   next poll with `loop.call_soon` on the loop's thread and `loop.call_soon_threadsafe`
//!   from any other; wakes between two polls are coalesced into one callback.
//! - `sleep_until` is a timer over `loop.call_at`, resettable in place: a reset to a later
//!   deadline keeps the armed handle (it fires early, sees the new deadline and re-arms
//!   once), so re-arming an inter-token timeout on every chunk calls into Python only
//!   once per timeout period. A reset to an earlier deadline re-arms at once.
//! - `now` maps the loop's own clock (`loop.time()`) onto [`Instant`]s, so a loop with a
//!   virtual clock is a paused test clock, exactly as tokio's `start_paused` is.
//!
//! A loop that is closed while something is still scheduled (`RuntimeError: Event loop is
//! closed`) is not an error here: the task that can no longer run is dropped, quietly.
//!
//! Locking: no Rust lock is ever held across a call into Python, which may release the
//! GIL and run another thread that wants the same lock.

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use tether_core::drive::{AsyncTimer, SpawnFuture};
use tether_core::Runtime;

/// Lock a mutex, ignoring poison: every critical section here leaves its data whole.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How much later than a deadline its `call_at` is armed: float rounding in the mapping
/// between the loop's clock and [`Instant`] can never make a timer wake before `now()`
/// reaches its deadline (which would re-arm at the same instant, forever, on a loop
/// whose virtual clock does not move by itself).
const ARM_MARGIN: f64 = 1e-6;

/// One event loop, as the runtime sees it: the loop, its thread, its clock's anchor and
/// the bound methods called on every schedule (looked up once).
pub(crate) struct Loop {
    event_loop: Py<PyAny>,
    thread: ThreadId,
    call_soon: Py<PyAny>,
    call_soon_threadsafe: Py<PyAny>,
    call_at: Py<PyAny>,
    time: Py<PyAny>,
    /// `now()` reads [`Instant::now`]: the loop's clock is `CLOCK_MONOTONIC` too, either
    /// exactly (asyncio's own `loop.time`, `time.monotonic()`: reading it directly
    /// spares a call into Python) or truncated to milliseconds (uvloop's: reading it
    /// would give TTFT and ITL a 1 ms grain).
    instant_clock: bool,
    /// The loop's clock is uvloop's (see `instant_clock`): its timers can fire up to a
    /// millisecond before an `Instant` deadline, and are re-armed a millisecond later.
    coarse: bool,
    create_future: Py<PyAny>,
    create_task: Py<PyAny>,
    /// Python 3.12+: tasks can start eagerly (`eager_start=True`).
    task_class: Option<Py<PyAny>>,
    /// The same moment on both clocks: `anchor` is `anchor_loop` on the loop's.
    anchor: Instant,
    anchor_loop: f64,
}

impl fmt::Debug for Loop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loop")
            .field("thread", &self.thread)
            .finish_non_exhaustive()
    }
}

impl Loop {
    /// The loop running on this thread (`asyncio.get_running_loop()`): a `RuntimeError`
    /// when there is none.
    pub(crate) fn running(py: Python<'_>) -> PyResult<Arc<Loop>> {
        let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
        Loop::of(&event_loop)
    }

    /// `event_loop`, which runs on this thread.
    pub(crate) fn of(event_loop: &Bound<'_, PyAny>) -> PyResult<Arc<Loop>> {
        let py = event_loop.py();
        let asyncio = py.import("asyncio")?;
        let time = event_loop.getattr("time")?;
        let standard_time = asyncio.getattr("BaseEventLoop")?.getattr("time")?;
        let class = event_loop.get_type();
        let monotonic = class
            .getattr("time")
            .map(|t| t.is(&standard_time))
            .unwrap_or(false);
        let coarse = class
            .getattr("__module__")
            .and_then(|m| m.extract::<String>())
            .is_ok_and(|m| m == "uvloop" || m.starts_with("uvloop."));
        let eager = py.version_info() >= (3, 12);
        let task_class = if eager {
            Some(asyncio.getattr("Task")?.unbind())
        } else {
            None
        };
        // The anchor pair: an `Instant` read between two readings of the loop's clock,
        // the narrowest of three tries (a preemption between two reads would skew every
        // deadline by its length).
        let mut best: Option<(f64, Instant, f64)> = None;
        for _ in 0..3 {
            let before: f64 = time.call0()?.extract()?;
            let instant = Instant::now();
            let after: f64 = time.call0()?.extract()?;
            if best.is_none_or(|(b, _, a)| after - before < a - b) {
                best = Some((before, instant, after));
            }
        }
        let (before, anchor, after) = best.expect("three tries");
        let anchor_loop = before + (after - before) / 2.0;
        Ok(Arc::new(Loop {
            thread: std::thread::current().id(),
            call_soon: event_loop.getattr("call_soon")?.unbind(),
            call_soon_threadsafe: event_loop.getattr("call_soon_threadsafe")?.unbind(),
            call_at: event_loop.getattr("call_at")?.unbind(),
            create_future: event_loop.getattr("create_future")?.unbind(),
            create_task: event_loop.getattr("create_task")?.unbind(),
            task_class,
            instant_clock: monotonic || coarse,
            coarse,
            time: time.unbind(),
            event_loop: event_loop.clone().unbind(),
            anchor,
            anchor_loop,
        }))
    }

    /// Whether `other` is this loop.
    pub(crate) fn is(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> bool {
        self.event_loop.bind(py).is(other)
    }

    /// A new `asyncio.Future` of this loop.
    pub(crate) fn create_future<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.create_future.bind(py).call0()
    }

    /// Run `coroutine` in a new `asyncio.Task` named `name`. On Python 3.12+ the task
    /// starts eagerly: it runs to its first suspension now, in this call (as
    /// `asyncio.eager_task_factory` does), saving a loop iteration per request.
    pub(crate) fn start_task<'py>(
        &self,
        py: Python<'py>,
        coroutine: Bound<'py, PyAny>,
        name: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.start_task_of(py, None, coroutine, name)
    }

    /// [`start_task`](Loop::start_task) with a task class of its own (a subclass of
    /// `asyncio.Task`), or asyncio's when `None`.
    pub(crate) fn start_task_of<'py>(
        &self,
        py: Python<'py>,
        class: Option<&Bound<'py, PyAny>>,
        coroutine: Bound<'py, PyAny>,
        name: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("name", name)?;
        let eager = self.task_class.is_some();
        let class = class
            .cloned()
            .or_else(|| self.task_class.as_ref().map(|task| task.bind(py).clone()));
        let Some(class) = class else {
            return self.create_task.bind(py).call((coroutine,), Some(&kwargs));
        };
        kwargs.set_item("loop", self.event_loop.bind(py))?;
        if eager {
            kwargs.set_item("eager_start", true)?;
        }
        class.call((coroutine,), Some(&kwargs))
    }

    pub(crate) fn on_loop_thread(&self) -> bool {
        std::thread::current().id() == self.thread
    }

    /// Run `callback()` on the loop soon: `call_soon` on its thread,
    /// `call_soon_threadsafe` elsewhere. `Err` when the loop is closed.
    pub(crate) fn call_soon(&self, py: Python<'_>, callback: Bound<'_, PyAny>) -> PyResult<()> {
        let schedule = if self.on_loop_thread() {
            &self.call_soon
        } else {
            &self.call_soon_threadsafe
        };
        schedule.bind(py).call1((callback,)).map(drop)
    }

    /// The loop's clock, as an [`Instant`].
    pub(crate) fn now(&self) -> Instant {
        if self.instant_clock {
            return Instant::now();
        }
        Python::attach(|py| {
            match self.time.bind(py).call0().and_then(|t| t.extract::<f64>()) {
                Ok(t) => self.instant_at(t),
                // `loop.time()` does not fail on any loop we know of; the real clock is
                // the closest stand-in if one ever does.
                Err(_) => Instant::now(),
            }
        })
    }

    fn instant_at(&self, loop_time: f64) -> Instant {
        let since = loop_time - self.anchor_loop;
        if since >= 0.0 {
            let d = Duration::try_from_secs_f64(since).unwrap_or(Duration::MAX);
            self.anchor.checked_add(d).unwrap_or(self.anchor)
        } else {
            let d = Duration::try_from_secs_f64(-since).unwrap_or(Duration::ZERO);
            self.anchor.checked_sub(d).unwrap_or(self.anchor)
        }
    }

    fn loop_time_of(&self, deadline: Instant) -> f64 {
        let offset = if deadline >= self.anchor {
            (deadline - self.anchor).as_secs_f64()
        } else {
            -(self.anchor - deadline).as_secs_f64()
        };
        self.anchor_loop + offset + ARM_MARGIN
    }
}

/// tether's [`Runtime`] on one asyncio event loop (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct AsyncioRuntime {
    pub(crate) event_loop: Arc<Loop>,
}

impl Runtime for AsyncioRuntime {
    fn spawn(&self, future: SpawnFuture) {
        Task::spawn(&self.event_loop, future);
    }
    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(LoopTimer(Arc::new(TimerShared {
            event_loop: self.event_loop.clone(),
            state: Mutex::new(TimerState {
                deadline,
                armed: None,
                waker: None,
                generation: 0,
            }),
        })))
    }
    fn now(&self) -> Instant {
        self.event_loop.now()
    }
}

/// A spawned future, polled from loop callbacks.
pub(crate) struct Task {
    future: Mutex<Option<SpawnFuture>>,
    /// A poll is scheduled and has not begun: further wakes add nothing.
    scheduled: AtomicBool,
    event_loop: Arc<Loop>,
}

impl Task {
    /// Schedule `future`'s first poll.
    pub(crate) fn spawn(event_loop: &Arc<Loop>, future: SpawnFuture) -> Arc<Task> {
        let task = Task::new(event_loop, future);
        task.wake_by_ref();
        task
    }

    /// A task not yet scheduled: [`Task::poll_now`] it, or wake it.
    pub(crate) fn new(event_loop: &Arc<Loop>, future: SpawnFuture) -> Arc<Task> {
        Arc::new(Task {
            future: Mutex::new(Some(future)),
            scheduled: AtomicBool::new(false),
            event_loop: event_loop.clone(),
        })
    }

    /// Poll the future now (on the loop's thread, with the GIL). A panic drops it.
    pub(crate) fn poll_now(self: &Arc<Self>) {
        self.scheduled.store(false, Ordering::Release);
        let waker = Waker::from(self.clone());
        let mut cx = TaskContext::from_waker(&waker);
        let mut slot = lock(&self.future);
        let Some(future) = slot.as_mut() else {
            return;
        };
        let done = match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx))) {
            Ok(Poll::Pending) => return,
            Ok(Poll::Ready(())) | Err(_) => slot.take(),
        };
        drop(slot);
        drop(done);
    }

    /// Drop the future without polling it again (its loop is closed, or its result is
    /// no longer wanted). A future being polled right now is left to finish its poll.
    pub(crate) fn cancel(&self) {
        let taken = match self.future.try_lock() {
            Ok(mut slot) => slot.take(),
            Err(_) => None,
        };
        drop(taken);
    }
}

impl fmt::Debug for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("scheduled", &self.scheduled.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let scheduled = Python::attach(|py| {
            let run = Bound::new(py, RunTask(self.clone()))?.into_any();
            self.event_loop.call_soon(py, run)
        });
        if scheduled.is_err() {
            // The loop is closed: nothing will ever poll this future again.
            self.cancel();
        }
    }
}

/// The loop callback that polls one [`Task`].
#[pyclass(frozen, module = "tether._native")]
struct RunTask(Arc<Task>);

#[pymethods]
impl RunTask {
    fn __call__(&self) {
        self.0.poll_now();
    }
}

/// A resettable timer over `loop.call_at` (see the module docs).
#[derive(Debug)]
struct LoopTimer(Arc<TimerShared>);

struct TimerShared {
    event_loop: Arc<Loop>,
    state: Mutex<TimerState>,
}

impl fmt::Debug for TimerShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerShared").finish_non_exhaustive()
    }
}

struct TimerState {
    deadline: Instant,
    /// The instant the live `call_at` handle was armed for, and the handle.
    armed: Option<(Instant, Py<PyAny>)>,
    waker: Option<Waker>,
    /// Bumped at every (re-)arm: a stale handle's callback does nothing.
    generation: u64,
}

impl TimerShared {
    /// Arm `call_at` for the current deadline unless a handle armed at or before it is
    /// live (it will fire early and re-arm). Call without the state's lock.
    fn arm(self: &Arc<Self>) {
        let (deadline, generation, stale) = {
            let mut st = lock(&self.state);
            if matches!(&st.armed, Some((at, _)) if *at <= st.deadline) {
                return;
            }
            st.generation += 1;
            (st.deadline, st.generation, st.armed.take())
        };
        Python::attach(|py| {
            if let Some((_, handle)) = stale {
                let _ = handle.bind(py).call_method0("cancel");
            }
            let fire = TimerFire {
                timer: Arc::downgrade(self),
                generation,
            };
            let mut when = self.event_loop.loop_time_of(deadline);
            if self.event_loop.coarse {
                // Fired early on the millisecond clock: wait one more of its ticks
                // rather than spin until `Instant` reaches the deadline.
                let time = self.event_loop.time.bind(py).call0();
                if let Ok(loop_now) = time.and_then(|t| t.extract::<f64>()) {
                    if when <= loop_now {
                        when = loop_now + 1e-3;
                    }
                }
            }
            let armed = Bound::new(py, fire)
                .and_then(|fire| self.event_loop.call_at.bind(py).call1((when, fire)));
            // A closed loop cannot arm: the timer then never fires, like any timer of a
            // runtime that has stopped.
            if let Ok(handle) = armed {
                let mut st = lock(&self.state);
                if st.generation == generation {
                    st.armed = Some((deadline, handle.unbind()));
                } else {
                    drop(st);
                    let _ = handle.call_method0("cancel");
                }
            }
        });
    }
}

/// The `call_at` callback of a [`LoopTimer`].
#[pyclass(frozen, module = "tether._native")]
struct TimerFire {
    timer: Weak<TimerShared>,
    generation: u64,
}

#[pymethods]
impl TimerFire {
    fn __call__(&self) {
        let Some(timer) = self.timer.upgrade() else {
            return;
        };
        let now = timer.event_loop.now();
        let waker = {
            let mut st = lock(&timer.state);
            if st.generation != self.generation {
                return;
            }
            st.armed = None;
            if now < st.deadline {
                None
            } else {
                st.waker.take()
            }
        };
        match waker {
            Some(waker) => waker.wake(),
            // Fired for a deadline since moved later: arm for the new one.
            None => timer.arm(),
        }
    }
}

impl AsyncTimer for LoopTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let rearm_now = {
            let mut st = lock(&self.0.state);
            st.deadline = deadline;
            // A later deadline keeps the handle (lazy); an earlier one needs a new handle
            // now when someone waits (its task sleeps until the timer wakes it).
            let too_late = matches!(&st.armed, Some((at, _)) if *at > deadline);
            too_late && st.waker.is_some()
        };
        if rearm_now {
            self.0.arm();
        }
    }
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let now = self.0.event_loop.now();
        {
            let mut st = lock(&self.0.state);
            if now >= st.deadline {
                return Poll::Ready(());
            }
            match &st.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.waker = Some(cx.waker().clone()),
            }
        }
        self.0.arm();
        Poll::Pending
    }
}

impl Drop for LoopTimer {
    fn drop(&mut self) {
        let armed = lock(&self.0.state).armed.take();
        if let Some((_, handle)) = armed {
            Python::attach(|py| {
                let _ = handle.bind(py).call_method0("cancel");
            });
        }
    }
}

/// Whether the asyncio future `future` is done (a future that cannot say counts as done:
/// nothing is set on it).
pub(crate) fn is_done(future: &Bound<'_, PyAny>) -> bool {
    future
        .call_method0("done")
        .and_then(|d| d.is_truthy())
        .unwrap_or(true)
}

/// Settle the asyncio future `future` with `outcome`, unless it is done already (it was
/// cancelled meanwhile: nobody wants the outcome). A closed loop is ignored.
pub(crate) fn settle(future: &Bound<'_, PyAny>, outcome: PyResult<Py<PyAny>>) {
    if is_done(future) {
        return;
    }
    let _ = match outcome {
        Ok(value) => future.call_method1("set_result", (value,)),
        Err(err) => future.call_method1("set_exception", (err.into_value(future.py()),)),
    };
}

/// Where a bridged future's output goes: kept for the caller while the first poll runs,
/// then into the `asyncio.Future` made for a future that had to wait.
enum Outlet {
    /// The first poll is running.
    First,
    /// Done in the first poll.
    Output(PyResult<Py<PyAny>>),
    /// Pending after the first poll: resolve this future.
    Future(Py<PyAny>),
}

/// Poll `future` on `event_loop` and give its output to Python as an awaitable. The
/// first poll happens now: a future that is ready at once comes back as a [`Ready`]
/// awaitable (no `asyncio.Future`, no loop iteration); one that must wait comes back
/// as an `asyncio.Future`, and cancelling that future drops `future`.
pub(crate) fn future_into_py<'py, F>(
    py: Python<'py>,
    event_loop: &Arc<Loop>,
    future: F,
) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<Py<PyAny>>> + Send + 'static,
{
    let outlet = Arc::new(Mutex::new(Outlet::First));
    let sink = outlet.clone();
    let task = Task::new(
        event_loop,
        Box::pin(async move {
            let output = future.await;
            let target = {
                let mut slot = lock(&sink);
                match std::mem::replace(&mut *slot, Outlet::First) {
                    Outlet::Future(target) => target,
                    _ => {
                        *slot = Outlet::Output(output);
                        return;
                    }
                }
            };
            Python::attach(|py| settle(target.bind(py), output));
        }),
    );
    task.poll_now();
    let mut slot = lock(&outlet);
    if let Outlet::Output(_) = &*slot {
        let Outlet::Output(output) = std::mem::replace(&mut *slot, Outlet::First) else {
            unreachable!("matched above");
        };
        drop(slot);
        return ready(py, output);
    }
    let py_future = event_loop.create_future(py)?;
    *slot = Outlet::Future(py_future.clone().unbind());
    drop(slot);
    let on_done = Bound::new(py, CancelOnDone(task))?;
    py_future.call_method1("add_done_callback", (on_done,))?;
    Ok(py_future)
}

/// An awaitable for `output`, known already: awaiting it returns (or raises) at once,
/// without suspending and without an `asyncio.Future`.
pub(crate) fn ready(py: Python<'_>, output: PyResult<Py<PyAny>>) -> PyResult<Bound<'_, PyAny>> {
    Ok(Bound::new(py, Ready(Mutex::new(Some(output))))?.into_any())
}

/// See [`ready`].
#[pyclass(frozen, module = "tether._native")]
struct Ready(Mutex<Option<PyResult<Py<PyAny>>>>);

#[pymethods]
impl Ready {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    fn __next__(&self) -> PyResult<Py<PyAny>> {
        match lock(&self.0).take() {
            Some(Ok(value)) => Err(pyo3::exceptions::PyStopIteration::new_err((value,))),
            Some(Err(err)) => Err(err),
            None => Err(pyo3::exceptions::PyRuntimeError::new_err(
                "cannot reuse an already awaited tether awaitable",
            )),
        }
    }
}

/// Drops a bridged future when its `asyncio.Future` is cancelled.
#[pyclass(frozen, module = "tether._native")]
struct CancelOnDone(Arc<Task>);

#[pymethods]
impl CancelOnDone {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future.call_method0("cancelled")?.is_truthy()? {
            self.0.cancel();
        }
        Ok(())
    }
}
