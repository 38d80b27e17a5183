//! `safe train`: the loop. It owns the order of the stages and nothing else:
//!
//! rollout (sample G completions per prompt, or replay them) → rewards (and shaping) → the algorithm's advantages
//! → the algorithm's update → metrics and completions files → checkpoint. What each algorithm does in its stages is
//! its own ([`crate::algo`]); this file never asks which algorithm runs.
//!
//! Exact resume follows from three choices: every random stream is keyed by (run.seed, step, prompt, sample), so no
//! generator state exists; the data position is the sampler's (epoch, cursor); and everything else that changes
//! between steps is in [`TrainState`] (the algorithm's own state included), the optimizer or the algorithm's tensor
//! files, all saved in each checkpoint.

pub mod memory;
pub mod references;
pub mod run_dir;
mod setup;
pub mod status;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

pub use crate::algo::StepOutcome;
use crate::algo::{Algorithm, Models, Runtime, StepBatch};
use crate::checkpoint::{self, SaveRequest};
use crate::data::{Dataset, Sampler, SamplerState};
use crate::exit::{self, Failure, OrExit};
use crate::metrics::{names, MetricsWriter, Record};
use crate::model::{CausalLm, Tokenizer};
use crate::optim::AdamW;
use crate::recipe::Recipe;
use crate::reward::shaping::{shape, RunningStats, ShapingKind};
use crate::reward::{RewardInput, RewardPipeline, ScoredBatch};
use crate::rollout::{generate, GenerationConfig, Replay, Request, Rollouts, RowKey, Sample};
use crate::signal;
use references::{ReferenceRewards, ReferenceSource};

/// Everything the loop carries from one step to the next besides weights and optimizer; saved verbatim in each
/// checkpoint's `state.json` (`training`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed.
    pub step: u64,
    /// The data sampler's position; `None` when replaying a file (its position is a function of the step).
    pub sampler: Option<SamplerState>,
    /// Non-finite steps in a row, for `run.max_bad_steps`.
    pub bad_steps_in_a_row: u64,
    /// Steps skipped as non-finite, in all.
    pub skipped_steps: u64,
    /// Random streams are counter-based, keyed by (seed, step, prompt, sample): the seed is their whole state.
    pub rng_seed: u64,
    /// The learning-rate schedule's position is the optimizer's step count (in `state.json`'s `optimizer`).
    pub optimizer_steps: u64,
    pub recipe_hash: String,
    /// The resolved recipe this state was trained under; `--resume` compares it key by key.
    pub recipe: String,
    /// Running reward statistics of the meanstd / clip / minmax shaping kinds.
    #[serde(default)]
    pub shaping_stats: RunningStats,
    /// Reference rewards per prompt (PAR and the other relative shaping kinds).
    #[serde(default)]
    pub references: ReferenceRewards,
    /// The algorithm's own state (its controllers, its critic's optimizer step; `null` for none): what
    /// [`Algorithm::state`] returned.
    #[serde(default)]
    pub algorithm: serde_json::Value,
}

/// One step's result: its metrics record and outcome.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u64,
    pub record: Record,
    pub outcome: StepOutcome,
    /// Warnings for the console (e.g. dynamic sampling ran out of rounds).
    pub notes: Vec<String>,
}

/// A step's samples, their scores (`Err`: a reward failed, the step is skipped), and the rollout and reward seconds.
type SampledBatch = (Vec<Sample>, Result<ScoredBatch>, f64, f64);

/// Where prompts come from.
enum Prompts {
    /// Sampled from the policy for a dataset's prompts, each rendered and tokenised once at start-up.
    Data {
        dataset: Dataset,
        sampler: Sampler,
        encoded: Vec<(String, Vec<u32>)>,
    },
    Replay(Replay),
}

