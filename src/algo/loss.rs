//! Loss pieces shared by the policy-gradient algorithms (GRPO, PPO, SAFE, RLOO, REINFORCE++): KL estimators, the
//! clipped surrogate with its clip indicators, and the aggregation of per-token losses over a completion mask.
//!
//! Every piece exists twice: over `f64` scalars/slices (the golden tests' reference, "numbers in, numbers out") and
//! over candle Tensors built only from ops that have a backward. Tensor conventions: per-token tensors are `[B, T]`
//! (B completions, T completion positions), advantages `[B]`, the mask `[B, T]` of 0/1 in the loss dtype. Padding
//! positions must hold finite values (the mask multiplies, so a NaN there would leak into the loss).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------------------------
// KL estimators (Schulman's k1/k2/k3, per token; algorithms.md §0), d = logp − ref.

/// Which per-token estimate of KL(π ‖ π_ref) to use from the sampled token's log-probs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// k1 = d: unbiased, high variance, can be negative.
    K1,
    /// k2 = d²/2: biased, low variance, ≥ 0.
    K2,
    /// k3 = e^(−d) − 1 + d: unbiased and ≥ 0 (TRL GRPO's choice).
    #[default]
    K3,
}

/// k1 = logp − ref.
pub fn kl_k1(logp: f64, ref_logp: f64) -> f64 {
    logp - ref_logp
}

/// k2 = (logp − ref)²/2.
pub fn kl_k2(logp: f64, ref_logp: f64) -> f64 {
    let d = logp - ref_logp;
    d * d / 2.0
}

/// k3 = e^(ref − logp) − (ref − logp) − 1, TRL's order of operations.
pub fn kl_k3(logp: f64, ref_logp: f64) -> f64 {
    let x = ref_logp - logp;
    x.exp() - x - 1.0
}

impl KlEstimator {
    /// `algorithm.kl_estimator` (PPO, REINFORCE++).
    pub fn from_keys(k: &dyn super::Keys) -> Self {
        match k.string("algorithm.kl_estimator").as_str() {
            "k1" => KlEstimator::K1,
            "k2" => KlEstimator::K2,
            _ => KlEstimator::K3,
        }
    }

    /// The estimate for one token.
    pub fn eval(self, logp: f64, ref_logp: f64) -> f64 {
        match self {
            KlEstimator::K1 => kl_k1(logp, ref_logp),
            KlEstimator::K2 => kl_k2(logp, ref_logp),
            KlEstimator::K3 => kl_k3(logp, ref_logp),
        }
    }

