//! The ghost: what the rules say must happen, op by op; and [`run`], which drives the
//! real adapter through a script and holds it to the ghost after every op.

#[path = "ghost/checks.rs"]
mod checks;
#[path = "ghost/ops.rs"]
mod ops;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};
use tether_core::AbortStatus;

use tether_core::{
    Adapter, AdapterConfig, Annotated, Chunk, Context, EngineError, FinishReason, Mode, Outcome,
    Request, ResponseStream,
};

use super::engine::{CountWake, ScriptEngine, ScriptObserver, Tracker};
use super::runtime::ManualRuntime;
use super::{lock, Op, Script, DEFERRAL};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cancel {
    None,
    Stop,
    Kill,
}

/// A terminal the consumer is owed, with the outcome it records.
#[derive(Clone, Debug, PartialEq)]
struct Owed {
    item: Annotated<Chunk>,
    outcome: Outcome,
}

#[derive(Debug)]
struct Ghost {
    mode: Mode,
    /// No record yet (the request is not over for the consumer).
    live: bool,
    cancel: Cancel,
    /// A synthesized terminal is owed (kill, expired grace, timeout).
    pending_terminal: Option<Owed>,
    /// A first token exists (a non-empty chunk or the hint).
    first_token: bool,
    /// An abort was issued (by anyone).
    aborted: bool,
    /// An abort is due but held back (decode mode before the first token).
    deferred: bool,
    /// The deferred abort was discarded: the engine ended by itself first.
    discarded: bool,
    /// The engine's own end was seen (terminal, error, end, panic).
    engine_ended: bool,
    /// The watchdog task exists and has not ended.
    watchdog: bool,
    /// The adapter's abort task was started (at the first abort; it stays parked for
    /// the adapter's life).
    abort_task: bool,
    /// When the cancel grace expires (armed by the stop, off the consumer's path).
    grace_due: Option<Instant>,
    /// When the deferred abort is released (armed by the event that deferred it).
    deferral_due: Option<Instant>,
    /// The engine was handed to the watchdog (the consumer is over, an abort is owed).
    handed_over: bool,
    /// When the consumer started waiting on a silent engine since the last token.
    silence_since: Option<Instant>,
    /// A token reached the consumer (the inter-token limit applies).
    seen_token: bool,
    /// The silence limit fired (once).
    silence_fired: bool,
    /// What the consumer saw.
    terminal_seen: bool,
    tokens: u32,
    /// Expected outcome once recorded.
    outcome: Option<Outcome>,
    /// The consumer's last poll was `Pending` and it waits for a wake-up.
    waiting: bool,
    /// When the consumer's own timer (the silence limit) wakes it, if it waits on one.
    timer_wait: Option<Instant>,
    /// Tasks the rules allow the adapter to spawn.
    spawns_allowed: usize,
    /// The terminal an early finish put in front of the consumer (rule 12).
    stashed: Option<Annotated<Chunk>>,
}

/// What a run did, for statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    /// How many items the consumer received.
    pub(crate) items: usize,
    /// Whether the engine was aborted.
    pub(crate) aborted: bool,
    /// The recorded outcome's label.
    pub(crate) outcome: &'static str,
}

struct Harness {
    cfg_ttft: Option<Duration>,
    cfg_itl: Option<Duration>,
    cfg_grace: Option<Duration>,
    rt: ManualRuntime,
    track: Arc<Mutex<Tracker>>,
    ctx: Context,
    stream: Option<Pin<Box<ResponseStream>>>,
    wake: Arc<CountWake>,
    waker: Waker,
    g: Ghost,
    items: usize,
    wakes_at_pending: usize,
}

type Check = Result<(), String>;

fn fail<T>(what: impl Into<String>) -> Result<T, String> {
    Err(what.into())
}

