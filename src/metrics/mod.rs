//! Metrics: one JSON object per logged step in `metrics.jsonl` (TRL's names, so dashboards and scripts written for
//! TRL read ours), optionally TensorBoard event files beside it ([`tensorboard`]), and a short line for people.
//! Metric names are constants here and nowhere else.

pub mod tensorboard;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Metric names (TRL's where TRL has one).
pub mod names {
    pub const STEP: &str = "step";
    pub const REWARD: &str = "reward";
    pub const REWARD_STD: &str = "reward_std";
    pub const FRAC_REWARD_ZERO_STD: &str = "frac_reward_zero_std";
    pub const COMPLETION_MEAN_LENGTH: &str = "completions/mean_length";
    pub const COMPLETION_MIN_LENGTH: &str = "completions/min_length";
    pub const COMPLETION_MAX_LENGTH: &str = "completions/max_length";
    /// Fraction of completions cut at `max_new_tokens` (no EOS or stop string).
    pub const COMPLETION_CLIPPED_RATIO: &str = "completions/clipped_ratio";
    /// Mean length of the completions that ended on their own (EOS or stop string); 0 if none did.
    pub const COMPLETION_MEAN_TERMINATED_LENGTH: &str = "completions/mean_terminated_length";
    pub const KL: &str = "kl";
    pub const ENTROPY: &str = "entropy";
    pub const LOSS: &str = "loss";
    pub const GRAD_NORM: &str = "grad_norm";
    pub const LEARNING_RATE: &str = "learning_rate";
    pub const CLIP_LOW: &str = "clip_ratio/low_mean";
    pub const CLIP_HIGH: &str = "clip_ratio/high_mean";
    pub const CLIP_REGION: &str = "clip_ratio/region_mean";
    pub const TIMING_ROLLOUT: &str = "timing/rollout";
    pub const TIMING_REWARD: &str = "timing/reward";
    pub const TIMING_UPDATE: &str = "timing/update";
    /// The frozen reference model's forwards in GRPO's update (β > 0), a part of `timing/update`.
    pub const TIMING_REFERENCE: &str = "timing/reference";
    /// Gradient clipping and the optimizer step in GRPO's update, a part of `timing/update`.
    pub const TIMING_OPTIMIZER: &str = "timing/optimizer";
    /// Prompt tokens (each completion's own prompt, unpadded) and completion tokens in the step.
    pub const TOKENS_PROMPT: &str = "tokens/prompt";
    pub const TOKENS_COMPLETION: &str = "tokens/completion";
    /// Off-policy rollouts (bf16 decoding weights), TRL's names: the truncated importance weights applied to the
    /// loss, and |logp_old − logp_sampling| over the step's tokens.
    pub const IS_RATIO_MEAN: &str = "sampling/importance_sampling_ratio/mean";
    pub const IS_RATIO_MIN: &str = "sampling/importance_sampling_ratio/min";
    pub const IS_RATIO_MAX: &str = "sampling/importance_sampling_ratio/max";
    pub const SAMPLING_LOGP_DIFF_MEAN: &str = "sampling/sampling_logp_difference/mean";
    pub const SAMPLING_LOGP_DIFF_MAX: &str = "sampling/sampling_logp_difference/max";
    /// Dynamic sampling: rounds of `prompts_per_step` prompts sampled this step, and groups dropped for equal rewards.
    pub const SAMPLING_ROUNDS: &str = "sampling/rounds";
    pub const SAMPLING_FILTERED_GROUPS: &str = "sampling/filtered_groups";
    pub const TIMING_STEP: &str = "timing/step";
    /// Completion tokens sampled per second of rollout.
    pub const TOKENS_PER_SECOND: &str = "tokens_per_second";

    /// PPO, with TRL's names.
    pub const PPO_KL: &str = "objective/kl";
    pub const PPO_ENTROPY: &str = "objective/entropy";
    pub const PPO_NON_SCORE_REWARD: &str = "objective/non_score_reward";
    pub const PPO_RLHF_REWARD: &str = "objective/rlhf_reward";
    pub const PPO_SCORES: &str = "objective/scores";
    pub const PPO_APPROXKL: &str = "policy/approxkl_avg";
    pub const PPO_CLIPFRAC: &str = "policy/clipfrac_avg";
    pub const PPO_POLICY_ENTROPY: &str = "policy/entropy_avg";
    pub const PPO_LOSS_POLICY: &str = "loss/policy_avg";
    pub const PPO_LOSS_VALUE: &str = "loss/value_avg";
    pub const PPO_VAL_CLIPFRAC: &str = "val/clipfrac_avg";
    pub const PPO_VAL_RATIO: &str = "val/ratio";
    pub const PPO_VAL_RATIO_VAR: &str = "val/ratio_var";
    pub const PPO_VAL_NUM_EOS: &str = "val/num_eos_tokens";
    /// The KL coefficient β used this step (moves with an adaptive controller).
    pub const PPO_KL_COEF: &str = "objective/kl_coef";
    pub const CRITIC_GRAD_NORM: &str = "critic/grad_norm";

    /// SAFE's controller and critic, each step (the last epoch's controller call).
    pub const SAFE_KL_SHORT: &str = "safe/kl_short";
    pub const SAFE_KL_LONG: &str = "safe/kl_long";
    pub const SAFE_PID: &str = "safe/pid";
    /// 0 warmup, 1 climbing, 2 plateau, 3 converged.
    pub const SAFE_PHASE: &str = "safe/phase";
    pub const SAFE_PHI: &str = "safe/phi";
    pub const SAFE_THRESHOLD: &str = "safe/threshold";
    pub const SAFE_ENTROPY_FACTOR: &str = "safe/entropy_factor";
    pub const SAFE_PENALTY: &str = "safe/penalty";
    pub const SAFE_ACTIVE: &str = "safe/active";
    pub const SAFE_ENTROPY_BONUS: &str = "safe/entropy_bonus";
    pub const SAFE_V1_MEAN: &str = "safe/v1_mean";
    pub const SAFE_V2_MEAN: &str = "safe/v2_mean";
    pub const SAFE_VALUE_MEAN: &str = "safe/value_softmin_mean";
    pub const SAFE_NORMALIZED_REWARD: &str = "safe/normalized_reward_mean";

    /// Shaping: the mean composed reward before and after shaping, and the references used per sample.
    pub const REWARDS_RAW: &str = "rewards/raw";
    pub const REWARDS_SHAPED: &str = "rewards/shaped";
    pub const SHAPING_NUM_REFS: &str = "shaping/num_refs";

    /// GRPO-λ: groups given the length-penalised reward, their fraction, and the mean correctness ratio of each mode.
    pub const GRPO_LAMBDA_N_EFFICIENCY: &str = "grpo_lambda/n_efficiency_groups";
    pub const GRPO_LAMBDA_FRAC_EFFICIENCY: &str = "grpo_lambda/frac_efficiency";
    pub const GRPO_LAMBDA_RATIO_EFFICIENCY: &str = "grpo_lambda/ratio_efficiency";
    pub const GRPO_LAMBDA_RATIO_ACCURACY: &str = "grpo_lambda/ratio_accuracy";

    /// Held-out evaluation ([`crate::eval`]): the mean score (`eval.reward`'s raw value, or the weighted sum),
    /// mean completion tokens, the fraction cut at max_new_tokens, and the seconds it took.
    pub const EVAL_REWARD: &str = "eval/reward";
    pub const EVAL_MEAN_LENGTH: &str = "eval/mean_length";
    pub const EVAL_CLIPPED_RATIO: &str = "eval/clipped_ratio";
    pub const TIMING_EVAL: &str = "timing/eval";
    /// `eval/<name>/mean`: a reward's raw mean over the evaluation's completions.
    pub fn eval_reward_mean(name: &str) -> String {
        format!("eval/{name}/mean")
    }
    /// `eval/pass@<k>` (the unbiased estimator, averaged over prompts).
    pub fn eval_pass_at(k: usize) -> String {
        format!("eval/pass@{k}")
    }

    /// `rewards/<name>/mean` and `rewards/<name>/std`.
    pub fn reward_mean(name: &str) -> String {
        format!("rewards/{name}/mean")
    }
    pub fn reward_std(name: &str) -> String {
        format!("rewards/{name}/std")
    }
}

/// One logged step: names and values in the order they were added.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    values: Vec<(String, f64)>,
}

