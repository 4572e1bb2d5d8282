//! A writer of GGUF files (format version 3: typed metadata, then `f32` tensors), and
//! [`TinyLlama`]: a llama-architecture model with seeded random weights and a small
//! byte-level BPE vocabulary with real merges, written by the tests and benches of the
//! `llama-cpp` engine so that nothing is downloaded.
//!
//! Owns: the file layout (header, metadata, tensor infos, aligned tensor data) and the
//! tiny model's shapes, vocabulary and chat template. Must not touch: llama.cpp itself;
//! this module is plain Rust and builds without it.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;

/// Tensor data is aligned to this many bytes (GGUF's default `general.alignment`).
const ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`.
    Str(String),
    /// `ARRAY` of `STRING`.
    Strs(Vec<String>),
    /// `ARRAY` of `INT32`.
    I32s(Vec<i32>),
}

impl Value {
    /// The GGUF type code.
    fn code(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Strs(_) | Value::I32s(_) => 9,
        }
    }
}

/// What a writer refuses: a tensor whose data does not fill its shape, or a name used
/// twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    /// `data` holds `got` values where the shape needs `want`.
    #[error("tensor {name}: {got} values for a shape of {want}")]
    Shape {
        /// The tensor.
        name: String,
        /// Values the shape needs.
        want: u64,
        /// Values given.
        got: u64,
    },
    /// A metadata key or tensor name given twice.
    #[error("{0} is given twice")]
    Duplicate(String),
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    data: Vec<f32>,
}

/// A GGUF file being put together: metadata and `f32` tensors, written in the order
/// given.
#[derive(Default)]
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

impl fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufWriter")
            .field("metadata", &self.kv.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Add the metadata `key` = `value`.
    pub fn kv(&mut self, key: &str, value: Value) -> Result<&mut Self, GgufError> {
        if self.kv.iter().any(|(k, _)| k == key) {
            return Err(GgufError::Duplicate(key.to_owned()));
        }
        self.kv.push((key.to_owned(), value));
        Ok(self)
    }

    /// Add an `f32` tensor of shape `dims` (GGUF order: `dims[0]` varies fastest).
    pub fn tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        data: Vec<f32>,
    ) -> Result<&mut Self, GgufError> {
        let want = dims.iter().product::<u64>();
        let got = data.len() as u64;
        if want != got {
            return Err(GgufError::Shape {
                name: name.to_owned(),
                want,
                got,
            });
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::Duplicate(name.to_owned()));
        }
        self.tensors.push(Tensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            data,
        });
        Ok(self)
    }

    /// The file, written to `out`.
    pub fn write_to(&self, out: impl Write) -> io::Result<()> {
        let mut w = Counting { out, written: 0 };
        w.all(b"GGUF")?;
        w.u32(3)?;
        w.u64(self.tensors.len() as u64)?;
        w.u64(self.kv.len() as u64)?;
        for (key, value) in &self.kv {
            w.str(key)?;
            w.u32(value.code())?;
            w.value(value)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            w.str(&t.name)?;
            w.u32(t.dims.len() as u32)?;
            for &d in &t.dims {
                w.u64(d)?;
            }
            w.u32(0)?; // GGML_TYPE_F32
            w.u64(offset)?;
            offset = aligned(offset + 4 * t.data.len() as u64);
        }
        w.pad()?;
        for t in &self.tensors {
            for v in &t.data {
                w.all(&v.to_le_bytes())?;
            }
            w.pad()?;
        }
        Ok(())
    }

    /// The file, written to `path`.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let file = std::fs::File::create(path)?;
        let mut out = io::BufWriter::new(file);
        self.write_to(&mut out)?;
        out.flush()
    }
}

fn aligned(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// A writer that knows how far it got (for the alignment padding).
struct Counting<W> {
    out: W,
    written: u64,
}

impl<W: Write> Counting<W> {
    fn all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }
    fn u32(&mut self, v: u32) -> io::Result<()> {
        self.all(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> io::Result<()> {
        self.all(&v.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> io::Result<()> {
        self.u64(s.len() as u64)?;
        self.all(s.as_bytes())
    }
    fn value(&mut self, value: &Value) -> io::Result<()> {
        match value {
            Value::U32(v) => self.u32(*v),
            Value::I32(v) => self.all(&v.to_le_bytes()),
            Value::F32(v) => self.all(&v.to_le_bytes()),
            Value::Bool(v) => self.all(&[u8::from(*v)]),
            Value::Str(s) => self.str(s),
            Value::Strs(all) => {
                self.u32(8)?;
                self.u64(all.len() as u64)?;
                all.iter().try_for_each(|s| self.str(s))
            }
            Value::I32s(all) => {
                self.u32(5)?;
                self.u64(all.len() as u64)?;
                all.iter().try_for_each(|v| self.all(&v.to_le_bytes()))
            }
        }
    }
    fn pad(&mut self) -> io::Result<()> {
        let to = aligned(self.written);
        let zeros = [0u8; ALIGNMENT as usize];
        self.all(&zeros[..(to - self.written) as usize])
    }
}

/// GPT-2's byte-level alphabet: each byte as a printable character, so that every
/// token of a byte-level BPE vocabulary is a plain string.
pub fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    // The others, in byte order, from U+0100 on.
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(0x100 + rank).expect("below U+0200")
}

/// The byte-level spelling of `text` (what a BPE token's string holds).
pub fn byte_spelling(text: &[u8]) -> String {
    text.iter().map(|&b| byte_char(b)).collect()
}

/// The text the tiny vocabulary's merges are learned from.
const CORPUS: &str = "the quick brown fox jumps over the lazy dog. hello world, hello there! \
    tether owns the life of a request: pending, first token, cancelled, terminal. \
    the stream ends with exactly one terminal, and the abort is sent once.";

/// The chat template of the tiny model (a ChatML-like Jinja template).
pub const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A llama-architecture model with seeded random weights and a small byte-level BPE
/// vocabulary: the 256 bytes, `merges` merges learned from a fixed English text, and
/// four control tokens (`<|bos|>`, `<|eos|>`, `<|im_start|>`, `<|im_end|>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TinyLlama {
    /// Width of the residual stream.
    pub n_embd: u32,
    /// Transformer blocks.
    pub n_layer: u32,
    /// Attention heads.
    pub n_head: u32,
    /// Key/value heads (grouped-query attention when fewer than `n_head`).
    pub n_head_kv: u32,
    /// Width of the feed-forward layer.
    pub n_ff: u32,
    /// Context length the model declares.
    pub n_ctx: u32,
    /// BPE merges to learn (at most as many as the text allows).
    pub merges: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for TinyLlama {
    /// A model of a few hundred kilobytes that decodes in well under a millisecond.
    fn default() -> Self {
        TinyLlama {
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_ctx: 512,
            merges: 64,
            seed: 7,
        }
    }
}

/// The tiny model's vocabulary: token strings, their types, and the merges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocab {
    /// Token strings, by id.
    pub tokens: Vec<String>,
    /// llama.cpp token types, by id (1 normal, 3 control).
    pub types: Vec<i32>,
    /// Merges, `"left right"`, in priority order.
    pub merges: Vec<String>,
    /// Id of `<|bos|>`.
    pub bos: u32,
    /// Id of `<|eos|>`.
    pub eos: u32,
}

