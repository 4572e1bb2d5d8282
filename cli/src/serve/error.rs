//! [`ApiError`]: every error `tether serve` answers with, as an HTTP status and an
//! OpenAI-style body `{"error": {"message", "type", "param", "code"}}`, and the JSON
//! body extractor ([`OpenAiJson`]) whose rejections take that shape instead of axum's.
//!
//! Owns the mapping from bad input and engine errors to statuses and error objects;
//! nothing here runs a request.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tether_core::error::{EngineError, ErrorKind};

/// The largest request body accepted (bigger bodies get a 413).
pub(crate) const MAX_BODY_BYTES: usize = 4 << 20;

/// An error answer: its status and the OpenAI error object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ApiError {
    /// The HTTP status.
    pub(crate) status: StatusCode,
    /// The error object.
    pub(crate) body: ErrorObject,
}

/// The OpenAI error object (`{"error": <this>}` on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct ErrorObject {
    /// What went wrong, for people.
    pub(crate) message: String,
    /// The error class: `invalid_request_error`, `not_found_error`, `server_error`,
    /// `timeout_error` or `service_unavailable_error`.
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    /// The request field at fault, if one is (`max_tokens`, `messages[0].role`).
    pub(crate) param: Option<String>,
    /// A machine-readable code (`invalid_json`, `model_not_found`, ...).
    pub(crate) code: Option<&'static str>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a ErrorObject,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        param: Option<&str>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            body: ErrorObject {
                message: message.into(),
                kind,
                param: param.map(str::to_owned),
                code: Some(code),
            },
        }
    }

    /// A 400 `invalid_request_error` about `param`.
    pub(crate) fn invalid(
        code: &'static str,
        param: Option<&str>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            param,
            message,
        )
    }

    /// A 404 for a model this server does not serve.
    pub(crate) fn unknown_model(model: &str, served: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            Some("model"),
            format!("the model `{model}` does not exist; this server serves `{served}`"),
        )
    }

    /// A 404 for a path with no endpoint.
    pub(crate) fn no_route(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "unknown_url",
            None,
            format!("no endpoint at {path}"),
        )
    }

    /// A 405 for a known path and the wrong method.
    pub(crate) fn wrong_method() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            None,
            "method not allowed for this endpoint",
        )
    }

    /// A 401: the request did not carry the server's API key (`invalid_request_error`
    /// with code `invalid_api_key`, as OpenAI answers). `message` must not quote the
    /// key that was sent.
    pub(crate) fn invalid_api_key(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            None,
            message,
        )
    }

    /// A 503: the server is shutting down and the request was cancelled.
    pub(crate) fn shutting_down() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            "shutting_down",
            None,
            "the request was cancelled: the server is shutting down",
        )
    }

    /// The answer to an engine error, at setup or mid-request: a 400 for a request
    /// the engine refused, a 504 for a timeout, a 503 for an engine that is not
    /// available, a 500 otherwise.
    pub(crate) fn from_engine(err: &EngineError) -> ApiError {
        let message = err.to_string();
        match err.kind() {
            ErrorKind::InvalidArgument => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                None,
                message,
            ),
            ErrorKind::FirstTokenTimeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                "first_token_timeout",
                None,
                message,
            ),
            ErrorKind::InterTokenTimeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                "inter_token_timeout",
                None,
                message,
            ),
            ErrorKind::Unavailable | ErrorKind::ResourceExhausted => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable_error",
                "engine_unavailable",
                None,
                message,
            ),
            ErrorKind::Cancelled => ApiError::shutting_down(),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "engine_error",
                None,
                message,
            ),
        }
    }

    /// The body as JSON: `{"error": {...}}`.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(&Envelope { error: &self.body }).unwrap_or_else(|_| {
            r#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#
                .to_owned()
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.to_json(),
        )
            .into_response()
    }
}

/// A JSON request body parsed into `T`; every way it can fail is an [`ApiError`]:
/// 415 unless the `content-type` is `application/json` (parameters such as a charset
/// allowed, and `application/*+json`), 413 for a body over [`MAX_BODY_BYTES`], 400
/// for a body that is not valid JSON or not the request's shape.
#[derive(Debug)]
pub(crate) struct OpenAiJson<T>(pub(crate) T);

impl<T, S> FromRequest<S> for OpenAiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req.headers().get(axum::http::header::CONTENT_TYPE);
        if !content_type.is_some_and(is_json) {
            let got = content_type
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| "none".to_owned(), |v| format!("`{v}`"));
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
                None,
                format!("the body must be JSON with `content-type: application/json`; got {got}"),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "invalid_request_error",
                    "request_too_large",
                    None,
                    format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::invalid("invalid_body", None, rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(OpenAiJson)
    }
}

