//! The protocol types as Python classes: [`Request`], [`Chunk`], and the errors.
//!
//! Each class owns the Rust value (`tether_core::Request`, `tether_core::Chunk`), so a
//! value crosses between Python and Rust by moving it into or out of a class object,
//! never through a dict. What is copied:
//!
//! - a `Request` is copied once when it is submitted (`Adapter.generate` clones the Rust
//!   request, so the caller's object can be reused); the engine receives the driver's
//!   request moved into a new `Request` object;
//! - a `Chunk` an engine yields is copied once into the driver (its token ids and text);
//!   the chunk a consumer receives is the driver's, moved into a new `Chunk` object;
//! - reading `token_ids` builds a new `list` each time (keep it in a local).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyType;

use tether_core::{BackendError, Chunk as CoreChunk, EngineError, ErrorKind, FinishReason};
use tether_core::{Request as CoreRequest, Usage};

/// A generation request (see the stubs for every field).
#[pyclass(module = "tether._native", name = "Request")]
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) inner: CoreRequest,
}

#[pymethods]
impl Request {
    #[new]
    #[pyo3(signature = (token_ids, *, id = String::new(), model = String::new(), max_tokens = None,
        min_tokens = None, stop_token_ids = Vec::new(), ignore_eos = false, eos_token_ids = Vec::new(),
        temperature = None, top_p = None, top_k = None, seed = None, annotations = Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        token_ids: Vec<u32>,
        id: String,
        model: String,
        max_tokens: Option<u32>,
        min_tokens: Option<u32>,
        stop_token_ids: Vec<u32>,
        ignore_eos: bool,
        eos_token_ids: Vec<u32>,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<u32>,
        seed: Option<u64>,
        annotations: Vec<String>,
    ) -> Request {
        let mut inner = CoreRequest::new(id, model, token_ids);
        inner.stop.max_tokens = max_tokens;
        inner.stop.min_tokens = min_tokens;
        inner.stop.stop_token_ids = stop_token_ids;
        inner.stop.ignore_eos = ignore_eos;
        inner.eos_token_ids = eos_token_ids;
        inner.sampling.temperature = temperature;
        inner.sampling.top_p = top_p;
        inner.sampling.top_k = top_k;
        inner.sampling.seed = seed;
        inner.annotations = annotations;
        Request { inner }
    }

    #[getter]
    fn id(&self) -> &str {
        &self.inner.id
    }
    #[setter]
    fn set_id(&mut self, id: String) {
        self.inner.id = id;
    }
    #[getter]
    fn model(&self) -> &str {
        &self.inner.model
    }
    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        self.inner.token_ids.clone()
    }
    #[getter]
    fn max_tokens(&self) -> Option<u32> {
        self.inner.stop.max_tokens
    }
    #[getter]
    fn min_tokens(&self) -> Option<u32> {
        self.inner.stop.min_tokens
    }
    #[getter]
    fn stop_token_ids(&self) -> Vec<u32> {
        self.inner.stop.stop_token_ids.clone()
    }
    #[getter]
    fn ignore_eos(&self) -> bool {
        self.inner.stop.ignore_eos
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids.clone()
    }
    #[getter]
    fn temperature(&self) -> Option<f32> {
        self.inner.sampling.temperature
    }
    #[getter]
    fn top_p(&self) -> Option<f32> {
        self.inner.sampling.top_p
    }
    #[getter]
    fn top_k(&self) -> Option<u32> {
        self.inner.sampling.top_k
    }
    #[getter]
    fn seed(&self) -> Option<u64> {
        self.inner.sampling.seed
    }
    #[getter]
    fn annotations(&self) -> Vec<String> {
        self.inner.annotations.clone()
    }
    fn __repr__(&self) -> String {
        format!(
            "Request(id={:?}, model={:?}, {} prompt tokens, max_tokens={:?})",
            self.inner.id,
            self.inner.model,
            self.inner.token_ids.len(),
            self.inner.stop.max_tokens
        )
    }
}

/// One piece of a response: tokens, and on the terminal chunk a finish reason.
#[pyclass(module = "tether._native", name = "Chunk")]
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    pub(crate) inner: CoreChunk,
    /// The typed error of an error terminal (`finish_reason == "error"`).
    pub(crate) error: Option<EngineError>,
}

/// `"eos"`, `"length"`, ... for `reason`; `"error"` for every error.
pub(crate) fn reason_name(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos => "eos",
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Error(_) => "error",
        FinishReason::Cancelled => "cancelled",
        FinishReason::ContentFilter => "content_filter",
    }
}

/// The finish reason named `name` (`"error"` takes `message`); a `ValueError` otherwise.
pub(crate) fn parse_reason(name: &str, message: Option<String>) -> PyResult<FinishReason> {
    Ok(match name {
        "eos" => FinishReason::Eos,
        "length" => FinishReason::Length,
        "stop" => FinishReason::Stop,
        "cancelled" | "abort" => FinishReason::Cancelled,
        "content_filter" => FinishReason::ContentFilter,
        "error" => FinishReason::Error(message.unwrap_or_default()),
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown finish reason {other:?}: expected eos, length, stop, cancelled, content_filter or error"
            )))
        }
    })
}