pub struct Trainer {
    recipe: Recipe,
    run_dir: PathBuf,
    policy: CausalLm,
    /// No-grad view of `policy` (same storage) for sampling and old log-probs.
    sampler_model: CausalLm,
    reference: Option<CausalLm>,
    tokenizer: Tokenizer,
    optimizer: AdamW,
    /// The algorithm, with its own models (critics) and state.
    algorithm: Box<dyn Algorithm>,
    rewards: RewardPipeline,
    prompts: Prompts,
    generation: GenerationConfig,
    /// What every update is handed (its `step` set each step).
    runtime: Runtime,
    plan: memory::Plan,
    state: TrainState,
    metrics: MetricsWriter,
    /// Held-out evaluation (`[eval]`), when the recipe names held-out prompts.
    evaluator: Option<crate::eval::Evaluator>,
    /// The newest evaluation's console line (repeated when the run ends) and mean score (on the progress bar).
    last_eval: Option<String>,
    last_eval_reward: Option<f64>,
    /// Warnings for the console (truncated prompts, superseded checkpoints), printed once by [`Trainer::run`].
    notes: Vec<String>,
}

impl Trainer {
    pub fn state(&self) -> &TrainState {
        &self.state
    }
    pub fn policy(&self) -> &CausalLm {
        &self.policy
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn plan(&self) -> &memory::Plan {
        &self.plan
    }
    pub fn run_dir(&self) -> &std::path::Path {
        &self.run_dir
    }

    /// Replace the reward pipeline (tests inject failing or non-finite rewards through this).
    pub fn set_rewards(&mut self, rewards: RewardPipeline) {
        self.rewards = rewards;
    }

    /// Train to `run.max_steps`, logging and checkpointing. Ends with exit 1 after too many non-finite steps in a
    /// row (the last good checkpoint kept) and with 130 on SIGINT/SIGTERM/SIGHUP (after saving the last finished
    /// step; a step the signal caught in its rollout or rewards is abandoned, not finished).
    pub fn run(&mut self) -> Result<(), Failure> {
        let max_steps = self.recipe.run.max_steps;
        let bar = ProgressBar::new(max_steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed} < {eta}]")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_position(self.state.step);
        // Progress lines go to stdout, warnings to stderr; above the bar when it is drawn.
        let say = |line: &str| {
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
        };
        let warn = |line: &str| {
            if bar.is_hidden() {
                eprintln!("warning: {line}");
            } else {
                bar.println(format!("warning: {line}"));
            }
        };
        for note in std::mem::take(&mut self.notes) {
            warn(&note);
        }
        say(&format!("memory:     {}", self.plan.summary()));
        if let Some(ev) = &self.evaluator {
            let (prompts, k) = ev.size();
            say(&format!("eval:       {prompts} held-out prompts × {k}, before step 1 and after every due step"));
        }
        let mut saved_at = self.state.step;
        // Before the first step: where the run starts from (a resumed run evaluated that step before saving it).
        if self.state.step == 0 && self.recipe.eval.due(0, max_steps) {
            let mut record = Record::new(0);
            match self.evaluate(0, &mut record) {
                Err(e) if signal::is(&e) => {}
                Err(e) => return Err(Failure::training(e)),
                Ok(notes) => {
                    notes.iter().for_each(|n| warn(n));
                    self.metrics.write(&record).or_exit(exit::TRAINING_FAILED)?;
                    self.last_eval.iter().for_each(|l| say(l));
                }
            }
        }
        while self.state.step < max_steps {
            if signal::requested() {
                break;
            }
            // An abandoned step must leave no trace in what the checkpoint saves (shaping statistics, references).
            let before = self.state.clone();
            let report = match self.step() {
                Ok(report) => report,
                Err(e) if signal::is(&e) => {
                    self.state = before;
                    break;
                }
                Err(e) => return Err(Failure::training(e)),
            };
            for note in &report.notes {
                warn(note);
            }
            let step = report.step;
            let mut report = report;
            // The step is finished (its update applied): an evaluation a stop request cuts short is left out, and
            // the step is still saved below.
            let evaluated = self.recipe.eval.due(step, max_steps);
            if evaluated {
                match self.evaluate(step, &mut report.record) {
                    Err(e) if signal::is(&e) => {}
                    Err(e) => return Err(Failure::training(e)),
                    Ok(notes) => notes.iter().for_each(|n| warn(n)),
                }
            }
            let r = &self.recipe.run;
            if step % r.log_every == 0 || step == max_steps || evaluated {
                self.metrics.write(&report.record).or_exit(exit::TRAINING_FAILED)?;
                say(&report.record.console_line());
                if evaluated {
                    self.last_eval.iter().for_each(|l| say(l));
                }
            }
            let f = |n: &str| report.record.get(n).filter(|v| v.is_finite()).map_or("-".into(), |v| format!("{v:.3}"));
            let eval = self.last_eval_reward.map_or(String::new(), |v| format!(" eval {v:.3}"));
            bar.set_message(format!("reward {} kl {}{eval}", f(names::REWARD), f(names::KL)));
            bar.set_position(step);
            if let StepOutcome::Skipped { stage, reason } = &report.outcome {
                warn(&format!("step {step} skipped ({stage}): {reason}"));
                if self.state.bad_steps_in_a_row > r.max_bad_steps {
                    bar.abandon();
                    let last = checkpoint::latest_complete(&self.run_dir)
                        .map_or("no checkpoint was written before them".to_string(), |p| {
                            format!("the last good checkpoint is {}", p.display())
                        });
                    return Err(Failure::training(anyhow!(
                        "stopping after {} bad steps in a row (run.max_bad_steps = {}); {last}. Last problem \
                         ({stage}): {reason}",
                        self.state.bad_steps_in_a_row,
                        r.max_bad_steps
                    )));
                }
            }
            // A skipped step saves nothing: the newest checkpoint stays the last good one.
            let due = (r.save_every > 0 && step % r.save_every == 0) || step == max_steps;
            if due && report.outcome == StepOutcome::Trained {
                self.save().or_exit(exit::TRAINING_FAILED)?;
                saved_at = step;
            }
        }
        bar.finish_and_clear();
        if signal::requested() {
            if self.state.step == 0 {
                return Err(Failure::interrupted(anyhow!(
                    "interrupted before the first step finished: nothing to save; start again with --resume auto"
                )));
            }
            if saved_at != self.state.step {
                self.save().or_exit(exit::INTERRUPTED)?;
            }
            return Err(Failure::interrupted(anyhow!(
                "interrupted after step {}; the checkpoint of that step is saved: continue with --resume auto",
                self.state.step
            )));
        }
        println!(
            "done: {} steps; checkpoints in {}",
            self.state.step,
            checkpoint::checkpoints_dir(&self.run_dir).display()
        );
        if let Some(line) = &self.last_eval {
            println!("{line}");
        }
        println!("report: safe report {}", self.run_dir.display());
        Ok(())
    }

