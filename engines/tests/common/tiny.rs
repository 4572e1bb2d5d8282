//! What the TinyEngine tests share: a smaller model than the default and what it
//! answers to `b"tether"`.

use std::sync::Arc;

use tether_core::LlmEngine;
use tether_engines::tiny::{TinyConfig, TinyEngine};

use super::Rt;

/// `b"tether"` as byte tokens.
pub const TETHER: [u32; 6] = [116, 101, 116, 104, 101, 114];

/// What [`config`]'s model answers to `b"tether"`, greedily, 16 tokens.
pub const TETHER_SEED0: [u32; 16] = [
    73, 130, 209, 102, 131, 35, 72, 95, 36, 73, 35, 90, 75, 54, 253, 75,
];

/// A smaller model than the default (tests run unoptimized): same code paths, a
/// sixteenth of the compute. The long context keeps a `max_tokens = 10_000` request
/// running for thousands of steps: the scheduler may run dozens of steps between two
/// polls of a test (tokio polls up to 61 tasks between two polls of the main future).
pub fn config() -> TinyConfig {
    TinyConfig {
        d_model: 32,
        heads: 2,
        d_ff: 128,
        max_context: 4096,
        ..TinyConfig::default()
    }
}

pub async fn started(cfg: TinyConfig, rt: Rt) -> Arc<TinyEngine> {
    let engine = Arc::new(TinyEngine::new(cfg, rt));
    engine.start(7).await.unwrap();
    engine
}
