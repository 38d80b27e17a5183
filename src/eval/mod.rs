//! Held-out evaluation: which prompts (a file of their own, or a fixed fraction of the training data held out),
//! k completions per prompt from the same batched generation code, scored by the recipe's rewards unshaped, and
//! summarised as mean reward, each reward's mean, pass@k and completion length.
//!
//! Evaluation draws on random streams of its own (keyed by the eval prompt and sample, never by the training
//! step), so it changes nothing training samples and resume stays exact; and every evaluation of a run uses the
//! same streams, so two evaluations differ only because the model did.

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::data::{Dataset, TruncationCounter};
use crate::metrics::names;
use crate::model::{CausalLm, Tokenizer};
use crate::recipe::{DataSettings, EvalData, EvalSettings};
use crate::reward::{RewardInput, RewardPipeline};
use crate::rollout::{generate, FinishReason, GenerationConfig, Request, RowKey};

/// Salt of the evaluation streams' seed: `run.seed` alone keys the training streams.
const EVAL_SEED_SALT: u64 = 0xe7a1_5eed_0000_0001;
/// The `step` field of every evaluation stream's key (training keys use steps 1..=max_steps).
const EVAL_STREAM_STEP: u64 = u64::MAX - 1;
/// Fixed: which rows `eval.split` holds out is part of the data, not of a run, so every `run.seed` of a sweep is
/// evaluated on the same prompts.
const SPLIT_SEED: u64 = 0x5b11_7000_0000_0001;

/// The unbiased pass@k estimator of Chen et al. 2021 (HumanEval): with `n` samples of which `c` passed, the
/// probability that at least one of `k` drawn without replacement passes, `1 − C(n−c, k) / C(n, k)`, computed as
/// `1 − Π_{i=n−c+1}^{n} (1 − k/i)` (no large binomials).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(k >= 1 && k <= n && c <= n, "pass@{k} of {c}/{n}");
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// The k of the pass@k metrics for `n` samples per prompt: 1, the powers of two below n, and n.
pub fn pass_ks(n: usize) -> Vec<usize> {
    let mut ks: Vec<usize> = std::iter::successors(Some(1usize), |k| k.checked_mul(2)).take_while(|k| *k < n).collect();
    ks.push(n);
    ks.dedup();
    ks
}

/// Which of `n` rows `eval.split = fraction` holds out: `round(fraction × n)` of them (at least one, and at least
/// one left to train on), chosen by a fixed hash of the row's position so the choice never depends on the run.
pub fn held_out(n: usize, fraction: f64) -> Result<Vec<bool>> {
    if n < 2 {
        bail!("eval.split needs at least 2 rows in data.source (one to hold out, one to train on); it has {n}");
    }
    let count = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut order: Vec<(u64, usize)> = (0..n)
        .map(|i| {
            let key = RowKey { seed: SPLIT_SEED, step: 0, prompt: i as u64, sample: 0 };
            (crate::rollout::RowRng::new(key).next_u64(), i)
        })
        .collect();
    order.sort_unstable();
    let mut held = vec![false; n];
    for &(_, i) in &order[..count] {
        held[i] = true;
    }
    Ok(held)
}

/// `data.source`'s rows split between training and evaluation: with `eval.split`, (the rows trained on, the rows
/// held out); otherwise all of them to train on and none held out here (`eval.source` is [`source_dataset`]'s).
pub fn split_off(all: Dataset, eval: &EvalSettings) -> Result<(Dataset, Option<Dataset>)> {
    let EvalData::Split(fraction) = eval.data else { return Ok((all, None)) };
    let held = held_out(all.len(), fraction)?;
    let train = all.subset(|i| !held[i])?;
    let eval = all.subset(|i| held[i])?;
    Ok((train, Some(eval)))
}

/// The prompts of `eval.source` (read with `data.prompt_field`); `None` unless the recipe names one.
pub fn source_dataset(data: &DataSettings, eval: &EvalSettings) -> Result<Option<Dataset>> {
    let EvalData::Source(source) = &eval.data else { return Ok(None) };
    let settings = DataSettings { source: source.clone(), ..data.clone() };
    Dataset::load(&settings).context("eval.source").map(Some)
}

