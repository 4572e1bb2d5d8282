//! llama.cpp reads the model `TinyLlama` writes: its shapes, its vocabulary and merges
//! (llama.cpp's own BPE tokenizer finds the learned tokens), its chat template, and a
//! seeded greedy decode that repeats exactly. What the `llama-cpp` engine's tests stand
//! on, with nothing downloaded.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tether_engines::gguf::{TinyLlama, TINY_CHAT_TEMPLATE};

/// The model in a fresh directory (removed when the guard drops).
struct Written {
    dir: std::path::PathBuf,
}

impl Written {
    fn new(model: &TinyLlama, name: &str) -> Written {
        let dir = std::env::temp_dir().join(format!("tether-gguf-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        model
            .write(&dir.join("model.gguf"))
            .expect("the model is written");
        Written { dir }
    }
    fn path(&self) -> std::path::PathBuf {
        self.dir.join("model.gguf")
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` tokens decoded greedily after `prompt`, one sequence.
fn greedy(model: &LlamaModel, backend: &LlamaBackend, prompt: &[LlamaToken], n: usize) -> Vec<i32> {
    let params = LlamaContextParams::default().with_n_ctx(NonZeroU32::new(256));
    let mut ctx = model.new_context(backend, params).expect("a context");
    let mut batch = LlamaBatch::new(256, 1);
    for (i, &t) in prompt.iter().enumerate() {
        batch
            .add(t, i as i32, &[0], i + 1 == prompt.len())
            .expect("room in the batch");
    }
    ctx.decode(&mut batch).expect("the prompt decodes");
    let mut sampler = LlamaSampler::greedy();
    let mut out = Vec::new();
    let mut last = batch.n_tokens() - 1;
    for pos in prompt.len()..prompt.len() + n {
        let t = sampler.sample(&ctx, last);
        out.push(t.0);
        batch.clear();
        batch
            .add(t, pos as i32, &[0], true)
            .expect("room in the batch");
        ctx.decode(&mut batch).expect("a step decodes");
        last = 0;
    }
    out
}

#[test]
fn llama_cpp_reads_the_tiny_model() {
    let spec = TinyLlama::default();
    let written = Written::new(&spec, "reads");
    let vocab = spec.vocab();
    let backend = LlamaBackend::init().expect("the backend starts once");
    let model = LlamaModel::load_from_file(&backend, written.path(), &LlamaModelParams::default())
        .expect("llama.cpp loads the model");
    assert_eq!(model.n_vocab() as usize, vocab.tokens.len());
    assert_eq!(
        (model.n_layer(), model.n_head(), model.n_head_kv()),
        (2, 4, 2)
    );
    assert_eq!(model.n_embd(), 64);
    let lv = model.vocab();
    assert_eq!(
        (lv.bos().0, lv.eos().0),
        (vocab.bos as i32, vocab.eos as i32)
    );
    assert!(lv.is_eog(lv.eos()));
    assert_eq!(
        model
            .meta_val_str("tokenizer.chat_template")
            .expect("the template"),
        TINY_CHAT_TEMPLATE
    );

    // llama.cpp's BPE uses the learned merges: "hello" is "he" + "ll" + "o", each the
    // id this vocabulary gave it.
    let id = |s: &str| vocab.tokens.iter().position(|t| t == s).expect(s) as i32;
    let hello: Vec<i32> = lv
        .tokenize(b"hello", false, false)
        .iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(hello, vec![id("he"), id("ll"), id("o")]);
    // Every byte round-trips, multi-byte UTF-8 included.
    let text = "the stream ends: naïve 日本";
    let tokens = lv.tokenize(text.as_bytes(), false, false);
    let bytes: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| lv.token_to_piece(t, false, None))
        .collect();
    assert_eq!(String::from_utf8(bytes).expect("whole UTF-8"), text);

    // Seeded weights, greedy sampling: the same tokens every time, all in the vocabulary.
    let prompt = lv.tokenize(b"hello world", false, false);
    let first = greedy(&model, &backend, &prompt, 12);
    let again = greedy(&model, &backend, &prompt, 12);
    assert_eq!(first, again);
    assert!(first.iter().all(|&t| (0..model.n_vocab()).contains(&t)));
}
