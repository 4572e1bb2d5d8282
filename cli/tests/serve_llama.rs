//! `tether serve` over a GGUF model with llama.cpp (the `llama-cpp` feature), on a model
//! the test writes itself (`TinyLlama`: random weights, a real BPE vocabulary and a
//! ChatML-like chat template): the model's own tokenizer and template, incremental
//! detokenization that never splits a character, stop strings on the text, sampling
//! parameters honoured, and a client that goes away aborting the engine exactly once.
//! Real loopback HTTP, so real time; every wait is bounded.

#[path = "serve_support/mod.rs"]
mod serve_support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use tether_cli::engine::Engine;
use tether_cli::serve::{ServeConfig, ServedEngine, Server, Tokenizer};
use tether_engines::gguf::TinyLlama;
use tether_engines::llama::{LlamaCppConfig, LlamaCppEngine};

use serve_support::{eventually, serve_engine, sse_data, SseReader};

const LIMIT: Duration = Duration::from_secs(20);

fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tether-serve-llama-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny-chat.gguf");
        TinyLlama::default().write(&path).unwrap();
        path
    })
    .clone()
}

fn engine() -> LlamaCppEngine {
    LlamaCppEngine::load(LlamaCppConfig {
        n_ctx: 512,
        max_sequences: 4,
        batch_tokens: 64,
        default_max_tokens: 16,
        threads: Some(std::num::NonZeroUsize::MIN),
        ..LlamaCppConfig::new(model_path())
    })
    .unwrap()
}

struct Served {
    server: Server,
    base: String,
    engine: Arc<LlamaCppEngine>,
    aborts: Arc<AtomicUsize>,
    client: reqwest::Client,
}

async fn serve() -> Served {
    let aborts = Arc::new(AtomicUsize::new(0));
    let counted = aborts.clone();
    // Whatever the abort found: the adapter drops the engine's stream (which frees
    // the sequence) before its abort task runs, so it usually finds it gone.
    let engine = Arc::new(engine().with_abort_hook(Arc::new(move |_, _| {
        counted.fetch_add(1, Ordering::SeqCst);
    })));
    let served = ServedEngine::of(Engine::LlamaCpp(engine.clone())).unwrap();
    let server = serve_engine(served, ServeConfig::default()).await;
    let base = format!("http://{}", server.local_addr());
    Served {
        server,
        base,
        engine,
        aborts,
        client: reqwest::Client::new(),
    }
}

impl Served {
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (
            status,
            serde_json::from_str(&resp.text().await.unwrap()).unwrap(),
        )
    }

    async fn idle(&self) {
        let engine = self.engine.clone();
        assert!(
            eventually(LIMIT, move || {
                let g = engine.gauges();
                g.live_sequences == 0 && g.kv_sequences == 0 && g.kv_cells == 0
            })
            .await,
            "{:?}",
            self.engine.gauges()
        );
    }
}

/// What the model says greedily, detokenized piece by piece the way the server does.
fn text_of(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    let mut d = tokenizer.decoder();
    let mut text = d.push(ids);
    text.push_str(&d.finish());
    text
}

