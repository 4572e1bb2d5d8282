//! The request parameters that change the output, and the rule `tether serve` holds
//! them to: **a parameter is honoured by the engine, or accepted only at its default**.
//!
//! Owns the table of those parameters ([`TABLE`]: one row per parameter, with its
//! name, the check of its value, the test of its default, the
//! [`SupportedParams`] flag that says the engine honours it and where an honoured value
//! goes in the [`Request`]) and the one function that applies it ([`apply`]). The
//! engine's flags come from the [`EngineConfig`](tether_core::EngineConfig) its `start`
//! returned. Does not read bodies (that is [`super::api`]'s, whose wrong-typed fields
//! are already a 400 naming their path; [`ResponseFormat`], the one shape of its own,
//! is read there) and must not touch anything but these parameters.
//!
//! For each row, in table order:
//! 1. a value out of its range is a 400 `invalid_value` naming the parameter (whether
//!    or not the engine honours it);
//! 2. if the engine honours it, the value goes into the request;
//! 3. otherwise a value other than its default is a 400 `unsupported_parameter` naming
//!    it, and a default is accepted and not passed on (clients that always send the
//!    defaults keep working).
//!
//! | parameter | accepted default | range | carried by |
//! |---|---|---|---|
//! | `temperature` | absent, `1` | `0..=2` | `sampling.temperature` |
//! | `top_p` | absent, `1` | `(0, 1]` | `sampling.top_p` |
//! | `top_k` (vLLM) | absent, `null`, `-1`, `0` | `>= -1` | `sampling.top_k` |
//! | `seed` | absent, `null` | `>= 0` | `sampling.seed` |
//! | `min_tokens` (vLLM) | absent, `0` | `0..=max_tokens` | `stop.min_tokens` |
//! | `ignore_eos` (vLLM) | absent, `false` | | `stop.ignore_eos` |
//! | `presence_penalty` | absent, `0` | `-2..=2` | `sampling.presence_penalty` |
//! | `frequency_penalty` | absent, `0` | `-2..=2` | `sampling.frequency_penalty` |
//! | `repetition_penalty` (vLLM) | absent, `1` | `> 0` | `sampling.repetition_penalty` |
//! | `logit_bias` | absent, `null`, `{}` | | (none) |
//! | `response_format` | absent, `null`, `{"type": "text"}` | `text`, `json_object`, `json_schema` | (none) |
//! | `best_of` (completions) | absent, `1` | `>= 1` | (none) |
//! | `suffix` (completions) | absent, `null`, `""` | | (none) |
//! | `tool_choice` (chat) | absent, `"none"`, `"auto"` | `none`, `auto`, `required`, an object | (none) |
//!
//! `tool_choice: "auto"` counts as a default because a request never reaches this
//! table with tools (`tools` is refused first): with no tools, "auto" calls none.
//! A `temperature` of 1 sent to an engine that samples is passed on (it samples at 1);
//! the same value sent to one that does not is accepted and dropped.

use std::collections::BTreeMap;

use serde::Deserialize;
use tether_core::engine::SupportedParams;
use tether_core::protocol::Request;

use super::error::ApiError;

/// The output-changing parameters of a request body, as they came (their types were
/// checked by the body's parser).
#[derive(Clone, Debug, Default)]
pub(crate) struct Params {
    pub(crate) temperature: Option<f64>,
    pub(crate) top_p: Option<f64>,
    pub(crate) top_k: Option<i64>,
    pub(crate) seed: Option<i64>,
    pub(crate) min_tokens: Option<i64>,
    pub(crate) ignore_eos: Option<bool>,
    pub(crate) presence_penalty: Option<f64>,
    pub(crate) frequency_penalty: Option<f64>,
    pub(crate) repetition_penalty: Option<f64>,
    pub(crate) logit_bias: Option<BTreeMap<String, f64>>,
    pub(crate) response_format: Option<ResponseFormat>,
    /// Completions only.
    pub(crate) best_of: Option<i64>,
    /// Completions only.
    pub(crate) suffix: Option<String>,
    /// Chat only: a string or an object.
    pub(crate) tool_choice: Option<serde_json::Value>,
}

/// `response_format`: only its `type` matters here (a schema rides along unread).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ResponseFormat {
    #[serde(rename = "type")]
    pub(crate) kind: String,
}

