//! One request as an integrator starts and handles it: the per-request settings
//! ([`Generate`], from [`Adapter::request`](super::Adapter::request)), the future that
//! runs the engine's setup ([`Generating`]), and what a handler calls on a
//! [`ResponseStream`]: [`finish`](ResponseStream::finish) (rule 12),
//! [`record`](ResponseStream::record), [`set_kill_on_drop`](ResponseStream::set_kill_on_drop),
//! [`attach`](ResponseStream::attach) and the `Result` view ([`Results`]).

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_core::Stream;

use super::shared::Shared;
use super::span::SpanNote;
use super::stats::{Outcome, RequestRecord};
use super::stream::{end_for_consumer, ResponseStream};
use super::{Adapter, AdapterConfig};
use crate::context::Context;
use crate::engine::Metadata;
use crate::error::EngineError;
use crate::lifecycle::deadlines::CancelLimits;
use crate::lifecycle::Event;
use crate::protocol::{Annotated, Chunk, FinishReason, Mode, Request};

/// A per-request record callback.
pub(super) type RecordFn = Box<dyn FnOnce(&RequestRecord) + Send + 'static>;

/// What a request set for itself through [`Generate`].
pub(super) struct Own {
    pub(super) limits: Limits,
    pub(super) on_record: Option<RecordFn>,
    pub(super) metadata: Metadata,
}

/// The limits one request runs under: the adapter's, with its own overrides.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(super) mode: Mode,
    pub(super) first_token_timeout: Option<Duration>,
    pub(super) inter_token_timeout: Option<Duration>,
    pub(super) cancel: CancelLimits,
    pub(super) kill_on_drop: bool,
}

impl Limits {
    pub(super) fn of(config: &AdapterConfig) -> Limits {
        Limits {
            mode: config.mode,
            first_token_timeout: config.first_token_timeout,
            inter_token_timeout: config.inter_token_timeout,
            cancel: CancelLimits {
                deferral_deadline: config.deferral_deadline,
                cancel_grace: config.cancel_grace,
            },
            kill_on_drop: config.kill_on_drop,
        }
    }
}

/// One request about to start, with settings of its own: made by
/// [`Adapter::request`](super::Adapter::request), started by `.await`.
///
/// Every setting defaults to the adapter's [`AdapterConfig`]; the context defaults to a
/// new one named after the request id (reach it with [`ResponseStream::context`]).
///
/// ```
/// # async fn demo(adapter: tether_core::Adapter) -> Result<(), tether_core::EngineError> {
/// use std::time::Duration;
/// use tether_core::{Mode, Request};
///
/// let stream = adapter
///     .request(Request::new("r1", "tiny", vec![1, 2, 3]))
///     .mode(Mode::Decode)
///     .first_token_timeout(Some(Duration::from_secs(2)))
///     .kill_on_drop(true)
///     .on_record(|record| println!("{}: {:?}", record.id, record.outcome))
///     .await?;
/// # drop(stream);
/// # Ok(())
/// # }
/// ```
#[must_use = "a request starts only when awaited"]
pub struct Generate<'a> {
    adapter: &'a Adapter,
    request: Request,
    context: Option<Context>,
    limits: Limits,
    on_record: Option<RecordFn>,
    metadata: Metadata,
}

