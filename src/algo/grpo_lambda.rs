//! GRPO-λ (arXiv 2505.18086, "Stable Reinforcement Learning for Efficient Reasoning"; ../shared/algorithms.md §3):
//! the batch's groups are ranked by their correctness ratio; the top λ fraction are *efficiency-prioritised* and get a
//! length-penalised reward, the rest plain 0/1 correctness. Advantages and loss are GRPO's, unchanged, so GRPO and
//! GRPO-λ differ only in the reward.
//!
//! Efficiency-prioritised group k, completion i: r = 1 − α·σ((L_i − mean_corr,k)/std_corr,k) if i is correct, else 0,
//! where mean_corr,k and std_corr,k are over the lengths of the group's **correct** completions.
//!
//! Decisions where the paper is silent (algorithms.md §3.4): N_eff = max(1, ⌈λ·B − 1e-9⌉) (the 1e-9 keeps f64 noise
//! such as 0.07·100 = 7.000000000000001 from adding a group); ties in ρ keep batch order (stable sort); z = 0 when the
//! std of the correct lengths is 0 or undefined (one correct completion); a selected group with no correct completion
//! gets all 0; incorrect completions always get 0.

use anyhow::{bail, Result};

choice_enum!(
    /// Which standard deviation of the correct completions' lengths normalises them.
    #[derive(Default)]
    LengthStd {
        /// Divide by n (the unofficial reimplementation's np.std).
        #[default]
        Population = "population",
        /// Divide by n − 1.
        Sample = "sample",
    }
);

/// GRPO-λ's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoLambdaConfig {
    /// Fraction of the batch's groups that get the length-penalised reward (the paper's example: 0.2).
    pub lambda: f64,
    /// Length-penalty strength α (the unofficial reimplementation's default 0.6; the paper's value was not found).
    pub alpha: f64,
    pub length_std: LengthStd,
}

impl Default for GrpoLambdaConfig {
    fn default() -> Self {
        Self { lambda: 0.2, alpha: 0.6, length_std: LengthStd::Population }
    }
}

/// The step's rewards and what to log about the selection.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoLambdaRewards {
    /// One per completion, in input order.
    pub rewards: Vec<f64>,
    /// Per group: whether it was efficiency-prioritised.
    pub efficiency: Vec<bool>,
    /// N_eff.
    pub n_efficiency: usize,
    /// Mean correctness ratio of the efficiency / accuracy groups (NaN when a mode has no group).
    pub ratio_efficiency: f64,
    pub ratio_accuracy: f64,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// N_eff = max(1, ⌈λ·B − 1e-9⌉), at most B.
pub fn efficiency_groups(lambda: f64, groups: usize) -> usize {
    (((lambda * groups as f64) - 1e-9).ceil().max(1.0) as usize).min(groups)
}

