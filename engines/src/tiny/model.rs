//! The tiny transformer's forward pass over any [`Backend`], the per-sequence KV caches,
//! and [`TinyModel`], the model without an engine around it.
//!
//! Owns the order of ops (pre-norm blocks: RMSNorm, rotary multi-head attention with a
//! KV cache, residual; RMSNorm, SwiGLU feed-forward, residual; final RMSNorm and the
//! LM head on each sequence's last row, then the backend's argmax, or for a sequence
//! that samples a [`Draw`] from its logits on the host), the KV caches keyed by
//! sequence, and the count of KV bytes they hold. Knows nothing of requests, streams
//! or the scheduler: [`Runner`] is what the scheduler sees.
//!
//! The argmax always runs where the model runs and decides every greedy token, so
//! greedy decoding is the same as before sampling existed, on every backend; a step's
//! logits travel to the host only when a sequence in it samples (or a caller asked).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tether_core::error::{EngineError, ErrorKind};

use super::backend::{Backend, Shape, Span};
use super::config::{Device, TinyConfig};
use super::cpu::CpuBackend;
use super::sampler::Draw;
use super::weights::Weights;

/// One sequence's share of a step: its new `tokens`, at positions `pos0..`, and how
/// its next token is chosen (`sample`: `None` for the argmax).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Segment<'a> {
    pub(crate) seq: u64,
    pub(crate) tokens: &'a [u32],
    pub(crate) pos0: usize,
    pub(crate) sample: Option<Draw>,
}

/// What one forward step produced, per segment in order: the next token (the argmax,
/// or the segment's draw from its logits; `None` for a segment that was skipped: no KV
/// cache, or out of its cache's bounds), and that row's logits when they were asked
/// for.
#[derive(Clone, Debug, Default)]
pub(crate) struct Forward {
    pub(crate) next: Vec<Option<u32>>,
    pub(crate) logits: Vec<Vec<f32>>,
}

/// The model as the scheduler drives it, whatever the backend (object-safe).
pub(crate) trait Runner: Send {
    /// Where the model runs, for humans.
    fn describe(&self) -> String;
    /// Reserve a KV cache of `capacity` tokens for sequence `seq`.
    fn alloc(&mut self, seq: u64, capacity: usize) -> Result<(), EngineError>;
    /// Free sequence `seq`'s KV cache, if it has one.
    fn release(&mut self, seq: u64);
    /// Run one step over `segments` (each writes its tokens into its KV cache).
    fn forward(
        &mut self,
        segments: &[Segment<'_>],
        want_logits: bool,
    ) -> Result<Forward, EngineError>;
}

/// Weights where the backend computes.
struct DeviceLayer<B: Backend> {
    attn_norm: B::Buf,
    wq: B::Buf,
    wk: B::Buf,
    wv: B::Buf,
    wo: B::Buf,
    ffn_norm: B::Buf,
    w_gate: B::Buf,
    w_up: B::Buf,
    w_down: B::Buf,
}

struct DeviceWeights<B: Backend> {
    embed: B::Buf,
    layers: Vec<DeviceLayer<B>>,
    final_norm: B::Buf,
    lm_head: B::Buf,
    rope_cos: B::Buf,
    rope_sin: B::Buf,
}

/// Activations of one step, grown as needed and reused (a step allocates nothing once
/// the largest batch was seen).
struct Scratch<B: Backend> {
    rows: usize,
    seqs: usize,
    x: B::Buf,
    xn: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    proj: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    last: B::Buf,
    last_n: B::Buf,
    logits: B::Buf,
}

struct Kv<B: Backend> {
    buf: B::Buf,
    capacity: usize,
}

/// The forward pass on backend `B`, with the KV caches of the sequences it runs.
pub(crate) struct Model<B: Backend> {
    backend: B,
    shape: Shape,
    weights: DeviceWeights<B>,
    scratch: Option<Scratch<B>>,
    kv: HashMap<u64, Kv<B>>,
    /// KV bytes held, shared with the engine's gauges.
    kv_bytes: Arc<AtomicUsize>,
}

impl<B: Backend> Model<B> {
    /// Upload `weights` to `backend`.
    pub(crate) fn new(
        mut backend: B,
        cfg: &TinyConfig,
        weights: &Weights,
        kv_bytes: Arc<AtomicUsize>,
    ) -> Result<Model<B>, EngineError> {
        let mut up = |data: &[f32]| backend.upload(data);
        let mut layers = Vec::with_capacity(weights.layers.len());
        for l in &weights.layers {
            layers.push(DeviceLayer {
                attn_norm: up(&l.attn_norm)?,
                wq: up(&l.wq)?,
                wk: up(&l.wk)?,
                wv: up(&l.wv)?,
                wo: up(&l.wo)?,
                ffn_norm: up(&l.ffn_norm)?,
                w_gate: up(&l.w_gate)?,
                w_up: up(&l.w_up)?,
                w_down: up(&l.w_down)?,
            });
        }
        let weights = DeviceWeights {
            embed: up(&weights.embed)?,
            layers,
            final_norm: up(&weights.final_norm)?,
            lm_head: up(&weights.lm_head)?,
            rope_cos: up(&weights.rope_cos)?,
            rope_sin: up(&weights.rope_sin)?,
        };
        Ok(Model {
            backend,
            shape: Shape::of(cfg),
            weights,
            scratch: None,
            kv: HashMap::new(),
            kv_bytes,
        })
    }

