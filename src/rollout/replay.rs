//! Replayed rollouts (`rollout.source = "file"`): train on recorded completions instead of sampling, so a step is
//! reproducible and comparable with another trainer fed the same inputs.
//!
//! The file is JSONL, one completion per line, `rollout.num_generations` consecutive lines per prompt (a group).
//! Each line has:
//! - the prompt: `prompt_ids` (used verbatim), or `prompt` as text (used verbatim: the text the model saw, chat
//!   template already applied, as `safe generate --format jsonl` writes it) or as {role, content} messages (rendered
//!   with the chat template);
//! - the completion: `completion_ids` (or `token_ids`, `safe generate`'s name) verbatim, or `completion` text
//!   (tokenised without special tokens);
//! - optionally `finish_reason` (`eos`, `stop`, `length`): for text completions the default is `eos`, which appends
//!   the tokenizer's EOS id; for ids it is read off the last id (an EOS id → `eos`, else `length`);
//! - optionally `reward` (a number, or null for "no reward"): when every line has one, these are the rewards and the
//!   recipe's `[[reward]]`s are not scored; when no line has one, the rewards are scored as for sampled rollouts;
//! - optionally `old_logprobs`: one finite number per completion token, the sampling policy's log-probs at the
//!   recipe's temperature; on every line or none. The update takes them as its old log-probs (the ratio's
//!   denominator), so a recorded off-policy batch replays exactly;
//! - any other field: a data column the rewards see (e.g. `answer`).
//!
//! Step k (1-based) trains on the groups `(k − 1)·P .. k·P` (P = `rollout.prompts_per_step`), wrapping around the
//! file, so the position in the file is a function of the step and resuming needs no extra state.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::{FinishReason, Rollouts, Sample};
use crate::data::{encode_prompt, Prompt, TruncationCounter};
use crate::model::Tokenizer;

/// A replay file, checked and tokenised.
#[derive(Debug)]
pub struct Replay {
    /// `groups × G` samples, group-major.
    samples: Vec<Sample>,
    group_size: usize,
    /// One per sample when the file carries rewards.
    rewards: Option<Vec<Option<f64>>>,
    /// The file, and each sample's 1-based line in it, for messages about a row.
    path: std::path::PathBuf,
    lines: Vec<usize>,
}

