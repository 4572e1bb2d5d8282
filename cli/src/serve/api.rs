//! The OpenAI request and response shapes `tether serve` speaks, and the validation
//! that turns a request body into a tether [`Request`].
//!
//! Owns the request bodies of `/v1/completions` and `/v1/chat/completions` and the
//! rules a request must pass; the response shapes are [`super::responses`]'s, running
//! a request is [`super::handlers`]'s job.
//!
//! Rules: `model` must be the served model (else 404); the prompt must be non-empty and
//! at most `max_prompt_tokens` byte tokens; `max_tokens` (or `max_completion_tokens`)
//! must be in `0..=max_tokens_limit` (default 16); `n` must be 1; `stop` is at most 4
//! non-empty strings of any length (matched on the decoded text, see [`super::stop`]);
//! `stream_options` only with `stream: true`; `echo`, `logprobs`, tools are not
//! supported. The parameters that change the output (`temperature`, `top_p`, `top_k`,
//! `seed`, `min_tokens`, `ignore_eos`, the penalties, `logit_bias`, `response_format`,
//! `best_of`, `suffix`, `tool_choice`) are honoured by the engine or accepted only at
//! their defaults, else a 400 `unsupported_parameter` names them ([`super::params`]
//! has the table and the ranges). The extension field `annotations` (a list of
//! strings) is passed to the engine, except `chaos:` annotations, which are dropped
//! unless the server runs with `--allow-chaos`.

use std::collections::BTreeMap;

use serde::Deserialize;
use tether_core::engine::SupportedParams;
use tether_core::protocol::Request;

use super::error::ApiError;
use super::params::{self, Params, ResponseFormat};
use super::tokenizer::{self, Message};

/// The limits a request is checked against.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    /// The served model name.
    pub(crate) model: String,
    /// The longest prompt, in (byte) tokens.
    pub(crate) max_prompt_tokens: usize,
    /// The largest `max_tokens`.
    pub(crate) max_tokens_limit: u32,
    /// `max_tokens` when the request sets none.
    pub(crate) default_max_tokens: u32,
    /// Keep `chaos:` annotations (for testing the server against injected faults).
    pub(crate) allow_chaos: bool,
    /// The output-changing parameters the engine honours (from its `start`).
    pub(crate) supported: SupportedParams,
    /// The engine's vocabulary.
    pub(crate) tokenizer: tokenizer::Tokenizer,
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    /// Send a last chunk with the usage and no choices.
    #[serde(default)]
    pub(crate) include_usage: Option<bool>,
}

/// A prompt: a string, an array of one string, or an array of token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    /// Text.
    Text(String),
    /// Texts (exactly one is supported).
    Texts(Vec<String>),
    /// Token ids (bytes, `0..=255`).
    Tokens(Vec<i64>),
}

/// `stop`: a string or a list of strings.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// Declares a request body with the fields both endpoints share (no `#[serde(flatten)]`:
/// it would hide the path of a wrong-typed field from the error message) and its
/// `common()` split; the endpoint's own fields listed after `params` go into its
/// [`Params`] too.
macro_rules! request_body {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty,)* }
     params { $($pfield:ident),* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Deserialize)]
        pub(crate) struct $name {
            pub(crate) model: String,
            #[serde(default)]
            pub(crate) max_tokens: Option<i64>,
            #[serde(default)]
            pub(crate) stream: Option<bool>,
            #[serde(default)]
            pub(crate) stream_options: Option<StreamOptions>,
            #[serde(default)]
            pub(crate) temperature: Option<f64>,
            #[serde(default)]
            pub(crate) top_p: Option<f64>,
            #[serde(default)]
            pub(crate) seed: Option<i64>,
            /// Extension (vLLM).
            #[serde(default)]
            pub(crate) top_k: Option<i64>,
            /// Extension (vLLM).
            #[serde(default)]
            pub(crate) min_tokens: Option<i64>,
            /// Extension (vLLM).
            #[serde(default)]
            pub(crate) ignore_eos: Option<bool>,
            #[serde(default)]
            pub(crate) presence_penalty: Option<f64>,
            #[serde(default)]
            pub(crate) frequency_penalty: Option<f64>,
            /// Extension (vLLM).
            #[serde(default)]
            pub(crate) repetition_penalty: Option<f64>,
            #[serde(default)]
            pub(crate) logit_bias: Option<BTreeMap<String, f64>>,
            #[serde(default)]
            pub(crate) response_format: Option<ResponseFormat>,
            #[serde(default)]
            pub(crate) stop: Option<Stop>,
            #[serde(default)]
            pub(crate) n: Option<i64>,
            #[serde(default)]
            pub(crate) logprobs: Option<serde_json::Value>,
            /// Extension: annotations handed to the engine.
            #[serde(default)]
            pub(crate) annotations: Option<Vec<String>>,
            $($(#[$fmeta])* pub(crate) $field: $ty,)*
        }

        impl $name {
            fn common(&self) -> Common {
                Common {
                    model: self.model.clone(),
                    stream: self.stream,
                    stream_options: self.stream_options.clone(),
                    params: Params {
                        temperature: self.temperature,
                        top_p: self.top_p,
                        seed: self.seed,
                        top_k: self.top_k,
                        min_tokens: self.min_tokens,
                        ignore_eos: self.ignore_eos,
                        presence_penalty: self.presence_penalty,
                        frequency_penalty: self.frequency_penalty,
                        repetition_penalty: self.repetition_penalty,
                        logit_bias: self.logit_bias.clone(),
                        response_format: self.response_format.clone(),
                        $($pfield: self.$pfield.clone(),)*
                        ..Params::default()
                    },
                    stop: self.stop.clone(),
                    n: self.n,
                    logprobs: self.logprobs.clone(),
                    annotations: self.annotations.clone(),
                }
            }
        }
    };
}

