//! The parameter table against an engine that honours nothing, SimEngine and
//! TinyEngine: defaults accepted, non-defaults refused by name, honoured values in the
//! request, ranges and types checked.

use serde_json::{json, Value};
use tether_core::protocol::{SamplingOptions, StopConditions};
use tether_engines::{SimEngine, TinyEngine};

use super::*;
use crate::serve::api::{ChatRequest, CompletionRequest, Limits, Prepared};
use crate::serve::error::parse_json;

fn limits(supported: SupportedParams) -> Limits {
    Limits {
        model: "m".to_owned(),
        max_prompt_tokens: 64,
        max_tokens_limit: 100,
        default_max_tokens: 16,
        allow_chaos: false,
        supported,
        tokenizer: crate::serve::tokenizer::Tokenizer::bytes(),
    }
}

/// A body of the endpoint that has `param` (chat for `tool_choice`, else
/// completions) with `param: value`, prepared for an engine honouring `supported`.
fn prepare(param: &str, value: &Value, supported: SupportedParams) -> Result<Prepared, ApiError> {
    let limits = limits(supported);
    if param == "tool_choice" {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        body[param] = value.clone();
        parse_json::<ChatRequest>(body.to_string().as_bytes())?.prepare(&limits)
    } else {
        let mut body = json!({"model": "m", "prompt": "hi", "max_tokens": 8});
        body[param] = value.clone();
        parse_json::<CompletionRequest>(body.to_string().as_bytes())?.prepare(&limits)
    }
}

/// Every row's accepted defaults (besides leaving it out).
fn defaults() -> Vec<(&'static str, Value)> {
    vec![
        ("temperature", json!(1)),
        ("temperature", json!(1.0)),
        ("temperature", json!(null)),
        ("top_p", json!(1)),
        ("top_k", json!(-1)),
        ("top_k", json!(0)),
        ("top_k", json!(null)),
        ("seed", json!(null)),
        ("min_tokens", json!(0)),
        ("ignore_eos", json!(false)),
        ("presence_penalty", json!(0)),
        ("frequency_penalty", json!(0.0)),
        ("repetition_penalty", json!(1)),
        ("logit_bias", json!({})),
        ("logit_bias", json!(null)),
        ("response_format", json!({"type": "text"})),
        ("response_format", json!(null)),
        ("best_of", json!(1)),
        ("suffix", json!(null)),
        ("suffix", json!("")),
        ("tool_choice", json!("none")),
        ("tool_choice", json!("auto")),
        ("tool_choice", json!(null)),
    ]
}

/// A value other than the default, within range, for every row.
fn non_defaults() -> Vec<(&'static str, Value)> {
    vec![
        ("temperature", json!(0)),
        ("temperature", json!(0.7)),
        ("top_p", json!(0.9)),
        ("top_k", json!(5)),
        ("seed", json!(0)),
        ("seed", json!(42)),
        ("min_tokens", json!(3)),
        ("ignore_eos", json!(true)),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(-1)),
        ("repetition_penalty", json!(1.1)),
        ("logit_bias", json!({"50256": -100})),
        ("response_format", json!({"type": "json_object"})),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ),
        ("best_of", json!(2)),
        ("suffix", json!("!")),
        ("tool_choice", json!("required")),
        (
            "tool_choice",
            json!({"type": "function", "function": {"name": "f"}}),
        ),
    ]
}

#[test]
fn the_table_has_one_row_per_parameter_and_one_per_flag() {
    let names: Vec<&str> = TABLE.iter().map(|r| r.name).collect();
    assert_eq!(
        names,
        [
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "min_tokens",
            "ignore_eos",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "logit_bias",
            "response_format",
            "best_of",
            "suffix",
            "tool_choice",
        ]
    );
    // Each flag turns on exactly its own row.
    let none = SupportedParams::NONE;
    let flags = [
        ("temperature", none.with_temperature(true)),
        ("top_p", none.with_top_p(true)),
        ("top_k", none.with_top_k(true)),
        ("seed", none.with_seed(true)),
        ("min_tokens", none.with_min_tokens(true)),
        ("ignore_eos", none.with_ignore_eos(true)),
        ("presence_penalty", none.with_presence_penalty(true)),
        ("frequency_penalty", none.with_frequency_penalty(true)),
        ("repetition_penalty", none.with_repetition_penalty(true)),
    ];
    for (name, flag) in flags {
        let honoured: Vec<&str> = TABLE
            .iter()
            .filter(|r| r.honoured_by.is_some_and(|f| f(flag)))
            .map(|r| r.name)
            .collect();
        assert_eq!(honoured, [name]);
    }
    let honoured_by_none = TABLE
        .iter()
        .filter(|r| r.honoured_by.is_some_and(|f| f(none)))
        .count();
    assert_eq!(honoured_by_none, 0);
}

