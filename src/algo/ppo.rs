//! PPO with TRL's PPOTrainer semantics (../shared/algorithms.md §6.2–6.4): the clipped value loss, the adaptive KL
//! controller, the step ([`ppo_update`]) and the algorithm with its value model ([`Ppo`]). The advantage side (per-token rewards, GAE, whitening) is in [`crate::advantage::gae`]; the clipped
//! policy surrogate is shared with GRPO in [`super::loss`].

use serde::{Deserialize, Serialize};

/// Value loss with PPO's clipping: ½·mean over real tokens of max((V − R)², (V_clip − R)²),
/// V_clip = V_old + clip(V − V_old, ±clip). (TRL and OpenRLHF; the PAR repo omits the ½.) Also returns the fraction
/// of tokens where the clipped term was the larger (`val/clipfrac_avg`).
pub fn clipped_value_loss(values: &[f64], old_values: &[f64], returns: &[f64], mask: &[f64], clip: f64) -> (f64, f64) {
    let (mut sum, mut clipped, mut n) = (0.0, 0.0, 0.0);
    for i in 0..values.len() {
        if mask[i] == 0.0 {
            continue;
        }
        let v_clip = super::loss::clipped_value(values[i], old_values[i], clip);
        let (a, b) = ((values[i] - returns[i]).powi(2), (v_clip - returns[i]).powi(2));
        sum += a.max(b);
        clipped += (b > a) as u8 as f64;
        n += 1.0;
    }
    if n == 0.0 {
        return (0.0, 0.0);
    }
    (0.5 * sum / n, clipped / n)
}