impl TinyLlama {
    /// The vocabulary: bytes first, then the learned merges' tokens, then the control
    /// tokens.
    pub fn vocab(&self) -> Vocab {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
        let mut merges = Vec::new();
        // Learn merges on the corpus, word by word (the pre-tokenizer splits on spaces
        // and punctuation; a word keeps its leading space, as GPT-2's does).
        let mut words: Vec<Vec<String>> = words(CORPUS)
            .map(|w| {
                byte_spelling(w.as_bytes())
                    .chars()
                    .map(String::from)
                    .collect()
            })
            .collect();
        while merges.len() < self.merges {
            let mut counts: Vec<((String, String), usize)> = Vec::new();
            for w in &words {
                for pair in w.windows(2) {
                    let key = (pair[0].clone(), pair[1].clone());
                    match counts.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, n)) => *n += 1,
                        None => counts.push((key, 1)),
                    }
                }
            }
            // The most frequent pair; the first seen wins a tie (deterministic).
            let Some(((left, right), _)) =
                counts
                    .into_iter()
                    .fold(
                        None,
                        |best: Option<((String, String), usize)>, (k, n)| match best {
                            Some((_, m)) if m >= n => best,
                            _ => Some((k, n)),
                        },
                    )
            else {
                break;
            };
            let joined = format!("{left}{right}");
            for w in &mut words {
                let mut i = 0;
                while i + 1 < w.len() {
                    if w[i] == left && w[i + 1] == right {
                        w[i] = joined.clone();
                        w.remove(i + 1);
                    }
                    i += 1;
                }
            }
            merges.push(format!("{left} {right}"));
            tokens.push(joined);
        }
        let mut types = vec![1; tokens.len()];
        let bos = tokens.len() as u32;
        for special in ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"] {
            tokens.push(special.to_owned());
            types.push(3);
        }
        Vocab {
            tokens,
            types,
            merges,
            bos,
            eos: bos + 1,
        }
    }

    /// The model, ready to write.
    pub fn gguf(&self) -> Result<GgufWriter, GgufError> {
        let vocab = self.vocab();
        let n_vocab = vocab.tokens.len() as u64;
        let (e, ff) = (u64::from(self.n_embd), u64::from(self.n_ff));
        let e_kv = e / u64::from(self.n_head) * u64::from(self.n_head_kv);
        let mut g = GgufWriter::new();
        g.kv("general.architecture", Value::Str("llama".into()))?
            .kv("general.name", Value::Str("tether-tiny-llama".into()))?
            .kv("general.alignment", Value::U32(ALIGNMENT as u32))?
            .kv("llama.context_length", Value::U32(self.n_ctx))?
            .kv("llama.embedding_length", Value::U32(self.n_embd))?
            .kv("llama.block_count", Value::U32(self.n_layer))?
            .kv("llama.feed_forward_length", Value::U32(self.n_ff))?
            .kv("llama.attention.head_count", Value::U32(self.n_head))?
            .kv("llama.attention.head_count_kv", Value::U32(self.n_head_kv))?
            .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))?
            .kv(
                "llama.rope.dimension_count",
                Value::U32(self.n_embd / self.n_head),
            )?
            .kv("llama.vocab_size", Value::U32(n_vocab as u32))?
            .kv("tokenizer.ggml.model", Value::Str("gpt2".into()))?
            .kv("tokenizer.ggml.pre", Value::Str("default".into()))?
            .kv("tokenizer.ggml.tokens", Value::Strs(vocab.tokens.clone()))?
            .kv(
                "tokenizer.ggml.token_type",
                Value::I32s(vocab.types.clone()),
            )?
            .kv("tokenizer.ggml.merges", Value::Strs(vocab.merges.clone()))?
            .kv("tokenizer.ggml.bos_token_id", Value::U32(vocab.bos))?
            .kv("tokenizer.ggml.eos_token_id", Value::U32(vocab.eos))?
            .kv("tokenizer.ggml.add_bos_token", Value::Bool(false))?
            .kv(
                "tokenizer.chat_template",
                Value::Str(TINY_CHAT_TEMPLATE.into()),
            )?;
        let mut rng = SplitMix(self.seed);
        let mut random =
            |n: u64, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.uniform() * scale).collect() };
        let ones = |n: u64| vec![1.0f32; n as usize];
        g.tensor("token_embd.weight", &[e, n_vocab], random(e * n_vocab, 0.5))?;
        g.tensor("output_norm.weight", &[e], ones(e))?;
        g.tensor("output.weight", &[e, n_vocab], random(e * n_vocab, 0.5))?;
        for i in 0..self.n_layer {
            let name = |part: &str| format!("blk.{i}.{part}.weight");
            g.tensor(&name("attn_norm"), &[e], ones(e))?;
            g.tensor(&name("attn_q"), &[e, e], random(e * e, 0.2))?;
            g.tensor(&name("attn_k"), &[e, e_kv], random(e * e_kv, 0.2))?;
            g.tensor(&name("attn_v"), &[e, e_kv], random(e * e_kv, 0.2))?;
            g.tensor(&name("attn_output"), &[e, e], random(e * e, 0.2))?;
            g.tensor(&name("ffn_norm"), &[e], ones(e))?;
            g.tensor(&name("ffn_gate"), &[e, ff], random(e * ff, 0.2))?;
            g.tensor(&name("ffn_up"), &[e, ff], random(e * ff, 0.2))?;
            g.tensor(&name("ffn_down"), &[ff, e], random(ff * e, 0.2))?;
        }
        Ok(g)
    }

    /// Write the model to `path`.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        self.gguf().map_err(io::Error::other)?.write(path)
    }
}

