//! The update stage of each algorithm, called by the loop once a step's rewards are known: GRPO's μ updates (and
//! GRPO-λ's rewards before them), PPO's and SAFE's steps with their critics. Each logs its own metrics.

use anyhow::{bail, Result};

use super::{Critic, SafeState, StepOutcome, Trainer};
use crate::algo::grpo::{grpo_update, UpdateBatch, UpdateMetrics};
use crate::algo::loss::ClipConfig;
use crate::algo::ppo::{ppo_update, PpoBatch, PpoConfig};
use crate::algo::safe::{safe_update, Phase, SafeBatch, SafeConfig};
use crate::metrics::{names, Record};
use crate::optim::lr_at;
use crate::reward::ScoredBatch;
use crate::rollout::{FinishReason, Sample};

impl Trainer {
    /// μ optimizer updates on the step's samples. A non-finite loss or grad norm stops the step (weights untouched
    /// by that update) and makes it a skipped step.
    pub(super) fn update(
        &mut self,
        samples: &[Sample],
        advantages: &[f64],
        record: &mut Record,
    ) -> Result<StepOutcome> {
        let a = &self.recipe.algorithm;
        let (prompts, completions) = token_ids(samples);
        let keep: Vec<bool> =
            samples.iter().map(|s| !(a.mask_truncated_completions && s.finish == FinishReason::Length)).collect();
        // μ > 1 reuses the batch: ρ needs the sampling policy's log-probs, taken before the first update.
        let old = if a.num_iterations > 1 { Some(self.old_logprobs(&prompts, &completions)?) } else { None };
        // bf16 rollout weights: the sampling distribution's log-probs for the importance correction.
        let sampling: Option<Vec<Vec<f32>>> = self
            .recipe
            .rollout
            .bf16_importance_cap
            .and_then(|_| samples.iter().map(|s| s.sampling_logprobs.clone()).collect());
        let batch = UpdateBatch {
            prompts: &prompts,
            completions: &completions,
            advantages,
            old_logprobs: old.as_deref(),
            keep: &keep,
            sampling: sampling.as_deref().zip(self.recipe.rollout.bf16_importance_cap),
        };
        let mu = a.num_iterations as u64;
        let o = &self.recipe.optim;
        let total_updates = self.recipe.run.max_steps * mu;
        let mut sum: Option<UpdateMetrics> = None;
        let mut lr = 0.0;
        // The frozen model is the KL reference only when β > 0 (it may be loaded for PAR's references alone).
        let kl_reference = self.reference.as_ref().filter(|_| a.beta > 0.0);
        for it in 0..mu {
            lr = lr_at(self.optimizer.state().step, o.lr, o.schedule, o.warmup_steps * mu, total_updates);
            self.optimizer.set_lr(lr);
            let m = grpo_update(&self.policy, kl_reference, &mut self.optimizer, &batch, &self.update)?;
            let which = if mu > 1 { format!(" (update {} of {mu})", it + 1) } else { String::new() };
            if !m.loss.is_finite() {
                return Ok(StepOutcome::Skipped { stage: "loss", reason: format!("the loss is {}{which}", m.loss) });
            }
            if !m.grad_norm.is_finite() {
                return Ok(StepOutcome::Skipped {
                    stage: "gradient",
                    reason: format!("the gradient norm is {}{which}", m.grad_norm),
                });
            }
            sum = Some(match sum {
                None => m,
                Some(s) => UpdateMetrics {
                    loss: s.loss + m.loss,
                    grad_norm: s.grad_norm + m.grad_norm,
                    kl: s.kl.zip(m.kl).map(|(a, b)| a + b),
                    clip_low: s.clip_low + m.clip_low,
                    clip_high: s.clip_high + m.clip_high,
                    clip_region: s.clip_region + m.clip_region,
                    // The policy's entropy on its own samples: the first update's.
                    entropy: s.entropy,
                    reference_seconds: s.reference_seconds + m.reference_seconds,
                    optimizer_seconds: s.optimizer_seconds + m.optimizer_seconds,
                    // Old log-probs are fixed over the μ updates, so are the weights: the first update's.
                    importance: s.importance,
                },
            });
        }
        let m = sum.expect("μ ≥ 1");
        let k = mu as f64;
        if let Some(kl) = m.kl {
            record.set(names::KL, kl / k);
        }
        record.set(names::ENTROPY, m.entropy);
        record.set(names::LOSS, m.loss / k);
        record.set(names::GRAD_NORM, m.grad_norm / k);
        record.set(names::LEARNING_RATE, lr);
        record.set(names::CLIP_LOW, m.clip_low / k);
        record.set(names::CLIP_HIGH, m.clip_high / k);
        record.set(names::CLIP_REGION, m.clip_region / k);
        if kl_reference.is_some() {
            record.set(names::TIMING_REFERENCE, m.reference_seconds);
        }
        record.set(names::TIMING_OPTIMIZER, m.optimizer_seconds);
        if let Some(is) = m.importance {
            record.set(names::IS_RATIO_MEAN, is.ratio_mean);
            record.set(names::IS_RATIO_MIN, is.ratio_min);
            record.set(names::IS_RATIO_MAX, is.ratio_max);
            record.set(names::SAMPLING_LOGP_DIFF_MEAN, is.logp_diff_mean);
            record.set(names::SAMPLING_LOGP_DIFF_MAX, is.logp_diff_max);
        }
        Ok(StepOutcome::Trained)
    }