/// Tensor [`clipped_value_loss`], as PPO's update differentiates it: `v`, `v_old`, `returns`, `mask` `[b, C]`.
/// Returns the loss (differentiable wrt `v`) and the 0/1 indicator `[b, C]` of tokens where the clipped term is the
/// larger (for `val/clipfrac_avg`).
pub fn clipped_value_loss_tensor(
    v: &Tensor,
    v_old: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<(Tensor, Tensor)> {
    let v_clip = super::loss::clipped_value_tensor(v, v_old, clip)?;
    let (a, b) = ((v - returns)?.sqr()?, (&v_clip - returns)?.sqr()?);
    let loss = (masked_mean_tensor(&a.maximum(&b)?, mask)? * 0.5)?;
    Ok((loss, b.gt(&a)?.to_dtype(candle_core::DType::F32)?))
}

/// The adaptive KL controller of Ziegler et al. (OpenRLHF's `AdaptiveKLController`): after a step with measured KL
/// over `n` samples, e = clip(KL/target − 1, ±0.2), β ← β·(1 + e·n/horizon). Without a target β stays fixed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    pub beta: f64,
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    pub fn update(&mut self, kl: f64, n: usize) {
        let Some(target) = self.target else { return };
        if !kl.is_finite() {
            return;
        }
        let e = (kl / target - 1.0).clamp(-0.2, 0.2);
        self.beta *= 1.0 + e * n as f64 / self.horizon;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_value_loss_worked_example() {
        // algorithms.md §6.3: V_old [0.5, 0.6, 0.7], V [0.9, 0.55, 0.2], returns [0.69776, 0.833, 0.975], clip 0.2
        // → V_clip [0.7, 0.55, 0.5]; per-token max [0.0409010176, 0.080089, 0.600625]; ½·mean = 0.12026916959999996.
        let (loss, frac) = clipped_value_loss(
            &[0.9, 0.55, 0.2, 9.0],
            &[0.5, 0.6, 0.7, 0.0],
            &[0.69776, 0.833, 0.975, 0.0],
            &[1.0, 1.0, 1.0, 0.0],
            0.2,
        );
        assert!((loss - 0.12026916959999996).abs() < 1e-15, "{loss}");
        // The unclipped term is the larger everywhere: (0.9 − R)² = 0.0409 > (0.7 − R)² = 5.0e-6; token 1 is inside
        // the clip range (equal terms); (0.2 − R)² = 0.6006 > (0.5 − R)² = 0.2256. The padded token is ignored.
        assert_eq!(frac, 0.0);
        let (_, frac) = clipped_value_loss(&[0.9], &[0.5], &[1.5], &[1.0], 0.2);
        assert_eq!(frac, 1.0); // (0.9 − 1.5)² = 0.36 < (0.7 − 1.5)² = 0.64
    }

    /// The tensor loss PPO trains with equals the f64 golden version on §6.3's worked example, and its gradient is
    /// the unclipped term's where that is the larger: ∂/∂V of ½·mean (V − R)² = (V − R)/n.
    #[test]
    fn clipped_value_loss_tensor_matches_the_golden_version() {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let row = |x: &[f32]| Tensor::new(x, &dev).unwrap().unsqueeze(0).unwrap();
        let v = Var::from_tensor(&row(&[0.9, 0.55, 0.2, 9.0])).unwrap();
        let (v_old, ret) = (row(&[0.5, 0.6, 0.7, 0.0]), row(&[0.69776, 0.833, 0.975, 0.0]));
        let mask = row(&[1.0, 1.0, 1.0, 0.0]);
        let (loss, clipped) = clipped_value_loss_tensor(v.as_tensor(), &v_old, &ret, &mask, 0.2).unwrap();
        let loss_value = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((loss_value - 0.12026916959999996).abs() < 1e-6, "{loss_value}");
        assert_eq!(clipped.to_vec2::<f32>().unwrap(), vec![vec![0.0, 0.0, 0.0, 0.0]]);
        let g = loss.backward().unwrap().get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // Token 1 is inside the clip range (both terms equal: the gradient is the unclipped one); token 3 is padding.
        for (t, (vi, ri)) in [(0.9, 0.69776), (0.55, 0.833), (0.2, 0.975)].iter().enumerate() {
            assert!((g[0][t] as f64 - (vi - ri) / 3.0).abs() < 1e-6, "token {t}: {}", g[0][t]);
        }
        assert_eq!(g[0][3], 0.0);
        // Clipped side: (0.9 − 1.5)² < (0.7 − 1.5)², the clipped term wins and V gets no gradient through it.
        let v = Var::from_tensor(&row(&[0.9])).unwrap();
        let (loss, clipped) =
            clipped_value_loss_tensor(v.as_tensor(), &row(&[0.5]), &row(&[1.5]), &row(&[1.0]), 0.2).unwrap();
        let (golden, frac) = clipped_value_loss(&[0.9], &[0.5], &[1.5], &[1.0], 0.2);
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - golden).abs() < 1e-6);
        assert_eq!((clipped.to_vec2::<f32>().unwrap()[0][0] as f64, frac), (1.0, 1.0));
        assert_eq!(loss.backward().unwrap().get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap(), vec![vec![0.0]]);
    }

    #[test]
    fn adaptive_kl_worked_example() {
        // §6.4: β = 0.1, target 6, horizon 10000, n = 256: KL 8 → 0.100512; KL 3 → 0.09999737856; KL 6.6 →
        // 0.10025337184911359. Fixed controller: unchanged.
        let mut c = KlController { beta: 0.1, target: Some(6.0), horizon: 10000.0 };
        c.update(8.0, 256);
        assert!((c.beta - 0.100512).abs() < 1e-15);
        c.update(3.0, 256);
        assert!((c.beta - 0.09999737856).abs() < 1e-15);
        c.update(6.6, 256);
        assert!((c.beta - 0.10025337184911359).abs() < 1e-15, "{}", c.beta);
        let mut fixed = KlController { beta: 0.1, target: None, horizon: 10000.0 };
        fixed.update(8.0, 256);
        assert_eq!(fixed.beta, 0.1);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The PPO step.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::loss::{
    clip_indicators_tensor, clipped_surrogate_tensor, masked_mean_tensor, scalar, ClipConfig, KlEstimator,
};
use crate::advantage::gae::{gae, token_rewards, value_len, whiten, ScorePlacement, Whitening};
use crate::model::logprobs::{completion_logprobs, SequenceBatch};
use crate::model::value::ValueModel;
use crate::model::CausalLm;
use crate::optim::{clip_grad_norm, norm_limit, AdamW, GradAccumulator};

/// PPO's hyperparameters as the recipe gives them (`algorithm.*` when `kind = "ppo"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoParams {
    pub gamma: f64,
    pub lam: f64,
    /// Passes over the step's rollouts (TRL `num_ppo_epochs`).
    pub epochs: usize,
    /// Optimizer steps per epoch; rows are reshuffled each epoch.
    pub num_mini_batches: usize,
    /// Weight of the value loss (TRL `vf_coef`).
    pub vf_coef: f64,
    /// Value clipping range (TRL `cliprange_value`).
    pub value_clip: f64,
    pub kl_estimator: KlEstimator,
    pub whitening: Whitening,
    pub placement: ScorePlacement,
    /// Subtracted from the score of a completion that did not end with EOS.
    pub missing_eos_penalty: Option<f64>,
    /// Adaptive KL target (None = fixed β) and horizon, for [`KlController`].
    pub kl_target: Option<f64>,
    pub kl_horizon: f64,
}

