//! [`Sampler`]: how a sequence that asked for sampling picks its next token from the
//! logits a step returned (temperature, then `top_k`, then `top_p`), with its own
//! seeded random stream.
//!
//! Owns the choice of one token from one row of logits, on the host, and nothing else:
//! a greedy sequence never comes here (the backend's argmax picks its token, so greedy
//! decoding stays the same on every backend). Knows nothing of requests or batches.
//!
//! Reproducibility: a sequence's draws are the SplitMix64 stream seeded with its seed,
//! and its `n`-th output token takes the stream's `n`-th value ([`Draw::index`]), jumping
//! straight to it. So the tokens depend only on the logits, the parameters and the
//! seed: not on which other sequences share the batch, how the prompt was chunked, or
//! how many steps ran before.

use tether_core::error::EngineError;
use tether_core::protocol::SamplingOptions;

use crate::util::splitmix64;

/// SplitMix64's increment: state `seed + n * GAMMA` yields the stream's `n`-th value.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A sequence's sampling parameters and seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sampler {
    /// Softmax temperature, above 0.
    temperature: f32,
    /// Keep only this many most likely tokens (`None`: all).
    top_k: Option<u32>,
    /// Keep the smallest set of most likely tokens whose probability reaches this
    /// (`1.0`: all).
    top_p: f32,
    /// The seed of the sequence's random stream.
    seed: u64,
}

/// What a request's sampling options ask of the engine, checked: greedy, or sampling
/// with these parameters (the seed is resolved when the sequence is queued).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Decoding {
    /// Argmax (temperature absent or 0); `top_p`, `top_k` and `seed` change nothing.
    Greedy,
    /// Sampling; `seed` is the request's own, if it set one.
    Sample {
        temperature: f32,
        top_k: Option<u32>,
        top_p: f32,
        seed: Option<u64>,
    },
}

impl Decoding {
    /// Check `options`: a temperature must be finite and at least 0, a `top_p` in
    /// `(0, 1]`. Temperature absent or 0 is greedy; `top_k` 0 means no limit.
    pub(crate) fn of(options: &SamplingOptions) -> Result<Decoding, EngineError> {
        if let Some(t) = options.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(EngineError::invalid_argument(format!(
                    "temperature must be a finite number of at least 0, got {t}"
                )));
            }
        }
        if let Some(p) = options.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(EngineError::invalid_argument(format!(
                    "top_p must be in (0, 1], got {p}"
                )));
            }
        }
        Ok(match options.temperature {
            // 0.0 also matches -0.0.
            None | Some(0.0) => Decoding::Greedy,
            Some(temperature) => Decoding::Sample {
                temperature,
                top_k: options.top_k.filter(|&k| k > 0),
                top_p: options.top_p.unwrap_or(1.0),
                seed: options.seed,
            },
        })
    }

    /// The sampler of a sequence decoded this way, its seed being the request's or
    /// else `fresh` (`None` when greedy).
    pub(crate) fn sampler(self, fresh: impl FnOnce() -> u64) -> Option<Sampler> {
        match self {
            Decoding::Greedy => None,
            Decoding::Sample {
                temperature,
                top_k,
                top_p,
                seed,
            } => Some(Sampler {
                temperature,
                top_k,
                top_p,
                seed: seed.unwrap_or_else(fresh),
            }),
        }
    }
}

/// One draw: the sampler of a sequence and which of its output tokens is being chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Draw {
    pub(crate) sampler: Sampler,
    /// The output token's number (0 for the first).
    pub(crate) index: u64,
}

