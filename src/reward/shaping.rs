//! Reward shaping of the composed reward: PAR (Preference As Reward, arXiv 2502.18770) and the baselines of its
//! paper, exactly as ../shared/algorithms.md §2.3 orders them (the official code's `reward_shaper.py`):
//!
//! 1. ceil: r ← min(r, c)
//! 2. length penalty: r ← r − per_token·(L − threshold) when L > threshold
//! 3. `centered`: mean over references of (r − r_ref)
//! 4. `sgfc`: mean σ(k·(r − 3 − r_ref))
//! 5. `meanstd`: update the running statistics with the batch, then (r − μ)/s (s = 1 when 0)
//! 6. `clip`: update, then clamp(r, μ − s, μ + s)
//! 7. ceil again
//! 8. `minmax`: update, then (r − min)/(max − min); 0.5 when max = min (documented deviation: the code divides by 0)
//! 9. `sigmoid`: relative (= **PAR**, kind `par`) mean σ(k·(r − r_ref)); else σ(k·r)
//! 10. `tanh`: relative mean tanh(r − r_ref); else tanh(r)
//! 11. `fitted_poly`: relative mean p(r − r_ref); else p(r), p the degree-5 least-squares fit of σ on [−5, 5]
//! 12. `lsc`: ln σ(r − q), q = μ_ref + z₀.₈₅·(s_ref + 1e-5) over **all** of the prompt's references
//!
//! One kind is active at a time (plus the ceiling and the length penalty). References are the rewards of the
//! reference policy's completions for the same prompt (the first `max_refs` are used; LSC uses all).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

choice_enum!(
    /// The shaping function applied to the composed reward.
    #[derive(Default)]
    ShapingKind {
        #[default]
        None = "none",
        /// σ(k·(r − r_ref)) averaged over references: PAR.
        Par = "par",
        Centered = "centered",
        /// "Slow growth, fast convergence": σ(k·(r − 3 − r_ref)).
        Sgfc = "sgfc",
        Meanstd = "meanstd",
        Clip = "clip",
        Minmax = "minmax",
        /// Log-sigmoid centred on the references' 0.85 quantile.
        Lsc = "lsc",
        Sigmoid = "sigmoid",
        Tanh = "tanh",
        FittedPoly = "fitted_poly",
    }
);

impl ShapingKind {
    /// Whether this kind needs reference rewards (given `relative` for the kinds that have both forms).
    pub fn needs_references(self, relative: bool) -> bool {
        match self {
            Self::Par | Self::Centered | Self::Sgfc | Self::Lsc => true,
            Self::Sigmoid | Self::Tanh | Self::FittedPoly => relative,
            Self::None | Self::Meanstd | Self::Clip | Self::Minmax => false,
        }
    }
    /// Whether this kind keeps running statistics (checkpointed).
    pub fn uses_running_stats(self) -> bool {
        matches!(self, Self::Meanstd | Self::Clip | Self::Minmax)
    }
}

/// `[shaping]` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapingConfig {
    pub kind: ShapingKind,
    /// sigmoid / tanh / fitted_poly: of r − r_ref (relative) or of r.
    pub relative: bool,
    /// Sigmoid slope k (PAR, sgfc, sigmoid).
    pub k: f64,
    /// References used per prompt (M).
    pub max_refs: usize,
    pub ceil: Option<f64>,
    /// (threshold L₀, per-token penalty): r −= per_token·(L − L₀) when L > L₀.
    pub length_penalty: Option<(usize, f64)>,
}

impl Default for ShapingConfig {
    fn default() -> Self {
        Self { kind: ShapingKind::None, relative: false, k: 1.0, max_refs: 1, ceil: None, length_penalty: None }
    }
}

/// Running statistics of the rewards seen (Chan et al.'s batch update, population variance), as the PAR code keeps
/// them: n, mean, M2, max (init −10000), min (init 10000).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunningStats {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
    pub max: f64,
    pub min: f64,
}

impl Default for RunningStats {
    fn default() -> Self {
        Self { n: 0, mean: 0.0, m2: 0.0, max: -10000.0, min: 10000.0 }
    }
}