    /// Evaluate the current policy on the held-out prompts after `step` (0: before the first), adding the
    /// `eval/*` metrics to `record` and writing `completions/eval-step-<N>.jsonl`. Returns notes for the console;
    /// a reward that fails here is a note (evaluation never stops training), a stop request is `Err`.
    fn evaluate(&mut self, step: u64, record: &mut Record) -> Result<Vec<String>> {
        let Some(ev) = &self.evaluator else { return Ok(Vec::new()) };
        let t = Instant::now();
        // Evaluate the weights as they are now, not the decode copies of the last rollout.
        self.sampler_model.refresh_decode_copies()?;
        let report = match ev.run(&self.sampler_model, &self.tokenizer, &self.rewards, None) {
            Ok(report) => report,
            Err(e) if signal::is(&e) || signal::requested() => return Err(signal::Interrupted.into()),
            Err(e) => return Ok(vec![format!("evaluation after step {step} failed, left out of the metrics: {e:#}")]),
        };
        for (name, value) in &report.metrics {
            record.set(name.clone(), *value);
        }
        record.set(names::TIMING_EVAL, t.elapsed().as_secs_f64());
        let path = run_dir::eval_completions_file(&self.run_dir, step);
        std::fs::write(&path, report.jsonl(step)).with_context(|| format!("cannot write {}", path.display()))?;
        self.last_eval = Some(report.console_line(step));
        self.last_eval_reward = report.get(names::EVAL_REWARD).filter(|v| v.is_finite());
        Ok(report.notes)
    }

