//! REINFORCE++ and REINFORCE++-baseline, as OpenRLHF (OpenRLHF/OpenRLHF, read at commit 3c3be62, version 0.11.0):
//! `openrlhf/trainer/ppo_utils/experience_maker.py` (`compute_advantages_and_returns`, `get_cumulative_returns`),
//! `openrlhf/models/utils.py` (`compute_approx_kl`, `compute_reward`), `openrlhf/models/loss.py` (`PolicyLoss`),
//! defaults from `openrlhf/cli/train_ppo_ray.py` (`--algo.advantage.estimator reinforce | reinforce_baseline`).
//!
//! 1. Score s_i (the recipe's reward); the baseline variant subtracts its group's mean score; then clip to
//!    ±`reward_clip`.
//! 2. Token rewards r_t = −β·KL_t at every token plus s_i at the last one, KL_t = clamp(k(logp_old − logp_ref), ±10)
//!    at rollout time (k1 by default).
//! 3. Returns G_t = r_t + γ·G_{t+1} (γ = 1 for the baseline variant), then one whitening over every token of the
//!    step: (G − mean)/√max(var, 1e-8), the variance biased. No critic: the whitened return is the advantage.
//! 4. PPO's clipped surrogate per token with ρ = exp(clamp(logp − logp_old, ±20)), averaged over the tokens of each
//!    optimizer step, over `ppo_epochs` passes of `num_mini_batches` shuffled mini-batches.

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::batching::{padded_rows, shuffled_order};
use super::boundary::{Algorithm, Models, Needs, Runtime, StepBatch, StepOutcome};
use super::loss::{clip_indicators_tensor, clipped_surrogate_tensor, scalar, ClipConfig, KlEstimator};
use super::{Keys, Problem, RecipeShape};
use crate::advantage::gae::{gae, token_rewards, whiten, ScorePlacement, Whitening};
use crate::metrics::{names, Record};
use crate::reward::scored::ScoredBatch;
use crate::rollout::batch::Sample;

/// REINFORCE++'s settings (`algorithm.*`; OpenRLHF's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct ReinforceSettings {
    /// REINFORCE++-baseline: subtract each group's mean score (and γ = 1).
    pub baseline: bool,
    /// KL coefficient of the per-token reward (OpenRLHF `init_kl_coef` 0.01; 0 = no reference model).
    pub beta: f64,
    pub kl_estimator: KlEstimator,
    /// Discount of the returns (`algorithm.gamma`; 1 for the baseline variant).
    pub gamma: f64,
    pub clip: ClipConfig,
    /// Passes over each step's rollouts (OpenRLHF `max_epochs` 1).
    pub epochs: usize,
    /// Optimizer steps per pass, over shuffled mini-batches.
    pub num_mini_batches: usize,
    /// Scores are clipped to ±this after the baseline (OpenRLHF `reward.clip_range` (−10, 10)).
    pub reward_clip: f64,
}

impl ReinforceSettings {
    /// The defaults of `reinforce_pp` (`baseline = false`) or `reinforce_pp_baseline`.
    pub fn default_for(baseline: bool) -> Self {
        Self {
            baseline,
            beta: 0.01,
            kl_estimator: KlEstimator::K1,
            gamma: 1.0,
            clip: ClipConfig::default(),
            epochs: 1,
            num_mini_batches: 1,
            reward_clip: 10.0,
        }
    }

    pub fn from_keys(k: &dyn Keys, baseline: bool) -> Self {
        Self {
            baseline,
            beta: k.float("algorithm.beta"),
            kl_estimator: KlEstimator::from_keys(k),
            gamma: if baseline { 1.0 } else { k.float("algorithm.gamma") },
            clip: ClipConfig::from_keys(k),
            epochs: k.usize("algorithm.ppo_epochs"),
            num_mini_batches: k.usize("algorithm.num_mini_batches"),
            reward_clip: k.float("algorithm.reward_clip"),
        }
    }

    pub fn needs(&self) -> Needs {
        Needs {
            reference: self.beta > 0.0,
            reference_for_beta_only: true,
            groups: self.baseline,
            recorded_logprobs: true,
            ..Needs::default()
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "beta {} ({:?} in the reward), gamma {}, epsilon {}/{}, ppo_epochs {}, num_mini_batches {}",
            self.beta,
            self.kl_estimator,
            self.gamma,
            self.clip.eps_low,
            self.clip.eps_high,
            self.epochs,
            self.num_mini_batches
        )
    }

