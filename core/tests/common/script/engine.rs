//! The scripted engine and the observer, both reporting into one [`Tracker`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Wake};

use futures_core::Stream;
use tether_core::engine::BoxFuture;
use tether_core::{
    Chunk, ChunkStream, EngineConfig, EngineError, ErrorKind, GenerateContext, LlmEngine, Mode,
    Observer, Request, RequestRecord,
};

use super::{lock, EngineStep, PANIC_TEXT};

/// What the engine did during one consumer poll, in order.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Did {
    Hint,
    Yield(EngineStep),
    Pending,
}

#[derive(Default)]
pub(super) struct Tracker {
    pub(super) mode: Mode,
    pub(super) aborts: u32,
    pub(super) on_aborts: u32,
    pub(super) records: Vec<(RequestRecord, u32)>,
    /// The engine yielded its terminal, an error or its end, or panicked.
    pub(super) engine_ended: bool,
    /// The engine yielded a non-empty chunk, or someone sent the hint.
    pub(super) first_evidence: bool,
    /// The deferral deadline has passed since the abort was deferred.
    pub(super) deadline_passed: bool,
    pub(super) log: Vec<Did>,
    pub(super) gctx: Option<GenerateContext>,
    pub(super) violations: Vec<String>,
}

pub(super) struct ScriptEngine {
    pub(super) track: Arc<Mutex<Tracker>>,
    pub(super) steps: Mutex<Option<Vec<EngineStep>>>,
    pub(super) setup_error: Option<ErrorKind>,
}

impl LlmEngine for ScriptEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(
            async move { Ok(EngineConfig::new("script", worker_id).with_max_concurrency(None)) },
        )
    }

    fn generate(
        &self,
        _request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        let result = match self.setup_error {
            Some(kind) => Err(EngineError::new(kind, "scripted setup error")),
            None => {
                lock(&self.track).gctx = Some(context.clone());
                let steps = lock(&self.steps).take().unwrap_or_default();
                let stream: ChunkStream = Box::pin(ScriptStream {
                    steps: steps.into(),
                    gctx: context,
                    track: self.track.clone(),
                    next_token: 0,
                });
                Ok(stream)
            }
        };
        Box::pin(async move { result })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        drop(context);
        let mut t = lock(&self.track);
        t.aborts += 1;
        if t.aborts > 1 {
            t.violations.push("rule 1: abort called twice".into());
        }
        if t.engine_ended {
            t.violations
                .push("rule 1: abort called after the engine's own end".into());
        }
        if t.mode == Mode::Decode && !t.first_evidence && !t.deadline_passed {
            t.violations
                .push("rule 2: decode abort before the first token and the deadline".into());
        }
        Box::pin(async {})
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

struct ScriptStream {
    steps: VecDeque<EngineStep>,
    gctx: GenerateContext,
    track: Arc<Mutex<Tracker>>,
    next_token: u32,
}

impl Stream for ScriptStream {
    type Item = Result<Chunk, EngineError>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let step = {
                let mut t = lock(&this.track);
                if t.engine_ended {
                    t.violations
                        .push("the engine stream was polled after its end".into());
                    return Poll::Ready(None);
                }
                let Some(step) = this.steps.pop_front() else {
                    t.log.push(Did::Pending);
                    return Poll::Pending;
                };
                match &step {
                    EngineStep::Hint => {
                        t.first_evidence = true;
                        t.log.push(Did::Hint);
                    }
                    EngineStep::Pending => t.log.push(Did::Pending),
                    other => {
                        t.log.push(Did::Yield(other.clone()));
                        match other {
                            EngineStep::Tokens(_) => t.first_evidence = true,
                            EngineStep::Tokenless => {}
                            _ => t.engine_ended = true,
                        }
                    }
                }
                step
            };
            return match step {
                EngineStep::Hint => {
                    // Outside the tracker lock: the hint may abort, which reports here.
                    this.gctx.notify_first_token();
                    continue;
                }
                EngineStep::Pending => Poll::Pending,
                EngineStep::Tokens(n) => {
                    let ids = (0..u32::from(n)).map(|i| this.next_token + i).collect();
                    this.next_token += u32::from(n);
                    Poll::Ready(Some(Ok(Chunk::tokens(ids))))
                }
                EngineStep::Tokenless => Poll::Ready(Some(Ok(Chunk::default()))),
                EngineStep::Terminal(reason) => Poll::Ready(Some(Ok(Chunk::terminal(reason)))),
                EngineStep::Error(kind) => {
                    Poll::Ready(Some(Err(EngineError::new(kind, "scripted error"))))
                }
                EngineStep::End => Poll::Ready(None),
                EngineStep::Panic => panic!("{}", PANIC_TEXT),
            };
        }
    }
}

pub(super) struct ScriptObserver {
    pub(super) track: Arc<Mutex<Tracker>>,
}

impl Observer for ScriptObserver {
    fn on_record(&self, record: &RequestRecord) {
        let mut t = lock(&self.track);
        let aborts = t.aborts;
        t.records.push((record.clone(), aborts));
        if t.records.len() > 1 {
            t.violations.push("rule 9: a second record".into());
        }
    }

    fn on_abort(&self, _request_id: &str) {
        lock(&self.track).on_aborts += 1;
    }
}

#[derive(Default)]
pub(super) struct CountWake(pub(super) AtomicUsize);

impl Wake for CountWake {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
