//! [`LlamaCppEngine`]: llama.cpp behind [`LlmEngine`], serving a GGUF model with
//! continuous batching (the `llama-cpp` feature).
//!
//! - **One thread, one context.** `start` creates one llama.cpp context on a thread of
//!   its own (it is the only code that calls into the context, and it never runs on an
//!   async runtime's threads). Its KV cache is unified: [`LlamaCppConfig::n_ctx`] cells
//!   shared by up to [`LlamaCppConfig::max_sequences`] sequences, each with its own
//!   llama.cpp sequence id.
//! - **Continuous batching.** `generate` queues the request and returns its stream at
//!   once. Each step the thread admits queued requests in order while a sequence id and
//!   their cells (prompt plus `max_tokens`, at most the context) are free, then decodes
//!   one batch of at most [`LlamaCppConfig::batch_tokens`] tokens: one for every
//!   decoding sequence, the rest prompt chunks in admission order. A long prompt is
//!   prefilled over several steps, while the others keep decoding.
//! - **Cancellation.** `abort` (or the stream dropped) ends the sequence in the books
//!   at once. A queued one is removed before it is ever prefilled, and its stream ends
//!   with `Cancelled` right away. One in the batch leaves it: the thread removes its
//!   cells (`seq_rm`) before its next step, and only then is `Cancelled` (with the
//!   usage so far) sent, so a consumer that read it sees the cells free. An abort
//!   therefore waits for at most the step being decoded, that is at most
//!   `batch_tokens` tokens of prefill. llama.cpp's abort callback is not used: it stops
//!   a whole batch, and `llama-cpp-2` does not expose it without `unsafe` code.
//! - **Sampling.** llama.cpp's samplers, one chain per sequence: penalties
//!   (`repetition_penalty`, `frequency_penalty`, `presence_penalty`, over the last 64
//!   generated tokens), then the argmax when `temperature` is absent or 0, otherwise
//!   `top_k`, `top_p`, the temperature and a draw seeded by `seed` (a fresh seed per
//!   request when it sets none). The same prompt, parameters and seed give the same
//!   tokens when the batch is composed the same way; llama.cpp's numbers may differ in
//!   the last bits when other sequences share the batch, and a sampled token can then
//!   differ. [`LlamaCppEngine::SUPPORTED`] is what `start` reports.
//! - **Ends.** `max_tokens` (default [`LlamaCppConfig::default_max_tokens`]; 0 ends at
//!   once with `Length`), a stop token (`Stop`), one of the model's end-of-generation
//!   tokens or the request's `eos_token_ids` (`Eos`, unless `ignore_eos`), both after
//!   `min_tokens`, and the context (`Length` when prompt plus output reach `n_ctx`).
//!   Every terminal carries the usage.
//! - **Bad input** is an `InvalidArgument` setup error: an empty prompt, a token id
//!   outside the vocabulary (llama.cpp would abort the process), a prompt that fills
//!   the context, bad sampling values. A missing or unreadable model file is an error
//!   of [`LlamaCppEngine::load`].
//! - [`LlamaCppEngine::gauges`] reads llama.cpp's own count of the cells and sequence
//!   ids its memory holds, so a test can prove nothing leaks.
//! - [`LlamaCppEngine::tokenizer`] is the model's own vocabulary, for a server that
//!   takes text.
//!
//! llama.cpp's backend is process-wide: [`backend`] is tether's handle on it, for code
//! that also calls `llama-cpp-2` itself in the same process.

mod books;
mod config;
mod sampling;
mod tokenizer;
mod worker;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use tether_core::engine::{
    BoxFuture, ChunkStream, EngineConfig, GenerateContext, LlmEngine, SupportedParams,
};
use tether_core::error::{EngineError, ErrorKind};
use tether_core::protocol::Request;

pub use crate::abort::{AbortHook, AbortReceipt};
use crate::stream::{Detach, SeqStream};
pub use books::LlamaCppGauges;
use books::{Admission, Books, Effects, Outgoing, Run};
pub use config::{LlamaCppConfig, LlamaCppConfigError};
use sampling::Sampling;
pub use tokenizer::LlamaTokenizer;

/// llama.cpp's backend, initialized once per process (its logs go to `tracing`, target
/// `llama-cpp-2`). An `Unavailable` error when something else in the process
/// initialized it first through `llama-cpp-2` (it allows one owner).
pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    // Write-once: llama.cpp's backend is process-wide state of llama.cpp's own, and
    // this cell only remembers that it was initialized.
    static BACKEND: OnceLock<Option<LlamaBackend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let backend = LlamaBackend::init().ok()?;
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            Some(backend)
        })
        .as_ref()
        .ok_or_else(|| {
            EngineError::new(
                ErrorKind::Unavailable,
                "llama.cpp's backend was initialized outside tether in this process; \
                 use tether_engines::llama::backend() there",
            )
        })
}