/// One parameter of the table.
pub(crate) struct Row {
    /// Its name in the request body (the error's `param`).
    pub(crate) name: &'static str,
    /// What a client may send when the engine does not honour it, for the message.
    pub(crate) default: &'static str,
    /// Check the value's range, given the request's `max_tokens`; answers whether it
    /// is set to something other than its default.
    check: fn(&Params, u32) -> Result<bool, ApiError>,
    /// The flag that says the engine honours it; `None` when no [`Request`] field
    /// carries it (then only its default is ever accepted).
    pub(crate) honoured_by: Option<fn(SupportedParams) -> bool>,
    /// Put an honoured (and checked) value into the request.
    put: fn(&Params, &mut Request),
}

/// Every output-changing parameter `tether serve` knows (see the module docs).
pub(crate) const TABLE: &[Row] = &[
    Row {
        name: "temperature",
        default: "1",
        check: |p, _| {
            in_range(p.temperature, "temperature", "between 0 and 2", |t| {
                (0.0..=2.0).contains(&t)
            })?;
            Ok(p.temperature.is_some_and(|t| t != 1.0))
        },
        honoured_by: Some(|s| s.temperature),
        put: |p, r| r.sampling.temperature = p.temperature.map(|t| t as f32),
    },
    Row {
        name: "top_p",
        default: "1",
        check: |p, _| {
            in_range(p.top_p, "top_p", "in (0, 1]", |v| v > 0.0 && v <= 1.0)?;
            Ok(p.top_p.is_some_and(|v| v != 1.0))
        },
        honoured_by: Some(|s| s.top_p),
        put: |p, r| r.sampling.top_p = p.top_p.map(|v| v as f32),
    },
    Row {
        name: "top_k",
        default: "-1 or 0 (no limit)",
        check: |p, _| {
            in_range(p.top_k, "top_k", "-1 (no limit) or more", |k| {
                k >= -1 && k <= i64::from(u32::MAX)
            })?;
            Ok(p.top_k.is_some_and(|k| k > 0))
        },
        honoured_by: Some(|s| s.top_k),
        put: |p, r| {
            r.sampling.top_k = p
                .top_k
                .filter(|&k| k > 0)
                .and_then(|k| u32::try_from(k).ok());
        },
    },
    Row {
        name: "seed",
        default: "no seed",
        check: |p, _| {
            in_range(p.seed, "seed", "at least 0", |s| s >= 0)?;
            Ok(p.seed.is_some())
        },
        honoured_by: Some(|s| s.seed),
        put: |p, r| r.sampling.seed = p.seed.and_then(|s| u64::try_from(s).ok()),
    },
    Row {
        name: "min_tokens",
        default: "0",
        check: |p, max_tokens| {
            if let Some(n) = p.min_tokens {
                if n < 0 || n > i64::from(max_tokens) {
                    return Err(invalid(
                        "min_tokens",
                        format!(
                            "`min_tokens` must be between 0 and max_tokens ({max_tokens}), got {n}"
                        ),
                    ));
                }
            }
            Ok(p.min_tokens.is_some_and(|n| n > 0))
        },
        honoured_by: Some(|s| s.min_tokens),
        put: |p, r| {
            r.stop.min_tokens = p
                .min_tokens
                .filter(|&n| n > 0)
                .and_then(|n| u32::try_from(n).ok());
        },
    },
    Row {
        name: "ignore_eos",
        default: "false",
        check: |p, _| Ok(p.ignore_eos == Some(true)),
        honoured_by: Some(|s| s.ignore_eos),
        put: |p, r| r.stop.ignore_eos = p.ignore_eos == Some(true),
    },
    Row {
        name: "presence_penalty",
        default: "0",
        check: |p, _| penalty(p.presence_penalty, "presence_penalty"),
        honoured_by: Some(|s| s.presence_penalty),
        put: |p, r| r.sampling.presence_penalty = narrow(p.presence_penalty).filter(|&v| v != 0.0),
    },
    Row {
        name: "frequency_penalty",
        default: "0",
        check: |p, _| penalty(p.frequency_penalty, "frequency_penalty"),
        honoured_by: Some(|s| s.frequency_penalty),
        put: |p, r| {
            r.sampling.frequency_penalty = narrow(p.frequency_penalty).filter(|&v| v != 0.0);
        },
    },
    Row {
        name: "repetition_penalty",
        default: "1",
        check: |p, _| {
            in_range(p.repetition_penalty, "repetition_penalty", "above 0", |v| {
                // Also within f32's range, where the request carries it.
                v > 0.0 && (v as f32).is_finite()
            })?;
            Ok(p.repetition_penalty.is_some_and(|v| v != 1.0))
        },
        honoured_by: Some(|s| s.repetition_penalty),
        put: |p, r| {
            r.sampling.repetition_penalty = narrow(p.repetition_penalty).filter(|&v| v != 1.0);
        },
    },
    Row {
        name: "logit_bias",
        default: "{}",
        check: |p, _| Ok(p.logit_bias.as_ref().is_some_and(|m| !m.is_empty())),
        honoured_by: None,
        put: |_, _| {},
    },
    Row {
        name: "response_format",
        default: r#"{"type": "text"}"#,
        check: |p, _| match p.response_format.as_ref().map(|f| f.kind.as_str()) {
            None | Some("text") => Ok(false),
            Some("json_object" | "json_schema") => Ok(true),
            Some(other) => Err(invalid(
                "response_format",
                format!(
                    "`response_format.type` must be text, json_object or json_schema, got {other:?}"
                ),
            )),
        },
        honoured_by: None,
        put: |_, _| {},
    },
    Row {
        name: "best_of",
        default: "1",
        check: |p, _| {
            in_range(p.best_of, "best_of", "at least 1", |n| n >= 1)?;
            Ok(p.best_of.is_some_and(|n| n != 1))
        },
        honoured_by: None,
        put: |_, _| {},
    },
    Row {
        name: "suffix",
        default: r#""""#,
        check: |p, _| Ok(p.suffix.as_ref().is_some_and(|s| !s.is_empty())),
        honoured_by: None,
        put: |_, _| {},
    },
    Row {
        name: "tool_choice",
        default: r#""none" (or "auto": no tools are accepted)"#,
        check: |p, _| {
            use serde_json::Value;
            match &p.tool_choice {
                None | Some(Value::Null) => Ok(false),
                Some(Value::String(s)) => match s.as_str() {
                    "none" | "auto" => Ok(false),
                    "required" => Ok(true),
                    other => Err(invalid(
                        "tool_choice",
                        format!("`tool_choice` must be none, auto, required or an object, got {other:?}"),
                    )),
                },
                Some(Value::Object(_)) => Ok(true),
                Some(other) => Err(invalid(
                    "tool_choice",
                    format!("`tool_choice` must be a string or an object, got {other}"),
                )),
            }
        },
        honoured_by: None,
        put: |_, _| {},
    },
];

