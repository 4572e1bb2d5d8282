use super::*;
use tether_core::error::ErrorKind;

const COMPLETIONS_STREAM: RequestLabels = RequestLabels {
    endpoint: "completions",
    stream: true,
};
const CHAT_UNARY: RequestLabels = RequestLabels {
    endpoint: "chat",
    stream: false,
};

fn record(outcome: Outcome, cause: Option<Cause>) -> RequestRecord {
    let mut record = RequestRecord::new("r", outcome);
    record.cause = cause;
    record.ttft = Some(Duration::from_micros(700));
    record.output_tokens = 3;
    record
}

/// The lines of family `name` (its `# HELP`, `# TYPE` and samples), in exposition
/// order.
fn family(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            let series = l
                .strip_prefix("# HELP ")
                .or_else(|| l.strip_prefix("# TYPE "))
                .unwrap_or(l);
            let metric = series.split(['{', ' ']).next().unwrap_or("");
            ["", "_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|s| metric == format!("{name}{s}"))
        })
        .map(str::to_owned)
        .collect()
}

/// Family `name`'s lines sorted (a family's series come in hash order).
fn sorted_family(text: &str, name: &str) -> Vec<String> {
    let mut lines = family(text, name);
    lines.sort();
    lines
}

fn sorted(lines: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    lines.sort();
    lines
}