    /// Make sure the scratch holds `rows` rows and `seqs` sequences' last rows.
    fn ensure_scratch(&mut self, rows: usize, seqs: usize) -> Result<(), EngineError> {
        if let Some(s) = &self.scratch {
            if s.rows >= rows && s.seqs >= seqs {
                return Ok(());
            }
        }
        let (old_rows, old_seqs) = self.scratch.as_ref().map_or((0, 0), |s| (s.rows, s.seqs));
        let rows = rows.max(old_rows).next_power_of_two();
        let seqs = seqs.max(old_seqs).next_power_of_two();
        let Shape {
            d_model: d,
            d_ff: ff,
            vocab,
            ..
        } = self.shape;
        let b = &mut self.backend;
        // Drop the old scratch first: on a GPU the memory is better reused than doubled.
        self.scratch = None;
        self.scratch = Some(Scratch {
            rows,
            seqs,
            x: b.zeros(rows * d)?,
            xn: b.zeros(rows * d)?,
            q: b.zeros(rows * d)?,
            k: b.zeros(rows * d)?,
            v: b.zeros(rows * d)?,
            att: b.zeros(rows * d)?,
            proj: b.zeros(rows * d)?,
            gate: b.zeros(rows * ff)?,
            up: b.zeros(rows * ff)?,
            last: b.zeros(seqs * d)?,
            last_n: b.zeros(seqs * d)?,
            logits: b.zeros(seqs * vocab)?,
        });
        Ok(())
    }

    fn kv_bytes_of(&self, capacity: usize) -> usize {
        self.shape.kv_len(capacity) * std::mem::size_of::<f32>()
    }
}

impl<B: Backend> Drop for Model<B> {
    fn drop(&mut self) {
        let held: usize = self
            .kv
            .values()
            .map(|kv| self.kv_bytes_of(kv.capacity))
            .sum();
        // Relaxed: a gauge; nothing is published through it.
        self.kv_bytes.fetch_sub(held, Ordering::Relaxed);
    }
}

impl<B: Backend> Runner for Model<B> {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn alloc(&mut self, seq: u64, capacity: usize) -> Result<(), EngineError> {
        let capacity = capacity.clamp(1, self.shape.max_context);
        let buf = self.backend.zeros(self.shape.kv_len(capacity))?;
        if let Some(old) = self.kv.insert(seq, Kv { buf, capacity }) {
            // Relaxed: a gauge (see Drop).
            self.kv_bytes
                .fetch_sub(self.kv_bytes_of(old.capacity), Ordering::Relaxed);
        }
        // Relaxed: a gauge (see Drop).
        self.kv_bytes
            .fetch_add(self.kv_bytes_of(capacity), Ordering::Relaxed);
        Ok(())
    }