/// GRPO-λ rewards for `correct` (0/1 per completion) and `lengths` (tokens, EOS included), grouped by `group_size`
/// consecutive completions.
pub fn grpo_lambda_rewards(
    correct: &[bool],
    lengths: &[usize],
    group_size: usize,
    cfg: &GrpoLambdaConfig,
) -> Result<GrpoLambdaRewards> {
    if group_size == 0 || correct.len() != lengths.len() || !correct.len().is_multiple_of(group_size) {
        bail!(
            "GRPO-λ: {} completions and {} lengths do not split into groups of {group_size}",
            correct.len(),
            lengths.len()
        );
    }
    let b = correct.len() / group_size;
    let ratio: Vec<f64> =
        correct.chunks(group_size).map(|g| g.iter().filter(|&&c| c).count() as f64 / group_size as f64).collect();
    let mut order: Vec<usize> = (0..b).collect();
    // Stable: ties keep batch order.
    order.sort_by(|&x, &y| ratio[y].total_cmp(&ratio[x]));
    let n_eff = efficiency_groups(cfg.lambda, b);
    let mut efficiency = vec![false; b];
    for &k in &order[..n_eff] {
        efficiency[k] = true;
    }
    let mut rewards: Vec<f64> = correct.iter().map(|&c| if c { 1.0 } else { 0.0 }).collect();
    for k in (0..b).filter(|&k| efficiency[k]) {
        let range = k * group_size..(k + 1) * group_size;
        let corr: Vec<f64> = range.clone().filter(|&i| correct[i]).map(|i| lengths[i] as f64).collect();
        if corr.is_empty() {
            continue; // all 0 already
        }
        let n = corr.len() as f64;
        let mean = corr.iter().sum::<f64>() / n;
        let ss = corr.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>();
        let var = match cfg.length_std {
            LengthStd::Population => ss / n,
            LengthStd::Sample if corr.len() > 1 => ss / (n - 1.0),
            LengthStd::Sample => 0.0,
        };
        let std = var.sqrt();
        for i in range.filter(|&i| correct[i]) {
            let z = if std > 0.0 { (lengths[i] as f64 - mean) / std } else { 0.0 };
            rewards[i] = 1.0 - cfg.alpha * sigmoid(z);
        }
    }
    let mean_of = |sel: bool| {
        let v: Vec<f64> = (0..b).filter(|&k| efficiency[k] == sel).map(|k| ratio[k]).collect();
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    Ok(GrpoLambdaRewards {
        rewards,
        n_efficiency: n_eff,
        ratio_efficiency: mean_of(true),
        ratio_accuracy: mean_of(false),
        efficiency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advantage::{group_advantages, ScaleRewards};

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12, "{a} vs {b}");
    }

    /// algorithms.md §3.6: α = 0.5, G = 4, B = 5 groups A..E.
    fn example() -> (Vec<bool>, Vec<usize>) {
        let c = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]];
        let l = [
            [100, 200, 300, 400],
            [150, 120, 450, 500],
            [300, 310, 320, 330],
            [220, 180, 260, 90],
            [500, 250, 400, 200],
        ];
        (c.iter().flatten().map(|&x| x == 1).collect(), l.iter().flatten().copied().collect())
    }

    fn advantages(r: &[f64]) -> Vec<f64> {
        let r: Vec<Option<f64>> = r.iter().map(|&x| Some(x)).collect();
        group_advantages(&r, 4, ScaleRewards::Group).unwrap().advantages
    }

    #[test]
    fn worked_example_lambda_0_2() {
        // Ranking A (1.0), D (0.75), B (0.5), E (0.25), C (0); N_eff = max(1, ⌈0.2·5⌉) = 1 → A.
        // A: correct lengths 100..400, mean 250, std_p = √12500 = 111.80339887498948; z = ±1.3416, ±0.4472;
        // r = 1 − 0.5·σ(z) = [0.8963798193440641, 0.804988268721169, 0.695011731278831, 0.6036201806559359].
        let (c, l) = example();
        let cfg = GrpoLambdaConfig { lambda: 0.2, alpha: 0.5, length_std: LengthStd::Population };
        let out = grpo_lambda_rewards(&c, &l, 4, &cfg).unwrap();
        assert_eq!(out.n_efficiency, 1);
        assert_eq!(out.efficiency, vec![true, false, false, false, false]);
        let expected_a = [0.8963798193440641, 0.804988268721169, 0.695011731278831, 0.6036201806559359];
        for (r, e) in out.rewards[..4].iter().zip(expected_a) {
            close(*r, e);
        }
        assert_eq!(&out.rewards[4..], &[1., 0., 1., 0., 0., 0., 0., 0., 1., 1., 1., 0., 0., 1., 0., 0.]);
        close(out.ratio_efficiency, 1.0);
        close(out.ratio_accuracy, (0.5 + 0.0 + 0.75 + 0.25) / 4.0);
        let a = advantages(&out.rewards);
        let expected = [
            1.1456200794830882,
            0.4303575797898239,
            -0.4303575797898239,
            -1.1456200794830882,
            0.8658754297607016,
            -0.8658754297607016,
            0.8658754297607016,
            -0.8658754297607016,
            0.0,
            0.0,
            0.0,
            0.0,
            0.4999000199960008,
            0.4999000199960008,
            0.4999000199960008,
            -1.4997000599880024,
            -0.4999000199960008,
            1.4997000599880024,
            -0.4999000199960008,
            -0.4999000199960008,
        ];
        for (x, e) in a.iter().zip(expected) {
            close(*x, e);
        }
    }

    #[test]
    fn worked_example_lambda_0_4_selects_a_and_d() {
        // N_eff = 2 → A and D. D: correct lengths 220, 180, 260 → mean 220, std_p 32.65986323710904;
        // r = [0.75, 0.8864487402821579, 0.6135512597178421, 0.0].
        let (c, l) = example();
        let cfg = GrpoLambdaConfig { lambda: 0.4, alpha: 0.5, length_std: LengthStd::Population };
        let out = grpo_lambda_rewards(&c, &l, 4, &cfg).unwrap();
        assert_eq!(out.efficiency, vec![true, false, false, true, false]);
        for (r, e) in out.rewards[12..16].iter().zip([0.75, 0.8864487402821579, 0.6135512597178421, 0.0]) {
            close(*r, e);
        }
        let a = advantages(&out.rewards);
        for (x, e) in
            a[12..16].iter().zip([0.4791724095014725, 0.8278789249918311, 0.1304658940111139, -1.4375172285044175])
        {
            close(*x, e);
        }
    }

    #[test]
    fn edge_cases() {
        // ⌈λ·B⌉ in f64 overshoots: 0.07·100 = 7.000000000000001 and 0.14·50 = 7.000000000000001 must give 7.
        assert_eq!(efficiency_groups(0.07, 100), 7);
        assert_eq!(efficiency_groups(0.14, 50), 7);
        assert_eq!(efficiency_groups(0.2, 3), 1); // B·λ < 1: still one group
        assert_eq!(efficiency_groups(0.0, 3), 1);
        assert_eq!(efficiency_groups(1.0, 3), 3);
        // One correct completion: std undefined → z = 0 → 1 − α/2. No correct completion in a selected group: all 0.
        let c = [false, true, false, false, false, false, false, false];
        let l = [10, 20, 30, 40, 5, 6, 7, 8];
        let cfg = GrpoLambdaConfig { lambda: 1.0, alpha: 0.6, length_std: LengthStd::Sample };
        let out = grpo_lambda_rewards(&c, &l, 4, &cfg).unwrap();
        assert_eq!(out.efficiency, vec![true, true]);
        close(out.rewards[1], 0.7);
        assert_eq!(out.rewards.iter().filter(|&&r| r != 0.0).count(), 1);
        // Ties keep batch order: two all-correct groups, λ picks the first.
        let c = [true; 4];
        let cfg = GrpoLambdaConfig { lambda: 0.5, ..Default::default() };
        assert_eq!(grpo_lambda_rewards(&c, &[1, 2, 3, 4], 2, &cfg).unwrap().efficiency, vec![true, false]);
        assert!(grpo_lambda_rewards(&c, &[1, 2, 3], 2, &cfg).is_err());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The algorithm: GRPO with GRPO-λ's rewards.

use super::boundary::{Algorithm, Models, Needs, Runtime, StepBatch, StepOutcome};
use super::grpo::{Grpo, GrpoSettings};
use super::{Keys, Problem, RecipeShape};
use crate::metrics::{names, Record};
use crate::reward::scored::ScoredBatch;
use crate::rollout::batch::Sample;

/// GRPO-λ's settings: GRPO's, the selection's, and which reward decides correctness.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoLambdaSettings {
    pub grpo: GrpoSettings,
    pub config: GrpoLambdaConfig,
    /// The reward whose raw value decides correctness.
    pub correctness_reward: String,
    /// A completion is correct when that reward is ≥ this.
    pub correct_min: f64,
}

