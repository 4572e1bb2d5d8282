//! The adapter as a `tower::Service` (core feature `tower`): a `tower` timeout that drops
//! a slow setup records the request and aborts the engine (rule 10), and a permit held
//! with `ResponseStream::attach` bounds running generations, where `ConcurrencyLimit`
//! alone only bounds setups. tokio only: tower's timeout and limit layers need tokio.

use std::sync::Arc;
use std::time::Duration;

use tether_core::{AbortStatus, FinishReason, Outcome, Request, ResponseStream};
use tether_tests::{guarded, Harness};
use tether_tokio::TokioRuntime;
use tower::{Service, ServiceBuilder, ServiceExt};

fn request(id: &str) -> Request {
    Request::new(id, "m", vec![1, 2, 3])
}

#[tokio::test(start_paused = true)]
async fn a_tower_timeout_during_setup_records_dropped_and_aborts() {
    let h = Harness::new(TokioRuntime::current());
    let script = h.engine.script("r");
    script.hold_setup();
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(2))
        .service(h.adapter.clone());
    let started = tokio::time::Instant::now();
    let err = svc
        .ready()
        .await
        .expect("the adapter is always ready")
        .call(request("r"))
        .await
        .expect_err("the setup never finishes");
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    let rec = h.observer.record("r");
    assert_eq!(
        (rec.outcome, rec.abort),
        (Outcome::Dropped, AbortStatus::Sent)
    );
    h.wait_aborts(&script, 1).await;
    h.assert_clean().await;
}

#[tokio::test(start_paused = true)]
async fn the_service_streams_like_generate() {
    let h = Harness::new(TokioRuntime::current());
    let mut svc = h.adapter.clone();
    let script = h.engine.script("r");
    script.tokens(&[1]).terminal(FinishReason::Eos);
    let call = svc.ready().await.expect("ready").call(request("r"));
    let mut stream: ResponseStream = guarded(&h.rt, "call", call).await.expect("stream");
    assert_eq!(stream.context().id(), "r");
    assert_eq!(h.collect(&mut stream).await.len(), 2);
    assert_eq!(
        h.observer.record("r").outcome,
        Outcome::Finished(FinishReason::Eos)
    );
    h.assert_clean().await;
}

#[tokio::test(start_paused = true)]
async fn an_attached_permit_bounds_running_generations() {
    let h = Harness::new(TokioRuntime::current());
    let limit = Arc::new(tokio::sync::Semaphore::new(1));
    let mut svc = h.adapter.clone();
    let permit = limit.clone().try_acquire_owned().expect("free");
    let mut first = guarded(&h.rt, "call", svc.call(request("a")))
        .await
        .expect("stream");
    first.attach(permit);
    // The stream was returned, yet the permit is still taken: generation runs.
    assert!(limit.clone().try_acquire_owned().is_err());
    h.engine.script("a").terminal(FinishReason::Eos);
    assert_eq!(h.collect(&mut first).await.len(), 1);
    // Over for the consumer: the permit is back although `first` is still alive.
    assert!(limit.clone().try_acquire_owned().is_ok());
    drop(first);
    h.assert_clean().await;
}
