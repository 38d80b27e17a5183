//! Training data: JSONL prompts (or a built-in dataset) with their other columns, a seeded epoch sampler whose
//! state checkpoints as two numbers, and prompt rendering with left truncation.
//!
//! One JSONL reader serves both `safe train` and `safe generate --input`, so both report bad lines the same way.

pub mod arithmetic;
pub mod copy;
pub mod lines;
pub mod prompt;
pub mod sampler;

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::recipe::{BuiltinData, DataSettings, DataSource};

pub use prompt::{encode_prompt, render, TruncationCounter};
pub use sampler::{Sampler, SamplerState};

/// A prompt as users write it (defined beside the chat messages it may hold; rendered in [`prompt`]).
pub use crate::model::chat::Prompt;

/// One row: its position in the source, its prompt, and every other column (rewards read e.g. `answer`).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// 0-based position among the examples (blank lines are not counted).
    pub index: usize,
    pub prompt: Prompt,
    pub columns: Map<String, Value>,
}

/// A non-empty list of examples.
#[derive(Debug, Clone)]
pub struct Dataset {
    examples: Vec<Example>,
    /// The JSONL file and each example's 1-based line in it, for messages about a row; `None` for built-in data.
    origin: Option<(std::path::PathBuf, Vec<usize>)>,
}

impl Dataset {
    /// The dataset `settings` names: a JSONL file read with `settings.prompt_field`, or a built-in one.
    pub fn load(settings: &DataSettings) -> Result<Self> {
        match &settings.source {
            DataSource::Jsonl(path) => Self::from_jsonl(path, &settings.prompt_field),
            DataSource::Builtin(BuiltinData::Arithmetic) => Ok(arithmetic::dataset()),
            DataSource::Builtin(BuiltinData::Copy) => Ok(copy::dataset()),
        }
    }

    /// Read a JSONL file, one object per line (blank lines skipped). Every error names the file and line.
    pub fn from_jsonl(path: &Path, prompt_field: &str) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut examples = Vec::new();
        let mut line_numbers = Vec::new();
        for line in lines::bounded_lines(file, lines::MAX_LINE_BYTES) {
            let (n, line) = line.with_context(|| format!("{}: cannot read it", path.display()))?;
            let at = || format!("{}:{n}", path.display());
            if line.trim().is_empty() {
                continue;
            }
            let row = parse_row(&line, prompt_field).with_context(at)?;
            examples.push(Example { index: examples.len(), prompt: row.0, columns: row.1 });
            line_numbers.push(n);
        }
        if examples.is_empty() {
            bail!("{} has no examples (it is empty or only blank lines)", path.display());
        }
        Ok(Self { examples, origin: Some((path.to_path_buf(), line_numbers)) })
    }

    /// Examples built in code (tests, built-in datasets). Indices are renumbered to positions so `get(i).index == i`.
    pub fn from_examples(mut examples: Vec<Example>) -> Result<Self> {
        if examples.is_empty() {
            bail!("a dataset needs at least one example");
        }
        for (i, e) in examples.iter_mut().enumerate() {
            e.index = i;
        }
        Ok(Self { examples, origin: None })
    }

    /// The examples whose position `keep` accepts, renumbered; each keeps its file line for messages.
    pub fn subset(&self, keep: impl Fn(usize) -> bool) -> Result<Self> {
        let picked: Vec<usize> = (0..self.examples.len()).filter(|&i| keep(i)).collect();
        if picked.is_empty() {
            bail!("a dataset needs at least one example");
        }
        let examples =
            picked.iter().enumerate().map(|(n, &i)| Example { index: n, ..self.examples[i].clone() }).collect();
        let origin =
            self.origin.as_ref().map(|(path, lines)| (path.clone(), picked.iter().map(|&i| lines[i]).collect()));
        Ok(Self { examples, origin })
    }

    /// The first `n` prompts rendered (`chat`: through the chat template) and tokenised, left-truncated to
    /// `max_prompt_tokens` (each cut counted in `truncation`): (text, ids) per example. A prompt that tokenises to
    /// nothing is an error naming its row.
    pub fn encode_prompts(
        &self,
        n: usize,
        tokenizer: &crate::model::Tokenizer,
        chat: bool,
        max_prompt_tokens: usize,
        truncation: &mut TruncationCounter,
    ) -> Result<Vec<(String, Vec<u32>)>> {
        self.examples[..n.min(self.examples.len())]
            .iter()
            .map(|e| {
                let text = render(e, tokenizer, chat)?;
                let (ids, cut) = encode_prompt(&text, tokenizer, max_prompt_tokens)?;
                truncation.record(cut);
                if ids.is_empty() {
                    bail!("{}: the prompt is empty after tokenisation", self.location(e.index));
                }
                Ok((text, ids))
            })
            .collect()
    }

    /// Where example `i` comes from, for messages: `data.jsonl:7`, or `example 7` for built-in data.
    pub fn location(&self, i: usize) -> String {
        match &self.origin {
            Some((path, lines)) => format!("{}:{}", path.display(), lines[i]),
            None => format!("example {i}"),
        }
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Always false (a dataset is never empty); here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Example> {
        self.examples.get(i)
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }
}

/// One JSONL line into (prompt, other columns); errors say what is wrong, the caller adds file and line.
fn parse_row(line: &str, prompt_field: &str) -> Result<(Prompt, Map<String, Value>)> {
    let v: Value = serde_json::from_str(line).context("not valid JSON")?;
    let Value::Object(mut columns) = v else {
        bail!("not a JSON object (each line must be {{\"{prompt_field}\": ...}})")
    };
    let p = columns.remove(prompt_field).with_context(|| format!("no `{prompt_field}` field"))?;
    let bad = || format!("`{prompt_field}` must be a string or a non-empty list of {{role, content}} messages");
    // serde's own message for an untagged enum ("did not match any variant") adds nothing: drop it.
    let prompt: Prompt = serde_json::from_value(p).map_err(|_| anyhow::anyhow!(bad()))?;
    if matches!(&prompt, Prompt::Messages(m) if m.is_empty()) {
        bail!(bad());
    }
    Ok((prompt, columns))
}