/// A PPO step's configuration: the recipe's parameters plus what the trainer decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoConfig {
    pub params: PpoParams,
    pub clip: ClipConfig,
    /// Rows per forward/backward within a mini-batch.
    pub micro_batch_size: usize,
    pub temperature: f64,
    pub max_grad_norm: f64,
    pub critic_max_grad_norm: f64,
    pub pad_id: u32,
    pub logprob_chunk: usize,
    /// Seeds the per-epoch shuffles: (seed, step, epoch).
    pub seed: u64,
}

/// One step's rollouts for PPO.
pub struct PpoBatch<'a> {
    pub prompts: &'a [Vec<u32>],
    pub completions: &'a [Vec<u32>],
    /// One scalar reward per completion (the sequence score).
    pub scores: &'a [f64],
    /// Whether each completion ended with EOS (for `missing_eos_penalty` and `val/num_eos_tokens`).
    pub ended_with_eos: &'a [bool],
    /// Recorded rollout-time log-probs (a replay file's `old_logprobs`); `None`: computed from the rollout view.
    pub old_logprobs: Option<&'a [Vec<f32>]>,
}

/// What a PPO step logs (TRL's names in [`crate::metrics::names`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PpoMetrics {
    /// Mean over sequences of Σ_t kl_t (`objective/kl`).
    pub kl_sum: f64,
    /// Mean per-token KL (what the adaptive controller sees).
    pub kl_token_mean: f64,
    /// Mean over sequences of Σ_t −logp_t at rollout (`objective/entropy`).
    pub entropy_sum: f64,
    pub non_score_reward: f64,
    pub rlhf_reward: f64,
    pub scores: f64,
    pub approxkl: f64,
    pub clipfrac: f64,
    pub entropy: f64,
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub vf_clipfrac: f64,
    pub ratio_mean: f64,
    pub ratio_var: f64,
    pub num_eos: f64,
    pub grad_norm: f64,
    pub critic_grad_norm: f64,
    /// β used for this step's rewards.
    pub kl_coef: f64,
}

/// Rows `[b][C]` of a `[b, C]` tensor.
fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    // Widened on the host: Metal has no f64.
    Ok(t.to_device(&candle_core::Device::Cpu)?.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?)
}

/// Tensor `[b, C]` from rows of f64 (f32).
fn tensor(rows: &[Vec<f64>], device: &candle_core::Device) -> Result<Tensor> {
    let (b, c) = (rows.len(), rows.first().map_or(0, Vec::len));
    let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(flat, (b, c), device)?)
}

