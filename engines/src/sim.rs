//! [`SimEngine`]: a continuous-batching inference simulator.
//!
//! One scheduler loop per started engine (never one task per request) admits waiting
//! requests while a batch slot and their KV blocks are free, then steps the whole
//! batch: every running sequence emits one token per step, and a step lasts
//! [`SimConfig::step_cost`] of the engine's [`Runtime`] clock (so a paused tokio clock
//! runs it in no real time). Tokens are deterministic: they depend on the engine's
//! seed, the prompt and the request's sampling seed only. Each request's chunks travel
//! through its own channel to its stream.
//!
//! - A request admitted to the batch (a slot and its KV blocks) is told so with
//!   [`GenerateContext::notify_scheduled`], outside the books' lock and before the
//!   step that prefills it: its queue time
//!   ([`RequestRecord::queue_time`](tether_core::RequestRecord::queue_time)) ends there.
//! - `max_tokens = 0` ends at once with `Length`; a stop token ends with `Stop`, an
//!   EOS token (unless `ignore_eos`) with `Eos`, both after `min_tokens`; every
//!   terminal carries the usage.
//! - Of the output-changing parameters it honours exactly `seed` (another seed, other
//!   tokens), `min_tokens` and `ignore_eos`, and says so in
//!   [`EngineConfig::supported`] ([`SimEngine::SUPPORTED`]); temperature, `top_p` and
//!   `top_k` mean nothing to its random tokens and are ignored.
//! - `abort` frees the slot and KV blocks at once and ends the stream with `Cancelled`
//!   and the usage so far; dropping the stream frees them too. An abort that can only
//!   be a protocol error is counted as late (see [`AbortReceipt`]).
//! - [`Chaos`] (request annotations such as `chaos:error@3`) injects an engine error,
//!   a hang or a panic inside `poll_next` at a chosen step.
//! - The annotation [`ECHO_ANNOTATION`] (`sim:echo`) makes a request's tokens its
//!   prompt's, repeated: known text for a frontend's tests.
//! - [`SimEngine::gauges`] exposes live slots, KV blocks, queue length and abort
//!   counters, so a test can prove nothing leaks.
//!
//! ```
//! # use std::sync::Arc;
//! # use tether_engines::{SimConfig, SimEngine};
//! # async fn demo(runtime: Arc<dyn tether_core::Runtime>) {
//! let engine = Arc::new(SimEngine::new(SimConfig::default(), runtime));
//! # }
//! ```

mod chaos;
mod config;
mod rng;
mod scheduler;
mod state;
mod stream;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use tether_core::drive::Runtime;
use tether_core::engine::{
    BoxFuture, ChunkStream, EngineConfig, GenerateContext, LlmEngine, SupportedParams,
};
use tether_core::error::{EngineError, ErrorKind};
use tether_core::protocol::Request;

pub use crate::abort::{AbortHook, AbortReceipt};
/// The request annotation that makes SimEngine emit the request's prompt tokens again,
/// in a loop, instead of pseudo-random ones (deterministic text for tests of a
/// frontend: stop strings, multi-byte characters). Stop, EOS and length rules apply as
/// usual.
pub const ECHO_ANNOTATION: &str = "sim:echo";

pub use chaos::{is_chaos_annotation, is_chaos_panic, Chaos, ChaosParseError};
pub use config::{SimConfig, SimConfigError};
pub use state::SimGauges;

use state::{Admission, State};
use stream::SimStream;

/// What the engine, its scheduler loop and its streams share.
pub(crate) struct Core {
    config: SimConfig,
    runtime: Arc<dyn Runtime>,
    state: Mutex<State>,
}

impl Core {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens under this lock (chaos panics are raised outside it),
        // so a poisoned lock still holds consistent books.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A continuous-batching simulator that implements [`LlmEngine`]. See the
/// [module docs](self).
pub struct SimEngine {
    core: Arc<Core>,
    abort_hook: Option<AbortHook>,
}

impl fmt::Debug for SimEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimEngine")
            .field("config", &self.core.config)
            .field("runtime", &self.core.runtime)
            .field("gauges", &self.gauges())
            .finish_non_exhaustive()
    }
}

impl SimEngine {
    /// The output-changing request parameters this engine honours (what `start`
    /// reports): the sampling `seed`, `min_tokens` and `ignore_eos`.
    pub const SUPPORTED: SupportedParams = SupportedParams::NONE
        .with_seed(true)
        .with_min_tokens(true)
        .with_ignore_eos(true);