/// The corpus's words as GPT-2's pre-tokenizer roughly cuts them: a word keeps the one
/// space before it; punctuation stands alone.
fn words(text: &str) -> impl Iterator<Item = &str> {
    let mut cuts = vec![0];
    let bytes = text.as_bytes();
    for i in 1..bytes.len() {
        let (prev, cur) = (bytes[i - 1], bytes[i]);
        // A space or punctuation starts a word, and so does whatever follows punctuation.
        let starts = cur == b' ' || cur.is_ascii_punctuation() || prev.is_ascii_punctuation();
        if starts {
            cuts.push(i);
        }
    }
    cuts.push(bytes.len());
    let ends = cuts.clone().into_iter().skip(1);
    cuts.into_iter().zip(ends).map(move |(a, b)| &text[a..b])
}

/// A small seeded generator (SplitMix64): weights that are the same on every machine.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_spell_as_gpt2_does() {
        assert_eq!(byte_char(b'a'), 'a');
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        assert_eq!(byte_char(0), 'Ā');
        // The unprintable bytes in order from U+0100: 0..=32, 127..=160, then 0xAD.
        assert_eq!(byte_char(0xA0), 'ł');
        assert_eq!(byte_char(0xAD), 'Ń');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(all.len(), 256, "one character per byte");
    }

    #[test]
    fn the_vocabulary_learns_real_merges() {
        let vocab = TinyLlama::default().vocab();
        assert_eq!(vocab.merges.len(), 64);
        assert_eq!(vocab.tokens.len(), 256 + 64 + 4);
        // The corpus's most frequent pairs are "h e" and "Ġ t" (9 times each): the
        // first seen wins the tie. Every merge's halves are tokens already.
        assert_eq!(vocab.merges[0], "h e");
        assert_eq!(vocab.merges[1], "Ġ t");
        for (i, m) in vocab.merges.iter().enumerate() {
            let (l, r) = m.split_once(' ').expect("two halves");
            let known = &vocab.tokens[..256 + i];
            assert!(
                known.iter().any(|t| t == l) && known.iter().any(|t| t == r),
                "{m}"
            );
            assert_eq!(vocab.tokens[256 + i], format!("{l}{r}"));
        }
        assert_eq!(vocab.tokens[vocab.bos as usize], "<|bos|>");
        assert_eq!(vocab.tokens[vocab.eos as usize], "<|eos|>");
        assert_eq!(vocab.types[vocab.eos as usize], 3);
    }

    #[test]
    fn the_file_is_laid_out_as_gguf_v3() {
        let mut g = GgufWriter::new();
        g.kv("a", Value::U32(7)).unwrap();
        g.tensor("t", &[3], vec![1.0, 2.0, 3.0]).unwrap();
        let mut bytes = Vec::new();
        g.write_to(&mut bytes).unwrap();
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        assert_eq!(
            u64::from_le_bytes(bytes[8..16].try_into().unwrap()),
            1,
            "tensors"
        );
        assert_eq!(
            u64::from_le_bytes(bytes[16..24].try_into().unwrap()),
            1,
            "metadata"
        );
        // Header 24, key 8+1, type 4, value 4; tensor info 8+1, dims 4+8, type 4,
        // offset 8: 74 bytes, padded to 96; then 12 bytes of data, padded to 32.
        assert_eq!(bytes.len(), 96 + 32);
        assert_eq!(&bytes[96..100], &1.0f32.to_le_bytes());
        assert_eq!(&bytes[104..108], &3.0f32.to_le_bytes());
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let mut g = GgufWriter::new();
        assert_eq!(
            g.tensor("t", &[2, 2], vec![0.0; 3]).err(),
            Some(GgufError::Shape {
                name: "t".into(),
                want: 4,
                got: 3
            })
        );
        g.kv("k", Value::Bool(true)).unwrap();
        assert_eq!(
            g.kv("k", Value::Bool(false)).err(),
            Some(GgufError::Duplicate("k".into()))
        );
    }

    #[test]
    fn the_same_seed_writes_the_same_file() {
        let write = |seed| {
            let mut bytes = Vec::new();
            let model = TinyLlama {
                seed,
                ..TinyLlama::default()
            };
            model.gguf().unwrap().write_to(&mut bytes).unwrap();
            bytes
        };
        assert_eq!(write(1), write(1));
        assert_ne!(write(1), write(2));
    }
}
