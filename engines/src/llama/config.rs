//! [`LlamaCppConfig`]: what a [`LlamaCppEngine`](super::LlamaCppEngine) loads and how
//! it batches.

use std::num::NonZeroUsize;
use std::path::PathBuf;

/// How a [`LlamaCppEngine`](super::LlamaCppEngine) is built. Every field has a default
/// but the model's path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlamaCppConfig {
    /// The GGUF file.
    pub model_path: PathBuf,
    /// The name the engine serves (`None`: the file's name without `.gguf`).
    pub model_name: Option<String>,
    /// KV cells of the one context, shared by every sequence (a sequence's prompt
    /// plus output can use all of them). Default 4096.
    pub n_ctx: u32,
    /// Sequences in the batch at once; more requests wait in the queue. Default 8.
    pub max_sequences: usize,
    /// Tokens one step decodes at most, all sequences together: one per decoding
    /// sequence, the rest prompt chunks. An abort waits for at most one step, so this
    /// bounds how long a long prompt's prefill goes on after its abort. Default 256.
    pub batch_tokens: usize,
    /// `max_tokens` of a request that sets none. Default 256.
    pub default_max_tokens: u32,
    /// CPU threads llama.cpp computes with (`None`: every core).
    pub threads: Option<NonZeroUsize>,
}

impl LlamaCppConfig {
    /// The defaults, for the model at `model_path`.
    pub fn new(model_path: impl Into<PathBuf>) -> LlamaCppConfig {
        LlamaCppConfig {
            model_path: model_path.into(),
            model_name: None,
            n_ctx: 4096,
            max_sequences: 8,
            batch_tokens: 256,
            default_max_tokens: 256,
            threads: None,
        }
    }

    /// Check the numbers; the error says which one is wrong.
    pub fn validate(&self) -> Result<(), LlamaCppConfigError> {
        if self.n_ctx < 2 {
            return Err(LlamaCppConfigError("n_ctx must be at least 2".into()));
        }
        if self.max_sequences == 0 || self.max_sequences > 256 {
            return Err(LlamaCppConfigError(format!(
                "max_sequences must be between 1 and 256, got {}",
                self.max_sequences
            )));
        }
        if self.batch_tokens < self.max_sequences {
            return Err(LlamaCppConfigError(format!(
                "batch_tokens ({}) must be at least max_sequences ({}): every decoding \
                 sequence needs a place in each step",
                self.batch_tokens, self.max_sequences
            )));
        }
        if u32::try_from(self.batch_tokens).is_err() {
            return Err(LlamaCppConfigError("batch_tokens is too large".into()));
        }
        Ok(())
    }

    /// The name the engine serves.
    pub fn served_name(&self) -> String {
        if let Some(name) = &self.model_name {
            return name.clone();
        }
        self.model_path
            .file_stem()
            .map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned())
    }

    /// The threads llama.cpp computes with.
    pub(crate) fn thread_count(&self) -> i32 {
        let n = self
            .threads
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, NonZeroUsize::get);
        i32::try_from(n).unwrap_or(i32::MAX)
    }
}

/// A [`LlamaCppConfig`] that cannot work; the message says why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LlamaCppConfigError(String);