/// What the engine, its thread and its streams share.
pub(crate) struct Shared {
    books: Mutex<Books>,
    /// Wakes the thread: work was queued, a sequence ended, or the engine stops.
    wake: Condvar,
    /// llama.cpp's count of the cells its memory holds (the thread publishes it).
    kv_cells: AtomicUsize,
    /// llama.cpp's count of the sequence ids holding cells.
    kv_sequences: AtomicUsize,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            books: Mutex::new(Books::new()),
            wake: Condvar::new(),
            kv_cells: AtomicUsize::new(0),
            kv_sequences: AtomicUsize::new(0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Books> {
        // The books are only changed by code that cannot panic halfway (no llama.cpp
        // call under this lock), so a poisoned lock still holds consistent books.
        self.books
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Carry out `fx` outside the lock: wake the thread, send the last items, then the
    /// first-token hints.
    pub(crate) fn settle(&self, fx: Effects) {
        if fx.wake {
            self.wake.notify_one();
        }
        send_all(fx.outgoing);
        for gctx in fx.hints {
            gctx.notify_first_token();
        }
    }
}

impl Detach for Shared {
    fn detach(&self, seq: u64) {
        let mut fx = Effects::default();
        self.lock().detach(seq, &mut fx);
        self.settle(fx);
    }
}

/// Send each last item (unbounded channels: only fails when the stream is gone).
pub(crate) fn send_all(outgoing: Vec<Outgoing>) {
    for (tx, item) in outgoing {
        let _ = tx.try_send(item);
    }
}

/// A GGUF model served by llama.cpp through [`LlmEngine`]. See the [module docs](self).
pub struct LlamaCppEngine {
    shared: Arc<Shared>,
    model: Arc<LlamaModel>,
    config: LlamaCppConfig,
    tokenizer: LlamaTokenizer,
    abort_hook: Option<AbortHook>,
}

impl fmt::Debug for LlamaCppEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlamaCppEngine")
            .field("config", &self.config)
            .field("gauges", &self.gauges())
            .finish_non_exhaustive()
    }
}

impl LlamaCppEngine {
    /// The output-changing request parameters this engine honours (what `start`
    /// reports): `temperature`, `top_p`, `top_k`, `seed`, the three penalties,
    /// `min_tokens` and `ignore_eos`.
    pub const SUPPORTED: SupportedParams = SupportedParams::NONE
        .with_temperature(true)
        .with_top_p(true)
        .with_top_k(true)
        .with_seed(true)
        .with_min_tokens(true)
        .with_ignore_eos(true)
        .with_presence_penalty(true)
        .with_frequency_penalty(true)
        .with_repetition_penalty(true);

    /// Load the model `config` names (on the CPU). Blocking: it reads the whole file.
    /// A bad configuration or path is an `InvalidArgument`, a file llama.cpp cannot
    /// read a `Backend` error.
    pub fn load(config: LlamaCppConfig) -> Result<LlamaCppEngine, EngineError> {
        config
            .validate()
            .map_err(|e| EngineError::invalid_argument(format!("llama.cpp engine: {e}")))?;
        if !config.model_path.is_file() {
            return Err(EngineError::invalid_argument(format!(
                "no model file at {}",
                config.model_path.display()
            )));
        }
        let model = LlamaModel::load_from_file(
            backend()?,
            &config.model_path,
            &LlamaModelParams::default(),
        )
        .map_err(|e| {
            EngineError::new(
                ErrorKind::Backend(tether_core::error::BackendError::Unknown),
                format!(
                    "llama.cpp could not load {}: {e}",
                    config.model_path.display()
                ),
            )
        })?;
        let model = Arc::new(model);
        Ok(LlamaCppEngine {
            shared: Arc::new(Shared::new()),
            tokenizer: LlamaTokenizer::new(model.clone()),
            model,
            config,
            abort_hook: None,
        })
    }

    /// A new engine (not started, its own thread, books and abort hook: none) on the
    /// same loaded weights: for a check that wants a fresh engine each time without
    /// reading the file again.
    pub fn with_same_model(&self) -> LlamaCppEngine {
        LlamaCppEngine {
            shared: Arc::new(Shared::new()),
            model: self.model.clone(),
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            abort_hook: None,
        }
    }

