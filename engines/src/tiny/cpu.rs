//! [`CpuBackend`]: the tiny transformer's ops in plain Rust (no BLAS, no `unsafe`).
//!
//! Owns nothing but a scratch row for attention scores. Every op is written so that
//! the compiler vectorizes its inner loop over contiguous memory and no sum is
//! reordered: a row's result never depends on the other rows of the batch, which is
//! what makes batched decoding give the same tokens as one sequence alone.

use tether_core::error::EngineError;

use super::backend::{Backend, Shape, Span, RMS_EPS};

/// The CPU backend. Buffers are `Vec`s.
#[derive(Debug, Default)]
pub(crate) struct CpuBackend {
    scores: Vec<f32>,
}

impl CpuBackend {
    pub(crate) fn new() -> CpuBackend {
        CpuBackend::default()
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;

    fn describe(&self) -> String {
        "cpu".to_owned()
    }

    fn upload(&mut self, data: &[f32]) -> Result<Vec<f32>, EngineError> {
        Ok(data.to_vec())
    }

    fn zeros(&mut self, len: usize) -> Result<Vec<f32>, EngineError> {
        Ok(vec![0.0; len])
    }

    fn upload_ids(&mut self, ids: &[u32]) -> Result<Vec<u32>, EngineError> {
        Ok(ids.to_vec())
    }

    fn download(&mut self, buf: &Vec<f32>, len: usize) -> Result<Vec<f32>, EngineError> {
        Ok(buf[..len].to_vec())
    }

    fn embed(
        &mut self,
        table: &Vec<f32>,
        tokens: &Vec<u32>,
        rows: usize,
        d: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        for (&t, row) in tokens[..rows].iter().zip(out.chunks_exact_mut(d)) {
            let t = t as usize;
            row.copy_from_slice(&table[t * d..(t + 1) * d]);
        }
        Ok(())
    }

    fn matmul(
        &mut self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        matmul(&x[..rows * k], &w[..k * n], k, n, &mut out[..rows * n]);
        Ok(())
    }

    fn rmsnorm(
        &mut self,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        rows: usize,
        d: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        for (xr, or) in x[..rows * d].chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean_sq = dot(xr, xr) / d as f32;
            let inv = 1.0 / (mean_sq + RMS_EPS).sqrt();
            for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
                *o = v * inv * g;
            }
        }
        Ok(())
    }

    fn rope(
        &mut self,
        x: &mut Vec<f32>,
        positions: &Vec<u32>,
        rows: usize,
        shape: &Shape,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
    ) -> Result<(), EngineError> {
        let half = shape.head_dim / 2;
        for (row, &pos) in x[..rows * shape.d_model]
            .chunks_exact_mut(shape.d_model)
            .zip(positions)
        {
            let at = pos as usize * half;
            let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
            for head in row.chunks_exact_mut(shape.head_dim) {
                for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(c).zip(s) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        }
        Ok(())
    }

    fn attention(
        &mut self,
        kv: &mut Vec<f32>,
        layer: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        span: Span,
        shape: &Shape,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let d = shape.d_model;
        let hd = shape.head_dim;
        let k_at = shape.kv_offset(span.capacity, layer, false);
        let v_at = shape.kv_offset(span.capacity, layer, true);
        let rows = span.row0 * d..(span.row0 + span.rows) * d;
        let slot = span.pos0 * d..(span.pos0 + span.rows) * d;
        kv[k_at + slot.start..k_at + slot.end].copy_from_slice(&k[rows.clone()]);
        kv[v_at + slot.start..v_at + slot.end].copy_from_slice(&v[rows.clone()]);

        let keys = &kv[k_at..k_at + span.capacity * d];
        let values = &kv[v_at..v_at + span.capacity * d];
        let scale = 1.0 / (hd as f32).sqrt();
        let scores = &mut self.scores;
        for i in 0..span.rows {
            let len = span.pos0 + i + 1;
            let row = (span.row0 + i) * d;
            for h in 0..shape.heads {
                let qh = &q[row + h * hd..row + (h + 1) * hd];
                scores.clear();
                scores.extend(
                    keys.chunks_exact(d)
                        .take(len)
                        .map(|kt| dot(qh, &kt[h * hd..(h + 1) * hd]) * scale),
                );
                softmax(scores);
                let oh = &mut out[row + h * hd..row + (h + 1) * hd];
                oh.fill(0.0);
                for (&p, vt) in scores.iter().zip(values.chunks_exact(d)) {
                    for (o, &x) in oh.iter_mut().zip(&vt[h * hd..(h + 1) * hd]) {
                        *o += p * x;
                    }
                }
            }
        }
        Ok(())
    }

    fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<(), EngineError> {
        for (a, &b) in x[..len].iter_mut().zip(y) {
            *a += b;
        }
        Ok(())
    }

    fn silu_mul(
        &mut self,
        gate: &mut Vec<f32>,
        up: &Vec<f32>,
        len: usize,
    ) -> Result<(), EngineError> {
        for (g, &u) in gate[..len].iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        Ok(())
    }

    fn gather_rows(
        &mut self,
        x: &Vec<f32>,
        rows: &Vec<u32>,
        count: usize,
        d: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        for (&r, o) in rows[..count].iter().zip(out.chunks_exact_mut(d)) {
            let r = r as usize;
            o.copy_from_slice(&x[r * d..(r + 1) * d]);
        }
        Ok(())
    }

    fn argmax(
        &mut self,
        logits: &Vec<f32>,
        rows: usize,
        vocab: usize,
    ) -> Result<Vec<u32>, EngineError> {
        Ok(logits[..rows * vocab]
            .chunks_exact(vocab)
            .map(|row| argmax(row) as u32)
            .collect())
    }
}

