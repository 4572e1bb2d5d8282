//! The seeded chaos plan: for every request, its prompt and the one thing (or nothing)
//! that will happen to it, chosen from the seed alone, so a run can be repeated and
//! its expected counts computed before it starts.
//!
//! Owns the choice and what each choice implies (the outcomes it allows, the aborts it
//! calls for); it must not look at a running request.

use std::fmt;

use serde::Serialize;
use tether_core::protocol::Mode;
use tether_engines::Chaos;

/// Fractions of requests that get each kind of chaos (each in `0..=1`, summing to at
/// most 1; every request gets at most one kind).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ChaosRates {
    /// Stopped (graceful) by the client at a random chunk.
    pub stop: f64,
    /// Killed by the client at a random chunk.
    pub kill: f64,
    /// Stream dropped by the client at a random chunk.
    pub drop: f64,
    /// The engine fails with an error at a random step.
    pub error: f64,
    /// The engine hangs at a random step (needs a timeout).
    pub hang: f64,
    /// The engine's stream panics at a random step.
    pub panic: f64,
}

impl Default for ChaosRates {
    /// The default mix: 5% each of stop, kill and drop, 1% each of error, hang, panic.
    fn default() -> Self {
        ChaosRates {
            stop: 0.05,
            kill: 0.05,
            drop: 0.05,
            error: 0.01,
            hang: 0.01,
            panic: 0.01,
        }
    }
}

/// Every chaos kind, in plan order: the client's, then the engine's.
pub const CHAOS_KINDS: [&str; 6] = ["stop", "kill", "drop", "error", "hang", "panic"];

/// The chaos kinds the engine carries out (SimEngine only), as opposed to the client's.
pub const ENGINE_FAULTS: [&str; 3] = ["error", "hang", "panic"];

impl ChaosRates {
    /// No chaos at all.
    pub const NONE: ChaosRates = ChaosRates {
        stop: 0.0,
        kill: 0.0,
        drop: 0.0,
        error: 0.0,
        hang: 0.0,
        panic: 0.0,
    };

    /// The rates by name, in plan order.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        let rates = [
            self.stop, self.kill, self.drop, self.error, self.hang, self.panic,
        ];
        std::array::from_fn(|i| (CHAOS_KINDS[i], rates[i]))
    }

    /// Set the rate called `name`; `false` if there is no such kind.
    pub fn set(&mut self, name: &str, rate: f64) -> bool {
        let slot = match name {
            "stop" => &mut self.stop,
            "kill" => &mut self.kill,
            "drop" => &mut self.drop,
            "error" => &mut self.error,
            "hang" => &mut self.hang,
            "panic" => &mut self.panic,
            _ => return false,
        };
        *slot = rate;
        true
    }

    /// The sum of all rates.
    pub fn total(&self) -> f64 {
        self.named().iter().map(|(_, r)| r).sum()
    }

    /// The names of the engine faults (error, hang, panic: SimEngine's chaos hooks)
    /// with a non-zero rate.
    pub fn engine_faults(&self) -> Vec<&'static str> {
        self.named()
            .into_iter()
            .filter(|&(name, rate)| ENGINE_FAULTS.contains(&name) && rate != 0.0)
            .map(|(name, _)| name)
            .collect()
    }

    /// These rates with every engine fault at 0: the client chaos (stop, kill, drop)
    /// that any engine takes.
    #[must_use]
    pub fn without_engine_faults(mut self) -> ChaosRates {
        for name in ENGINE_FAULTS {
            self.set(name, 0.0);
        }
        self
    }
}

/// What happens to one request. `at` counts items received by the client (for client
/// actions) or tokens produced by the engine (for engine faults).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Nothing: it runs to `max_tokens`.
    None,
    /// `Context::stop` after `at` items.
    Stop(u32),
    /// `Context::kill` after `at` items.
    Kill(u32),
    /// The stream is dropped after `at` items.
    Drop(u32),
    /// The engine fails at step `at`.
    Error(u32),
    /// The engine hangs at step `at`.
    Hang(u32),
    /// The engine's stream panics at step `at`.
    Panic(u32),
}

