//! [`TinyEngine`]: a real, tiny decoder-only transformer behind [`LlmEngine`].
//!
//! The model (2 layers, 4 heads, width 128, feed-forward 512, 256 byte tokens, context
//! 512 by default; see [`TinyConfig`]) has RMSNorm, rotary positions, SwiGLU and a
//! per-sequence KV cache. Its weights are generated from a seed (nothing is
//! downloaded). It decodes greedily unless a request asks for sampling, and a seeded
//! request samples reproducibly: the same weights seed, prompt and parameters always
//! give the same tokens, whatever else is in the batch.
//!
//! Shaped like [`SimEngine`](crate::SimEngine): it runs on any [`Runtime`], starts one
//! scheduler loop per engine (never one task per request), and each request's chunks
//! travel through their own channel to their stream.
//!
//! - Each step runs every running sequence through the model at once: one token per
//!   decoding sequence, plus prompt chunks of the prefilling ones (at most
//!   [`TinyConfig::prefill_tokens_per_step`] prompt tokens per step).
//! - A request whose prefill starts (its first prompt chunk is in the step) is told so
//!   with [`GenerateContext::notify_scheduled`], outside the books' lock and before the
//!   step computes: its queue time
//!   ([`RequestRecord::queue_time`](tether_core::RequestRecord::queue_time)) ends there.
//! - `max_tokens` (default 16) is honoured, `max_tokens = 0` ends at once with
//!   `Length`; a stop token ends with `Stop`, an EOS token (unless `ignore_eos`) with
//!   `Eos`, both after `min_tokens`; output also ends with `Length` when prompt plus
//!   output reach [`TinyConfig::max_context`]. Every terminal carries the usage.
//! - Decoding is greedy (the backend's argmax, lowest id on a tie) when `temperature`
//!   is absent or 0, whatever `top_p`, `top_k` and `seed` say. A temperature above 0
//!   samples on the host from the step's logits: softmax at that temperature over the
//!   `top_k` most likely tokens (`top_k` absent or 0: all), cut to the smallest set
//!   whose probability reaches `top_p` (default 1). Each sequence draws from its own
//!   SplitMix64 stream seeded with the request's `seed` (a fresh seed per request when
//!   it sets none), its `n`-th token from the stream's `n`-th value: the tokens depend
//!   on the weights, the prompt, the parameters and the seed only, never on the batch.
//!   A negative or non-finite temperature or a `top_p` outside `(0, 1]` is an
//!   `InvalidArgument` setup error. [`TinyEngine::SUPPORTED`] is what `start` reports
//!   in [`EngineConfig::supported`].
//! - `abort` frees the sequence and its KV cache at once and ends the stream with
//!   `Cancelled` and the usage so far; dropping the stream frees them too.
//! - An empty prompt, a token id outside the vocabulary, or a prompt longer than the
//!   context is an `InvalidArgument` setup error.
//! - The CPU backend is always built; [`Device::Cuda`] needs the `cuda` feature, and
//!   `start` returns an `Unavailable` error when the CUDA driver or NVRTC is missing.
//! - [`TinyEngine::gauges`] exposes live sequences and KV bytes in use, so a test can
//!   prove nothing leaks.
//!
//! ```
//! # use std::sync::Arc;
//! # use tether_engines::tiny::{TinyConfig, TinyEngine};
//! # async fn demo(runtime: Arc<dyn tether_core::Runtime>) {
//! let engine = Arc::new(TinyEngine::new(TinyConfig::default(), runtime));
//! # }
//! ```

mod backend;
mod config;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod model;
mod sampler;
mod scheduler;
mod state;
mod weights;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tether_core::drive::Runtime;
use tether_core::engine::{
    BoxFuture, ChunkStream, EngineConfig, GenerateContext, LlmEngine, SupportedParams,
};
use tether_core::error::{EngineError, ErrorKind};
use tether_core::protocol::Request;

pub use crate::abort::{AbortHook, AbortReceipt};
pub use config::{Device, DeviceParseError, TinyConfig, TinyConfigError};
#[cfg(feature = "cuda")]
pub use cuda::{cuda_mem_info, CudaMemInfo};
pub use model::TinyModel;
pub use state::TinyGauges;