    /// Write a checkpoint of the current state.
    pub fn save(&self) -> Result<PathBuf> {
        let mut state = self.state.clone();
        state.algorithm = self.algorithm.state()?;
        let extra = self.algorithm.tensor_files();
        let state = serde_json::to_value(&state)?;
        let req = SaveRequest {
            step: self.state.step,
            model: &self.policy,
            tokenizer: &self.tokenizer,
            optimizer: &self.optimizer,
            training_state: &state,
            extra_tensor_files: &extra,
        };
        checkpoint::save(&self.run_dir, &req, self.recipe.run.keep_last)
    }

    /// One training step. `Err` is a failure of the run (exit 1); non-finite values are a skipped step instead.
    pub fn step(&mut self) -> Result<StepReport> {
        let step = self.state.step + 1;
        let t_step = Instant::now();
        let mut record = Record::new(step);

        let mut notes = Vec::new();
        let (samples, scored, rollout_s, reward_s) = match self.recipe.rollout.max_sampling_rounds {
            None => self.sample_and_score(step, 0, &mut record)?,
            Some(rounds) => self.dynamic_sample(step, rounds, &mut record, &mut notes)?,
        };

        // A reward wait abandoned for a stop request is no failed step: the whole step is abandoned.
        if let Err(e) = &scored {
            if signal::is(e) || signal::requested() {
                return Err(signal::Interrupted.into());
            }
        }
        let mut update_s = 0.0;
        let outcome = match scored {
            Err(e) => StepOutcome::Skipped { stage: "reward", reason: format!("{e:#}") },
            Ok(mut scored) => {
                notes.append(&mut scored.notes);
                for (name, value) in &scored.metrics {
                    record.set(name.clone(), *value);
                }
                completion_metrics(&mut record, &samples);
                let rt = Runtime { step, ..self.runtime };
                // LoRA dropout's masks: this step's training forwards, counted from here.
                self.policy.begin_dropout_step(rt.seed, step);
                let models = Models {
                    policy: &self.policy,
                    rollout_view: &self.sampler_model,
                    reference: self.reference.as_ref(),
                    optimizer: &mut self.optimizer,
                };
                let advantages = self.algorithm.advantages(&models, &samples, &mut scored, &rt, &mut record)?;
                let every = self.recipe.run.completions_every;
                if every > 0 && step.is_multiple_of(every) {
                    self.write_completions(step, &samples, &scored, advantages.as_deref())?;
                }
                let t = Instant::now();
                let models = Models {
                    policy: &self.policy,
                    rollout_view: &self.sampler_model,
                    reference: self.reference.as_ref(),
                    optimizer: &mut self.optimizer,
                };
                let batch = StepBatch { samples: &samples, scored: &scored };
                let outcome = self.algorithm.update(models, &batch, advantages.as_deref(), &rt, &mut record)?;
                update_s = t.elapsed().as_secs_f64();
                outcome
            }
        };

        let tokens: usize = samples.iter().map(|s| s.completion_ids.len()).sum();
        record.set(names::TIMING_ROLLOUT, rollout_s);
        record.set(names::TIMING_REWARD, reward_s);
        record.set(names::TIMING_UPDATE, update_s);
        record.set(names::TIMING_STEP, t_step.elapsed().as_secs_f64());
        record.set(names::TOKENS_PER_SECOND, tokens as f64 / rollout_s.max(1e-9));
        record.set(names::TOKENS_COMPLETION, tokens as f64);
        record.set(names::TOKENS_PROMPT, samples.iter().map(|s| s.prompt_ids.len()).sum::<usize>() as f64);

        self.state.step = step;
        self.state.optimizer_steps = self.optimizer.state().step;
        if let Prompts::Data { sampler, .. } = &self.prompts {
            self.state.sampler = Some(sampler.state());
        }
        match &outcome {
            StepOutcome::Trained => self.state.bad_steps_in_a_row = 0,
            StepOutcome::Skipped { .. } => {
                self.state.bad_steps_in_a_row += 1;
                self.state.skipped_steps += 1;
            }
        }
        Ok(StepReport { step, record, outcome, notes })
    }

