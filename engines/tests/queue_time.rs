//! Both engines send the scheduling signal (`GenerateContext::notify_scheduled`), so an
//! adapter's record carries the request's queue time: SimEngine when a request gets a
//! batch slot, TinyEngine when its prefill starts. On tokio's paused clock, so the
//! times are exact.

// Only tokio has a paused clock: the scenarios do not run on both runtimes.
#[allow(unused_macros, unused_imports)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tether_core::{Chunk, FinishReason, LlmEngine, Outcome, Request, RequestRecord};
use tether_engines::tiny::{TinyConfig, TinyEngine};
use tether_engines::{SimConfig, SimEngine};

use common::{observed_adapter, tokio_rt, Records};

fn record(records: &Records, id: &str) -> RequestRecord {
    let recs = records.0.lock().unwrap();
    let mine: Vec<&RequestRecord> = recs.iter().filter(|r| *r.id == *id).collect();
    assert_eq!(mine.len(), 1, "one record for {id}: {recs:?}");
    mine[0].clone()
}

/// One slot, 1 ms per step: `a` (3 tokens) is admitted at once, `b` waits for `a`'s
/// three steps, `zero` (`max_tokens = 0`) never queues.
async fn sim_queue_times(first_token_hint: bool) {
    let rt = tokio_rt();
    let engine = Arc::new(SimEngine::new(
        SimConfig {
            max_sequences: 1,
            decode_step_cost: Duration::from_millis(1),
            prefill_cost_per_token: Duration::ZERO,
            batch_cost_per_sequence: Duration::ZERO,
            first_token_hint,
            ..SimConfig::default()
        },
        rt.clone(),
    ));
    engine.start(0).await.unwrap();
    let (adapter, records) = observed_adapter(engine.clone(), &rt);
    let req =
        |id: &str, max_tokens| Request::new(id, "sim", vec![1, 2]).with_max_tokens(max_tokens);
    let a = adapter.request(req("a", 3)).await.unwrap();
    let b = adapter.request(req("b", 2)).await.unwrap();
    let zero = adapter.request(req("zero", 0)).await.unwrap();
    for s in [a, b, zero] {
        let items: Vec<_> = s.collect().await;
        assert!(items.last().unwrap().data.as_ref().unwrap().is_terminal());
    }
    let (a, b, zero) = (
        record(&records, "a"),
        record(&records, "b"),
        record(&records, "zero"),
    );
    assert_eq!(a.outcome, Outcome::Finished(FinishReason::Length));
    assert_eq!(a.queue_time, Some(Duration::ZERO));
    assert_eq!(a.ttft, Some(Duration::from_millis(1)));
    // Admitted when `a` ended at its third step, then one step to its first token.
    assert_eq!(b.queue_time, Some(Duration::from_millis(3)));
    assert_eq!(b.ttft, Some(Duration::from_millis(4)));
    assert_eq!(zero.queue_time, None, "never queued, never scheduled");
}

#[tokio::test(start_paused = true)]
async fn sim_engine_signals_scheduling_when_a_slot_is_free() {
    sim_queue_times(true).await;
}

#[tokio::test(start_paused = true)]
async fn sim_engine_signals_scheduling_without_first_token_hints() {
    sim_queue_times(false).await;
}

/// One sequence at a time: `a` starts its prefill at once; `b` waits while the clock
/// is moved 5 ms on, until `a` is killed, then starts its prefill.
async fn tiny_queue_times(first_token_hint: bool) {
    let rt = tokio_rt();
    let engine = Arc::new(TinyEngine::new(
        TinyConfig {
            d_model: 32,
            heads: 2,
            d_ff: 128,
            max_context: 4096,
            max_sequences: 1,
            first_token_hint,
            ..TinyConfig::default()
        },
        rt.clone(),
    ));
    engine.start(0).await.unwrap();
    let (adapter, records) = observed_adapter(engine.clone(), &rt);
    let req =
        |id: &str, max_tokens| Request::new(id, "tiny", vec![1, 2]).with_max_tokens(max_tokens);
    let mut a = adapter.request(req("a", 4000)).await.unwrap();
    let b = adapter.request(req("b", 2)).await.unwrap();
    // The scheduler runs only when this task yields; the clock has not moved.
    while engine.gauges().steps == 0 {
        tokio::task::yield_now().await;
    }
    let g = engine.gauges();
    assert_eq!((g.live_sequences, g.queue_len), (1, 1), "{g:?}");
    tokio::time::advance(Duration::from_millis(5)).await;
    a.context().kill();
    while a.next().await.is_some() {}
    let items: Vec<_> = b.collect().await;
    assert_eq!(
        items
            .iter()
            .filter(|i| i.data.as_ref().is_some_and(Chunk::has_tokens))
            .count(),
        2
    );
    let (a, b) = (record(&records, "a"), record(&records, "b"));
    assert_eq!(a.outcome, Outcome::Cancelled);
    assert_eq!(a.queue_time, Some(Duration::ZERO));
    assert_eq!(b.outcome, Outcome::Finished(FinishReason::Length));
    assert_eq!(b.queue_time, Some(Duration::from_millis(5)));
}

#[tokio::test(start_paused = true)]
async fn tiny_engine_signals_scheduling_when_prefill_starts() {
    tiny_queue_times(true).await;
}

#[tokio::test(start_paused = true)]
async fn tiny_engine_signals_scheduling_without_first_token_hints() {
    tiny_queue_times(false).await;
}