use crate::stream::{Detach, SeqStream};
use model::Runner;
use sampler::Decoding;
use state::{Admission, Effects, State};

/// The model of one started epoch.
type Loaded = Option<(u64, Box<dyn Runner>)>;

/// What the engine, its scheduler loop and its streams share.
///
/// Two locks: `state` (the books) and `model` (the weights and KV caches, held while a
/// step computes). When both are held, `state` is taken first.
pub(crate) struct Core {
    config: TinyConfig,
    runtime: Arc<dyn Runtime>,
    state: Mutex<State>,
    model: Mutex<Loaded>,
    kv_bytes: Arc<AtomicUsize>,
}

impl Core {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // The books are only changed by code that cannot panic halfway (no compute
        // under this lock), so a poisoned lock still holds consistent books.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn lock_model(&self) -> MutexGuard<'_, Loaded> {
        // A panic inside a step is caught there; the caches stay consistent.
        self.model
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Carry out `fx` outside the state lock: free the caches, then send the last
    /// items (so a reader of a terminal sees the gauges back), then the hints.
    pub(crate) fn settle(&self, fx: Effects) {
        if !fx.release.is_empty() {
            if let Some((_, runner)) = self.lock_model().as_mut() {
                for seq in fx.release {
                    runner.release(seq);
                }
            }
        }
        for (tx, item) in fx.outgoing {
            // Unbounded: only fails when the stream is gone, and then nobody cares.
            let _ = tx.try_send(item);
        }
        for gctx in fx.hints {
            gctx.notify_first_token();
        }
    }
}

impl Detach for Core {
    fn detach(&self, seq: u64) {
        let mut fx = Effects::default();
        self.lock().detach(seq, &mut fx);
        self.settle(fx);
    }
}

/// A tiny transformer that implements [`LlmEngine`]. See the [module docs](self).
pub struct TinyEngine {
    core: Arc<Core>,
    abort_hook: Option<AbortHook>,
}

impl fmt::Debug for TinyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TinyEngine")
            .field("config", &self.core.config)
            .field("runtime", &self.core.runtime)
            .field("gauges", &self.gauges())
            .finish_non_exhaustive()
    }
}

impl TinyEngine {
    /// The output-changing request parameters this engine honours (what `start`
    /// reports): `temperature`, `top_p`, `top_k` and `seed` (see the
    /// [module docs](self) for how it samples), `min_tokens` and `ignore_eos`.
    pub const SUPPORTED: SupportedParams = SupportedParams::NONE
        .with_temperature(true)
        .with_top_p(true)
        .with_top_k(true)
        .with_seed(true)
        .with_min_tokens(true)
        .with_ignore_eos(true);

    /// An engine with `config` whose scheduler will run on `runtime` once started. The
    /// model is built (and a CUDA device opened) by `start`.
    pub fn new(config: TinyConfig, runtime: impl Runtime) -> TinyEngine {
        TinyEngine {
            core: Arc::new(Core {
                config,
                runtime: Arc::new(runtime),
                state: Mutex::new(State::new()),
                model: Mutex::new(None),
                kv_bytes: Arc::new(AtomicUsize::new(0)),
            }),
            abort_hook: None,
        }
    }