    fn release(&mut self, seq: u64) {
        if let Some(kv) = self.kv.remove(&seq) {
            let bytes = self.kv_bytes_of(kv.capacity);
            drop(kv);
            // Relaxed: a gauge (see Drop).
            self.kv_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    fn forward(
        &mut self,
        segments: &[Segment<'_>],
        want_logits: bool,
    ) -> Result<Forward, EngineError> {
        let shape = self.shape;
        // Skip what cannot run: no cache, past its cache, empty, or a bad token.
        let runnable: Vec<bool> = segments
            .iter()
            .map(|s| {
                self.kv.get(&s.seq).is_some_and(|kv| {
                    !s.tokens.is_empty()
                        && s.pos0 + s.tokens.len() <= kv.capacity
                        && s.tokens.iter().all(|&t| (t as usize) < shape.vocab)
                })
            })
            .collect();
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut last_rows = Vec::new();
        let mut spans = Vec::new();
        for (s, _) in segments.iter().zip(&runnable).filter(|(_, &ok)| ok) {
            let row0 = tokens.len();
            tokens.extend_from_slice(s.tokens);
            positions.extend((s.pos0..s.pos0 + s.tokens.len()).map(|p| p as u32));
            last_rows.push((tokens.len() - 1) as u32);
            spans.push((s.seq, row0, s.tokens.len(), s.pos0));
        }
        let rows = tokens.len();
        let seqs = spans.len();
        let mut out = Forward::default();
        if rows == 0 {
            out.next = vec![None; segments.len()];
            return Ok(out);
        }
        self.ensure_scratch(rows, seqs)?;
        let Model {
            backend: b,
            weights: w,
            scratch,
            kv,
            ..
        } = self;
        let s = scratch.as_mut().expect("scratch was just ensured");
        let (d, ff, vocab) = (shape.d_model, shape.d_ff, shape.vocab);

        let token_ids = b.upload_ids(&tokens)?;
        let position_ids = b.upload_ids(&positions)?;
        b.embed(&w.embed, &token_ids, rows, d, &mut s.x)?;
        for (l, lw) in w.layers.iter().enumerate() {
            b.rmsnorm(&s.x, &lw.attn_norm, rows, d, &mut s.xn)?;
            b.matmul(&s.xn, &lw.wq, rows, d, d, &mut s.q)?;
            b.matmul(&s.xn, &lw.wk, rows, d, d, &mut s.k)?;
            b.matmul(&s.xn, &lw.wv, rows, d, d, &mut s.v)?;
            b.rope(
                &mut s.q,
                &position_ids,
                rows,
                &shape,
                &w.rope_cos,
                &w.rope_sin,
            )?;
            b.rope(
                &mut s.k,
                &position_ids,
                rows,
                &shape,
                &w.rope_cos,
                &w.rope_sin,
            )?;
            for &(seq, row0, n, pos0) in &spans {
                let cache = kv.get_mut(&seq).expect("runnable segments have a cache");
                let span = Span {
                    row0,
                    rows: n,
                    pos0,
                    capacity: cache.capacity,
                };
                b.attention(
                    &mut cache.buf,
                    l,
                    &s.q,
                    &s.k,
                    &s.v,
                    span,
                    &shape,
                    &mut s.att,
                )?;
            }
            b.matmul(&s.att, &lw.wo, rows, d, d, &mut s.proj)?;
            b.add(&mut s.x, &s.proj, rows * d)?;

            b.rmsnorm(&s.x, &lw.ffn_norm, rows, d, &mut s.xn)?;
            b.matmul(&s.xn, &lw.w_gate, rows, d, ff, &mut s.gate)?;
            b.matmul(&s.xn, &lw.w_up, rows, d, ff, &mut s.up)?;
            b.silu_mul(&mut s.gate, &s.up, rows * ff)?;
            b.matmul(&s.gate, &lw.w_down, rows, ff, d, &mut s.proj)?;
            b.add(&mut s.x, &s.proj, rows * d)?;
        }
        let last_ids = b.upload_ids(&last_rows)?;
        b.gather_rows(&s.x, &last_ids, seqs, d, &mut s.last)?;
        b.rmsnorm(&s.last, &w.final_norm, seqs, d, &mut s.last_n)?;
        b.matmul(&s.last_n, &w.lm_head, seqs, d, vocab, &mut s.logits)?;
        let next = b.argmax(&s.logits, seqs, vocab)?;
        let sampling = segments
            .iter()
            .zip(&runnable)
            .any(|(seg, &ok)| ok && seg.sample.is_some());
        let logits = if want_logits || sampling {
            b.download(&s.logits, seqs * vocab)?
        } else {
            Vec::new()
        };

        let mut next = next.into_iter();
        let mut rows_of_logits = logits.chunks_exact(vocab);
        for (seg, ok) in segments.iter().zip(runnable) {
            if ok {
                let argmax = next.next();
                let row = rows_of_logits.next();
                out.next.push(match (seg.sample, row) {
                    (Some(draw), Some(row)) => Some(draw.pick(row)),
                    _ => argmax,
                });
                if want_logits {
                    out.logits
                        .push(row.map(<[f32]>::to_vec).unwrap_or_default());
                }
            } else {
                out.next.push(None);
                if want_logits {
                    out.logits.push(Vec::new());
                }
            }
        }
        Ok(out)
    }
}

/// Build the model `cfg` describes on its device.
pub(crate) fn build(
    cfg: &TinyConfig,
    kv_bytes: Arc<AtomicUsize>,
) -> Result<Box<dyn Runner>, EngineError> {
    cfg.validate()
        .map_err(|e| EngineError::invalid_argument(e.to_string()))?;
    let weights = Weights::generate(cfg);
    match cfg.device {
        Device::Cpu => Ok(Box::new(Model::new(
            CpuBackend::new(),
            cfg,
            &weights,
            kv_bytes,
        )?)),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let backend = super::cuda::CudaBackend::new(ordinal, cfg.max_context)?;
            Ok(Box::new(Model::new(backend, cfg, &weights, kv_bytes)?))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(EngineError::new(
            ErrorKind::Unavailable,
            "tether-engines was built without the `cuda` feature",
        )),
    }
}

/// The tiny transformer on its own, without an engine: for checking one backend
/// against another and for measuring raw decode speed.
///
/// ```
/// # use tether_engines::tiny::{TinyConfig, TinyModel};
/// let mut model = TinyModel::new(&TinyConfig::default()).unwrap();
/// let tokens = model.greedy(&[104, 105], 4).unwrap();
/// assert_eq!(tokens.len(), 4);
/// assert_eq!(model.kv_bytes(), 0);
/// assert!(model.greedy(&[300], 4).is_err()); // outside the byte vocabulary
/// ```
pub struct TinyModel {
    runner: Box<dyn Runner>,
    kv_bytes: Arc<AtomicUsize>,
    max_context: usize,
    vocab_size: usize,
    next_seq: u64,
}

impl fmt::Debug for TinyModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TinyModel")
            .field("device", &self.runner.describe())
            .field("kv_bytes", &self.kv_bytes())
            .finish_non_exhaustive()
    }
}

impl TinyModel {
    /// Build the model `config` describes (its shape, seed and device). A CUDA device
    /// without a driver, NVRTC, or the `cuda` feature is an `Unavailable` error.
    pub fn new(config: &TinyConfig) -> Result<TinyModel, EngineError> {
        let kv_bytes = Arc::new(AtomicUsize::new(0));
        Ok(TinyModel {
            runner: build(config, kv_bytes.clone())?,
            kv_bytes,
            max_context: config.max_context,
            vocab_size: config.vocab_size,
            next_seq: 0,
        })
    }

