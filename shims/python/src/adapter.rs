//! [`Adapter`] and [`ResponseStream`]: tether's driver for Python callers.
//!
//! `await adapter.generate(request, context)` runs the engine's setup under tether's
//! watch (rules 7 and 10) and returns a [`ResponseStream`], an async iterator of
//! [`Chunk`]s that ends after exactly one terminal chunk (rule 6). Reading it polls the
//! Rust stream directly: an item that is ready comes back in an already-done future
//! (no loop iteration); otherwise the stream's waker resolves the future from a loop
//! callback. Cancelling a pending read (the consumer's task was cancelled) kills the
//! request; dropping the stream before its terminal records `dropped` and aborts the
//! engine (or, with `kill_on_drop`, kills with cause `client_disconnect`).

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::Duration;

use futures_core::Stream;
use pyo3::exceptions::{PyRuntimeError, PyStopAsyncIteration, PyTypeError, PyValueError};
use pyo3::prelude::*;
use tether_core::drive::{AbortStatus, Outcome, RequestRecord};
use tether_core::{
    Adapter as CoreAdapter, AdapterConfig, Annotated, Cause, Chunk as CoreChunk, Mode, Observer,
    ResponseStream as CoreStream,
};

use crate::context::Context;
use crate::engine::PyEngine;
use crate::runtime::{future_into_py, lock, AsyncioRuntime, Loop};
use crate::types::{parse_reason, reason_name, to_py_error, Chunk, Request};

/// Seconds (a Python float) as a [`Duration`]: a `ValueError` when negative or not finite.
fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be a finite number of seconds >= 0, not {value}"
        ))
    })
}

fn optional_seconds(name: &str, value: Option<f64>) -> PyResult<Option<Duration>> {
    value.map(|v| seconds(name, v)).transpose()
}

/// Drives one Python engine on the event loop it is first used on (see the stubs).
#[pyclass(frozen, module = "tether._native", name = "Adapter")]
pub(crate) struct Adapter {
    engine: Py<PyAny>,
    config: AdapterConfig,
    buffer: usize,
    bound: OnceLock<(Arc<Loop>, CoreAdapter)>,
}

impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter").finish_non_exhaustive()
    }
}

/// Hands each record to a Python callable.
struct PyObserver(Py<PyAny>);

impl Observer for PyObserver {
    fn on_record(&self, record: &RequestRecord) {
        Python::attach(|py| {
            let called = Bound::new(py, Record::of(record))
                .and_then(|record| self.0.bind(py).call1((record,)));
            if let Err(e) = called {
                e.write_unraisable(py, Some(self.0.bind(py)));
            }
        });
    }
}

impl Adapter {
    /// The core adapter on the running loop, made at the first call.
    fn bound(&self, py: Python<'_>) -> PyResult<&(Arc<Loop>, CoreAdapter)> {
        let running = py.import("asyncio")?.call_method0("get_running_loop")?;
        if let Some(bound) = self.bound.get() {
            if !bound.0.is(py, &running) {
                return Err(PyRuntimeError::new_err(
                    "this tether.Adapter is bound to another event loop (an Adapter serves the loop it was first used on)",
                ));
            }
            return Ok(bound);
        }
        let event_loop = Loop::of(&running)?;
        let engine = PyEngine::new(
            py,
            self.engine.clone_ref(py),
            event_loop.clone(),
            self.buffer,
        )?;
        let runtime = AsyncioRuntime {
            event_loop: event_loop.clone(),
        };
        let adapter = CoreAdapter::new(Arc::new(engine), runtime, self.config.clone());
        // Two first calls cannot race: both hold the GIL on the loop's one thread.
        Ok(self.bound.get_or_init(|| (event_loop, adapter)))
    }
}

