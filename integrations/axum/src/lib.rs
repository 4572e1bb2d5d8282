//! # tether-axum
//!
//! Server-sent events for axum handlers over a tether [`ResponseStream`](tether_core::ResponseStream), where a
//! client that goes away really stops the engine.
//!
//! [`sse`] turns the stream into an [`SseStream`] (the events of an axum
//! [`Sse`](axum::response::sse::Sse) response) with your own mapping from each
//! [`Annotated<Chunk>`](tether_core::Annotated) to wire events, an optional
//! [trailer](SseStream::trailer) (`data: [DONE]`) and optional
//! [leading](SseStream::leading) events. When the client disconnects, hyper drops the
//! response body; if the request's terminal was not read yet, its context is killed
//! with [`Cause::ClientDisconnect`](tether_core::Cause::ClientDisconnect), the engine
//! is aborted exactly once and the request is recorded `Cancelled`, never `Dropped`
//! (SPEC rule 4, kill-on-drop).
//!
//! A client can also leave while the handler still awaits the engine's setup: start
//! the request with [`kill_on_drop(true)`](tether_core::Generate::kill_on_drop) (or
//! [`AdapterConfig::kill_on_drop`](tether_core::AdapterConfig::kill_on_drop) for the
//! whole adapter) so that this, too, is a kill with cause client disconnect. The same
//! setting covers non-streaming handlers that read the stream themselves.
//!
//! ```
//! use axum::extract::State;
//! use axum::http::StatusCode;
//! use axum::response::sse::{Event, KeepAlive};
//! use axum::response::{IntoResponse, Response};
//! use axum::routing::post;
//! use axum::Router;
//! use tether_core::{Adapter, Request};
//!
//! /// `POST /generate` with the prompt as the body: one SSE event per chunk.
//! async fn generate(State(adapter): State<Adapter>, prompt: String) -> Response {
//!     let request = Request::new("req-1", "sim", prompt.bytes().map(u32::from).collect())
//!         .with_max_tokens(64);
//!     let stream = match adapter.request(request).kill_on_drop(true).await {
//!         Ok(stream) => stream,
//!         Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
//!     };
//!     tether_axum::sse(stream, |item| match (item.data, item.error) {
//!         (_, Some(err)) => Some(Event::default().event("error").data(err.to_string())),
//!         (Some(chunk), None) => Some(Event::default().data(format!("{:?}", chunk.token_ids))),
//!         (None, None) => None,
//!     })
//!     .trailer(Event::default().data("[DONE]"))
//!     .into_sse()
//!     .keep_alive(KeepAlive::default())
//!     .into_response()
//! }
//!
//! fn app(adapter: Adapter) -> Router {
//!     Router::new().route("/generate", post(generate)).with_state(adapter)
//! }
//! # let _ = app;
//! ```
//!
//! A handler that ends requests itself (a stop string matched in the decoded text,
//! SPEC rule 12) uses [`sse_with`]: its map also gets a [`Finisher`].
//!
//! To send usage and timings when the request is over, start it with
//! [`on_record`](tether_core::Generate::on_record), or build the trailer from the record
//! with [`SseStream::trailer_with`].
//!
//! This crate needs no axum feature; keep-alive (`Sse::keep_alive`) needs axum's
//! `tokio` feature, which an application serving with `axum::serve` has anyway.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod sse;

pub use sse::{sse, sse_with, Finisher, Finishing, MapEvents, SseStream};