    /// One round of the step's rollouts (sampled or replayed) and their rewards, shaped; with the seconds each took.
    /// A reward that fails is the scored batch's `Err` (the step is skipped), not the run's.
    fn sample_and_score(&mut self, step: u64, round: u64, record: &mut Record) -> Result<SampledBatch> {
        let t = Instant::now();
        let Rollouts { samples, rewards: given_rewards } = self.rollout(step, round)?;
        let rollout_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let scored = self.score(&samples, given_rewards).and_then(|mut s| {
            self.shape(&samples, &mut s, record)?;
            Ok(s)
        });
        Ok((samples, scored, rollout_s, t.elapsed().as_secs_f64()))
    }

    /// DAPO's dynamic sampling: rounds of `prompts_per_step` fresh prompts, keeping the groups whose rewards differ,
    /// until the step holds `prompts_per_step` of them (the surplus of the last round dropped, as verl does) or
    /// `rounds` rounds have run (then the step trains on what it has, with a note). Each round draws the next
    /// prompts from the sampler and its own random streams (the round is part of their key), so resume stays exact.
    fn dynamic_sample(
        &mut self,
        step: u64,
        rounds: usize,
        record: &mut Record,
        notes: &mut Vec<String>,
    ) -> Result<SampledBatch> {
        let (want, g) = (self.recipe.rollout.prompts_per_step, self.recipe.rollout.num_generations);
        let (mut samples, mut batches, mut picks) = (Vec::new(), Vec::new(), Vec::new());
        let (mut rollout_s, mut reward_s, mut filtered, mut done) = (0.0, 0.0, 0usize, 0usize);
        for round in 0..rounds {
            let (round_samples, scored, r_s, s_s) = self.sample_and_score(step, round as u64, record)?;
            (rollout_s, reward_s, done) = (rollout_s + r_s, reward_s + s_s, round + 1);
            let scored = match scored {
                Ok(s) => s,
                Err(e) => return Ok((round_samples, Err(e), rollout_s, reward_s)),
            };
            for (k, zero) in crate::advantage::zero_std_groups(&scored.total, g).into_iter().enumerate() {
                if zero {
                    filtered += 1;
                } else if samples.len() < want * g {
                    samples.extend_from_slice(&round_samples[k * g..(k + 1) * g]);
                    picks.extend((k * g..(k + 1) * g).map(|i| (batches.len(), i)));
                }
            }
            batches.push(scored);
            if samples.len() == want * g {
                break;
            }
        }
        record.set(names::SAMPLING_ROUNDS, done as f64);
        record.set(names::SAMPLING_FILTERED_GROUPS, filtered as f64);
        let kept = samples.len() / g;
        if kept < want {
            notes.push(format!(
                "dynamic sampling kept {kept} of {want} groups in {done} rounds (rollout.max_sampling_rounds): the step \
                 trains on those"
            ));
        }
        if kept == 0 {
            let e = anyhow!("every group's rewards were equal in {done} rounds: nothing to learn from");
            return Ok((samples, Err(e), rollout_s, reward_s));
        }
        Ok((samples, Ok(ScoredBatch::select(&batches, &picks)), rollout_s, reward_s))
    }

