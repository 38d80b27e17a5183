//! Reference rewards for PAR and the other relative shaping kinds (algorithms.md §2.2): for each prompt, the frozen
//! starting policy samples `shaping.max_refs` completions once, the recipe's rewards score them, and the scores
//! (after the ceiling and length penalty, like the policy's) are kept for the rest of the run, in the checkpoint.
//! Their random streams are keyed by (run.seed, prompt), so they do not depend on the step that first needed them;
//! keeping them in the checkpoint makes resume exact even where batched generation would round differently.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::{CausalLm, Tokenizer};
use crate::reward::shaping::{pre_shape, ShapingConfig};
use crate::reward::{RewardInput, RewardPipeline};
use crate::rollout::{generate, GenerationConfig, Request, RowKey, Sample};

/// The `step` of reference streams: rollout steps count from 1, so they never meet.
const REFERENCE_STEP: u64 = u64::MAX - 1;

/// Prompt index → the reference rewards of that prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReferenceRewards {
    pub by_prompt: BTreeMap<usize, Vec<f64>>,
}

/// What references need besides the samples.
pub struct ReferenceSource<'a> {
    pub model: &'a CausalLm,
    pub tokenizer: &'a Tokenizer,
    pub generation: &'a GenerationConfig,
    pub rewards: &'a RewardPipeline,
    pub seed: u64,
    pub shaping: &'a ShapingConfig,
}

impl ReferenceRewards {
    /// Make sure every prompt of `samples` has its references: sample and score those that are missing, in one batch.
    /// A reference without a reward (every reward returned "no value") is left out.
    pub fn ensure(&mut self, samples: &[Sample], src: &ReferenceSource) -> Result<()> {
        let mut seen = HashSet::new();
        let missing: Vec<&Sample> = samples
            .iter()
            .filter(|s| !self.by_prompt.contains_key(&s.prompt_index) && seen.insert(s.prompt_index))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let m = src.shaping.max_refs.max(1);
        let requests: Vec<Request> = missing
            .iter()
            .flat_map(|s| {
                (0..m).map(|j| Request {
                    prompt: s.prompt_ids.clone(),
                    key: RowKey {
                        seed: src.seed,
                        step: REFERENCE_STEP,
                        prompt: s.prompt_index as u64,
                        sample: j as u64,
                    },
                })
            })
            .collect();
        let completions = generate(src.model, Some(src.tokenizer), &requests, src.generation, None)
            .context("sampling reference completions")?;
        let texts = completions.iter().map(|c| src.tokenizer.decode(&c.ids, true)).collect::<Result<Vec<_>>>()?;
        let inputs: Vec<RewardInput> = completions
            .iter()
            .zip(&texts)
            .enumerate()
            .map(|(k, (c, text))| {
                let s = missing[k / m];
                RewardInput {
                    prompt: &s.prompt_text,
                    raw_prompt: Some(&s.prompt),
                    completion: text,
                    completion_ids: &c.ids,
                    finish: c.finish,
                    columns: &s.columns,
                }
            })
            .collect();
        let scored = src.rewards.score(&inputs).context("scoring reference completions")?;
        for (k, s) in missing.iter().enumerate() {
            let refs: Vec<f64> = (k * m..(k + 1) * m)
                .filter(|&i| !scored.total[i].is_nan())
                .map(|i| pre_shape(scored.total[i], completions[i].ids.len(), src.shaping))
                .collect();
            self.by_prompt.insert(s.prompt_index, refs);
        }
        Ok(())
    }

    /// The references of a prompt (empty if it has none).
    pub fn of(&self, prompt_index: usize) -> &[f64] {
        self.by_prompt.get(&prompt_index).map_or(&[], Vec::as_slice)
    }
}
