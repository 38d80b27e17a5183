//! The boundary between the trainer and an algorithm: what the trainer hands every algorithm each step, and what
//! every algorithm gives back. See the rule in [`super`]'s doc comment.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::Tensor;

use crate::metrics::Record;
use crate::model::CausalLm;
use crate::optim::schedule::LrSchedule;
use crate::optim::AdamW;
use crate::reward::scored::ScoredBatch;
use crate::rollout::batch::Sample;

/// What an algorithm needs from the trainer, known from its settings before anything is loaded (the memory plan and
/// the decision to load a reference model are made from it).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Needs {
    /// A frozen copy of the starting policy (the KL reference).
    pub reference: bool,
    /// The reference is there for the `algorithm.beta` KL term alone: β = 0 would drop it (the memory plan's
    /// advice). False for SAFE, whose controller always measures the KL.
    pub reference_for_beta_only: bool,
    /// A trainable model of the policy's size besides the policy (PPO's value model): the memory plan counts it.
    pub value_model: bool,
    /// The value model trains LoRA adapters on a frozen backbone (`critic.lora`): only they and its head have
    /// gradients and moments.
    pub value_model_lora: bool,
    /// ... and that backbone is the policy's own base weights (`critic.init = "policy"`): no memory of its own.
    pub value_model_shares_policy: bool,
    /// A differentiable entropy (the composite LM head: the fused CPU head has no entropy gradient).
    pub entropy_gradient: bool,
    /// `algorithm.gradient_checkpointing` is offered (and whether it is on).
    pub can_checkpoint: bool,
    pub gradient_checkpointing: bool,
    /// Completions are compared within a prompt's group: `rollout.num_generations` ≥ 2.
    pub groups: bool,
    /// The loss applies the truncated importance correction of `rollout.weights = "bf16"`.
    pub importance_correction: bool,
    /// A replay file's recorded `old_logprobs` are the update's old log-probs.
    pub recorded_logprobs: bool,
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Trained,
    /// Not applied: a stage produced a non-finite value (or a reward source failed).
    Skipped {
        stage: &'static str,
        reason: String,
    },
}

impl StepOutcome {
    pub fn skipped(stage: &'static str, reason: impl Into<String>) -> Self {
        Self::Skipped { stage, reason: reason.into() }
    }
}

/// The models an update works on. The policy's optimizer is the trainer's (it saves it with the policy); an
/// algorithm's own trainable models (critics) and their optimizers live in the algorithm.
pub struct Models<'a> {
    /// The trainable policy.
    pub policy: &'a CausalLm,
    /// A no-grad view of the policy (same storage): sampling-time log-probs.
    pub rollout_view: &'a CausalLm,
    /// The frozen starting policy, when [`Needs::reference`] asked for it (or the reward shaping did).
    pub reference: Option<&'a CausalLm>,
    pub optimizer: &'a mut AdamW,
}

/// The same small runtime context for every algorithm, fixed by the trainer at start-up except `step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Runtime {
    /// The step being trained (1-based).
    pub step: u64,
    /// `run.max_steps`: the schedule's length.
    pub max_steps: u64,
    /// `run.seed`: seeds any shuffling (keyed by step, so resume needs no generator state).
    pub seed: u64,
    /// Completions per forward/backward (the memory plan's choice).
    pub micro_batch_size: usize,
    /// Completion positions per LM-head call on the composite path.
    pub logprob_chunk: usize,
    /// The sampling temperature: log-probs are taken of `logits / temperature`, as during rollout.
    pub temperature: f64,
    pub pad_id: u32,
    /// `rollout.max_new_tokens` (dr_grpo's constant normaliser).
    pub max_new_tokens: usize,
    /// `rollout.num_generations`: consecutive completions of one prompt form a group.
    pub group_size: usize,
    /// The policy's learning rate and schedule (`[optim]`).
    pub optim: OptimSchedule,
}

impl Runtime {
    /// This step's learning rate when the schedule counts training steps (PPO, SAFE, REINFORCE++: TRL steps its
    /// scheduler once per batch of rollouts, however many optimizer steps the batch makes).
    pub fn lr_per_step(&self) -> f64 {
        let o = &self.optim;
        // `step` is 1-based; the schedule counts steps already taken.
        crate::optim::lr_at(self.step - 1, o.lr, o.schedule, o.warmup_steps, self.max_steps)
    }