impl fmt::Debug for Generate<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generate")
            .field("request_id", &self.request.id)
            .field("context", &self.context)
            .field("limits", &self.limits)
            .field("on_record", &self.on_record.is_some())
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl<'a> Generate<'a> {
    pub(super) fn new(adapter: &'a Adapter, request: Request) -> Generate<'a> {
        Generate {
            limits: adapter.inner.limits,
            adapter,
            request,
            context: None,
            on_record: None,
            metadata: Metadata::new(),
        }
    }

    /// Run under `context` (a router's child context, one linked to a shutdown root)
    /// instead of a new one.
    pub fn context(mut self, context: Context) -> Self {
        self.context = Some(context);
        self
    }

    /// The disaggregation role of this request (rule 2 defers aborts in `Decode`).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.limits.mode = mode;
        self
    }

    /// Time-to-first-token limit (`None`: none).
    pub fn first_token_timeout(mut self, limit: Option<Duration>) -> Self {
        self.limits.first_token_timeout = limit;
        self
    }

    /// Inter-token limit (`None`: none).
    pub fn inter_token_timeout(mut self, limit: Option<Duration>) -> Self {
        self.limits.inter_token_timeout = limit;
        self
    }

    /// How long a deferred abort waits for the first token.
    pub fn deferral_deadline(mut self, deadline: Duration) -> Self {
        self.limits.cancel.deferral_deadline = deadline;
        self
    }

    /// How long a stopped request may take to end before it is killed (`None`: forever).
    pub fn cancel_grace(mut self, grace: Option<Duration>) -> Self {
        self.limits.cancel.cancel_grace = grace;
        self
    }

    /// Whether dropping the stream before its terminal kills the context with cause
    /// client disconnect and records `Cancelled` (see
    /// [`ResponseStream::set_kill_on_drop`]).
    pub fn kill_on_drop(mut self, on: bool) -> Self {
        self.limits.kill_on_drop = on;
        self
    }

    /// Attach `value` under `key` to this request's [`Metadata`], for the engine
    /// ([`GenerateContext::metadata`](crate::GenerateContext::metadata), in `generate`
    /// and in `abort`): a tenant, a priority class, a routing hint.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// The id the client gave this request (an HTTP `x-request-id`), kept in its
    /// [`Metadata`] under [`Metadata::CLIENT_REQUEST_ID`] for the engine and recorded
    /// on its span as `client_request_id`. Clients reuse such ids, so the request's
    /// own id (`Request::id`) must stay unique; this one is for correlation.
    pub fn client_request_id(self, id: impl Into<String>) -> Self {
        self.metadata(Metadata::CLIENT_REQUEST_ID, id)
    }

    /// Call `f` with this request's record once it is over (after the adapter's
    /// observer), however it ends: a handler's way to usage and timings when the
    /// stream itself was moved into a response body.
    pub fn on_record(mut self, f: impl FnOnce(&RequestRecord) + Send + 'static) -> Self {
        self.on_record = Some(Box::new(f));
        self
    }
}

impl IntoFuture for Generate<'_> {
    type Output = Result<ResponseStream, EngineError>;
    type IntoFuture = Generating;

    fn into_future(self) -> Generating {
        let context = self
            .context
            .unwrap_or_else(|| Context::new(self.request.id.as_str()));
        let own = Own {
            limits: self.limits,
            on_record: self.on_record,
            metadata: self.metadata,
        };
        let stream = ResponseStream::new(&self.adapter.inner, self.request, context, Some(own));
        Generating::new(stream)
    }
}

/// The engine's `generate` under tether's watch: resolves to the [`ResponseStream`],
/// or to the engine's typed setup error (rule 7).
///
/// Cancellation-safe (rule 10): the context is watched before the engine's `generate`
/// is entered, so a kill (or a first-token timeout) during a slow setup resolves it at
/// once with a stream that yields the terminal; dropping it records the request as
/// `Dropped` (or `Cancelled`, with kill-on-drop) and aborts the engine.
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct Generating {
    stream: Option<ResponseStream>,
}

impl Generating {
    pub(super) fn new(stream: ResponseStream) -> Generating {
        Generating {
            stream: Some(stream),
        }
    }
}

impl Future for Generating {
    type Output = Result<ResponseStream, EngineError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let Some(stream) = self.stream.as_mut() else {
            panic!("`Generating` polled after it completed");
        };
        match stream.poll_setup(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(self.stream.take().expect("checked above"))),
            Poll::Ready(Err(err)) => {
                // Rule 7: recorded and released already; the stream has nothing to give.
                self.stream = None;
                Poll::Ready(Err(err))
            }
        }
    }
}

impl ResponseStream {
    /// The id of the request.
    pub fn request_id(&self) -> &str {
        self.shared.request_id()
    }

    /// The request's lifecycle state, for tether's own tests and proofs (not part of
    /// the stable API: the machine's types are internals).
    #[cfg(any(feature = "internals", tether_loom))]
    pub fn state(&self) -> crate::lifecycle::State {
        self.shared.cell.load()
    }

    /// The request's context: stop or kill it from anywhere.
    pub fn context(&self) -> &Context {
        &self.shared.context
    }