    /// Call `hook` for every abort received: [`AbortReceipt::Live`] when it ended a
    /// queued or running sequence, [`AbortReceipt::AfterEnd`] otherwise (a sequence is
    /// forgotten when it ends).
    #[must_use]
    pub fn with_abort_hook(mut self, hook: AbortHook) -> LlamaCppEngine {
        self.abort_hook = Some(hook);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaCppConfig {
        &self.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &LlamaTokenizer {
        &self.tokenizer
    }

    /// A snapshot of the gauges and counters.
    pub fn gauges(&self) -> LlamaCppGauges {
        let books = self.shared.lock();
        books.gauges(
            self.shared.kv_cells.load(Ordering::Acquire),
            self.shared.kv_sequences.load(Ordering::Acquire),
        )
    }

    /// Whether `start` succeeded and `cleanup` has not run.
    pub fn is_started(&self) -> bool {
        self.shared.lock().is_running()
    }

    /// Whether the engine's thread is serving (started, and not stopped since).
    pub fn is_running(&self) -> bool {
        self.is_started()
    }

    fn validate(&self, request: &Request) -> Result<Admission, EngineError> {
        let prompt = &request.token_ids;
        if prompt.is_empty() {
            return Err(EngineError::invalid_argument(
                "request has no prompt tokens",
            ));
        }
        let n_ctx = self.config.n_ctx as usize;
        if prompt.len() >= n_ctx {
            return Err(EngineError::invalid_argument(format!(
                "prompt of {} tokens leaves no room in the context of {n_ctx}",
                prompt.len()
            )));
        }
        let n_vocab = self.tokenizer.n_vocab();
        if let Some((at, &token)) = prompt.iter().enumerate().find(|(_, &t)| t >= n_vocab) {
            return Err(EngineError::invalid_argument(format!(
                "prompt token {token} at position {at} is outside the vocabulary of {n_vocab}"
            )));
        }
        let max_tokens = request
            .stop
            .max_tokens
            .unwrap_or(self.config.default_max_tokens);
        let mut eos = request.eos_token_ids.clone();
        eos.extend_from_slice(self.tokenizer.end_of_generation());
        Ok(Admission {
            max_tokens,
            cells: n_ctx.min(prompt.len() + max_tokens as usize),
            sampling: Sampling::of(&request.sampling)?,
            eos,
        })
    }

    /// Stop the thread (it exits after the step it is decoding) and end every live
    /// sequence; returns what to wait for, the thread's exit.
    fn shutdown(&self) -> Option<async_channel::Receiver<()>> {
        let (outgoing, exited) = {
            let mut books = self.shared.lock();
            (books.shutdown(), books.exited.clone())
        };
        self.shared.wake.notify_all();
        send_all(outgoing);
        exited
    }
}

impl Drop for LlamaCppEngine {
    fn drop(&mut self) {
        // The thread exits on its own after its current step; nothing waits for it here.
        drop(self.shutdown());
    }
}

impl LlmEngine for LlamaCppEngine {
    fn start(&self, worker_id: u64) -> BoxFuture<'_, Result<EngineConfig, EngineError>> {
        Box::pin(async move {
            let engine_config = || {
                EngineConfig::new(self.config.served_name(), worker_id)
                    .with_max_concurrency(Some(self.config.max_sequences))
                    .with_supported(LlamaCppEngine::SUPPORTED)
            };
            loop {
                let done = {
                    let mut books = self.shared.lock();
                    match &books.run {
                        Run::Running { .. } => return Ok(engine_config()),
                        Run::Starting { done, .. } => done.clone(),
                        Run::Stopped => {
                            // A thread that was stopped and has not exited yet only
                            // sleeps until it sees the new epoch is not its own.
                            let (started_tx, done) = async_channel::bounded(1);
                            let (exited_tx, exited) = async_channel::bounded(1);
                            let epoch = books.begin_start(self.config.max_sequences, done.clone());
                            books.exited = Some(exited);
                            let thread = worker::Thread {
                                shared: self.shared.clone(),
                                model: self.model.clone(),
                                config: self.config.clone(),
                                epoch,
                                started: started_tx,
                                exited: exited_tx,
                            };
                            let spawned = std::thread::Builder::new()
                                .name("tether-llama-cpp".into())
                                .spawn(move || thread.run());
                            if let Err(e) = spawned {
                                books.run = Run::Stopped;
                                return Err(EngineError::new(
                                    ErrorKind::ResourceExhausted,
                                    format!("no thread for llama.cpp: {e}"),
                                ));
                            }
                            done
                        }
                    }
                };
                // Closes when the thread made its context, or failed to.
                let _ = done.recv().await;
                let books = self.shared.lock();
                match &books.run {
                    Run::Running { .. } => return Ok(engine_config()),
                    Run::Starting { .. } => continue,
                    Run::Stopped => {
                        return Err(books.start_error.clone().unwrap_or_else(|| {
                            EngineError::new(
                                ErrorKind::Unavailable,
                                "the llama.cpp engine was cleaned up while it started",
                            )
                        }))
                    }
                }
            }
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
                let mut books = self.shared.lock();
                if !books.is_running() {
                    return Err(EngineError::new(
                        ErrorKind::Unavailable,
                        "the llama.cpp engine is not started",
                    ));
                }
                books.insert(request, admission, context)
            };
            self.shared.wake.notify_one();
            let stream = SeqStream::new(self.shared.clone(), seq, rx);
            Ok(Box::pin(stream) as ChunkStream)
        })
    }

    fn abort(&self, context: GenerateContext) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut fx = Effects::default();
            let live = self.shared.lock().abort(context.request_id(), &mut fx);
            self.shared.settle(fx);
            AbortReceipt::forgetful(live).tell(self.abort_hook.as_ref(), context.request_id());
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            if let Some(exited) = self.shutdown() {
                // Closes when the thread has dropped its context.
                let _ = exited.recv().await;
            }
            Ok(())
        })
    }
}