#[pymethods]
impl Chunk {
    #[new]
    #[pyo3(signature = (token_ids = Vec::new(), *, text = None, finish_reason = None, error = None,
        prompt_tokens = None, completion_tokens = None, index = 0))]
    fn new(
        token_ids: Vec<u32>,
        text: Option<String>,
        finish_reason: Option<&str>,
        error: Option<String>,
        prompt_tokens: Option<u32>,
        completion_tokens: Option<u32>,
        index: u32,
    ) -> PyResult<Chunk> {
        let mut inner = CoreChunk::tokens(token_ids);
        inner.text = text;
        inner.index = index;
        inner.finish_reason = finish_reason.map(|r| parse_reason(r, error)).transpose()?;
        if prompt_tokens.is_some() || completion_tokens.is_some() {
            inner.usage = Some(Usage::new(
                prompt_tokens.unwrap_or(0),
                completion_tokens.unwrap_or(0),
            ));
        }
        Ok(Chunk { inner, error: None })
    }

    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        self.inner.token_ids.clone()
    }
    #[getter]
    fn text(&self) -> Option<&str> {
        self.inner.text.as_deref()
    }
    #[getter]
    fn finish_reason(&self) -> Option<&'static str> {
        self.inner.finish_reason.as_ref().map(reason_name)
    }
    /// The error's message (`"kind: message"`) on an error terminal.
    #[getter]
    fn error(&self) -> Option<String> {
        match (&self.error, &self.inner.finish_reason) {
            (Some(err), _) => Some(err.to_string()),
            (None, Some(FinishReason::Error(msg))) => Some(msg.clone()),
            _ => None,
        }
    }
    /// The error's kind (`"InvalidArgument"`, `"BackendStreamIncomplete"`, ...).
    #[getter]
    fn error_kind(&self) -> Option<&'static str> {
        self.error.as_ref().map(|e| e.kind().as_str())
    }
    #[getter]
    fn prompt_tokens(&self) -> Option<u32> {
        self.inner.usage.map(|u| u.prompt_tokens)
    }
    #[getter]
    fn completion_tokens(&self) -> Option<u32> {
        self.inner.usage.map(|u| u.completion_tokens)
    }
    #[getter]
    fn index(&self) -> u32 {
        self.inner.index
    }
    #[getter]
    fn is_terminal(&self) -> bool {
        self.inner.is_terminal() || self.error.is_some()
    }
    fn __repr__(&self) -> String {
        match (&self.error, &self.inner.finish_reason) {
            (Some(err), _) => format!("Chunk(error={:?})", err.to_string()),
            (None, Some(reason)) => format!(
                "Chunk(token_ids={:?}, finish_reason={:?})",
                self.inner.token_ids,
                reason_name(reason)
            ),
            (None, None) => format!("Chunk(token_ids={:?})", self.inner.token_ids),
        }
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Chunk>()
            .map(|o| {
                let o = o.borrow();
                o.inner == self.inner && o.error == self.error
            })
            .unwrap_or(false)
    }
}

/// The Python `tether.EngineError` class (defined in `tether/_errors.py`).
pub(crate) fn engine_error_class(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    Ok(py
        .import("tether._errors")?
        .getattr("EngineError")?
        .cast_into::<PyType>()?)
}

/// `err` as a Python `tether.EngineError` (kind and message kept).
pub(crate) fn to_py_error(py: Python<'_>, err: &EngineError) -> PyErr {
    match engine_error_class(py)
        .and_then(|cls| cls.call1((err.message().to_owned(), err.kind().as_str())))
    {
        Ok(value) => PyErr::from_value(value),
        Err(e) => e,
    }
}

/// A Python exception raised by an engine, as a typed error: a `tether.EngineError`
/// keeps its kind; anything else is `BackendUnknown` with the type's name and message.
pub(crate) fn from_py_error(py: Python<'_>, err: &PyErr) -> EngineError {
    let value = err.value(py);
    let is_ours = engine_error_class(py)
        .map(|cls| value.is_instance(&cls).unwrap_or(false))
        .unwrap_or(false);
    if is_ours {
        let kind: Option<String> = value.getattr("kind").and_then(|k| k.extract()).ok();
        let message: String = value
            .getattr("message")
            .and_then(|m| m.extract())
            .unwrap_or_default();
        match kind.as_deref().map(str::parse::<ErrorKind>) {
            Some(Ok(kind)) => return EngineError::new(kind, message),
            _ => {
                return EngineError::new(
                    ErrorKind::Backend(BackendError::Unknown),
                    format!("{message} (unknown error kind {kind:?})"),
                )
            }
        }
    }
    let name = value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".into());
    EngineError::new(
        ErrorKind::Backend(BackendError::Unknown),
        format!("{name}: {value}"),
    )
}
