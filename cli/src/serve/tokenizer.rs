//! Text ↔ token ids for `tether serve`: [`Tokenizer`], the engine's vocabulary, and
//! [`TextDecoder`], which turns a stream of ids back into text without ever splitting
//! a UTF-8 sequence.
//!
//! - SimEngine and TinyEngine are served with a byte-level vocabulary, so nothing is
//!   downloaded: a text's UTF-8 bytes are its token ids (`0..=255`), and a chat is
//!   rendered with a fixed template ([`render_chat`]).
//! - `--engine llama-cpp` (the `llama-cpp` feature) uses the GGUF model's own
//!   vocabulary (`Tokenizer::gguf`): llama.cpp's tokenizer, each token's bytes as
//!   output, and the GGUF's `tokenizer.chat_template` rendered with minijinja (with
//!   `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, Hugging Face's
//!   block trimming, Python's string methods, and `raise_exception`).
//!
//! Owns text ↔ token conversion only; nothing here knows about HTTP or engines.

use std::fmt;

/// Token ids of this tokenizer are the byte values `0..=255`.
pub const VOCAB_SIZE: u32 = 256;

/// The text's UTF-8 bytes, one token id per byte.
pub fn encode(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Turns a stream of token ids back into text, chunk by chunk. A UTF-8 sequence split
/// across chunks is held back until it is complete; bytes that can never be valid
/// UTF-8 and ids above 255 become U+FFFD.
#[derive(Clone, Debug, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// A decoder with nothing held back.
    pub fn new() -> Utf8Decoder {
        Utf8Decoder::default()
    }

    /// The text `bytes` complete (possibly empty while a sequence is incomplete).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        self.drain_valid(&mut out);
        out
    }

    /// The text the ids complete (possibly empty while a sequence is incomplete).
    pub fn push(&mut self, ids: &[u32]) -> String {
        let mut out = String::new();
        for &id in ids {
            match u8::try_from(id) {
                Ok(byte) => self.pending.push(byte),
                Err(_) => {
                    // An id outside the byte range: whatever was pending cannot be
                    // completed by it.
                    self.flush_into(&mut out);
                    out.push(char::REPLACEMENT_CHARACTER);
                }
            }
        }
        self.drain_valid(&mut out);
        out
    }

    /// The end of the stream: whatever is still held back, lossily.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        self.flush_into(&mut out);
        out
    }

    fn flush_into(&mut self, out: &mut String) {
        self.drain_valid(out);
        if !self.pending.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
        }
    }

    /// Move every complete sequence (valid, or definitely invalid) from `pending` to
    /// `out`, keeping only an incomplete sequence at the end.
    fn drain_valid(&mut self, out: &mut String) {
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(text) => {
                    out.push_str(text);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // The bytes up to `valid` were just checked to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + bad;
                        }
                        None => {
                            // An incomplete sequence at the end: wait for more bytes.
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
    }
}

/// The engine's vocabulary, as `tether serve` uses it (cheap to clone).
#[derive(Clone, Default)]
pub struct Tokenizer {
    kind: Kind,
}

#[derive(Clone, Default)]
enum Kind {
    /// Byte tokens (SimEngine, TinyEngine).
    #[default]
    Bytes,
    /// A GGUF model's vocabulary and chat template.
    #[cfg(feature = "llama-cpp")]
    Gguf(std::sync::Arc<gguf::Gguf>),
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Bytes => f.write_str("Tokenizer::Bytes"),
            #[cfg(feature = "llama-cpp")]
            Kind::Gguf(g) => f
                .debug_tuple("Tokenizer::Gguf")
                .field(&g.tokenizer)
                .finish(),
        }
    }
}

impl Tokenizer {
    /// Byte tokens: a text's UTF-8 bytes.
    pub fn bytes() -> Tokenizer {
        Tokenizer::default()
    }

    /// A GGUF model's vocabulary and chat template. An error when the template does
    /// not compile (the message says where).
    #[cfg(feature = "llama-cpp")]
    pub fn gguf(tokenizer: tether_engines::LlamaTokenizer) -> Result<Tokenizer, String> {
        Ok(Tokenizer {
            kind: Kind::Gguf(std::sync::Arc::new(gguf::Gguf::new(tokenizer)?)),
        })
    }

    /// Token ids are `0..vocab_size`.
    pub fn vocab_size(&self) -> u32 {
        match &self.kind {
            Kind::Bytes => VOCAB_SIZE,
            #[cfg(feature = "llama-cpp")]
            Kind::Gguf(g) => g.tokenizer.n_vocab(),
        }
    }

