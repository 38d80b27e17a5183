//! Rewards: scoring completions, one step's batch at a time.
//!
//! A step's rewards go through one [`RewardPipeline`]: every source scores the whole batch (concurrently, so slow
//! model/HTTP sources overlap), each answer is validated (right length, finite), then the values are combined into one
//! scalar per completion. Gates (G-RA) slot in between validation and the weighted sum, and shaping (PAR and its
//! baselines) after it; sources other than rules only need to implement [`RewardSource`].

pub mod answer;
pub mod command;
pub mod gate;
pub mod http;
pub mod model;
pub mod pipeline;
pub mod rule;
pub mod scored;
pub mod shaping;

pub use pipeline::RewardPipeline;
pub use rule::{last_number, RuleSource};
pub use scored::ScoredBatch;

use serde_json::{Map, Value};

use crate::rollout::FinishReason;

/// What a reward sees of one sample. Borrowed, so a step builds its batch without copying completions.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// The prompt as the model saw it (chat template applied, if any).
    pub prompt: &'a str,
    /// The prompt as the data gave it (text or chat messages), for rewards that render it their own way (a reward
    /// model's chat template); `None` where unknown.
    pub raw_prompt: Option<&'a crate::data::Prompt>,
    /// The decoded completion.
    pub completion: &'a str,
    /// The completion's token ids (EOS included when sampled), for token-count rewards.
    pub completion_ids: &'a [u32],
    pub finish: FinishReason,
    /// Every data column of the sample's row other than the prompt (e.g. `answer`).
    pub columns: &'a Map<String, Value>,
}

/// One reward function. Batch-level so that model and HTTP sources can score many samples per call.
pub trait RewardSource: Send + Sync {
    /// The reward's name from the recipe (metrics are `rewards/<name>/...`).
    fn name(&self) -> &str;

    /// One value per sample, in order; `None` means "not applicable" and leaves the sample out of this reward's
    /// share of the sum (TRL's semantics). The pipeline rejects a wrong length or a non-finite value, naming the
    /// reward, so sources need not check their own output.
    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<Option<f64>>>;

    /// Extra metrics of the last batch (e.g. a command's per-sample metrics), logged as `rewards/<name>/<metric>`.
    fn metrics(&self) -> Vec<(String, f64)> {
        Vec::new()
    }

    /// Check one data row before training: `Err` says what is wrong with a column this reward reads (the caller
    /// names the file and line), so data that cannot feed the reward is refused up front, not found at step 40.
    fn check_row(&self, _columns: &Map<String, Value>) -> Result<(), String> {
        Ok(())
    }

    /// The samples of the last batch this reward could not score for a fault of their own row (index, why). The
    /// pipeline drops them from the step (no reward, so no advantage) instead of failing the whole step.
    fn dropped(&self) -> Vec<(usize, String)> {
        Vec::new()
    }
}