#[test]
fn every_default_is_accepted_by_an_engine_that_honours_nothing() {
    for (param, value) in defaults() {
        let p = prepare(param, &value, SupportedParams::NONE)
            .unwrap_or_else(|e| panic!("{param}: {value} refused: {e:?}"));
        assert_eq!(
            p.request.sampling,
            SamplingOptions::default(),
            "{param}: {value}"
        );
        assert_eq!(p.request.stop.min_tokens, None, "{param}: {value}");
        assert!(!p.request.stop.ignore_eos, "{param}: {value}");
    }
    // All at once, as a client that always sends the defaults does.
    let body = json!({
        "model": "m", "prompt": "hi", "temperature": 1, "top_p": 1, "top_k": -1,
        "min_tokens": 0, "ignore_eos": false, "presence_penalty": 0,
        "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": {},
        "response_format": {"type": "text"}, "best_of": 1, "suffix": null,
    });
    let p = parse_json::<CompletionRequest>(body.to_string().as_bytes())
        .unwrap()
        .prepare(&limits(SupportedParams::NONE))
        .unwrap();
    assert_eq!(p.request.sampling, SamplingOptions::default());
    assert_eq!(p.request.stop.max_tokens, Some(16));
}

#[test]
fn every_non_default_is_refused_naming_it_by_an_engine_that_honours_nothing() {
    for (param, value) in non_defaults() {
        let e = prepare(param, &value, SupportedParams::NONE)
            .err()
            .unwrap_or_else(|| panic!("{param}: {value} accepted"));
        assert_eq!(
            e.status,
            axum::http::StatusCode::BAD_REQUEST,
            "{param}: {value}"
        );
        assert_eq!(e.body.kind, "invalid_request_error");
        assert_eq!(
            e.body.code,
            Some("unsupported_parameter"),
            "{param}: {value}"
        );
        assert_eq!(e.body.param.as_deref(), Some(param), "{value}");
        assert!(e.body.message.contains(param), "{}", e.body.message);
    }
}

#[test]
fn parameters_without_a_request_field_are_refused_even_by_tiny() {
    let honoured = [
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "min_tokens",
        "ignore_eos",
    ];
    for (param, value) in non_defaults() {
        let outcome = prepare(param, &value, TinyEngine::SUPPORTED);
        if honoured.contains(&param) {
            assert!(outcome.is_ok(), "{param}: {value}: {:?}", outcome.err());
        } else {
            let e = outcome
                .err()
                .unwrap_or_else(|| panic!("{param}: {value} accepted"));
            assert_eq!(e.body.code, Some("unsupported_parameter"));
            assert_eq!(e.body.param.as_deref(), Some(param));
        }
    }
}

#[test]
fn honoured_parameters_reach_the_request() {
    let body = json!({
        "model": "m", "prompt": "hi", "max_tokens": 8, "temperature": 0.5, "top_p": 0.25,
        "top_k": 7, "seed": 9, "min_tokens": 8, "ignore_eos": true,
    });
    let prepared = |supported| {
        parse_json::<CompletionRequest>(body.to_string().as_bytes())
            .unwrap()
            .prepare(&limits(supported))
    };
    let p = prepared(TinyEngine::SUPPORTED).unwrap();
    let mut sampling = SamplingOptions::default();
    sampling.temperature = Some(0.5);
    sampling.top_p = Some(0.25);
    sampling.top_k = Some(7);
    sampling.seed = Some(9);
    assert_eq!(p.request.sampling, sampling);
    let mut stop = StopConditions::default();
    stop.max_tokens = Some(8);
    stop.min_tokens = Some(8);
    stop.ignore_eos = true;
    assert_eq!(p.request.stop, stop);
    // SimEngine honours the seed, min_tokens and ignore_eos, not the temperature.
    let e = prepared(SimEngine::SUPPORTED).unwrap_err();
    assert_eq!(e.body.param.as_deref(), Some("temperature"));
    let sim_body = json!({
        "model": "m", "prompt": "hi", "temperature": 1, "top_p": 1, "seed": 9,
        "min_tokens": 2, "ignore_eos": true,
    });
    let p = parse_json::<CompletionRequest>(sim_body.to_string().as_bytes())
        .unwrap()
        .prepare(&limits(SimEngine::SUPPORTED))
        .unwrap();
    let mut sampling = SamplingOptions::default();
    sampling.seed = Some(9);
    assert_eq!(
        p.request.sampling, sampling,
        "defaults the engine ignores are dropped"
    );
    assert_eq!(p.request.stop.min_tokens, Some(2));
    assert!(p.request.stop.ignore_eos);
    // An honoured default is passed on as it came: temperature 1 samples at 1.
    let p = prepare("temperature", &json!(1), TinyEngine::SUPPORTED).unwrap();
    assert_eq!(p.request.sampling.temperature, Some(1.0));
    // top_k's "no limit" values carry no limit.
    for k in [json!(-1), json!(0)] {
        let p = prepare("top_k", &k, TinyEngine::SUPPORTED).unwrap();
        assert_eq!(p.request.sampling.top_k, None, "{k}");
    }
}