/// The fields both endpoints share.
#[derive(Clone, Debug, Default)]
struct Common {
    model: String,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    params: Params,
    stop: Option<Stop>,
    n: Option<i64>,
    logprobs: Option<serde_json::Value>,
    annotations: Option<Vec<String>>,
}

request_body! {
    /// The body of `POST /v1/completions`.
    CompletionRequest {
        prompt: Prompt,
        #[serde(default)]
        echo: Option<bool>,
        #[serde(default)]
        best_of: Option<i64>,
        #[serde(default)]
        suffix: Option<String>,
    }
    params { best_of, suffix }
}

/// One content part of a chat message.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ContentPart {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) text: Option<String>,
}

/// A chat message's content: a string or a list of parts.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ChatMessage {
    pub(crate) role: String,
    /// `null` is empty.
    #[serde(default)]
    pub(crate) content: Option<Content>,
}

request_body! {
    /// The body of `POST /v1/chat/completions`.
    ChatRequest {
        messages: Vec<ChatMessage>,
        /// The newer name of `max_tokens`.
        #[serde(default)]
        max_completion_tokens: Option<i64>,
        #[serde(default)]
        tools: Option<serde_json::Value>,
        #[serde(default)]
        tool_choice: Option<serde_json::Value>,
    }
    params { tool_choice }
}

/// Which endpoint a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

impl Endpoint {
    /// The `endpoint` label of its request series (`completions`, `chat`).
    pub(crate) fn label(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        }
    }
}

/// A validated request, ready to run.
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    /// The endpoint.
    pub(crate) endpoint: Endpoint,
    /// The tether request (its id is set by the caller).
    pub(crate) request: Request,
    /// Stream as server-sent events.
    pub(crate) stream: bool,
    /// Send a usage chunk at the end of a stream.
    pub(crate) include_usage: bool,
    /// The stop strings, matched on the decoded text ([`super::stop`]).
    pub(crate) stops: Vec<String>,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
const MAX_STOPS: usize = 4;

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid("invalid_value", Some(param), message)
}

fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid("unsupported_parameter", Some(param), message)
}