#[pymethods]
impl Adapter {
    #[new]
    #[pyo3(signature = (engine, *, mode = "agg", deferral_deadline = 30.0, cancel_grace = None,
        first_token_timeout = None, inter_token_timeout = None, kill_on_drop = false,
        observer = None, buffer = 1))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        engine: Py<PyAny>,
        mode: &str,
        deferral_deadline: f64,
        cancel_grace: Option<f64>,
        first_token_timeout: Option<f64>,
        inter_token_timeout: Option<f64>,
        kill_on_drop: bool,
        observer: Option<Py<PyAny>>,
        buffer: usize,
    ) -> PyResult<Adapter> {
        Python::attach(|py| -> PyResult<()> {
            let engine = engine.bind(py);
            for method in ["generate", "abort"] {
                let callable = engine
                    .getattr(method)
                    .map(|m| m.is_callable())
                    .unwrap_or(false);
                if !callable {
                    return Err(PyTypeError::new_err(format!(
                        "a tether engine needs `generate(request, ctx)` and `async def abort(ctx)`; {} has no `{method}`",
                        engine.get_type().name()?
                    )));
                }
            }
            Ok(())
        })?;
        let mode: Mode = mode
            .parse()
            .map_err(|e| PyValueError::new_err(format!("{e}")))?;
        let mut config = AdapterConfig::default()
            .mode(mode)
            .deferral_deadline(seconds("deferral_deadline", deferral_deadline)?)
            .cancel_grace(optional_seconds("cancel_grace", cancel_grace)?)
            .first_token_timeout(optional_seconds(
                "first_token_timeout",
                first_token_timeout,
            )?)
            .inter_token_timeout(optional_seconds(
                "inter_token_timeout",
                inter_token_timeout,
            )?)
            .kill_on_drop(kill_on_drop);
        if let Some(observer) = observer {
            config = config.observer(Arc::new(PyObserver(observer)));
        }
        if buffer == 0 {
            return Err(PyValueError::new_err("buffer must be at least 1"));
        }
        Ok(Adapter {
            engine,
            config,
            buffer,
            bound: OnceLock::new(),
        })
    }

    /// `await adapter.start(worker_id)`: the engine's model name.
    #[pyo3(signature = (worker_id = 0))]
    fn start<'py>(&self, py: Python<'py>, worker_id: u64) -> PyResult<Bound<'py, PyAny>> {
        let (event_loop, adapter) = self.bound(py)?;
        let adapter = adapter.clone();
        future_into_py(py, event_loop, async move {
            let config = adapter.start(worker_id).await;
            Python::attach(|py| match config {
                Ok(config) => Ok(config.model.into_pyobject(py)?.into_any().unbind()),
                Err(err) => Err(to_py_error(py, &err)),
            })
        })
    }

    /// `await adapter.cleanup()`.
    fn cleanup<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (event_loop, adapter) = self.bound(py)?;
        let adapter = adapter.clone();
        future_into_py(py, event_loop, async move {
            let done = adapter.cleanup().await;
            Python::attach(|py| match done {
                Ok(()) => Ok(py.None()),
                Err(err) => Err(to_py_error(py, &err)),
            })
        })
    }

    /// `await adapter.generate(request, context)`: the response stream, or a
    /// `tether.EngineError` for a setup error.
    #[pyo3(signature = (request, context = None, *, kill_on_drop = None))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        request: &Request,
        context: Option<&Context>,
        kill_on_drop: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (event_loop, adapter) = self.bound(py)?;
        let mut start = adapter.request(request.inner.clone());
        if let Some(ctx) = context {
            start = start.context(ctx.inner.clone());
        }
        if let Some(on) = kill_on_drop {
            start = start.kill_on_drop(on);
        }
        let kill_on_drop = kill_on_drop.unwrap_or(self.config.kill_on_drop);
        let generating = std::future::IntoFuture::into_future(start);
        let event_loop2 = event_loop.clone();
        future_into_py(py, event_loop, async move {
            let started = generating.await;
            Python::attach(|py| match started {
                Ok(stream) => Ok(Bound::new(
                    py,
                    ResponseStream::new(stream, event_loop2, kill_on_drop),
                )?
                .into_any()
                .unbind()),
                Err(err) => Err(to_py_error(py, &err)),
            })
        })
    }

    /// Background tasks the adapter runs now (its abort task, deferral watchdogs).
    #[getter]
    fn background_tasks(&self) -> usize {
        self.bound.get().map_or(0, |(_, a)| a.background_tasks())
    }

    /// Aborts queued or in flight, not yet carried out.
    #[getter]
    fn unfinished_aborts(&self) -> usize {
        self.bound.get().map_or(0, |(_, a)| a.unfinished_aborts())
    }
}

/// The consumer's side of one request.
struct Reader {
    stream: Mutex<Option<CoreStream>>,
    /// The future a read waits on, while one does.
    pending: Mutex<Option<Py<PyAny>>>,
    scheduled: AtomicBool,
    event_loop: Arc<Loop>,
    /// The stream's kill-on-drop setting: a cancelled read is then a client disconnect.
    kill_on_drop: AtomicBool,
}

impl Reader {
    /// Poll the stream once for the read waiting on `future`.
    fn poll(self: &Arc<Self>, py: Python<'_>) -> Poll<Option<Annotated<CoreChunk>>> {
        let waker = Waker::from(self.clone());
        let mut cx = TaskContext::from_waker(&waker);
        let mut slot = lock(&self.stream);
        let Some(stream) = slot.as_mut() else {
            return Poll::Ready(None);
        };
        let _ = py;
        let polled = Pin::new(stream).poll_next(&mut cx);
        if let Poll::Ready(None) = polled {
            // Over: release the driver's stream (and the engine's) now.
            let done = slot.take();
            drop(slot);
            drop(done);
        }
        polled
    }

