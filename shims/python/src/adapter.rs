//! [`Adapter`] and [`ResponseStream`]: tether's driver for Python callers.
//!
//! `await adapter.generate(request, context)` runs the engine's setup under tether's
//! watch (rules 7 and 10) and returns a [`ResponseStream`], an async iterator of
//! [`Chunk`]s that ends after exactly one terminal chunk (rule 6). Each read is a
//! [`Next`] awaitable that polls the Rust stream itself: an item that is ready costs no
//! loop iteration; otherwise it yields an asyncio future that the stream's waker
//! resolves directly (on the loop's thread; through `call_soon_threadsafe` from
//! another), and polls again when its task resumes. Cancelling a pending read (the
//! consumer's task was cancelled) kills the request; dropping the stream before its
//! terminal records `dropped` and aborts the engine (or, with `kill_on_drop`, kills
//! with cause `client_disconnect`).

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::Duration;

use futures_core::Stream;
use pyo3::exceptions::{
    PyRuntimeError, PyStopAsyncIteration, PyStopIteration, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use tether_core::drive::{AbortStatus, Outcome, RequestRecord};
use tether_core::{
    Adapter as CoreAdapter, AdapterConfig, Annotated, Cause, Chunk as CoreChunk, Mode, Observer,
    ResponseStream as CoreStream,
};

use crate::context::Context;
use crate::engine::PyEngine;
use crate::runtime::{future_into_py, lock, ready, settle, AsyncioRuntime, Loop};
use crate::types::{parse_reason, reason_name, to_py_error, Chunk, Request};

/// Seconds (a Python float) as a [`Duration`]: a `ValueError` when negative or not finite.
pub(crate) fn seconds(name: &str, value: f64) -> PyResult<Duration> {
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
    /// `asyncio.get_running_loop`, looked up once.
    get_running_loop: Py<PyAny>,
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
        let running = self.get_running_loop.bind(py).call0()?;
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
        observer = None, buffer = 16))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
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
        for method in ["generate", "abort"] {
            let callable = engine
                .bind(py)
                .getattr(method)
                .is_ok_and(|m| m.is_callable());
            if !callable {
                return Err(PyTypeError::new_err(format!(
                    "a tether engine needs `generate(request, ctx)` and `async def abort(ctx)`; {} has no `{method}`",
                    engine.bind(py).get_type().name()?
                )));
            }
        }
        let get_running_loop = py.import("asyncio")?.getattr("get_running_loop")?.unbind();
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
            get_running_loop,
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
    /// The future a pending read's task waits on (yielded by [`Next`]), and whether
    /// the stream woke while no read was pending (during the read's own poll).
    pending: Mutex<Pending>,
    event_loop: Arc<Loop>,
    /// The stream's kill-on-drop setting: a cancelled read is then a client disconnect.
    kill_on_drop: AtomicBool,
    /// The request's record, kept when the stream is let go.
    record: Mutex<Option<RequestRecord>>,
}

/// A read's wait (see [`Reader::pending`]).
#[derive(Default)]
struct Pending {
    future: Option<Py<PyAny>>,
    woken: bool,
}

impl Reader {
    /// Take the driver's stream and [`release`](Reader::release) it.
    fn let_go(&self) {
        let stream = lock(&self.stream).take();
        self.release(stream);
    }

    /// Let go of the driver's stream (dropping it, with the locks released), keeping
    /// its record.
    fn release(&self, stream: Option<CoreStream>) {
        if let Some(stream) = stream {
            let record = stream.record();
            drop(stream);
            if let Some(record) = record {
                *lock(&self.record) = Some(record);
            }
        }
    }

    /// Poll the stream once.
    fn poll(self: &Arc<Self>) -> Poll<Option<Annotated<CoreChunk>>> {
        let waker = Waker::from(self.clone());
        let mut cx = TaskContext::from_waker(&waker);
        let mut slot = lock(&self.stream);
        let Some(stream) = slot.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(stream).poll_next(&mut cx);
        if let Poll::Ready(None) = polled {
            // Over: release the driver's stream (and the engine's) now.
            let done = slot.take();
            drop(slot);
            self.release(done);
        }
        polled
    }