    /// The estimate per token, differentiable wrt `logp` (and `ref_logp`, which callers normally pass detached).
    pub fn tensor(self, logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
        Ok(match self {
            KlEstimator::K1 => (logp - ref_logp)?,
            KlEstimator::K2 => ((logp - ref_logp)?.sqr()? * 0.5)?,
            KlEstimator::K3 => {
                let x = (ref_logp - logp)?;
                ((x.exp()? - &x)? - 1.0)?
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Clipped surrogate (PPO/GRPO), per token.

/// The trust region of the ratio ρ = π/π_old.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipConfig {
    /// ρ is clipped below at 1 − eps_low (TRL `epsilon`, default 0.2).
    pub eps_low: f64,
    /// ρ is clipped above at 1 + eps_high (TRL `epsilon_high`, defaults to `epsilon`; DAPO suggests 0.28).
    pub eps_high: f64,
    /// Optional cap on ρ in the *unclipped* term (TRL `delta`, two-sided clipping; None = off).
    pub delta: Option<f64>,
}

impl ClipConfig {
    /// `algorithm.epsilon` and `algorithm.epsilon_high` (no `delta`: TRL's default), for every algorithm.
    pub fn from_keys(k: &dyn super::Keys) -> Self {
        Self { eps_low: k.float("algorithm.epsilon"), eps_high: k.float("algorithm.epsilon_high"), delta: None }
    }
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self { eps_low: 0.2, eps_high: 0.2, delta: None }
    }
}

/// Per-token clipped-surrogate loss −min(ρ̃·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), ρ̃ = min(ρ, delta) if delta is set.
pub fn clipped_surrogate(ratio: f64, advantage: f64, clip: &ClipConfig) -> f64 {
    let unclipped = clip.delta.map_or(ratio, |d| ratio.min(d));
    let clipped = ratio.max(1.0 - clip.eps_low).min(1.0 + clip.eps_high);
    -(unclipped * advantage).min(clipped * advantage)
}

/// Whether a token is clipped, as TRL counts it: "low" = ρ < 1 − ε_low with A < 0, "high" = ρ > 1 + ε_high with
/// A > 0 (exactly the cases where the clipped term wins the min and the gradient vanishes); "region" = either.
/// Returns `(low, high)`.
pub fn clip_flags(ratio: f64, advantage: f64, clip: &ClipConfig) -> (bool, bool) {
    (ratio < 1.0 - clip.eps_low && advantage < 0.0, ratio > 1.0 + clip.eps_high && advantage > 0.0)
}

/// Tensor [`clipped_surrogate`]: `ratio` `[B, T]`, `advantages` `[B]` (per sequence) or `[B, T]` (per token). The
/// gradient wrt ρ is exactly 0 where clipped (clamp and minimum route it to the constant bound).
pub fn clipped_surrogate_tensor(ratio: &Tensor, advantages: &Tensor, clip: &ClipConfig) -> Result<Tensor> {
    let adv = per_token(advantages)?;
    let unclipped = match clip.delta {
        Some(d) => ratio.minimum(d)?,
        None => ratio.clone(),
    };
    let clipped = ratio.clamp(1.0 - clip.eps_low, 1.0 + clip.eps_high)?;
    Ok(unclipped.broadcast_mul(&adv)?.minimum(&clipped.broadcast_mul(&adv)?)?.neg()?)
}

/// Advantages as `[B, 1]` (one per sequence, GRPO) or `[B, T]` (per token, PPO), ready to broadcast over `[B, T]`.
fn per_token(advantages: &Tensor) -> Result<Tensor> {
    Ok(if advantages.rank() == 1 { advantages.unsqueeze(1)? } else { advantages.clone() })
}

/// Clip indicators (0/1, detached, dtype of `ratio`) `[B, T]` as in [`clip_flags`]: `(low, high, region)`.
pub fn clip_indicators_tensor(
    ratio: &Tensor,
    advantages: &Tensor,
    clip: &ClipConfig,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = ratio.dtype();
    let ratio = ratio.detach();
    let adv = per_token(&advantages.detach())?;
    let low = ratio.lt(1.0 - clip.eps_low)?.to_dtype(dtype)?.broadcast_mul(&adv.lt(0.0)?.to_dtype(dtype)?)?;
    let high = ratio.gt(1.0 + clip.eps_high)?.to_dtype(dtype)?.broadcast_mul(&adv.gt(0.0)?.to_dtype(dtype)?)?;
    // Low needs A < 0 and high A > 0, so they never overlap and the region is their sum.
    let region = (&low + &high)?;
    Ok((low, high, region))
}

/// Value clipping (PPO, SAFE): V_clip = V_old + clip(V − V_old, ±clip), so a value moves at most `clip` from its
/// rollout-time estimate through the clipped term.
pub fn clipped_value(v: f64, v_old: f64, clip: f64) -> f64 {
    v_old + (v - v_old).clamp(-clip, clip)
}

/// Tensor [`clipped_value`], elementwise; differentiable wrt `v` inside the clip range.
pub fn clipped_value_tensor(v: &Tensor, v_old: &Tensor, clip: f64) -> Result<Tensor> {
    Ok((v_old + (v - v_old)?.clamp(-clip, clip)?)?)
}

/// Masked mean Σ m·x / max(Σ m, 1) (TRL's `masked_batch_mean` on one process), as a scalar tensor.
pub fn masked_mean_tensor(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let n = mask.sum_all()?.maximum(1.0)?;
    Ok((x * mask)?.sum_all()?.div(&n)?)
}

/// [`masked_mean_tensor`] over rows of `f64`.
pub fn masked_mean(x: &[Vec<f64>], mask: &[Vec<f64>]) -> f64 {
    let (s, n) = masked_sum_count(x, mask);
    s / n.max(1.0)
}

// ---------------------------------------------------------------------------------------------------------------
// Aggregation of per-token losses into the scalar that is differentiated (TRL `loss_type`).

choice_enum!(
/// How per-token losses become one scalar (algorithms.md §6.1). All but `Dapo` divide by the accumulation steps.
    #[derive(Default)]
    LossType {
        /// Token sum / active tokens of the whole accumulated global batch (TRL's default).
        #[default]
        Dapo = "dapo",
        /// Mean over sequences of each sequence's token mean (length-biased: short sequences weigh more per token).
        Grpo = "grpo",
        /// Token sum / (sequences · max_completion_length): a constant normaliser (Dr. GRPO).
        DrGrpo = "dr_grpo",
        /// Token mean over the local (micro-)batch.
        Bnpo = "bnpo",
    }
);

/// The normalisers [`LossType`] needs beyond the micro-batch itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregation {
    /// Which aggregation.
    pub loss_type: LossType,
    /// Micro-batches accumulated into one optimizer step (grpo, bnpo, dr_grpo divide by it).
    pub grad_accum_steps: usize,
    /// The generation length cap (dr_grpo's constant normaliser).
    pub max_completion_length: usize,
    /// dapo: active tokens in the whole accumulated global batch ÷ number of processes (TRL `num_items_in_batch`).
    /// None = this micro-batch's own active-token count, which is exact only without accumulation.
    pub dapo_num_items: Option<f64>,
}

impl Aggregation {
    /// One micro-batch per step, no accumulation.
    pub fn new(loss_type: LossType, max_completion_length: usize) -> Self {
        Self { loss_type, grad_accum_steps: 1, max_completion_length, dapo_num_items: None }
    }
}

/// (Σ m·x, Σ m) over rows.
fn masked_sum_count(x: &[Vec<f64>], mask: &[Vec<f64>]) -> (f64, f64) {
    let mut s = 0.0;
    let mut n = 0.0;
    for (row, m) in x.iter().zip(mask) {
        for (v, w) in row.iter().zip(m) {
            s += v * w;
            n += w;
        }
    }
    (s, n)
}

/// Aggregate per-token losses `[B][T]` with mask `[B][T]` into the scalar loss.
pub fn aggregate(per_token: &[Vec<f64>], mask: &[Vec<f64>], agg: &Aggregation) -> Result<f64> {
    if per_token.len() != mask.len() || per_token.iter().zip(mask).any(|(a, b)| a.len() != b.len()) {
        bail!("per-token loss and mask have different shapes");
    }
    let accum = agg.grad_accum_steps.max(1) as f64;
    let b = per_token.len() as f64;
    let (sum, active) = masked_sum_count(per_token, mask);
    Ok(match agg.loss_type {
        LossType::Grpo => {
            let seq_means: f64 = per_token
                .iter()
                .zip(mask)
                .map(|(row, m)| {
                    let (s, n) = masked_sum_count(std::slice::from_ref(row), std::slice::from_ref(m));
                    s / n.max(1.0)
                })
                .sum();
            seq_means / b / accum
        }
        LossType::Bnpo => sum / active.max(1.0) / accum,
        LossType::DrGrpo => sum / (b * agg.max_completion_length as f64) / accum,
        LossType::Dapo => sum / agg.dapo_num_items.unwrap_or(active).max(1.0),
    })
}

/// Tensor [`aggregate`]: `per_token` and `mask` `[B, T]` → scalar tensor, differentiable wrt `per_token`.
pub fn aggregate_tensor(per_token: &Tensor, mask: &Tensor, agg: &Aggregation) -> Result<Tensor> {
    let accum = agg.grad_accum_steps.max(1) as f64;
    let b = per_token.dim(0)? as f64;
    let masked = (per_token * mask)?;
    Ok(match agg.loss_type {
        LossType::Grpo => {
            let lens = mask.sum(D::Minus1)?.maximum(1.0)?;
            ((masked.sum(D::Minus1)? / lens)?.sum_all()? / (b * accum))?
        }
        LossType::Bnpo => (masked.sum_all()?.div(&mask.sum_all()?.maximum(1.0)?)? / accum)?,
        LossType::DrGrpo => (masked.sum_all()? / (b * agg.max_completion_length as f64 * accum))?,
        LossType::Dapo => match agg.dapo_num_items {
            Some(n) => (masked.sum_all()? / n.max(1.0))?,
            None => masked.sum_all()?.div(&mask.sum_all()?.maximum(1.0)?)?,
        },
    })
}

/// Scalar tensor → f64 (for metrics).
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    // Widened on the host: Metal has no f64.
    Ok(t.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn loss_kl_estimators_golden() {
        // (logp, ref) = (−1.0, −1.2): d = 0.2, k1 0.2, k2 0.04/2 = 0.02, k3 = e^(−0.2) − (−0.2) − 1
        //   = 0.8187307530779818 + 0.2 − 1 = 0.018730753077981888;
        // (−0.5, −0.4): d = −0.1, k1 −0.1, k2 0.005, k3 = e^0.1 − 0.1 − 1 = 0.005170918075647624;
        // (−2.0, −2.5): d = 0.5, k1 0.5, k2 0.125, k3 = e^(−0.5) + 0.5 − 1 = 0.10653065971263342.
        let cases = [
            (-1.0, -1.2, 0.2, 0.02, 0.018730753077981888),
            (-0.5, -0.4, -0.1, 0.005, 0.005170918075647624),
            (-2.0, -2.5, 0.5, 0.125, 0.10653065971263342),
        ];
        let dev = Device::Cpu;
        let lp = Tensor::new(&[-1.0f32, -0.5, -2.0], &dev).unwrap();
        let rf = Tensor::new(&[-1.2f32, -0.4, -2.5], &dev).unwrap();
        for (i, est) in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3].into_iter().enumerate() {
            let t = est.tensor(&lp, &rf).unwrap().to_vec1::<f32>().unwrap();
            for (j, c) in cases.iter().enumerate() {
                let e = [c.2, c.3, c.4][i];
                close(est.eval(c.0, c.1), e, 1e-12);
                close(t[j] as f64, e, 1e-6);
            }
        }
        assert_eq!(kl_k3(-0.7, -0.7), 0.0);
    }

    #[test]
    fn loss_clip_flags_and_surrogate() {
        let c = ClipConfig::default();
        // A > 0, ρ = 1.3 > 1.2: clipped high, ℓ = −min(1.3, 1.2)·A = −1.2·A.
        assert_eq!(clip_flags(1.3, 1.0, &c), (false, true));
        close(clipped_surrogate(1.3, 1.0, &c), -1.2, 1e-15);
        // A < 0, ρ = 0.7 < 0.8: clipped low, ℓ = −min(−0.7, −0.8) = 0.8.
        assert_eq!(clip_flags(0.7, -1.0, &c), (true, false));
        close(clipped_surrogate(0.7, -1.0, &c), 0.8, 1e-15);
        // Pessimistic side is unclipped: A < 0 with ρ = 1.3 → ℓ = 1.3; A > 0 with ρ = 0.7 → ℓ = −0.7.
        assert_eq!(clip_flags(1.3, -1.0, &c), (false, false));
        close(clipped_surrogate(1.3, -1.0, &c), 1.3, 1e-15);
        close(clipped_surrogate(0.7, 1.0, &c), -0.7, 1e-15);
        // delta = 1.5 caps the unclipped term: A < 0, ρ = 2 → ℓ = −min(−1.5, −1.2) = 1.5.
        let d = ClipConfig { delta: Some(1.5), ..c };
        close(clipped_surrogate(2.0, -1.0, &d), 1.5, 1e-15);
        let dev = Device::Cpu;
        let ratio = Tensor::new(&[[2.0f32, 1.3, 0.7]], &dev).unwrap();
        let adv = Tensor::new(&[-1.0f32], &dev).unwrap();
        let l = clipped_surrogate_tensor(&ratio, &adv, &d).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(l[0], vec![1.5, 1.3, 0.8]);
    }

    #[test]
    fn loss_type_recipe_names() {
        // TRL's spellings, as a recipe writes them.
        let parse = |s: &str| serde_json::from_str::<LossType>(&format!("\"{s}\"")).unwrap();
        assert_eq!(parse("grpo"), LossType::Grpo);
        assert_eq!(parse("bnpo"), LossType::Bnpo);
        assert_eq!(parse("dr_grpo"), LossType::DrGrpo);
        assert_eq!(parse("dapo"), LossType::Dapo);
        assert_eq!(LossType::default(), LossType::Dapo);
        let scale: crate::advantage::ScaleRewards = serde_json::from_str("\"batch\"").unwrap();
        assert_eq!(scale, crate::advantage::ScaleRewards::Batch);
    }
}