/// One PPO step, as TRL's PPOTrainer: rollout-time log-probs, reference log-probs and values (no graph) →
/// per-token rewards (−β·KL, plus the score) → GAE → whitened advantages → `epochs` passes of `num_mini_batches`
/// shuffled mini-batches, each one optimizer step of policy and critic on pg + vf_coef·vf. A non-finite loss or
/// grad norm stops the step before that optimizer step (returned as non-finite metrics).
#[allow(clippy::too_many_arguments)]
pub fn ppo_update(
    policy: &CausalLm,
    rollout_view: &CausalLm,
    reference: Option<&CausalLm>,
    critic: &ValueModel,
    policy_opt: &mut AdamW,
    critic_opt: &mut AdamW,
    kl: &KlController,
    batch: &PpoBatch,
    cfg: &PpoConfig,
    step: u64,
) -> Result<PpoMetrics> {
    let n = batch.completions.len();
    if n == 0 || [batch.prompts.len(), batch.scores.len(), batch.ended_with_eos.len()].iter().any(|&l| l != n) {
        bail!("PPO update: inconsistent batch sizes");
    }
    let dev = policy.device();
    let micro = cfg.micro_batch_size.clamp(1, n);
    let width = batch.completions.iter().map(Vec::len).max().unwrap_or(1).max(1);
    // Every micro-batch is padded to the step's widest completion, so its rows line up with the step's [n, C] rows.
    let seqs = |idx: &[usize]| -> Result<SequenceBatch> {
        let p: Vec<Vec<u32>> = idx.iter().map(|&i| batch.prompts[i].clone()).collect();
        let c: Vec<Vec<u32>> = idx.iter().map(|&i| batch.completions[i].clone()).collect();
        SequenceBatch::with_width(&p, &c, cfg.pad_id, policy.config().sliding_window, dev, width)
    };
    let all: Vec<usize> = (0..n).collect();

    // 1. Rollout-time quantities, without a graph.
    let (mut old, mut refs, mut v_old) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for idx in all.chunks(micro) {
        let s = seqs(idx)?;
        match batch.old_logprobs {
            Some(recorded) => old.extend(
                idx.iter()
                    .map(|&i| (0..width).map(|t| recorded[i].get(t).map_or(0.0, |&x| x as f64)).collect::<Vec<f64>>()),
            ),
            None => {
                old.extend(rows(&completion_logprobs(rollout_view, &s, cfg.temperature, cfg.logprob_chunk, false)?.0)?)
            }
        }
        if let Some(r) = reference {
            refs.extend(rows(&completion_logprobs(r, &s, cfg.temperature, cfg.logprob_chunk, false)?.0)?);
        }
        v_old.extend(rows(&critic.values(&s)?.detach())?);
    }
    let mask: Vec<Vec<f64>> =
        batch.completions.iter().map(|c| (0..width).map(|t| if t < c.len() { 1.0 } else { 0.0 }).collect()).collect();

    // 2. Per-token rewards, GAE, whitening.
    let beta = kl.beta;
    let mut m = PpoMetrics { kl_coef: beta, ..Default::default() };
    let (mut advantages, mut returns) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut kl_tokens = 0.0;
    for i in 0..n {
        let kl_row: Vec<f64> = (0..width)
            .map(|t| match refs.get(i) {
                Some(r) if mask[i][t] > 0.0 => cfg.params.kl_estimator.eval(old[i][t], r[t]),
                _ => 0.0,
            })
            .collect();
        let mut score = batch.scores[i];
        if let (Some(p), false) = (cfg.params.missing_eos_penalty, batch.ended_with_eos[i]) {
            score -= p;
        }
        let r = token_rewards(&kl_row, &mask[i], score, beta, cfg.params.placement);
        let (a, ret) =
            gae(&r, &v_old[i], &mask[i], value_len(&mask[i], cfg.params.placement), cfg.params.gamma, cfg.params.lam);
        let kl_sum: f64 = kl_row.iter().sum();
        m.kl_sum += kl_sum / n as f64;
        kl_tokens += kl_sum;
        m.non_score_reward += -beta * kl_sum / n as f64;
        m.scores += score / n as f64;
        m.entropy_sum += (0..width).filter(|&t| mask[i][t] > 0.0).map(|t| -old[i][t]).sum::<f64>() / n as f64;
        advantages.push(a);
        returns.push(ret);
    }
    m.rlhf_reward = m.scores + m.non_score_reward;
    m.kl_token_mean = kl_tokens / mask.iter().flatten().sum::<f64>().max(1.0);
    m.num_eos = batch.ended_with_eos.iter().filter(|&&e| e).count() as f64;
    whiten(&mut advantages, &mask, cfg.params.whitening);

    // 3. Epochs of shuffled mini-batches.
    let vars: Vec<(String, candle_core::Var)> = policy.vars().iter().chain(critic.vars()).cloned().collect();
    let mini = n.div_ceil(cfg.params.num_mini_batches.max(1));
    let (mut updates, mut tokens) = (0.0f64, 0.0f64);
    let (mut ratios, mut ratio_sq) = (0.0f64, 0.0f64);
    for epoch in 0..cfg.params.epochs {
        let order = super::batching::shuffled_order(n, cfg.seed, step, epoch, PPO_SHUFFLE_STREAM);
        for mb in order.chunks(mini) {
            let chunks: Vec<&[usize]> = mb.chunks(micro).collect();
            let accum = chunks.len() as f64;
            let mut acc = GradAccumulator::new();
            for idx in chunks {
                let s = seqs(idx)?;
                let pick = |src: &[Vec<f64>]| tensor(&idx.iter().map(|&i| src[i].clone()).collect::<Vec<_>>(), dev);
                let (logp, ent) = completion_logprobs(policy, &s, cfg.temperature, cfg.logprob_chunk, true)?;
                let (old_t, adv_t, ret_t, vold_t) = (pick(&old)?, pick(&advantages)?, pick(&returns)?, pick(&v_old)?);
                let mask_t = &s.completion_mask;
                let log_ratio = (&logp - &old_t)?;
                let ratio = log_ratio.exp()?;
                let pg = masked_mean_tensor(&clipped_surrogate_tensor(&ratio, &adv_t, &cfg.clip)?, mask_t)?;
                let v = critic.values(&s)?;
                let (vf, vf_clipped) = clipped_value_loss_tensor(&v, &vold_t, &ret_t, mask_t, cfg.params.value_clip)?;
                let loss = ((&pg + (&vf * cfg.params.vf_coef)?)? / accum)?;
                let value = scalar(&loss)?;
                if !value.is_finite() {
                    return Ok(PpoMetrics { pg_loss: f64::NAN, ..m });
                }
                acc.add(loss.backward()?, &vars)?;
                // Metrics (token-weighted over the step).
                let w = scalar(&mask_t.sum_all()?)?;
                let (_, _, region) = clip_indicators_tensor(&ratio, &adv_t, &cfg.clip)?;
                m.clipfrac += scalar(&masked_mean_tensor(&region, mask_t)?)? * w;
                m.approxkl += 0.5 * scalar(&masked_mean_tensor(&log_ratio.detach().sqr()?, mask_t)?)? * w;
                m.entropy += scalar(&masked_mean_tensor(&ent.expect("requested"), mask_t)?)? * w;
                m.pg_loss += scalar(&pg)? * w;
                m.vf_loss += scalar(&vf)? * w;
                m.vf_clipfrac += scalar(&masked_mean_tensor(&vf_clipped, mask_t)?)? * w;
                let r = ratio.detach();
                ratios += scalar(&(&r * mask_t)?.sum_all()?)?;
                ratio_sq += scalar(&(r.sqr()? * mask_t)?.sum_all()?)?;
                tokens += w;
            }
            let mut grads = acc.finish();
            let gp = clip_grad_norm(&mut grads, policy.vars(), norm_limit(cfg.max_grad_norm))?;
            let gc = clip_grad_norm(&mut grads, critic.vars(), norm_limit(cfg.critic_max_grad_norm))?;
            if !gp.is_finite() || !gc.is_finite() {
                return Ok(PpoMetrics { grad_norm: gp, critic_grad_norm: gc, ..m });
            }
            policy_opt.step(&grads)?;
            critic_opt.step(&grads)?;
            m.grad_norm += gp;
            m.critic_grad_norm += gc;
            updates += 1.0;
        }
    }
    let t = tokens.max(1.0);
    for x in [&mut m.clipfrac, &mut m.approxkl, &mut m.entropy, &mut m.pg_loss, &mut m.vf_loss, &mut m.vf_clipfrac] {
        *x /= t;
    }
    m.ratio_mean = ratios / t;
    m.ratio_var = ratio_sq / t - m.ratio_mean * m.ratio_mean;
    m.grad_norm /= updates.max(1.0);
    m.critic_grad_norm /= updates.max(1.0);
    Ok(m)
}

