//! GRPO with TRL's semantics (../shared/algorithms.md §6.1): its settings ([`GrpoSettings`]), group-relative
//! advantages, μ optimizer updates ([`Grpo`]), and its token loss, assembled from the shared pieces in
//! [`super::loss`]:
//!
//! ρ_t = exp(logp_t − logp_old_t), ℓ_t = −min(ρ̃_t·A, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A) + β·k3_t,
//! then aggregated over the completion mask per [`LossType`](super::loss::LossType).

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::loss::{
    aggregate, aggregate_tensor, clip_flags, clip_indicators_tensor, clipped_surrogate, clipped_surrogate_tensor,
    kl_k3, masked_mean, masked_mean_tensor, scalar, Aggregation, ClipConfig, KlEstimator,
};

/// GRPO loss hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoLossConfig {
    /// KL coefficient β on k3 to the frozen reference (TRL default 0.0: no reference model at all).
    pub beta: f64,
    /// Ratio clipping (ε_low, ε_high, optional delta).
    pub clip: ClipConfig,
    /// Loss aggregation (`loss_type`) and its normalisers.
    pub aggregation: Aggregation,
    /// Multiply k3 by the non-detached ρ (TRL `use_bias_correction_kl`, DeepSeek-V3.2): same value on-policy, different
    /// gradient (on-policy the KL gradient becomes β·(logp − ref) per token). Default `true`, as algorithms.md §6.1 measured in
    /// TRL 1.16; other TRL versions' `GRPOConfig` document `False`, so set it explicitly when comparing with TRL.
    /// The ρ here is the unclipped ratio, without the `delta` cap.
    pub use_bias_correction_kl: bool,
    /// Where the importance ratio lives: per token (GRPO) or per sequence (GSPO).
    pub importance_sampling_level: ImportanceLevel,
}

choice_enum!(
    /// TRL `importance_sampling_level`: the ratio ρ of the clipped surrogate (`trl/trainer/grpo_trainer.py`
    /// `_compute_loss`; `sequence_token` is `trl/experimental/gspo_token`'s).
    #[derive(Default)]
    ImportanceLevel {
        /// ρ_t = exp(logp_t − logp_old,t) per token (GRPO).
        #[default]
        Token = "token",
        /// GSPO: one ρ_i = exp(mean_t (logp_t − logp_old,t)) per sequence, clipped as a whole (arXiv 2507.18071).
        Sequence = "sequence",
        /// GSPO-token: ρ_i,t = sg[ρ_i]·π_t/sg[π_t]: the sequence ratio's value on every token, each token's own
        /// gradient.
        SequenceToken = "sequence_token",
    }
);

impl Default for GrpoLossConfig {
    fn default() -> Self {
        Self {
            beta: 0.0,
            clip: ClipConfig::default(),
            aggregation: Aggregation::new(Default::default(), 512),
            use_bias_correction_kl: true,
            importance_sampling_level: ImportanceLevel::Token,
        }
    }
}

/// What TRL logs from the loss, each a masked mean over this micro-batch's active tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoLossMetrics {
    /// `kl`: mean per-token KL term (k3, times ρ under bias correction); None without a reference.
    pub kl: Option<f64>,
    /// `clip_ratio/low_mean`: fraction of tokens with ρ < 1 − ε_low and A < 0.
    pub clip_low: f64,
    /// `clip_ratio/high_mean`: fraction of tokens with ρ > 1 + ε_high and A > 0.
    pub clip_high: f64,
    /// `clip_ratio/region_mean`: fraction clipped on either side.
    pub clip_region: f64,
}

/// The KL term of one token: k3, times ρ under bias correction.
fn kl_term(logp: f64, ref_logp: f64, ratio: f64, cfg: &GrpoLossConfig) -> f64 {
    let k3 = kl_k3(logp, ref_logp);
    if cfg.use_bias_correction_kl {
        k3 * ratio
    } else {
        k3
    }
}

/// GRPO loss on Tensors: `logp`, `old_logp`, `ref_logp` and `mask` are `[B, T]`, `advantages` `[B]`.
/// `old_logp` is the sampling policy's log-probs (pass `logp.detach()` when μ = 1: ρ = 1 with the right gradient).
/// `ref_logp` is required when β ≠ 0. Returns the scalar loss (differentiable wrt `logp`) and the metrics.
pub fn grpo_token_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    cfg: &GrpoLossConfig,
) -> Result<(Tensor, GrpoLossMetrics)> {
    grpo_token_loss_weighted(logp, old_logp, ref_logp, advantages, mask, cfg, None)
}

/// [`grpo_token_loss`] with each token's ℓ (surrogate and KL term) multiplied by `token_weights` `[B, T]` before
/// aggregation (detached): the importance correction of an off-policy rollout, as TRL applies it.
pub fn grpo_token_loss_weighted(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    cfg: &GrpoLossConfig,
    token_weights: Option<&Tensor>,
) -> Result<(Tensor, GrpoLossMetrics)> {
    if cfg.beta != 0.0 && ref_logp.is_none() {
        bail!("GRPO with beta = {} needs reference log-probs", cfg.beta);
    }
    let old_logp = old_logp.detach();
    let log_ratio = (logp - &old_logp)?;
    // The sequence level's mean log-ratio over each completion's real tokens, `[B, 1]`.
    let sequence_log_ratio = || -> Result<Tensor> {
        let lens = mask.sum_keepdim(1)?.maximum(1.0)?;
        Ok((&log_ratio * mask)?.sum_keepdim(1)?.div(&lens)?)
    };
    let ratio = match cfg.importance_sampling_level {
        ImportanceLevel::Token => log_ratio.exp()?,
        ImportanceLevel::Sequence => sequence_log_ratio()?.exp()?,
        ImportanceLevel::SequenceToken => {
            (logp - logp.detach())?.broadcast_add(&sequence_log_ratio()?.detach())?.exp()?
        }
    };
    let mut per_token = clipped_surrogate_tensor(&ratio, advantages, &cfg.clip)?.broadcast_as(mask.shape())?;
    let mut kl = None;
    if let Some(ref_logp) = ref_logp {
        let mut term = KlEstimator::K3.tensor(logp, &ref_logp.detach())?;
        if cfg.use_bias_correction_kl {
            term = term.broadcast_mul(&ratio)?;
        }
        kl = Some(scalar(&masked_mean_tensor(&term.detach(), mask)?)?);
        if cfg.beta != 0.0 {
            per_token = (per_token + (term * cfg.beta)?)?;
        }
    }
    if let Some(w) = token_weights {
        per_token = (per_token * w.detach())?;
    }
    let loss = aggregate_tensor(&per_token, mask, &cfg.aggregation)?;
    let (low, high, region) = clip_indicators_tensor(&ratio, advantages, &cfg.clip)?;
    // One ratio per sequence: the clip fractions are over sequences, as TRL logs them.
    let fraction = |x: &Tensor| -> Result<f64> {
        match x.dim(1)? {
            1 => scalar(&x.mean_all()?),
            _ => scalar(&masked_mean_tensor(x, mask)?),
        }
    };
    let metrics =
        GrpoLossMetrics { kl, clip_low: fraction(&low)?, clip_high: fraction(&high)?, clip_region: fraction(&region)? };
    Ok((loss, metrics))
}

