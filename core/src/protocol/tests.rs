use super::*;
use crate::error::{BackendError, ErrorKind};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("test values serialize")
}

#[test]
fn finish_reason_json_is_exact_both_ways() {
    let cases = [
        (FinishReason::Eos, r#""eos""#),
        (FinishReason::Length, r#""length""#),
        (FinishReason::Stop, r#""stop""#),
        (FinishReason::Cancelled, r#""cancelled""#),
        (FinishReason::ContentFilter, r#""content_filter""#),
        (FinishReason::Error("oom".to_owned()), r#"{"error":"oom"}"#),
    ];
    for (reason, json) in cases {
        assert_eq!(to_json(&reason), json);
        assert_eq!(
            serde_json::from_str::<FinishReason>(json).ok(),
            Some(reason)
        );
    }
}

#[test]
fn finish_reason_reads_abort_as_cancelled() {
    assert_eq!(
        serde_json::from_str::<FinishReason>(r#""abort""#).ok(),
        Some(FinishReason::Cancelled)
    );
    assert_eq!(to_json(&FinishReason::Cancelled), r#""cancelled""#);
}

#[test]
fn finish_reason_rejects_malformed_input() {
    for bad in [
        r#""finished""#,
        r#""error""#,
        r#""EOS""#,
        r#"{"error":1}"#,
        r#"{"fault":"x"}"#,
        "{}",
        r#"{"error":"a","extra":1}"#,
        "7",
        "null",
    ] {
        assert!(
            serde_json::from_str::<FinishReason>(bad).is_err(),
            "{bad} accepted"
        );
    }
}

#[test]
fn finish_reason_display_matches_wire_words() {
    assert_eq!(FinishReason::ContentFilter.to_string(), "content_filter");
    assert_eq!(FinishReason::Cancelled.to_string(), "cancelled");
    assert_eq!(
        FinishReason::Error("oom".to_owned()).to_string(),
        "error: oom"
    );
}

#[test]
fn chunk_round_trips_and_omits_none_fields() {
    let link = TraceLink::parse(TRACE, SPAN).expect("valid ids");
    let chunk = Chunk {
        token_ids: vec![1, 2],
        text: Some("hi".to_owned()),
        finish_reason: Some(FinishReason::Error("boom".to_owned())),
        usage: Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 2,
        }),
        index: 1,
        worker_trace_link: Some(link),
    };
    let json = to_json(&chunk);
    assert_eq!(serde_json::from_str::<Chunk>(&json).ok(), Some(chunk));
    assert_eq!(
        to_json(&Chunk::tokens(vec![5])),
        r#"{"token_ids":[5],"index":0}"#
    );
    assert_eq!(
        to_json(&Chunk::terminal(FinishReason::Eos)),
        r#"{"token_ids":[],"finish_reason":"eos","index":0}"#
    );
}

#[test]
fn chunk_with_only_tokens_decodes_with_defaults() {
    let chunk: Chunk = serde_json::from_str(r#"{"token_ids":[1]}"#).expect("minimal chunk");
    assert_eq!(chunk, Chunk::tokens(vec![1]));
    assert!(chunk.has_tokens());
    assert!(!chunk.is_terminal());
}

#[test]
fn chunk_predicates() {
    let terminal = Chunk::terminal(FinishReason::Length).with_usage(Usage {
        prompt_tokens: 4,
        completion_tokens: 16,
    });
    assert!(terminal.is_terminal());
    assert!(!terminal.has_tokens());
    assert_eq!(terminal.usage.map(|u| u.completion_tokens), Some(16));
    assert!(!Chunk::default().has_tokens());
}

#[test]
fn request_minimal_json_decodes_with_defaults() {
    let req: Request = serde_json::from_str(r#"{"id":"r1","model":"m","token_ids":[1,2,3]}"#)
        .expect("minimal request");
    assert_eq!(req, Request::new("r1", "m", vec![1, 2, 3]));
    assert_eq!(req.stop, StopConditions::default());
    assert_eq!(req.migration_link, None);
    assert!(serde_json::from_str::<Request>(r#"{"model":"m"}"#).is_err());
}

#[test]
fn request_round_trips() {
    let mut req = Request::new("r2", "tiny", vec![7]).with_max_tokens(32);
    req.stop.stop_token_ids = vec![2];
    req.stop.ignore_eos = true;
    req.sampling = SamplingOptions {
        temperature: Some(0.7),
        top_p: Some(0.9),
        top_k: Some(40),
        seed: Some(u64::MAX),
        presence_penalty: Some(0.5),
        frequency_penalty: Some(-1.25),
        repetition_penalty: Some(1.1),
    };
    req.eos_token_ids = vec![0];
    req.migration_link = TraceLink::from_ids(1, 2);
    req.annotations = vec!["worker_id".to_owned()];
    let json = to_json(&req);
    assert_eq!(serde_json::from_str::<Request>(&json).ok(), Some(req));
}

#[test]
fn out_of_range_temperature_is_rejected() {
    let err = serde_json::from_str::<SamplingOptions>(r#"{"temperature":1e39}"#)
        .expect_err("1e39 overflows f32");
    assert!(err.to_string().contains("not a finite f32"), "{err}");
    assert!(serde_json::from_str::<SamplingOptions>(r#"{"top_p":-1e39}"#).is_err());
    let ok: SamplingOptions =
        serde_json::from_str(r#"{"temperature":0.5,"top_p":null}"#).expect("valid");
    assert_eq!(ok.temperature, Some(0.5));
    assert_eq!(ok.top_p, None);
    assert_eq!(
        serde_json::from_str::<SamplingOptions>("{}").ok(),
        Some(SamplingOptions::default())
    );
}

#[test]
fn penalties_are_left_out_when_unset_and_checked_when_set() {
    let json = serde_json::to_string(&SamplingOptions::default()).expect("encodes");
    assert!(!json.contains("penalty"), "{json}");
    let err = serde_json::from_str::<SamplingOptions>(r#"{"repetition_penalty":1e39}"#)
        .expect_err("1e39 overflows f32");
    assert!(err.to_string().contains("not a finite f32"), "{err}");
    let opts = SamplingOptions {
        presence_penalty: Some(f32::INFINITY),
        ..SamplingOptions::default()
    };
    assert!(serde_json::to_string(&opts).is_err());
}

#[test]
fn non_finite_temperature_does_not_encode_as_null() {
    let opts = SamplingOptions {
        temperature: Some(f32::NAN),
        ..SamplingOptions::default()
    };
    assert!(serde_json::to_string(&opts).is_err());
}

#[test]
fn trace_link_parse_accepts_valid_ids() {
    let link = TraceLink::parse(TRACE, SPAN).expect("valid ids");
    assert_eq!(link.trace_id_hex(), TRACE);
    assert_eq!(link.span_id_hex(), SPAN);
    assert_eq!(link.trace_id(), 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
    assert_eq!(link.span_id(), 0x00f0_67aa_0ba9_02b7);
    assert_eq!(
        TraceLink::from_ids(link.trace_id(), link.span_id()),
        Some(link)
    );
}

#[test]
fn trace_link_parse_rejects_each_malformed_case() {
    use TraceIdField::{SpanId, TraceId};
    let cases = [
        (
            &TRACE[..31],
            SPAN,
            TraceLinkError::WrongLength {
                field: TraceId,
                expected: 32,
                actual: 31,
            },
        ),
        (
            TRACE,
            "00f067aa0ba902b7a",
            TraceLinkError::WrongLength {
                field: SpanId,
                expected: 16,
                actual: 17,
            },
        ),
        (
            "4bf92f3577b34da6a3ce929d0e0e473g",
            SPAN,
            TraceLinkError::NotHex {
                field: TraceId,
                position: 31,
            },
        ),
        (
            TRACE,
            "00f067aA0ba902b7",
            TraceLinkError::Uppercase {
                field: SpanId,
                position: 7,
            },
        ),
        (
            "00000000000000000000000000000000",
            SPAN,
            TraceLinkError::AllZeros { field: TraceId },
        ),
        (
            TRACE,
            "0000000000000000",
            TraceLinkError::AllZeros { field: SpanId },
        ),
        // Multi-byte UTF-8 of the right byte length must be rejected, not sliced.
        (
            TRACE,
            "00f067aa0ba902é",
            TraceLinkError::NotHex {
                field: SpanId,
                position: 14,
            },
        ),
    ];
    for (trace, span, expected) in cases {
        assert_eq!(
            TraceLink::parse(trace, span),
            Err(expected),
            "{trace} {span}"
        );
    }
    assert_eq!(
        TraceLinkError::Uppercase {
            field: SpanId,
            position: 7
        }
        .to_string(),
        "span_id has an uppercase hex digit at byte 7, ids must be lowercase"
    );
    assert_eq!(TraceLink::from_ids(0, 1), None);
    assert_eq!(TraceLink::from_ids(1, 0), None);
}

#[test]
fn trace_link_serde_is_hex_and_rejects_malformed() {
    let link = TraceLink::parse(TRACE, SPAN).expect("valid ids");
    let json = to_json(&link);
    assert_eq!(
        json,
        format!(r#"{{"trace_id":"{TRACE}","span_id":"{SPAN}"}}"#)
    );
    assert_eq!(serde_json::from_str::<TraceLink>(&json).ok(), Some(link));
    for bad in [
        format!(
            r#"{{"trace_id":"{}","span_id":"{SPAN}"}}"#,
            TRACE.to_uppercase()
        ),
        format!(r#"{{"trace_id":"{TRACE}","span_id":"xyz"}}"#),
        format!(r#"{{"trace_id":"{TRACE}","span_id":"0000000000000000"}}"#),
        format!(r#"{{"trace_id":"{TRACE}"}}"#),
    ] {
        assert!(
            serde_json::from_str::<TraceLink>(&bad).is_err(),
            "{bad} accepted"
        );
    }
}

#[test]
fn mode_parse_is_case_insensitive() {
    assert_eq!("AGG".parse::<Mode>(), Ok(Mode::Aggregated));
    assert_eq!("aggregated".parse::<Mode>(), Ok(Mode::Aggregated));
    assert_eq!("Decode".parse::<Mode>(), Ok(Mode::Decode));
    assert_eq!("prefill".parse::<Mode>(), Ok(Mode::Prefill));
    let err = "x".parse::<Mode>().expect_err("x is no mode");
    assert_eq!(
        err.to_string(),
        "unknown mode `x`, expected one of: agg, aggregated, prefill, decode"
    );
}

#[test]
fn mode_serde_and_display_use_wire_names() {
    for mode in [Mode::Aggregated, Mode::Prefill, Mode::Decode] {
        let json = to_json(&mode);
        assert_eq!(json, format!("\"{mode}\""));
        assert_eq!(serde_json::from_str::<Mode>(&json).ok(), Some(mode));
    }
    assert_eq!(Mode::default(), Mode::Aggregated);
    assert_eq!(Mode::Aggregated.to_string(), "agg");
}

#[test]
fn annotated_error_is_error_and_round_trips() {
    let item: Annotated<Chunk> = Annotated::from_error(
        EngineError::stream_incomplete().with_source(EngineError::new(
            ErrorKind::Backend(BackendError::Disconnected),
            "eof",
        )),
    );
    assert!(item.is_error());
    assert!(item.is_terminal());
    let json = to_json(&item);
    assert!(
        json.starts_with(r#"{"event":"error","error":{"kind":"BackendStreamIncomplete""#),
        "{json}"
    );
    assert_eq!(
        serde_json::from_str::<Annotated<Chunk>>(&json).ok(),
        Some(item)
    );
}

#[test]
fn annotated_data_terminal_follows_chunk() {
    let tokens = Annotated::from_data(Chunk::tokens(vec![1]));
    assert!(!tokens.is_error());
    assert!(!tokens.is_terminal());
    assert_eq!(to_json(&tokens), r#"{"data":{"token_ids":[1],"index":0}}"#);
    assert!(Annotated::from_data(Chunk::terminal(FinishReason::Stop)).is_terminal());
    let decoded: Annotated<Chunk> = serde_json::from_str("{}").expect("all fields optional");
    assert!(!decoded.is_terminal());
}

/// Found by the `protocol_json` fuzz target: a request with a malformed migration link
/// is read (the link kept aside) and must read back the same once written.
#[test]
fn a_malformed_migration_link_is_kept_aside_and_survives_a_round_trip() {
    let json = r#"{"id":"r1","model":"m","token_ids":[1,2],
        "migration_link":{"trace_id":"0af7651916cd43dd8448ebr11c80319c","span_id":"b7ad6b7169203331"}}"#;
    let req: Request = serde_json::from_str(json).expect("not rejected");
    let raw = RawTraceLink {
        trace_id: "0af7651916cd43dd8448ebr11c80319c".into(),
        span_id: "b7ad6b7169203331".into(),
    };
    assert_eq!(req.migration_link, None);
    assert_eq!(req.malformed_migration_link, Some(raw.clone()));
    let written = to_json(&req);
    assert!(
        written.ends_with(
            r#""annotations":[],"malformed_migration_link":{"trace_id":"0af7651916cd43dd8448ebr11c80319c","span_id":"b7ad6b7169203331"}}"#
        ),
        "{written}"
    );
    assert!(!written.contains(r#""migration_link""#), "{written}");
    let back: Request = serde_json::from_str(&written).expect("reads back");
    assert_eq!(back, req);
    // A valid link next to a kept-aside one: both are read.
    let mut both = req.clone();
    both.migration_link = TraceLink::from_ids(1, 2);
    let back: Request = serde_json::from_str(&to_json(&both)).expect("reads back");
    assert_eq!(back, both);
}
