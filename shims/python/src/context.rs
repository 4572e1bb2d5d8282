//! [`Context`] (a request's stop/kill handle) and [`GenerateContext`] (what an engine's
//! `generate` and `abort` receive), over `tether_core`'s.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tether_core::context::Signalled;
use tether_core::{Cause, Context as CoreContext, GenerateContext as CoreGenerateContext};

use crate::runtime::{future_into_py, Loop};

/// A request's cancellation handle (see the stubs).
#[pyclass(frozen, module = "tether._native", name = "Context")]
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) inner: CoreContext,
}

fn cause_of(name: &str) -> PyResult<Cause> {
    Ok(match name {
        "caller" => Cause::Caller,
        "client_disconnect" => Cause::ClientDisconnect,
        "shutdown" => Cause::Shutdown,
        "timeout" => Cause::Timeout,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown cause {other:?}: expected caller, client_disconnect, shutdown or timeout"
            )))
        }
    })
}

/// An awaitable that resolves when `signal` does (cancelling it drops the waiter).
#[allow(clippy::redundant_closure_for_method_calls)] // `Python::None` is not general over the lifetime
/// On `event_loop`, or on the running loop when the caller has none at hand.
fn awaitable<'py>(
    py: Python<'py>,
    signal: Signalled,
    event_loop: Option<&Arc<Loop>>,
) -> PyResult<Bound<'py, PyAny>> {
    let running;
    let event_loop = match event_loop {
        Some(event_loop) => event_loop,
        None => {
            running = Loop::running(py)?;
            &running
        }
    };
    future_into_py(py, event_loop, async move {
        signal.await;
        Ok(Python::attach(|py| py.None()))
    })
}

#[pymethods]
impl Context {
    #[new]
    #[pyo3(signature = (id = None))]
    fn new(py: Python<'_>, id: Option<String>) -> PyResult<Context> {
        let id = match id {
            Some(id) => id,
            None => py
                .import("uuid")?
                .call_method0("uuid4")?
                .getattr("hex")?
                .extract()?,
        };
        Ok(Context {
            inner: CoreContext::new(id),
        })
    }
    #[getter]
    fn id(&self) -> &str {
        self.inner.id()
    }
    /// Graceful: the engine finishes soon and sends its terminal.
    #[pyo3(signature = (cause = "caller"))]
    fn stop(&self, cause: &str) -> PyResult<()> {
        self.inner.stop_with(cause_of(cause)?);
        Ok(())
    }
    /// Immediate: the stream yields a `cancelled` terminal at its next read.
    #[pyo3(signature = (cause = "caller"))]
    fn kill(&self, cause: &str) -> PyResult<()> {
        self.inner.kill_with(cause_of(cause)?);
        Ok(())
    }
    fn is_stopped(&self) -> bool {
        self.inner.is_stopped()
    }
    fn is_killed(&self) -> bool {
        self.inner.is_killed()
    }
    /// The first cause (`"caller"`, `"client_disconnect"`, ...), once stopped.
    #[getter]
    fn cause(&self) -> Option<&'static str> {
        self.inner.cause().map(Cause::label)
    }
    fn stopped<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, self.inner.stopped(), None)
    }
    fn killed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, self.inner.killed(), None)
    }
    /// How many `stopped()`/`killed()` waits are parked on this context (0 once each
    /// resolved or was cancelled: a cancelled wait leaves nothing behind).
    #[getter]
    fn waiters(&self) -> usize {
        self.inner.waiters()
    }
    /// Stop or kill `child` whenever this context is (at once if it already is).
    fn link_child(&self, child: &Context) {
        self.inner.link_child(&child.inner);
    }
    fn __repr__(&self) -> String {
        format!(
            "Context(id={:?}, stopped={}, killed={})",
            self.inner.id(),
            self.inner.is_stopped(),
            self.inner.is_killed()
        )
    }
}

/// What an engine's `generate(request, ctx)` and `abort(ctx)` receive.
#[pyclass(frozen, module = "tether._native", name = "GenerateContext")]
#[derive(Debug, Clone)]
pub(crate) struct GenerateContext {
    pub(crate) inner: CoreGenerateContext,
    /// The engine's loop: its waits need not look the running loop up again.
    pub(crate) event_loop: Arc<Loop>,
}

#[pymethods]
impl GenerateContext {
    #[getter]
    fn request_id(&self) -> &str {
        self.inner.request_id()
    }
    #[getter]
    fn context(&self) -> Context {
        Context {
            inner: self.inner.context().clone(),
        }
    }
    /// The first token exists (a KV transfer completed), though no chunk carries it yet:
    /// a deferred abort may be sent now. Idempotent.
    fn notify_first_token(&self) {
        self.inner.notify_first_token();
    }
    /// The request left the engine's queue (for the queue-time measurement). Idempotent.
    fn notify_scheduled(&self) {
        self.inner.notify_scheduled();
    }
    fn is_stopped(&self) -> bool {
        self.inner.context().is_stopped()
    }
    fn is_killed(&self) -> bool {
        self.inner.context().is_killed()
    }
    fn stopped<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, self.inner.context().stopped(), Some(&self.event_loop))
    }
    fn killed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, self.inner.context().killed(), Some(&self.event_loop))
    }
    /// The key/value pairs the caller attached (a key attached twice: the last value).
    #[getter]
    fn metadata(&self) -> Vec<(String, String)> {
        self.inner
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
    fn __repr__(&self) -> String {
        format!("GenerateContext(request_id={:?})", self.inner.request_id())
    }
}