impl Default for GrpoLambdaSettings {
    fn default() -> Self {
        Self {
            grpo: GrpoSettings::default(),
            config: GrpoLambdaConfig::default(),
            correctness_reward: "correct".into(),
            correct_min: 1.0,
        }
    }
}

impl GrpoLambdaSettings {
    pub fn from_keys(k: &dyn Keys) -> Self {
        Self {
            grpo: GrpoSettings::from_keys(k),
            config: GrpoLambdaConfig {
                lambda: k.float("algorithm.lambda"),
                alpha: k.float("algorithm.alpha"),
                length_std: k.choice("algorithm.length_std", LengthStd::from_name),
            },
            correctness_reward: k.string("algorithm.correctness_reward"),
            correct_min: k.float("algorithm.correct_min"),
        }
    }

    pub fn needs(&self) -> Needs {
        self.grpo.needs()
    }

    pub fn summary(&self) -> String {
        format!(
            "lambda {}, alpha {}, correctness from `{}`; {}",
            self.config.lambda,
            self.config.alpha,
            self.correctness_reward,
            self.grpo.summary()
        )
    }

    /// GRPO-λ replaces the reward with its own (0/1 or length-penalised) from one correctness reward: other rewards,
    /// gates or shaping would be scored and silently ignored, so they are refused.
    pub fn problems(&self, shape: &RecipeShape) -> Vec<Problem> {
        let mut out = self.grpo.problems(shape);
        if shape.shaping {
            out.push(Problem::at(
                "shaping.kind",
                "algorithm.kind = \"grpo_lambda\" replaces the reward with its own; shaping it is defined by no \
                 paper: remove the [shaping] keys or use algorithm.kind = \"grpo\"",
            ));
        }
        let names: Vec<&str> = shape.rewards.iter().map(|(n, _)| n.as_str()).collect();
        if !names.contains(&self.correctness_reward.as_str()) {
            out.push(Problem::at(
                "algorithm.correctness_reward",
                format!(
                    "`algorithm.correctness_reward` = \"{}\" is not a [[reward]] of this recipe (rewards: {})",
                    self.correctness_reward,
                    names.join(", ")
                ),
            ));
        } else {
            // (Gates need a second reward, so refusing the others refuses gates too.)
            for (i, other) in names.iter().enumerate().filter(|(_, n)| **n != self.correctness_reward) {
                out.push(Problem::at_reward(
                    i,
                    "reward.name",
                    format!(
                        "reward `{other}`: algorithm.kind = \"grpo_lambda\" computes its reward from `{}` alone (0/1 \
                         or length-penalised); remove the other [[reward]] tables",
                        self.correctness_reward
                    ),
                ));
            }
        }
        out
    }
}