#[test]
fn honoured_penalties_reach_the_request_and_their_defaults_do_not() {
    let penalties = SupportedParams::NONE
        .with_presence_penalty(true)
        .with_frequency_penalty(true)
        .with_repetition_penalty(true);
    let body = json!({
        "model": "m", "prompt": "hi", "presence_penalty": 0.5,
        "frequency_penalty": -1.25, "repetition_penalty": 1.1,
    });
    let p = parse_json::<CompletionRequest>(body.to_string().as_bytes())
        .unwrap()
        .prepare(&limits(penalties))
        .unwrap();
    let mut sampling = SamplingOptions::default();
    sampling.presence_penalty = Some(0.5);
    sampling.frequency_penalty = Some(-1.25);
    sampling.repetition_penalty = Some(1.1);
    assert_eq!(p.request.sampling, sampling);
    for (param, value) in [
        ("presence_penalty", json!(0)),
        ("frequency_penalty", json!(0.0)),
        ("repetition_penalty", json!(1)),
    ] {
        let p = prepare(param, &value, penalties).unwrap();
        assert_eq!(p.request.sampling, SamplingOptions::default(), "{param}");
    }
    // Beyond f32's range is out of range, not infinity.
    let e = prepare("repetition_penalty", &json!(1e300), penalties).unwrap_err();
    assert_eq!(e.body.code, Some("invalid_value"));
}

#[test]
fn out_of_range_values_are_invalid_whatever_the_engine() {
    let cases = [
        ("temperature", json!(2.5)),
        ("temperature", json!(-0.1)),
        ("top_p", json!(0)),
        ("top_p", json!(1.5)),
        ("top_k", json!(-2)),
        ("top_k", json!(1_i64 << 40)),
        ("seed", json!(-1)),
        ("min_tokens", json!(-1)),
        ("min_tokens", json!(9)),
        ("presence_penalty", json!(2.5)),
        ("frequency_penalty", json!(-2.01)),
        ("repetition_penalty", json!(0)),
        ("repetition_penalty", json!(-1)),
        ("response_format", json!({"type": "yaml"})),
        ("best_of", json!(0)),
        ("tool_choice", json!("sometimes")),
        ("tool_choice", json!(3)),
    ];
    for supported in [SupportedParams::NONE, TinyEngine::SUPPORTED] {
        for (param, value) in &cases {
            let e = prepare(param, value, supported)
                .err()
                .unwrap_or_else(|| panic!("{param}: {value} accepted"));
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(e.body.code, Some("invalid_value"), "{param}: {value}");
            assert_eq!(e.body.param.as_deref(), Some(*param), "{value}");
        }
    }
    // min_tokens up to max_tokens (8 here) is fine.
    assert!(prepare("min_tokens", &json!(8), TinyEngine::SUPPORTED).is_ok());
}

#[test]
fn wrong_types_are_400_with_their_path() {
    let cases = [
        ("temperature", json!("hot"), "temperature"),
        ("top_k", json!(2.5), "top_k"),
        ("ignore_eos", json!("yes"), "ignore_eos"),
        ("min_tokens", json!([1]), "min_tokens"),
        ("logit_bias", json!({"5": "up"}), "logit_bias.5"),
        ("logit_bias", json!([1, 2]), "logit_bias"),
        (
            "response_format",
            json!({"type": 3}),
            "response_format.type",
        ),
        ("response_format", json!("text"), "response_format"),
        ("best_of", json!(true), "best_of"),
        ("suffix", json!(7), "suffix"),
    ];
    for (param, value, path) in cases {
        let e = prepare(param, &value, TinyEngine::SUPPORTED)
            .err()
            .unwrap_or_else(|| panic!("{param}: {value} accepted"));
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{value}");
        assert_eq!(e.body.param.as_deref(), Some(path), "{param}: {value}");
    }
    let e = prepare("response_format", &json!({}), SupportedParams::NONE).unwrap_err();
    assert_eq!(e.body.param.as_deref(), Some("response_format.type"));
}
