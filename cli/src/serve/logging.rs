//! `tether serve`'s logs: one `tracing` subscriber for the whole process, printing
//! events as lines on stderr through tracing-subscriber's fmt layer, filtered by
//! `RUST_LOG` ([`DEFAULT_FILTER`] when unset). With the `otel` feature and
//! `--otlp-endpoint`, the same subscriber also carries the OTLP layer
//! (`otel::install_otlp` hands it to [`install`]), whose own filter lets only
//! the `engine.generate` spans through, whatever `RUST_LOG` says.
//!
//! Owns the subscriber's set-up; what is logged is the adapter's (target
//! [`LOG_TARGET`](tether_core::drive::LOG_TARGET), `tether`) and the access
//! middleware's (target [`super::access::TARGET`], `tether::access`).
//!
//! A line reads `{timestamp} {LEVEL} {target}: {message} {field}={value} ...`, for
//! example
//! `2026-05-01T12:00:00.000000Z  INFO tether::access: method=POST path=/v1/completions status=200 duration_ms=3.1 request_id=cmpl-1 client_gone=false`.
//! Colours are used only when stderr is a terminal.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use super::ServeError;

/// The filter when `RUST_LOG` is unset or empty: warnings from everything, and
/// tether's info events, the access log among them (tether's per-request events are
/// debug: `RUST_LOG=tether=debug` shows them).
pub const DEFAULT_FILTER: &str = "warn,tether=info";

/// A layer added to the subscriber next to the log lines (the OTLP export).
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The filter `directives` (`RUST_LOG` syntax) describe.
///
/// # Errors
/// [`ServeError::InvalidOptions`] naming the directives and what is wrong with them.
pub fn filter(directives: &str) -> Result<EnvFilter, ServeError> {
    EnvFilter::builder()
        .parse(directives)
        .map_err(|e| ServeError::InvalidOptions(format!("RUST_LOG={directives:?}: {e}")))
}

/// The filter `RUST_LOG` asks for, [`DEFAULT_FILTER`] when it is unset or empty.
///
/// # Errors
/// [`ServeError::InvalidOptions`] when `RUST_LOG` does not parse (or is not UTF-8).
pub fn filter_from_env() -> Result<EnvFilter, ServeError> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => filter(&v),
        Ok(_) | Err(std::env::VarError::NotPresent) => filter(DEFAULT_FILTER),
        Err(std::env::VarError::NotUnicode(v)) => Err(ServeError::InvalidOptions(format!(
            "RUST_LOG={v:?} is not UTF-8"
        ))),
    }
}

/// The log lines: one per event that `filter` lets through, written to `writer`,
/// coloured if `ansi`.
pub fn lines<S, W>(filter: EnvFilter, writer: W, ansi: bool) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_filter(filter)
}

/// Install the process's subscriber: the log lines on stderr, filtered by `RUST_LOG`,
/// and `extra` if given. Returns `Ok(false)`, changing nothing, when the process
/// already has a global subscriber (a program embedding [`super::run`] keeps its own).
///
/// # Errors
/// [`ServeError::InvalidOptions`] when `RUST_LOG` does not parse.
pub fn install(extra: Option<ExtraLayer>) -> Result<bool, ServeError> {
    let filter = filter_from_env()?;
    let ansi = std::io::stderr().is_terminal();
    // Not `.with(extra)` for both: an absent (`None`) layer is "interested in
    // everything", so every span and event that passes the level hint (the adapter's
    // `engine.generate` span on every request) would be built and recorded for nobody.
    let installed = match extra {
        Some(extra) => tracing_subscriber::registry()
            .with(extra)
            .with(lines(filter, std::io::stderr, ansi))
            .try_init(),
        None => tracing_subscriber::registry()
            .with(lines(filter, std::io::stderr, ansi))
            .try_init(),
    };
    Ok(installed.is_ok())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    /// What `emit` logs under `directives`, timestamps cut off.
    fn logged(directives: &str, emit: impl FnOnce()) -> Vec<String> {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::registry().with(lines(
            filter(directives).unwrap(),
            buffer.clone(),
            false,
        ));
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| {
                l.split_once(' ')
                    .map_or(l, |(_, rest)| rest)
                    .trim_start()
                    .to_owned()
            })
            .collect()
    }

    fn events() {
        tracing::info!(
            target: "tether::access",
            method = %"GET",
            status = 200_u16,
            request_id = Some(tracing::field::display("cmpl-1")),
            client_gone = false,
        );
        tracing::debug!(target: "tether", request_id = %"cmpl-1", "abort sent");
        tracing::warn!(target: "tether", request_id = %"cmpl-2", "first-token timeout fired");
        tracing::info!(target: "request_span", "not tether's");
        tracing::warn!(target: "hyper", "a dependency's warning");
    }

    #[test]
    fn the_default_filter_keeps_the_access_log_and_warnings() {
        assert_eq!(
            logged(DEFAULT_FILTER, events),
            [
                "INFO tether::access: method=GET status=200 request_id=cmpl-1 client_gone=false",
                "WARN tether: first-token timeout fired request_id=cmpl-2",
                "WARN hyper: a dependency's warning",
            ]
        );
    }

    #[test]
    fn tether_debug_adds_the_adapters_events_and_directives_narrow() {
        assert_eq!(
            logged("tether=debug", events),
            [
                "INFO tether::access: method=GET status=200 request_id=cmpl-1 client_gone=false",
                "DEBUG tether: abort sent request_id=cmpl-1",
                "WARN tether: first-token timeout fired request_id=cmpl-2",
            ]
        );
        assert_eq!(
            logged("tether::access=off,tether=warn", events),
            ["WARN tether: first-token timeout fired request_id=cmpl-2"]
        );
    }

    #[test]
    fn bad_directives_are_invalid_options() {
        let err = filter("tether=loud").unwrap_err();
        assert!(
            matches!(&err, ServeError::InvalidOptions(m) if m.starts_with("RUST_LOG=\"tether=loud\"")),
            "{err}"
        );
    }
}