impl Common {
    /// Check the shared fields and build the request around `token_ids`.
    fn prepare(
        self,
        endpoint: Endpoint,
        token_ids: Vec<u32>,
        prompt_param: &str,
        max_tokens: Option<(i64, &str)>,
        limits: &Limits,
    ) -> Result<Prepared, ApiError> {
        if token_ids.is_empty() {
            return Err(invalid(
                prompt_param,
                format!("`{prompt_param}` must not be empty"),
            ));
        }
        if token_ids.len() > limits.max_prompt_tokens {
            return Err(ApiError::invalid(
                "context_length_exceeded",
                Some(prompt_param),
                format!(
                    "the prompt is {} tokens long; this server accepts at most {}",
                    token_ids.len(),
                    limits.max_prompt_tokens
                ),
            ));
        }
        let max_tokens = match max_tokens {
            None => limits.default_max_tokens,
            Some((n, param)) if n < 0 => {
                return Err(invalid(
                    param,
                    format!("`{param}` must be at least 0, got {n}"),
                ))
            }
            Some((n, param)) => match u32::try_from(n) {
                Ok(n) if n <= limits.max_tokens_limit => n,
                _ => {
                    return Err(invalid(
                        param,
                        format!(
                            "`{param}` is {n}; this server generates at most {} tokens",
                            limits.max_tokens_limit
                        ),
                    ))
                }
            },
        };
        if let Some(n) = self.n {
            if n != 1 {
                return Err(unsupported(
                    "n",
                    format!("only n = 1 is supported, got {n}"),
                ));
            }
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !matches!(v, serde_json::Value::Null | serde_json::Value::Bool(false)))
        {
            return Err(unsupported("logprobs", "logprobs are not supported"));
        }
        let (stops, one) = match self.stop {
            None => (Vec::new(), false),
            Some(Stop::One(s)) => (vec![s], true),
            Some(Stop::Many(v)) => (v, false),
        };
        if stops.len() > MAX_STOPS {
            return Err(invalid(
                "stop",
                format!("at most {MAX_STOPS} stop strings, got {}", stops.len()),
            ));
        }
        if let Some(i) = stops.iter().position(String::is_empty) {
            let param = if one {
                "stop".to_owned()
            } else {
                format!("stop[{i}]")
            };
            return Err(invalid(&param, "stop strings must not be empty"));
        }
        let mut annotations = self.annotations.unwrap_or_default();
        if !limits.allow_chaos {
            annotations.retain(|a| !tether_engines::sim::is_chaos_annotation(a));
        }
        let mut request =
            Request::new(String::new(), self.model, token_ids).with_max_tokens(max_tokens);
        // Matched by the server on the decoded text (an engine may match them too).
        request.stop.stop.clone_from(&stops);
        request.annotations = annotations;
        params::apply(&self.params, limits.supported, max_tokens, &mut request)?;
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(invalid(
                "stream_options",
                "`stream_options` can only be set when `stream` is true",
            ));
        }
        Ok(Prepared {
            endpoint,
            request,
            stream,
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            stops,
        })
    }
}

fn check_model(model: &str, limits: &Limits) -> Result<(), ApiError> {
    if model == limits.model {
        Ok(())
    } else {
        Err(ApiError::unknown_model(model, &limits.model))
    }
}

impl CompletionRequest {
    /// Validate against `limits`.
    pub(crate) fn prepare(mut self, limits: &Limits) -> Result<Prepared, ApiError> {
        check_model(&self.model, limits)?;
        if self.echo == Some(true) {
            return Err(unsupported("echo", "echo is not supported"));
        }
        let token_ids = match std::mem::replace(&mut self.prompt, Prompt::Text(String::new())) {
            Prompt::Text(text) => limits.tokenizer.encode(&text),
            Prompt::Texts(texts) => match <[String; 1]>::try_from(texts) {
                Ok([text]) => limits.tokenizer.encode(&text),
                Err(texts) => {
                    return Err(unsupported(
                        "prompt",
                        format!(
                            "exactly one prompt per request is supported, got {}",
                            texts.len()
                        ),
                    ))
                }
            },
            Prompt::Tokens(ids) => {
                let mut out = Vec::with_capacity(ids.len());
                for (i, id) in ids.into_iter().enumerate() {
                    match u32::try_from(id) {
                        Ok(t) if t < limits.tokenizer.vocab_size() => out.push(t),
                        _ => {
                            return Err(invalid(
                                &format!("prompt[{i}]"),
                                format!("token id {id} is not {}", limits.tokenizer.id_range()),
                            ))
                        }
                    }
                }
                out
            }
        };
        let max_tokens = self.max_tokens.map(|n| (n, "max_tokens"));
        self.common().prepare(
            Endpoint::Completions,
            token_ids,
            "prompt",
            max_tokens,
            limits,
        )
    }
}