    /// The reader's task was cancelled while it waited (or an exception was thrown
    /// into the read): kill, then let go of the stream the way a kill-on-drop does, so
    /// the owed `cancelled` terminal is taken at once and the outcome is `cancelled`,
    /// whether or not the task is collected soon. The cause is the caller's, or on a
    /// kill-on-drop stream (an HTTP edge) the client's disconnect.
    fn cancelled(&self) {
        let stream = lock(&self.stream).take();
        if let Some(mut stream) = stream {
            if !self.kill_on_drop.load(Ordering::Acquire) {
                stream.context().kill_with(Cause::Caller);
            }
            stream.set_kill_on_drop(true);
            self.release(Some(stream));
        }
    }
}

impl Wake for Reader {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    /// Resolve the pending read's future: its task resumes and polls again. On the
    /// loop's thread this is one `set_result` (no callback of ours in between);
    /// elsewhere it goes through `call_soon_threadsafe`.
    fn wake_by_ref(self: &Arc<Self>) {
        let future = {
            let mut pending = lock(&self.pending);
            match pending.future.take() {
                Some(future) => future,
                None => {
                    // Woken within the read's own poll: the read sees it before it waits.
                    pending.woken = true;
                    return;
                }
            }
        };
        Python::attach(|py| {
            let future = future.bind(py);
            if self.event_loop.on_loop_thread() {
                // A future cancelled meanwhile refuses: its task was told already.
                let _ = future.call_method1("set_result", (py.None(),));
            } else if let Ok(resume) = Bound::new(py, ResumeSoon(future.clone().unbind())) {
                // On a closed loop there is no task left to resume.
                let _ = self.event_loop.call_soon(py, resume.into_any());
            }
        });
    }
}

/// Drops a stream on the loop's thread (for one collected on another).
#[pyclass(frozen, module = "tether._native")]
struct ReleaseSoon(Arc<Reader>);

#[pymethods]
impl ReleaseSoon {
    fn __call__(&self) {
        self.0.let_go();
    }
}

/// Resolves a read's future from the loop's thread (for a wake from another thread).
#[pyclass(frozen, module = "tether._native")]
struct ResumeSoon(Py<PyAny>);

#[pymethods]
impl ResumeSoon {
    fn __call__(&self, py: Python<'_>) {
        settle(self.0.bind(py), Ok(py.None()));
    }
}

/// One read of a [`ResponseStream`]: the awaitable `__anext__` returns. Awaiting it
/// polls the stream; while the stream has nothing, it yields an asyncio future that
/// the stream's waker resolves, and polls again when its task resumes. A chunk that
/// is ready costs no loop iteration.
#[pyclass(module = "tether._native")]
struct Next {
    reader: Arc<Reader>,
}

impl Next {
    fn step(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        lock(&self.reader.pending).woken = false;
        match self.reader.poll() {
            Poll::Ready(Some(item)) => {
                let chunk = to_chunk(py, item)?;
                Err(PyStopIteration::new_err((chunk.unbind(),)))
            }
            Poll::Ready(None) => Err(PyStopAsyncIteration::new_err(())),
            Poll::Pending => {
                let future = self.reader.event_loop.create_future(py)?;
                future.setattr("_asyncio_future_blocking", true)?;
                let woken = {
                    let mut pending = lock(&self.reader.pending);
                    if pending.woken {
                        pending.woken = false;
                        true
                    } else {
                        pending.future = Some(future.clone().unbind());
                        false
                    }
                };
                if woken {
                    // The stream woke during the poll: resume at the next loop turn.
                    future.call_method1("set_result", (py.None(),))?;
                }
                Ok(future.unbind())
            }
        }
    }
}

#[pymethods]
impl Next {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    fn __next__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.step(py)
    }
    fn send(&self, py: Python<'_>, _value: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.step(py)
    }
    /// Something was thrown into the read: the task was cancelled (`CancelledError`),
    /// or a timeout fired around it. The request is killed; the exception goes on.
    #[pyo3(signature = (kind, value = None, _traceback = None))]
    fn throw(
        &self,
        kind: &Bound<'_, PyAny>,
        value: Option<&Bound<'_, PyAny>>,
        _traceback: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        lock(&self.reader.pending).future = None;
        self.reader.cancelled();
        let exception = match value {
            Some(value) if !value.is_none() => value.clone(),
            _ if kind.is_instance_of::<pyo3::types::PyType>() => kind.call0()?,
            _ => kind.clone(),
        };
        Err(PyErr::from_value(exception))
    }
    fn close(&self) {
        lock(&self.reader.pending).future = None;
    }
}