#[test]
fn records_land_in_their_series() {
    let m = Arc::new(Metrics::new(Some(Arc::new(|| EngineGauges {
        live_sequences: 2,
        queue_length: 1,
        accepted: 9,
        aborts_received: 5,
        late_aborts: 3,
    }))));
    let obs = MetricsObserver(m.clone());
    let done = Duration::from_millis(3);
    m.record(
        &record(Outcome::Finished(FinishReason::Length), None),
        COMPLETIONS_STREAM,
        5,
        done,
    );
    m.record(
        &record(Outcome::Cancelled, Some(Cause::ClientDisconnect)),
        CHAT_UNARY,
        5,
        done,
    );
    obs.on_abort("r");
    m.tokens_after(4, Duration::from_millis(2));
    m.http_response("/v1/completions", 200);
    let text = m.encode();
    for line in [
        "tether_requests_total{outcome=\"finished\",endpoint=\"completions\",stream=\"true\"} 1",
        "tether_requests_total{outcome=\"cancelled\",endpoint=\"chat\",stream=\"false\"} 1",
        "tether_requests_total{outcome=\"dropped\",endpoint=\"chat\",stream=\"true\"} 0",
        "tether_request_finish_reasons_total{reason=\"length\",endpoint=\"completions\",stream=\"true\"} 1",
        "tether_aborts_total 1",
        "tether_output_tokens_total 6",
        "tether_time_to_first_token_seconds_bucket{le=\"0.0007\"} 2",
        "tether_time_to_first_token_seconds_bucket{le=\"0.0006\"} 0",
        "tether_inter_token_latency_seconds_count 4",
        "tether_http_responses_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "tether_engine_live_sequences 2",
        "tether_engine_aborts_received_total 5",
        "tether_engine_requests_accepted_total 9",
        "tether_engine_late_aborts_total 3",
        "tether_engine_queue_length 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert_eq!(m.outcome("cancelled"), 1);
    assert_eq!(m.outcome("finished"), 1);
    assert_eq!(m.outcome("failed"), 0);
    // The observer's record is not counted: the record callback counts it, once.
    obs.on_record(&record(Outcome::Cancelled, None));
    assert_eq!(m.outcome("cancelled"), 1);
}

#[test]
fn every_outcome_reason_and_cause_starts_at_zero_for_each_endpoint_and_stream() {
    let text = Metrics::new(None).encode();
    let requests = family(&text, "tether_requests");
    // HELP, TYPE, 5 outcomes x 2 endpoints x 2 stream values.
    assert_eq!(requests.len(), 2 + 20, "{requests:#?}");
    assert_eq!(family(&text, "tether_request_finish_reasons").len(), 2 + 20);
    assert_eq!(
        sorted_family(&text, "tether_cancellations"),
        sorted(&[
            "# HELP tether_cancellations Requests cancelled, dropped or timed out, by the cause of the cancellation.",
            "# TYPE tether_cancellations counter",
            "tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"completions\",stream=\"false\"} 0",
            "tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"completions\",stream=\"true\"} 0",
            "tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"chat\",stream=\"false\"} 0",
            "tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"chat\",stream=\"true\"} 0",
            "tether_cancellations_total{cause=\"shutdown\",endpoint=\"completions\",stream=\"false\"} 0",
            "tether_cancellations_total{cause=\"shutdown\",endpoint=\"completions\",stream=\"true\"} 0",
            "tether_cancellations_total{cause=\"shutdown\",endpoint=\"chat\",stream=\"false\"} 0",
            "tether_cancellations_total{cause=\"shutdown\",endpoint=\"chat\",stream=\"true\"} 0",
            "tether_cancellations_total{cause=\"timeout\",endpoint=\"completions\",stream=\"false\"} 0",
            "tether_cancellations_total{cause=\"timeout\",endpoint=\"completions\",stream=\"true\"} 0",
            "tether_cancellations_total{cause=\"timeout\",endpoint=\"chat\",stream=\"false\"} 0",
            "tether_cancellations_total{cause=\"timeout\",endpoint=\"chat\",stream=\"true\"} 0",
        ])
    );
    assert_eq!(
        sorted_family(&text, "tether_client_disconnects"),
        sorted(&[
            "# HELP tether_client_disconnects HTTP requests whose client went away before the response was complete.",
            "# TYPE tether_client_disconnects counter",
            "tether_client_disconnects_total{endpoint=\"/v1/completions\"} 0",
            "tether_client_disconnects_total{endpoint=\"/v1/chat/completions\"} 0",
        ])
    );
}

#[test]
fn cancellations_are_counted_by_the_cause_of_cancelled_dropped_and_timed_out_requests() {
    let m = Metrics::new(None);
    let ms = Duration::from_millis(1);
    for (outcome, cause) in [
        (Outcome::Cancelled, Some(Cause::ClientDisconnect)),
        (Outcome::Cancelled, Some(Cause::ClientDisconnect)),
        (Outcome::Cancelled, Some(Cause::Shutdown)),
        (Outcome::TimedOut, Some(Cause::Timeout)),
        (Outcome::Dropped, None),
        (Outcome::Cancelled, Some(Cause::Caller)),
        // Not cancellations: a graceful stop that still finished, an engine error.
        (Outcome::Finished(FinishReason::Stop), Some(Cause::Caller)),
        (Outcome::Failed(ErrorKind::Unknown), Some(Cause::Shutdown)),
    ] {
        m.record(&record(outcome, cause), COMPLETIONS_STREAM, 1, ms);
    }
    m.record(
        &record(Outcome::TimedOut, Some(Cause::Timeout)),
        CHAT_UNARY,
        1,
        ms,
    );
    let text = m.encode();
    let nonzero: Vec<String> = sorted_family(&text, "tether_cancellations")
        .into_iter()
        .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
        .collect();
    assert_eq!(
        nonzero,
        sorted(&[
            "tether_cancellations_total{cause=\"caller\",endpoint=\"completions\",stream=\"true\"} 1",
            "tether_cancellations_total{cause=\"client_disconnect\",endpoint=\"completions\",stream=\"true\"} 2",
            "tether_cancellations_total{cause=\"none\",endpoint=\"completions\",stream=\"true\"} 1",
            "tether_cancellations_total{cause=\"shutdown\",endpoint=\"completions\",stream=\"true\"} 1",
            "tether_cancellations_total{cause=\"timeout\",endpoint=\"completions\",stream=\"true\"} 1",
            "tether_cancellations_total{cause=\"timeout\",endpoint=\"chat\",stream=\"false\"} 1",
        ])
    );
    // The causes add up to the cancelled, dropped and timed-out requests.
    let ended_early = ["cancelled", "dropped", "timed_out"]
        .map(|o| m.outcome(o))
        .iter()
        .sum::<u64>();
    let by_cause = ["client_disconnect", "shutdown", "timeout", "caller", "none"]
        .map(|c| m.cancellations(c))
        .iter()
        .sum::<u64>();
    assert_eq!((ended_early, by_cause), (7, 7));
}

#[test]
fn duration_queue_time_and_prompt_histograms_are_exact() {
    let m = Metrics::new(None);
    let mut queued = record(Outcome::Finished(FinishReason::Length), None);
    queued.queue_time = Some(Duration::from_millis(3));
    m.record(&queued, COMPLETIONS_STREAM, 7, Duration::from_millis(20));
    // No scheduling signal: no queue time observed.
    let unqueued = record(Outcome::Cancelled, Some(Cause::ClientDisconnect));
    m.record(&unqueued, CHAT_UNARY, 300, Duration::from_secs(2));
    let text = m.encode();
    let duration_buckets = |values: [u32; 20]| -> Vec<String> {
        DURATION_BUCKETS
            .iter()
            .zip(values)
            .map(|(le, n)| format!("{le:?}\"}} {n}"))
            .collect()
    };
    let expected = |name: &str, help: &str, sum: &str, count: u32, buckets: Vec<String>| {
        let mut lines = vec![
            format!("# HELP {name} {help}."),
            format!("# TYPE {name} histogram"),
            format!("{name}_sum {sum}"),
            format!("{name}_count {count}"),
        ];
        lines.extend(buckets.iter().map(|b| format!("{name}_bucket{{le=\"{b}")));
        lines.push(format!("{name}_bucket{{le=\"+Inf\"}} {count}"));
        lines
    };
    assert_eq!(
        family(&text, "tether_request_duration_seconds"),
        expected(
            "tether_request_duration_seconds",
            "Time from generate to the request's end",
            "2.02",
            2,
            // 20 ms from the 0.025 bucket on, 2 s from the 2.5 one on.
            duration_buckets([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]),
        )
    );
    assert_eq!(
        family(&text, "tether_queue_time_seconds"),
        expected(
            "tether_queue_time_seconds",
            "Time in the engine's queue, for requests whose engine signalled scheduling",
            "0.003",
            1,
            duration_buckets([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
        )
    );
    let prompt_buckets: Vec<String> = PROMPT_TOKEN_BUCKETS
        .iter()
        .zip([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2])
        .map(|(le, n)| format!("{le:?}\"}} {n}"))
        .collect();
    assert_eq!(
        family(&text, "tether_prompt_tokens"),
        expected(
            "tether_prompt_tokens",
            "Prompt length of each request, in tokens",
            "307.0",
            2,
            prompt_buckets,
        )
    );
}

#[test]
fn http_endpoints_are_the_known_paths_or_other() {
    assert_eq!(http_endpoint("/v1/completions"), "/v1/completions");
    assert_eq!(http_endpoint("/metrics"), "/metrics");
    assert_eq!(http_endpoint("/v1/completions/"), "other");
    assert_eq!(http_endpoint("/admin"), "other");
}

#[test]
fn connections_open_and_refused_are_exported() {
    let m = Metrics::new(None);
    let text = m.encode();
    assert_eq!(
        family(&text, "tether_http_connections"),
        [
            "# HELP tether_http_connections HTTP connections open now.",
            "# TYPE tether_http_connections gauge",
            "tether_http_connections 0",
        ]
    );
    assert_eq!(
        family(&text, "tether_http_connections_refused"),
        [
            "# HELP tether_http_connections_refused HTTP connections answered 503 and closed because the connection limit was reached.",
            "# TYPE tether_http_connections_refused counter",
            "tether_http_connections_refused_total 0",
        ]
    );
    m.connection_opened();
    m.connection_opened();
    m.connection_opened();
    m.connection_closed();
    m.connection_refused();
    m.connection_refused();
    let text = m.encode();
    assert!(
        text.lines().any(|l| l == "tether_http_connections 2"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "tether_http_connections_refused_total 2"),
        "{text}"
    );
    assert_eq!((m.connections(), m.connections_refused()), (2, 2));
}