impl ChatRequest {
    /// Validate against `limits`.
    pub(crate) fn prepare(mut self, limits: &Limits) -> Result<Prepared, ApiError> {
        check_model(&self.model, limits)?;
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(unsupported("tools", "tools are not supported"));
        }
        if self.messages.is_empty() {
            return Err(invalid("messages", "`messages` must not be empty"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in std::mem::take(&mut self.messages).into_iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(invalid(
                    &format!("messages[{i}].role"),
                    format!(
                        "unknown role {:?} (expected one of {})",
                        m.role,
                        ROLES.join(", ")
                    ),
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            _ => {
                                return Err(unsupported(
                                    &format!("messages[{i}].content[{j}]"),
                                    "only text content parts are supported",
                                ))
                            }
                        }
                    }
                    text
                }
            };
            messages.push(Message {
                role: m.role,
                content,
            });
        }
        let token_ids = limits
            .tokenizer
            .chat(&messages)
            .map_err(|message| invalid("messages", message))?;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => Some((n, "max_completion_tokens")),
            (None, Some(n)) => Some((n, "max_tokens")),
            (None, None) => None,
        };
        self.common()
            .prepare(Endpoint::Chat, token_ids, "messages", max_tokens, limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::error::parse_json;

    fn limits() -> Limits {
        Limits {
            model: "sim".to_owned(),
            max_prompt_tokens: 32,
            max_tokens_limit: 100,
            default_max_tokens: 16,
            allow_chaos: false,
            supported: tether_engines::SimEngine::SUPPORTED,
            tokenizer: crate::serve::tokenizer::Tokenizer::bytes(),
        }
    }

    fn completion(body: &serde_json::Value) -> Result<Prepared, ApiError> {
        parse_json::<CompletionRequest>(body.to_string().as_bytes())?.prepare(&limits())
    }

    fn chat(body: &serde_json::Value) -> Result<Prepared, ApiError> {
        parse_json::<ChatRequest>(body.to_string().as_bytes())?.prepare(&limits())
    }

    #[test]
    fn a_completion_becomes_a_byte_request() {
        let p = completion(&serde_json::json!({
            "model": "sim", "prompt": "hi", "max_tokens": 5, "stream": true,
            "stream_options": {"include_usage": true}, "stop": ["\n"], "seed": 7,
            "annotations": ["keep", "chaos:error@1"],
        }))
        .unwrap();
        assert_eq!(p.request.token_ids, vec![104, 105]);
        assert_eq!(p.request.stop.max_tokens, Some(5));
        assert_eq!(p.stops, vec!["\n".to_owned()]);
        assert_eq!(p.request.stop.stop, vec!["\n".to_owned()]);
        assert!(p.request.stop.stop_token_ids.is_empty());
        assert_eq!(p.request.sampling.seed, Some(7));
        assert_eq!(p.request.annotations, vec!["keep".to_owned()]);
        assert!(p.stream && p.include_usage);
        let p = completion(&serde_json::json!({
            "model": "sim", "prompt": "x", "stop": ["终わり", "\n\nUser:", "🦀", "x"],
            "stream_options": null,
        }))
        .unwrap();
        assert_eq!(p.stops, ["终わり", "\n\nUser:", "🦀", "x"]);
        let p = completion(&serde_json::json!({"model": "sim", "prompt": [1, 2, 255]})).unwrap();
        assert_eq!(p.request.token_ids, vec![1, 2, 255]);
        assert_eq!(p.request.stop.max_tokens, Some(16));
        assert!(!p.stream && !p.include_usage);
    }

    #[test]
    fn chat_messages_are_rendered_with_the_template() {
        let p = chat(&serde_json::json!({
            "model": "sim",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "yo"}]}],
            "max_completion_tokens": 3,
        }))
        .unwrap();
        assert_eq!(
            p.request.token_ids,
            tokenizer::encode("<|user|>\nyo\n<|assistant|>\n")
        );
        assert_eq!(p.request.stop.max_tokens, Some(3));
    }

    #[test]
    fn bad_fields_are_400_with_their_param() {
        let cases = [
            (
                serde_json::json!({"model": "sim", "prompt": "x", "max_tokens": -1}),
                "max_tokens",
            ),
            (
                serde_json::json!({"model": "sim", "prompt": "x", "max_tokens": 101}),
                "max_tokens",
            ),
            (
                serde_json::json!({"model": "sim", "prompt": "x".repeat(33)}),
                "prompt",
            ),
            (serde_json::json!({"model": "sim", "prompt": ""}), "prompt"),
            (
                serde_json::json!({"model": "sim", "prompt": [256]}),
                "prompt[0]",
            ),
            (
                serde_json::json!({"model": "sim", "prompt": "x", "n": 2}),
                "n",
            ),
            (
                serde_json::json!({"model": "sim", "prompt": "x", "temperature": 3}),
                "temperature",
            ),
            (
                serde_json::json!({"model": "sim", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (
                serde_json::json!({"model": "sim", "prompt": "x", "stop": ["ab", ""]}),
                "stop[1]",
            ),
            (
                serde_json::json!({"model": "sim", "prompt": "x", "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                serde_json::json!({"model": "sim", "prompt": "x", "stream": false, "stream_options": {}}),
                "stream_options",
            ),
            (
                serde_json::json!({"model": "sim", "prompt": "x", "seed": -2}),
                "seed",
            ),
        ];
        for (body, param) in cases {
            let e = completion(&body).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.body.param.as_deref(), Some(param), "{body}");
        }
        let e = chat(
            &serde_json::json!({"model": "sim", "messages": [{"role": "robot", "content": "x"}]}),
        )
        .unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("messages[0].role"));
        let e = chat(&serde_json::json!({"model": "sim", "messages": []})).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("messages"));
        let e = chat(&serde_json::json!({"model": "gpt-9", "messages": []})).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::NOT_FOUND);
    }
}
