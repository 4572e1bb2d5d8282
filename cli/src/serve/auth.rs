//! Who may call `tether serve`: the API key (`--api-key`, [`RequireApiKey`], checked
//! by tower-http's `ValidateRequestHeaderLayer`) and the browser origins allowed by
//! `--cors-allow-origin` ([`cors_layer`], tower-http's `CorsLayer`).
//!
//! Owns which paths need the key, how a bearer token is compared, the 401 answer and
//! the CORS policy; what an admitted request does is the handlers' business. A key is
//! never logged or echoed: [`ApiKey`]'s `Debug` is redacted, and no answer quotes the
//! token a client sent.
//!
//! # The key
//! With a key set, every request to a path under `/v1/` (unknown ones included) and
//! to `/tokenize` and `/detokenize` must carry `Authorization: Bearer KEY` (the scheme
//! is case-insensitive, RFC 9110 §11.1); anything else gets a 401 with an OpenAI error
//! object (`invalid_request_error`, code `invalid_api_key`) and `WWW-Authenticate:
//! Bearer`. `/health`, `/health/canary`, `/ping`, `/metrics` and `/version` stay
//! open: orchestrators and scrapers carry no key. The token is compared in constant
//! time ([`subtle::ConstantTimeEq`]): how long the answer takes does not tell how
//! many leading bytes of a guess were right (only whether its length was).
//!
//! # CORS
//! Off unless origins are given: no CORS header is added to any answer. With origins,
//! tower-http answers every `OPTIONS` request itself (a preflight carries no
//! credentials, so it never reaches the key check) and adds the CORS headers to the
//! other answers, 401s included, so a browser can read why it was refused. Methods
//! `GET`, `POST`, `OPTIONS`; request headers `authorization`, `content-type`,
//! `x-request-id`, `traceparent`; exposed: `x-request-id`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Response};
use axum::response::IntoResponse;
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::validate_request::ValidateRequest;

use super::access::REQUEST_ID;
use super::error::ApiError;

/// The key clients must send as `Authorization: Bearer KEY`. Its `Debug` never shows
/// it. Any string parses; the server refuses to start with one that no client could
/// send (empty, or with characters other than visible ASCII).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// A key (checked when the server starts, see [`ApiKey::check`]).
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(Arc::from(key.into()))
    }

    /// Whether a client can send this key in a header: non-empty, visible ASCII only
    /// (`!` to `~`, no spaces). The message does not quote the key.
    pub fn check(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("--api-key must not be empty".to_owned());
        }
        if !self.0.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "--api-key must be visible ASCII without spaces (a bearer token)".to_owned(),
            );
        }
        Ok(())
    }

    /// Whether `token` is this key, in time that depends on their lengths only.
    fn matches(&self, token: &[u8]) -> bool {
        bool::from(self.0.as_bytes().ct_eq(token))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl FromStr for ApiKey {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<ApiKey, Self::Err> {
        Ok(ApiKey::new(s))
    }
}

/// Whether a request to `path` needs the key (when one is set).
pub(crate) fn needs_key(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize"
}

/// What the `Authorization` header of a request holds.
#[derive(Debug, PartialEq, Eq)]
enum Credentials<'a> {
    /// No `Authorization` header.
    Missing,
    /// A scheme other than `Bearer`, or no token after it.
    NotBearer,
    /// A bearer token.
    Bearer(&'a [u8]),
}

fn credentials(value: Option<&HeaderValue>) -> Credentials<'_> {
    let Some(value) = value else {
        return Credentials::Missing;
    };
    let bytes = value.as_bytes();
    let (scheme, rest) = match bytes.iter().position(|&b| b == b' ') {
        Some(i) => (&bytes[..i], &bytes[i..]),
        None => (bytes, &[][..]),
    };
    let token = rest.trim_ascii_start();
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.is_empty() {
        return Credentials::NotBearer;
    }
    Credentials::Bearer(token)
}

/// The `--api-key` check, for tower-http's `ValidateRequestHeaderLayer::custom`.
#[derive(Clone, Debug)]
pub(crate) struct RequireApiKey {
    key: ApiKey,
}

impl RequireApiKey {
    /// Require `key` on the paths that [`needs_key`].
    pub(crate) fn new(key: ApiKey) -> RequireApiKey {
        RequireApiKey { key }
    }
}

impl<B> ValidateRequest<B> for RequireApiKey {
    type ResponseBody = Body;

    fn validate(&mut self, request: &mut Request<B>) -> Result<(), Response<Body>> {
        if !needs_key(request.uri().path()) {
            return Ok(());
        }
        let message = match credentials(request.headers().get(header::AUTHORIZATION)) {
            Credentials::Bearer(token) if self.key.matches(token) => return Ok(()),
            Credentials::Bearer(_) => "incorrect API key",
            Credentials::Missing => "no API key: send it as the header `Authorization: Bearer KEY`",
            Credentials::NotBearer => {
                "the Authorization header must use the Bearer scheme: `Authorization: Bearer KEY`"
            }
        };
        let mut response = ApiError::invalid_api_key(message).into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Err(response)
    }
}

