//! Write a llama-architecture GGUF model with random weights and the tiny BPE
//! vocabulary (`tether_engines::gguf::TinyLlama`), to try `--engine llama-cpp` without
//! downloading anything:
//!
//! ```text
//! cargo run --release -p tether-engines --example write_gguf -- /tmp/tiny.gguf
//! cargo run --release -p tether-engines --example write_gguf -- /tmp/big.gguf \
//!     --n-embd 1024 --n-layer 8 --n-head 16 --n-head-kv 4 --n-ff 2816
//! ```
//!
//! Flags (each optional, defaults are `TinyLlama::default()`'s): `--n-embd`,
//! `--n-layer`, `--n-head`, `--n-head-kv`, `--n-ff`, `--n-ctx`, `--seed`.

use std::process::ExitCode;

use tether_engines::gguf::TinyLlama;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: write_gguf PATH [--n-embd N] [--n-layer N] [--n-head N] [--n-head-kv N] [--n-ff N] [--n-ctx N] [--seed N]");
        return ExitCode::from(2);
    };
    let mut model = TinyLlama::default();
    while let Some(flag) = args.next() {
        let Some(value) = args.next().and_then(|v| v.parse::<u64>().ok()) else {
            eprintln!("write_gguf: {flag} needs a number");
            return ExitCode::from(2);
        };
        let small = u32::try_from(value).unwrap_or(u32::MAX);
        match flag.as_str() {
            "--n-embd" => model.n_embd = small,
            "--n-layer" => model.n_layer = small,
            "--n-head" => model.n_head = small,
            "--n-head-kv" => model.n_head_kv = small,
            "--n-ff" => model.n_ff = small,
            "--n-ctx" => model.n_ctx = small,
            "--seed" => model.seed = value,
            other => {
                eprintln!("write_gguf: unknown flag {other}");
                return ExitCode::from(2);
            }
        }
    }
    match model.write(std::path::Path::new(&path)) {
        Ok(()) => {
            println!("wrote {path}: {model:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("write_gguf: {e}");
            ExitCode::FAILURE
        }
    }
}