    /// A loop callback: the stream woke the pending read.
    fn resume(self: &Arc<Self>, py: Python<'_>) {
        self.scheduled.store(false, Ordering::Release);
        let Some(future) = lock(&self.pending).as_ref().map(|f| f.clone_ref(py)) else {
            return;
        };
        let future = future.bind(py);
        if future
            .call_method0("done")
            .and_then(|d| d.is_truthy())
            .unwrap_or(true)
        {
            return;
        }
        let settled = match self.poll(py) {
            Poll::Pending => return,
            Poll::Ready(Some(item)) => to_chunk(py, item)
                .and_then(|chunk| future.call_method1("set_result", (chunk,)).map(drop)),
            Poll::Ready(None) => future
                .call_method1(
                    "set_exception",
                    (PyStopAsyncIteration::new_err(()).into_value(py),),
                )
                .map(drop),
        };
        *lock(&self.pending) = None;
        if let Err(e) = settled {
            e.write_unraisable(py, None);
        }
    }
}

impl Wake for Reader {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        Python::attach(|py| {
            let resumed = Bound::new(py, Resume(self.clone()))
                .and_then(|r| self.event_loop.call_soon(py, r.into_any(), &[]));
            if resumed.is_err() {
                // The loop is closed: no read will be resumed.
                self.scheduled.store(false, Ordering::Release);
            }
        });
    }
}

/// The loop callback that resumes a pending read.
#[pyclass(frozen, module = "tether._native")]
struct Resume(Arc<Reader>);

#[pymethods]
impl Resume {
    fn __call__(&self, py: Python<'_>) {
        self.0.resume(py);
    }
}

/// Kills the request when a pending read is cancelled (the consumer's task was), and
/// ends the stream: a later read gets `StopAsyncIteration`.
#[pyclass(frozen, module = "tether._native")]
struct KillOnCancel(Arc<Reader>);

#[pymethods]
impl KillOnCancel {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future.call_method0("cancelled")?.is_truthy()? {
            let mut pending = lock(&self.0.pending);
            if pending
                .as_ref()
                .is_some_and(|f| f.bind(future.py()).is(future))
            {
                *pending = None;
            }
            drop(pending);
            // Kill, then let go of the stream the way a kill-on-drop does: the owed
            // `cancelled` terminal is taken at once, so the outcome is `cancelled`,
            // whether or not the task is collected soon. The cause is the caller's,
            // or, on a kill-on-drop stream (an HTTP edge), the client's disconnect.
            let stream = lock(&self.0.stream).take();
            if let Some(mut stream) = stream {
                if !self.0.kill_on_drop.load(Ordering::Acquire) {
                    stream.context().kill_with(Cause::Caller);
                }
                stream.set_kill_on_drop(true);
                drop(stream);
            }
        }
        Ok(())
    }
}

fn to_chunk(py: Python<'_>, item: Annotated<CoreChunk>) -> PyResult<Bound<'_, Chunk>> {
    let chunk = match (item.data, item.error) {
        (_, Some(err)) => {
            let mut inner = CoreChunk::terminal(tether_core::FinishReason::Error(err.to_string()));
            inner.token_ids = Vec::new();
            Chunk {
                inner,
                error: Some(err),
            }
        }
        (Some(data), None) => Chunk {
            inner: data,
            error: None,
        },
        (None, None) => Chunk {
            inner: CoreChunk::tokens(Vec::new()),
            error: None,
        },
    };
    Bound::new(py, chunk)
}

/// One request's response: an async iterator of [`Chunk`]s (see the stubs).
#[pyclass(frozen, module = "tether._native", name = "ResponseStream")]
pub(crate) struct ResponseStream {
    reader: Arc<Reader>,
    request_id: String,
    context: tether_core::Context,
}

impl fmt::Debug for ResponseStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseStream")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl ResponseStream {
    fn new(stream: CoreStream, event_loop: Arc<Loop>, kill_on_drop: bool) -> ResponseStream {
        ResponseStream {
            request_id: stream.request_id().to_owned(),
            context: stream.context().clone(),
            reader: Arc::new(Reader {
                stream: Mutex::new(Some(stream)),
                pending: Mutex::new(None),
                scheduled: AtomicBool::new(false),
                event_loop,
                kill_on_drop: AtomicBool::new(kill_on_drop),
            }),
        }
    }
}

impl Drop for ResponseStream {
    /// The driver's stream holds the reader's waker, so the reader outlives this object
    /// (a cycle through Rust): the stream is dropped here, with the Python object.
    fn drop(&mut self) {
        let stream = lock(&self.reader.stream).take();
        drop(stream);
    }
}