/// The same loss over rows of `f64` (`[B][T]`, advantages `[B]`); also returns the per-token ℓ (0 where masked).
pub fn grpo_token_loss_f64(
    logp: &[Vec<f64>],
    old_logp: &[Vec<f64>],
    ref_logp: Option<&[Vec<f64>]>,
    advantages: &[f64],
    mask: &[Vec<f64>],
    cfg: &GrpoLossConfig,
) -> Result<(f64, Vec<Vec<f64>>, GrpoLossMetrics)> {
    if cfg.beta != 0.0 && ref_logp.is_none() {
        bail!("GRPO with beta = {} needs reference log-probs", cfg.beta);
    }
    let rows = [logp.len(), old_logp.len(), advantages.len(), ref_logp.map_or(mask.len(), |r| r.len())];
    if rows.iter().any(|&n| n != mask.len()) {
        bail!("GRPO inputs disagree on the number of completions: {rows:?} vs mask {}", mask.len());
    }
    let (mut per_token, mut kl_rows, mut low, mut high) = (vec![], vec![], vec![], vec![]);
    for i in 0..mask.len() {
        let (mut l, mut k, mut lo, mut hi) = (vec![], vec![], vec![], vec![]);
        for t in 0..mask[i].len() {
            if mask[i][t] == 0.0 {
                l.push(0.0);
                k.push(0.0);
                lo.push(0.0);
                hi.push(0.0);
                continue;
            }
            let ratio = (logp[i][t] - old_logp[i][t]).exp();
            let mut ell = clipped_surrogate(ratio, advantages[i], &cfg.clip);
            if let Some(r) = ref_logp {
                let term = kl_term(logp[i][t], r[i][t], ratio, cfg);
                k.push(term);
                ell += cfg.beta * term;
            }
            let (is_low, is_high) = clip_flags(ratio, advantages[i], &cfg.clip);
            lo.push(is_low as u8 as f64);
            hi.push(is_high as u8 as f64);
            l.push(ell);
        }
        per_token.push(l);
        kl_rows.push(k);
        low.push(lo);
        high.push(hi);
    }
    let loss = aggregate(&per_token, mask, &cfg.aggregation)?;
    let (clip_low, clip_high) = (masked_mean(&low, mask), masked_mean(&high, mask));
    let metrics = GrpoLossMetrics {
        kl: ref_logp.map(|_| masked_mean(&kl_rows, mask)),
        clip_low,
        clip_high,
        clip_region: clip_low + clip_high,
    };
    Ok((loss, per_token, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::loss::LossType;
    use candle_core::{Device, Var};

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b} (tol {tol})");
    }

    /// §6.1's worked example: G = 2, rewards [1, 0], two completions of 3 and 2 tokens padded to T = 4.
    struct Example {
        logp: Vec<Vec<f64>>,
        old: Vec<Vec<f64>>,
        reference: Vec<Vec<f64>>,
        adv: Vec<f64>,
        mask: Vec<Vec<f64>>,
    }

    fn example() -> Example {
        // Rewards [1, 0]: mean 0.5, std_u = √0.5 = 0.7071067811865476, A = ±0.5/0.7072067811865476 =
        // ±0.7070067953266834 (crate::advantage computes exactly this).
        let adv = crate::advantage::group_advantages(&[Some(1.0), Some(0.0)], 2, Default::default()).unwrap();
        let logp = vec![vec![-1.0, -0.7, -0.2, 0.0], vec![-0.3, -1.1, 0.0, 0.0]];
        let diff = [[0.1, -0.3, 0.25, 0.0], [0.05, 0.3, 0.0, 0.0]]; // logp − logp_old
        let old: Vec<Vec<f64>> =
            logp.iter().zip(diff).map(|(r, d)| r.iter().zip(d).map(|(l, d)| l - d).collect()).collect();
        Example {
            logp,
            old,
            reference: vec![vec![-1.1, -0.6, -0.2, 0.0], vec![-0.5, -0.9, 0.0, 0.0]],
            adv: adv.advantages,
            mask: vec![vec![1.0, 1.0, 1.0, 0.0], vec![1.0, 1.0, 0.0, 0.0]],
        }
    }

    fn cfg(loss_type: LossType, bias_correction: bool) -> GrpoLossConfig {
        GrpoLossConfig {
            beta: 0.04,
            clip: ClipConfig { eps_low: 0.2, eps_high: 0.2, delta: None },
            aggregation: Aggregation::new(loss_type, 4),
            use_bias_correction_kl: bias_correction,
            importance_sampling_level: ImportanceLevel::Token,
        }
    }

    // Per-token ℓ without bias correction (A = 0.7070067953266834, β = 0.04):
    // row 0, A > 0: t0 ρ = e^0.1 = 1.1051709 in range: −1.1051709·A + 0.04·k3(−1.0, −1.1) [= e^−0.1 + 0.1 − 1 =
    //   0.0048374] = −0.7811698523554739; t1 ρ = e^−0.3 = 0.7408182 < 0.8 but A > 0 so unclipped: −0.5237635 +
    //   0.04·(e^0.1 − 0.1 − 1 = 0.0051709) = −0.5235566794007712; t2 ρ = e^0.25 = 1.2840254 > 1.2, A > 0: clipped
    //   high, −1.2·A + 0.04·k3(−0.2, −0.2) [= 0] = −0.8484081543920201.
    // row 1, A < 0: t0 ρ = e^0.05 = 1.0512711: 0.7432550 + 0.04·(e^−0.2 + 0.2 − 1 = 0.0187308) = 0.7440050389915009;
    //   t1 ρ = e^0.3 = 1.3498588 > 1.2 with A < 0: unclipped (pessimistic side), 0.9543541 + 0.04·(e^0.2 − 0.2 − 1 =
    //   0.0214028) = 0.955215460014215.
    // Aggregates: row sums −2.1531346861482652 and 1.699220499005736;
    // grpo = (−2.15313/3 + 1.69922/2)/2 = (−0.7177116 + 0.8496102)/2 = 0.06594934372671812;
    // bnpo = dapo = (−2.15313 + 1.69922)/5 = −0.09078283742850982; dr_grpo = −0.4539142/(2·4) = −0.05673927339281863.
    // Clip: 1 of 5 active tokens clipped high (row 0 t2), none low. kl = mean k3 over 5 tokens = 0.010028369469951804.
    const ELL: [[f64; 3]; 2] =
        [[-0.7811698523554739, -0.5235566794007712, -0.8484081543920201], [0.7440050389915009, 0.955215460014215, 0.0]];
    const AGG: [(LossType, f64); 4] = [
        (LossType::Grpo, 0.06594934372671812),
        (LossType::Bnpo, -0.09078283742850982),
        (LossType::Dapo, -0.09078283742850982),
        (LossType::DrGrpo, -0.05673927339281863),
    ];
    // With bias correction every k3 is multiplied by its ρ (values from the same Python, ρ·k3 instead of k3):
    // ℓ = [[−0.7811495021276356, −0.5236102877106734, −0.8484081543920201], [0.7440434528413513, 0.9555149777521652]];
    // grpo 0.06602828360999091, bnpo = dapo −0.09072190272736255, dr_grpo −0.0567011892046016, kl 0.0115517369986345.
    const ELL_BC: [[f64; 3]; 2] = [
        [-0.7811495021276356, -0.5236102877106734, -0.8484081543920201],
        [0.7440434528413513, 0.9555149777521652, 0.0],
    ];
    const AGG_BC: [(LossType, f64); 4] = [
        (LossType::Grpo, 0.06602828360999091),
        (LossType::Bnpo, -0.09072190272736255),
        (LossType::Dapo, -0.09072190272736255),
        (LossType::DrGrpo, -0.0567011892046016),
    ];

    fn tensor(rows: &[Vec<f64>]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
        Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn grpo_worked_example_f64_and_tensor() {
        let ex = example();
        for (bc, ell, aggs, kl) in [(false, ELL, AGG, 0.010028369469951804), (true, ELL_BC, AGG_BC, 0.0115517369986345)]
        {
            for (loss_type, expected) in aggs {
                let c = cfg(loss_type, bc);
                let (loss, per_token, m) =
                    grpo_token_loss_f64(&ex.logp, &ex.old, Some(&ex.reference), &ex.adv, &ex.mask, &c).unwrap();
                close(loss, expected, 1e-9);
                for (i, row) in ell.iter().enumerate() {
                    for (t, e) in row.iter().enumerate().take(3 - i) {
                        close(per_token[i][t], *e, 1e-12);
                    }
                }
                close(m.kl.unwrap(), kl, 1e-12);
                assert_eq!((m.clip_low, m.clip_high, m.clip_region), (0.0, 0.2, 0.2));

                // f32 Tensor path.
                let adv = Tensor::new(ex.adv.iter().map(|&a| a as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
                let (loss_t, mt) = grpo_token_loss(
                    &tensor(&ex.logp),
                    &tensor(&ex.old),
                    Some(&tensor(&ex.reference)),
                    &adv,
                    &tensor(&ex.mask),
                    &c,
                )
                .unwrap();
                close(scalar(&loss_t).unwrap(), expected, 1e-5);
                close(mt.kl.unwrap(), kl, 1e-6);
                close(mt.clip_high, 0.2, 1e-7);
                assert_eq!((mt.clip_low, mt.clip_region), (0.0, mt.clip_high));
            }
        }
        // dapo with a global normaliser (e.g. 10 active tokens across 2 accumulated micro-batches): sum/10.
        let mut c = cfg(LossType::Dapo, false);
        c.aggregation.dapo_num_items = Some(10.0);
        let (loss, _, _) = grpo_token_loss_f64(&ex.logp, &ex.old, Some(&ex.reference), &ex.adv, &ex.mask, &c).unwrap();
        close(loss, -0.09078283742850982 / 2.0, 1e-12);
        // grpo/bnpo/dr_grpo divide by the accumulation steps.
        let mut c = cfg(LossType::Grpo, false);
        c.aggregation.grad_accum_steps = 2;
        let (loss, _, _) = grpo_token_loss_f64(&ex.logp, &ex.old, Some(&ex.reference), &ex.adv, &ex.mask, &c).unwrap();
        close(loss, 0.06594934372671812 / 2.0, 1e-12);
        // β ≠ 0 without a reference is an error.
        assert!(grpo_token_loss_f64(&ex.logp, &ex.old, None, &ex.adv, &ex.mask, &c).is_err());
    }

    #[test]
    fn grpo_clipping_both_sides_zero_gradient() {
        // β = 0, bnpo over 6 active tokens. Row 0 (A = +1): logp − old = [0.5 → ρ 1.6487 > 1.2 clipped high,
        // −0.5 → ρ 0.6065 unclipped (A > 0), 0 → ρ 1]. Row 1 (A = −1): [−0.5 → ρ 0.6065 < 0.8 clipped low,
        // 0.5 → ρ 1.6487 unclipped (A < 0), 0 → ρ 1].
        // Unclipped tokens have ℓ = −ρA, ∂ℓ/∂logp = −ρA, divided by 6; clipped tokens are constant: gradient 0.
        let dev = Device::Cpu;
        let diff = [[0.5f32, -0.5, 0.0], [-0.5, 0.5, 0.0]];
        let old = Tensor::new(&[[-1.0f32, -2.0, -0.5], [-1.5, -0.3, -0.8]], &dev).unwrap();
        let logp = Var::from_tensor(&(&old + Tensor::new(&diff, &dev).unwrap()).unwrap()).unwrap();
        let adv = Tensor::new(&[1.0f32, -1.0], &dev).unwrap();
        let mask = Tensor::ones((2, 3), candle_core::DType::F32, &dev).unwrap();
        let c = GrpoLossConfig {
            beta: 0.0,
            clip: ClipConfig::default(),
            aggregation: Aggregation::new(LossType::Bnpo, 3),
            use_bias_correction_kl: true,
            importance_sampling_level: ImportanceLevel::Token,
        };
        let (loss, m) = grpo_token_loss(logp.as_tensor(), &old, None, &adv, &mask, &c).unwrap();
        close(m.clip_low, 1.0 / 6.0, 1e-7);
        close(m.clip_high, 1.0 / 6.0, 1e-7);
        close(m.clip_region, 2.0 / 6.0, 1e-7);
        assert!(m.kl.is_none());
        let grads = loss.backward().unwrap();
        let g = grads.get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let a = [1.0f64, -1.0];
        for i in 0..2 {
            for t in 0..3 {
                let (rho, adv_i) = ((diff[i][t] as f64).exp(), a[i]);
                let (low, high) = clip_flags(rho, adv_i, &c.clip);
                if low || high {
                    assert_eq!(g[i][t], 0.0, "clipped token ({i},{t}) must get exactly zero gradient");
                } else {
                    close(g[i][t] as f64, -rho * adv_i / 6.0, 1e-6);
                }
            }
        }
        assert_eq!(g[0][0], 0.0);
        assert_eq!(g[1][0], 0.0);
    }
    /// GSPO (TRL `importance_sampling_level`) by hand, ε = 3e-4 / 4e-4, β = 0, A = [+1, −1]:
    /// lp = [[−1, −0.5, −2, −0.1], [−0.3, −1.2, −0.8, pad]], old = lp − [[0.001, 0.0005, 0.001, 0.0007],
    /// [0, −0.001, 0.0005]]: the mean log-ratios are [0.0008, −0.000166…], s = [1.00080032, 0.99983335]; sequence 0
    /// (A > 0) is clipped at 1.0004, sequence 1 is inside. Per-sequence loss [−1.0004, 0.99983335]: `grpo`
    /// aggregation −0.0002833263892745852, `dapo` over 7 tokens (4·l0 + 3·l1)/7 = −0.14315713690509252. The gradient
    /// per real token is 0 for the clipped sequence and −A·s/(|o|·B) = 0.1666388912035751 for the other, for both
    /// `sequence` and `sequence_token`; the token level gives each token its own ρ.
    #[test]
    fn gspo_sequence_level_matches_hand_computed_values() {
        let dev = Device::Cpu;
        let lp = Var::new(&[[-1.0f32, -0.5, -2.0, -0.1], [-0.3, -1.2, -0.8, 0.0]], &dev).unwrap();
        let old = Tensor::new(&[[-1.001f32, -0.5005, -2.001, -0.1007], [-0.3, -1.199, -0.8005, 0.0]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1.], [1., 1., 1., 0.]], &dev).unwrap();
        let adv = Tensor::new(&[1.0f32, -1.0], &dev).unwrap();
        let clip = ClipConfig { eps_low: 3e-4, eps_high: 4e-4, delta: None };
        let cfg = |level, loss_type| GrpoLossConfig {
            beta: 0.0,
            clip,
            aggregation: Aggregation { dapo_num_items: Some(7.0), ..Aggregation::new(loss_type, 4) },
            use_bias_correction_kl: false,
            importance_sampling_level: level,
        };
        for level in [ImportanceLevel::Sequence, ImportanceLevel::SequenceToken] {
            let (loss, m) =
                grpo_token_loss(lp.as_tensor(), &old, None, &adv, &mask, &cfg(level, LossType::Grpo)).unwrap();
            close(scalar(&loss).unwrap(), -0.0002833263892745852, 2e-7);
            // Sequence 0 is clipped (high): counted per sequence at the sequence level (1 of 2), per token at the
            // sequence_token level, whose ratio lives on every token (4 of 7).
            let clipped = if level == ImportanceLevel::Sequence { 0.5 } else { 4.0 / 7.0 };
            close(m.clip_low, 0.0, 0.0);
            close(m.clip_high, clipped, 1e-7);
            close(m.clip_region, clipped, 1e-7);
            let g = loss.backward().unwrap().get(lp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            assert!(g[0].iter().all(|x| *x == 0.0), "{level}: the clipped sequence gets no gradient");
            for x in &g[1][..3] {
                close(*x as f64, 0.1666388912035751, 1e-6);
            }
            assert_eq!(g[1][3], 0.0);
            let (loss, _) =
                grpo_token_loss(lp.as_tensor(), &old, None, &adv, &mask, &cfg(level, LossType::Dapo)).unwrap();
            close(scalar(&loss).unwrap(), -0.14315713690509252, 1e-6);
        }
        // Token level on the same numbers: per-token ratios, so every token of sequence 0 (log-ratios 0.001, 0.0005,
        // 0.001, 0.0007: ρ > 1.0004) is clipped high, and of sequence 1 the token with ρ = e^−0.001 < 0.9997 low.
        let (_, m) =
            grpo_token_loss(lp.as_tensor(), &old, None, &adv, &mask, &cfg(ImportanceLevel::Token, LossType::Grpo))
                .unwrap();
        close(m.clip_high, 4.0 / 7.0, 1e-7);
        close(m.clip_low, 1.0 / 7.0, 1e-7);
    }

    #[test]
    fn grpo_bias_corrected_kl_gradient() {
        // On-policy (old = logp.detach(), ρ = 1), A = 0 so only β·KL acts; bnpo over N = 3 tokens, β = 0.04.
        // x = ref − logp, k3 = e^x − x − 1, ∂k3/∂logp = 1 − e^x.
        // Without correction: ∂loss/∂logp = β/N·(1 − e^x): (−1.0, −1.2) → 0.04/3·(1 − e^−0.2) = 0.0024169232922935744,
        //   (−0.5, −0.4) → 0.04/3·(1 − e^0.1) = −0.0014022789076753, (−2.0, −2.5) → 0.005246257870498221.
        // With correction (k3·ρ, ∂ρ/∂logp = ρ = 1): β/N·(1 − e^x + k3) = β/N·(−x) = β/N·(logp − ref):
        //   0.04/3·[0.2, −0.1, 0.5] = [0.0026666…, −0.0013333…, 0.0066666…]. Loss values are equal (ρ = 1).
        let dev = Device::Cpu;
        let logp = Var::new(&[[-1.0f32, -0.5, -2.0]], &dev).unwrap();
        let reference = Tensor::new(&[[-1.2f32, -0.4, -2.5]], &dev).unwrap();
        let adv = Tensor::new(&[0.0f32], &dev).unwrap();
        let mask = Tensor::ones((1, 3), candle_core::DType::F32, &dev).unwrap();
        let expected = [
            (false, [0.0024169232922935744, -0.0014022789076753, 0.005246257870498221]),
            (true, [0.04 / 3.0 * 0.2, 0.04 / 3.0 * -0.1, 0.04 / 3.0 * 0.5]),
        ];
        let mut values = vec![];
        for (bc, e) in expected {
            let mut c = cfg(LossType::Bnpo, bc);
            c.aggregation.max_completion_length = 3;
            let old = logp.as_tensor().detach();
            let (loss, _) = grpo_token_loss(logp.as_tensor(), &old, Some(&reference), &adv, &mask, &c).unwrap();
            values.push(scalar(&loss).unwrap());
            let g = loss.backward().unwrap().get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in g[0].iter().zip(e) {
                close(*a as f64, b, 1e-8);
            }
        }
        assert_eq!(values[0], values[1]);
    }
}

/// One GRPO step's inputs: completions with their prompts, advantages, and (for μ > 1) the sampling policy's
/// log-probs.
pub struct UpdateBatch<'a> {
    pub prompts: &'a [Vec<u32>],
    pub completions: &'a [Vec<u32>],
    /// One per completion (group-relative, see [`crate::advantage`]).
    pub advantages: &'a [f64],
    /// Per-token log-probs at sampling time; `None` = on-policy (μ = 1): ρ = 1 with `logp.detach()`, as TRL.
    pub old_logprobs: Option<&'a [Vec<f32>]>,
    /// Per-completion 0/1 weights on the mask (0 = `mask_truncated_completions` dropped it).
    pub keep: &'a [bool],
    /// Off-policy rollouts (bf16 decoding weights): the per-token log-probs of the distribution that sampled each
    /// completion, and the cap C. Each token's loss is multiplied by min(exp(logp_old − logp_sampling), C), TRL's
    /// truncated importance-sampling correction for vLLM rollouts. `None`: no correction.
    pub sampling: Option<(&'a [Vec<f32>], f64)>,
}

/// The importance weights of an off-policy rollout over a step's active tokens, with TRL's metric names
/// (`sampling/importance_sampling_ratio/*`, `sampling/sampling_logp_difference/*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImportanceMetrics {
    pub ratio_mean: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// |logp_old − logp_sampling|.
    pub logp_diff_mean: f64,
    pub logp_diff_max: f64,
}

/// How the step is computed.
pub struct UpdateConfig {
    pub loss: GrpoLossConfig,
    /// Completions per forward/backward; gradients are summed over the micro-batches.
    pub micro_batch_size: usize,
    /// Sampling temperature: log-probs are taken of `logits / temperature`, as during rollout.
    pub temperature: f64,
    /// Global grad-norm clip (≤ 0 = off).
    pub max_grad_norm: f64,
    pub pad_id: u32,
    /// Completion positions per LM-head call on the composite path (GPU, bf16); the fused CPU head picks its own.
    pub logprob_chunk: usize,
    /// Recompute each layer's forward during backward instead of keeping its activations (less memory, one more
    /// forward of the layers).
    pub gradient_checkpointing: bool,
}

/// What the step did, averaged over micro-batches weighted by their active tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateMetrics {
    pub loss: f64,
    /// Before clipping; non-finite means the step was not applied.
    pub grad_norm: f64,
    pub kl: Option<f64>,
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
    pub entropy: f64,
    /// Seconds spent in the frozen reference model's forwards (part of the update's time).
    pub reference_seconds: f64,
    /// Seconds spent clipping the gradients and in the optimizer step.
    pub optimizer_seconds: f64,
    /// With [`UpdateBatch::sampling`]: the importance weights applied.
    pub importance: Option<ImportanceMetrics>,
}

/// Forward and backward over micro-batches (gradients summed, each micro-batch's loss normalised so the sum equals
/// the loss of the whole batch, per TRL's aggregation), clip, then one optimizer step. The reference model (β > 0)
/// is a frozen model; its log-probs are computed per micro-batch without a graph. A non-finite loss or grad norm
/// leaves the weights untouched and is reported in the metrics (the caller skips the step).
pub fn grpo_update(
    policy: &crate::model::CausalLm,
    reference: Option<&crate::model::CausalLm>,
    optimizer: &mut crate::optim::AdamW,
    batch: &UpdateBatch,
    cfg: &UpdateConfig,
) -> Result<UpdateMetrics> {
    let (grads, mut metrics) = grpo_backward(policy, reference, batch, cfg)?;
    if !metrics.loss.is_finite() {
        return Ok(metrics);
    }
    let t = std::time::Instant::now();
    metrics.grad_norm = crate::optim::clipped_step(optimizer, &grads, policy.vars(), cfg.max_grad_norm)?;
    metrics.optimizer_seconds = t.elapsed().as_secs_f64();
    Ok(metrics)
}

/// Running totals of the importance weights and |logp_old − logp_sampling| over a step's active tokens.
struct ImportanceTally {
    ratio_sum: f64,
    ratio_min: f64,
    ratio_max: f64,
    diff_sum: f64,
    diff_max: f64,
    tokens: usize,
}

impl ImportanceTally {
    fn new() -> Self {
        Self {
            ratio_sum: 0.0,
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
            diff_sum: 0.0,
            diff_max: 0.0,
            tokens: 0,
        }
    }

    /// Add a micro-batch's weights and differences `[b, C]` at the tokens where `mask` is set.
    fn add(&mut self, weights: &Tensor, diff: &Tensor, mask: &Tensor) -> Result<()> {
        let mask = mask.flatten_all()?.to_vec1::<f32>()?;
        let (w, d) = (weights.flatten_all()?.to_vec1::<f32>()?, diff.flatten_all()?.to_vec1::<f32>()?);
        for ((&w, &d), _) in w.iter().zip(&d).zip(&mask).filter(|(_, m)| **m > 0.0) {
            let (w, d) = (w as f64, d as f64);
            self.ratio_sum += w;
            self.ratio_min = self.ratio_min.min(w);
            self.ratio_max = self.ratio_max.max(w);
            self.diff_sum += d;
            self.diff_max = self.diff_max.max(d);
            self.tokens += 1;
        }
        Ok(())
    }

    fn finish(&self) -> ImportanceMetrics {
        let n = self.tokens.max(1) as f64;
        ImportanceMetrics {
            ratio_mean: self.ratio_sum / n,
            ratio_min: self.ratio_min,
            ratio_max: self.ratio_max,
            logp_diff_mean: self.diff_sum / n,
            logp_diff_max: self.diff_max,
        }
    }
}

/// What a micro-batch's loss closure returns beside the loss: the loss metrics, the entropy `[b, C]`, and with an
/// off-policy rollout the importance weights and |logp_old − logp_sampling| `[b, C]`.
type LossExtras = (GrpoLossMetrics, Tensor, Option<(Tensor, Tensor)>);

/// The forward/backward half of [`grpo_update`]: the policy's gradients summed over micro-batches, and the
/// metrics (`grad_norm` is NaN here: it is measured when clipping). With a non-finite loss the gradients are empty.
pub fn grpo_backward(
    policy: &crate::model::CausalLm,
    reference: Option<&crate::model::CausalLm>,
    batch: &UpdateBatch,
    cfg: &UpdateConfig,
) -> Result<(candle_core::backprop::GradStore, UpdateMetrics)> {
    use crate::model::logprobs::{completion_logprobs, logprobs_from_hidden, Entropy, SequenceBatch};
    let n = batch.completions.len();
    if n == 0 || batch.prompts.len() != n || batch.advantages.len() != n || batch.keep.len() != n {
        bail!("GRPO update: inconsistent batch sizes");
    }
    if cfg.loss.beta != 0.0 && reference.is_none() {
        bail!("GRPO update with beta = {} needs a reference model", cfg.loss.beta);
    }
    let micro = if cfg.micro_batch_size == 0 { n } else { cfg.micro_batch_size.min(n) };
    let chunks: Vec<std::ops::Range<usize>> = (0..n).step_by(micro).map(|s| s..(s + micro).min(n)).collect();
    // dapo divides by the active tokens of the whole step; the others by the number of micro-batches.
    let active: usize = batch.completions.iter().zip(batch.keep).filter(|(_, k)| **k).map(|(c, _)| c.len()).sum();
    let mut loss_cfg = cfg.loss;
    loss_cfg.aggregation.grad_accum_steps = chunks.len();
    loss_cfg.aggregation.dapo_num_items = Some(active.max(1) as f64);
    let dev = policy.device();
    let mut acc = crate::optim::GradAccumulator::new();
    let (mut loss_sum, mut kl_sum, mut low, mut high, mut region, mut ent, mut weight) =
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut reference_seconds = 0.0;
    let mut importance_tally = ImportanceTally::new();
    for range in chunks {
        let seqs = SequenceBatch::new(
            &batch.prompts[range.clone()],
            &batch.completions[range.clone()],
            cfg.pad_id,
            policy.config().sliding_window,
            dev,
        )?;
        let keep: Vec<f32> = batch.keep[range.clone()].iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let keep = Tensor::new(keep.as_slice(), dev)?.unsqueeze(1)?;
        let mask = seqs.completion_mask.broadcast_mul(&keep)?;
        // Reference log-probs first: they do not depend on the policy's graph.
        let t_ref = std::time::Instant::now();
        let ref_logp = match reference {
            Some(r) => Some(completion_logprobs(r, &seqs, cfg.temperature, cfg.logprob_chunk, false)?.0),
            None => None,
        };
        reference_seconds += t_ref.elapsed().as_secs_f64();
        let adv =
            Tensor::from_vec(batch.advantages[range.clone()].iter().map(|&a| a as f32).collect(), range.len(), dev)?;
        let old_rows = match batch.old_logprobs {
            Some(old) => Some(super::batching::padded_rows(&old[range.clone()], seqs.completion_width, dev)?),
            None => None,
        };
        let sampling_rows = match batch.sampling {
            Some((lps, cap)) => {
                Some((super::batching::padded_rows(&lps[range.clone()], seqs.completion_width, dev)?, cap))
            }
            None => None,
        };
        // The loss from the policy's final hidden states; with an off-policy rollout, also the importance weights
        // min(exp(old − sampling), C) and |old − sampling| (for the metrics).
        let loss_of = |hidden: &Tensor| -> Result<(Tensor, LossExtras)> {
            let (logp, entropy) =
                logprobs_from_hidden(policy, hidden, &seqs, cfg.temperature, cfg.logprob_chunk, Entropy::Metric)?;
            let old = old_rows.clone().unwrap_or_else(|| logp.detach());
            let importance = match &sampling_rows {
                Some((sampling, cap)) => {
                    let diff = (old.detach() - sampling)?;
                    Some((diff.exp()?.clamp(f32::NEG_INFINITY, *cap as f32)?, diff.abs()?))
                }
                None => None,
            };
            let weights = importance.as_ref().map(|(w, _)| w);
            let (loss, m) = grpo_token_loss_weighted(&logp, &old, ref_logp.as_ref(), &adv, &mask, &loss_cfg, weights)?;
            Ok((loss, (m, entropy.expect("requested"), importance)))
        };
        let (grads, (m, entropy, importance), loss_value) = if cfg.gradient_checkpointing {
            policy.checkpointed_backward(&seqs.input_ids, &seqs.positions, &seqs.mask, &seqs.packing, loss_of)?
        } else {
            let (loss, extra) = loss_of(&seqs.hidden(policy)?)?;
            let value = scalar(&loss)?;
            let grads = if value.is_finite() { loss.backward()? } else { Default::default() };
            (grads, extra, value)
        };
        if !loss_value.is_finite() {
            let empty = candle_core::backprop::GradStore::default();
            return Ok((
                empty,
                UpdateMetrics {
                    loss: loss_value,
                    grad_norm: f64::NAN,
                    kl: m.kl,
                    clip_low: m.clip_low,
                    clip_high: m.clip_high,
                    clip_region: m.clip_region,
                    entropy: f64::NAN,
                    reference_seconds,
                    optimizer_seconds: 0.0,
                    importance: None,
                },
            ));
        }
        acc.add(grads, policy.vars())?;
        if let Some((w, diff)) = importance {
            importance_tally.add(&w, &diff, &mask)?;
        }
        let w = scalar(&mask.sum_all()?)?;
        loss_sum += loss_value;
        kl_sum += m.kl.unwrap_or(0.0) * w;
        low += m.clip_low * w;
        high += m.clip_high * w;
        region += m.clip_region * w;
        ent += scalar(&entropy.detach().mul(&mask)?.sum_all()?)?;
        weight += w;
    }
    let w = weight.max(1.0);
    let metrics = UpdateMetrics {
        // The micro-batch losses are normalised to sum to the whole batch's loss.
        loss: loss_sum,
        grad_norm: f64::NAN,
        kl: reference.map(|_| kl_sum / w),
        clip_low: low / w,
        clip_high: high / w,
        clip_region: region / w,
        entropy: ent / w,
        reference_seconds,
        optimizer_seconds: 0.0,
        importance: batch.sampling.map(|_| importance_tally.finish()),
    };
    Ok((acc.finish(), metrics))
}

// ---------------------------------------------------------------------------------------------------------------
// The algorithm: settings, group advantages, μ updates.

use super::boundary::{Algorithm, Models, Needs, Runtime, StepBatch, StepOutcome};
use super::{Keys, Problem, RecipeShape};
use crate::advantage::{group_advantages, ScaleRewards};
use crate::metrics::{names, Record};
use crate::reward::scored::ScoredBatch;
use crate::rollout::batch::Sample;

/// GRPO's settings (`algorithm.*`, TRL's `GRPOConfig` names).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoSettings {
    /// KL coefficient β on k3 to the frozen reference (0 = no reference model).
    pub beta: f64,
    /// Ratio clipping (`epsilon`, `epsilon_high`).
    pub clip: ClipConfig,
    /// μ: optimizer updates per batch of rollouts.
    pub num_iterations: usize,
    pub loss_type: super::loss::LossType,
    pub scale_rewards: ScaleRewards,
    /// Completions cut at `max_new_tokens` leave the loss.
    pub mask_truncated_completions: bool,
    pub use_bias_correction_kl: bool,
    /// Recompute each layer in backward.
    pub gradient_checkpointing: bool,
    /// `rollout.weights = "bf16"`: the importance-weight cap C of the off-policy correction (None: on-policy).
    pub importance_cap: Option<f64>,
    /// GSPO: the ratio per sequence (`importance_sampling_level`).
    pub importance_sampling_level: ImportanceLevel,
}

