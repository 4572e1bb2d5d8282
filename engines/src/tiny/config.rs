//! [`TinyConfig`] and [`Device`]: the model's shape and seed, the engine's capacity, and
//! where the model runs.
//!
//! Owns the knobs, their defaults and their validation only; nothing here touches a
//! request or a backend.

use std::fmt;
use std::str::FromStr;

/// Where a [`TinyEngine`](super::TinyEngine) runs its model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// Plain Rust on the CPU (always built).
    #[default]
    Cpu,
    /// The CUDA device with this ordinal (needs the `cuda` feature, a driver and NVRTC).
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// A device name that is not `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown device `{0}` (expected cpu, cuda or cuda:N)")]
pub struct DeviceParseError(String);

impl FromStr for Device {
    type Err = DeviceParseError;

    fn from_str(s: &str) -> Result<Device, DeviceParseError> {
        let name = s.trim().to_ascii_lowercase();
        match name.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => name
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| DeviceParseError(s.to_owned())),
        }
    }
}

/// How a [`TinyEngine`](super::TinyEngine) is built: the transformer's shape and weight
/// seed, where it runs, and how many sequences and prompt tokens one step takes.
///
/// The defaults are a 2-layer, 4-head model of width 128 (feed-forward 512) over the
/// 256 byte tokens, with a context of 512 tokens: about 0.6 M parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TinyConfig {
    /// The model name reported by `start` (must not be empty).
    pub model: String,
    /// Where the model runs.
    pub device: Device,
    /// Seed of the weights: the same seed gives the same model, hence the same tokens.
    pub seed: u64,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads; must divide `d_model`, and each head's width must be even
    /// (rotary positions rotate pairs).
    pub heads: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of the feed-forward hidden layer.
    pub d_ff: usize,
    /// Token ids are `0..vocab_size` (256 matches a byte tokenizer).
    pub vocab_size: usize,
    /// Most tokens (prompt plus output) a sequence holds; a longer prompt is refused,
    /// and output stops with `Length` once prompt plus output reach it.
    pub max_context: usize,
    /// How many sequences run (hold a KV cache) at once; more wait in the queue.
    pub max_sequences: usize,
    /// How many prompt tokens one step prefills, over all sequences (chunked
    /// prefill): bounds the time of a step that admits long prompts.
    pub prefill_tokens_per_step: usize,
    /// `max_tokens` for requests that set none.
    pub default_max_tokens: u32,
    /// Call `GenerateContext::notify_first_token` when a sequence emits its first token.
    pub first_token_hint: bool,
}

impl Default for TinyConfig {
    fn default() -> Self {
        TinyConfig {
            model: "tiny".to_owned(),
            device: Device::Cpu,
            seed: 0,
            layers: 2,
            heads: 4,
            d_model: 128,
            d_ff: 512,
            vocab_size: 256,
            max_context: 512,
            // A full decode step (32 rows) takes about 3 ms on one CPU core; a step
            // that also prefills takes at most 32 more rows.
            max_sequences: 32,
            prefill_tokens_per_step: 32,
            default_max_tokens: 16,
            first_token_hint: true,
        }
    }
}

/// Why a [`TinyConfig`] cannot run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TinyConfigError {
    /// `model` is empty.
    #[error("model name must not be empty")]
    EmptyModel,
    /// A size that must be at least one is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// `heads` does not divide `d_model`, or a head's width is odd.
    #[error("d_model {d_model} does not split into {heads} heads of even width")]
    BadHeads {
        /// The configured width.
        d_model: usize,
        /// The configured head count.
        heads: usize,
    },
    /// A tensor would be too large for the 32-bit indices the kernels use.
    #[error("{0} is too large")]
    TooLarge(&'static str),
}

impl TinyConfig {
    /// Check that the engine can run with this configuration.
    pub fn validate(&self) -> Result<(), TinyConfigError> {
        if self.model.is_empty() {
            return Err(TinyConfigError::EmptyModel);
        }
        let sizes = [
            ("layers", self.layers),
            ("heads", self.heads),
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("vocab_size", self.vocab_size),
            ("max_context", self.max_context),
            ("max_sequences", self.max_sequences),
            ("prefill_tokens_per_step", self.prefill_tokens_per_step),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(TinyConfigError::Zero(name));
        }
        // Kernels index with 32-bit ints: every tensor must stay inside that. A step
        // holds at most twice (scratch grows by powers of two) its rows.
        let step_rows = 2
            * (self
                .prefill_tokens_per_step
                .saturating_add(self.max_sequences));
        let tensors = [
            (
                "vocab_size * d_model",
                [self.vocab_size, self.d_model, 1, 1],
            ),
            ("d_model * d_ff", [self.d_model, self.d_ff, 1, 1]),
            ("kv cache", [self.layers, 2, self.max_context, self.d_model]),
            (
                "step activations",
                [step_rows, self.d_ff.max(self.d_model), 1, 1],
            ),
            ("step logits", [step_rows, self.vocab_size, 1, 1]),
        ];
        for (name, dims) in tensors {
            let elems = dims.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n));
            if elems.is_none_or(|e| e > i32::MAX as usize) {
                return Err(TinyConfigError::TooLarge(name));
            }
        }
        if self.d_model % self.heads != 0 || (self.d_model / self.heads) % 2 != 0 {
            return Err(TinyConfigError::BadHeads {
                d_model: self.d_model,
                heads: self.heads,
            });
        }
        Ok(())
    }

    /// Bytes of KV cache one token of one sequence takes (keys and values, f32, every
    /// layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * 2 * self.d_model * std::mem::size_of::<f32>()
    }

    /// KV-cache rows (tokens) a sequence with `prompt` tokens and `max_tokens` output
    /// reserves: the last output token is never fed back, and nothing goes past the
    /// context.
    pub fn kv_rows_for(&self, prompt: usize, max_tokens: u32) -> usize {
        prompt
            .saturating_add(max_tokens as usize)
            .min(self.max_context)
            .max(prompt)
    }

    /// Parameters of the model.
    pub fn parameters(&self) -> usize {
        let d = self.d_model;
        let per_layer = 2 * d + 4 * d * d + 3 * d * self.d_ff;
        2 * self.vocab_size * d + self.layers * per_layer + d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parses_and_prints() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("CUDA".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert!("tpu".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        assert_eq!(Device::Cpu.to_string(), "cpu");
    }

    #[test]
    fn default_config_is_valid() {
        let cfg = TinyConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.kv_bytes_per_token(), 2 * 2 * 128 * 4);
        assert_eq!(cfg.kv_rows_for(3, 16), 19);
        assert_eq!(cfg.kv_rows_for(3, 10_000), 512);
        assert_eq!(cfg.kv_rows_for(512, 0), 512);
    }

    #[test]
    fn bad_configs_are_named() {
        let bad = |f: fn(&mut TinyConfig)| {
            let mut cfg = TinyConfig::default();
            f(&mut cfg);
            cfg.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.model.clear()), TinyConfigError::EmptyModel);
        assert_eq!(bad(|c| c.layers = 0), TinyConfigError::Zero("layers"));
        assert_eq!(
            bad(|c| c.heads = 3),
            TinyConfigError::BadHeads {
                d_model: 128,
                heads: 3
            }
        );
        assert_eq!(
            bad(|c| c.max_context = 1 << 30),
            TinyConfigError::TooLarge("kv cache")
        );
        assert_eq!(
            bad(|c| c.heads = 128),
            TinyConfigError::BadHeads {
                d_model: 128,
                heads: 128
            }
        );
    }
}
