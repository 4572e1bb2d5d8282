//! The scheduler loop: one task per started engine (never one per request) that admits
//! waiting sequences and runs the whole batch through the model, one step at a time.
//!
//! Loop invariant: take the state lock and plan; if nothing can run, wait for a kick (a
//! new request, room in the batch, or `cleanup` closing the channel; kicks are buffered
//! with capacity 1, so one sent between the plan and the wait is not lost). Otherwise
//! tell the requests whose prefill starts that they were scheduled (outside the lock),
//! compute the step under the model lock only, apply its results under the state lock
//! only, then settle outside both (free caches, send terminals, deliver hints) and
//! yield, so the consumers run between steps. A step is computed inline: for this
//! model it takes about a millisecond, and chunked prefill keeps long prompts from
//! stretching it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use async_channel::Receiver;
use futures_lite::future::yield_now;
use tether_core::error::{panic_message, BackendError, EngineError, ErrorKind};

use super::model::Segment;
use super::state::{Effects, Plan};
use super::Core;
use crate::util::shutdown_error;

/// Run the batch of the engine behind `core` until `cleanup` (or the engine's drop)
/// ends epoch `epoch`.
pub(crate) async fn run(core: Arc<Core>, epoch: u64, kick: Receiver<()>) {
    loop {
        let plan = {
            let mut st = core.lock();
            if !st.control.is_current(epoch) {
                return;
            }
            st.plan(&core.config)
        };
        let Some(mut plan) = plan else {
            if kick.recv().await.is_err() {
                return; // closed by cleanup
            }
            continue;
        };
        // Outside the lock, before the step computes: a request's queue time ends where
        // its prefill starts.
        for gctx in plan.scheduled.drain(..) {
            gctx.notify_scheduled();
        }
        let (failed, next) = compute(&core, epoch, &plan);
        let mut fx = Effects::default();
        {
            let mut st = core.lock();
            if !st.control.is_current(epoch) {
                // `cleanup` ended every sequence and took the model (caches included).
                return;
            }
            st.fail_admissions(failed, &mut fx);
            if !plan.work.is_empty() {
                st.apply(&plan.work, next, &mut fx);
            }
        }
        core.settle(fx);
        yield_now().await;
    }
}

type Computed = (
    Vec<(u64, EngineError)>,
    Result<Vec<Option<u32>>, EngineError>,
);

/// Allocate the admitted sequences' caches and run the step, under the model lock.
/// A panic in the model becomes the step's error instead of killing the loop.
fn compute(core: &Core, epoch: u64, plan: &Plan) -> Computed {
    let mut model = core.lock_model();
    let runner = match model.as_mut() {
        Some((e, runner)) if *e == epoch => runner,
        _ => return (Vec::new(), Err(shutdown_error())),
    };
    let mut failed = Vec::new();
    for &(seq, rows) in &plan.admit {
        if let Err(error) = runner.alloc(seq, rows) {
            failed.push((seq, error));
        }
    }
    let segments: Vec<Segment<'_>> = plan
        .work
        .iter()
        .map(|w| Segment {
            seq: w.seq,
            tokens: &w.tokens,
            pos0: w.pos0,
            sample: w.sample,
        })
        .collect();
    let next = catch_unwind(AssertUnwindSafe(|| runner.forward(&segments, false)))
        .unwrap_or_else(|panic| {
            Err(EngineError::new(
                ErrorKind::Backend(BackendError::Unknown),
                format!("model panicked: {}", panic_message(&*panic)),
            ))
        })
        .map(|forward| forward.next);
    (failed, next)
}