/// The request header that carries a W3C trace context.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The CORS layer for `origins` (`--cors-allow-origin`, each `scheme://host[:port]`,
/// or `*` alone for any origin); `None` when there are none (CORS off). The error
/// says which origin is malformed.
pub(crate) fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        if origins.len() > 1 {
            return Err(
                "--cors-allow-origin `*` allows any origin: give it alone, or list origins"
                    .to_owned(),
            );
        }
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|o| origin_value(o))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                REQUEST_ID,
                TRACEPARENT,
            ])
            .expose_headers([REQUEST_ID]),
    ))
}

/// An origin as browsers send it (`Origin: https://app.example:8443`): a scheme, `://`
/// and a host with an optional port, nothing after. Lowercased: schemes and hosts are
/// case-insensitive and browsers send them in lowercase, while the CORS layer compares
/// bytes.
fn origin_value(origin: &str) -> Result<HeaderValue, String> {
    let bad = |why: &str| {
        Err(format!(
            "--cors-allow-origin {origin:?} is not an origin ({why}; e.g. `https://app.example:8443`, or `*`)"
        ))
    };
    let Some((scheme, host)) = origin.split_once("://") else {
        return bad("no `://`");
    };
    if scheme.is_empty() || host.is_empty() {
        return bad("no scheme or no host");
    }
    if host.contains(['/', '?', '#']) {
        return bad("an origin has no path");
    }
    match HeaderValue::from_str(&origin.to_ascii_lowercase()) {
        Ok(value) => Ok(value),
        Err(_) => bad("not a valid header value"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(value: &'static str) -> Option<HeaderValue> {
        Some(HeaderValue::from_static(value))
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_nothing_else_is() {
        assert_eq!(credentials(None), Credentials::Missing);
        assert_eq!(
            credentials(auth("Bearer sk-1").as_ref()),
            Credentials::Bearer(b"sk-1")
        );
        assert_eq!(
            credentials(auth("bearer   sk-1").as_ref()),
            Credentials::Bearer(b"sk-1")
        );
        for value in ["Basic c2stMQ==", "Bearer", "Bearer ", "sk-1", "Bearersk-1"] {
            let header = HeaderValue::from_str(value).unwrap();
            assert_eq!(
                credentials(Some(&header)),
                Credentials::NotBearer,
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_key_matches_itself_only() {
        let key = ApiKey::new("sk-right");
        assert!(key.matches(b"sk-right"));
        for wrong in [&b"sk-wrong"[..], b"sk-righ", b"sk-right!", b"", b"SK-RIGHT"] {
            assert!(!key.matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn unusable_keys_are_refused_without_being_quoted() {
        assert_eq!(ApiKey::new("sk-ok_1.2~").check(), Ok(()));
        for bad in ["", "two words", "tab\there", "naïve"] {
            let err = ApiKey::new(bad).check().unwrap_err();
            assert!(bad.is_empty() || !err.contains(bad), "{err}");
        }
        assert_eq!(
            format!("{:?}", ApiKey::new("sk-secret")),
            "ApiKey(<redacted>)"
        );
    }

    #[test]
    fn the_key_guards_v1_and_the_tokenizer_only() {
        for path in ["/v1", "/v1/models", "/v1/nope", "/tokenize", "/detokenize"] {
            assert!(needs_key(path), "{path}");
        }
        for path in [
            "/health",
            "/health/canary",
            "/ping",
            "/metrics",
            "/version",
            "/v1x",
            "/",
        ] {
            assert!(!needs_key(path), "{path}");
        }
    }

    #[test]
    fn origins_are_checked_and_star_stands_alone() {
        let origins = |list: &[&str]| list.iter().map(|o| (*o).to_owned()).collect::<Vec<_>>();
        assert!(cors_layer(&[]).unwrap().is_none());
        assert!(cors_layer(&origins(&["*"])).unwrap().is_some());
        assert!(
            cors_layer(&origins(&["https://a.example", "http://b.example:8080"]))
                .unwrap()
                .is_some()
        );
        assert_eq!(
            origin_value("HTTPS://App.Example").unwrap(),
            "https://app.example"
        );
        for bad in [
            "a.example",
            "https://a.example/",
            "https://",
            "://a.example",
            "https://a.example?x",
        ] {
            let err = cors_layer(&origins(&[bad])).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        let err = cors_layer(&origins(&["*", "https://a.example"])).unwrap_err();
        assert!(err.contains("give it alone"), "{err}");
    }
}