/// The prompts `safe eval` evaluates on: the held-out data the recipe names, or `data.source` whole when it names
/// none (said in the returned note). Only what it evaluates on is read.
pub fn command_dataset(data: &DataSettings, eval: &EvalSettings) -> Result<(Dataset, Option<String>)> {
    if let Some(held) = source_dataset(data, eval)? {
        return Ok((held, None));
    }
    match split_off(Dataset::load(data)?, eval)? {
        (_, Some(held)) => Ok((held, None)),
        (all, None) => Ok((
            all,
            Some("the recipe names no held-out prompts (eval.source or eval.split): evaluating on data.source".into()),
        )),
    }
}

/// One evaluated completion.
#[derive(Debug, Clone)]
pub struct EvalSample {
    /// Position among the evaluated prompts, and the sample's index among its prompt's k.
    pub prompt_index: usize,
    pub sample_index: usize,
    pub prompt: String,
    pub completion: String,
    pub num_tokens: usize,
    pub finish: FinishReason,
    /// Each reward's raw value, in recipe order.
    pub rewards: Vec<(String, Option<f64>)>,
    /// What pass@k and `eval/reward` read: `eval.reward`'s raw value, or the weighted sum.
    pub score: Option<f64>,
    pub passed: bool,
}

/// One evaluation's result.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// `eval/reward`, `eval/<name>/mean`, `eval/pass@k`, `eval/mean_length`, `eval/clipped_ratio`, in that order.
    pub metrics: Vec<(String, f64)>,
    pub samples: Vec<EvalSample>,
    /// Warnings for the console (samples a reward dropped for a bad data row, ...).
    pub notes: Vec<String>,
}

impl EvalReport {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// A line for people: `eval  step N | reward … | pass@1 … | pass@k … | length …`.
    pub fn console_line(&self, step: u64) -> String {
        let f = |n: &str| self.get(n).filter(|v| v.is_finite()).map_or("-".to_string(), |v| format!("{v:.4}"));
        let passes: Vec<String> = self
            .metrics
            .iter()
            .filter_map(|(n, v)| {
                n.strip_prefix("eval/").filter(|n| n.starts_with("pass@")).map(|n| format!("{n} {v:.4}"))
            })
            .collect();
        format!(
            "eval  {step:>5} | reward {} | {} | length {} | {} prompts × {}",
            f(names::EVAL_REWARD),
            passes.join(" | "),
            f(names::EVAL_MEAN_LENGTH),
            self.samples.iter().map(|s| s.prompt_index + 1).max().unwrap_or(0),
            self.samples.iter().map(|s| s.sample_index + 1).max().unwrap_or(0),
        )
    }

    /// The completions file's lines: the fields of training's completions files, plus `score` and `passed`.
    pub fn jsonl(&self, step: u64) -> String {
        let mut out = String::new();
        for s in &self.samples {
            let rewards: serde_json::Map<String, serde_json::Value> =
                s.rewards.iter().map(|(n, v)| (n.clone(), (*v).into())).collect();
            let line = json!({
                "step": step,
                "prompt_index": s.prompt_index,
                "sample_index": s.sample_index,
                "prompt": s.prompt,
                "completion": s.completion,
                "finish_reason": s.finish,
                "num_tokens": s.num_tokens,
                "rewards": rewards,
                "score": s.score,
                "passed": s.passed,
            });
            out.push_str(&line.to_string());
            out.push('\n');
        }
        out
    }
}

/// Evaluation prompts, rendered and tokenised once, and how to sample them.
pub struct Evaluator {
    settings: EvalSettings,
    dataset: Dataset,
    /// (rendered text, ids) of the first `eval.max_prompts` prompts.
    encoded: Vec<(String, Vec<u32>)>,
    generation: GenerationConfig,
    seed: u64,
}

impl Evaluator {
    /// `rollout` is training's generation config: evaluation keeps its stops, top-p/k, min-p, penalty and batch
    /// size, with `eval.temperature` and `eval.max_new_tokens`. Returns the evaluator and a note when prompts
    /// were truncated.
    pub fn new(
        settings: &EvalSettings,
        dataset: Dataset,
        tokenizer: &Tokenizer,
        data: &DataSettings,
        rollout: &GenerationConfig,
        run_seed: u64,
    ) -> Result<(Self, Option<String>)> {
        let n = match settings.max_prompts {
            0 => dataset.len(),
            m => m,
        };
        let mut truncation = TruncationCounter::default();
        let encoded = dataset.encode_prompts(n, tokenizer, data.chat, data.max_prompt_tokens, &mut truncation)?;
        let mut generation = rollout.clone();
        generation.sampling.temperature = settings.temperature;
        generation.max_new_tokens = settings.max_new_tokens;
        let note = truncation.warning(data.max_prompt_tokens).map(|w| format!("evaluation: {w}"));
        let seed = run_seed ^ EVAL_SEED_SALT;
        Ok((Self { settings: settings.clone(), dataset, encoded, generation, seed }, note))
    }

