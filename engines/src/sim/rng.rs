//! A tiny deterministic generator (splitmix64): the simulator's tokens depend only on
//! the engine seed, the request's sampling seed and its prompt.

use crate::util::splitmix64;

/// splitmix64: small, fast, and good enough to spread token ids.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator for `prompt` under the engine `seed` (and the request's own seed).
    pub(crate) fn for_prompt(seed: u64, request_seed: Option<u64>, prompt: &[u32]) -> Rng {
        // FNV-1a over the prompt, folded with both seeds.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
        for &t in prompt {
            h ^= u64::from(t);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        if let Some(s) = request_seed {
            h ^= s.rotate_left(17);
        }
        Rng(h)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }
}