    /// Call `hook` for every abort received, with what it found:
    /// [`AbortReceipt::Live`] when it ended a live sequence, [`AbortReceipt::AfterEnd`]
    /// otherwise (this engine forgets a sequence when it ends, so it never reports
    /// [`AbortReceipt::Late`]).
    #[must_use]
    pub fn with_abort_hook(mut self, hook: AbortHook) -> TinyEngine {
        self.abort_hook = Some(hook);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &TinyConfig {
        &self.core.config
    }

    /// A snapshot of the gauges and counters.
    pub fn gauges(&self) -> TinyGauges {
        let st = self.core.lock();
        // Relaxed: a gauge; nothing is published through it.
        st.gauges(self.core.kv_bytes.load(Ordering::Relaxed))
    }

    /// Sequences in the running batch now (each holds a KV cache).
    pub fn live_sequences(&self) -> usize {
        self.gauges().live_sequences
    }

    /// Bytes of KV cache in use now.
    pub fn kv_bytes(&self) -> usize {
        // Relaxed: a gauge.
        self.core.kv_bytes.load(Ordering::Relaxed)
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

    /// Where the model runs (`"cpu"`, `"cuda:0 (NVIDIA H100 80GB HBM3)"`), once started.
    pub fn device_description(&self) -> Option<String> {
        self.core
            .lock_model()
            .as_ref()
            .map(|(_, runner)| runner.describe())
    }

    fn validate(&self, request: &Request) -> Result<Admission, EngineError> {
        let cfg = &self.core.config;
        let prompt = &request.token_ids;
        if prompt.is_empty() {
            return Err(EngineError::invalid_argument(
                "request has no prompt tokens",
            ));
        }
        if prompt.len() > cfg.max_context {
            return Err(EngineError::invalid_argument(format!(
                "prompt of {} tokens is longer than the context of {}",
                prompt.len(),
                cfg.max_context
            )));
        }
        if let Some((at, &token)) = prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= cfg.vocab_size)
        {
            return Err(EngineError::invalid_argument(format!(
                "prompt token {token} at position {at} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let max_tokens = request.stop.max_tokens.unwrap_or(cfg.default_max_tokens);
        Ok(Admission {
            max_tokens,
            kv_rows: cfg.kv_rows_for(prompt.len(), max_tokens),
            decoding: Decoding::of(&request.sampling)?,
        })
    }

    fn shutdown(&self) {
        let mut fx = Effects::default();
        let model = {
            let mut st = self.core.lock();
            st.shutdown(&mut fx);
            // Under the state lock, so that a concurrent `start` cannot slip its model in
            // between and lose it here.
            self.core.lock_model().take()
        };
        // Frees the weights and every cache.
        drop(model);
        fx.release.clear();
        self.core.settle(fx);
    }
}

impl Drop for TinyEngine {
    fn drop(&mut self) {
        // Ends the scheduler loop, which would otherwise keep the model alive.
        self.shutdown();
    }
}

impl LlmEngine for TinyEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            let cfg = &self.core.config;
            cfg.validate()
                .map_err(|e| EngineError::invalid_argument(e.to_string()))?;
            if !self.core.lock().control.is_started() {
                // Built outside the locks: it can take a while (CUDA compiles kernels).
                let runner = model::build(cfg, self.core.kv_bytes.clone())?;
                let mut st = self.core.lock();
                if let Some((epoch, kicks)) = st.control.start() {
                    *self.core.lock_model() = Some((epoch, runner));
                    drop(st);
                    let core = self.core.clone();
                    self.core
                        .runtime
                        .spawn(Box::pin(scheduler::run(core, epoch, kicks)));
                }
            }
            Ok(EngineConfig::new(cfg.model.clone(), worker_id)
                .with_max_concurrency(Some(cfg.max_sequences))
                .with_supported(TinyEngine::SUPPORTED))
        })
    }

    fn generate(
        &self,
        request: Request,
        context: GenerateContext,
    ) -> BoxFuture<'_, Result<ChunkStream, EngineError>> {
        Box::pin(async move {
            let admission = self.validate(&request)?;
            let (seq, rx) = {
                let mut st = self.core.lock();
                if !st.control.is_started() {
                    return Err(EngineError::new(
                        ErrorKind::Unavailable,
                        "tiny engine is not started",
                    ));
                }
                st.insert(request, admission, context)
            };
            let stream = SeqStream::new(self.core.clone(), seq, rx);
            Ok(Box::pin(stream) as ChunkStream)
        })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut fx = Effects::default();
            let live = self.core.lock().abort(context.request_id(), &mut fx);
            self.core.settle(fx);
            AbortReceipt::forgetful(live).tell(self.abort_hook.as_ref(), context.request_id());
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            self.shutdown();
            Ok(())
        })
    }
}