    pub fn problems(&self, shape: &RecipeShape) -> Vec<Problem> {
        super::batching::mini_batch_problem(shape.completions_per_step(), self.num_mini_batches).into_iter().collect()
    }
}

/// Steps 1–3 on plain numbers: the per-token advantages `[n][len_i]` of a step from each completion's score and
/// rollout-time per-token KL (empty rows when β = 0), with groups of `group_size` for the baseline variant.
pub fn advantages(
    scores: &[f64],
    kl: &[Vec<f64>],
    lens: &[usize],
    s: &ReinforceSettings,
    group_size: usize,
) -> Vec<Vec<f64>> {
    let mut scores = scores.to_vec();
    if s.baseline {
        for g in scores.chunks_mut(group_size.max(1)) {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            g.iter_mut().for_each(|x| *x -= mean);
        }
    }
    let mut returns = Vec::with_capacity(scores.len());
    let mut masks = Vec::with_capacity(scores.len());
    for (i, &score) in scores.iter().enumerate() {
        let mask = vec![1.0; lens[i]];
        let zeros = vec![0.0; lens[i]];
        let kl_row = kl.get(i).filter(|r| !r.is_empty()).unwrap_or(&zeros);
        let score = score.clamp(-s.reward_clip, s.reward_clip);
        let r = token_rewards(kl_row, &mask, score, s.beta, ScorePlacement::LastToken);
        // With no critic (V = 0) and λ = 1, GAE is the discounted return G_t = r_t + γ·G_{t+1}.
        let (g, _) = gae(&r, &zeros, &mask, lens[i], s.gamma, 1.0);
        returns.push(g);
        masks.push(mask);
    }
    whiten(&mut returns, &masks, Whitening::Population);
    returns
}

/// The token loss of one micro-batch: Σ mask·(−min(ρA, clip(ρ)A)) / `tokens` (the optimizer step's real tokens),
/// ρ = exp(clamp(logp − old, ±20)). `logp`, `old`, `advantages`, `mask` `[b, T]`. Also returns the clip
/// indicators' token counts (low, high, either).
pub fn token_loss_tensor(
    logp: &Tensor,
    old: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: &ClipConfig,
    tokens: f64,
) -> Result<(Tensor, [f64; 3])> {
    let ratio = (logp - old.detach())?.clamp(-20.0, 20.0)?.exp()?;
    let per_token = clipped_surrogate_tensor(&ratio, advantages, clip)?;
    let loss = ((per_token * mask)?.sum_all()? / tokens.max(1.0))?;
    let (low, high, region) = clip_indicators_tensor(&ratio, advantages, clip)?;
    let count = |t: &Tensor| scalar(&(t * mask)?.sum_all()?);
    Ok((loss, [count(&low)?, count(&high)?, count(&region)?]))
}

/// REINFORCE++ (or its baseline variant): critic-free whitened returns, PPO's clipped token loss.
pub struct Reinforce {
    settings: ReinforceSettings,
    /// This step's rollout-time log-probs and per-token advantages, from [`Algorithm::advantages`].
    pending: Option<Pending>,
}

impl Reinforce {
    pub fn new(settings: ReinforceSettings) -> Self {
        Self { settings, pending: None }
    }
}

/// A step's rollout-time log-probs and per-token advantages, between its two stages.
type Pending = (Vec<Vec<f32>>, Vec<Vec<f64>>);

/// Tags the per-epoch shuffle streams.
const SHUFFLE_STREAM: u64 = 0x9900_0000_0000_0002;