/// GRPO-λ: GRPO whose rewards are replaced, each step, by 0/1 correctness or the top-λ groups' length-penalised
/// reward.
pub struct GrpoLambda {
    settings: GrpoLambdaSettings,
    grpo: Grpo,
}

impl GrpoLambda {
    pub fn new(settings: GrpoLambdaSettings) -> Self {
        let grpo = Grpo::new(settings.grpo.clone());
        Self { settings, grpo }
    }
}

impl Algorithm for GrpoLambda {
    /// Replace the step's rewards, log the selection, then GRPO's group advantages. Correctness is the raw value of
    /// the recipe's correctness reward (or a replay file's reward).
    fn advantages(
        &mut self,
        _models: &Models,
        samples: &[Sample],
        scored: &mut ScoredBatch,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<Option<Vec<f64>>> {
        let s = &self.settings;
        let raw: Vec<Option<f64>> = match scored.per_reward.iter().find(|(n, _)| *n == s.correctness_reward) {
            Some((_, v)) => v.clone(),
            None => scored.total.iter().map(|&x| (!x.is_nan()).then_some(x)).collect(),
        };
        let correct: Vec<bool> = raw.iter().map(|v| v.is_some_and(|x| x >= s.correct_min)).collect();
        let lengths: Vec<usize> = samples.iter().map(|s| s.completion_ids.len()).collect();
        let out = grpo_lambda_rewards(&correct, &lengths, rt.group_size, &s.config)?;
        let groups = out.efficiency.len() as f64;
        record.set(names::REWARD, out.rewards.iter().sum::<f64>() / out.rewards.len().max(1) as f64);
        record.set(names::GRPO_LAMBDA_N_EFFICIENCY, out.n_efficiency as f64);
        record.set(names::GRPO_LAMBDA_FRAC_EFFICIENCY, out.n_efficiency as f64 / groups);
        record.set(names::GRPO_LAMBDA_RATIO_EFFICIENCY, out.ratio_efficiency);
        record.set(names::GRPO_LAMBDA_RATIO_ACCURACY, out.ratio_accuracy);
        scored.total = out.rewards;
        Ok(Some(self.grpo.group_advantages(scored, rt.group_size, record)?))
    }

    fn update(
        &mut self,
        models: Models,
        batch: &StepBatch,
        advantages: Option<&[f64]>,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<StepOutcome> {
        self.grpo.update(models, batch, advantages, rt, record)
    }
}
