//! Helpers the engines' behaviour tests share: the two runtimes and [`on_both!`],
//! reading a raw engine stream, waiting on the runtime's clock, counting spawned tasks
//! and adapter records, and the scenarios that read the same for every engine.
// Each test crate that includes this module uses only some of it.
#![allow(dead_code, unreachable_pub)]

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tether_core::drive::CountingRuntime;
use tether_core::{
    Adapter, AdapterConfig, Chunk, ChunkStream, Context, EngineError, FinishReason,
    GenerateContext, LlmEngine, Outcome, Request, RequestRecord, ResponseStream, Runtime,
};

pub mod tiny;

pub type Rt = Arc<dyn Runtime>;

pub fn tokio_rt() -> Rt {
    Arc::new(tether_tokio::TokioRuntime::current())
}

pub fn smol_rt() -> Rt {
    Arc::new(tether_smol::SmolRuntime::global())
}

/// Run each `scenario(rt)` of the test crate on tokio with a paused clock and on smol.
#[allow(unused_macros)] // a test crate uses one of the two
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(start_paused = true)]
            async fn tokio() {
                super::$name($crate::common::tokio_rt()).await;
            }
            #[test]
            fn smol() {
                smol::block_on(super::$name($crate::common::smol_rt()));
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use on_both;

/// Run each `scenario(rt)` on tokio with a real clock and on smol: for an engine that
/// computes on threads of its own (a paused clock would jump every deadline while the
/// runtime waits for them).
#[allow(unused_macros)]
macro_rules! on_both_real {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn tokio() {
                super::$name($crate::common::tokio_rt()).await;
            }
            #[test]
            fn smol() {
                smol::block_on(super::$name($crate::common::smol_rt()));
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use on_both_real;

pub fn gctx(id: &str) -> GenerateContext {
    GenerateContext::new(Context::new(id), id)
}

pub async fn collect(stream: ChunkStream) -> Vec<Result<Chunk, EngineError>> {
    stream.collect().await
}

pub fn tokens(items: &[Result<Chunk, EngineError>]) -> Vec<u32> {
    items
        .iter()
        .filter_map(|i| i.as_ref().ok())
        .flat_map(|c| c.token_ids.iter().copied())
        .collect()
}

/// The last item, checked to be the one terminal of `items`.
pub fn terminal(items: &[Result<Chunk, EngineError>]) -> &Chunk {
    let last = items.last().expect("at least one item").as_ref().unwrap();
    assert!(last.is_terminal(), "last item is terminal: {last:?}");
    let terminals = items
        .iter()
        .filter(|i| i.as_ref().is_ok_and(Chunk::is_terminal))
        .count();
    assert_eq!(terminals, 1, "exactly one terminal");
    last
}

/// Wait (on the runtime's clock) until `cond` holds; at most 2 s.
pub async fn until(rt: &Rt, mut cond: impl FnMut() -> bool) {
    let deadline = rt.now() + Duration::from_secs(2);
    let mut timer = rt.sleep_until(rt.now());
    while !cond() {
        assert!(rt.now() < deadline, "condition not reached in 2 s");
        timer.as_mut().reset(rt.now() + Duration::from_millis(1));
        poll_fn(|cx| timer.as_mut().poll(cx)).await;
    }
}

/// An adapter observer: the records it got (`.0`) and the aborts it was told of (`.1`).
#[derive(Default)]
pub struct Records(pub Mutex<Vec<RequestRecord>>, pub AtomicUsize);

impl tether_core::Observer for Records {
    fn on_record(&self, record: &RequestRecord) {
        self.0.lock().unwrap().push(record.clone());
    }
    fn on_abort(&self, _: &str) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

/// An adapter over `engine` on `rt`, observed by the returned [`Records`].
pub fn observed_adapter(engine: Arc<dyn LlmEngine>, rt: &Rt) -> (Adapter, Arc<Records>) {
    let records = Arc::new(Records::default());
    let adapter = Adapter::new(
        engine,
        rt.clone(),
        AdapterConfig::default().observer(records.clone()),
    );
    (adapter, records)
}

/// The engine `make` builds on a counting `rt` spawns one scheduler task, however often
/// it is started and however many requests (`requests`, for model `model`) it runs;
/// that task ends after `cleanup`.
pub async fn one_scheduler_task_per_engine<E: LlmEngine>(
    rt: Rt,
    make: impl FnOnce(CountingRuntime<Rt>) -> E,
    model: &str,
    requests: u32,
) {
    let counting = CountingRuntime::new(rt.clone());
    let engine = make(counting.clone());
    engine.start(0).await.unwrap();
    engine.start(0).await.unwrap();
    let mut streams = Vec::new();
    for i in 0..requests {
        let id = format!("r{i}");
        let request = Request::new(id.clone(), model, vec![i]).with_max_tokens(4);
        streams.push(engine.generate(request, gctx(&id)).await.unwrap());
    }
    for s in streams {
        collect(s).await;
    }
    assert_eq!(counting.spawned(), 1, "one loop, however many requests");
    engine.cleanup().await.unwrap();
    until(&rt, || counting.live() == 0).await;
}

/// Kill `ctx`: the next item of its stream `s` is the synthesized `Cancelled` terminal,
/// and `s` ends.
pub async fn kill_ends_with_cancelled(ctx: &Context, s: &mut ResponseStream) {
    ctx.kill();
    let end = s.next().await.unwrap();
    assert_eq!(
        end.data.unwrap().finish_reason,
        Some(FinishReason::Cancelled)
    );
    assert!(s.next().await.is_none());
}

/// The observer got exactly one record: `outcome`, after `tokens` tokens.
pub fn assert_one_record(records: &Records, outcome: &Outcome, tokens: u32) {
    let recs = records.0.lock().unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(&recs[0].outcome, outcome);
    assert_eq!(recs[0].output_tokens, tokens);
}
