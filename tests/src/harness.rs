//! [`Harness`]: a [`ScriptEngine`], a [`RecordingObserver`] and a [`CountingRuntime`]
//! wired to one [`Adapter`], with the guarded waits and end-of-scenario checks every
//! scenario shares.

use std::future::poll_fn;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use futures_util::future::{select, Either};
use tether_core::drive::CountingRuntime;
use tether_core::{
    Adapter, AdapterConfig, Annotated, Chunk, Context, EngineError, ErrorKind, Request,
    ResponseStream,
};

use crate::engine::{Script, ScriptEngine};
use crate::observer::RecordingObserver;
use crate::runtime::{guarded, next_item, ScenarioRuntime};
use futures_lite::future::yield_now;

/// The short deadline scenarios configure (deferral, grace, timeouts): instant on the
/// paused tokio clock, short enough on smol's real one.
pub const DEADLINE: Duration = Duration::from_millis(20);

/// A data item, as the adapter forwards an engine chunk.
pub fn data(chunk: Chunk) -> Annotated<Chunk> {
    Annotated::from_data(chunk)
}

/// The error kind of an error item (`None` for a data item).
pub fn error_kind(item: &Annotated<Chunk>) -> Option<ErrorKind> {
    item.error.as_ref().map(EngineError::kind)
}

/// Everything one scenario needs, on runtime `R`.
#[derive(Debug)]
pub struct Harness<R> {
    /// The bare runtime (guards and test sleeps use it, so they are not counted).
    pub rt: R,
    /// The runtime the adapter runs on: `rt`, counted.
    pub counting: CountingRuntime<R>,
    /// The engine behind the adapter.
    pub engine: ScriptEngine,
    /// The adapter's observer.
    pub observer: Arc<RecordingObserver>,
    /// The adapter under test.
    pub adapter: Adapter,
}

impl<R: ScenarioRuntime> Harness<R> {
    /// A harness with the default [`AdapterConfig`].
    pub fn new(rt: R) -> Harness<R> {
        Harness::with_config(rt, AdapterConfig::default())
    }

    /// A harness with `config` (its observer is replaced by the recording one).
    pub fn with_config(rt: R, mut config: AdapterConfig) -> Harness<R> {
        let engine = ScriptEngine::new();
        let observer = Arc::new(RecordingObserver::watching(&engine));
        config.observer = Some(observer.clone());
        let counting = CountingRuntime::new(rt.clone());
        let adapter = Adapter::new(Arc::new(engine.clone()), counting.clone(), config);
        Harness {
            rt,
            counting,
            engine,
            observer,
            adapter,
        }
    }

    /// The request the scenarios send: model `m`, three prompt tokens.
    pub fn request(&self, id: &str) -> Request {
        Request::new(id, "m", vec![1, 2, 3])
    }

    /// `adapter.generate`, guarded.
    pub async fn generate(
        &self,
        request: Request,
        context: Context,
    ) -> Result<ResponseStream, EngineError> {
        guarded(
            &self.rt,
            "generate",
            self.adapter.generate(request, context),
        )
        .await
    }

    /// Finish a `generate` the test started (and polled) itself, guarded.
    pub async fn generate_from<F>(&self, generate: F) -> Result<ResponseStream, EngineError>
    where
        F: std::future::Future<Output = Result<ResponseStream, EngineError>>,
    {
        guarded(&self.rt, "generate", generate).await
    }

    /// Start request `id` under a fresh context; returns its stream, script and context.
    ///
    /// # Panics
    /// If `generate` fails.
    pub async fn start(&self, id: &str) -> (ResponseStream, Script, Context) {
        self.start_on(&self.adapter, id).await
    }

    /// [`Harness::start`] on `adapter`: another adapter a test built on this harness's
    /// engine and counted runtime (one it can drop, or one with its own engine wrapper).
    ///
    /// # Panics
    /// If `generate` fails.
    pub async fn start_on(&self, adapter: &Adapter, id: &str) -> (ResponseStream, Script, Context) {
        let context = Context::new(id);
        let stream = self
            .generate_from(adapter.generate(self.request(id), context.clone()))
            .await
            .expect("generate succeeds");
        (stream, self.engine.script(id), context)
    }

    /// The stream's next item, guarded.
    pub async fn next(&self, stream: &mut ResponseStream) -> Option<Annotated<Chunk>> {
        next_item(&self.rt, stream).await
    }

    /// Every item up to the end of the stream, guarded.
    pub async fn collect(&self, stream: &mut ResponseStream) -> Vec<Annotated<Chunk>> {
        let mut items = Vec::new();
        while let Some(item) = self.next(stream).await {
            items.push(item);
        }
        items
    }

    /// Wait until `n` aborts of `script`'s request were entered in the engine, and the
    /// adapter's abort task has carried out every abort decided so far (so the tasks
    /// it spawns for them, an unfinished abort's own, are counted).
    pub async fn wait_aborts(&self, script: &Script, n: u32) {
        self.wait_aborts_on(&self.adapter, script, n).await;
    }