impl Action {
    /// The kind's name (`none`, `stop`, ...).
    pub fn kind(self) -> &'static str {
        match self {
            Action::None => "none",
            Action::Stop(_) => "stop",
            Action::Kill(_) => "kill",
            Action::Drop(_) => "drop",
            Action::Error(_) => "error",
            Action::Hang(_) => "hang",
            Action::Panic(_) => "panic",
        }
    }

    /// The engine fault to request through an annotation, if any.
    pub fn chaos(self) -> Option<Chaos> {
        match self {
            Action::Error(k) => Some(Chaos::Error(k)),
            Action::Hang(k) => Some(Chaos::Hang(k)),
            Action::Panic(k) => Some(Chaos::Panic(k)),
            _ => None,
        }
    }

    /// After how many received items the client acts, for client actions.
    pub fn client_at(self) -> Option<u32> {
        match self {
            Action::Stop(j) | Action::Kill(j) | Action::Drop(j) => Some(j),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::None => f.write_str("none"),
            Action::Stop(k)
            | Action::Kill(k)
            | Action::Drop(k)
            | Action::Error(k)
            | Action::Hang(k)
            | Action::Panic(k) => write!(f, "{}@{k}", self.kind()),
        }
    }
}

/// Where a hang may be placed, given the timeouts that will catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HangRange {
    /// First step (0 needs a first-token timeout).
    pub from: u32,
    /// One past the last step.
    pub to: u32,
}

/// One request of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Prompt length in tokens.
    pub prompt_len: u32,
    /// What happens to it.
    pub action: Action,
}

/// How many requests of each kind a plan holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlanCounts {
    /// Untouched requests.
    pub none: u64,
    /// Stopped by the client.
    pub stop: u64,
    /// Killed by the client.
    pub kill: u64,
    /// Dropped by the client.
    pub drop: u64,
    /// Engine errors.
    pub error: u64,
    /// Engine hangs.
    pub hang: u64,
    /// Engine panics.
    pub panic: u64,
}

impl PlanCounts {
    fn add(&mut self, action: Action) {
        let slot = match action {
            Action::None => &mut self.none,
            Action::Stop(_) => &mut self.stop,
            Action::Kill(_) => &mut self.kill,
            Action::Drop(_) => &mut self.drop,
            Action::Error(_) => &mut self.error,
            Action::Hang(_) => &mut self.hang,
            Action::Panic(_) => &mut self.panic,
        };
        *slot += 1;
    }
}

