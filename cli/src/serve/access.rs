//! The middleware every HTTP request goes through (`observe`): it counts the response
//! by endpoint and status, counts a client that went away first, and writes the access
//! log, one line per request, exactly.
//!
//! Owns the access log line (target [`TARGET`], level info) and the request's
//! `RequestIdSlot`; what a request does is the handlers' business.
//!
//! # When the line is written
//! - A response whose body is known in full (every JSON response): when its head is
//!   handed to hyper; `duration_ms` ends there.
//! - A streamed response (SSE): when its body ends, so `duration_ms` covers the whole
//!   stream; a body dropped before its end (the client went away) is logged then, with
//!   its status and `client_gone=true`.
//! - No response at all (the client went away while the handler ran, a request still
//!   in the engine's setup included): status 499, `client_gone=true`.
//!
//! Fields: `method`, `path`, `status`, `duration_ms`, `request_id` (the handler's id,
//! unique; absent for requests that never got one, such as a rejected body or a
//! scrape), `client_request_id` (the client's own `x-request-id`, when it sent one:
//! clients reuse them, so it is logged beside ours, never instead), `client_gone`.
//!
//! The response's `x-request-id` header is the client's own id when it sent one
//! (echoed as it came), else the handler's id.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, BodyDataStream, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, Response};
use axum::middleware::Next;
use futures_util::Stream;

use super::metrics::{self, Metrics};
use super::App;

/// The tracing target of the access log.
pub const TARGET: &str = "tether::access";

/// The response header that carries a request's id.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client `x-request-id` that is logged and put on the span (a longer one
/// is still echoed, untouched).
const MAX_CLIENT_ID: usize = 256;

/// Where a handler puts the id it gave its request, for the access log (which also
/// needs it when the handler never answers), beside the id the client sent, if any.
/// One per HTTP request, in its extensions.
#[derive(Clone, Debug, Default)]
pub(crate) struct RequestIdSlot {
    id: Arc<OnceLock<String>>,
    /// The client's own `x-request-id`, when it sent a loggable one.
    client: Option<Arc<str>>,
    /// The client sent an `x-request-id` (loggable or not): it is echoed as it came.
    client_sent: bool,
}

impl RequestIdSlot {
    /// The slot of a request with these headers.
    fn new(headers: &axum::http::HeaderMap) -> RequestIdSlot {
        let sent = headers.get(REQUEST_ID);
        RequestIdSlot {
            id: Arc::default(),
            client: sent
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= MAX_CLIENT_ID)
                .map(Arc::from),
            client_sent: sent.is_some(),
        }
    }

    /// Record `id` (the first one wins).
    pub(crate) fn set(&self, id: &str) {
        let _ = self.id.set(id.to_owned());
    }

    /// The id the client gave the request (`x-request-id`), if it sent a loggable one
    /// (visible ASCII, at most 256 bytes).
    pub(crate) fn client(&self) -> Option<&str> {
        self.client.as_deref()
    }

    /// The `x-request-id` header for the recorded id, if there is one and the client
    /// sent none (a client's own id is echoed instead, by the router's
    /// `PropagateRequestIdLayer`).
    pub(crate) fn header(&self) -> Option<(HeaderName, HeaderValue)> {
        if self.client_sent {
            return None;
        }
        let value = HeaderValue::from_str(self.get()?).ok()?;
        Some((REQUEST_ID, value))
    }

    fn get(&self) -> Option<&str> {
        self.id.get().map(String::as_str)
    }
}

/// One HTTP request's access record: logged exactly once, when it completes or when it
/// is dropped (the client went away).
struct Access {
    metrics: Arc<Metrics>,
    method: Method,
    path: String,
    endpoint: &'static str,
    started: Instant,
    id: RequestIdSlot,
    /// The response's status, once there is a response.
    status: Option<u16>,
    logged: bool,
}

impl Access {
    /// Write the line (once). `client_gone`: the client left before the response was
    /// complete (it is then also counted).
    fn log(&mut self, client_gone: bool) {
        if std::mem::replace(&mut self.logged, true) {
            return;
        }
        if client_gone {
            self.metrics.client_disconnect(self.endpoint);
        }
        let micros = self.started.elapsed().as_micros();
        // Microseconds to milliseconds with three decimals.
        let duration_ms = micros as f64 / 1000.0;
        tracing::info!(
            target: TARGET,
            method = %self.method,
            path = %self.path,
            status = self.status.unwrap_or(499),
            duration_ms,
            request_id = self.id.get().map(tracing::field::display),
            client_request_id = self.id.client().map(tracing::field::display),
            client_gone,
        );
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        if self.logged {
            return;
        }
        if self.status.is_none() {
            // No response ever was: counted as 499, never as a 5xx.
            self.metrics.http_response(self.endpoint, 499);
        }
        self.log(true);
    }
}

/// A streamed body that logs its request's access line when it ends or is dropped.
struct Logged {
    inner: BodyDataStream,
    access: Access,
}

impl Stream for Logged {
    type Item = <BodyDataStream as Stream>::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(None) = item {
            self.access.log(false);
        }
        item
    }
}

/// The middleware: see the [module docs](self).
pub(crate) async fn observe(
    State(app): State<Arc<App>>,
    mut req: Request,
    next: Next,
) -> Response<Body> {
    let id = RequestIdSlot::new(req.headers());
    req.extensions_mut().insert(id.clone());
    let mut access = Access {
        metrics: app.metrics.clone(),
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        endpoint: metrics::http_endpoint(req.uri().path()),
        started: Instant::now(),
        id,
        status: None,
        logged: false,
    };
    let response = next.run(req).await;
    let status = response.status().as_u16();
    app.metrics.http_response(access.endpoint, status);
    access.status = Some(status);
    if response.body().size_hint().exact().is_some() {
        access.log(false);
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = Body::from_stream(Logged {
        inner: body.into_data_stream(),
        access,
    });
    Response::from_parts(parts, body)
}