impl Replay {
    /// Read and check the whole file up front: every problem names the file and line, before any training.
    pub fn load(
        path: &Path,
        tokenizer: &Tokenizer,
        group_size: usize,
        max_prompt_tokens: usize,
        max_new_tokens: usize,
        truncation: &mut TruncationCounter,
    ) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut samples: Vec<Sample> = Vec::new();
        let mut rewards: Vec<Option<f64>> = Vec::new();
        let mut with_reward = Vec::new();
        let mut with_old = Vec::new();
        let mut first_line_of_group = 0;
        for line in crate::data::lines::bounded_lines(file, crate::data::lines::MAX_LINE_BYTES) {
            let (n, line) = line.with_context(|| format!("{}: cannot read it", path.display()))?;
            let i = n - 1;
            let at = format!("{}:{n}", path.display());
            if line.trim().is_empty() {
                continue;
            }
            let n = samples.len();
            let (sample, reward) = parse_line(&line, tokenizer, max_prompt_tokens, n, group_size, truncation)
                .with_context(|| at.clone())?;
            if sample.completion_ids.len() > max_new_tokens {
                bail!(
                    "{at}: the completion has {} tokens, more than rollout.max_new_tokens = {max_new_tokens} (the \
                     memory plan and the dr_grpo normaliser use it): raise rollout.max_new_tokens",
                    sample.completion_ids.len()
                );
            }
            if n.is_multiple_of(group_size) {
                first_line_of_group = i + 1;
            } else if sample.prompt_ids != samples[n - n % group_size].prompt_ids {
                let s = &samples[n - n % group_size];
                bail!(
                    "{at}: the prompt differs from the one on line {first_line_of_group}, the first of its group: a \
                     replay file holds rollout.num_generations = {group_size} consecutive completions per prompt \
                     (group starts with {:?})",
                    s.prompt_text.chars().take(60).collect::<String>()
                );
            }
            with_reward.push((i + 1, reward.is_some()));
            with_old.push((i + 1, sample.old_logprobs.is_some()));
            rewards.push(reward.flatten());
            samples.push(sample);
        }
        if samples.is_empty() {
            bail!("{} has no rollouts (it is empty or only blank lines)", path.display());
        }
        if !samples.len().is_multiple_of(group_size) {
            bail!(
                "{} has {} rollouts, not a multiple of rollout.num_generations = {group_size} (one group of \
                 completions per prompt)",
                path.display(),
                samples.len()
            );
        }
        let has = with_reward.iter().filter(|(_, r)| *r).count();
        if has != 0 && has != with_reward.len() {
            let (l, _) = with_reward.iter().find(|(_, r)| !*r).unwrap();
            bail!(
                "{}:{l}: no `reward`, but other lines have one: give a reward on every line (null for none) or on none",
                path.display()
            );
        }
        let has_old = with_old.iter().filter(|(_, o)| *o).count();
        if has_old != 0 && has_old != with_old.len() {
            let (l, _) = with_old.iter().find(|(_, o)| !*o).unwrap();
            bail!(
                "{}:{l}: no `old_logprobs`, but other lines have them: give them on every line or on none",
                path.display()
            );
        }
        let lines = with_reward.iter().map(|(l, _)| *l).collect();
        Ok(Self { samples, group_size, rewards: (has > 0).then_some(rewards), path: path.to_path_buf(), lines })
    }

    /// Every sample's data columns with where it is (`rollouts.jsonl:7`), for the up-front check against rewards.
    pub fn rows(&self) -> impl Iterator<Item = (String, &serde_json::Map<String, serde_json::Value>)> {
        self.samples.iter().zip(&self.lines).map(|(s, l)| (format!("{}:{l}", self.path.display()), &s.columns))
    }

    /// Number of groups (prompts) in the file.
    pub fn groups(&self) -> usize {
        self.samples.len() / self.group_size
    }

    /// Whether the file carries the sampling policy's log-probs (`old_logprobs`).
    pub fn has_old_logprobs(&self) -> bool {
        self.samples.first().is_some_and(|s| s.old_logprobs.is_some())
    }

    /// Whether the file carries the rewards (else the recipe's rewards score the samples).
    pub fn has_rewards(&self) -> bool {
        self.rewards.is_some()
    }

    /// The samples (and rewards, if recorded) of step `step` (1-based): `prompts` groups, wrapping around.
    pub fn batch(&self, step: u64, prompts: usize) -> Rollouts {
        let groups = self.groups() as u64;
        let g = self.group_size;
        let mut out = Vec::with_capacity(prompts * g);
        let mut rewards = self.rewards.as_ref().map(|_| Vec::with_capacity(prompts * g));
        for k in 0..prompts as u64 {
            let group = ((step.saturating_sub(1) * prompts as u64 + k) % groups) as usize;
            out.extend_from_slice(&self.samples[group * g..(group + 1) * g]);
            if let (Some(all), Some(r)) = (&self.rewards, rewards.as_mut()) {
                r.extend_from_slice(&all[group * g..(group + 1) * g]);
            }
        }
        Rollouts { samples: out, rewards }
    }
}

/// One line in a replay file's format (prompt and completion as text or ids), read on its own, untruncated:
/// `safe logprobs` reads its input with it.
pub fn parse_rollout_line(line: &str, tokenizer: &Tokenizer) -> Result<Sample> {
    let mut truncation = TruncationCounter::default();
    Ok(parse_line(line, tokenizer, usize::MAX, 0, 1, &mut truncation)?.0)
}

/// Fields with a meaning in a replay line; every other field is a data column.
const FIELDS: [&str; 8] =
    ["prompt", "prompt_ids", "completion", "completion_ids", "token_ids", "finish_reason", "reward", "old_logprobs"];