    /// Prompts evaluated, and completions per prompt.
    pub fn size(&self) -> (usize, usize) {
        (self.encoded.len(), self.settings.num_samples)
    }

    /// The held-out rows (every reward's data check reads their columns).
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Sample k completions per prompt from `model`, score them and summarise. `Err`: generation or a reward
    /// failed (or a stop was requested).
    pub fn run(
        &self,
        model: &CausalLm,
        tokenizer: &Tokenizer,
        rewards: &RewardPipeline,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<EvalReport> {
        let k = self.settings.num_samples;
        let requests: Vec<Request> = self
            .encoded
            .iter()
            .enumerate()
            .flat_map(|(i, (_, ids))| {
                (0..k).map(move |j| Request {
                    prompt: ids.clone(),
                    key: RowKey { seed: self.seed, step: EVAL_STREAM_STEP, prompt: i as u64, sample: j as u64 },
                })
            })
            .collect();
        let completions =
            generate(model, Some(tokenizer), &requests, &self.generation, progress).context("evaluation: sampling")?;
        let texts: Vec<String> = completions.iter().map(|c| tokenizer.decode(&c.ids, true)).collect::<Result<_>>()?;
        let examples = self.dataset.examples();
        let inputs: Vec<RewardInput> = completions
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let i = r / k;
                RewardInput {
                    prompt: &self.encoded[i].0,
                    raw_prompt: Some(&examples[i].prompt),
                    completion: &texts[r],
                    completion_ids: &c.ids,
                    finish: c.finish,
                    columns: &examples[i].columns,
                }
            })
            .collect();
        let scored = rewards.score(&inputs).context("evaluation: scoring")?;
        let scores: Vec<Option<f64>> = match &self.settings.reward {
            Some(name) => {
                let (_, values) = scored
                    .per_reward
                    .iter()
                    .find(|(n, _)| n == name)
                    .with_context(|| format!("eval.reward = `{name}` is not one of the rewards"))?;
                values.clone()
            }
            None => scored.total.iter().map(|t| Some(*t).filter(|t| !t.is_nan())).collect(),
        };
        let threshold = self.settings.pass_threshold;
        let samples: Vec<EvalSample> = completions
            .iter()
            .enumerate()
            .map(|(r, c)| EvalSample {
                prompt_index: r / k,
                sample_index: r % k,
                prompt: self.encoded[r / k].0.clone(),
                completion: texts[r].clone(),
                num_tokens: c.ids.len(),
                finish: c.finish,
                rewards: scored.per_reward.iter().map(|(n, v)| (n.clone(), v[r])).collect(),
                score: scores[r],
                passed: scores[r].is_some_and(|s| s >= threshold),
            })
            .collect();
        let metrics = summarise(&samples, &scored.per_reward, k);
        Ok(EvalReport { metrics, samples, notes: scored.notes })
    }
}