    /// [`wait_aborts`](Self::wait_aborts) for a request of `adapter` (one a test made
    /// itself, see [`start_on`](Self::start_on)): its abort task is the one settled.
    pub async fn wait_aborts_on(&self, adapter: &Adapter, script: &Script, n: u32) {
        guarded(
            &self.rt,
            "the engine abort",
            self.engine.until(|_| script.aborts() >= n),
        )
        .await;
        self.settle_abort_task(adapter).await;
    }

    /// Wait until `adapter`'s abort task has no abort queued or in hand (an abort in
    /// hand until its grace is on the timer).
    ///
    /// The count has no waker, so this yields in a loop; on tokio's paused clock a busy
    /// loop keeps the guard's timer from ever firing, so the loop is also bounded by a
    /// number of turns (seconds of spinning), after which it fails instead of hanging.
    async fn settle_abort_task(&self, adapter: &Adapter) {
        const TURNS: u32 = 10_000_000;
        guarded(&self.rt, "the abort task to carry out every abort", async {
            for _ in 0..TURNS {
                if adapter.unfinished_aborts() == 0 {
                    return;
                }
                yield_now().await;
            }
            panic!(
                "the abort task left {} abort(s) unfinished after {TURNS} turns",
                adapter.unfinished_aborts()
            );
        })
        .await;
    }

    /// Poll `stream` (collecting what it yields) until the engine's abort for `script`
    /// was entered: for aborts that only a polled stream's timer can release.
    pub async fn drive_until_abort(
        &self,
        stream: &mut ResponseStream,
        script: &Script,
    ) -> Vec<Annotated<Chunk>> {
        let mut items = Vec::new();
        let collected = &mut items;
        let mut ended = false;
        guarded(&self.rt, "the engine abort while polling", async {
            loop {
                let aborted = self.engine.until(|_| script.aborts() >= 1);
                if ended {
                    return aborted.await;
                }
                let next = poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx));
                match select(pin!(aborted), pin!(next)).await {
                    Either::Left(((), _)) => return,
                    Either::Right((Some(item), _)) => collected.push(item),
                    Either::Right((None, _)) => ended = true,
                }
            }
        })
        .await;
        items
    }

    /// Wait until every abort tether decided was entered in the engine.
    pub async fn settle_aborts(&self) {
        guarded(
            &self.rt,
            "every decided abort to reach the engine",
            self.engine.until(|e| {
                usize::try_from(e.total_aborts()).is_ok_and(|n| n >= self.observer.total_aborts())
            }),
        )
        .await;
    }

    /// The end-of-scenario checks: every decided abort reached the engine and matches it,
    /// no stream leaked, at most one abort per request and none decided or entered after
    /// the engine's end, no poll after the end, exactly one record per request.
    pub async fn assert_clean(&self) {
        self.check(true).await;
    }

    /// [`Harness::assert_clean`] for a scenario where an abort is decided while the
    /// engine is inside `poll_next` about to yield its end: the abort task may then enter
    /// the engine after the end, which is scheduling, not a broken rule. Decisions are
    /// still checked.
    pub async fn assert_clean_allowing_late_abort_entry(&self) {
        self.check(false).await;
    }

    async fn check(&self, entry_time: bool) {
        self.settle_aborts().await;
        // Spawned tasks (unfinished aborts, watchdogs) end and let go of the engine's
        // streams on their own schedule: wait for both to reach zero, guarded. The
        // adapter's own abort task, once started, parks for the adapter's life.
        self.settle_abort_task(&self.adapter).await;
        let parked = self.adapter.background_tasks();
        guarded(
            &self.rt,
            "every spawned task but the adapter's abort task to finish",
            self.counting.until_live_at_most(parked),
        )
        .await;
        assert_eq!(self.counting.live(), self.adapter.background_tasks());
        guarded(
            &self.rt,
            "every engine stream to be released",
            self.engine.until(|e| e.live_streams() == 0),
        )
        .await;
        assert_eq!(
            self.engine.total_aborts() as usize,
            self.observer.total_aborts(),
            "aborts entered vs decided"
        );
        assert_eq!(self.engine.live_streams(), 0, "leaked engine streams");
        assert_eq!(
            self.observer.aborts_after_end(),
            Vec::<String>::new(),
            "aborts decided after the engine's end"
        );
        for id in self.engine.generated_ids() {
            let script = self.engine.script(&id);
            assert!(script.aborts() <= 1, "{id}: {} aborts", script.aborts());
            assert_eq!(self.observer.aborts(&id), script.aborts() as usize, "{id}");
            if entry_time {
                assert_eq!(script.aborts_after_end(), 0, "{id}: abort after end");
            }
            assert_eq!(script.polls_after_end(), 0, "{id}: polled after end");
            assert_eq!(self.observer.records_of(&id).len(), 1, "{id}: records");
        }
    }
}