/// `out[rows, n] = x[rows, k] · w[k, n]`, four rows at a time so that each row of `w`
/// is read once per four output rows. Every output element sums over `k` in order,
/// whichever path computes it.
fn matmul(x: &[f32], w: &[f32], k: usize, n: usize, out: &mut [f32]) {
    out.fill(0.0);
    let mut x_blocks = x.chunks_exact(4 * k);
    let mut out_blocks = out.chunks_exact_mut(4 * n);
    for (xb, ob) in (&mut x_blocks).zip(&mut out_blocks) {
        let (o0, rest) = ob.split_at_mut(n);
        let (o1, rest) = rest.split_at_mut(n);
        let (o2, o3) = rest.split_at_mut(n);
        for (kk, wr) in w.chunks_exact(n).enumerate() {
            let (a0, a1, a2, a3) = (xb[kk], xb[k + kk], xb[2 * k + kk], xb[3 * k + kk]);
            let lanes = o0
                .iter_mut()
                .zip(o1.iter_mut())
                .zip(o2.iter_mut())
                .zip(o3.iter_mut());
            for ((((y0, y1), y2), y3), &wv) in lanes.zip(wr) {
                *y0 += a0 * wv;
                *y1 += a1 * wv;
                *y2 += a2 * wv;
                *y3 += a3 * wv;
            }
        }
    }
    for (xr, or) in x_blocks
        .remainder()
        .chunks_exact(k)
        .zip(out_blocks.into_remainder().chunks_exact_mut(n))
    {
        for (&a, wr) in xr.iter().zip(w.chunks_exact(n)) {
            for (y, &wv) in or.iter_mut().zip(wr) {
                *y += a * wv;
            }
        }
    }
}

/// `a · b`, summed in eight interleaved lanes (so it vectorizes) and then across the
/// lanes in order: a fixed order, whatever the batch.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    let mut sum = lanes.iter().sum::<f32>();
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        sum += x * y;
    }
    sum
}

/// In-place softmax (max-subtracted).
fn softmax(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in xs.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in xs.iter_mut() {
        *x *= inv;
    }
}

/// Index of the first largest value.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut acc = 0.0;
                for kk in 0..k {
                    acc += x[r * k + kk] * w[kk * n + j];
                }
                out[r * n + j] = acc;
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive_exactly_for_any_row_count() {
        let (k, n) = (5, 7);
        let w: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.37).sin()).collect();
        for rows in [1, 3, 4, 6, 9] {
            let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut out = vec![f32::NAN; rows * n];
            matmul(&x, &w, k, n, &mut out);
            assert_eq!(out, naive(&x, &w, rows, k, n), "rows {rows}");
        }
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn dot_handles_a_remainder() {
        let a: Vec<f32> = (1..=11).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), 506.0);
        assert_eq!(dot(&[], &[]), 0.0);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut xs = vec![1.0, 2.0, 3.0];
        softmax(&mut xs);
        assert!((xs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(xs[2] > xs[1] && xs[1] > xs[0]);
    }
}