impl Default for GrpoSettings {
    fn default() -> Self {
        Self {
            beta: 0.0,
            clip: ClipConfig::default(),
            num_iterations: 1,
            loss_type: Default::default(),
            scale_rewards: Default::default(),
            mask_truncated_completions: false,
            use_bias_correction_kl: true,
            gradient_checkpointing: false,
            importance_cap: None,
            importance_sampling_level: ImportanceLevel::Token,
        }
    }
}

impl GrpoSettings {
    pub fn from_keys(k: &dyn Keys) -> Self {
        Self {
            beta: k.float("algorithm.beta"),
            clip: ClipConfig::from_keys(k),
            num_iterations: k.usize("algorithm.num_iterations"),
            loss_type: k.choice("algorithm.loss_type", super::loss::LossType::from_name),
            scale_rewards: k.choice("algorithm.scale_rewards", ScaleRewards::from_name),
            mask_truncated_completions: k.boolean("algorithm.mask_truncated_completions"),
            use_bias_correction_kl: k.boolean("algorithm.use_bias_correction_kl"),
            gradient_checkpointing: k.boolean("algorithm.gradient_checkpointing"),
            importance_cap: (k.string("rollout.weights") == "bf16").then(|| k.float("rollout.importance_cap")),
            importance_sampling_level: k.choice("algorithm.importance_sampling_level", ImportanceLevel::from_name),
        }
    }

