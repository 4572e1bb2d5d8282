//! [`SseStream`]: a [`ResponseStream`] as the event stream of an axum [`Sse`] response,
//! with kill-on-disconnect.
//!
//! Owns the order of what goes on the wire (leading events, the caller's events for
//! each item, the trailer) and when the request's stream is let go. It must not decide
//! anything about the request's life: a drop before the terminal is
//! [`ResponseStream`]'s kill-on-drop (SPEC rule 4), the outcome is the adapter's.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_core::Stream;
use tether_core::drive::{Outcome, RequestRecord};
use tether_core::protocol::{Annotated, Chunk, FinishReason};
use tether_core::ResponseStream;

/// Turn `stream` into SSE events: `map` turns each item into the events to send for it
/// (`None`, one `Some(event)`, or any `IntoIterator` of events), in order.
///
/// The stream is switched to
/// [kill-on-drop](ResponseStream::set_kill_on_drop): when the client goes away, hyper
/// drops the response body before the terminal was read, and the request's context is
/// killed with [`Cause::ClientDisconnect`](tether_core::Cause::ClientDisconnect): the
/// engine is aborted once (SPEC rules 1 and 2) and the outcome is `Cancelled`. Once the terminal was read,
/// nothing is killed any more, even if the client leaves before the last bytes were
/// written.
///
/// Return the result from a handler as it is, or call [`SseStream::into_sse`] for the
/// axum [`Sse`] response (to set its keep-alive). See the [crate docs](crate) for a
/// handler.
pub fn sse<F, I>(stream: ResponseStream, map: F) -> SseStream<F>
where
    F: FnMut(Annotated<Chunk>) -> I,
    I: IntoIterator<Item = Event>,
{
    SseStream::new(stream, map)
}

/// [`sse`] for a `map` that may end the request early: it also gets a [`Finisher`],
/// whose [`finish`](Finisher::finish) ends the stream with a finish reason (SPEC rule
/// 12: a stop string matched in the text decoded so far). The next item `map` gets is
/// then the terminal chunk with that reason; the engine is aborted once, and the
/// outcome is `Finished(reason)`, so a [trailer](SseStream::trailer) is sent.
///
/// ```
/// use axum::response::sse::Event;
/// use tether_core::protocol::FinishReason;
/// use tether_core::ResponseStream;
///
/// /// One event per chunk; the request ends at the first token 0.
/// fn events(stream: ResponseStream) -> impl axum::response::IntoResponse {
///     tether_axum::sse_with(stream, |item, finisher| {
///         let chunk = item.data?;
///         if chunk.token_ids.contains(&0) {
///             finisher.finish(FinishReason::Stop);
///         }
///         Some(Event::default().data(format!("{:?}", chunk.token_ids)))
///     })
///     .trailer(Event::default().data("[DONE]"))
/// }
/// # let _ = events;
/// ```
pub fn sse_with<F, I>(stream: ResponseStream, map: F) -> SseStream<Finishing<F>>
where
    F: FnMut(Annotated<Chunk>, &mut Finisher<'_>) -> I,
    I: IntoIterator<Item = Event>,
{
    SseStream::new(stream, Finishing(map))
}

/// Ends the request of an [`sse_with`] stream early, from inside its `map`.
#[derive(Debug)]
pub struct Finisher<'a> {
    stream: &'a mut ResponseStream,
}

impl Finisher<'_> {
    /// End the stream with `reason` ([`ResponseStream::finish`]): the next item is the
    /// terminal chunk with that reason. Returns `false`, changing nothing, when the
    /// request is already over for the consumer or a kill or a timeout already owes it
    /// its terminal.
    pub fn finish(&mut self, reason: FinishReason) -> bool {
        self.stream.finish(reason)
    }
}

/// How an [`SseStream`] turns each item into events: any
/// `FnMut(Annotated<Chunk>) -> impl IntoIterator<Item = Event>` (what [`sse`] takes),
/// or a [`Finishing`] map (what [`sse_with`] makes).
pub trait MapEvents {
    /// The events of one item.
    type Events: IntoIterator<Item = Event>;

    /// The events for `item`; `finisher` may end the request early.
    fn events(&mut self, item: Annotated<Chunk>, finisher: &mut Finisher<'_>) -> Self::Events;
}

impl<F, I> MapEvents for F
where
    F: FnMut(Annotated<Chunk>) -> I,
    I: IntoIterator<Item = Event>,
{
    type Events = I;

    fn events(&mut self, item: Annotated<Chunk>, _: &mut Finisher<'_>) -> I {
        self(item)
    }
}

/// The map of an [`sse_with`] stream: it gets a [`Finisher`] with each item.
pub struct Finishing<F>(F);

impl<F, I> MapEvents for Finishing<F>
where
    F: FnMut(Annotated<Chunk>, &mut Finisher<'_>) -> I,
    I: IntoIterator<Item = Event>,
{
    type Events = I;

    fn events(&mut self, item: Annotated<Chunk>, finisher: &mut Finisher<'_>) -> I {
        (self.0)(item, finisher)
    }
}

impl<F> fmt::Debug for Finishing<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Finishing")
    }
}

