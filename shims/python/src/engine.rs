//! [`PyEngine`]: a Python engine object as a tether [`LlmEngine`].
//!
//! The engine is any object with `generate(request, ctx)` returning an async iterator
//! (an `async def` generator) and `abort(ctx)`; `start(worker_id)` and `cleanup()` are
//! optional. Each of `abort`, `start` and `cleanup` may be a coroutine (it then runs in
//! a task of its own) or a plain function.
//!
//! Each request's generator runs in an `asyncio.Task` of its own, the *pump*
//! (`tether/_pump.py`), so `asyncio.current_task()`, `asyncio.timeout()` and task-local
//! context variables work inside the engine, and the consumer's task being cancelled
//! never throws into the engine. The pump pulls items into a [`Pipe`] (room for the
//! adapter's `buffer` of them) while the driver reads; when the pipe is full it waits
//! on a future the driver resolves when it takes an item.
//!
//! When the driver drops the engine stream (the request is over, and any deferred abort
//! was sent or discarded: SPEC rule 2), the pump is told to close the generator:
//! - parked between items (the generator suspended at a `yield`): the pump returns and
//!   its `finally` runs `await agen.aclose()` (`GeneratorExit` at the `yield`);
//! - inside the generator (awaiting the engine): the pump task is cancelled, so the
//!   engine sees `CancelledError` at its `await`, then the same `aclose()`.
//!
//! An engine that swallows either keeps its task alive only as long as it insists; the
//! request is over for tether either way, and its abort was sent exactly once.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use futures_core::Stream;
use pyo3::prelude::*;
use tether_core::engine::{BoxFuture, ChunkStream};
use tether_core::{
    BackendError, Chunk as CoreChunk, EngineConfig, EngineError, ErrorKind, GenerateContext,
    LlmEngine, Request,
};

use crate::context::GenerateContext as PyGenerateContext;
use crate::runtime::{is_done, lock, settle, Loop};
use crate::types::{from_py_error, Chunk, Request as PyRequest};

/// A Python engine object, driven on one event loop.
pub(crate) struct PyEngine {
    engine: Py<PyAny>,
    /// `tether._pump.pump`.
    pump: Py<PyAny>,
    /// `tether._pump.AbortTask` and `run_abort`: the engine's `abort` runs in a task
    /// that is never cancelled before it started.
    abort_task: Py<PyAny>,
    run_abort: Py<PyAny>,
    event_loop: Arc<Loop>,
    /// How many items the pipe holds before the pump waits for the driver.
    buffer: usize,
}

impl fmt::Debug for PyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PyEngine").finish_non_exhaustive()
    }
}

impl PyEngine {
    pub(crate) fn new(
        py: Python<'_>,
        engine: Py<PyAny>,
        event_loop: Arc<Loop>,
        buffer: usize,
    ) -> PyResult<PyEngine> {
        let module = py.import("tether._pump")?;
        Ok(PyEngine {
            engine,
            pump: module.getattr("pump")?.unbind(),
            abort_task: module.getattr("AbortTask")?.unbind(),
            run_abort: module.getattr("run_abort")?.unbind(),
            event_loop,
            buffer,
        })
    }

    /// Await the coroutine `method(*args)` of the engine, if it has `method`
    /// (`Ok(None)` when it has not).
    async fn call_optional(
        &self,
        method: &'static str,
        args: Option<u64>,
    ) -> Result<Option<Py<PyAny>>, EngineError> {
        let pending = Python::attach(|py| -> PyResult<Option<Called>> {
            let engine = self.engine.bind(py);
            if !engine.hasattr(method)? {
                return Ok(None);
            }
            let call = match args {
                Some(arg) => engine.call_method1(method, (arg,))?,
                None => engine.call_method0(method)?,
            };
            self.run(py, call, format!("tether:{method}"), false)
                .map(Some)
        })
        .map_err(|e| Python::attach(|py| from_py_error(py, &e)))?;
        match pending {
            None => Ok(None),
            Some(Called::Done(value)) => Ok(Some(value)),
            Some(Called::Task(task)) => PyTask::new(task).await.map(Some),
        }
    }

