//! PPO's pieces that are not GRPO's (../shared/algorithms.md §6.2–6.4): the clipped value loss and the adaptive KL
//! controller. The advantage side (per-token rewards, GAE, whitening) is in [`crate::advantage::gae`]; the clipped
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
        let v_clip = old_values[i] + (values[i] - old_values[i]).clamp(-clip, clip);
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