/// Tags the per-epoch shuffle streams.
const PPO_SHUFFLE_STREAM: u64 = 0x9900_0000_0000_0001;

// ---------------------------------------------------------------------------------------------------------------
// The algorithm: settings, the value model, the KL controller.

use super::boundary::{Algorithm, Models, Needs, Runtime, StepBatch, TensorFileReader, TensorFiles};
use super::critic::{actor_critic_lr, Critic, CriticParams, CriticState};
use super::{Keys, Problem, RecipeShape, Setup, StepOutcome};
use crate::metrics::{names, Record};
use crate::model::{LoadedModel, ModelSource};
use crate::rollout::generate::FinishReason;

/// PPO's settings: `algorithm.*` (TRL's `PPOConfig` names) and `[critic]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PpoSettings {
    pub params: PpoParams,
    /// Initial KL coefficient β of the per-token KL reward (the adaptive controller moves it).
    pub beta: f64,
    pub clip: ClipConfig,
    pub critic: CriticParams,
    /// Where the value model starts: "policy", "reward_model", or a model id.
    pub critic_init: String,
    /// `critic.lora`: the value model trains LoRA adapters (the policy's [lora] settings) and its head only.
    pub critic_lora: bool,
}

impl Default for PpoParams {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            lam: 0.95,
            epochs: 4,
            num_mini_batches: 1,
            vf_coef: 0.1,
            value_clip: 0.2,
            kl_estimator: KlEstimator::K1,
            whitening: Whitening::Unbiased,
            placement: ScorePlacement::LastToken,
            missing_eos_penalty: None,
            kl_target: None,
            kl_horizon: 10000.0,
        }
    }
}