impl Draw {
    /// The draw's uniform number in `[0, 1)`: the `index`-th value of the SplitMix64
    /// stream seeded with the sampler's seed.
    fn uniform(&self) -> f64 {
        let mut state = self
            .sampler
            .seed
            .wrapping_add(self.index.wrapping_mul(GAMMA));
        // 53 random bits: every value is an exact f64 in [0, 1).
        (splitmix64(&mut state) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Choose a token from `logits` (one row, a logit per token id).
    pub(crate) fn pick(&self, logits: &[f32]) -> u32 {
        pick(&self.sampler, logits, self.uniform())
    }
}

/// Choose a token from `logits` with the uniform number `u` in `[0, 1)`: candidates in
/// order of logit (the lower id first on a tie, as the backends' argmax), cut to
/// `top_k`, weighed by `softmax(logit / temperature)`, cut to the smallest prefix whose
/// mass reaches `top_p` (never empty), and the candidate where `u` falls in their
/// cumulative mass. A NaN logit counts as the least likely.
fn pick(sampler: &Sampler, logits: &[f32], u: f64) -> u32 {
    let key = |i: usize| {
        let l = logits[i];
        if l.is_nan() {
            f32::NEG_INFINITY
        } else {
            l
        }
    };
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable: equal logits keep the lower id first.
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
    if let Some(k) = sampler.top_k {
        order.truncate(k as usize);
    }
    let Some(&best) = order.first() else {
        return 0;
    };
    let top = f64::from(key(best));
    let temperature = f64::from(sampler.temperature);
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((f64::from(key(i)) - top) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        // Nothing has weight (every logit -inf): the best candidate.
        return best as u32;
    }
    // The nucleus: the fewest candidates whose probability reaches top_p.
    let wanted = f64::from(sampler.top_p) * total;
    let mut kept = 0;
    let mut mass = 0.0;
    for w in &weights {
        kept += 1;
        mass += w;
        if mass >= wanted {
            break;
        }
    }
    let target = u * mass;
    let mut cumulative = 0.0;
    for (&i, w) in order.iter().zip(&weights[..kept]) {
        cumulative += w;
        if target < cumulative {
            return i as u32;
        }
    }
    // Rounding left `target` at the very top: the last kept candidate.
    order[kept - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: Option<u32>, top_p: f32) -> Sampler {
        Sampler {
            temperature,
            top_k,
            top_p,
            seed: 42,
        }
    }

    /// How often each token comes out of `draws` draws over `logits`.
    fn histogram(s: Sampler, logits: &[f32], draws: u64) -> Vec<u64> {
        let mut counts = vec![0; logits.len()];
        for index in 0..draws {
            counts[Draw { sampler: s, index }.pick(logits) as usize] += 1;
        }
        counts
    }

    const LOGITS: [f32; 6] = [1.0, 3.0, 0.5, 2.5, -1.0, 2.5];

    #[test]
    fn top_k_keeps_only_the_k_best_tokens() {
        let counts = histogram(sampler(1.0, Some(2), 1.0), &LOGITS, 4000);
        // Token 1 (3.0) and token 3 (2.5; it ties token 5 and has the lower id).
        assert_eq!(
            counts[0] + counts[2] + counts[4] + counts[5],
            0,
            "{counts:?}"
        );
        assert_eq!(counts[1] + counts[3], 4000);
        // p(1) = e^0.5 / (e^0.5 + 1) = 0.622: both come out, in about that ratio.
        assert!((2300..2700).contains(&counts[1]), "{counts:?}");
        let counts = histogram(sampler(1.0, Some(3), 1.0), &LOGITS, 4000);
        assert_eq!(counts[0] + counts[2] + counts[4], 0, "{counts:?}");
        assert!(
            counts[1] > 0 && counts[3] > 0 && counts[5] > 0,
            "{counts:?}"
        );
    }

    #[test]
    fn top_k_one_tiny_top_p_and_tiny_temperature_are_the_argmax() {
        let argmax = 1;
        for s in [
            sampler(1.0, Some(1), 1.0),
            sampler(2.0, None, 1e-6),
            sampler(1e-4, None, 1.0),
        ] {
            assert_eq!(histogram(s, &LOGITS, 500)[argmax], 500, "{s:?}");
        }
        // Equal maxima: the lower id, as the backends' argmax.
        let tied = [0.0, 7.0, 7.0];
        assert_eq!(histogram(sampler(1.0, Some(1), 1.0), &tied, 100)[1], 100);
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus_that_reaches_it() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (logits are log2 steps at T = 1).
        let ln2 = std::f32::consts::LN_2;
        let logits = [3.0 * ln2, 2.0 * ln2, ln2, ln2];
        // 0.7 needs the first two (0.75); 0.45 the first alone; 0.8 the first three.
        let counts = histogram(sampler(1.0, None, 0.7), &logits, 3000);
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
        assert!(counts[0] > counts[1] && counts[1] > 0, "{counts:?}");
        assert_eq!(histogram(sampler(1.0, None, 0.45), &logits, 300)[0], 300);
        let counts = histogram(sampler(1.0, None, 0.8), &logits, 3000);
        assert_eq!(counts[3], 0, "{counts:?}");
        assert!(counts[2] > 0, "{counts:?}");
    }

    #[test]
    fn the_uniform_number_walks_the_cumulative_mass() {
        // Two candidates of equal weight: [0, 0.5) is the first, [0.5, 1) the second.
        let s = sampler(1.0, None, 1.0);
        assert_eq!(pick(&s, &[0.0, 0.0], 0.0), 0);
        assert_eq!(pick(&s, &[0.0, 0.0], 0.4999), 0);
        assert_eq!(pick(&s, &[0.0, 0.0], 0.5), 1);
        assert_eq!(pick(&s, &[0.0, 0.0], 0.9999), 1);
        // Ordered by logit first: the better token owns the start of the range.
        assert_eq!(pick(&s, &[0.0, 1.0], 0.0), 1);
        // NaN is the least likely, and -inf everywhere falls back to the first.
        assert_eq!(pick(&s, &[f32::NAN, 0.0], 0.0), 1);
        let none = [f32::NEG_INFINITY; 3];
        assert_eq!(pick(&s, &none, 0.7), 0);
        assert_eq!(pick(&s, &[], 0.7), 0);
    }

    #[test]
    fn draws_follow_the_seed_and_the_index_only() {
        let s = sampler(1.0, None, 1.0);
        let uniform = |seed: u64, index: u64| {
            Draw {
                sampler: Sampler { seed, ..s },
                index,
            }
            .uniform()
        };
        // The n-th value of the stream seeded with the seed, as splitmix64 steps it.
        let mut state = 42;
        let stream: Vec<u64> = (0..4).map(|_| splitmix64(&mut state)).collect();
        for (n, v) in stream.iter().enumerate() {
            let expected = (v >> 11) as f64 / (1u64 << 53) as f64;
            assert_eq!(uniform(42, n as u64), expected);
        }
        assert_ne!(uniform(42, 0), uniform(43, 0));
        assert!((0..1000).all(|i| (0.0..1.0).contains(&uniform(7, i))));
        // A temperature of 1 over a flat row spreads over every token.
        let flat = histogram(s, &[0.0; 4], 4000);
        assert!(flat.iter().all(|&c| (850..1150).contains(&c)), "{flat:?}");
    }

    #[test]
    fn decoding_is_greedy_without_a_temperature_and_checks_its_values() {
        let mut o = SamplingOptions::default();
        o.top_k = Some(5);
        o.seed = Some(1);
        assert_eq!(Decoding::of(&o).unwrap(), Decoding::Greedy);
        o.temperature = Some(0.0);
        assert_eq!(Decoding::of(&o).unwrap(), Decoding::Greedy);
        assert_eq!(Decoding::of(&o).unwrap().sampler(|| 9), None);
        o.temperature = Some(0.5);
        o.top_k = Some(0);
        let d = Decoding::of(&o).unwrap();
        assert_eq!(
            d,
            Decoding::Sample {
                temperature: 0.5,
                top_k: None,
                top_p: 1.0,
                seed: Some(1)
            }
        );
        assert_eq!(d.sampler(|| 9).unwrap().seed, 1);
        o.seed = None;
        assert_eq!(Decoding::of(&o).unwrap().sampler(|| 9).unwrap().seed, 9);
        for (t, p) in [
            (-0.1, None),
            (f32::NAN, None),
            (1.0, Some(0.0)),
            (1.0, Some(1.5)),
        ] {
            o.temperature = Some(t);
            o.top_p = p;
            let e = Decoding::of(&o).unwrap_err();
            assert_eq!(
                e.kind(),
                tether_core::error::ErrorKind::InvalidArgument,
                "{t} {p:?}"
            );
        }
    }
}