    pub fn needs(&self) -> Needs {
        Needs {
            reference: self.beta > 0.0,
            reference_for_beta_only: true,
            can_checkpoint: true,
            gradient_checkpointing: self.gradient_checkpointing,
            groups: true,
            importance_correction: true,
            recorded_logprobs: true,
            ..Needs::default()
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "loss_type {}, scale_rewards {}, beta {}, epsilon {}/{}, num_iterations {}, importance_sampling_level {}",
            self.loss_type,
            self.scale_rewards,
            self.beta,
            self.clip.eps_low,
            self.clip.eps_high,
            self.num_iterations,
            self.importance_sampling_level
        )
    }

    pub fn problems(&self, _shape: &RecipeShape) -> Vec<Problem> {
        Vec::new()
    }
}

/// GRPO (TRL's GRPOTrainer): group-relative advantages, then μ optimizer updates of the clipped surrogate with an
/// optional k3 KL to the reference.
pub struct Grpo {
    params: GrpoSettings,
}

impl Grpo {
    pub fn new(params: GrpoSettings) -> Self {
        Self { params }
    }

    /// The group advantages of the step's rewards, with `reward_std` and `frac_reward_zero_std` logged.
    pub fn group_advantages(&self, scored: &ScoredBatch, group_size: usize, record: &mut Record) -> Result<Vec<f64>> {
        let rewards: Vec<Option<f64>> = scored.total.iter().map(|&r| (!r.is_nan()).then_some(r)).collect();
        let adv = group_advantages(&rewards, group_size, self.params.scale_rewards)?;
        record.set(names::REWARD_STD, adv.reward_std);
        record.set(names::FRAC_REWARD_ZERO_STD, adv.frac_reward_zero_std);
        Ok(adv.advantages)
    }
}