#[tokio::test]
async fn chat_renders_the_models_template_and_answers_in_its_vocabulary() {
    let t = serve().await;
    // The template's prompt, as /tokenize tells it.
    let (status, body) = t
        .post(
            "/tokenize",
            &json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi there"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let tok = t.engine.tokenizer();
    let expected = tok.encode(
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
        false,
    );
    assert_eq!(body["tokens"], json!(expected));
    assert_eq!(expected[0], 322, "<|im_start|> is one control token");

    let chat = json!({
        "model": "tiny-chat", "max_tokens": 12, "ignore_eos": true,
        "messages": [{"role": "user", "content": "hi there"}],
    });
    let (status, unary) = t.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{unary}");
    assert_eq!(unary["usage"]["prompt_tokens"], json!(expected.len()));
    assert_eq!(unary["usage"]["completion_tokens"], json!(12));
    let text = unary["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    // The same request streamed gives the same text, in pieces.
    let mut stream_body = chat.clone();
    stream_body["stream"] = json!(true);
    let resp = t
        .client
        .post(format!("{}/v1/chat/completions", t.base))
        .header("content-type", "application/json")
        .body(stream_body.to_string())
        .send()
        .await
        .unwrap();
    let events = sse_data(&resp.text().await.unwrap());
    let streamed: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, text);
    t.idle().await;
    assert_eq!(t.aborts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_character_split_across_tokens_is_never_split_in_the_text() {
    let tok = Tokenizer::gguf(engine().tokenizer().clone()).unwrap();
    let t = engine();
    // "é" and "🦀" are not in the 64 merges: each is two and four byte tokens.
    let ids = t.tokenizer().encode("aé🦀", false);
    assert_eq!(ids.len(), 1 + 2 + 4, "{ids:?}");
    let mut d = tok.decoder();
    let pieces: Vec<String> = ids.iter().map(|&id| d.push(&[id])).collect();
    assert_eq!(pieces, ["a", "", "é", "", "", "", "🦀"]);
    assert_eq!(d.finish(), "");
    assert_eq!(text_of(&tok, &ids), "aé🦀");
    // Control tokens add no text.
    assert_eq!(text_of(&tok, &[322, 104]), "h");
}

#[tokio::test]
async fn stop_strings_end_the_text_with_stop() {
    let t = serve().await;
    let body = |stop: Value| {
        json!({
            "model": "tiny-chat", "prompt": "the tether", "max_tokens": 24,
            "ignore_eos": true, "stop": stop,
        })
    };
    let (status, full) = t.post("/v1/completions", &body(json!(null))).await;
    assert_eq!(status, 200, "{full}");
    let text = full["choices"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    // A stop string from the middle of what the model says (at a character boundary).
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "{text:?}");
    let stop: String = chars[4..6].iter().collect();
    let cut = text.find(&stop).unwrap();
    let (status, stopped) = t.post("/v1/completions", &body(json!([stop]))).await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["choices"][0]["text"], json!(text[..cut]));
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    t.idle().await;
    // The early finish stopped the engine: one abort, for the stopped request.
    assert_eq!(t.aborts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn sampling_parameters_are_honoured_and_a_seed_repeats() {
    let t = serve().await;
    let body = |seed: u64, penalty: f64| {
        json!({
            "model": "tiny-chat", "prompt": "the tether", "max_tokens": 16,
            "ignore_eos": true, "temperature": 1.2, "top_p": 0.9, "top_k": 50,
            "seed": seed, "presence_penalty": 0.5, "frequency_penalty": 0.5,
            "repetition_penalty": penalty,
        })
    };
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_owned();
    let (status, a) = t.post("/v1/completions", &body(1, 1.1)).await;
    assert_eq!(status, 200, "{a}");
    let (_, again) = t.post("/v1/completions", &body(1, 1.1)).await;
    assert_eq!(text(&again), text(&a));
    let (_, other) = t.post("/v1/completions", &body(2, 1.1)).await;
    assert_ne!(text(&other), text(&a));
    let (status, bad) = t.post("/v1/completions", &body(1, 0.0)).await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"]["param"], "repetition_penalty");
    t.idle().await;
}

#[tokio::test]
async fn token_ids_outside_the_vocabulary_are_refused() {
    let t = serve().await;
    let (status, body) = t
        .post(
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": [1, 2, 324], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "prompt[2]");
    assert_eq!(
        body["error"]["message"],
        "token id 324 is not a token of the model's vocabulary (0..324)"
    );
    let (status, ok) = t
        .post(
            "/v1/completions",
            &json!({"model": "tiny-chat", "prompt": [1, 2, 323], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{ok}");
}

#[tokio::test]
async fn a_client_that_goes_away_aborts_the_engine_once() {
    let t = serve().await;
    let resp = t
        .client
        .post(format!("{}/v1/completions", t.base))
        .header("content-type", "application/json")
        .body(
            json!({
                "model": "tiny-chat", "prompt": "the tether", "max_tokens": 400,
                "ignore_eos": true, "stream": true,
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(resp);
    assert!(reader.next().await.is_some(), "a first event");
    drop(reader);
    let aborts = t.aborts.clone();
    assert!(eventually(LIMIT, move || aborts.load(Ordering::SeqCst) == 1).await);
    t.idle().await;
    assert!(t.engine.gauges().tokens_emitted < 400);
    // Once the server has shut down, nothing is left that could abort again.
    t.server.shutdown();
    t.server.wait().await;
    assert_eq!(t.aborts.load(Ordering::SeqCst), 1, "exactly once");
}