    /// What a call into the engine gave: a coroutine (any awaitable) runs in a task of
    /// its own named `name` (for `abort`, an `AbortTask` that teardown cannot cancel
    /// before it began); anything else is the answer of a plain function.
    fn run(
        &self,
        py: Python<'_>,
        call: Bound<'_, PyAny>,
        name: String,
        abort: bool,
    ) -> PyResult<Called> {
        if !call.hasattr("__await__")? {
            return Ok(Called::Done(call.unbind()));
        }
        let task = if abort {
            let body = self.run_abort.bind(py).call1((call,))?;
            let class = self.abort_task.bind(py);
            self.event_loop.start_task_of(py, Some(class), body, name)?
        } else {
            self.event_loop.start_task(py, call, name)?
        };
        Ok(Called::Task(task.unbind()))
    }
}

/// See [`PyEngine::run`].
enum Called {
    Done(Py<PyAny>),
    Task(Py<PyAny>),
}

/// Awaits an `asyncio.Task` (or future) from Rust: resolves with its result, or its
/// exception as a typed error.
struct PyTask {
    task: Py<PyAny>,
    /// The waker of the latest poll, shared with the done callback once it is hooked
    /// (a future may move between tasks, and so between wakers, from poll to poll).
    waker: Option<Arc<Mutex<Option<Waker>>>>,
}

impl PyTask {
    fn new(task: Py<PyAny>) -> PyTask {
        PyTask { task, waker: None }
    }
}

impl std::future::Future for PyTask {
    type Output = Result<Py<PyAny>, EngineError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        Python::attach(|py| {
            let task = self.task.bind(py).clone();
            if is_done(&task) {
                let result = if task
                    .call_method0("cancelled")
                    .and_then(|c| c.is_truthy())
                    .unwrap_or(false)
                {
                    Err(EngineError::new(
                        ErrorKind::Backend(BackendError::Cancelled),
                        "the engine's coroutine was cancelled",
                    ))
                } else {
                    task.call_method0("result")
                        .map(Bound::unbind)
                        .map_err(|e| from_py_error(py, &e))
                };
                return Poll::Ready(result);
            }
            match &self.waker {
                Some(slot) => *lock(slot) = Some(cx.waker().clone()),
                None => {
                    let slot = Arc::new(Mutex::new(Some(cx.waker().clone())));
                    let hooked = Bound::new(py, WakeOnDone(slot.clone()))
                        .and_then(|w| task.call_method1("add_done_callback", (w,)));
                    if let Err(e) = hooked {
                        return Poll::Ready(Err(from_py_error(py, &e)));
                    }
                    self.waker = Some(slot);
                }
            }
            Poll::Pending
        })
    }
}

/// A done callback that wakes a Rust task once.
#[pyclass(frozen, module = "tether._native")]
struct WakeOnDone(Arc<Mutex<Option<Waker>>>);

#[pymethods]
impl WakeOnDone {
    fn __call__(&self, _future: &Bound<'_, PyAny>) {
        let waker = lock(&self.0).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl LlmEngine for PyEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            let started = self.call_optional("start", Some(worker_id)).await?;
            let model = Python::attach(|py| -> Result<String, EngineError> {
                let engine = self.engine.bind(py);
                let named = match started {
                    Some(value) if !value.is_none(py) => value.extract::<String>(py).ok(),
                    _ => None,
                };
                let model = named
                    .or_else(|| engine.getattr("model").and_then(|m| m.extract()).ok())
                    .unwrap_or_else(|| {
                        engine
                            .get_type()
                            .name()
                            .map(|n| n.to_string())
                            .unwrap_or_default()
                    });
                Ok(model)
            })?;
            if model.is_empty() {
                return Err(EngineError::new(
                    ErrorKind::InvalidArgument,
                    "the engine names no model: start() returned no name, and it has no `model`",
                ));
            }
            Ok(EngineConfig::new(model, worker_id))
        })
    }

    fn generate(
        &self,
        request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async move {
            Python::attach(|py| {
                self.start_pump(py, request, context)
                    .map_err(|e| from_py_error(py, &e))
            })
        })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let pending = Python::attach(|py| -> PyResult<Called> {
                let ctx = Bound::new(
                    py,
                    PyGenerateContext {
                        inner: context,
                        event_loop: self.event_loop.clone(),
                    },
                )?;
                let name = format!("tether:abort:{}", ctx.get().inner.request_id());
                let call = self.engine.bind(py).call_method1("abort", (ctx,))?;
                self.run(py, call, name, true)
            });
            let outcome = match pending {
                Ok(Called::Done(_)) => Ok(()),
                Ok(Called::Task(task)) => PyTask::new(task).await.map(drop),
                Err(e) => Err(Python::attach(|py| from_py_error(py, &e))),
            };
            if let Err(err) = outcome {
                Python::attach(|py| warn(py, &format!("the engine's abort failed: {err}")));
            }
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move { self.call_optional("cleanup", None).await.map(drop) })
    }
}