    /// The policy's per-token log-probs `[b, C]` and entropies (a metric) of a micro-batch, with its sequence batch
    /// (masks, widths), in a graph for the update.
    pub fn policy_logprobs(
        &self,
        policy: &CausalLm,
        prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
    ) -> Result<(crate::model::logprobs::SequenceBatch, Tensor, Tensor)> {
        use crate::model::logprobs::{logprobs_from_hidden, Entropy, SequenceBatch};
        let seqs =
            SequenceBatch::new(prompts, completions, self.pad_id, policy.config().sliding_window, policy.device())?;
        let hidden = seqs.hidden(policy)?;
        let (logp, entropy) =
            logprobs_from_hidden(policy, &hidden, &seqs, self.temperature, self.logprob_chunk, Entropy::Metric)?;
        Ok((seqs, logp, entropy.context("requested")?))
    }

    /// The learning rate of the next optimizer update when each step makes `updates_per_step` of them (GRPO's and
    /// RLOO's μ): warm-up and schedule count updates, so both stretch by μ.
    pub fn lr_per_update(&self, optimizer_steps: u64, updates_per_step: u64) -> f64 {
        let o = &self.optim;
        let total = self.max_steps * updates_per_step;
        crate::optim::lr_at(optimizer_steps, o.lr, o.schedule, o.warmup_steps * updates_per_step, total)
    }

    /// The step's rollout-time log-probs: a replay file's recorded `old_logprobs` when the samples carry them, else
    /// the rollout view's, computed now.
    pub fn rollout_logprobs(&self, rollout_view: &CausalLm, samples: &[Sample]) -> Result<Vec<Vec<f32>>> {
        if let Some(recorded) = recorded_logprobs(samples) {
            return Ok(recorded);
        }
        let (prompts, completions) = token_ids(samples);
        self.logprobs(rollout_view, &prompts, &completions)
    }

    /// Per-token log-probs of each completion under `model` (the rollout view or the reference), without a graph,
    /// one micro-batch at a time: rollout-time log-probs for KL rewards and for μ > 1.
    pub fn logprobs(&self, model: &CausalLm, prompts: &[Vec<u32>], completions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        use crate::model::logprobs::{completion_logprobs, SequenceBatch};
        let micro = self.micro_batch_size.max(1);
        let mut out = Vec::with_capacity(completions.len());
        for start in (0..completions.len()).step_by(micro) {
            let end = (start + micro).min(completions.len());
            let seqs = SequenceBatch::new(
                &prompts[start..end],
                &completions[start..end],
                self.pad_id,
                model.config().sliding_window,
                model.device(),
            )?;
            let (lp, _) = completion_logprobs(model, &seqs, self.temperature, self.logprob_chunk, false)?;
            for (row, c) in lp.to_vec2::<f32>()?.into_iter().zip(&completions[start..end]) {
                out.push(row[..c.len()].to_vec());
            }
        }
        Ok(out)
    }
}

/// A replay file's recorded `old_logprobs`, when every sample carries them.
pub fn recorded_logprobs(samples: &[Sample]) -> Option<Vec<Vec<f32>>> {
    samples.iter().map(|s| s.old_logprobs.clone()).collect()
}

/// Whether every sample carries recorded `old_logprobs` (without copying them).
pub fn has_recorded_logprobs(samples: &[Sample]) -> bool {
    samples.iter().all(|s| s.old_logprobs.is_some())
}

/// The policy optimizer's schedule and clipping (`[optim]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimSchedule {
    pub lr: f64,
    pub schedule: LrSchedule,
    pub warmup_steps: u64,
    /// Global grad-norm clip of the policy (≤ 0 = off).
    pub max_grad_norm: f64,
}

/// One step's rollouts and rewards, as the update sees them.
pub struct StepBatch<'a> {
    /// `prompts_per_step` groups of `num_generations`, group-major.
    pub samples: &'a [Sample],
    /// The composed (and shaped) rewards: `total` is NaN where no reward applied.
    pub scored: &'a ScoredBatch,
}

impl StepBatch<'_> {
    /// Each sample's prompt and completion token ids, as the update batches take them.
    pub fn token_ids(&self) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
        token_ids(self.samples)
    }
}