    /// PPO and SAFE: set this step's learning rates, the policy's from its schedule (which counts training steps, as
    /// TRL steps its scheduler once per batch of rollouts) and the critic's scaled alike. Returns the policy's.
    fn set_actor_critic_lr(&mut self) -> f64 {
        let o = &self.recipe.optim;
        let lr = lr_at(self.state.step, o.lr, o.schedule, o.warmup_steps, self.recipe.run.max_steps);
        self.optimizer.set_lr(lr);
        if let Some((_, critic_opt)) = self.critic.as_mut() {
            critic_opt.set_lr(self.recipe.critic.lr * if o.lr > 0.0 { lr / o.lr } else { 0.0 });
        }
        lr
    }

    /// One SAFE step: the controller and normaliser advance in the state; their internals are logged.
    pub(super) fn safe_update(
        &mut self,
        samples: &[Sample],
        scored: &ScoredBatch,
        record: &mut Record,
    ) -> Result<StepOutcome> {
        let (base_cfg, _, _) = self.recipe.algorithm.safe.as_ref().expect("safe settings");
        let cfg = SafeConfig {
            micro_batch_size: self.update.micro_batch_size,
            temperature: self.update.temperature,
            pad_id: self.update.pad_id,
            logprob_chunk: self.update.logprob_chunk,
            ..*base_cfg
        };
        let (prompts, completions) = token_ids(samples);
        if let Some(i) = scored.total.iter().position(|r| r.is_nan()) {
            let reason = format!("no reward applied to completion {i}; safe needs one reward per completion");
            return Ok(StepOutcome::Skipped { stage: "reward", reason });
        }
        let lr = self.set_actor_critic_lr();
        let Some((Critic::Heads(heads), heads_opt)) = self.critic.as_mut() else {
            bail!("safe needs its critic heads")
        };
        let state = self.state.safe.as_mut().expect("safe state");
        // Work on copies: a step that fails leaves the controller and normaliser as they were.
        let (mut controller, mut normalizer) = (state.controller.clone(), state.normalizer);
        let reference = self.reference.as_ref().expect("safe loads the reference");
        let batch = SafeBatch { prompts: &prompts, completions: &completions, rewards: &scored.total };
        let m = safe_update(
            &self.policy,
            &self.sampler_model,
            reference,
            heads,
            &mut self.optimizer,
            heads_opt,
            &mut controller,
            &mut normalizer,
            &batch,
            &cfg,
        )?;
        if let Some(reason) = m.failed {
            return Ok(StepOutcome::Skipped { stage: "loss", reason });
        }
        *state = SafeState { controller, normalizer };
        let c = m.control.expect("at least one epoch");
        let phase = match c.phase {
            Phase::Warmup => 0.0,
            Phase::Climbing => 1.0,
            Phase::Plateau => 2.0,
            Phase::Converged => 3.0,
        };
        for (name, v) in [
            (names::KL, m.kl),
            (names::ENTROPY, m.rollout_entropy),
            (names::LOSS, m.pg_loss + cfg.value_weight * m.value_loss + c.penalty - cfg.entropy_coef * m.entropy_bonus),
            (names::PPO_LOSS_POLICY, m.pg_loss),
            (names::PPO_LOSS_VALUE, m.value_loss),
            (names::GRAD_NORM, m.grad_norm),
            (names::CRITIC_GRAD_NORM, m.heads_grad_norm),
            (names::LEARNING_RATE, lr),
            (names::SAFE_KL_SHORT, c.kl_short),
            (names::SAFE_KL_LONG, c.kl_long),
            (names::SAFE_PID, c.pid),
            (names::SAFE_PHASE, phase),
            (names::SAFE_PHI, c.phi),
            (names::SAFE_THRESHOLD, c.threshold),
            (names::SAFE_ENTROPY_FACTOR, c.gate),
            (names::SAFE_PENALTY, c.penalty),
            (names::SAFE_ACTIVE, c.active as u8 as f64),
            (names::SAFE_ENTROPY_BONUS, m.entropy_bonus),
            (names::SAFE_V1_MEAN, m.v1_mean),
            (names::SAFE_V2_MEAN, m.v2_mean),
            (names::SAFE_VALUE_MEAN, m.value_mean),
            (names::SAFE_NORMALIZED_REWARD, m.normalized_mean),
        ] {
            record.set(name, v);
        }
        Ok(StepOutcome::Trained)
    }