impl Record {
    pub fn new(step: u64) -> Self {
        Self { values: vec![(names::STEP.to_string(), step as f64)] }
    }

    /// Add or replace a value.
    pub fn set(&mut self, name: impl Into<String>, value: f64) {
        let name = name.into();
        match self.values.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.values.push((name, value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// The JSON line. The step is an integer; a non-finite value is written as null (JSON has no NaN), so a
    /// script sees "missing", never a wrong number.
    pub fn to_json_line(&self) -> String {
        // Written by hand to keep insertion order (serde_json's map sorts keys).
        let fields: Vec<String> = self
            .values
            .iter()
            .map(|(name, v)| {
                let value = if name == names::STEP {
                    (*v as u64).to_string()
                } else {
                    serde_json::Number::from_f64(*v).map_or("null".to_string(), |n| n.to_string())
                };
                format!("{}:{value}", serde_json::Value::from(name.as_str()))
            })
            .collect();
        format!("{{{}}}", fields.join(","))
    }

    /// A line for people: step, reward ± std, KL, loss, step time.
    pub fn console_line(&self) -> String {
        let f = |n: &str| self.get(n).map_or("-".to_string(), |v| format!("{v:.4}"));
        format!(
            "step {:>5} | reward {} ± {} | kl {} | loss {} | grad {} | {:.1}s",
            self.get(names::STEP).unwrap_or(0.0) as u64,
            f(names::REWARD),
            f(names::REWARD_STD),
            f(names::KL),
            f(names::LOSS),
            f(names::GRAD_NORM),
            self.get(names::TIMING_STEP).unwrap_or(0.0),
        )
    }
}

/// Appends records to `metrics.jsonl`, one flushed line per step (a crash loses at most the line being written),
/// and, when asked, the same records to a TensorBoard event file.
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
    tensorboard: Option<tensorboard::EventWriter>,
}

impl MetricsWriter {
    /// `metrics.jsonl` only.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_tensorboard(path, None)
    }

    /// `metrics.jsonl` at `path` and, with `Some(dir)`, TensorBoard event files in `dir`: rebuilt first from the
    /// lines `path` already holds (see [`tensorboard::EventWriter::rebuild`]), so both show the same data.
    pub fn open_with_tensorboard(path: &Path, tensorboard: Option<&Path>) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {} for writing", path.display()))?;
        let tensorboard = tensorboard.map(|dir| tensorboard::EventWriter::rebuild(dir, path)).transpose()?;
        Ok(Self { file, path: path.to_path_buf(), tensorboard })
    }