    /// Whether the stream is over for its consumer (its terminal was taken, it was
    /// finished early, or a setup error ended it).
    pub fn is_done(&self) -> bool {
        self.local.done
    }

    /// End the stream now with `reason` (SPEC rule 12): a stop string matched in the
    /// decoded text, a length the serving side enforces. The next item is a terminal
    /// chunk with that reason, then the stream ends; the engine is aborted once under
    /// rules 1 and 2 (in decode mode before the first token the abort waits for the
    /// first token, the hint or the deadline, off the consumer's path), and the outcome
    /// is `Finished(reason)`, never a cancellation.
    ///
    /// Returns `false`, changing nothing, when the request is already over for the
    /// consumer or a kill or timeout already owes it a terminal (that terminal is the
    /// next item instead).
    pub fn finish(&mut self, reason: FinishReason) -> bool {
        let (shared, local) = (&self.shared, &mut self.local);
        if local.done {
            return false;
        }
        let (state, acts) = shared.cell.apply(Event::EarlyFinish);
        if acts.record().is_none() {
            return false;
        }
        Shared::abort_and_arm(shared, acts);
        let terminal = Annotated::from_data(Chunk::terminal(reason.clone()));
        end_for_consumer(
            shared,
            local,
            Outcome::Finished(reason),
            state,
            SpanNote::None,
        );
        local.stash(terminal);
        true
    }

    /// The request's record, once it is over for the consumer (`None` before): the
    /// same record the adapter's observer got, with outcome, cause, TTFT, ITL and
    /// tokens, for a handler that puts usage and timings in its response.
    pub fn record(&self) -> Option<RequestRecord> {
        self.local.record(&self.shared)
    }

    /// Make a drop before the terminal a kill of the context with cause
    /// [`Cause::ClientDisconnect`](crate::Cause::ClientDisconnect) (SPEC rule 4): the
    /// engine is aborted (rules 1 and 2), children linked to the context are killed,
    /// and the outcome is `Cancelled`, never `Dropped`. An HTTP edge turns this on: the
    /// server dropping a response body is the client having gone.
    pub fn set_kill_on_drop(&mut self, on: bool) {
        self.local.kill_on_drop = on;
    }

    /// Keep `value` alive until the request is over for the consumer, then drop it:
    /// a concurrency-limit permit attached here is released when generation ends, not
    /// when the stream is returned (a later `attach` replaces and drops the earlier
    /// value). On a stream that is already over, `value` is dropped at once.
    pub fn attach(&mut self, value: impl Send + 'static) {
        if self.local.done {
            drop(value);
        } else {
            let extras = self.local.extras.get_or_insert_with(Box::default);
            extras.attached = Some(Box::new(value));
        }
    }

    /// The stream as `Result`s ([`Results`]): chunks as `Ok`, an error item as `Err`,
    /// so user code can use `?` (`TryStreamExt::try_next`) instead of reading
    /// [`Annotated`] fields.
    pub fn results(self) -> Results {
        Results { inner: self }
    }
}

/// A [`ResponseStream`] seen as `Result<Chunk, EngineError>` items (a `TryStream`): an
/// item with data is `Ok`, an error item is `Err` (and the last one), an item with
/// neither (a comment) is skipped.
#[derive(Debug)]
pub struct Results {
    inner: ResponseStream,
}

impl Results {
    /// The stream underneath (for [`ResponseStream::record`] and the rest).
    pub fn get_ref(&self) -> &ResponseStream {
        &self.inner
    }

    /// The stream underneath, mutably (for [`ResponseStream::finish`]).
    pub fn get_mut(&mut self) -> &mut ResponseStream {
        &mut self.inner
    }

    /// Back to the `Annotated` stream.
    pub fn into_inner(self) -> ResponseStream {
        self.inner
    }
}

impl Stream for Results {
    type Item = Result<Chunk, EngineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let item = match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(item)) => item,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            match item {
                Annotated {
                    error: Some(err), ..
                } => return Poll::Ready(Some(Err(err))),
                Annotated {
                    data: Some(chunk), ..
                } => return Poll::Ready(Some(Ok(chunk))),
                _ => {}
            }
        }
    }
}
