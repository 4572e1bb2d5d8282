//! The [`Backend`] trait: the handful of tensor ops the tiny transformer needs, so that
//! the forward pass ([`super::model`]) is written once and runs on the CPU or on CUDA.
//!
//! Owns the op contracts only (shapes, layouts, tie-breaking); the model owns the order
//! of ops, and each backend owns its memory. All matrices are row-major; a KV cache is
//! one buffer laid out `[layer][keys | values][capacity][d_model]`.

use tether_core::error::EngineError;

use super::config::TinyConfig;

/// RMSNorm's epsilon.
pub(crate) const RMS_EPS: f32 = 1e-5;

/// The model's dimensions, as the ops need them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) layers: usize,
    pub(crate) d_model: usize,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) d_ff: usize,
    pub(crate) vocab: usize,
    pub(crate) max_context: usize,
}

impl Shape {
    pub(crate) fn of(cfg: &TinyConfig) -> Shape {
        Shape {
            layers: cfg.layers,
            d_model: cfg.d_model,
            heads: cfg.heads,
            head_dim: cfg.d_model / cfg.heads.max(1),
            d_ff: cfg.d_ff,
            vocab: cfg.vocab_size,
            max_context: cfg.max_context,
        }
    }

    /// Floats in a KV cache of `capacity` tokens.
    pub(crate) fn kv_len(&self, capacity: usize) -> usize {
        self.layers * 2 * capacity * self.d_model
    }

    /// Offset of layer `layer`'s keys (`value = false`) or values in a KV cache.
    pub(crate) fn kv_offset(&self, capacity: usize, layer: usize, value: bool) -> usize {
        (layer * 2 + usize::from(value)) * capacity * self.d_model
    }
}

/// One sequence's rows in a step, as attention sees them: rows `row0..row0 + rows` of
/// the step's activations are its tokens at positions `pos0..pos0 + rows`, and its KV
/// cache holds `capacity` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) row0: usize,
    pub(crate) rows: usize,
    pub(crate) pos0: usize,
    pub(crate) capacity: usize,
}

/// The ops of the tiny transformer. Buffers may be longer than an op needs; an op
/// touches only the prefix its sizes name. Ops may run asynchronously (CUDA): only
/// [`Backend::download`] and [`Backend::argmax`] wait for the results.
pub(crate) trait Backend: Send + 'static {
    /// An array of `f32` where the backend computes.
    type Buf: Send + 'static;
    /// An array of `u32` (token ids, positions, row indices) where the backend computes.
    type Ids: Send + 'static;

    /// Where this backend runs, for humans (`"cpu"`, `"cuda:0 (NVIDIA H100)"`).
    fn describe(&self) -> String;
    /// A buffer holding `data`.
    fn upload(&mut self, data: &[f32]) -> Result<Self::Buf, EngineError>;
    /// A buffer of `len` zeros.
    fn zeros(&mut self, len: usize) -> Result<Self::Buf, EngineError>;
    /// An id buffer holding `ids`.
    fn upload_ids(&mut self, ids: &[u32]) -> Result<Self::Ids, EngineError>;
    /// The first `len` floats of `buf`, on the host.
    fn download(&mut self, buf: &Self::Buf, len: usize) -> Result<Vec<f32>, EngineError>;

    /// `out[r] = table[tokens[r]]` for `rows` rows of width `d`.
    fn embed(
        &mut self,
        table: &Self::Buf,
        tokens: &Self::Ids,
        rows: usize,
        d: usize,
        out: &mut Self::Buf,
    ) -> Result<(), EngineError>;
    /// `out[rows, n] = x[rows, k] · w[k, n]`.
    fn matmul(
        &mut self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut Self::Buf,
    ) -> Result<(), EngineError>;
    /// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) * weight`, rows of width `d`.
    fn rmsnorm(
        &mut self,
        x: &Self::Buf,
        weight: &Self::Buf,
        rows: usize,
        d: usize,
        out: &mut Self::Buf,
    ) -> Result<(), EngineError>;
    /// Rotate every head of every row of `x` (width `d_model`) by its position: pair
    /// `(x[2i], x[2i + 1])` of a head turns by the angle in the tables
    /// (`[max_context, head_dim / 2]`).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &mut self,
        x: &mut Self::Buf,
        positions: &Self::Ids,
        rows: usize,
        shape: &Shape,
        cos: &Self::Buf,
        sin: &Self::Buf,
    ) -> Result<(), EngineError>;
    /// Causal attention of one sequence for layer `layer`: write the span's keys and
    /// values (rows of `k`, `v`) into `kv` at their positions, then, for each of the
    /// span's rows and each head, softmax(q·Kᵀ / sqrt(head_dim)) · V over positions
    /// `0..=pos`, into the same rows of `out`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        kv: &mut Self::Buf,
        layer: usize,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        span: Span,
        shape: &Shape,
        out: &mut Self::Buf,
    ) -> Result<(), EngineError>;
    /// `x += y` over `len` floats.
    fn add(&mut self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<(), EngineError>;
    /// `gate = silu(gate) * up` over `len` floats.
    fn silu_mul(
        &mut self,
        gate: &mut Self::Buf,
        up: &Self::Buf,
        len: usize,
    ) -> Result<(), EngineError>;
    /// `out[i] = x[rows[i]]` for `count` rows of width `d`.
    fn gather_rows(
        &mut self,
        x: &Self::Buf,
        rows: &Self::Ids,
        count: usize,
        d: usize,
        out: &mut Self::Buf,
    ) -> Result<(), EngineError>;
    /// The index of the largest of each of `rows` rows of `vocab` logits; on a tie the
    /// lowest index wins (every backend must agree on this).
    fn argmax(
        &mut self,
        logits: &Self::Buf,
        rows: usize,
        vocab: usize,
    ) -> Result<Vec<u32>, EngineError>;
}
