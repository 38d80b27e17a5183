//! Group-relative advantages with TRL's GRPO semantics (`sum_then_normalize`; ../shared/algorithms.md §6.1).
//!
//! A_i = (r_i − nanmean_g) / (nanstd_g + 1e-4), where g is the group of G consecutive completions of one prompt and
//! nanstd is the **unbiased** (n − 1) std over the group's valid rewards. A missing reward (`None` or NaN: every reward
//! function abstained) is left out of all statistics and gets advantage 0, so it neither pushes nor pulls the policy.

use anyhow::{bail, Result};

/// Added to the std before dividing (TRL's constant), so a near-zero std cannot blow the advantage up.
pub const STD_EPS: f64 = 1e-4;

choice_enum!(
/// How the centred reward r − mean_g is scaled (TRL `scale_rewards`).
    #[derive(Default)]
    ScaleRewards {
        /// Divide by the group's std + eps (TRL default).
        #[default]
        Group = "group",
        /// Divide by the std of the whole batch + eps; the centring is still by the group mean.
        Batch = "batch",
        /// No division (Dr. GRPO): A = r − mean_g.
        None = "none",
    }
);

/// Advantages and the statistics TRL logs about them.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAdvantages {
    /// One per completion, in input order; 0 for missing rewards and zero-variance groups.
    pub advantages: Vec<f64>,
    /// Mean of each group's valid rewards (NaN if the group has none).
    pub group_mean: Vec<f64>,
    /// Unbiased std of each group's valid rewards; 0 when fewer than 2 are valid (treated as zero variance).
    pub group_std: Vec<f64>,
    /// Fraction of groups whose std is zero (`frac_reward_zero_std`). Always from the group std: TRL logs the same
    /// for `group`/`none`, but for `batch` it logs whether the single batch std is zero, which says little.
    pub frac_reward_zero_std: f64,
    /// Mean of all valid rewards (`reward`); NaN if none is valid.
    pub reward_mean: f64,
    /// The std TRL logs as `reward_std`: mean of the group stds (`group`, `none`) or the batch std (`batch`).
    pub reward_std: f64,
    /// Unbiased std of all valid rewards in the batch; 0 when fewer than 2 are valid.
    pub batch_std: f64,
}

/// A std counts as zero like `torch.isclose(std, 0)` (atol 1e-8).
fn is_zero_std(std: f64) -> bool {
    std.abs() <= 1e-8
}

/// Mean and unbiased std of the valid values; `(NaN, 0)` if none, `(x, 0)` if one (undefined std → zero variance).
fn mean_std_u(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}

/// Group-relative advantages of `rewards` (one per completion; `None`/NaN = missing), grouped by `group_size`
/// consecutive completions (the G generations of one prompt).
pub fn group_advantages(rewards: &[Option<f64>], group_size: usize, scale: ScaleRewards) -> Result<GroupAdvantages> {
    if group_size == 0 || !rewards.len().is_multiple_of(group_size) {
        bail!("{} rewards do not split into groups of {group_size}", rewards.len());
    }
    let valid = |r: &Option<f64>| r.filter(|x| !x.is_nan());
    let all: Vec<f64> = rewards.iter().filter_map(valid).collect();
    let (reward_mean, batch_std) = mean_std_u(&all);

    let num_groups = rewards.len() / group_size;
    let mut group_mean = Vec::with_capacity(num_groups);
    let mut group_std = Vec::with_capacity(num_groups);
    let mut advantages = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let values: Vec<f64> = group.iter().filter_map(valid).collect();
        let (mean, std) = mean_std_u(&values);
        group_mean.push(mean);
        group_std.push(std);
        for r in group {
            let a = match valid(r) {
                // Zero variance: every valid reward ties, there is nothing to prefer (exactly 0, not rounding noise).
                Some(_) if is_zero_std(std) => 0.0,
                Some(x) => match scale {
                    ScaleRewards::Group => (x - mean) / (std + STD_EPS),
                    ScaleRewards::Batch => (x - mean) / (batch_std + STD_EPS),
                    ScaleRewards::None => x - mean,
                },
                None => 0.0,
            };
            advantages.push(a);
        }
    }
    let zero = group_std.iter().filter(|s| is_zero_std(**s)).count();
    let frac_reward_zero_std = zero as f64 / num_groups.max(1) as f64;
    let reward_std = match scale {
        ScaleRewards::Batch => batch_std,
        _ => group_std.iter().sum::<f64>() / num_groups.max(1) as f64,
    };
    Ok(GroupAdvantages { advantages, group_mean, group_std, frac_reward_zero_std, reward_mean, reward_std, batch_std })
}

/// DAPO's dynamic-sampling filter: for each group of `group_size` consecutive rewards, whether its valid rewards
/// have zero spread (all equal, or fewer than two valid: the same zero-std rule as `frac_reward_zero_std`), so the
/// group carries no learning signal for a group-relative advantage.
pub fn zero_std_groups(rewards: &[f64], group_size: usize) -> Vec<bool> {
    rewards
        .chunks(group_size.max(1))
        .map(|g| {
            let valid: Vec<f64> = g.iter().copied().filter(|x| !x.is_nan()).collect();
            is_zero_std(mean_std_u(&valid).1)
        })
        .collect()
}