impl Default for PpoSettings {
    fn default() -> Self {
        Self {
            params: PpoParams::default(),
            beta: 0.0,
            clip: ClipConfig::default(),
            critic: CriticParams::default(),
            critic_init: "policy".into(),
            critic_lora: false,
        }
    }
}

impl PpoSettings {
    pub fn from_keys(k: &dyn Keys) -> Self {
        Self {
            params: PpoParams {
                gamma: k.float("algorithm.gamma"),
                lam: k.float("algorithm.lam"),
                epochs: k.usize("algorithm.ppo_epochs"),
                num_mini_batches: k.usize("algorithm.num_mini_batches"),
                vf_coef: k.float("algorithm.vf_coef"),
                value_clip: k.float("algorithm.value_clip"),
                kl_estimator: KlEstimator::from_keys(k),
                whitening: k.choice("algorithm.whiten", Whitening::from_name),
                placement: k.choice("algorithm.score_placement", ScorePlacement::from_name),
                missing_eos_penalty: k.opt_float("algorithm.missing_eos_penalty"),
                kl_target: k.opt_float("algorithm.kl_target"),
                kl_horizon: k.float("algorithm.kl_horizon"),
            },
            beta: k.float("algorithm.beta"),
            clip: ClipConfig::from_keys(k),
            critic: CriticParams::from_keys(k),
            critic_init: k.string("critic.init"),
            critic_lora: k.boolean("critic.lora"),
        }
    }

    pub fn needs(&self) -> Needs {
        Needs {
            reference: self.beta > 0.0 || self.params.kl_target.is_some(),
            // With an adaptive target the reference stays whatever β starts at.
            reference_for_beta_only: self.params.kl_target.is_none(),
            value_model: true,
            value_model_lora: self.critic_lora,
            value_model_shares_policy: self.critic_lora && self.critic_init == "policy",
            recorded_logprobs: true,
            ..Needs::default()
        }
    }