    /// The record as a JSON line, then as an event when TensorBoard output is on.
    pub fn write(&mut self, record: &Record) -> Result<()> {
        writeln!(self.file, "{}", record.to_json_line()).with_context(|| format!("writing {}", self.path.display()))?;
        self.file.flush()?;
        if let Some(tb) = &mut self.tensorboard {
            tb.write(record)?;
        }
        Ok(())
    }
}

/// Drop every line logged after `step` (and any partial last line), so a run resumed from the checkpoint of
/// `step` writes the same file an uninterrupted run would.
pub fn truncate_after(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut kept = String::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { break };
        match v.get(names::STEP).and_then(|s| s.as_u64()) {
            Some(s) if s <= step => {
                kept.push_str(&line);
                kept.push('\n');
            }
            _ => break,
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_serialise_in_order_with_null_for_non_finite() {
        let mut r = Record::new(3);
        r.set(names::REWARD, 0.5);
        r.set(names::reward_mean("correct"), 0.25);
        r.set(names::KL, f64::NAN);
        r.set(names::REWARD, 0.75);
        assert_eq!(r.to_json_line(), r#"{"step":3,"reward":0.75,"rewards/correct/mean":0.25,"kl":null}"#);
        assert!(r.console_line().starts_with("step     3 | reward 0.7500"));
    }

    #[test]
    fn truncate_after_keeps_lines_up_to_the_step_and_drops_a_partial_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::open(&p).unwrap();
        for s in 1..=5 {
            let mut r = Record::new(s);
            r.set(names::LOSS, s as f64);
            w.write(&r).unwrap();
        }
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"{\"step\":6,\"lo").unwrap();
        truncate_after(&p, 3).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with("{\"step\":3,\"loss\":3.0}\n"));
        truncate_after(&p, 10).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
    }
}
