//! RLOO, as TRL's `RLOOTrainer` (huggingface/trl `trl/trainer/rloo_trainer.py`: `_generate_and_score_completions`
//! for the reward, KL and baseline, `_compute_loss` for the loss; defaults from `trl/trainer/rloo_config.py`; read at
//! commit f2cd577):
//!
//! 1. r_i = the recipe's reward − β·KL_i, KL_i = Σ_t (logp_old,t − logp_ref,t): k1 summed over the completion at
//!    rollout time, detached. The KL shapes the reward; unlike GRPO there is no KL term in the loss.
//! 2. A_i = r_i − (Σ_{j≠i} r_j)/(K − 1) over the group's K scorable rewards (leave-one-out); with
//!    `normalize_advantages`, (A − mean)/(std + 1e-4) over the batch.
//! 3. ρ_i = exp(Σ_t logp_t − Σ_t logp_old,t): one ratio per sequence, no length normalisation; the loss is the mean
//!    over sequences of −min(ρ_i·A_i, clip(ρ_i, 1 − ε, 1 + ε_high)·A_i). On-policy (μ = 1) ρ = 1 and the gradient is
//!    REINFORCE's with the leave-one-out baseline.

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::boundary::{Algorithm, Models, Needs, Runtime, StepBatch, StepOutcome};
use super::loss::{clip_indicators_tensor, clipped_surrogate_tensor, scalar, ClipConfig};
use super::{Keys, Problem, RecipeShape};
use crate::advantage::{leave_one_out, normalize_batch};
use crate::metrics::{names, Record};
use crate::reward::scored::ScoredBatch;
use crate::rollout::batch::Sample;

/// RLOO's settings (`algorithm.*`, TRL's `RLOOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct RlooSettings {
    /// KL coefficient of the reward's k1 penalty (TRL 0.05; 0 = no reference model).
    pub beta: f64,
    /// Sequence-ratio clipping (`epsilon`, `epsilon_high`).
    pub clip: ClipConfig,
    /// μ: optimizer updates per batch of rollouts.
    pub num_iterations: usize,
    /// Whiten the advantages over the batch.
    pub normalize_advantages: bool,
    /// Completions cut at `max_new_tokens` leave the loss (and their KL is 0), as in TRL.
    pub mask_truncated_completions: bool,
}

impl Default for RlooSettings {
    fn default() -> Self {
        Self {
            beta: 0.05,
            clip: ClipConfig::default(),
            num_iterations: 1,
            normalize_advantages: false,
            mask_truncated_completions: false,
        }
    }
}

impl RlooSettings {
    pub fn from_keys(k: &dyn Keys) -> Self {
        Self {
            beta: k.float("algorithm.beta"),
            clip: ClipConfig::from_keys(k),
            num_iterations: k.usize("algorithm.num_iterations"),
            normalize_advantages: k.boolean("algorithm.normalize_advantages"),
            mask_truncated_completions: k.boolean("algorithm.mask_truncated_completions"),
        }
    }

    pub fn needs(&self) -> Needs {
        Needs {
            reference: self.beta > 0.0,
            reference_for_beta_only: true,
            groups: true,
            recorded_logprobs: true,
            ..Needs::default()
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "beta {} (k1 in the reward), epsilon {}/{}, num_iterations {}, normalize_advantages {}",
            self.beta, self.clip.eps_low, self.clip.eps_high, self.num_iterations, self.normalize_advantages
        )
    }

    pub fn problems(&self, _shape: &RecipeShape) -> Vec<Problem> {
        Vec::new()
    }
}