impl PyEngine {
    fn start_pump(
        &self,
        py: Python<'_>,
        request: Request,
        context: GenerateContext,
    ) -> PyResult<ChunkStream> {
        let name = format!("tether:{}", context.request_id());
        let request = Bound::new(py, PyRequest { inner: request })?;
        let ctx = Bound::new(
            py,
            PyGenerateContext {
                inner: context,
                event_loop: self.event_loop.clone(),
            },
        )?;
        let agen = self
            .engine
            .bind(py)
            .call_method1("generate", (request, ctx))?;
        let iterator = agen.hasattr("__anext__")?;
        if !iterator && !agen.hasattr("__aiter__")? && !agen.hasattr("__await__")? {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "the engine's generate returned {}, not an async iterator (write it as an `async def` with `yield`)",
                agen.get_type().name()?
            )));
        }
        let pipe = Arc::new(Pipe {
            state: Mutex::new(PipeState {
                items: VecDeque::with_capacity(self.buffer),
                end: None,
                consumer: None,
                producer: None,
                task: None,
                closed: false,
            }),
            capacity: self.buffer,
            event_loop: self.event_loop.clone(),
        });
        let sink = Bound::new(py, Sink(pipe.clone()))?;
        let coroutine = self.pump.bind(py).call1((agen, sink, iterator))?;
        let task = self.event_loop.start_task(py, coroutine, name)?;
        let mut st = lock(&pipe.state);
        // An eager pump may be done already (the whole generator ran in this call).
        if st.end.is_none() {
            st.task = Some(task.unbind());
        }
        drop(st);
        Ok(Box::pin(PumpStream(pipe)))
    }
}

/// Log `message` at warning level on Python's `tether` logger.
pub(crate) fn warn(py: Python<'_>, message: &str) {
    let logged = py
        .import("logging")
        .and_then(|logging| logging.call_method1("getLogger", ("tether",)))
        .and_then(|logger| logger.call_method1("warning", (message,)));
    if let Err(e) = logged {
        e.write_unraisable(py, None);
    }
}

/// Between one request's pump and the driver.
struct Pipe {
    state: Mutex<PipeState>,
    capacity: usize,
    event_loop: Arc<Loop>,
}

struct PipeState {
    items: VecDeque<CoreChunk>,
    /// How the generator ended (`Ok` for `StopAsyncIteration`), read after the items.
    end: Option<Result<(), EngineError>>,
    /// The driver, waiting for an item.
    consumer: Option<Waker>,
    /// The pump, waiting for room: resolved `True` (room) or `False` (closed).
    producer: Option<Py<PyAny>>,
    /// The pump's `asyncio.Task`.
    task: Option<Py<PyAny>>,
    /// No more items are taken: the driver dropped the stream, or the engine yielded
    /// something that is not a chunk (the stream's end is then that error).
    closed: bool,
}

/// Resolve the pump's room future with `value`, unless it was cancelled meanwhile (a
/// closed loop is ignored: nothing waits any more).
fn resolve(py: Python<'_>, future: &Py<PyAny>, value: bool) {
    let value = value
        .into_pyobject(py)
        .map(|v| v.to_owned().into_any().unbind());
    settle(future.bind(py), value.map_err(Into::into));
}

/// The pump's handle on its [`Pipe`] (called from `tether/_pump.py`).
#[pyclass(frozen, module = "tether._native")]
struct Sink(Arc<Pipe>);