impl RunningStats {
    /// Fold in a batch: n' = n + n_b; δ = b_μ − mean; mean += δ·n_b/n'; M2 += b_v·n_b + δ²·n·n_b/n'.
    pub fn update(&mut self, batch: &[f64]) {
        if batch.is_empty() {
            return;
        }
        let nb = batch.len() as f64;
        let bm = batch.iter().sum::<f64>() / nb;
        let bv = batch.iter().map(|x| (x - bm) * (x - bm)).sum::<f64>() / nb;
        for &x in batch {
            self.max = self.max.max(x);
            self.min = self.min.min(x);
        }
        let n = self.n as f64;
        let total = n + nb;
        let delta = bm - self.mean;
        self.mean += delta * nb / total;
        self.m2 += bv * nb + delta * delta * n * nb / total;
        self.n += batch.len() as u64;
    }
    /// √(M2/n) (0 when n ≤ 1).
    pub fn std(&self) -> f64 {
        if self.n > 1 {
            (self.m2 / self.n as f64).sqrt()
        } else {
            0.0
        }
    }
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// ln σ(x), computed stably.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// The standard normal's 0.85 quantile.
const Z85: f64 = 1.0364333894937894;

/// Coefficients (x⁵, x⁴, x³, x², x, 1) of the least-squares degree-5 fit of σ at 100 evenly spaced points of
/// [−5, 5], solved once with the normal equations in f64 (algorithms.md §2.9 gives a = 0.0002026691698321658,
/// c = −0.010130912056491519, e = 0.22878851177825818, f ≈ 0.5, b ≈ d ≈ 0).
pub fn fitted_poly_coefficients() -> [f64; 6] {
    let xs: Vec<f64> = (0..100).map(|i| -5.0 + 10.0 * i as f64 / 99.0).collect();
    // Normal equations AᵀA c = Aᵀy over the powers 5..0; solved by Gaussian elimination with partial pivoting.
    let mut m = [[0.0f64; 7]; 6];
    for &x in &xs {
        let row: [f64; 6] = [x.powi(5), x.powi(4), x.powi(3), x * x, x, 1.0];
        let y = sigmoid(x);
        for i in 0..6 {
            for j in 0..6 {
                m[i][j] += row[i] * row[j];
            }
            m[i][6] += row[i] * y;
        }
    }
    for col in 0..6 {
        let pivot = (col..6).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs())).unwrap();
        m.swap(col, pivot);
        for r in 0..6 {
            if r != col {
                let f = m[r][col] / m[col][col];
                let pivot_row = m[col];
                for (c, v) in m[r].iter_mut().enumerate().skip(col) {
                    *v -= f * pivot_row[c];
                }
            }
        }
    }
    let mut out = [0.0; 6];
    for i in 0..6 {
        out[i] = m[i][6] / m[i][i];
    }
    out
}

/// p(x): the fitted polynomial inside (−5, 5), 0 at or below −5, 1 at or above 5.
pub fn fitted_poly(x: f64, c: &[f64; 6]) -> f64 {
    if x <= -5.0 {
        0.0
    } else if x >= 5.0 {
        1.0
    } else {
        ((((c[0] * x + c[1]) * x + c[2]) * x + c[3]) * x + c[4]) * x + c[5]
    }
}

/// Ceiling and length penalty (steps 1–2), applied to policy and reference rewards alike.
pub fn pre_shape(r: f64, length: usize, cfg: &ShapingConfig) -> f64 {
    let mut r = r;
    if let Some(c) = cfg.ceil {
        r = r.min(c);
    }
    if let Some((threshold, per_token)) = cfg.length_penalty {
        if length > threshold {
            r -= per_token * (length - threshold) as f64;
        }
    }
    r
}

