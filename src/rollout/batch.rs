//! A step's rollouts, whether sampled or replayed: what the reward and update stages consume.

use serde_json::{Map, Value};

use super::FinishReason;

/// One completion with its prompt, ready for rewards and the update (from sampling or a replay file).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Which prompt: the example's index in the dataset, or the group's index in a replay file.
    pub prompt_index: usize,
    /// Which of the group's completions (0..G).
    pub sample_index: usize,
    /// The prompt as the data gave it (text or messages).
    pub prompt: crate::model::chat::Prompt,
    /// The prompt as the model saw it.
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub completion_text: String,
    /// EOS included when the completion ended with one.
    pub completion_ids: Vec<u32>,
    pub finish: FinishReason,
    /// Data columns other than the prompt (rewards read e.g. `answer`).
    pub columns: Map<String, Value>,
    /// Per-token log-probs under the distribution that sampled the completion, when that is not the policy itself
    /// (bf16 rollout weights): the loss's importance correction needs them.
    pub sampling_logprobs: Option<Vec<f32>>,
    /// A replay file's recorded per-token log-probs of the policy that sampled the completion (`old_logprobs`, at
    /// the recipe's temperature): the update's old log-probs, so an off-policy batch replays exactly.
    pub old_logprobs: Option<Vec<f32>>,
}

/// One step's samples, `prompts_per_step` groups of `num_generations`, group-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollouts {
    pub samples: Vec<Sample>,
    /// One reward per sample when a replay file records them (`None` in it: no reward); else the recipe's
    /// rewards score the samples.
    pub rewards: Option<Vec<Option<f64>>>,
}
