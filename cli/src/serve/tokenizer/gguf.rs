//! A GGUF model's vocabulary and its chat template, rendered with minijinja the way
//! Hugging Face renders it (`trim_blocks`, `lstrip_blocks`, Python's string methods,
//! `raise_exception`): llama.cpp's own template function only knows the templates
//! built into it.

use minijinja::{context, Environment, Error, ErrorKind, Value};
use tether_engines::LlamaTokenizer;

use super::Message;

/// The vocabulary, and the compiled template if the model has one.
pub(super) struct Gguf {
    pub(super) tokenizer: LlamaTokenizer,
    template: Option<Environment<'static>>,
}

const NAME: &str = "tokenizer.chat_template";

impl Gguf {
    pub(super) fn new(tokenizer: LlamaTokenizer) -> Result<Gguf, String> {
        let template = match tokenizer.chat_template() {
            None => None,
            Some(source) => {
                let mut env = Environment::new();
                env.set_trim_blocks(true);
                env.set_lstrip_blocks(true);
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function("raise_exception", raise_exception);
                env.add_template_owned(NAME, source.to_owned())
                    .map_err(|e| format!("the model's chat template does not compile: {e:#}"))?;
                Some(env)
            }
        };
        Ok(Gguf {
            tokenizer,
            template,
        })
    }

    /// Render `messages` and encode the prompt: BOS first when the model asks for one
    /// and the template did not write it.
    pub(super) fn chat(&self, messages: &[Message]) -> Result<Vec<u32>, String> {
        let text = self.render(messages)?;
        let bos = self.tokenizer.bos_token().unwrap_or("");
        let add_bos = self.tokenizer.adds_bos() && (bos.is_empty() || !text.starts_with(bos));
        Ok(self.tokenizer.encode(&text, add_bos))
    }

    fn render(&self, messages: &[Message]) -> Result<String, String> {
        let Some(env) = &self.template else {
            return Err(
                "the model has no chat template (tokenizer.chat_template): use /v1/completions"
                    .to_owned(),
            );
        };
        let template = env
            .get_template(NAME)
            .map_err(|e| format!("the model's chat template: {e}"))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| context! { role => m.role, content => m.content })
            .collect();
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.tokenizer.bos_token().unwrap_or(""),
                eos_token => self.tokenizer.eos_token().unwrap_or(""),
            })
            .map_err(|e| match e.kind() {
                // The template's own refusal (a role order it does not take): its text.
                ErrorKind::InvalidOperation => e.detail().unwrap_or("refused").to_owned(),
                _ => format!("the model's chat template failed: {e}"),
            })
    }
}

/// `raise_exception(message)`, as Hugging Face templates call it to refuse a
/// conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}