    /// The step's samples: `prompts_per_step` groups of `num_generations`, group-major; and the rewards when a replay
    /// file carries them.
    fn rollout(&mut self, step: u64, round: u64) -> Result<Rollouts> {
        let ro = &self.recipe.rollout;
        let (dataset, sampler, encoded) = match &mut self.prompts {
            Prompts::Replay(replay) => return Ok(replay.batch(step, ro.prompts_per_step)),
            Prompts::Data { dataset, sampler, encoded } => (dataset, sampler, encoded),
        };
        let picked = sampler.next_batch(ro.prompts_per_step);
        let mut requests = Vec::with_capacity(picked.len() * ro.num_generations);
        for (i, &ex) in picked.iter().enumerate() {
            for g in 0..ro.num_generations {
                requests.push(Request {
                    prompt: encoded[ex].1.clone(),
                    // Round 0 is the step's only round without dynamic sampling.
                    key: RowKey {
                        seed: self.recipe.run.seed,
                        step,
                        prompt: round * ro.prompts_per_step as u64 + i as u64,
                        sample: g as u64,
                    },
                });
            }
        }
        // The weights changed in the last update: decode from fresh copies.
        self.sampler_model.refresh_decode_copies()?;
        let bf16 = self.recipe.rollout.bf16_importance_cap.is_some();
        let completions = generate(&self.sampler_model, Some(&self.tokenizer), &requests, &self.generation, None)
            .context("sampling completions")?;
        let mut samples = Vec::with_capacity(requests.len());
        for (k, c) in completions.into_iter().enumerate() {
            let ex = picked[k / ro.num_generations];
            let example = dataset.get(ex).expect("sampler indices are in range");
            samples.push(Sample {
                prompt_index: ex,
                sample_index: k % ro.num_generations,
                prompt: example.prompt.clone(),
                prompt_text: encoded[ex].0.clone(),
                prompt_ids: encoded[ex].1.clone(),
                completion_text: self.tokenizer.decode(&c.ids, true)?,
                completion_ids: c.ids,
                finish: c.finish,
                columns: example.columns.clone(),
                sampling_logprobs: bf16.then_some(c.logprobs),
                old_logprobs: None,
            });
        }
        Ok(Rollouts { samples, rewards: None })
    }

    /// The step's rewards; `Err` skips the step.
    fn score(&self, samples: &[Sample], given: Option<Vec<Option<f64>>>) -> Result<ScoredBatch> {
        if let Some(given) = given {
            let total: Vec<f64> = given.iter().map(|r| r.unwrap_or(f64::NAN)).collect();
            let valid: Vec<f64> = total.iter().copied().filter(|x| !x.is_nan()).collect();
            let mean = if valid.is_empty() { f64::NAN } else { valid.iter().sum::<f64>() / valid.len() as f64 };
            let metrics = vec![(names::REWARD.to_string(), mean)];
            if valid.is_empty() {
                anyhow::bail!(
                    "no sample of the step has a reward: the replay file's `reward` is null on every line of it"
                );
            }
            return Ok(ScoredBatch { per_reward: Vec::new(), total, metrics, notes: Vec::new() });
        }
        let inputs: Vec<RewardInput> = samples
            .iter()
            .map(|s| RewardInput {
                prompt: &s.prompt_text,
                raw_prompt: Some(&s.prompt),
                completion: &s.completion_text,
                completion_ids: &s.completion_ids,
                finish: s.finish,
                columns: &s.columns,
            })
            .collect();
        self.rewards.score(&inputs)
    }

    /// Shape the composed rewards in place (`[shaping]`), sampling and scoring reference completions for prompts
    /// that have none yet. Logs `rewards/raw` and `rewards/shaped`.
    fn shape(&mut self, samples: &[Sample], scored: &mut ScoredBatch, record: &mut Record) -> Result<()> {
        let cfg = self.recipe.shaping;
        if cfg.kind == ShapingKind::None && cfg.ceil.is_none() && cfg.length_penalty.is_none() {
            return Ok(());
        }
        if cfg.kind.needs_references(cfg.relative) {
            let src = ReferenceSource {
                model: self.reference.as_ref().expect("loaded when shaping needs references"),
                tokenizer: &self.tokenizer,
                generation: &self.generation,
                rewards: &self.rewards,
                seed: self.recipe.run.seed,
                shaping: &self.recipe.shaping,
            };
            self.state.references.ensure(samples, &src)?;
            let m: Vec<f64> = samples
                .iter()
                .map(|s| self.state.references.of(s.prompt_index).len().min(cfg.max_refs) as f64)
                .collect();
            record.set(names::SHAPING_NUM_REFS, m.iter().sum::<f64>() / m.len().max(1) as f64);
        }
        let lengths: Vec<usize> = samples.iter().map(|s| s.completion_ids.len()).collect();
        let refs: Vec<&[f64]> = samples.iter().map(|s| self.state.references.of(s.prompt_index)).collect();
        let shaped = shape(&scored.total, &lengths, &refs, &mut self.state.shaping_stats, &cfg)?;
        let mean = |v: &[f64]| {
            let valid: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
            valid.iter().sum::<f64>() / valid.len().max(1) as f64
        };
        record.set(names::REWARDS_RAW, mean(&scored.total));
        record.set(names::REWARDS_SHAPED, mean(&shaped));
        scored.total = shaped;
        Ok(())
    }