    /// What a token id must be, for an error message.
    pub fn id_range(&self) -> String {
        match &self.kind {
            Kind::Bytes => "a byte token (0..=255)".to_owned(),
            #[cfg(feature = "llama-cpp")]
            Kind::Gguf(g) => format!(
                "a token of the model's vocabulary (0..{})",
                g.tokenizer.n_vocab()
            ),
        }
    }

    /// A prompt's token ids (a GGUF model's BOS first when it asks for one).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match &self.kind {
            Kind::Bytes => encode(text),
            #[cfg(feature = "llama-cpp")]
            Kind::Gguf(g) => g.tokenizer.encode(text, g.tokenizer.adds_bos()),
        }
    }

    /// A conversation's prompt, rendered by the chat template and encoded. An error
    /// (for the client) when the template refuses the conversation or the model has
    /// no template.
    pub fn chat(&self, messages: &[Message]) -> Result<Vec<u32>, String> {
        match &self.kind {
            Kind::Bytes => Ok(encode(&render_chat(messages))),
            #[cfg(feature = "llama-cpp")]
            Kind::Gguf(g) => g.chat(messages),
        }
    }

    /// A decoder for one response's token ids.
    pub fn decoder(&self) -> TextDecoder {
        TextDecoder {
            tokenizer: self.clone(),
            bytes: Utf8Decoder::new(),
        }
    }
}

/// Turns one response's token ids into text, chunk by chunk, holding back a UTF-8
/// sequence split across tokens until it is complete.
#[derive(Clone, Debug)]
pub struct TextDecoder {
    tokenizer: Tokenizer,
    bytes: Utf8Decoder,
}

impl TextDecoder {
    /// The text `ids` complete.
    pub fn push(&mut self, ids: &[u32]) -> String {
        match &self.tokenizer.kind {
            Kind::Bytes => self.bytes.push(ids),
            #[cfg(feature = "llama-cpp")]
            Kind::Gguf(g) => {
                let mut out = String::new();
                for &id in ids {
                    out.push_str(&self.bytes.push_bytes(g.tokenizer.piece(id)));
                }
                out
            }
        }
    }

    /// The end of the response: whatever is still held back, lossily.
    pub fn finish(&mut self) -> String {
        self.bytes.finish()
    }
}

#[cfg(feature = "llama-cpp")]
mod gguf;

/// One message of a conversation, already validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message's text.
    pub content: String,
}

/// Render a conversation with the chat template:
///
/// ```text
/// <|system|>\n{content}\n<|user|>\n{content}\n ... <|assistant|>\n
/// ```
///
/// Each message becomes `<|{role}|>` and its content on lines of their own; the
/// prompt ends with `<|assistant|>` and a newline, where the reply begins.
pub fn render_chat(messages: &[Message]) -> String {
    let mut prompt = String::new();
    for m in messages {
        prompt.push_str("<|");
        prompt.push_str(&m.role);
        prompt.push_str("|>\n");
        prompt.push_str(&m.content);
        prompt.push('\n');
    }
    prompt.push_str("<|assistant|>\n");
    prompt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_through_bytes() {
        let text = "héllo, wörld ✓ 🦀";
        let ids = encode(text);
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&id| id < VOCAB_SIZE));
        let mut d = Utf8Decoder::new();
        assert_eq!(d.push(&ids) + &d.finish(), text);
    }

    #[test]
    fn a_sequence_split_across_chunks_is_held_back() {
        let ids = encode("a🦀b");
        let mut d = Utf8Decoder::new();
        let mut out = Vec::new();
        for id in ids {
            out.push(d.push(&[id]));
        }
        assert_eq!(out, ["a", "", "", "", "🦀", "b"]);
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn invalid_bytes_and_ids_become_replacement_characters() {
        let mut d = Utf8Decoder::new();
        assert_eq!(d.push(&[0x61, 0xff, 0x62]), "a\u{fffd}b");
        assert_eq!(d.push(&[0xe2, 0x9c]), "");
        // An id out of range ends the pending sequence.
        assert_eq!(d.push(&[300]), "\u{fffd}\u{fffd}");
        assert_eq!(d.push(&[0xe2]), "");
        assert_eq!(d.finish(), "\u{fffd}");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn chat_template() {
        let m = |role: &str, content: &str| Message {
            role: role.to_owned(),
            content: content.to_owned(),
        };
        assert_eq!(
            render_chat(&[m("system", "be brief"), m("user", "hi")]),
            "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
        );
        assert_eq!(render_chat(&[]), "<|assistant|>\n");
    }
}