/// Each sample's prompt and completion token ids.
pub fn token_ids(samples: &[Sample]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    samples.iter().map(|s| (s.prompt_ids.clone(), s.completion_ids.clone())).unzip()
}

/// TRL's `reward_std` (the mean of the groups' stds) and `frac_reward_zero_std` of the step's rewards, for
/// algorithms whose advantages are not GRPO's but whose groups are.
pub fn log_reward_spread(scored: &ScoredBatch, group_size: usize, record: &mut Record) -> Result<()> {
    let rewards: Vec<Option<f64>> = scored.total.iter().map(|&r| (!r.is_nan()).then_some(r)).collect();
    let stats = crate::advantage::group_advantages(&rewards, group_size, Default::default())?;
    record.set(crate::metrics::names::REWARD_STD, stats.reward_std);
    record.set(crate::metrics::names::FRAC_REWARD_ZERO_STD, stats.frac_reward_zero_std);
    Ok(())
}

/// Tensor files an algorithm keeps in a checkpoint beside the policy's: file name → named tensors.
pub type TensorFiles = Vec<(String, Vec<(String, Tensor)>)>;

/// Reads one of a checkpoint's tensor files by name.
pub type TensorFileReader<'a> = &'a dyn Fn(&str) -> Result<HashMap<String, Tensor>>;

/// Read back an algorithm's saved state (`state.json`'s `training.algorithm`); an error names what is missing or
/// of the wrong type (serde names the field).
pub fn parse_state<T: serde::de::DeserializeOwned>(state: &serde_json::Value, algorithm: &str) -> Result<T> {
    if state.is_null() {
        anyhow::bail!(
            "`training.algorithm` is missing: the checkpoint holds no {algorithm} state (written by an older safe, by \
             another algorithm, or edited)"
        );
    }
    crate::checkpoint::from_state(state, "training.algorithm")
        .with_context(|| format!("`training.algorithm` is not {algorithm}'s state"))
}

/// One algorithm, built once from its settings ([`super::build`]). Everything it carries between steps besides the
/// policy and its optimizer is its own, and goes into checkpoints through [`Algorithm::state`].
pub trait Algorithm {
    /// Before the update: replace the step's rewards where the algorithm defines its own (GRPO-λ), log what it
    /// logs about them, and return one advantage per completion when the algorithm has them before the update
    /// (GRPO's group advantages; PPO's per-token advantages come out of its update, so `None`). The advantages go
    /// into the completions file and back into [`Algorithm::update`].
    ///
    /// `models` is for rollout-time forwards without a graph (RLOO's KL reward needs the sampling and reference
    /// log-probs); nothing is trained here.
    ///
    /// The default has none: per-token advantages (GAE, SAFE's critic) come out of the update.
    fn advantages(
        &mut self,
        models: &Models,
        samples: &[Sample],
        scored: &mut ScoredBatch,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<Option<Vec<f64>>> {
        let _ = (models, samples, scored, rt, record);
        Ok(None)
    }

    /// The whole update of one step: optimizer steps of the policy (and of the algorithm's own models), its
    /// metrics into `record`. A non-finite loss or gradient norm is a [`StepOutcome::Skipped`] with the policy's
    /// weights untouched by that optimizer step; `Err` is a failure of the run.
    fn update(
        &mut self,
        models: Models,
        batch: &StepBatch,
        advantages: Option<&[f64]>,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<StepOutcome>;

    /// The state to checkpoint (`state.json`'s `training.algorithm`), `null` when there is none.
    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }

    /// Tensor files to checkpoint beside the policy (critic weights and optimizer moments).
    fn tensor_files(&self) -> TensorFiles {
        Vec::new()
    }

    /// Continue from a checkpoint: `state` is what [`Algorithm::state`] returned, `files` reads what
    /// [`Algorithm::tensor_files`] wrote. An unreadable or missing part is an error naming it (exit 2).
    fn restore(&mut self, state: &serde_json::Value, files: TensorFileReader) -> Result<()> {
        let _ = files;
        if !state.is_null() {
            anyhow::bail!("`training.algorithm` holds state this algorithm does not keep: {state}");
        }
        Ok(())
    }
}