    /// `completions/step-<N>.jsonl`: one line per completion with its rewards and advantage.
    fn write_completions(
        &self,
        step: u64,
        samples: &[Sample],
        scored: &ScoredBatch,
        advantages: Option<&[f64]>,
    ) -> Result<()> {
        use std::io::Write;
        let path = run_dir::completions_file(&self.run_dir, step);
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
        );
        for (i, s) in samples.iter().enumerate() {
            let rewards: serde_json::Map<String, serde_json::Value> =
                scored.per_reward.iter().map(|(name, values)| (name.clone(), values[i].into())).collect();
            let line = serde_json::json!({
                "step": step,
                "prompt_index": s.prompt_index,
                "sample_index": s.sample_index,
                "prompt": s.prompt_text,
                "completion": s.completion_text,
                "finish_reason": s.finish,
                "num_tokens": s.completion_ids.len(),
                "rewards": rewards,
                "reward": finite_or_null(scored.total[i]),
                // PPO's and SAFE's advantages come out of their updates: none per completion here.
                "advantage": advantages.map(|a| finite_or_null(a[i])),
            });
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        Ok(())
    }
}

/// The recipe's `[rollout]` sampling as generation settings, stopping at the tokenizer's EOS ids, `batch_size` rows
/// at a time (training's rollouts and its evaluation, and `safe eval`).
pub fn generation_config(
    ro: &crate::recipe::RolloutSettings,
    tokenizer: &Tokenizer,
    batch_size: usize,
) -> GenerationConfig {
    GenerationConfig {
        sampling: crate::rollout::SamplingParams {
            temperature: ro.temperature,
            top_p: ro.top_p,
            top_k: ro.top_k,
            min_p: ro.min_p,
            repetition_penalty: ro.repetition_penalty,
        },
        max_new_tokens: ro.max_new_tokens,
        eos_ids: tokenizer.eos_ids().to_vec(),
        stop_strings: ro.stop.clone(),
        batch_size,
        pad_id: tokenizer.padding_id(),
    }
}

fn finite_or_null(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// TRL's completion-length metrics: mean/min/max length, the fraction cut at max_new_tokens, and the mean length
/// of those that ended on their own.
fn completion_metrics(record: &mut Record, samples: &[Sample]) {
    let lens: Vec<f64> = samples.iter().map(|s| s.completion_ids.len() as f64).collect();
    let n = lens.len().max(1) as f64;
    let clipped = samples.iter().filter(|s| s.finish.is_truncated()).count();
    let ended: Vec<f64> =
        samples.iter().filter(|s| !s.finish.is_truncated()).map(|s| s.completion_ids.len() as f64).collect();
    record.set(names::COMPLETION_MEAN_LENGTH, lens.iter().sum::<f64>() / n);
    record.set(names::COMPLETION_MIN_LENGTH, lens.iter().copied().fold(f64::INFINITY, f64::min));
    record.set(names::COMPLETION_MAX_LENGTH, lens.iter().copied().fold(0.0, f64::max));
    record.set(names::COMPLETION_CLIPPED_RATIO, clipped as f64 / n);
    record.set(
        names::COMPLETION_MEAN_TERMINATED_LENGTH,
        if ended.is_empty() { 0.0 } else { ended.iter().sum::<f64>() / ended.len() as f64 },
    );
}
