//! Helpers for the plain bench binaries (`cancel_latency`, `in_flight_memory`): the
//! `--test` smoke flag, nearest-rank percentiles, and where the figures are written
//! (`target/tether-bench/<name>.json`, read by `benches/summarize.py`).

use std::path::PathBuf;
use std::time::Duration;

/// Whether the binary was run as a smoke test (`cargo bench -- --test`): run a
/// handful of iterations and write no figures. Other arguments (criterion's
/// `--bench`, filters, `--warm-up-time`) are ignored.
pub fn smoke_mode() -> bool {
    std::env::args().any(|a| a == "--test")
}

/// Nearest-rank percentile of sorted `samples` (`idx = round((n-1)*q)`).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Where the plain benches write their figures: `$CARGO_TARGET_DIR/tether-bench`, or
/// the workspace's `target/tether-bench`.
pub fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest.parent().unwrap_or(manifest).join("target")
        },
        PathBuf::from,
    );
    target.join("tether-bench")
}

/// Write `json` to `out_dir()/<name>.json`; a failure is printed, not fatal.
pub fn write_json(name: &str, json: &str) {
    let dir = out_dir();
    let path = dir.join(format!("{name}.json"));
    let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, json));
    match written {
        Ok(()) => println!("wrote {}", path.display()),
        Err(err) => eprintln!("could not write {}: {err}", path.display()),
    }
}