/// One line into a sample and its reward (`None`: no `reward` field; `Some(None)`: `"reward": null`).
fn parse_line(
    line: &str,
    tok: &Tokenizer,
    max_prompt_tokens: usize,
    n: usize,
    group_size: usize,
    truncation: &mut TruncationCounter,
) -> Result<(Sample, Option<Option<f64>>)> {
    let v: Value = serde_json::from_str(line).context("not valid JSON")?;
    let Value::Object(mut obj) = v else { bail!("not a JSON object") };
    let ids = |obj: &Map<String, Value>, key: &str| -> Result<Option<Vec<u32>>> {
        let Some(v) = obj.get(key) else { return Ok(None) };
        let bad =
            || format!("`{key}` must be a list of token ids (integers below the vocabulary size {})", tok.vocab_size());
        let list = v.as_array().with_context(bad)?;
        let ids = list
            .iter()
            .map(|x| x.as_u64().filter(|&i| (i as usize) < tok.vocab_size()).map(|i| i as u32))
            .collect::<Option<Vec<u32>>>()
            .with_context(bad)?;
        Ok(Some(ids))
    };
    // The prompt.
    let prompt_ids = ids(&obj, "prompt_ids")?;
    let prompt: Option<Prompt> = match obj.get("prompt") {
        None => None,
        Some(p) => Some(
            serde_json::from_value(p.clone())
                .ok()
                .filter(|p: &Prompt| !matches!(p, Prompt::Messages(m) if m.is_empty()))
                .context("`prompt` must be a string or a non-empty list of {role, content} messages")?,
        ),
    };
    let (prompt_text, prompt_ids) = match (&prompt, prompt_ids) {
        (_, Some(ids)) if ids.is_empty() => bail!("`prompt_ids` is empty"),
        (Some(p), Some(ids)) => (p.render(tok, false)?, ids),
        (None, Some(ids)) => (tok.decode(&ids, false)?, ids),
        (Some(p), None) => {
            let text = p.render(tok, false)?;
            let (ids, cut) = encode_prompt(&text, tok, max_prompt_tokens)?;
            truncation.record(cut);
            if ids.is_empty() {
                bail!("`prompt` is empty after tokenisation");
            }
            (text, ids)
        }
        (None, None) => bail!("no `prompt` or `prompt_ids` field"),
    };
    let prompt = prompt.unwrap_or_else(|| Prompt::Text(prompt_text.clone()));
    // The completion.
    let finish = match obj.get("finish_reason") {
        None => None,
        Some(Value::String(s)) if s == "eos" => Some(FinishReason::Eos),
        Some(Value::String(s)) if s == "stop" => Some(FinishReason::Stop),
        Some(Value::String(s)) if s == "length" => Some(FinishReason::Length),
        Some(_) => bail!("`finish_reason` must be \"eos\", \"stop\" or \"length\""),
    };
    let given_ids = match ids(&obj, "completion_ids")? {
        Some(ids) => Some(ids),
        None => ids(&obj, "token_ids")?,
    };
    let (completion_ids, finish) = match (given_ids, obj.get("completion")) {
        (Some(ids), _) => {
            let ends_eos = ids.last().is_some_and(|l| tok.eos_ids().contains(l));
            let finish = finish.unwrap_or(if ends_eos { FinishReason::Eos } else { FinishReason::Length });
            (ids, finish)
        }
        (None, Some(Value::String(text))) => {
            let mut ids = tok.encode_plain(text)?;
            let finish = finish.unwrap_or(FinishReason::Eos);
            if finish == FinishReason::Eos && !ids.last().is_some_and(|l| tok.eos_ids().contains(l)) {
                let eos =
                    tok.eos_ids().first().copied().context("finish_reason eos, but the tokenizer has no EOS id")?;
                ids.push(eos);
            }
            (ids, finish)
        }
        (None, Some(_)) => bail!("`completion` must be a string"),
        (None, None) => bail!("no `completion`, `completion_ids` or `token_ids` field"),
    };
    if completion_ids.is_empty() {
        bail!("the completion is empty (no tokens to train on)");
    }
    let completion_text = tok.decode(&completion_ids, true)?;
    let reward = match obj.get("reward") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => {
            Some(Some(v.as_f64().filter(|x| x.is_finite()).context("`reward` must be a finite number or null")?))
        }
    };
    let old_logprobs = match obj.get("old_logprobs") {
        None => None,
        Some(v) => {
            let n = completion_ids.len();
            let bad = || format!("`old_logprobs` must be a list of {n} finite numbers (one per completion token)");
            let list = v.as_array().with_context(bad)?;
            let values = list
                .iter()
                .map(|x| x.as_f64().filter(|x| x.is_finite() && *x <= 0.0).map(|x| x as f32))
                .collect::<Option<Vec<f32>>>()
                .with_context(|| format!("{}; log-probs are ≤ 0", bad()))?;
            if values.len() != n {
                bail!(
                    "`old_logprobs` has {} values, the completion {n} tokens: one per completion token",
                    values.len()
                );
            }
            Some(values)
        }
    };
    for f in FIELDS {
        obj.remove(f);
    }
    let sample = Sample {
        prompt_index: n / group_size,
        sample_index: n % group_size,
        prompt,
        prompt_text,
        prompt_ids,
        completion_text,
        completion_ids,
        finish,
        columns: obj,
        sampling_logprobs: None,
        old_logprobs,
    };
    Ok((sample, reward))
}