#[pymethods]
impl Sink {
    /// Hand over one item. `None`: keep pulling. `False`: stop (the stream was dropped).
    /// A future: await it, then go on if it gives `True`.
    fn push(&self, py: Python<'_>, item: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let chunk = match item.cast::<Chunk>() {
            Ok(chunk) => Ok(chunk.borrow().inner.clone()),
            Err(_) => Err(EngineError::new(
                ErrorKind::Backend(BackendError::Unknown),
                format!(
                    "the engine yielded {}, not a tether.Chunk",
                    item.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ),
            )),
        };
        let stop = || -> PyResult<Py<PyAny>> {
            Ok(false.into_pyobject(py)?.to_owned().into_any().unbind())
        };
        let (waker, full) = {
            let mut st = lock(&self.0.state);
            if st.closed {
                return stop();
            }
            let full = match chunk {
                Ok(chunk) => {
                    st.items.push_back(chunk);
                    st.items.len() >= self.0.capacity
                }
                // Not a chunk: the stream ends with that error, the pump stops.
                Err(err) => {
                    st.end = Some(Err(err));
                    st.closed = true;
                    false
                }
            };
            (st.consumer.take(), full)
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        if !full {
            return if lock(&self.0.state).closed {
                stop()
            } else {
                Ok(py.None())
            };
        }
        // Full: the pump waits for room. The future is made without the lock held (a
        // call into Python), so the pipe is looked at again before it is handed out.
        let future = self.0.event_loop.create_future(py)?.unbind();
        let mut st = lock(&self.0.state);
        if st.closed {
            drop(st);
            stop()
        } else if st.items.len() < self.0.capacity {
            Ok(py.None())
        } else {
            st.producer = Some(future.clone_ref(py));
            Ok(future)
        }
    }

    /// The generator ended (`error` is `None` for `StopAsyncIteration`).
    #[pyo3(signature = (error = None))]
    fn end(&self, py: Python<'_>, error: Option<Bound<'_, PyAny>>) {
        let end = match error {
            None => Ok(()),
            Some(value) => Err(from_py_error(py, &PyErr::from_value(value))),
        };
        let waker = {
            let mut st = lock(&self.0.state);
            st.end.get_or_insert(end);
            st.task = None;
            st.consumer.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether no more items are taken (see [`PipeState::closed`]).
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.0.state).closed
    }

    /// Report a problem the pump met while closing the generator.
    fn warn(&self, py: Python<'_>, message: &str) {
        warn(py, message);
    }
}

/// The driver's side of the [`Pipe`]: the engine stream.
struct PumpStream(Arc<Pipe>);

impl Stream for PumpStream {
    type Item = Result<CoreChunk, EngineError>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let (item, producer) = {
            let mut st = lock(&self.0.state);
            match st.items.pop_front() {
                Some(item) => (Some(Ok(item)), st.producer.take()),
                None => {
                    // The end, once: an error is given once, then the stream is over.
                    if let Some(end) = st.end.as_mut() {
                        return Poll::Ready(std::mem::replace(end, Ok(())).err().map(Err));
                    }
                    match &st.consumer {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => st.consumer = Some(cx.waker().clone()),
                    }
                    return Poll::Pending;
                }
            }
        };
        if let Some(producer) = producer {
            Python::attach(|py| resolve(py, &producer, true));
        }
        Poll::Ready(item)
    }
}

impl Drop for PumpStream {
    fn drop(&mut self) {
        let (producer, task) = {
            let mut st = lock(&self.0.state);
            st.closed = true;
            st.items.clear();
            (st.producer.take(), st.task.take())
        };
        Python::attach(|py| match (producer, task) {
            // Parked between items: the pump returns and closes the generator.
            (Some(producer), _) => resolve(py, &producer, false),
            // Inside the generator (or not started): cancel the pump's task. On a closed
            // loop there is nothing left to cancel.
            (None, Some(task)) => {
                if let Ok(cancel) = task.bind(py).getattr("cancel") {
                    let _ = self.0.event_loop.call_soon(py, cancel);
                }
            }
            (None, None) => {}
        });
    }
}