/// The evaluation metrics of scored samples (prompt-major, `k` per prompt). A sample without a score (every
/// reward answered null) counts as not passed and is left out of the means.
fn summarise(samples: &[EvalSample], per_reward: &[(String, Vec<Option<f64>>)], k: usize) -> Vec<(String, f64)> {
    let mean = |v: &mut dyn Iterator<Item = f64>| {
        let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
        if n == 0 {
            f64::NAN
        } else {
            sum / n as f64
        }
    };
    let mut out = vec![(names::EVAL_REWARD.to_string(), mean(&mut samples.iter().filter_map(|s| s.score)))];
    for (name, values) in per_reward {
        out.push((names::eval_reward_mean(name), mean(&mut values.iter().filter_map(|v| *v))));
    }
    let prompts = samples.len() / k.max(1);
    for kk in pass_ks(k) {
        let per_prompt = (0..prompts).map(|p| {
            let c = samples[p * k..(p + 1) * k].iter().filter(|s| s.passed).count();
            pass_at_k(k, c, kk)
        });
        out.push((names::eval_pass_at(kk), mean(&mut per_prompt.into_iter())));
    }
    out.push((names::EVAL_MEAN_LENGTH.to_string(), mean(&mut samples.iter().map(|s| s.num_tokens as f64))));
    let clipped = samples.iter().filter(|s| s.finish.is_truncated()).count();
    out.push((names::EVAL_CLIPPED_RATIO.to_string(), clipped as f64 / samples.len().max(1) as f64));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand values: pass@k = 1 − C(n−c, k)/C(n, k).
    /// n=5, c=2: k=1 → 1 − 3/5 = 0.4; k=2 → 1 − C(3,2)/C(5,2) = 1 − 3/10 = 0.7; k=3 → 1 − 1/10 = 0.9;
    /// k=4 → n−c = 3 < 4 → 1. n=10, c=3, k=5 → 1 − C(7,5)/C(10,5) = 1 − 21/252 = 11/12. c=0 → 0; c=n → 1.
    #[test]
    fn pass_at_k_matches_hand_computed_binomials() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(pass_at_k(5, 2, 1), 0.4));
        assert!(close(pass_at_k(5, 2, 2), 0.7));
        assert!(close(pass_at_k(5, 2, 3), 0.9));
        assert_eq!(pass_at_k(5, 2, 4), 1.0);
        assert!(close(pass_at_k(10, 3, 5), 11.0 / 12.0));
        assert_eq!(pass_at_k(4, 0, 1), 0.0);
        assert_eq!(pass_at_k(4, 0, 4), 0.0);
        assert_eq!(pass_at_k(4, 4, 1), 1.0);
        // pass@1 is the fraction passed.
        assert!(close(pass_at_k(8, 3, 1), 3.0 / 8.0));
    }

    #[test]
    fn pass_ks_are_one_powers_of_two_and_n() {
        assert_eq!(pass_ks(1), vec![1]);
        assert_eq!(pass_ks(2), vec![1, 2]);
        assert_eq!(pass_ks(4), vec![1, 2, 4]);
        assert_eq!(pass_ks(6), vec![1, 2, 4, 6]);
    }

    #[test]
    fn held_out_rows_are_a_fixed_fraction_and_leave_rows_to_train_on() {
        let a = held_out(1000, 0.1).unwrap();
        assert_eq!(a.iter().filter(|h| **h).count(), 100);
        assert_eq!(a, held_out(1000, 0.1).unwrap(), "the same rows every time");
        // Not simply the first or last rows.
        assert!(a[..500].iter().any(|h| *h) && a[500..].iter().any(|h| *h));
        assert_eq!(held_out(3, 0.01).unwrap().iter().filter(|h| **h).count(), 1, "at least one held out");
        assert_eq!(held_out(3, 0.99).unwrap().iter().filter(|h| **h).count(), 2, "at least one left");
        assert!(held_out(1, 0.5).is_err());
    }

    fn sample(prompt: usize, j: usize, score: Option<f64>, threshold: f64) -> EvalSample {
        EvalSample {
            prompt_index: prompt,
            sample_index: j,
            prompt: String::new(),
            completion: String::new(),
            num_tokens: 2 + j,
            finish: if j == 0 { FinishReason::Length } else { FinishReason::Eos },
            rewards: vec![("correct".into(), score)],
            score,
            passed: score.is_some_and(|s| s >= threshold),
        }
    }

    /// Two prompts × 2 samples: prompt 0 passes 1 of 2, prompt 1 none (one unscored).
    /// eval/reward = mean(1, 0, 0) = 1/3; pass@1 = mean(1/2, 0) = 0.25; pass@2 = mean(1, 0) = 0.5;
    /// mean_length = mean(2, 3, 2, 3) = 2.5; clipped = 2/4.
    #[test]
    fn summary_metrics_of_a_small_batch() {
        let samples = vec![
            sample(0, 0, Some(1.0), 1.0),
            sample(0, 1, Some(0.0), 1.0),
            sample(1, 0, Some(0.0), 1.0),
            sample(1, 1, None, 1.0),
        ];
        let per_reward = vec![("correct".to_string(), samples.iter().map(|s| s.score).collect())];
        let m = summarise(&samples, &per_reward, 2);
        let get = |n: &str| m.iter().find(|(k, _)| k == n).unwrap().1;
        assert!((get("eval/reward") - 1.0 / 3.0).abs() < 1e-12);
        assert!((get("eval/correct/mean") - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(get("eval/pass@1"), 0.25);
        assert_eq!(get("eval/pass@2"), 0.5);
        assert_eq!(get("eval/mean_length"), 2.5);
        assert_eq!(get("eval/clipped_ratio"), 0.5);
    }
}