fn to_chunk(py: Python<'_>, item: Annotated<CoreChunk>) -> PyResult<Bound<'_, Chunk>> {
    let chunk = match (item.data, item.error) {
        (_, Some(err)) => {
            let inner = CoreChunk::terminal(tether_core::FinishReason::Error(err.to_string()));
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
    /// A stream is its loop's, like every asyncio object: used from another thread it
    /// could deadlock against the loop's own reads (its lock, then the GIL).
    fn on_its_thread(&self) -> PyResult<()> {
        if self.reader.event_loop.on_loop_thread() {
            Ok(())
        } else {
            Err(PyRuntimeError::new_err(
                "a tether.ResponseStream is used from its event loop's thread only (stop or kill its Context from anywhere)",
            ))
        }
    }

    fn new(stream: CoreStream, event_loop: Arc<Loop>, kill_on_drop: bool) -> ResponseStream {
        ResponseStream {
            request_id: stream.request_id().to_owned(),
            context: stream.context().clone(),
            reader: Arc::new(Reader {
                stream: Mutex::new(Some(stream)),
                pending: Mutex::new(Pending::default()),
                event_loop,
                kill_on_drop: AtomicBool::new(kill_on_drop),
                record: Mutex::new(None),
            }),
        }
    }
}

impl Drop for ResponseStream {
    /// The driver's stream holds the reader's waker, so the reader outlives this object
    /// (a cycle through Rust): the stream is dropped here, with the Python object.
    fn drop(&mut self) {
        if self.reader.event_loop.on_loop_thread() {
            self.reader.let_go();
            return;
        }
        // Collected on another thread: the loop's thread may be polling this stream
        // (holding its lock, waiting for the GIL this thread holds), so the drop is
        // handed to the loop. On a closed loop nobody polls: take it if it is free.
        let handed = Python::attach(|py| {
            Bound::new(py, ReleaseSoon(self.reader.clone()))
                .and_then(|r| self.reader.event_loop.call_soon(py, r.into_any()))
        });
        if handed.is_err() {
            let stream = self
                .reader
                .stream
                .try_lock()
                .ok()
                .and_then(|mut s| s.take());
            drop(stream);
        }
    }
}

#[pymethods]
impl ResponseStream {
    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__(&self) -> PyResult<Next> {
        self.on_its_thread()?;
        if lock(&self.reader.pending).future.is_some() {
            return Err(PyRuntimeError::new_err(
                "anext(): the stream is already being read by another task",
            ));
        }
        Ok(Next {
            reader: self.reader.clone(),
        })
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
        self.on_its_thread()?;
        let reason = parse_reason(reason, None)?;
        Ok(lock(&self.reader.stream)
            .as_mut()
            .is_some_and(|s| s.finish(reason)))
    }

    /// Make a drop before the terminal a kill with cause `client_disconnect`.
    fn set_kill_on_drop(&self, on: bool) -> PyResult<()> {
        self.on_its_thread()?;
        self.reader.kill_on_drop.store(on, Ordering::Release);
        if let Some(s) = lock(&self.reader.stream).as_mut() {
            s.set_kill_on_drop(on);
        }
        Ok(())
    }

    /// The request's record once it is over for the consumer, else `None`.
    #[getter]
    fn record(&self) -> PyResult<Option<Record>> {
        self.on_its_thread()?;
        let live = lock(&self.reader.stream)
            .as_ref()
            .and_then(CoreStream::record);
        let record = live.or_else(|| lock(&self.reader.record).clone());
        Ok(record.map(|r| Record::of(&r)))
    }

    /// Drop the stream now (what garbage collection would do): before its terminal, the
    /// request is recorded `dropped` (or killed, with kill-on-drop) and the engine aborted.
    fn close(&self) -> PyResult<()> {
        self.on_its_thread()?;
        self.reader.let_go();
        Ok(())
    }

    /// `await stream.aclose()`: [`close`](ResponseStream::close) as a coroutine.
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.close()?;
        ready(py, Ok(py.None()))
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