    /// One PPO step (TRL's PPOTrainer semantics) with the value model; the KL controller moves after it.
    pub(super) fn ppo_update(
        &mut self,
        step: u64,
        samples: &[Sample],
        scored: &ScoredBatch,
        record: &mut Record,
    ) -> Result<StepOutcome> {
        let lr = self.set_actor_critic_lr();
        let a = &self.recipe.algorithm;
        let p = a.ppo.as_ref().expect("ppo settings");
        let o = &self.recipe.optim;
        let (prompts, completions) = token_ids(samples);
        // A sample no reward applied to scores 0.
        let scores: Vec<f64> = scored.total.iter().map(|&r| if r.is_nan() { 0.0 } else { r }).collect();
        let eos: Vec<bool> = samples.iter().map(|s| s.finish == FinishReason::Eos).collect();
        let cfg = PpoConfig {
            params: *p,
            clip: ClipConfig { eps_low: a.epsilon, eps_high: a.epsilon_high, delta: None },
            micro_batch_size: self.update.micro_batch_size,
            temperature: self.update.temperature,
            max_grad_norm: o.max_grad_norm,
            critic_max_grad_norm: self.recipe.critic.max_grad_norm,
            pad_id: self.update.pad_id,
            logprob_chunk: self.update.logprob_chunk,
            seed: self.recipe.run.seed,
        };
        let Some((Critic::Value(critic), critic_opt)) = self.critic.as_mut() else {
            bail!("ppo needs its value model")
        };
        let kl = self.state.kl_controller.expect("ppo has a KL controller");
        let reference = self.reference.as_ref().filter(|_| kl.beta > 0.0 || kl.target.is_some());
        let batch = PpoBatch { prompts: &prompts, completions: &completions, scores: &scores, ended_with_eos: &eos };
        let m = ppo_update(
            &self.policy,
            &self.sampler_model,
            reference,
            critic,
            &mut self.optimizer,
            critic_opt,
            &kl,
            &batch,
            &cfg,
            step,
        )?;
        if !m.pg_loss.is_finite() {
            return Ok(StepOutcome::Skipped { stage: "loss", reason: "the PPO loss is not finite".into() });
        }
        if !m.grad_norm.is_finite() || !m.critic_grad_norm.is_finite() {
            let reason =
                format!("the gradient norm is {} (policy) / {} (value model)", m.grad_norm, m.critic_grad_norm);
            return Ok(StepOutcome::Skipped { stage: "gradient", reason });
        }
        if let Some(c) = self.state.kl_controller.as_mut() {
            c.update(m.kl_token_mean, samples.len());
        }
        for (name, v) in [
            (names::PPO_KL, m.kl_sum),
            (names::PPO_ENTROPY, m.entropy_sum),
            (names::PPO_NON_SCORE_REWARD, m.non_score_reward),
            (names::PPO_RLHF_REWARD, m.rlhf_reward),
            (names::PPO_SCORES, m.scores),
            (names::PPO_APPROXKL, m.approxkl),
            (names::PPO_CLIPFRAC, m.clipfrac),
            (names::PPO_POLICY_ENTROPY, m.entropy),
            (names::PPO_LOSS_POLICY, m.pg_loss),
            (names::PPO_LOSS_VALUE, m.vf_loss),
            (names::PPO_VAL_CLIPFRAC, m.vf_clipfrac),
            (names::PPO_VAL_RATIO, m.ratio_mean),
            (names::PPO_VAL_RATIO_VAR, m.ratio_var),
            (names::PPO_VAL_NUM_EOS, m.num_eos),
            (names::PPO_KL_COEF, m.kl_coef),
            (names::KL, m.kl_token_mean),
            (names::ENTROPY, m.entropy),
            (names::LOSS, m.pg_loss + p.vf_coef * m.vf_loss),
            (names::GRAD_NORM, m.grad_norm),
            (names::CRITIC_GRAD_NORM, m.critic_grad_norm),
            (names::LEARNING_RATE, lr),
        ] {
            record.set(name, v);
        }
        Ok(StepOutcome::Trained)
    }

