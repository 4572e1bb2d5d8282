//! `tether._native`: tether's driver on an asyncio event loop, for Python engines and
//! servers (the Python package `tether` re-exports it; the stubs in
//! `python/tether/__init__.pyi` document the Python API).
//!
//! - [`runtime`]: `AsyncioRuntime`, tether's `Runtime` on an asyncio loop (callbacks,
//!   `call_at` timers, the loop's clock), with no tokio and no thread;
//! - [`engine`]: a Python engine object as an `LlmEngine` (one pump task per request);
//! - [`adapter`]: `Adapter` and `ResponseStream` for Python callers;
//! - [`context`] and [`types`]: the classes that cross between the two languages.

pub mod adapter;
pub mod context;
pub mod engine;
pub mod runtime;
pub mod types;

use std::sync::Arc;

use pyo3::exceptions::PyAssertionError;
use pyo3::prelude::*;
use tether_core::conformance::ConformanceConfig;
use tether_core::LlmEngine;

use crate::engine::PyEngine;
use crate::runtime::{future_into_py, AsyncioRuntime, Loop};

/// `await run_runtime_conformance()`: check the asyncio runtime on the running loop
/// against tether's timer and spawn contract. Returns how many checks passed; raises
/// `AssertionError` naming the first broken clause.
#[pyfunction]
fn run_runtime_conformance(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let event_loop = Loop::running(py)?;
    let runtime = AsyncioRuntime {
        event_loop: event_loop.clone(),
    };
    future_into_py(py, &event_loop, async move {
        let report = tether_core::run_runtime_conformance(&runtime).await;
        Python::attach(|py| match report {
            Ok(report) => Ok(report.checks.into_pyobject(py)?.into_any().unbind()),
            Err(failure) => Err(PyAssertionError::new_err(failure.to_string())),
        })
    })
}

/// `await run_conformance(factory)`: tether's conformance kit against the Python engines
/// `factory()` makes, on the running loop. Returns the number of checks passed; raises
/// `AssertionError` with the first failure.
#[pyfunction]
#[pyo3(signature = (factory, *, start_timeout = 10.0, check_timeout = 10.0))]
fn run_conformance(
    py: Python<'_>,
    factory: Py<PyAny>,
    start_timeout: f64,
    check_timeout: f64,
) -> PyResult<Bound<'_, PyAny>> {
    let event_loop = Loop::running(py)?;
    let runtime = AsyncioRuntime {
        event_loop: event_loop.clone(),
    };
    let config = ConformanceConfig::default()
        .start_timeout(adapter::seconds("start_timeout", start_timeout)?)
        .check_timeout(adapter::seconds("check_timeout", check_timeout)?);
    let lp = event_loop.clone();
    future_into_py(py, &event_loop, async move {
        let make = move || -> Arc<dyn LlmEngine> {
            Python::attach(|py| {
                let engine = factory
                    .bind(py)
                    .call0()
                    .map(Bound::unbind)
                    .unwrap_or_else(|e| {
                        e.write_unraisable(py, None);
                        py.None()
                    });
                let engine = PyEngine::new(py, engine, lp.clone(), 1)
                    .expect("tether._pump is importable: it ships with this module");
                Arc::new(engine) as Arc<dyn LlmEngine>
            })
        };
        let report = tether_core::conformance::run_conformance_with(&runtime, &make, &config).await;
        Python::attach(|py| match report {
            Ok(report) => Ok(report.checks.len().into_pyobject(py)?.into_any().unbind()),
            Err(failure) => Err(PyAssertionError::new_err(failure.to_string())),
        })
    })
}

/// The module `tether._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<types::Request>()?;
    m.add_class::<types::Chunk>()?;
    m.add_class::<context::Context>()?;
    m.add_class::<context::GenerateContext>()?;
    m.add_class::<adapter::Adapter>()?;
    m.add_class::<adapter::ResponseStream>()?;
    m.add_class::<adapter::Record>()?;
    m.add_function(wrap_pyfunction!(run_runtime_conformance, m)?)?;
    m.add_function(wrap_pyfunction!(run_conformance, m)?)?;
    Ok(())
}