impl Algorithm for Grpo {
    fn advantages(
        &mut self,
        _models: &Models,
        _samples: &[Sample],
        scored: &mut ScoredBatch,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<Option<Vec<f64>>> {
        Ok(Some(self.group_advantages(scored, rt.group_size, record)?))
    }

    /// μ optimizer updates on the step's samples. A non-finite loss or grad norm stops the step (weights untouched
    /// by that update) and makes it a skipped step.
    fn update(
        &mut self,
        m: Models,
        batch: &StepBatch,
        advantages: Option<&[f64]>,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<StepOutcome> {
        let p = &self.params;
        let advantages = advantages.context("GRPO's update needs the group advantages")?;
        let samples = batch.samples;
        let (prompts, completions) = batch.token_ids();
        let keep = keep_mask(samples, p.mask_truncated_completions);
        let cfg = UpdateConfig {
            loss: GrpoLossConfig {
                beta: p.beta,
                clip: p.clip,
                aggregation: Aggregation::new(p.loss_type, rt.max_new_tokens),
                use_bias_correction_kl: p.use_bias_correction_kl,
                importance_sampling_level: p.importance_sampling_level,
            },
            micro_batch_size: rt.micro_batch_size,
            temperature: rt.temperature,
            max_grad_norm: rt.optim.max_grad_norm,
            pad_id: rt.pad_id,
            logprob_chunk: rt.logprob_chunk,
            gradient_checkpointing: p.gradient_checkpointing,
        };
        // μ > 1 reuses the batch: ρ needs the sampling policy's log-probs, taken before the first update.
        // A replay file's recorded log-probs are the old ones even at μ = 1 (an off-policy batch).
        let recorded = super::boundary::has_recorded_logprobs(samples);
        let old =
            if p.num_iterations > 1 || recorded { Some(rt.rollout_logprobs(m.rollout_view, samples)?) } else { None };
        // bf16 rollout weights: the sampling distribution's log-probs for the importance correction.
        let sampling: Option<Vec<Vec<f32>>> =
            p.importance_cap.and_then(|_| samples.iter().map(|s| s.sampling_logprobs.clone()).collect());
        let update_batch = UpdateBatch {
            prompts: &prompts,
            completions: &completions,
            advantages,
            old_logprobs: old.as_deref(),
            keep: &keep,
            sampling: sampling.as_deref().zip(p.importance_cap),
        };
        let mu = p.num_iterations as u64;
        let mut sum: Option<UpdateMetrics> = None;
        let mut lr = 0.0;
        // The frozen model is the KL reference only when β > 0 (it may be loaded for PAR's references alone).
        let kl_reference = m.reference.filter(|_| p.beta > 0.0);
        for it in 0..mu {
            lr = rt.lr_per_update(m.optimizer.state().step, mu);
            m.optimizer.set_lr(lr);
            let u = grpo_update(m.policy, kl_reference, m.optimizer, &update_batch, &cfg)?;
            let which = if mu > 1 { format!(" (update {} of {mu})", it + 1) } else { String::new() };
            if !u.loss.is_finite() {
                return Ok(StepOutcome::skipped("loss", format!("the loss is {}{which}", u.loss)));
            }
            if !u.grad_norm.is_finite() {
                return Ok(StepOutcome::skipped("gradient", format!("the gradient norm is {}{which}", u.grad_norm)));
            }
            sum = Some(match sum {
                None => u,
                Some(s) => UpdateMetrics {
                    loss: s.loss + u.loss,
                    grad_norm: s.grad_norm + u.grad_norm,
                    kl: s.kl.zip(u.kl).map(|(a, b)| a + b),
                    clip_low: s.clip_low + u.clip_low,
                    clip_high: s.clip_high + u.clip_high,
                    clip_region: s.clip_region + u.clip_region,
                    // The policy's entropy on its own samples: the first update's.
                    entropy: s.entropy,
                    reference_seconds: s.reference_seconds + u.reference_seconds,
                    optimizer_seconds: s.optimizer_seconds + u.optimizer_seconds,
                    // Old log-probs are fixed over the μ updates, so are the weights: the first update's.
                    importance: s.importance,
                },
            });
        }
        let u = sum.expect("μ ≥ 1");
        let k = mu as f64;
        if let Some(kl) = u.kl {
            record.set(names::KL, kl / k);
        }
        record.set(names::ENTROPY, u.entropy);
        record.set(names::LOSS, u.loss / k);
        record.set(names::GRAD_NORM, u.grad_norm / k);
        record.set(names::LEARNING_RATE, lr);
        record.set(names::CLIP_LOW, u.clip_low / k);
        record.set(names::CLIP_HIGH, u.clip_high / k);
        record.set(names::CLIP_REGION, u.clip_region / k);
        if kl_reference.is_some() {
            record.set(names::TIMING_REFERENCE, u.reference_seconds);
        }
        record.set(names::TIMING_OPTIMIZER, u.optimizer_seconds);
        if let Some(is) = u.importance {
            record.set(names::IS_RATIO_MEAN, is.ratio_mean);
            record.set(names::IS_RATIO_MIN, is.ratio_min);
            record.set(names::IS_RATIO_MAX, is.ratio_max);
            record.set(names::SAMPLING_LOGP_DIFF_MEAN, is.logp_diff_mean);
            record.set(names::SAMPLING_LOGP_DIFF_MAX, is.logp_diff_max);
        }
        Ok(StepOutcome::Trained)
    }
}

/// Which completions stay in the loss: all, or with `mask_truncated_completions` those not cut at
/// `max_new_tokens` ([`crate::rollout::generate::FinishReason::is_truncated`]).
fn keep_mask(samples: &[Sample], mask_truncated: bool) -> Vec<bool> {
    samples.iter().map(|s| !(mask_truncated && s.finish.is_truncated())).collect()
}

#[cfg(test)]
mod keep_tests {
    use super::*;
    use crate::rollout::generate::FinishReason;

    /// Regression: the loss's helper once called every completion without a final EOS truncated, so a stop-string
    /// ending left the loss under `mask_truncated_completions`, while the trainer's metrics counted it as ended.
    /// One rule now: only a cut at `max_new_tokens` is truncated.
    #[test]
    fn mask_truncated_completions_keeps_stop_string_endings() {
        let sample = |finish| Sample {
            prompt_index: 0,
            sample_index: 0,
            prompt: crate::model::chat::Prompt::Text(String::new()),
            prompt_text: String::new(),
            prompt_ids: vec![1],
            completion_text: String::new(),
            completion_ids: vec![5, 6],
            finish,
            columns: Default::default(),
            sampling_logprobs: None,
            old_logprobs: None,
        };
        let samples = [sample(FinishReason::Eos), sample(FinishReason::Stop), sample(FinishReason::Length)];
        assert_eq!(keep_mask(&samples, true), vec![true, true, false]);
        assert_eq!(keep_mask(&samples, false), vec![true, true, true]);
    }
}