    pub fn summary(&self) -> String {
        let p = &self.params;
        let kl = p.kl_target.map_or("fixed".to_string(), |t| format!("target {t}"));
        format!(
            "beta {} ({kl}), epsilon {}/{}, ppo_epochs {}, num_mini_batches {}, vf_coef {}, critic from {}{}",
            self.beta,
            self.clip.eps_low,
            self.clip.eps_high,
            p.epochs,
            p.num_mini_batches,
            p.vf_coef,
            self.critic_init,
            if self.critic_lora { " (LoRA)" } else { "" }
        )
    }

    pub fn problems(&self, shape: &RecipeShape) -> Vec<Problem> {
        let mut out: Vec<Problem> =
            super::batching::mini_batch_problem(shape.completions_per_step(), self.params.num_mini_batches)
                .into_iter()
                .collect();
        if self.critic_init == "reward_model" && !shape.rewards.iter().any(|(_, model)| *model) {
            out.push(Problem::at(
                "critic.init",
                "`critic.init` = \"reward_model\" needs a [[reward]] with kind = \"model\" to start from",
            ));
        }
        out
    }
}

/// PPO's state between steps besides the weights: the KL controller and the value model's optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PpoState {
    pub kl_controller: KlController,
    pub critic: CriticState,
}

/// XORed into `run.seed` for the LoRA value model's A, so its initialisation is not the policy's.
const CRITIC_LORA_STREAM: u64 = 0xC217_1C00;

/// PPO (TRL's PPOTrainer): a value model, per-token KL rewards, GAE, epochs of shuffled mini-batches.
pub struct Ppo {
    settings: PpoSettings,
    critic: Critic<ValueModel>,
    kl: KlController,
}

impl Ppo {
    /// Loads the value model from `critic.init`.
    pub fn new(settings: PpoSettings, setup: &Setup) -> Result<Self> {
        let source = match settings.critic_init.as_str() {
            "policy" => setup.policy_source.clone(),
            "reward_model" => ModelSource::parse(
                setup.reward_model.context("critic.init = \"reward_model\" needs a reward model")?,
                None,
            )?,
            path => ModelSource::parse(path, None).context("critic.init")?,
        };
        let value = if settings.critic_lora {
            let policy_lora = setup.policy_model.lora().context("critic.lora = true needs a [lora] table")?;
            // The value model's own A: streams apart from the policy's (keyed by a different seed).
            let spec = crate::model::lora::LoraSpec { seed: setup.seed ^ CRITIC_LORA_STREAM, ..policy_lora.clone() };
            if settings.critic_init == "policy" {
                ValueModel::lora_on(setup.policy_model.without_adapters()?, None, &spec)
            } else {
                let loaded = LoadedModel::load(&source, setup.device, setup.dtype)?;
                ValueModel::lora_from_loaded(loaded, &spec, setup.device, setup.dtype)
            }
        } else {
            // Loaded in the master weights' dtype (f32 under bf16), which from_loaded keeps.
            let loaded = LoadedModel::load(&source, setup.device, crate::model::master_dtype(setup.dtype, true))?;
            ValueModel::from_loaded(loaded, setup.device, setup.dtype)
        }
        .context("loading the value model (critic.init)")?;
        if value.vocab_size() != setup.policy.vocab_size {
            bail!(
                "critic.init = \"{}\" has a vocabulary of {} tokens, the policy {}: the value model reads the policy's \
                 token ids, so it needs the same tokenizer",
                settings.critic_init,
                value.vocab_size(),
                setup.policy.vocab_size
            );
        }
        let critic = Critic::new(value, settings.critic.clone(), setup.optim)?;
        let p = &settings.params;
        let kl = KlController { beta: settings.beta, target: p.kl_target, horizon: p.kl_horizon };
        Ok(Self { settings, critic, kl })
    }
}

