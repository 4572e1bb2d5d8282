//! A request's sampling parameters, checked, and the llama.cpp sampler chain they make.
//!
//! The chain, in llama.cpp's own order: penalties (over the sequence's generated
//! tokens, the last 64), then either the argmax (temperature absent or 0) or `top_k`,
//! `top_p`, the temperature and a seeded draw. One chain per sequence, so its
//! penalties and its random stream are its own: the same prompt, parameters and seed
//! give the same tokens whenever the model's numbers are the same (llama.cpp's numbers
//! can depend on what else is in the batch; see the module docs of
//! [`llama`](super)).

use llama_cpp_2::sampling::LlamaSampler;
use tether_core::error::EngineError;
use tether_core::protocol::SamplingOptions;

/// How many of the last generated tokens the penalties look at (llama.cpp's default).
const PENALTY_LAST_N: i32 = 64;

/// A sequence's sampling, checked; [`Sampling::build`] makes its sampler on the
/// engine's thread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sampling {
    /// 0: the argmax.
    temperature: f32,
    top_p: f32,
    /// 0: no limit.
    top_k: i32,
    /// `None`: the engine draws a fresh one per sequence.
    seed: Option<u32>,
    presence: f32,
    frequency: f32,
    repetition: f32,
}

impl Sampling {
    /// Check `options`: a negative or non-finite temperature, a `top_p` outside
    /// `(0, 1]`, a repetition penalty that is not above 0 or a non-finite penalty is an
    /// `InvalidArgument`.
    pub(crate) fn of(options: &SamplingOptions) -> Result<Sampling, EngineError> {
        let temperature = options.temperature.unwrap_or(0.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(EngineError::invalid_argument(format!(
                "temperature must be finite and at least 0, got {temperature}"
            )));
        }
        let top_p = options.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(EngineError::invalid_argument(format!(
                "top_p must be in (0, 1], got {top_p}"
            )));
        }
        let repetition = options.repetition_penalty.unwrap_or(1.0);
        if !(repetition.is_finite() && repetition > 0.0) {
            return Err(EngineError::invalid_argument(format!(
                "repetition_penalty must be finite and above 0, got {repetition}"
            )));
        }
        let presence = options.presence_penalty.unwrap_or(0.0);
        let frequency = options.frequency_penalty.unwrap_or(0.0);
        if !(presence.is_finite() && frequency.is_finite()) {
            return Err(EngineError::invalid_argument(
                "presence_penalty and frequency_penalty must be finite",
            ));
        }
        Ok(Sampling {
            temperature,
            top_p,
            top_k: options
                .top_k
                .map_or(0, |k| i32::try_from(k).unwrap_or(i32::MAX)),
            seed: options.seed.map(fold_seed),
            presence,
            frequency,
            repetition,
        })
    }

    /// Whether a seed is needed that the request did not give (it samples without one).
    pub(crate) fn needs_seed(&self) -> bool {
        self.temperature > 0.0 && self.seed.is_none()
    }

    /// The same sampling, with `seed` when it had none.
    pub(crate) fn or_seed(mut self, seed: u64) -> Sampling {
        self.seed.get_or_insert(fold_seed(seed));
        self
    }

    /// The sampler chain (see the module docs), for a model of `n_vocab` tokens.
    pub(crate) fn build(&self, n_vocab: i32) -> LlamaSampler {
        let mut chain = Vec::with_capacity(5);
        if self.repetition != 1.0 || self.presence != 0.0 || self.frequency != 0.0 {
            // llama.cpp looks at `min(PENALTY_LAST_N, n_vocab)` tokens.
            chain.push(LlamaSampler::penalties(
                n_vocab,
                PENALTY_LAST_N,
                self.repetition,
                self.frequency,
                self.presence,
            ));
        }
        if self.temperature == 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if self.top_k > 0 {
                chain.push(LlamaSampler::top_k(self.top_k));
            }
            if self.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(self.top_p, 1));
            }
            chain.push(LlamaSampler::temp(self.temperature));
            chain.push(LlamaSampler::dist(self.seed.unwrap_or(0)));
        }
        LlamaSampler::chain_simple(chain)
    }
}

/// A request's 64-bit seed as llama.cpp's 32-bit one. llama.cpp reads `u32::MAX` as
/// "pick a random seed", so that value is moved to `u32::MAX - 1`.
fn fold_seed(seed: u64) -> u32 {
    #[allow(clippy::cast_possible_truncation)] // folding is the point
    let folded = (seed ^ (seed >> 32)) as u32;
    folded.min(u32::MAX - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(f: impl FnOnce(&mut SamplingOptions)) -> SamplingOptions {
        let mut o = SamplingOptions::default();
        f(&mut o);
        o
    }

    #[test]
    fn bad_values_are_invalid_arguments() {
        let bad = [
            options(|o| o.temperature = Some(-0.5)),
            options(|o| o.temperature = Some(f32::NAN)),
            options(|o| o.top_p = Some(0.0)),
            options(|o| o.top_p = Some(1.5)),
            options(|o| o.repetition_penalty = Some(0.0)),
            options(|o| o.presence_penalty = Some(f32::INFINITY)),
            options(|o| o.frequency_penalty = Some(f32::NEG_INFINITY)),
        ];
        for o in bad {
            let err = Sampling::of(&o).unwrap_err();
            assert_eq!(
                err.kind(),
                tether_core::error::ErrorKind::InvalidArgument,
                "{o:?}"
            );
        }
        assert!(Sampling::of(&SamplingOptions::default()).is_ok());
    }

    #[test]
    fn only_sampling_without_a_seed_needs_one() {
        let greedy = Sampling::of(&SamplingOptions::default()).unwrap();
        assert!(!greedy.needs_seed());
        let warm = Sampling::of(&options(|o| o.temperature = Some(0.7))).unwrap();
        assert!(warm.needs_seed());
        assert!(!warm.or_seed(3).needs_seed());
        let seeded = options(|o| {
            o.temperature = Some(0.7);
            o.seed = Some(5);
        });
        let seeded = Sampling::of(&seeded).unwrap();
        assert_eq!(seeded.or_seed(9), seeded, "a request's own seed is kept");
    }

    #[test]
    fn seeds_fold_to_32_bits_and_avoid_llama_cpps_random_marker() {
        assert_eq!(fold_seed(7), 7);
        assert_eq!(fold_seed(1 << 32), 1);
        assert_eq!(fold_seed(u64::from(u32::MAX)), u32::MAX - 1);
        assert_ne!(fold_seed(1), fold_seed(2));
    }
}