    /// Per-token log-probs of each completion under the current policy, without a graph, one micro-batch at a time.
    fn old_logprobs(&self, prompts: &[Vec<u32>], completions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        use crate::model::logprobs::{completion_logprobs, SequenceBatch};
        let micro = self.update.micro_batch_size.max(1);
        let mut out = Vec::with_capacity(completions.len());
        for start in (0..completions.len()).step_by(micro) {
            let end = (start + micro).min(completions.len());
            let seqs = SequenceBatch::new(
                &prompts[start..end],
                &completions[start..end],
                self.update.pad_id,
                self.policy.config().sliding_window,
                self.policy.device(),
            )?;
            let (lp, _) = completion_logprobs(
                &self.sampler_model,
                &seqs,
                self.update.temperature,
                self.update.logprob_chunk,
                false,
            )?;
            for (row, c) in lp.to_vec2::<f32>()?.into_iter().zip(&completions[start..end]) {
                out.push(row[..c.len()].to_vec());
            }
        }
        Ok(out)
    }
}

/// Each sample's prompt and completion token ids, as the update batches take them.
fn token_ids(samples: &[Sample]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    samples.iter().map(|s| (s.prompt_ids.clone(), s.completion_ids.clone())).unzip()
}

/// GRPO-λ: replace the step's rewards by 0/1 correctness, or the length-penalised reward for the top-λ groups, and
/// log the selection. Correctness is the raw value of the recipe's correctness reward (or a replay file's reward).
pub(super) fn grpo_lambda_rewards(
    gl: &crate::recipe::GrpoLambdaSettings,
    samples: &[Sample],
    group_size: usize,
    scored: &mut ScoredBatch,
    record: &mut Record,
) -> Result<()> {
    let raw: Vec<Option<f64>> = match scored.per_reward.iter().find(|(n, _)| *n == gl.correctness_reward) {
        Some((_, v)) => v.clone(),
        None => scored.total.iter().map(|&x| (!x.is_nan()).then_some(x)).collect(),
    };
    let correct: Vec<bool> = raw.iter().map(|v| v.is_some_and(|x| x >= gl.correct_min)).collect();
    let lengths: Vec<usize> = samples.iter().map(|s| s.completion_ids.len()).collect();
    let out = crate::algo::grpo_lambda::grpo_lambda_rewards(&correct, &lengths, group_size, &gl.config)?;
    let groups = out.efficiency.len() as f64;
    record.set(names::REWARD, out.rewards.iter().sum::<f64>() / out.rewards.len().max(1) as f64);
    record.set(names::GRPO_LAMBDA_N_EFFICIENCY, out.n_efficiency as f64);
    record.set(names::GRPO_LAMBDA_FRAC_EFFICIENCY, out.n_efficiency as f64 / groups);
    record.set(names::GRPO_LAMBDA_RATIO_EFFICIENCY, out.ratio_efficiency);
    record.set(names::GRPO_LAMBDA_RATIO_ACCURACY, out.ratio_accuracy);
    scored.total = out.rewards;
    Ok(())
}