/// RLOO's loss of one micro-batch: `logp`, `old` and `mask` `[b, T]`, `advantages` `[b]`, `n` the step's
/// completions (micro-batches sum to the batch mean). Returns the loss (differentiable wrt `logp`) and the numbers
/// of sequences clipped low, high and either.
pub fn rloo_loss_tensor(
    logp: &Tensor,
    old: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: &ClipConfig,
    n: usize,
) -> Result<(Tensor, [f64; 3])> {
    let log_ratio = ((logp - old.detach())? * mask)?.sum(1)?;
    let ratio = log_ratio.exp()?.unsqueeze(1)?;
    let loss = (clipped_surrogate_tensor(&ratio, advantages, clip)?.sum_all()? / n as f64)?;
    let (low, high, region) = clip_indicators_tensor(&ratio, advantages, clip)?;
    let count = |t: &Tensor| scalar(&t.sum_all()?);
    Ok((loss, [count(&low)?, count(&high)?, count(&region)?]))
}

/// Subtract β·KL_i from each reward, KL_i = Σ_t (old_t − ref_t) over the completion's tokens (0 for a completion
/// `keep` drops). Returns the KL_i.
pub fn kl_penalty(
    rewards: &mut [Option<f64>],
    old: &[Vec<f32>],
    refs: &[Vec<f32>],
    keep: &[f32],
    beta: f64,
) -> Vec<f64> {
    let kl: Vec<f64> = old
        .iter()
        .zip(refs)
        .zip(keep)
        .map(|((o, r), k)| *k as f64 * o.iter().zip(r).map(|(o, r)| *o as f64 - *r as f64).sum::<f64>())
        .collect();
    for (r, kl) in rewards.iter_mut().zip(&kl) {
        *r = r.map(|r| r - beta * kl);
    }
    kl
}

/// RLOO: the leave-one-out baseline on a KL-shaped reward, a sequence-level clipped ratio.
pub struct Rloo {
    settings: RlooSettings,
    /// This step's rollout-time log-probs, taken for the KL reward and kept for μ > 1.
    old: Option<Vec<Vec<f32>>>,
}

impl Rloo {
    pub fn new(settings: RlooSettings) -> Self {
        Self { settings, old: None }
    }

    /// 0 for completions that leave the loss (`mask_truncated_completions`), else 1.
    fn keep(&self, samples: &[Sample]) -> Vec<f32> {
        let drop = |s: &Sample| self.settings.mask_truncated_completions && s.finish.is_truncated();
        samples.iter().map(|s| if drop(s) { 0.0 } else { 1.0 }).collect()
    }
}