    /// Where the model runs, for humans (`"cpu"`, `"cuda:0 (NVIDIA H100 80GB HBM3)"`).
    pub fn device(&self) -> String {
        self.runner.describe()
    }

    /// KV-cache bytes held now (zero between calls: every call frees what it used).
    pub fn kv_bytes(&self) -> usize {
        // Relaxed: a gauge.
        self.kv_bytes.load(Ordering::Relaxed)
    }

    /// The logits of the token that would follow `prompt`.
    pub fn next_logits(&mut self, prompt: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut batch = self.run(&[prompt.to_vec()], 1, true)?;
        Ok(batch.logits.pop().unwrap_or_default())
    }

    /// The first `n` greedy tokens after `prompt` (fewer if the context fills up).
    pub fn greedy(&mut self, prompt: &[u32], n: usize) -> Result<Vec<u32>, EngineError> {
        let mut batch = self.run(&[prompt.to_vec()], n, false)?;
        Ok(batch.tokens.pop().unwrap_or_default())
    }

    /// The first `n` greedy tokens after each prompt, all decoded as one batch.
    pub fn greedy_batch(
        &mut self,
        prompts: &[Vec<u32>],
        n: usize,
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        Ok(self.run(prompts, n, false)?.tokens)
    }

    /// Prefill every prompt in one step, then decode `n - 1` more steps; frees the
    /// caches at the end, whatever happened.
    fn run(&mut self, prompts: &[Vec<u32>], n: usize, logits: bool) -> Result<Batch, EngineError> {
        for p in prompts {
            if p.is_empty() || p.len() > self.max_context {
                return Err(EngineError::invalid_argument(format!(
                    "prompt of {} tokens (must be 1 to {})",
                    p.len(),
                    self.max_context
                )));
            }
            if let Some(&t) = p.iter().find(|&&t| t as usize >= self.vocab_size) {
                return Err(EngineError::invalid_argument(format!(
                    "prompt token {t} is outside the vocabulary of {}",
                    self.vocab_size
                )));
            }
        }
        let first = self.next_seq;
        self.next_seq += prompts.len() as u64;
        let seqs: Vec<u64> = (first..self.next_seq).collect();
        let outcome = self.decode(&seqs, prompts, n, logits);
        for &seq in &seqs {
            self.runner.release(seq);
        }
        outcome
    }

