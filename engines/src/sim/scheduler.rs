//! The scheduler loop: one task per started engine (never one per request) that
//! admits waiting sequences and steps the whole running batch, sleeping for each
//! step's simulated time on the engine's [`Runtime`] timer.
//!
//! Loop invariant: take the lock, admit (then tell each admitted request it was
//! scheduled, outside the lock), and either step after the step's time or,
//! when no sequence can produce, wait for a kick (a new request, freed capacity, or
//! `cleanup` closing the channel). Kicks are buffered (capacity 1), so one sent between
//! the check and the wait is not lost.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use async_channel::Receiver;
use futures_lite::future::yield_now;
use tether_core::drive::{AsyncTimer, Runtime};

use super::Core;

/// Run the batch of the engine behind `core` until `cleanup` (or the engine's drop)
/// ends epoch `epoch`.
pub(crate) async fn run(core: Arc<Core>, epoch: u64, kick: Receiver<()>) {
    let runtime: &dyn Runtime = &*core.runtime;
    let mut timer: Option<Pin<Box<dyn AsyncTimer>>> = None;
    // When the previous step ended, while the batch is busy. Steps are paced from it,
    // not from "now": delivering a step's tokens overlaps the next step, as the CPU
    // work of a real engine overlaps its GPU work, so tether's own cost is not added
    // to the simulated time.
    let mut last_end: Option<Instant> = None;
    let mut scheduled = Vec::new();
    loop {
        let cost = {
            let mut st = core.lock();
            if !st.control.is_current(epoch) {
                return;
            }
            st.admit(&core.config, &mut scheduled)
        };
        // Outside the lock, before the step's time: a request's queue time ends when it
        // gets its slot, not when its first token is out.
        for gctx in scheduled.drain(..) {
            gctx.notify_scheduled();
        }
        let Some(cost) = cost else {
            last_end = None;
            if kick.recv().await.is_err() {
                return; // closed by cleanup
            }
            continue;
        };
        let now = runtime.now();
        // Never more than one step behind: an overloaded host does not bunch steps up.
        let earliest = now.checked_sub(cost).unwrap_or(now);
        let from = last_end.map_or(now, |end| end.max(earliest).min(now));
        let deadline = from.checked_add(cost).unwrap_or(now);
        last_end = Some(deadline);
        if deadline <= now {
            // Let the consumers run: a step that is already due must still yield.
            yield_now().await;
        } else {
            let t = match &mut timer {
                Some(t) => {
                    t.as_mut().reset(deadline);
                    t
                }
                None => timer.insert(runtime.sleep_until(deadline)),
            };
            poll_fn(|cx| t.as_mut().poll(cx)).await;
        }
        let hints = {
            let mut st = core.lock();
            if !st.control.is_current(epoch) {
                return;
            }
            st.step(&core.config)
        };
        // Outside the lock: a hint may release a deferred abort in tether.
        for gctx in hints {
            gctx.notify_first_token();
        }
    }
}
