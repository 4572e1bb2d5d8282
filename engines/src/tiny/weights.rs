//! The model's weights, generated on the host from a seed (nothing is downloaded), and
//! the rotary-position tables.
//!
//! Owns the layout every backend uploads: matrices are row-major `[in, out]` so that
//! `y = x · W` walks `W` row by row; the embedding is `[vocab, d_model]`. Each tensor is
//! drawn from its own splitmix64 stream, uniform in `±sqrt(3 / fan_in)` (variance
//! `1 / fan_in`), so activations keep unit scale through the pre-norm residual stack.
//! Must not know about any backend or request.

use super::config::TinyConfig;
use crate::util::splitmix64;

/// A splitmix64 stream: plenty for weights that only need to be deterministic.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// Uniform in `[-1, 1)`, from the top 24 bits (exact in f32).
    fn next_signed(&mut self) -> f32 {
        let bits = (splitmix64(&mut self.0) >> 40) as u32; // 24 bits
        (bits as f32 / (1u32 << 23) as f32) - 1.0
    }
}

/// The weights of one transformer block.
#[derive(Clone, Debug)]
pub(crate) struct LayerWeights {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: Vec<f32>,
    pub(crate) wk: Vec<f32>,
    pub(crate) wv: Vec<f32>,
    pub(crate) wo: Vec<f32>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) w_gate: Vec<f32>,
    pub(crate) w_up: Vec<f32>,
    pub(crate) w_down: Vec<f32>,
}

/// Every weight of the model, on the host.
#[derive(Clone, Debug)]
pub(crate) struct Weights {
    pub(crate) embed: Vec<f32>,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) final_norm: Vec<f32>,
    pub(crate) lm_head: Vec<f32>,
    /// `cos` of the rotary angle, `[max_context, head_dim / 2]`.
    pub(crate) rope_cos: Vec<f32>,
    /// `sin` of the rotary angle, `[max_context, head_dim / 2]`.
    pub(crate) rope_sin: Vec<f32>,
}

/// Base of the rotary frequencies (as in most rotary transformers).
const ROPE_THETA: f64 = 10_000.0;

impl Weights {
    /// The weights for `cfg` (its shape and seed; the config must be valid).
    pub(crate) fn generate(cfg: &TinyConfig) -> Weights {
        let (d, ff, v) = (cfg.d_model, cfg.d_ff, cfg.vocab_size);
        let mut tensor_no = 0u64;
        let mut draw = |len: usize, fan_in: usize| {
            tensor_no += 1;
            // One stream per tensor: a tensor's values do not depend on the others' sizes.
            let mut rng = SplitMix64(cfg.seed ^ tensor_no.wrapping_mul(0xd1b5_4a32_d192_ed03));
            let scale = (3.0 / fan_in as f32).sqrt();
            (0..len)
                .map(|_| rng.next_signed() * scale)
                .collect::<Vec<f32>>()
        };
        // fan_in 3 gives the embedding unit variance.
        let embed = draw(v * d, 3);
        let layers = (0..cfg.layers)
            .map(|_| LayerWeights {
                attn_norm: vec![1.0; d],
                wq: draw(d * d, d),
                wk: draw(d * d, d),
                wv: draw(d * d, d),
                wo: draw(d * d, d),
                ffn_norm: vec![1.0; d],
                w_gate: draw(d * ff, d),
                w_up: draw(d * ff, d),
                w_down: draw(ff * d, ff),
            })
            .collect();
        let lm_head = draw(d * v, d);
        let (rope_cos, rope_sin) = rope_tables(cfg.max_context, cfg.d_model / cfg.heads);
        Weights {
            embed,
            layers,
            final_norm: vec![1.0; d],
            lm_head,
            rope_cos,
            rope_sin,
        }
    }
}

/// `cos` and `sin` of `pos * theta^(-2i / head_dim)` for every position and pair `i`.
fn rope_tables(max_context: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_context * half);
    let mut sin = Vec::with_capacity(max_context * half);
    for pos in 0..max_context {
        for i in 0..half {
            let freq = ROPE_THETA.powf(-2.0 * i as f64 / head_dim as f64);
            let angle = pos as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let cfg = TinyConfig::default();
        let a = Weights::generate(&cfg);
        let b = Weights::generate(&cfg);
        assert_eq!(a.embed, b.embed);
        assert_eq!(a.layers[1].w_down, b.layers[1].w_down);
        let c = Weights::generate(&TinyConfig {
            seed: 1,
            ..TinyConfig::default()
        });
        assert_ne!(a.embed, c.embed);
    }

    #[test]
    fn weights_are_scaled_by_fan_in() {
        let cfg = TinyConfig::default();
        let w = Weights::generate(&cfg);
        let bound = (3.0f32 / 128.0).sqrt();
        assert!(w.layers[0].wq.iter().all(|x| x.abs() <= bound));
        let mean_sq: f32 =
            w.layers[0].wq.iter().map(|x| x * x).sum::<f32>() / w.layers[0].wq.len() as f32;
        assert!((mean_sq * 128.0 - 1.0).abs() < 0.05, "variance {mean_sq}");
        assert_eq!(w.rope_cos.len(), 512 * 16);
        assert_eq!(w.rope_cos[0], 1.0);
        assert_eq!(w.rope_sin[0], 0.0);
    }
}
