//! Prompt rendering and tokenisation, with truncation on the left: the end of a prompt (the question, the
//! generation prompt of a chat template) is what the completion depends on, so that is what is kept.

use anyhow::Result;

use super::{Example, Prompt};
use crate::model::tokenizer::{ChatMessage, Tokenizer};

impl Prompt {
    /// The text the model sees. Message lists always go through the chat template; text does when `chat` is true
    /// (as one user message), and is used as is otherwise. The template's generation prompt is always added.
    pub fn render(&self, tokenizer: &Tokenizer, chat: bool) -> Result<String> {
        match self {
            Prompt::Text(t) if !chat => Ok(t.clone()),
            Prompt::Text(t) => tokenizer.apply_chat_template(&[ChatMessage::new("user", t.as_str())], true),
            Prompt::Messages(m) => tokenizer.apply_chat_template(m, true),
        }
    }
}

/// [`Prompt::render`] of an example's prompt.
pub fn render(example: &Example, tokenizer: &Tokenizer, chat: bool) -> Result<String> {
    example.prompt.render(tokenizer, chat)
}

/// Token ids of `text`, keeping at most `max_prompt_tokens` of them from the end; `true` when some were cut.
/// Special tokens the tokenizer itself puts in front (a Llama BOS: what it encodes the empty string to) stay in
/// front: models expect them, and losing them would change every logit. A BOS written by a chat template is text
/// like any other and may be cut.
pub fn encode_prompt(text: &str, tokenizer: &Tokenizer, max_prompt_tokens: usize) -> Result<(Vec<u32>, bool)> {
    let ids = tokenizer.encode(text)?;
    if ids.len() <= max_prompt_tokens {
        return Ok((ids, false));
    }
    let mut prefix = tokenizer.encode("")?;
    if !ids.starts_with(&prefix) || prefix.len() >= max_prompt_tokens {
        prefix.clear();
    }
    let tail = max_prompt_tokens - prefix.len();
    prefix.extend_from_slice(&ids[ids.len() - tail..]);
    Ok((prefix, true))
}

/// Counts prompts seen and truncated, so the caller can log one warning (e.g. per logged step or at the end)
/// instead of one per prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TruncationCounter {
    pub seen: u64,
    pub truncated: u64,
}

impl TruncationCounter {
    pub fn record(&mut self, truncated: bool) {
        self.seen += 1;
        self.truncated += truncated as u64;
    }

    /// Render, encode and count one example.
    pub fn encode(
        &mut self,
        example: &Example,
        tokenizer: &Tokenizer,
        chat: bool,
        max_prompt_tokens: usize,
    ) -> Result<Vec<u32>> {
        let (ids, truncated) = encode_prompt(&render(example, tokenizer, chat)?, tokenizer, max_prompt_tokens)?;
        self.record(truncated);
        Ok(ids)
    }

    /// The warning to log, if any prompt was truncated.
    pub fn warning(&self, max_prompt_tokens: usize) -> Option<String> {
        (self.truncated > 0).then(|| {
            format!(
                "{} of {} prompts were longer than data.max_prompt_tokens = {max_prompt_tokens} and were truncated \
                 on the left",
                self.truncated, self.seen
            )
        })
    }
}