/// RLOO's leave-one-out advantages (TRL `RLOOTrainer._generate_and_score_completions`): within each group of
/// `group_size`, A_i = r_i − (Σ_{j≠i} r_j)/(K − 1) over the K scorable (non-missing) rewards, which equals
/// K/(K − 1)·(r_i − mean). `None` where TRL has NaN: a missing reward, or a group with a single scorable reward
/// (the trainer then uses 0, TRL's `nan_to_num`).
pub fn leave_one_out(rewards: &[Option<f64>], group_size: usize) -> Result<Vec<Option<f64>>> {
    if group_size == 0 || !rewards.len().is_multiple_of(group_size) {
        bail!("{} rewards do not split into groups of {group_size}", rewards.len());
    }
    let valid = |r: &Option<f64>| r.filter(|x| !x.is_nan());
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let k = group.iter().filter_map(valid).count();
        let sum: f64 = group.iter().filter_map(valid).sum();
        out.extend(group.iter().map(|r| valid(r).filter(|_| k > 1).map(|x| x - (sum - x) / (k - 1) as f64)));
    }
    Ok(out)
}

/// TRL RLOO's `normalize_advantages`: (A − mean)/(std + 1e-4) over the batch's defined advantages, the std unbiased
/// (n − 1, TRL's `nanstd`); `None` stays `None`.
pub fn normalize_batch(advantages: &mut [Option<f64>]) {
    let defined: Vec<f64> = advantages.iter().flatten().copied().collect();
    let (mean, std) = mean_std_u(&defined);
    for a in advantages.iter_mut().flatten() {
        *a = (*a - mean) / (std + STD_EPS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_std_groups_are_the_filtered_ones() {
        // Groups of 4: mixed rewards (kept), all equal (dropped), one valid reward (dropped), two equal valid among
        // missing ones (dropped), a spread of 1e-6 (kept: above the 1e-8 zero-std tolerance).
        let nan = f64::NAN;
        let r = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, nan, 1.0, nan, nan, 0.5, nan, 0.5, nan, 0.0, 1e-6, 0.0, 0.0];
        assert_eq!(zero_std_groups(&r, 4), vec![false, true, true, true, false]);
    }

    #[test]
    fn leave_one_out_worked_examples() {
        // TRL RLOO, G = 4: r = [1, 0, 0.5, 0], sum 1.5: A_0 = 1 − 0.5/3 = 0.8333…, A_1 = 0 − 1.5/3 = −0.5,
        // A_2 = 0.5 − 1/3 = 0.1666…, A_3 = −0.5.
        let r = |v: &[f64]| v.iter().map(|&x| Some(x)).collect::<Vec<_>>();
        let close = |a: &[Option<f64>], e: &[f64], tol: f64| {
            assert_eq!(a.len(), e.len());
            for (x, e) in a.iter().zip(e) {
                assert!((x.unwrap() - e).abs() < tol, "{a:?} vs {e}");
            }
        };
        close(
            &leave_one_out(&r(&[1.0, 0.0, 0.5, 0.0]), 4).unwrap(),
            &[0.8333333333333334, -0.5, 0.16666666666666669, -0.5],
            1e-15,
        );
        // Two groups, then normalised over the batch (unbiased std + 1e-4).
        let mut a = leave_one_out(&r(&[1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.5]), 4).unwrap();
        let raw =
            [0.8333333333333334, -0.5, 0.16666666666666669, -0.5, 0.5, 0.5, -0.8333333333333334, -0.16666666666666663];
        close(&a, &raw, 1e-15);
        normalize_batch(&mut a);
        let norm = [
            1.4099515910566656,
            -0.8459709546339993,
            0.28199031821133314,
            -0.8459709546339993,
            0.8459709546339993,
            0.8459709546339993,
            -1.4099515910566656,
            -0.281990318211333,
        ];
        close(&a, &norm, 1e-12);
        // A missing reward leaves the baseline and has no advantage: [1, –, 0, 0.5] → K = 3, sum 1.5: 1 − 0.25,
        // none, 0 − 0.75, 0.5 − 0.5.
        let a = leave_one_out(&[Some(1.0), None, Some(0.0), Some(0.5)], 4).unwrap();
        assert_eq!(a, vec![Some(0.75), None, Some(-0.75), Some(0.0)]);
        // A single scorable reward in a group: no baseline, no advantage.
        assert_eq!(leave_one_out(&[Some(1.0), None], 2).unwrap(), vec![None, None]);
        assert!(leave_one_out(&r(&[1.0, 2.0, 3.0]), 2).is_err());
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12, "{a} vs {b}");
    }

    #[test]
    fn advantage_group_with_ties() {
        // G = 4, rewards [1, 1, 0, 0.5]: mean = 2.5/4 = 0.625;
        // deviations 0.375, 0.375, −0.625, −0.125; squares sum 0.140625·2 + 0.390625 + 0.015625 = 0.6875;
        // std_u = √(0.6875/3) = 0.47871355387816905; divisor 0.47881355387816905;
        // A = 0.375/0.478813… = 0.7831858496123865 (twice, the tie), −0.625/… = −1.3053097493539774,
        // −0.125/… = −0.2610619498707955.
        let out = group_advantages(&[Some(1.0), Some(1.0), Some(0.0), Some(0.5)], 4, ScaleRewards::Group).unwrap();
        close(out.group_mean[0], 0.625);
        close(out.group_std[0], 0.47871355387816905);
        for (a, e) in out.advantages.iter().zip([
            0.7831858496123865,
            0.7831858496123865,
            -1.3053097493539774,
            -0.2610619498707955,
        ]) {
            close(*a, e);
        }
        assert_eq!(out.advantages[0], out.advantages[1], "tied rewards get identical advantages");
        assert_eq!(out.frac_reward_zero_std, 0.0);
    }

    #[test]
    fn advantage_zero_variance_group() {
        // [0.1, 0.1, 0.1]: mean in f64 is not exactly 0.1, but std_u is ~1e-17 (≤ 1e-8) → zero variance → A = 0
        // exactly, in every scaling mode.
        for scale in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
            let out = group_advantages(&[Some(0.1), Some(0.1), Some(0.1)], 3, scale).unwrap();
            assert_eq!(out.advantages, vec![0.0, 0.0, 0.0]);
            assert_eq!(out.frac_reward_zero_std, 1.0);
        }
    }

    #[test]
    fn advantage_missing_reward() {
        // G = 3, [2, None, 0]: valid {2, 0}, mean 1, std_u = √((1 + 1)/1) = √2 = 1.4142135623730951;
        // A = ±1/(1.4142135623730951 + 1e-4) = ±0.7070567847218314; the missing one gets 0. NaN means the same.
        for missing in [None, Some(f64::NAN)] {
            let out = group_advantages(&[Some(2.0), missing, Some(0.0)], 3, ScaleRewards::Group).unwrap();
            close(out.group_mean[0], 1.0);
            close(out.group_std[0], std::f64::consts::SQRT_2);
            close(out.advantages[0], 0.7070567847218314);
            assert_eq!(out.advantages[1], 0.0);
            close(out.advantages[2], -0.7070567847218314);
            close(out.reward_mean, 1.0);
        }
        // One valid reward: std undefined → zero variance → A = 0; an all-missing group has NaN mean and A = 0.
        let out = group_advantages(&[Some(3.0), None, None, None], 2, ScaleRewards::Group).unwrap();
        assert_eq!(out.advantages, vec![0.0; 4]);
        assert_eq!(out.group_std, vec![0.0, 0.0]);
        assert!(out.group_mean[1].is_nan());
        assert_eq!(out.frac_reward_zero_std, 1.0);
    }

    #[test]
    fn advantage_batch_group_none_scaling() {
        // G = 2, groups [1, 0], [0.5, 0.5], [3, 1]; group means 0.5, 0.5, 2; group std_u √0.5, 0, √2.
        // Batch: mean 6/6 = 1, squares 0 + 1 + 0.25 + 0.25 + 4 + 0 = 5.5, std_u = √(5.5/5) = 1.0488088481701516.
        // group: ±0.5/(0.7071067811865476 + 1e-4) = ±0.7070067953266834, 0, 0, ±1/(1.4142135623730951 + 1e-4) =
        //   ±0.7070567847218314;
        // batch: ±0.5/1.0489088481701516 = ±0.47668584441084927, 0, 0, ±1/1.0489088… = ±0.9533716888216985;
        // none: ±0.5, 0, 0, ±1.
        let r = [Some(1.0), Some(0.0), Some(0.5), Some(0.5), Some(3.0), Some(1.0)];
        let cases = [
            (ScaleRewards::Group, [0.7070067953266834, 0.0, 0.7070567847218314]),
            (ScaleRewards::Batch, [0.47668584441084927, 0.0, 0.9533716888216985]),
            (ScaleRewards::None, [0.5, 0.0, 1.0]),
        ];
        for (scale, e) in cases {
            let out = group_advantages(&r, 2, scale).unwrap();
            let expected = [e[0], -e[0], e[1], -e[1], e[2], -e[2]];
            for (a, x) in out.advantages.iter().zip(expected) {
                close(*a, x);
            }
            close(out.batch_std, 1.0488088481701516);
            close(out.reward_mean, 1.0);
            close(out.frac_reward_zero_std, 1.0 / 3.0);
        }
        // reward_std as TRL logs it: mean group std (√0.5 + 0 + √2)/3 = 0.7071067811865476, or the batch std.
        close(group_advantages(&r, 2, ScaleRewards::Group).unwrap().reward_std, std::f64::consts::FRAC_1_SQRT_2);
        close(group_advantages(&r, 2, ScaleRewards::Batch).unwrap().reward_std, 1.0488088481701516);
        assert!(group_advantages(&r, 4, ScaleRewards::Group).is_err());
    }
}