/// Run `script` and check it; `Err` names the first broken rule.
pub(crate) fn run(script: &Script) -> Result<Summary, String> {
    let rt = ManualRuntime::new();
    let track = Arc::new(Mutex::new(Tracker {
        mode: script.mode,
        ..Tracker::default()
    }));
    let engine = ScriptEngine {
        track: track.clone(),
        steps: Mutex::new(Some(script.engine.clone())),
        setup_error: script.setup_error,
    };
    let observer = ScriptObserver {
        track: track.clone(),
    };
    let config = AdapterConfig::default()
        .mode(script.mode)
        .deferral_deadline(DEFERRAL)
        .cancel_grace(script.grace)
        .first_token_timeout(script.ttft)
        .inter_token_timeout(script.itl)
        .observer(Arc::new(observer))
        .spans(false);
    let adapter = Adapter::new(Arc::new(engine), rt.clone(), config);
    let ctx = Context::new("script");
    let request = Request::new("script", "script", vec![1, 2, 3]);
    let mut generate = std::pin::pin!(adapter.generate(request, ctx.clone()));
    let Poll::Ready(result) = generate
        .as_mut()
        .poll(&mut TaskContext::from_waker(Waker::noop()))
    else {
        return fail("generate did not complete at once");
    };
    let stream = match result {
        Ok(stream) => stream,
        Err(err) => return setup_failed(script, &rt, &track, &err),
    };
    if script.setup_error.is_some() {
        return fail("rule 7: generate succeeded despite the setup error");
    }
    let wake = Arc::new(CountWake::default());
    let waker = Waker::from(wake.clone());
    let mut h = Harness {
        cfg_ttft: script.ttft,
        cfg_itl: script.itl,
        cfg_grace: script.grace,
        rt,
        track,
        ctx,
        stream: Some(Box::pin(stream)),
        wake,
        waker,
        g: Ghost {
            mode: script.mode,
            live: true,
            cancel: Cancel::None,
            pending_terminal: None,
            first_token: false,
            aborted: false,
            deferred: false,
            discarded: false,
            engine_ended: false,
            watchdog: false,
            abort_task: false,
            grace_due: None,
            deferral_due: None,
            handed_over: false,
            silence_since: None,
            seen_token: false,
            silence_fired: false,
            terminal_seen: false,
            tokens: 0,
            outcome: None,
            waiting: false,
            timer_wait: None,
            spawns_allowed: 0,
            stashed: None,
        },
        items: 0,
        wakes_at_pending: 0,
    };
    for (i, &op) in script.ops.iter().enumerate() {
        h.op(op)
            .and_then(|()| h.consistent())
            .map_err(|e| format!("op {i} ({op:?}): {e}\nghost: {:?}", h.g))?;
    }
    h.finish()
        .and_then(|()| h.consistent())
        .map_err(|e| format!("at the end: {e}\nghost: {:?}", h.g))?;
    let t = lock(&h.track);
    Ok(Summary {
        items: h.items,
        aborted: t.aborts > 0,
        outcome: t.records.first().map_or("none", |(r, _)| r.outcome.label()),
    })
}

fn setup_failed(
    script: &Script,
    rt: &ManualRuntime,
    track: &Mutex<Tracker>,
    err: &EngineError,
) -> Result<Summary, String> {
    let Some(kind) = script.setup_error else {
        return fail(format!("rule 7: unexpected setup error {err}"));
    };
    if err.kind() != kind {
        return fail(format!("rule 7: setup error of kind {:?}", err.kind()));
    }
    let t = lock(track);
    if t.aborts != 0 || rt.spawns() != 0 {
        return fail("rule 7: a setup error aborted or spawned");
    }
    match t.records.as_slice() {
        [(rec, _)]
            if rec.outcome == Outcome::Failed(kind) && rec.abort == AbortStatus::NotNeeded => {}
        other => return fail(format!("rule 9: setup error records {other:?}")),
    }
    Ok(Summary {
        items: 0,
        aborted: false,
        outcome: "failed",
    })
}

fn cancelled() -> Owed {
    Owed {
        item: Annotated::from_data(Chunk::terminal(FinishReason::Cancelled)),
        outcome: Outcome::Cancelled,
    }
}

impl Ghost {
    /// The hint counts as the first token for the silence limits.
    fn seen_token_or_hint(&mut self) {
        if !self.seen_token {
            self.seen_token = true;
            self.silence_since = None;
        }
    }
}

impl Cancel {
    fn max_with(self, op: Op) -> Cancel {
        match (self, op) {
            (_, Op::Kill) | (Cancel::Kill, _) => Cancel::Kill,
            _ => Cancel::Stop,
        }
    }
}