/// Whether a `content-type` value names JSON: `application/json` or
/// `application/<anything>+json`, any case, with or without parameters.
fn is_json(value: &axum::http::HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json")
            || sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// Parse `bytes` as a `T`, turning serde's error into an [`ApiError`] that names the
/// field at fault.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut *de).map_err(|err| {
        let path = err.path().to_string();
        data_error(&path, err.inner())
    })?;
    // Trailing characters after the value are malformed JSON too.
    de.end().map_err(|e| data_error(".", &e))?;
    Ok(value)
}

/// Parse an already parsed JSON `value` as a `T`, with the errors of [`parse_json`]
/// (for a body read once and then looked at as more than one shape).
pub(crate) fn parse_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        data_error(&path, err.inner())
    })
}

fn data_error(path: &str, inner: &serde_json::Error) -> ApiError {
    let message = inner.to_string();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            ApiError::invalid(
                "invalid_json",
                None,
                format!("the body is not valid JSON: {message}"),
            )
        }
        serde_json::error::Category::Data | serde_json::error::Category::Io => {
            if let Some(field) = missing_field(&message) {
                let param = if path == "." {
                    field.to_owned()
                } else {
                    format!("{path}.{field}")
                };
                ApiError::invalid(
                    "missing_required_parameter",
                    Some(&param),
                    format!("missing required parameter `{param}`"),
                )
            } else {
                let param = (path != ".").then_some(path);
                let what = param.map_or_else(String::new, |p| format!("`{p}`: "));
                ApiError::invalid("invalid_type", param, format!("{what}{message}"))
            }
        }
    }
}

/// The field name in serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        model: String,
        max_tokens: Option<i64>,
        messages: Option<Vec<Msg>>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Msg {
        role: String,
    }

    #[test]
    fn syntax_errors_are_invalid_json() {
        let e = parse_json::<Body>(b"{\"model\": ").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body.code, Some("invalid_json"));
        assert_eq!(e.body.param, None);
        let e = parse_json::<Body>(b"{\"model\": \"m\"} x").unwrap_err();
        assert_eq!(e.body.code, Some("invalid_json"));
    }

    #[test]
    fn missing_and_wrong_typed_fields_name_the_param() {
        let e = parse_json::<Body>(b"{}").unwrap_err();
        assert_eq!(
            (e.body.code, e.body.param.as_deref()),
            (Some("missing_required_parameter"), Some("model"))
        );
        let e = parse_json::<Body>(br#"{"model": 3}"#).unwrap_err();
        assert_eq!(
            (e.body.code, e.body.param.as_deref()),
            (Some("invalid_type"), Some("model"))
        );
        let e = parse_json::<Body>(br#"{"model": "m", "max_tokens": "many"}"#).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("max_tokens"));
        let e = parse_json::<Body>(br#"{"model": "m", "messages": [{"role": 1}]}"#).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("messages[0].role"));
        let e = parse_json::<Body>(br#"{"model": "m", "messages": [{}]}"#).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn only_json_content_types_are_json() {
        let json = |v: &str| is_json(&axum::http::HeaderValue::from_str(v).unwrap());
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/merge-patch+json",
        ] {
            assert!(json(yes), "{yes}");
        }
        for no in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonx",
            "application/+json",
            "json",
            "",
            "multipart/form-data; boundary=x",
        ] {
            assert!(!json(no), "{no}");
        }
    }

    #[test]
    fn a_parsed_value_names_the_param_too() {
        let e = parse_value::<Body>(serde_json::json!({"model": "m", "messages": [{"role": 1}]}))
            .unwrap_err();
        assert_eq!(
            (e.body.code, e.body.param.as_deref()),
            (Some("invalid_type"), Some("messages[0].role"))
        );
        let e = parse_value::<Body>(serde_json::json!({})).unwrap_err();
        assert_eq!(
            (e.body.code, e.body.param.as_deref()),
            (Some("missing_required_parameter"), Some("model"))
        );
        assert_eq!(
            parse_value::<Body>(serde_json::json!({"model": "m"}))
                .unwrap()
                .model,
            "m"
        );
    }

    #[test]
    fn a_missing_key_is_a_401_invalid_api_key() {
        let e = ApiError::invalid_api_key("no key");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "no key", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
        );
    }

    #[test]
    fn the_body_is_an_openai_error_object() {
        let e = ApiError::invalid("invalid_value", Some("n"), "n must be 1");
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "n must be 1", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}})
        );
    }
}