fn invalid(param: &str, message: String) -> ApiError {
    ApiError::invalid("invalid_value", Some(param), message)
}

/// `Err` naming `name` when `value` is set and not `ok`.
fn in_range<T: Copy + std::fmt::Display>(
    value: Option<T>,
    name: &str,
    range: &str,
    ok: impl Fn(T) -> bool,
) -> Result<(), ApiError> {
    match value {
        Some(v) if !ok(v) => Err(invalid(name, format!("`{name}` must be {range}, got {v}"))),
        _ => Ok(()),
    }
}

/// A checked value as the request carries it.
fn narrow(value: Option<f64>) -> Option<f32> {
    value.map(|v| v as f32)
}

/// A penalty: `-2..=2`, its default 0.
fn penalty(value: Option<f64>, name: &str) -> Result<bool, ApiError> {
    in_range(value, name, "between -2 and 2", |v| {
        (-2.0..=2.0).contains(&v)
    })?;
    Ok(value.is_some_and(|v| v != 0.0))
}

/// Hold `params` to the rule (see the module docs) for an engine that honours
/// `supported`, and put the honoured ones into `request` (whose `max_tokens` is
/// `max_tokens`). The first parameter at fault, in table order, is the error's
/// `param`.
pub(crate) fn apply(
    params: &Params,
    supported: SupportedParams,
    max_tokens: u32,
    request: &mut Request,
) -> Result<(), ApiError> {
    for row in TABLE {
        let set = (row.check)(params, max_tokens)?;
        if row.honoured_by.is_some_and(|flag| flag(supported)) {
            (row.put)(params, request);
        } else if set {
            return Err(ApiError::invalid(
                "unsupported_parameter",
                Some(row.name),
                format!(
                    "`{}` is not supported by this server's engine; leave it out or send its default ({})",
                    row.name, row.default
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
