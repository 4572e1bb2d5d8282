//! A loom-friendly runtime: inline spawn, frozen clock, manually fired timers. Each
//! task's waker sets a flag, so a model can poll only the tasks that were woken
//! ([`LoomRuntime::run_woken`]): a lost wake-up leaves its task unpolled.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tether_core::drive::SpawnFuture;
use tether_core::sync::{lock, Mutex};
use tether_core::{AsyncTimer, Runtime};

use crate::{std_lock, StdArc, StdMutex};

pub(crate) struct RtState {
    base: Instant,
    offset_ms: AtomicU64,
    next_timer: AtomicUsize,
    /// `(timer id, deadline, waker)`: loom mutex, the wakers are loom wakers.
    timers: Mutex<Vec<(usize, Instant, Waker)>>,
    pub(crate) pending: StdMutex<Vec<Task>>,
    spawns: AtomicUsize,
}

/// A spawned task still pending, and the flag its waker sets.
pub(crate) struct Task {
    future: SpawnFuture,
    woken: StdArc<Woken>,
}

/// Set by the task's waker (std atomic: the model's threads run one at a time, and
/// the flag is read only after they were joined).
#[derive(Default)]
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: StdArc<Self>) {
        self.0.store(true, SeqCst);
    }
}

impl Task {
    /// Poll once with its own waker; `Some(self)` while still pending.
    fn poll(mut self) -> Option<Task> {
        self.woken.0.store(false, SeqCst);
        let waker = Waker::from(self.woken.clone());
        let mut cx = TaskContext::from_waker(&waker);
        self.future
            .as_mut()
            .poll(&mut cx)
            .is_pending()
            .then_some(self)
    }
}

#[derive(Clone)]
pub(crate) struct LoomRuntime(pub(crate) StdArc<RtState>);

impl std::fmt::Debug for LoomRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoomRuntime")
            .field("offset_ms", &self.0.offset_ms.load(SeqCst))
            .finish_non_exhaustive()
    }
}

impl LoomRuntime {
    pub(crate) fn new() -> LoomRuntime {
        LoomRuntime(StdArc::new(RtState {
            base: Instant::now(),
            offset_ms: AtomicU64::new(0),
            next_timer: AtomicUsize::new(0),
            timers: Mutex::new(Vec::new()),
            pending: StdMutex::new(Vec::new()),
            spawns: AtomicUsize::new(0),
        }))
    }

    /// Move the clock and wake the timers now due (register-then-check in the timer
    /// makes this free of lost wake-ups).
    pub(crate) fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap();
        self.0.offset_ms.fetch_add(ms, SeqCst);
        let now = self.now();
        let due: Vec<Waker> = {
            let mut timers = lock(&self.0.timers);
            let (due, left): (Vec<_>, Vec<_>) = std::mem::take(&mut *timers)
                .into_iter()
                .partition(|(_, at, _)| *at <= now);
            *timers = left;
            due.into_iter().map(|(_, _, w)| w).collect()
        };
        due.into_iter().for_each(Waker::wake);
    }

    /// The executor's turn: poll every spawned future still pending once (the watchdog,
    /// whose timer or engine woke it). Called by one thread of a model at a time.
    pub(crate) fn run_pending(&self) {
        let tasks = std::mem::take(&mut *std_lock(&self.0.pending));
        let mut left: Vec<Task> = tasks.into_iter().filter_map(Task::poll).collect();
        std_lock(&self.0.pending).append(&mut left);
    }

    /// A real executor's turns: poll only the tasks whose waker was called, until none
    /// is (bounded). A task that is never woken is never polled here.
    pub(crate) fn run_woken(&self) {
        for _ in 0..16 {
            let (woken, mut rest): (Vec<Task>, Vec<Task>) =
                std::mem::take(&mut *std_lock(&self.0.pending))
                    .into_iter()
                    .partition(|t| t.woken.0.load(SeqCst));
            if woken.is_empty() {
                std_lock(&self.0.pending).append(&mut rest);
                return;
            }
            rest.extend(woken.into_iter().filter_map(Task::poll));
            std_lock(&self.0.pending).append(&mut rest);
        }
    }

    /// Tasks spawned so far.
    pub(crate) fn spawns(&self) -> usize {
        self.0.spawns.load(SeqCst)
    }

    /// Spawned tasks not finished yet.
    pub(crate) fn pending(&self) -> usize {
        std_lock(&self.0.pending).len()
    }

    /// Drop whatever is still pending (they hold the request: a leak for loom).
    pub(crate) fn shutdown(&self) {
        let pending = std::mem::take(&mut *std_lock(&self.0.pending));
        drop(pending);
        let timers = std::mem::take(&mut *lock(&self.0.timers));
        drop(timers);
    }
}

impl Runtime for LoomRuntime {
    fn spawn(&self, future: SpawnFuture) {
        self.0.spawns.fetch_add(1, SeqCst);
        let task = Task {
            future,
            woken: StdArc::default(),
        };
        if let Some(task) = task.poll() {
            std_lock(&self.0.pending).push(task);
        }
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(LoomTimer {
            rt: self.clone(),
            id: self.0.next_timer.fetch_add(1, SeqCst),
            deadline,
        })
    }

    fn now(&self) -> Instant {
        self.0.base + Duration::from_millis(self.0.offset_ms.load(SeqCst))
    }
}

#[derive(Debug)]
struct LoomTimer {
    rt: LoomRuntime,
    id: usize,
    deadline: Instant,
}

impl AsyncTimer for LoomTimer {
    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        self.get_mut().deadline = deadline;
    }

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        {
            let mut timers = lock(&self.rt.0.timers);
            timers.retain(|(id, _, _)| *id != self.id);
            timers.push((self.id, self.deadline, cx.waker().clone()));
        }
        if self.rt.now() >= self.deadline {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