impl Algorithm for Rloo {
    fn advantages(
        &mut self,
        models: &Models,
        samples: &[Sample],
        scored: &mut ScoredBatch,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<Option<Vec<f64>>> {
        let s = &self.settings;
        let mut rewards: Vec<Option<f64>> = scored.total.iter().map(|&r| (!r.is_nan()).then_some(r)).collect();
        // TRL logs the spread of the rewards before the KL shaping.
        super::boundary::log_reward_spread(scored, rt.group_size, record)?;
        self.old = None;
        let kl_reference = models.reference.filter(|_| s.beta > 0.0);
        let recorded = super::boundary::has_recorded_logprobs(samples);
        if kl_reference.is_some() || s.num_iterations > 1 || recorded {
            let (prompts, completions) = super::boundary::token_ids(samples);
            let old = rt.rollout_logprobs(models.rollout_view, samples)?;
            if let Some(reference) = kl_reference {
                let refs = rt.logprobs(reference, &prompts, &completions)?;
                let kl = kl_penalty(&mut rewards, &old, &refs, &self.keep(samples), s.beta);
                record.set(names::KL, kl.iter().sum::<f64>() / kl.len().max(1) as f64);
            }
            self.old = Some(old);
        }
        let mut adv = leave_one_out(&rewards, rt.group_size)?;
        if s.normalize_advantages {
            normalize_batch(&mut adv);
        }
        Ok(Some(adv.into_iter().map(|a| a.unwrap_or(0.0)).collect()))
    }

    /// μ optimizer updates of the sequence-level clipped loss; a non-finite loss or grad norm skips the step.
    fn update(
        &mut self,
        m: Models,
        batch: &StepBatch,
        advantages: Option<&[f64]>,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<StepOutcome> {
        let s = &self.settings;
        let advantages = advantages.context("RLOO's update needs its advantages")?;
        let (prompts, completions) = batch.token_ids();
        let keep = self.keep(batch.samples);
        let recorded = super::boundary::has_recorded_logprobs(batch.samples);
        let old = if s.num_iterations > 1 || recorded { self.old.take() } else { None };
        let n = completions.len();
        let micro = rt.micro_batch_size.clamp(1, n.max(1));
        let dev = m.policy.device();
        let mu = s.num_iterations as u64;
        let (mut loss_sum, mut norm_sum, mut clipped, mut entropy, mut tokens, mut lr) =
            (0.0, 0.0, [0.0; 3], 0.0, 0.0, 0.0);
        for it in 0..mu {
            lr = rt.lr_per_update(m.optimizer.state().step, mu);
            m.optimizer.set_lr(lr);
            let mut acc = crate::optim::GradAccumulator::new();
            let mut loss_value = 0.0;
            for start in (0..n).step_by(micro) {
                let r = start..(start + micro).min(n);
                let (seqs, logp, ent) = rt.policy_logprobs(m.policy, &prompts[r.clone()], &completions[r.clone()])?;
                let keep_t = Tensor::new(&keep[r.clone()], dev)?.unsqueeze(1)?;
                let mask = seqs.completion_mask.broadcast_mul(&keep_t)?;
                let old_t = match &old {
                    Some(rows) => super::batching::padded_rows(&rows[r.clone()], seqs.completion_width, dev)?,
                    None => logp.detach(),
                };
                let adv: Vec<f32> = advantages[r.clone()].iter().map(|&a| a as f32).collect();
                let adv = Tensor::from_vec(adv, r.len(), dev)?;
                let (loss, c) = rloo_loss_tensor(&logp, &old_t, &adv, &mask, &s.clip, n)?;
                let value = scalar(&loss)?;
                let which = if mu > 1 { format!(" (update {} of {mu})", it + 1) } else { String::new() };
                if !value.is_finite() {
                    return Ok(StepOutcome::skipped("loss", format!("the loss is {value}{which}")));
                }
                acc.add(loss.backward()?, m.policy.vars())?;
                loss_value += value;
                if it == 0 {
                    for (total, x) in clipped.iter_mut().zip(c) {
                        *total += x;
                    }
                    entropy += scalar(&(ent * &mask)?.sum_all()?)?;
                    tokens += scalar(&mask.sum_all()?)?;
                }
            }
            let norm = crate::optim::clipped_step(m.optimizer, &acc.finish(), m.policy.vars(), rt.optim.max_grad_norm)?;
            if !norm.is_finite() {
                return Ok(StepOutcome::skipped("gradient", format!("the gradient norm is {norm}")));
            }
            loss_sum += loss_value;
            norm_sum += norm;
        }
        let k = mu as f64;
        record.set(names::ENTROPY, entropy / tokens.max(1.0));
        record.set(names::LOSS, loss_sum / k);
        record.set(names::GRAD_NORM, norm_sum / k);
        record.set(names::LEARNING_RATE, lr);
        // Clipping is per sequence: the fractions of the step's sequences (the first update's).
        record.set(names::CLIP_LOW, clipped[0] / n as f64);
        record.set(names::CLIP_HIGH, clipped[1] / n as f64);
        record.set(names::CLIP_REGION, clipped[2] / n as f64);
        Ok(StepOutcome::Trained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// TRL RLOO's loss on hand-computed numbers (4 sequences, ε = 0.2, advantages of a β = 0.05 KL-shaped group):
    /// ρ_i = exp(Σ_t (lp − old)) = [e^0.2, e^0.2, e^−0.1, e^−0.1]; sequence 0 (A > 0, ρ > 1.2) is clipped; the loss
    /// is the mean of −min(ρA, clip(ρ)A) = [−0.962, 0.60052…, −0.14628…, 0.42678…] → −0.020244344411692275, and the
    /// gradient per real token is −A_i·ρ_i/4 for the unclipped sequences, 0 for the clipped one.
    #[test]
    fn rloo_loss_matches_hand_computed_values() {
        let dev = Device::Cpu;
        let lp = [[-0.9, -0.5, -1.9], [-0.3, -1.0, 0.0], [-0.7, -0.8, -0.7], [-2.1, -0.1, 0.0]];
        let old = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0], [-0.7, -0.7, -0.7], [-2.0, -0.1, 0.0]];
        let mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]];
        let adv = [0.8016666666666666f64, -0.49166666666666664, 0.16166666666666668, -0.4716666666666666];
        let t = |x: &[[f64; 3]; 4]| {
            Tensor::from_vec(x.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>(), (4, 3), &dev).unwrap()
        };
        let logp = Var::from_tensor(&t(&lp)).unwrap();
        let a = Tensor::new(adv.map(|a| a as f32).as_slice(), &dev).unwrap();
        let c = ClipConfig::default();
        let (loss, clipped) = rloo_loss_tensor(logp.as_tensor(), &t(&old), &a, &t(&mask), &c, 4).unwrap();
        assert!((scalar(&loss).unwrap() - -0.020244344411692275).abs() < 1e-6, "{}", scalar(&loss).unwrap());
        assert_eq!(clipped, [0.0, 1.0, 1.0]);
        let g = loss.backward().unwrap().get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let expected = [
            [0.0, 0.0, 0.0],
            [0.15013075569052087, 0.15013075569052087, 0.0],
            [-0.03657051231228668, -0.03657051231228668, -0.03657051231228668],
            [0.10669541221007355, 0.10669541221007355, 0.0],
        ];
        for (row, e) in g.iter().zip(expected) {
            for (x, e) in row.iter().zip(e) {
                assert!((*x as f64 - e).abs() < 1e-6, "{g:?}");
            }
        }
    }