impl Algorithm for Ppo {
    /// One PPO step with the value model; the KL controller moves after it.
    fn update(
        &mut self,
        m: Models,
        batch: &StepBatch,
        _advantages: Option<&[f64]>,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<StepOutcome> {
        let lr = actor_critic_lr(rt, m.optimizer, &mut self.critic);
        let p = &self.settings.params;
        let (prompts, completions) = batch.token_ids();
        // A sample no reward applied to scores 0.
        let scores: Vec<f64> = batch.scored.total.iter().map(|&r| if r.is_nan() { 0.0 } else { r }).collect();
        let eos: Vec<bool> = batch.samples.iter().map(|s| s.finish == FinishReason::Eos).collect();
        let cfg = PpoConfig {
            params: *p,
            clip: self.settings.clip,
            micro_batch_size: rt.micro_batch_size,
            temperature: rt.temperature,
            max_grad_norm: rt.optim.max_grad_norm,
            critic_max_grad_norm: self.settings.critic.max_grad_norm,
            pad_id: rt.pad_id,
            logprob_chunk: rt.logprob_chunk,
            seed: rt.seed,
        };
        let reference = m.reference.filter(|_| self.kl.beta > 0.0 || self.kl.target.is_some());
        let recorded = super::boundary::recorded_logprobs(batch.samples);
        let ppo_batch = PpoBatch {
            prompts: &prompts,
            completions: &completions,
            scores: &scores,
            ended_with_eos: &eos,
            old_logprobs: recorded.as_deref(),
        };
        let critic = &mut self.critic;
        // A LoRA value model's dropout: streams apart from the policy's.
        critic.model.begin_dropout_step(rt.seed ^ CRITIC_LORA_STREAM, rt.step);
        let u = ppo_update(
            m.policy,
            m.rollout_view,
            reference,
            &critic.model,
            m.optimizer,
            &mut critic.optimizer,
            &self.kl,
            &ppo_batch,
            &cfg,
            rt.step,
        )?;
        if !u.pg_loss.is_finite() {
            return Ok(StepOutcome::skipped("loss", "the PPO loss is not finite"));
        }
        if !u.grad_norm.is_finite() || !u.critic_grad_norm.is_finite() {
            let reason =
                format!("the gradient norm is {} (policy) / {} (value model)", u.grad_norm, u.critic_grad_norm);
            return Ok(StepOutcome::skipped("gradient", reason));
        }
        self.kl.update(u.kl_token_mean, batch.samples.len());
        for (name, v) in [
            (names::PPO_KL, u.kl_sum),
            (names::PPO_ENTROPY, u.entropy_sum),
            (names::PPO_NON_SCORE_REWARD, u.non_score_reward),
            (names::PPO_RLHF_REWARD, u.rlhf_reward),
            (names::PPO_SCORES, u.scores),
            (names::PPO_APPROXKL, u.approxkl),
            (names::PPO_CLIPFRAC, u.clipfrac),
            (names::PPO_POLICY_ENTROPY, u.entropy),
            (names::PPO_LOSS_POLICY, u.pg_loss),
            (names::PPO_LOSS_VALUE, u.vf_loss),
            (names::PPO_VAL_CLIPFRAC, u.vf_clipfrac),
            (names::PPO_VAL_RATIO, u.ratio_mean),
            (names::PPO_VAL_RATIO_VAR, u.ratio_var),
            (names::PPO_VAL_NUM_EOS, u.num_eos),
            (names::PPO_KL_COEF, u.kl_coef),
            (names::KL, u.kl_token_mean),
            (names::ENTROPY, u.entropy),
            (names::LOSS, u.pg_loss + p.vf_coef * u.vf_loss),
            (names::GRAD_NORM, u.grad_norm),
            (names::CRITIC_GRAD_NORM, u.critic_grad_norm),
            (names::LEARNING_RATE, lr),
        ] {
            record.set(name, v);
        }
        Ok(StepOutcome::Trained)
    }

    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(PpoState { kl_controller: self.kl, critic: self.critic.state() })?)
    }

    fn tensor_files(&self) -> TensorFiles {
        self.critic.tensor_files()
    }

    fn restore(&mut self, state: &serde_json::Value, files: TensorFileReader) -> Result<()> {
        let s: PpoState = super::boundary::parse_state(state, "ppo")?;
        self.kl = s.kl_controller;
        self.critic.restore(&s.critic, files)
    }
}