    /// An engine with `config` whose scheduler will run on `runtime` once started.
    pub fn new(config: SimConfig, runtime: impl Runtime) -> SimEngine {
        SimEngine {
            core: Arc::new(Core {
                config,
                runtime: Arc::new(runtime),
                state: Mutex::new(State::new()),
            }),
            abort_hook: None,
        }
    }

    /// Call `hook` for every abort received, with what it found.
    #[must_use]
    pub fn with_abort_hook(mut self, hook: AbortHook) -> SimEngine {
        self.abort_hook = Some(hook);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.core.config
    }

    /// A snapshot of the gauges and counters.
    pub fn gauges(&self) -> SimGauges {
        self.core.lock().gauges()
    }

    /// Sequences holding a batch slot now.
    pub fn live_slots(&self) -> usize {
        self.gauges().live_slots
    }

    /// KV blocks in use now.
    pub fn kv_blocks_used(&self) -> usize {
        self.gauges().kv_blocks_used
    }

    /// Requests waiting for a slot or KV blocks now.
    pub fn queue_len(&self) -> usize {
        self.gauges().queue_len
    }

    /// Whether `start` ran and `cleanup` has not.
    pub fn is_started(&self) -> bool {
        self.core.lock().control.is_started()
    }

    /// Whether the engine is started and its scheduler loop still exists (it did not
    /// panic, and its runtime did not drop it): a cheap liveness check that queues
    /// nothing. A loop that is there but stuck still counts as running.
    pub fn is_running(&self) -> bool {
        self.core.lock().control.is_running()
    }

    fn validate(&self, request: &Request) -> Result<Admission, EngineError> {
        let cfg = &self.core.config;
        if request.token_ids.is_empty() {
            return Err(EngineError::invalid_argument(
                "request has no prompt tokens",
            ));
        }
        let chaos = Chaos::from_annotations(&request.annotations)
            .map_err(|e| EngineError::invalid_argument(e.to_string()))?;
        let max_tokens = request.stop.max_tokens.unwrap_or(cfg.default_max_tokens);
        let tokens = request.token_ids.len().saturating_add(max_tokens as usize);
        let blocks = cfg.blocks_for(tokens);
        if blocks > cfg.kv_blocks {
            return Err(EngineError::invalid_argument(format!(
                "request needs {blocks} kv blocks, the engine has {}",
                cfg.kv_blocks
            )));
        }
        Ok(Admission {
            max_tokens,
            blocks,
            chaos,
        })
    }

    fn shutdown(&self) {
        self.core.lock().shutdown();
    }
}

impl Drop for SimEngine {
    fn drop(&mut self) {
        // Ends the scheduler loop, which would otherwise keep the books alive.
        self.shutdown();
    }
}

impl LlmEngine for SimEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            let cfg = &self.core.config;
            cfg.validate()
                .map_err(|e| EngineError::invalid_argument(e.to_string()))?;
            let started = self.core.lock().control.start();
            if let Some((epoch, kicks)) = started {
                let core = self.core.clone();
                self.core
                    .runtime
                    .spawn(Box::pin(scheduler::run(core, epoch, kicks)));
            }
            Ok(EngineConfig::new(cfg.model.clone(), worker_id)
                .with_max_concurrency(Some(cfg.max_sequences))
                .with_supported(SimEngine::SUPPORTED))
        })
    }

    fn generate(
        &self,
        request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async move {
            let admission = self.validate(&request)?;
            let panic_at = match admission.chaos {
                Some(Chaos::Panic(k)) => Some(k),
                _ => None,
            };
            let (seq, rx) = {
                let mut st = self.core.lock();
                if !st.control.is_started() {
                    return Err(EngineError::new(
                        ErrorKind::Unavailable,
                        "sim engine is not started",
                    ));
                }
                st.insert(&self.core.config, request, admission, context.clone())
            };
            let stream = SimStream::new(self.core.clone(), seq, rx, context, panic_at);
            Ok(Box::pin(stream) as ChunkStream)
        })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let receipt = self.core.lock().abort(context.request_id());
            receipt.tell(self.abort_hook.as_ref(), context.request_id());
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            self.shutdown();
            Ok(())
        })
    }
}