/// Shape one step's rewards (NaN = no reward: left NaN and out of the statistics). `lengths` are completion tokens;
/// `refs[i]` the reference rewards of sample i's prompt (already through [`pre_shape`]); `stats` the running
/// statistics (updated here for meanstd/clip/minmax). Errors: a kind that needs references and a sample without any.
pub fn shape(
    rewards: &[f64],
    lengths: &[usize],
    refs: &[&[f64]],
    stats: &mut RunningStats,
    cfg: &ShapingConfig,
) -> Result<Vec<f64>> {
    let needs_refs = cfg.kind.needs_references(cfg.relative);
    if needs_refs && refs.len() != rewards.len() {
        bail!("shaping `{}`: {} reference lists for {} rewards", cfg.kind, refs.len(), rewards.len());
    }
    let mut r: Vec<f64> = rewards.iter().zip(lengths).map(|(&r, &l)| pre_shape(r, l, cfg)).collect();
    let valid: Vec<f64> = r.iter().copied().filter(|x| !x.is_nan()).collect();
    let m = |i: usize| -> Result<&[f64]> {
        let all = refs[i];
        if all.is_empty() {
            bail!("shaping `{}` needs at least one reference reward for sample {i}, and it has none", cfg.kind);
        }
        Ok(&all[..all.len().min(cfg.max_refs.max(1))])
    };
    let mean_over = |i: usize, f: &dyn Fn(f64) -> f64| -> Result<f64> {
        let refs = m(i)?;
        Ok(refs.iter().map(|&rr| f(rr)).sum::<f64>() / refs.len() as f64)
    };
    let k = cfg.k;
    if cfg.kind.uses_running_stats() {
        stats.update(&valid);
    }
    let (mu, s) = (stats.mean, stats.std());
    let poly = (cfg.kind == ShapingKind::FittedPoly).then(fitted_poly_coefficients);
    for i in 0..r.len() {
        let x = r[i];
        if x.is_nan() {
            continue;
        }
        r[i] = match cfg.kind {
            ShapingKind::None => x,
            ShapingKind::Centered => mean_over(i, &|rr| x - rr)?,
            ShapingKind::Sgfc => mean_over(i, &|rr| sigmoid(k * (x - 3.0 - rr)))?,
            ShapingKind::Meanstd => (x - mu) / if s == 0.0 { 1.0 } else { s },
            ShapingKind::Clip => x.clamp(mu - s, mu + s),
            ShapingKind::Minmax if stats.max == stats.min => 0.5,
            ShapingKind::Minmax => (x - stats.min) / (stats.max - stats.min),
            ShapingKind::Par => mean_over(i, &|rr| sigmoid(k * (x - rr)))?,
            ShapingKind::Sigmoid if cfg.relative => mean_over(i, &|rr| sigmoid(k * (x - rr)))?,
            ShapingKind::Sigmoid => sigmoid(k * x),
            ShapingKind::Tanh if cfg.relative => mean_over(i, &|rr| (x - rr).tanh())?,
            ShapingKind::Tanh => x.tanh(),
            ShapingKind::FittedPoly => {
                let c = poly.as_ref().expect("computed for fitted_poly");
                if cfg.relative {
                    mean_over(i, &|rr| fitted_poly(x - rr, c))?
                } else {
                    fitted_poly(x, c)
                }
            }
            ShapingKind::Lsc => {
                let all = refs[i];
                if all.is_empty() {
                    bail!("shaping `lsc` needs at least one reference reward for sample {i}, and it has none");
                }
                let n = all.len() as f64;
                let mean = all.iter().sum::<f64>() / n;
                let std_u = if all.len() > 1 {
                    (all.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0)).sqrt()
                } else {
                    0.0
                };
                log_sigmoid(x - (mean + Z85 * (std_u + 1e-5)))
            }
        };
        // The ceiling applies again at step 7: after steps 3–6; for the later kinds it already held (step 1).
        let before_step_7 =
            matches!(cfg.kind, ShapingKind::Centered | ShapingKind::Sgfc | ShapingKind::Meanstd | ShapingKind::Clip);
        if let (Some(c), true) = (cfg.ceil, before_step_7) {
            r[i] = r[i].min(c);
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    fn one(kind: ShapingKind, relative: bool, k: f64, max_refs: usize, r: f64, refs: &[f64]) -> f64 {
        let cfg = ShapingConfig { kind, relative, k, max_refs, ..Default::default() };
        shape(&[r], &[10], &[refs], &mut RunningStats::default(), &cfg).unwrap()[0]
    }

    #[test]
    fn worked_examples_for_one_reward() {
        // algorithms.md §2.9: r = 1.2, references [0.5, 1.0, 2.0].
        let refs = [0.5, 1.0, 2.0];
        let t = 1e-15;
        close(one(ShapingKind::Par, false, 1.0, 3, 1.2, &refs), 0.5093490961176771, t);
        close(one(ShapingKind::Par, false, 1.0, 1, 1.2, &refs), 0.6681877721681662, t);
        close(one(ShapingKind::Par, false, 2.0, 3, 1.2, &refs), 0.5229510545123698, t);
        close(one(ShapingKind::Sigmoid, true, 1.0, 3, 1.2, &refs), 0.5093490961176771, t);
        close(one(ShapingKind::Centered, false, 1.0, 3, 1.2, &refs), 0.03333333333333329, t);
        close(one(ShapingKind::Sgfc, false, 1.0, 3, 1.2, &refs), 0.056776135949951796, t);
        close(one(ShapingKind::Tanh, true, 1.0, 3, 1.2, &refs), 0.04590210902473949, t);
        close(one(ShapingKind::FittedPoly, true, 1.0, 3, 1.2, &refs), 0.5081592149489523, 1e-8);
        // LSC: μ_ref 1.1666666666666667, s_ref 0.7637626158259734, q = 1.958266107689718 → −1.1424926072423802.
        close(one(ShapingKind::Lsc, false, 1.0, 1, 1.2, &refs), -1.1424926072423802, 1e-14);
        close(one(ShapingKind::Sigmoid, false, 1.0, 3, 1.2, &refs), 0.7685247834990175, t);
        close(one(ShapingKind::Tanh, false, 1.0, 3, 1.2, &refs), 0.8336546070121552, t);
    }

    #[test]
    fn length_penalty_and_ceiling() {
        // raw 1.2, L = 350, threshold 300, 0.01 per token → 0.7; a 512-token answer loses 2.12.
        let cfg = ShapingConfig { length_penalty: Some((300, 0.01)), ..Default::default() };
        close(pre_shape(1.2, 350, &cfg), 0.7, 1e-15);
        close(pre_shape(0.0, 512, &cfg), -2.12, 1e-12);
        close(pre_shape(1.2, 300, &cfg), 1.2, 0.0);
        let cfg = ShapingConfig { ceil: Some(1.0), ..Default::default() };
        assert_eq!(
            shape(&[3.0, 0.5, f64::NAN], &[1, 1, 1], &[], &mut RunningStats::default(), &cfg).unwrap()[..2],
            [1.0, 0.5]
        );
    }

    #[test]
    fn running_statistics_worked_examples() {
        // Batch [1, 2, 3] then [0, 4], a fresh state per method.
        let cases = [
            (
                ShapingKind::Meanstd,
                [-1.224744871391589, 0.0, 1.224744871391589],
                [-std::f64::consts::SQRT_2, std::f64::consts::SQRT_2], // ±1.414213562373095
            ),
            (ShapingKind::Clip, [1.183503419072274, 2.0, 2.8164965809277263], [0.5857864376269049, 3.414213562373095]),
            (ShapingKind::Minmax, [0.0, 0.5, 1.0], [0.0, 1.0]),
        ];
        for (kind, first, second) in cases {
            let cfg = ShapingConfig { kind, ..Default::default() };
            let mut st = RunningStats::default();
            let a = shape(&[1.0, 2.0, 3.0], &[1; 3], &[], &mut st, &cfg).unwrap();
            let b = shape(&[0.0, 4.0], &[1; 2], &[], &mut st, &cfg).unwrap();
            for (x, e) in a.iter().zip(first).chain(b.iter().zip(second)) {
                close(*x, e, 1e-15);
            }
            assert_eq!((st.n, st.mean, st.m2, st.max, st.min), (5, 2.0, 10.0, 4.0, 0.0), "{kind}");
        }
        // Min-max with max = min returns 0.5 (the official code divides by zero); NaN stays NaN, out of the stats.
        let cfg = ShapingConfig { kind: ShapingKind::Minmax, ..Default::default() };
        let mut st = RunningStats::default();
        let out = shape(&[2.0, f64::NAN], &[1, 1], &[], &mut st, &cfg).unwrap();
        assert_eq!(out[0], 0.5);
        assert!(out[1].is_nan());
        assert_eq!(st.n, 1);
    }

    #[test]
    fn fitted_polynomial_matches_the_least_squares_fit() {
        let c = fitted_poly_coefficients();
        close(c[0], 0.0002026691698321658, 1e-12);
        close(c[2], -0.010130912056491519, 1e-12);
        close(c[4], 0.22878851177825818, 1e-12);
        close(c[5], 0.5, 1e-12);
        assert!(c[1].abs() < 1e-12 && c[3].abs() < 1e-12);
        close(fitted_poly(0.7, &c), 0.6567111180167774, 1e-8);
        close(fitted_poly(-0.8, &c), 0.3220898069167461, 1e-8);
        assert_eq!((fitted_poly(-5.0, &c), fitted_poly(7.0, &c)), (0.0, 1.0));
    }

    #[test]
    fn references_are_required_where_the_kind_needs_them() {
        let cfg = ShapingConfig { kind: ShapingKind::Par, ..Default::default() };
        let e = shape(&[1.0], &[1], &[&[]], &mut RunningStats::default(), &cfg).unwrap_err();
        assert!(e.to_string().contains("needs at least one reference"), "{e}");
        assert!(ShapingKind::Tanh.needs_references(true) && !ShapingKind::Tanh.needs_references(false));
        // LSC with one reference: s_ref = 0, q = μ_ref + 1.0364e-5.
        close(one(ShapingKind::Lsc, false, 1.0, 1, 1.0, &[1.0]), log_sigmoid(-Z85 * 1e-5), 1e-15);
    }
}