/// The events of one request's response: made by [`sse`], a
/// `Stream<Item = Result<Event, Infallible>>` for axum's [`Sse`].
///
/// On the wire: the [`leading`](SseStream::leading) events, then `map`'s events for
/// each item of the request's stream, then the [trailer](SseStream::trailer), if any.
/// Dropping it before the request's terminal was read kills the request (see [`sse`]).
#[must_use = "an SSE stream does nothing unless it is returned as a response"]
pub struct SseStream<F> {
    /// The request's stream; `None` once it ended (the trailer is then queued).
    stream: Option<ResponseStream>,
    map: F,
    /// Events decided and not yet sent.
    pending: VecDeque<Event>,
    trailer: Trailer,
}

/// A trailer decided from the request's record.
type TrailerFn = Box<dyn FnOnce(&RequestRecord) -> Option<Event> + Send>;

/// What follows the last item.
enum Trailer {
    None,
    /// Sent after a normal finish only.
    OnFinish(Event),
    /// Decided from the record.
    With(TrailerFn),
}

impl Trailer {
    fn event(self, record: Option<&RequestRecord>) -> Option<Event> {
        let record = record?;
        match self {
            Trailer::None => None,
            Trailer::OnFinish(event) => finished_normally(&record.outcome).then_some(event),
            Trailer::With(f) => f(record),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Trailer::None => "none",
            Trailer::OnFinish(_) => "on finish",
            Trailer::With(_) => "from the record",
        }
    }
}

/// A finish with a reason other than an error: the engine's own end (eos, length,
/// stop, content filter) or an early finish (rule 12).
fn finished_normally(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Finished(reason) if !matches!(reason, FinishReason::Error(_)))
}

impl<F> SseStream<F> {
    fn new(mut stream: ResponseStream, map: F) -> SseStream<F> {
        stream.set_kill_on_drop(true);
        SseStream {
            stream: Some(stream),
            map,
            pending: VecDeque::new(),
            trailer: Trailer::None,
        }
    }

    /// Send `event` first, before the request's first item, as soon as the response
    /// starts (a chat API's role announcement). Called twice, both are sent, in order.
    pub fn leading(mut self, event: Event) -> Self {
        self.pending.push_back(event);
        self
    }

    /// Send `event` after the last item when the request finished normally: its outcome
    /// is `Finished` with a reason other than [`FinishReason::Error`]. Nothing follows an
    /// error item, a timeout or a cancellation (a server-side stop or kill): OpenAI's
    /// `data: [DONE]` follows this rule. Replaces an earlier trailer.
    pub fn trailer(mut self, event: Event) -> Self {
        self.trailer = Trailer::OnFinish(event);
        self
    }

    /// Decide the event after the last item from the request's record (outcome,
    /// cause, tokens, timings), however the request ended: `None` sends nothing.
    /// Replaces an earlier trailer.
    pub fn trailer_with(
        mut self,
        f: impl FnOnce(&RequestRecord) -> Option<Event> + Send + 'static,
    ) -> Self {
        self.trailer = Trailer::With(Box::new(f));
        self
    }

    /// The axum [`Sse`] response, to set its keep-alive
    /// (`.into_sse().keep_alive(KeepAlive::default())`, with axum's `tokio` feature):
    /// comments that keep a silent stream open through proxies and idle timeouts. (A
    /// client that closes its connection is noticed without them: hyper reads the
    /// connection's end and drops the body.)
    pub fn into_sse(self) -> Sse<Self>
    where
        F: MapEvents + Send + 'static,
    {
        Sse::new(self)
    }
}

impl<F: MapEvents> Stream for SseStream<F> {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            let Some(stream) = this.stream.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(&mut *stream).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(item)) => {
                    let mut finisher = Finisher { stream };
                    this.pending.extend(this.map.events(item, &mut finisher));
                }
                Poll::Ready(None) => {
                    // Over for the consumer, so the record is there, and letting the
                    // stream go kills nothing.
                    let trailer = std::mem::replace(&mut this.trailer, Trailer::None);
                    this.pending.extend(trailer.event(stream.record().as_ref()));
                    this.stream = None;
                }
            }
        }
    }
}

// Nothing in an `SseStream` is pinned (the `ResponseStream` is `Unpin`, `map` is only
// called through `&mut`), so it is `Unpin` whatever `F` is.
impl<F> Unpin for SseStream<F> {}

impl<F> IntoResponse for SseStream<F>
where
    F: MapEvents + Send + 'static,
{
    /// `Sse::new(self)` without keep-alive (see [`SseStream::into_sse`]).
    fn into_response(self) -> Response {
        Sse::new(self).into_response()
    }
}

impl<F> fmt::Debug for SseStream<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseStream")
            .field("stream", &self.stream)
            .field("pending", &self.pending.len())
            .field("trailer", &self.trailer.label())
            .finish_non_exhaustive()
    }
}