#[pymethods]
impl ResponseStream {
    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if lock(&self.reader.pending).is_some() {
            return Err(PyRuntimeError::new_err(
                "anext(): the stream is already being read by another task",
            ));
        }
        let future = self.reader.event_loop.create_future(py)?;
        match self.reader.poll(py) {
            Poll::Ready(Some(item)) => {
                future.call_method1("set_result", (to_chunk(py, item)?,))?;
            }
            Poll::Ready(None) => return Err(PyStopAsyncIteration::new_err(())),
            Poll::Pending => {
                *lock(&self.reader.pending) = Some(future.clone().unbind());
                let on_cancel = Bound::new(py, KillOnCancel(self.reader.clone()))?;
                future.call_method1("add_done_callback", (on_cancel,))?;
            }
        }
        Ok(future)
    }

    /// The request's id.
    #[getter]
    fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The request's context: stop or kill it from anywhere.
    #[getter]
    fn context(&self) -> Context {
        Context {
            inner: self.context.clone(),
        }
    }

    /// End the stream now with `reason` (a stop string matched): the next item is that
    /// terminal, the engine is aborted once, the outcome is `finished`. `False` when the
    /// request is already over or a terminal is already owed.
    #[pyo3(signature = (reason = "stop"))]
    fn finish(&self, reason: &str) -> PyResult<bool> {
        let reason = parse_reason(reason, None)?;
        Ok(lock(&self.reader.stream)
            .as_mut()
            .is_some_and(|s| s.finish(reason)))
    }

    /// Make a drop before the terminal a kill with cause `client_disconnect`.
    fn set_kill_on_drop(&self, on: bool) {
        self.reader.kill_on_drop.store(on, Ordering::Release);
        if let Some(s) = lock(&self.reader.stream).as_mut() {
            s.set_kill_on_drop(on);
        }
    }

    /// The request's record once it is over for the consumer, else `None`.
    #[getter]
    fn record(&self) -> Option<Record> {
        lock(&self.reader.stream)
            .as_ref()
            .and_then(CoreStream::record)
            .map(|r| Record::of(&r))
    }

    /// Drop the stream now (what garbage collection would do): before its terminal, the
    /// request is recorded `dropped` (or killed, with kill-on-drop) and the engine aborted.
    fn close(&self) {
        let stream = lock(&self.reader.stream).take();
        drop(stream);
    }

    /// `await stream.aclose()`: [`close`](ResponseStream::close) as a coroutine.
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.close();
        let future = self.reader.event_loop.create_future(py)?;
        future.call_method1("set_result", (py.None(),))?;
        Ok(future)
    }

    fn __repr__(&self) -> String {
        format!("ResponseStream(request_id={:?})", self.request_id)
    }
}

/// What happened to one request (see the stubs).
#[pyclass(frozen, module = "tether._native", name = "Record")]
#[derive(Debug, Clone)]
pub(crate) struct Record {
    #[pyo3(get)]
    request_id: String,
    #[pyo3(get)]
    outcome: &'static str,
    #[pyo3(get)]
    finish_reason: Option<&'static str>,
    #[pyo3(get)]
    error_kind: Option<&'static str>,
    #[pyo3(get)]
    cause: Option<&'static str>,
    #[pyo3(get)]
    abort: &'static str,
    #[pyo3(get)]
    ttft: Option<f64>,
    #[pyo3(get)]
    output_tokens: u32,
    #[pyo3(get)]
    itl_count: u32,
    #[pyo3(get)]
    itl_avg_ms: f64,
    #[pyo3(get)]
    itl_p99_ms: f64,
}

impl Record {
    fn of(r: &RequestRecord) -> Record {
        let (finish_reason, error_kind) = match &r.outcome {
            Outcome::Finished(reason) => (Some(reason_name(reason)), None),
            Outcome::Failed(kind) => (None, Some(kind.as_str())),
            _ => (None, None),
        };
        Record {
            request_id: r.id.to_string(),
            outcome: r.outcome.label(),
            finish_reason,
            error_kind,
            cause: r.cause.map(Cause::label),
            abort: match r.abort {
                AbortStatus::NotNeeded => "not_needed",
                other => other.label(),
            },
            ttft: r.ttft.map(|d| d.as_secs_f64()),
            output_tokens: r.output_tokens,
            itl_count: r.itl.count,
            itl_avg_ms: r.itl.avg_ms,
            itl_p99_ms: r.itl.p99_ms,
        }
    }
}

#[pymethods]
impl Record {
    fn __repr__(&self) -> String {
        format!(
            "Record(request_id={:?}, outcome={:?}, abort={:?}, output_tokens={})",
            self.request_id, self.outcome, self.abort, self.output_tokens
        )
    }
}