    /// The KL-shaped rewards and leave-one-out advantages of the same example: KL_i = Σ_t (old − ref) =
    /// [0.6, 0, 0.2, −0.3]; r − 0.05·KL = [0.97, 0, 0.49, 0.015]; A = [0.80167, −0.49167, 0.16167, −0.47167]. A
    /// dropped (truncated) completion has KL 0.
    #[test]
    fn rloo_kl_shaped_advantages_match_hand_computed_values() {
        let rows = |x: &[&[f32]]| x.iter().map(|r| r.to_vec()).collect::<Vec<_>>();
        let old = rows(&[&[-1.0, -0.5, -2.0], &[-0.3, -1.2], &[-0.7, -0.7, -0.7], &[-2.0, -0.1]]);
        let refs = rows(&[&[-1.2, -0.4, -2.5], &[-0.5, -1.0], &[-0.6, -0.9, -0.8], &[-1.5, -0.3]]);
        let mut rewards = vec![Some(1.0), Some(0.0), Some(0.5), Some(0.0)];
        let kl = kl_penalty(&mut rewards, &old, &refs, &[1.0; 4], 0.05);
        for (x, e) in kl.iter().zip([0.6, 0.0, 0.2, -0.3]) {
            assert!((x - e).abs() < 1e-6, "{kl:?}");
        }
        for (x, e) in rewards.iter().zip([0.97, 0.0, 0.49, 0.015]) {
            assert!((x.unwrap() - e).abs() < 1e-7, "{rewards:?}");
        }
        let a = leave_one_out(&rewards, 4).unwrap();
        for (x, e) in a.iter().zip([0.8016666666666666, -0.49166666666666664, 0.16166666666666668, -0.4716666666666666])
        {
            assert!((x.unwrap() - e).abs() < 1e-7, "{a:?}");
        }
        let mut rewards = vec![Some(1.0), None, Some(0.5), Some(0.0)];
        let kl = kl_penalty(&mut rewards, &old, &refs, &[0.0, 1.0, 1.0, 1.0], 0.05);
        assert_eq!((kl[0], rewards[0], rewards[1]), (0.0, Some(1.0), None));
    }
}
