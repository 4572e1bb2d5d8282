//! [`SimConfig`]: the simulator's capacity and time model, and its validation.
//!
//! Owns the knobs and their defaults only; the scheduler reads them, nothing here
//! touches a request.

use std::time::Duration;

/// How a [`SimEngine`](super::SimEngine) behaves: capacity, time model, tokens.
///
/// The time of one scheduler step is
/// `decode_step_cost + batch_cost_per_sequence * running + prefill_cost_per_token * admitted_prompt_tokens`,
/// so a larger batch makes every step a little slower and admitting long prompts
/// slows the step that prefills them, as on a real continuous-batching engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// The model name reported by `start` (must not be empty).
    pub model: String,
    /// How many sequences run at once; more wait in the queue.
    pub max_sequences: usize,
    /// KV-cache blocks in the pool.
    pub kv_blocks: usize,
    /// Tokens per KV block. A sequence reserves `ceil((prompt + max_tokens) / block_size)`
    /// blocks when it is admitted and frees them when it ends.
    pub block_size: usize,
    /// Time to prefill one prompt token (charged to the step that admits it).
    pub prefill_cost_per_token: Duration,
    /// Fixed time of one decode step.
    pub decode_step_cost: Duration,
    /// Extra step time per running sequence (the batch effect).
    pub batch_cost_per_sequence: Duration,
    /// `max_tokens` for requests that set none.
    pub default_max_tokens: u32,
    /// Token ids are drawn from `0..vocab_size`.
    pub vocab_size: u32,
    /// Seed of the token generator: the same seed and prompt give the same tokens.
    pub seed: u64,
    /// Call `GenerateContext::notify_first_token` when a sequence emits its first
    /// token (what a decode worker does once its KV-cache transfer completed).
    pub first_token_hint: bool,
    /// How many ended requests are remembered while an abort for them may still be on
    /// its way (see [`AbortReceipt`](super::AbortReceipt)); the oldest are forgotten first.
    pub linger_capacity: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "sim".to_owned(),
            max_sequences: 256,
            kv_blocks: 8192,
            block_size: 16,
            prefill_cost_per_token: Duration::from_nanos(1_000),
            decode_step_cost: Duration::from_millis(1),
            batch_cost_per_sequence: Duration::from_nanos(2_000),
            default_max_tokens: 16,
            vocab_size: 32_000,
            seed: 0,
            first_token_hint: true,
            linger_capacity: 65_536,
        }
    }
}

/// Why a [`SimConfig`] cannot run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SimConfigError {
    /// `model` is empty.
    #[error("model name must not be empty")]
    EmptyModel,
    /// A capacity that must be at least one is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

impl SimConfig {
    /// Check that the engine can run with this configuration.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        if self.model.is_empty() {
            return Err(SimConfigError::EmptyModel);
        }
        let nonzero = [
            ("max_sequences", self.max_sequences),
            ("kv_blocks", self.kv_blocks),
            ("block_size", self.block_size),
            ("vocab_size", self.vocab_size as usize),
        ];
        match nonzero.into_iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(SimConfigError::Zero(name)),
            None => Ok(()),
        }
    }

    /// KV blocks a sequence of `tokens` tokens (prompt plus output) reserves.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size.max(1))
    }

    /// How long one step takes with `running` sequences that admits `prefill_tokens`.
    pub fn step_cost(&self, running: usize, prefill_tokens: usize) -> Duration {
        let batch = mul(self.batch_cost_per_sequence, running);
        let prefill = mul(self.prefill_cost_per_token, prefill_tokens);
        self.decode_step_cost
            .saturating_add(batch)
            .saturating_add(prefill)
    }
}

fn mul(d: Duration, n: usize) -> Duration {
    d.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}