impl Algorithm for Reinforce {
    fn advantages(
        &mut self,
        models: &Models,
        samples: &[Sample],
        scored: &mut ScoredBatch,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<Option<Vec<f64>>> {
        let s = &self.settings;
        let (prompts, completions) = super::boundary::token_ids(samples);
        // A sample no reward applied to scores 0 (as PPO).
        let scores: Vec<f64> = scored.total.iter().map(|&r| if r.is_nan() { 0.0 } else { r }).collect();
        let old = rt.rollout_logprobs(models.rollout_view, samples)?;
        let mut kl = Vec::new();
        if let Some(reference) = models.reference.filter(|_| s.beta > 0.0) {
            let refs = rt.logprobs(reference, &prompts, &completions)?;
            kl = old
                .iter()
                .zip(&refs)
                .map(|(o, r)| {
                    o.iter().zip(r).map(|(o, r)| s.kl_estimator.eval(*o as f64, *r as f64).clamp(-10.0, 10.0)).collect()
                })
                .collect::<Vec<Vec<f64>>>();
            let tokens: usize = kl.iter().map(Vec::len).sum();
            record.set(names::KL, kl.iter().flatten().sum::<f64>() / tokens.max(1) as f64);
        }
        if s.baseline {
            super::boundary::log_reward_spread(scored, rt.group_size, record)?;
        }
        let lens: Vec<usize> = completions.iter().map(Vec::len).collect();
        let adv = advantages(&scores, &kl, &lens, s, rt.group_size);
        self.pending = Some((old, adv));
        Ok(None) // per token
    }

    fn update(
        &mut self,
        m: Models,
        batch: &StepBatch,
        _advantages: Option<&[f64]>,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<StepOutcome> {
        let s = &self.settings;
        let (old, adv) = self.pending.take().context("REINFORCE++'s update runs after its advantages")?;
        let (prompts, completions) = batch.token_ids();
        let n = completions.len();
        let dev = m.policy.device();
        let micro = rt.micro_batch_size.clamp(1, n.max(1));
        let mini = n.div_ceil(s.num_mini_batches.max(1));
        // The schedule counts training steps, as PPO's (one rollout batch each).
        let lr = rt.lr_per_step();
        m.optimizer.set_lr(lr);
        let max_grad_norm = rt.optim.max_grad_norm;
        let (mut loss_sum, mut norm_sum, mut updates, mut clipped, mut entropy, mut tokens_seen) =
            (0.0, 0.0, 0.0f64, [0.0; 3], 0.0, 0.0f64);
        for epoch in 0..s.epochs {
            let order = shuffled_order(n, rt.seed, rt.step, epoch, SHUFFLE_STREAM);
            for mb in order.chunks(mini) {
                let tokens: f64 = mb.iter().map(|&i| completions[i].len() as f64).sum();
                let mut acc = crate::optim::GradAccumulator::new();
                let mut loss_value = 0.0;
                for idx in mb.chunks(micro) {
                    let pick = |src: &[Vec<u32>]| idx.iter().map(|&i| src[i].clone()).collect::<Vec<_>>();
                    let (seqs, logp, ent) = rt.policy_logprobs(m.policy, &pick(&prompts), &pick(&completions))?;
                    let width = seqs.completion_width;
                    let old_t = padded_rows(&idx.iter().map(|&i| old[i].clone()).collect::<Vec<_>>(), width, dev)?;
                    let adv_rows: Vec<Vec<f32>> =
                        idx.iter().map(|&i| adv[i].iter().map(|&a| a as f32).collect()).collect();
                    let adv_t = padded_rows(&adv_rows, width, dev)?;
                    let mask = &seqs.completion_mask;
                    let (loss, c) = token_loss_tensor(&logp, &old_t, &adv_t, mask, &s.clip, tokens)?;
                    let value = scalar(&loss)?;
                    if !value.is_finite() {
                        return Ok(StepOutcome::skipped("loss", format!("the loss is {value}")));
                    }
                    acc.add(loss.backward()?, m.policy.vars())?;
                    loss_value += value;
                    for (total, x) in clipped.iter_mut().zip(c) {
                        *total += x;
                    }
                    entropy += scalar(&(ent * mask)?.sum_all()?)?;
                    tokens_seen += scalar(&mask.sum_all()?)?;
                }
                let norm = crate::optim::clipped_step(m.optimizer, &acc.finish(), m.policy.vars(), max_grad_norm)?;
                if !norm.is_finite() {
                    return Ok(StepOutcome::skipped("gradient", format!("the gradient norm is {norm}")));
                }
                loss_sum += loss_value;
                norm_sum += norm;
                updates += 1.0;
            }
        }
        let (u, t) = (updates.max(1.0), tokens_seen.max(1.0));
        record.set(names::LOSS, loss_sum / u);
        record.set(names::GRAD_NORM, norm_sum / u);
        record.set(names::LEARNING_RATE, lr);
        record.set(names::ENTROPY, entropy / t);
        record.set(names::CLIP_LOW, clipped[0] / t);
        record.set(names::CLIP_HIGH, clipped[1] / t);
        record.set(names::CLIP_REGION, clipped[2] / t);
        Ok(StepOutcome::Trained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close_rows(a: &[Vec<f64>], e: &[&[f64]], tol: f64) {
        assert_eq!(a.len(), e.len());
        for (x, e) in a.iter().zip(e) {
            assert_eq!(x.len(), e.len(), "{a:?}");
            for (x, e) in x.iter().zip(*e) {
                assert!((x - e).abs() < tol, "{a:?} vs {e:?}");
            }
        }
    }

    /// OpenRLHF REINFORCE++ by hand: 2 completions (3 and 2 tokens), scores [1, 0], β = 0.01, k1 KL
    /// [[0.2, −0.1, 0.5], [0.2, −0.2]] → token rewards [[−0.002, 0.001, 0.995], [−0.002, 0.002]] → returns (γ = 1)
    /// [[0.994, 0.996, 0.995], [0, 0.002]] → whitened over the 5 tokens: mean 0.5974, biased variance, rstd
    /// 2.0535593652552575. With γ = 0.9 the returns are [[0.80485, 0.8965, 0.995], [−0.0002, 0.002]].
    #[test]
    fn reinforce_pp_advantages_match_hand_computed_values() {
        let s = ReinforceSettings::default_for(false);
        let kl = vec![vec![0.2, -0.1, 0.5], vec![0.2, -0.2]];
        let a = advantages(&[1.0, 0.0], &kl, &[3, 2], &s, 1);
        let expected: [&[f64]; 2] = [
            &[0.8144416442602352, 0.8185487629907457, 0.8164952036254906],
            &[-1.2267963648034907, -1.2226892460729801],
        ];
        close_rows(&a, &expected, 1e-12);
        let g = ReinforceSettings { gamma: 0.9, ..s };
        let expected: [&[f64]; 2] = [
            &[0.5973901849281351, 0.8038256364350486, 1.0256902515297674],
            &[-1.2159307123510863, -1.2109753605418643],
        ];
        close_rows(&advantages(&[1.0, 0.0], &kl, &[3, 2], &g, 1), &expected, 1e-12);
    }

    /// REINFORCE++-baseline by hand: 2 prompts × 2, scores [1, 0 | 1, 1] → [0.5, −0.5 | 0, 0], lengths [3, 2, 1, 3],
    /// no KL: returns are the score on every token; over the 9 tokens mean 1/18, biased std 1/2.7136…: the advantages
    /// 1.2060453783110543 (first completion), −1.507556722888818 (second), −0.1507556722888818 (the tied group).
    #[test]
    fn reinforce_pp_baseline_advantages_match_hand_computed_values() {
        let s = ReinforceSettings { beta: 0.0, ..ReinforceSettings::default_for(true) };
        let a = advantages(&[1.0, 0.0, 1.0, 1.0], &[], &[3, 2, 1, 3], &s, 2);
        let (p, q, z) = (1.2060453783110543, -1.507556722888818, -0.1507556722888818);
        close_rows(&a, &[&[p, p, p], &[q, q], &[z], &[z, z, z]], 1e-12);
        // Scores are clipped after the baseline.
        let c = ReinforceSettings { reward_clip: 0.25, ..s };
        let a = advantages(&[1.0, 0.0], &[], &[1, 1], &c, 2);
        close_rows(&a, &[&[1.0], &[-1.0]], 1e-6);
    }

    /// PPO's token loss as OpenRLHF aggregates it, by hand: ρ = e^(logp − old) = [[e^0.1, 1, e^0.5], [1, e^−0.1]]
    /// with the advantages of the first example (5 real tokens): −min(ρA, clip(ρ)A) per token, summed / 5 =
    /// −0.07306177635339166.
    #[test]
    fn reinforce_pp_token_loss_matches_hand_computed_values() {
        let dev = candle_core::Device::Cpu;
        let t = |x: [[f64; 3]; 2]| {
            Tensor::from_vec(x.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>(), (2, 3), &dev).unwrap()
        };
        let lp = t([[-0.9, -0.5, -1.5], [-0.3, -1.3, 0.0]]);
        let old = t([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]]);
        let adv = t([
            [0.8144416442602352, 0.8185487629907457, 0.8164952036254906],
            [-1.2267963648034907, -1.2226892460729801, -1.2267963648034907],
        ]);
        let mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]);
        let (loss, clipped) = token_loss_tensor(&lp, &old, &adv, &mask, &ClipConfig::default(), 5.0).unwrap();
        assert!((scalar(&loss).unwrap() - -0.07306177635339166).abs() < 1e-6, "{}", scalar(&loss).unwrap());
        // Token (0, 2): ρ = e^0.5 > 1.2 with A > 0 is clipped high; nothing is clipped low.
        assert_eq!(clipped, [0.0, 1.0, 1.0]);
    }
}
