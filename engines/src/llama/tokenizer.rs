//! [`LlamaTokenizer`]: a GGUF model's own vocabulary, for a server that takes text:
//! text to token ids with llama.cpp's tokenizer, each id's bytes (read once, at load),
//! and what the model's chat template needs (the template, the BOS and EOS texts).

use std::fmt;
use std::sync::Arc;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

/// A GGUF model's vocabulary (cheap to clone).
#[derive(Clone)]
pub struct LlamaTokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    model: Arc<LlamaModel>,
    /// Each id's bytes as output text (control tokens: none).
    pieces: Vec<Box<[u8]>>,
    end_of_generation: Vec<u32>,
    chat_template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    add_bos: bool,
}

impl fmt::Debug for LlamaTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlamaTokenizer")
            .field("n_vocab", &self.n_vocab())
            .field("bos", &self.inner.bos)
            .field("eos", &self.inner.eos)
            .field("has_chat_template", &self.inner.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl LlamaTokenizer {
    pub(crate) fn new(model: Arc<LlamaModel>) -> LlamaTokenizer {
        let (pieces, end_of_generation, bos, eos, add_bos) = Self::read(&model);
        let chat_template = model.meta_val_str("tokenizer.chat_template").ok();
        LlamaTokenizer {
            inner: Arc::new(Inner {
                model,
                pieces,
                end_of_generation,
                chat_template,
                bos,
                eos,
                add_bos,
            }),
        }
    }

    /// Each id's piece, the end-of-generation ids, the BOS and EOS texts, and whether
    /// a prompt starts with BOS.
    #[allow(clippy::type_complexity)]
    fn read(
        model: &LlamaModel,
    ) -> (
        Vec<Box<[u8]>>,
        Vec<u32>,
        Option<String>,
        Option<String>,
        bool,
    ) {
        let vocab = model.vocab();
        let n = u32::try_from(model.n_vocab()).unwrap_or(0);
        let mut pieces = Vec::with_capacity(n as usize);
        let mut end_of_generation = Vec::new();
        for id in 0..n {
            #[allow(clippy::cast_possible_wrap)] // below n_vocab, an i32
            let token = LlamaToken(id as i32);
            pieces.push(vocab.token_to_piece(token, false, None).into_boxed_slice());
            if vocab.is_eog(token) {
                end_of_generation.push(id);
            }
        }
        let text = |token: LlamaToken| {
            (token.0 >= 0 && (token.0 as u32) < n).then(|| {
                String::from_utf8_lossy(&vocab.token_to_piece(token, true, None)).into_owned()
            })
        };
        let bos = text(vocab.bos());
        let eos = text(vocab.eos());
        (pieces, end_of_generation, bos, eos, vocab.should_add_bos())
    }

    /// Token ids are `0..n_vocab`.
    pub fn n_vocab(&self) -> u32 {
        u32::try_from(self.inner.pieces.len()).unwrap_or(u32::MAX)
    }

    /// `text` as token ids, by llama.cpp's tokenizer: special tokens written in the
    /// text (such as a chat template's `<|im_start|>`) are read as themselves, and the
    /// model's BOS is put first when `add_special` and the model asks for one.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        self.inner
            .model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .filter_map(|LlamaToken(t)| u32::try_from(t).ok())
            .collect()
    }

    /// The bytes token `id` adds to the output text (none for a control token or an id
    /// outside the vocabulary). A character may span several tokens' bytes.
    pub fn piece(&self, id: u32) -> &[u8] {
        self.inner.pieces.get(id as usize).map_or(&[], |p| p)
    }

    /// The model's end-of-generation tokens (EOS, EOT and the like).
    pub fn end_of_generation(&self) -> &[u32] {
        &self.inner.end_of_generation
    }

    /// The GGUF's `tokenizer.chat_template` (a Jinja template), if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }

    /// The BOS token's text, if the model has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos.as_deref()
    }

    /// The EOS token's text, if the model has one.
    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos.as_deref()
    }

    /// Whether the model wants a BOS token before a prompt.
    pub fn adds_bos(&self) -> bool {
        self.inner.add_bos
    }
}