    fn decode(
        &mut self,
        seqs: &[u64],
        prompts: &[Vec<u32>],
        n: usize,
        logits: bool,
    ) -> Result<Batch, EngineError> {
        let max_context = self.max_context;
        for (&seq, p) in seqs.iter().zip(prompts) {
            self.runner.alloc(seq, (p.len() + n).min(max_context))?;
        }
        let mut batch = Batch {
            tokens: vec![Vec::new(); prompts.len()],
            logits: Vec::new(),
        };
        // (fed so far, token to feed next); prefill feeds the whole prompt.
        let mut inputs: Vec<(usize, Vec<u32>)> = prompts.iter().map(|p| (0, p.clone())).collect();
        for _ in 0..n {
            // As in the engine: prompt plus output stop at the context.
            let live: Vec<usize> = (0..prompts.len())
                .filter(|&i| {
                    let (fed, new) = (inputs[i].0, inputs[i].1.len());
                    if fed == 0 {
                        new <= max_context
                    } else {
                        fed + new < max_context
                    }
                })
                .collect();
            if live.is_empty() {
                break;
            }
            let segments: Vec<Segment<'_>> = live
                .iter()
                .map(|&i| Segment {
                    seq: seqs[i],
                    tokens: &inputs[i].1,
                    pos0: inputs[i].0,
                    sample: None,
                })
                .collect();
            let step = self.runner.forward(&segments, logits)?;
            if logits && batch.logits.is_empty() {
                batch.logits = step.logits;
            }
            for (&i, next) in live.iter().zip(step.next) {
                let token = next.ok_or_else(|| {
                    EngineError::new(
                        ErrorKind::ResourceExhausted,
                        "sequence outgrew its kv cache",
                    )
                })?;
                batch.tokens[i].push(token);
                let fed = inputs[i].0 + inputs[i].1.len();
                inputs[i] = (fed, vec![token]);
            }
        }
        Ok(batch)
    }
}

struct Batch {
    tokens: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
}
