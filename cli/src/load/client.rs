//! The load's clients: `concurrency` worker tasks that each take the next request
//! number, run that request through the adapter, carry out its planned client action
//! (stop, kill or drop after a given number of items) and write down what they saw.
//!
//! Owns the client side of a request; decisions about right and wrong are the
//! ledger's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use indicatif::ProgressBar;
use tether_core::protocol::Request;
use tether_core::{Adapter, Context, Runtime};

use super::ledger::{request_id, Ledger, Seen, Terminal};
use super::plan::{Action, Planned};

/// What every worker shares.
pub(crate) struct Clients {
    pub(crate) adapter: Adapter,
    pub(crate) runtime: Arc<dyn Runtime>,
    pub(crate) plan: Vec<Planned>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) model: String,
    pub(crate) max_tokens: u32,
    pub(crate) vocab: u32,
    /// Ask the engine to ignore end-of-sequence tokens (a real model's).
    pub(crate) ignore_eos: bool,
    pub(crate) progress: ProgressBar,
    pub(crate) next: AtomicUsize,
}

/// What one worker measured.
#[derive(Debug, Default)]
pub(crate) struct WorkerOut {
    /// Inter-token gaps in microseconds, as the clients saw them.
    pub(crate) gaps_us: Vec<u32>,
    /// Tokens received.
    pub(crate) tokens: u64,
}

/// Take requests until none are left.
pub(crate) async fn worker(clients: Arc<Clients>) -> WorkerOut {
    let mut out = WorkerOut::default();
    loop {
        // Relaxed: only the uniqueness of each number matters.
        let index = clients.next.fetch_add(1, Ordering::Relaxed);
        let Some(planned) = clients.plan.get(index) else {
            return out;
        };
        clients.ledger.started();
        let seen = run_one(&clients, index, planned, &mut out).await;
        out.tokens += u64::from(seen.tokens);
        clients.ledger.client_done(index, seen);
        clients.progress.inc(1);
    }
}

fn prompt(index: usize, len: u32, vocab: u32) -> Vec<u32> {
    let base = (index as u32).wrapping_mul(2_654_435_761);
    (0..len)
        .map(|t| base.wrapping_add(t.wrapping_mul(40_503)) % vocab.max(1))
        .collect()
}

async fn run_one(clients: &Clients, index: usize, planned: &Planned, out: &mut WorkerOut) -> Seen {
    let id = request_id(index);
    let mut request = Request::new(
        id.clone(),
        clients.model.clone(),
        prompt(index, planned.prompt_len, clients.vocab),
    )
    .with_max_tokens(clients.max_tokens);
    request.stop.ignore_eos = clients.ignore_eos;
    if let Some(chaos) = planned.action.chaos() {
        request.annotations.push(chaos.annotation());
    }
    let context = Context::new(id);
    let mut seen = Seen::default();
    let mut stream = match clients.adapter.generate(request, context.clone()).await {
        Ok(stream) => Box::pin(stream),
        Err(err) => {
            seen.setup_error = Some(err);
            return seen;
        }
    };
    let act_at = planned.action.client_at();
    let mut last_token: Option<Instant> = None;
    loop {
        if act_at == Some(seen.items) && !seen.acted && seen.terminals == 0 {
            seen.acted = true;
            match planned.action {
                Action::Stop(_) => context.stop(),
                Action::Kill(_) => context.kill(),
                Action::Drop(_) => {
                    drop(stream);
                    seen.dropped = true;
                    return seen;
                }
                _ => {}
            }
        }
        let Some(item) = stream.next().await else {
            seen.ended = true;
            return seen;
        };
        if seen.terminals > 0 {
            seen.after_terminal += 1;
            continue;
        }
        seen.items += 1;
        let terminal = item.is_terminal();
        if let Some(chunk) = &item.data {
            let n = u32::try_from(chunk.token_ids.len()).unwrap_or(u32::MAX);
            if n > 0 {
                seen.tokens = seen.tokens.saturating_add(n);
                let now = clients.runtime.now();
                if let Some(last) = last_token {
                    let gap = now.saturating_duration_since(last).as_micros() / u128::from(n);
                    let gap = u32::try_from(gap).unwrap_or(u32::MAX);
                    out.gaps_us.extend(std::iter::repeat_n(gap, n as usize));
                }
                last_token = Some(now);
            }
        }
        if terminal {
            seen.terminals += 1;
            seen.terminal = Some(match (item.error, item.data) {
                (Some(err), _) => Terminal::Error(err),
                (None, chunk) => Terminal::Finish(chunk.and_then(|c| c.finish_reason)),
            });
        }
    }
}