/// The plan for request number `index`: a function of the seed and the index only.
pub fn plan_one(
    seed: u64,
    index: usize,
    rates: &ChaosRates,
    max_tokens: u32,
    prompt: (u32, u32),
    hang: Option<HangRange>,
) -> Planned {
    let mut rng = SplitMix::new(seed ^ (index as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    let (lo, hi) = (prompt.0.min(prompt.1), prompt.0.max(prompt.1));
    let prompt_len = lo + rng.below(u64::from(hi - lo) + 1) as u32;
    let u = rng.unit();
    let mut acc = 0.0;
    let mut kind = "none";
    for (name, rate) in rates.named() {
        acc += rate;
        if u < acc {
            kind = name;
            break;
        }
    }
    let n = u64::from(max_tokens);
    // Client actions land after 0..=n items: up to just before the terminal.
    let client = |rng: &mut SplitMix| rng.below(n + 1) as u32;
    let action = match kind {
        "stop" => Action::Stop(client(&mut rng)),
        "kill" => Action::Kill(client(&mut rng)),
        "drop" => Action::Drop(client(&mut rng)),
        // Engine faults strike at a step the request reaches (none when it has none).
        "error" if n > 0 => Action::Error(rng.below(n) as u32),
        "panic" if n > 0 => Action::Panic(rng.below(n) as u32),
        "hang" => match hang {
            Some(r) if r.to > r.from => {
                Action::Hang(r.from + rng.below(u64::from(r.to - r.from)) as u32)
            }
            _ => Action::None,
        },
        _ => Action::None,
    };
    Planned { prompt_len, action }
}

/// The whole plan and its counts.
pub fn plan_all(
    seed: u64,
    requests: usize,
    rates: &ChaosRates,
    max_tokens: u32,
    prompt: (u32, u32),
    hang: Option<HangRange>,
) -> (Vec<Planned>, PlanCounts) {
    let mut counts = PlanCounts::default();
    let plan: Vec<Planned> = (0..requests)
        .map(|i| {
            let p = plan_one(seed, i, rates, max_tokens, prompt, hang);
            counts.add(p.action);
            p
        })
        .collect();
    (plan, counts)
}

/// How many engine aborts `action` calls for, in `mode`, for a request that produces
/// `max_tokens` tokens. `None` where it depends on a race the plan cannot know (none
/// today: a decode-mode drop before the first token defers the abort, and the drained
/// engine's first token or the deadline sends it, as for a stop or a kill).
pub fn expected_aborts(action: Action, mode: Mode, max_tokens: u32) -> Option<u32> {
    let decode = mode == Mode::Decode;
    Some(match action {
        Action::None | Action::Error(_) | Action::Panic(_) => 0,
        // A decode-mode cancellation before the first token waits for it; with no
        // token at all the deferred abort is discarded when the engine ends.
        Action::Stop(0) | Action::Kill(0) | Action::Drop(0) if decode && max_tokens == 0 => 0,
        Action::Stop(_) | Action::Kill(_) | Action::Drop(_) | Action::Hang(_) => 1,
    })
}

/// splitmix64, for the plan.
#[derive(Clone, Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` when `n == 0`).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_a_function_of_the_seed() {
        let r = ChaosRates::default();
        let a = plan_all(42, 500, &r, 16, (8, 64), None);
        let b = plan_all(42, 500, &r, 16, (8, 64), None);
        let c = plan_all(43, 500, &r, 16, (8, 64), None);
        assert_eq!(a, b);
        assert_ne!(a.0, c.0);
    }

    #[test]
    fn rates_are_roughly_honoured() {
        let r = ChaosRates {
            stop: 0.2,
            kill: 0.1,
            ..ChaosRates::NONE
        };
        let (_, counts) = plan_all(1, 10_000, &r, 16, (8, 8), None);
        assert!((1800..2200).contains(&counts.stop), "{counts:?}");
        assert!((800..1200).contains(&counts.kill), "{counts:?}");
        assert_eq!(counts.drop + counts.error + counts.hang + counts.panic, 0);
    }

    #[test]
    fn steps_stay_in_range() {
        let r = ChaosRates {
            stop: 0.2,
            kill: 0.2,
            drop: 0.2,
            error: 0.1,
            hang: 0.1,
            panic: 0.1,
        };
        let hang = Some(HangRange { from: 1, to: 16 });
        let (plan, counts) = plan_all(7, 5000, &r, 16, (3, 9), hang);
        assert!(counts.hang > 0);
        for p in plan {
            assert!((3..=9).contains(&p.prompt_len));
            match p.action {
                Action::Stop(j) | Action::Kill(j) | Action::Drop(j) => assert!(j <= 16),
                Action::Error(k) | Action::Panic(k) => assert!(k < 16),
                Action::Hang(k) => assert!((1..16).contains(&k)),
                Action::None => {}
            }
        }
        // Without a place for hangs, a hang becomes nothing.
        let (_, counts) = plan_all(7, 5000, &r, 16, (3, 9), None);
        assert_eq!(counts.hang, 0);
    }
}
