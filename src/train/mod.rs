//! `safe train`: the loop. It owns the order of the stages and nothing else:
//!
//! rollout (sample G completions per prompt, or replay them) → rewards → group advantages → policy update
//! (μ optimizer steps) → metrics and completions files → checkpoint.
//!
//! Exact resume follows from three choices: every random stream is keyed by (run.seed, step, prompt, sample), so no
//! generator state exists; the data position is the sampler's (epoch, cursor); and everything else that changes
//! between steps is in [`TrainState`] or the optimizer, both saved in each checkpoint.

pub mod memory;
pub mod references;
pub mod run_dir;
pub mod signal;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::advantage::group_advantages;
use crate::algo::grpo::{grpo_update, GrpoLossConfig, UpdateBatch, UpdateConfig, UpdateMetrics};
use crate::algo::loss::{Aggregation, ClipConfig};
use crate::algo::ppo::{ppo_update, KlController, PpoBatch, PpoConfig};
use crate::algo::safe::{safe_update, Controller, Phase, RewardNormalizer, SafeBatch, SafeConfig};
use crate::checkpoint::{self, Checkpoint, SaveRequest};
use crate::data::{Dataset, Sampler, SamplerState, TruncationCounter};
use crate::exit::{self, Failure, OrExit};
use crate::metrics::{names, MetricsWriter, Record};
use crate::model::value::{SoftMinHeads, ValueModel};
use crate::model::{CausalLm, LoadedModel, ModelSource, Tokenizer};
use crate::optim::AdamWState;
use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::recipe::{Recipe, RolloutSource};
use crate::reward::shaping::{shape, RunningStats, ShapingKind};
use crate::reward::{RewardInput, RewardPipeline, ScoredBatch};
use crate::rollout::{
    generate, FinishReason, GenerationConfig, Replay, Request, Rollouts, RowKey, Sample, SamplingParams,
};
use references::{ReferenceRewards, ReferenceSource};
use run_dir::Start;

/// The critic: PPO's separate value model, or SAFE's two heads on the policy's trunk.
pub enum Critic {
    Value(Box<ValueModel>),
    Heads(SoftMinHeads),
}

impl Critic {
    fn vars(&self) -> &[(String, candle_core::Var)] {
        match self {
            Critic::Value(v) => v.vars(),
            Critic::Heads(h) => h.vars(),
        }
    }
    fn named_tensors(&self) -> Vec<(String, candle_core::Tensor)> {
        match self {
            Critic::Value(v) => v.named_tensors(),
            Critic::Heads(h) => h.named_tensors(),
        }
    }
    fn load_weights(&self, t: &std::collections::HashMap<String, candle_core::Tensor>) -> Result<()> {
        match self {
            Critic::Value(v) => v.load_weights(t),
            Critic::Heads(h) => h.load_weights(t),
        }
    }
}

/// SAFE's controller and reward normaliser: all the state it carries between steps besides weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SafeState {
    pub controller: Controller,
    pub normalizer: RewardNormalizer,
}

/// The critic's weights and optimizer moments in a checkpoint (PPO, SAFE).
pub const CRITIC_FILE: &str = "critic.safetensors";
pub const CRITIC_OPTIMIZER_FILE: &str = "critic_optimizer.safetensors";

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
    /// PPO: the KL coefficient's controller (β moves when adaptive).
    #[serde(default)]
    pub kl_controller: Option<KlController>,
    /// PPO / SAFE: the critic optimizer's scalar state (its moments are `critic_optimizer.safetensors`).
    #[serde(default)]
    pub critic_optimizer: Option<AdamWState>,
    /// SAFE: controller and reward normaliser.
    #[serde(default)]
    pub safe: Option<SafeState>,
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Trained,
    /// Not applied: a stage produced a non-finite value (or a reward source failed).
    Skipped {
        stage: &'static str,
        reason: String,
    },
}

/// One step's result: its metrics record and outcome.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u64,
    pub record: Record,
    pub outcome: StepOutcome,
}

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
    /// PPO's value model or SAFE's critic heads, with their optimizer.
    critic: Option<(Critic, AdamW)>,
    rewards: RewardPipeline,
    prompts: Prompts,
    generation: GenerationConfig,
    update: UpdateConfig,
    plan: memory::Plan,
    state: TrainState,
    metrics: MetricsWriter,
    /// Warnings for the console (truncated prompts, superseded checkpoints), printed once by [`Trainer::run`].
    notes: Vec<String>,
}

impl Trainer {
    /// Load everything and check that the run can go ahead. Every error here is bad input (exit 2): nothing has
    /// been trained and no checkpoint touched.
    pub fn new(recipe: Recipe, start: Start) -> Result<Self, Failure> {
        Self::build(recipe, start).or_exit(exit::BAD_INPUT)
    }

    fn build(recipe: Recipe, start: Start) -> Result<Self> {
        // Read before anything is loaded: the plan counts the model's own memory.
        let device = recipe.model.device.device()?;
        let available = if device.is_cpu() { memory::available_cpu_bytes() } else { None };
        let dtype = recipe.model.dtype.resolve(&device);
        let checkpoint = match &start {
            Start::From(c) => Some(c),
            Start::Fresh => None,
        };
        let base = ModelSource::parse(&recipe.model.id, Some(&recipe.model.revision))?;
        let policy_source = match checkpoint {
            Some(c) => ModelSource::Dir(c.model_dir().to_path_buf()),
            None => base.clone(),
        };
        let loaded = LoadedModel::load(&policy_source, &device, dtype)?;
        let origin = loaded.origin.clone();
        let config = loaded.config.clone();
        let (policy, tokenizer) = loaded.into_model(true, &device, dtype)?;
        let tokenizer = tokenizer.with_context(|| format!("{origin} has no tokenizer (tokenizer.json)"))?;
        let a = &recipe.algorithm;
        // The frozen starting policy: the KL reference (β > 0) and the source of PAR's reference completions.
        let sh = &recipe.shaping;
        let reference = if a.beta > 0.0 || sh.kind.needs_references(sh.relative) || a.safe.is_some() {
            let (r, _) = LoadedModel::load(&base, &device, dtype)?.into_model(false, &device, dtype)?;
            Some(r)
        } else {
            None
        };

        let ro = &recipe.rollout;
        let n = ro.completions_per_step();
        let shape = memory::StepShape {
            completions: n,
            micro_batch_size: a.micro_batch_size,
            max_prompt_tokens: recipe.data.max_prompt_tokens,
            max_new_tokens: ro.max_new_tokens,
            reference: reference.is_some(),
            critic: a.ppo.is_some(),
            dtype_bytes: dtype.size_in_bytes(),
        };
        let plan = memory::plan(&config, &shape, available).map_err(|e| anyhow!(e))?;

        let mut notes = Vec::new();
        let mut truncation = TruncationCounter::default();
        let prompts = match &ro.source {
            RolloutSource::File(path) => Prompts::Replay(Replay::load(
                path,
                &tokenizer,
                ro.num_generations,
                recipe.data.max_prompt_tokens,
                ro.max_new_tokens,
                &mut truncation,
            )?),
            RolloutSource::Sample => {
                let dataset = Dataset::load(&recipe.data)?;
                let chat = recipe.data.chat;
                if chat && !tokenizer.has_chat_template() {
                    bail!(
                        "data.chat = true but {origin} has no chat template: set data.chat = false to use prompts as \
                         plain text"
                    );
                }
                let encoded = dataset
                    .examples()
                    .iter()
                    .map(|e| {
                        let text = crate::data::render(e, &tokenizer, chat)?;
                        let (ids, cut) = crate::data::encode_prompt(&text, &tokenizer, recipe.data.max_prompt_tokens)?;
                        truncation.record(cut);
                        if ids.is_empty() {
                            bail!("example {} has an empty prompt after tokenisation", e.index);
                        }
                        Ok((text, ids))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let seed = recipe.run.seed;
                let sampler = match checkpoint.map(train_state).transpose()?.and_then(|s| s.sampler) {
                    Some(s) => Sampler::from_state(seed, dataset.len(), recipe.data.shuffle, s)?,
                    None => Sampler::new(seed, dataset.len(), recipe.data.shuffle),
                };
                Prompts::Data { dataset, sampler, encoded }
            }
        };
        notes.extend(truncation.warning(recipe.data.max_prompt_tokens));

        let rewards = RewardPipeline::from_settings(&recipe.rewards, &device, dtype)?;
        let o = &recipe.optim;
        let mut optimizer = AdamW::new(
            policy.vars().to_vec(),
            AdamWConfig { lr: o.lr, beta1: o.betas[0], beta2: o.betas[1], eps: o.eps, weight_decay: o.weight_decay },
        )?;
        let state = match checkpoint {
            Some(c) => {
                c.restore_optimizer(&mut optimizer)?;
                let mut s = train_state(c)?;
                // The recipe may differ in resumable keys: the state records the one being run now.
                s.recipe = recipe.to_toml_string();
                s.recipe_hash = recipe.hash();
                s
            }
            None => TrainState {
                step: 0,
                sampler: match &prompts {
                    Prompts::Data { sampler, .. } => Some(sampler.state()),
                    Prompts::Replay(_) => None,
                },
                bad_steps_in_a_row: 0,
                skipped_steps: 0,
                rng_seed: recipe.run.seed,
                optimizer_steps: 0,
                recipe_hash: recipe.hash(),
                recipe: recipe.to_toml_string(),
                shaping_stats: RunningStats::default(),
                references: ReferenceRewards::default(),
                kl_controller: a.ppo.as_ref().map(|p| KlController {
                    beta: a.beta,
                    target: p.kl_target,
                    horizon: p.kl_horizon,
                }),
                critic_optimizer: None,
                safe: a.safe.as_ref().map(|(_, controller, normalizer)| SafeState {
                    controller: controller.clone(),
                    normalizer: *normalizer,
                }),
            },
        };

        let run_dir = recipe.run.dir();
        for name in run_dir::prepare(&recipe, state.step)? {
            notes.push(format!(
                "checkpoint {name} was written after step {} (the one this run continues from) and is kept aside",
                state.step
            ));
        }
        let metrics = MetricsWriter::open(&run_dir.join(run_dir::METRICS_FILE))?;
        let eos_ids = tokenizer.eos_ids().to_vec();
        let pad_id = tokenizer.padding_id();
        let generation = GenerationConfig {
            sampling: SamplingParams {
                temperature: ro.temperature,
                top_p: ro.top_p,
                top_k: ro.top_k,
                min_p: ro.min_p,
                repetition_penalty: ro.repetition_penalty,
            },
            max_new_tokens: ro.max_new_tokens,
            eos_ids,
            stop_strings: ro.stop.clone(),
            batch_size: ro.generation_batch_size(),
            pad_id,
        };
        let update = UpdateConfig {
            loss: GrpoLossConfig {
                beta: a.beta,
                clip: ClipConfig { eps_low: a.epsilon, eps_high: a.epsilon_high, delta: None },
                aggregation: Aggregation::new(a.loss_type, ro.max_new_tokens),
                use_bias_correction_kl: a.use_bias_correction_kl,
            },
            micro_batch_size: plan.micro_batch_size,
            temperature: ro.temperature,
            max_grad_norm: o.max_grad_norm,
            pad_id,
            logprob_chunk: plan.logprob_chunk,
        };
        let critic_opt = |vars: &[(String, candle_core::Var)]| {
            let c = &recipe.critic;
            AdamW::new(
                vars.to_vec(),
                AdamWConfig {
                    lr: c.lr,
                    beta1: o.betas[0],
                    beta2: o.betas[1],
                    eps: o.eps,
                    weight_decay: o.weight_decay,
                },
            )
        };
        let critic = match (&a.ppo, &a.safe) {
            (None, None) => None,
            (None, Some(_)) => Some(Critic::Heads(SoftMinHeads::new(config.hidden_size, recipe.run.seed, &device)?)),
            (Some(_), _) => {
                let c = &recipe.critic;
                let source = match c.init.as_str() {
                    "policy" => base.clone(),
                    "reward_model" => {
                        let id = recipe.rewards.iter().find_map(|w| match &w.source {
                            crate::recipe::RewardSource::Model { id, .. } => Some(id.clone()),
                            _ => None,
                        });
                        ModelSource::parse(&id.expect("checked by the recipe"), None)?
                    }
                    path => ModelSource::parse(path, None).context("critic.init")?,
                };
                let value = ValueModel::from_loaded(LoadedModel::load(&source, &device, dtype)?, &device, dtype)
                    .context("loading the value model (critic.init)")?;
                if value.vocab_size() != config.vocab_size {
                    bail!(
                        "critic.init = \"{}\" has a vocabulary of {} tokens, the policy {}: the value model reads the \
                         policy's token ids, so it needs the same tokenizer",
                        c.init,
                        value.vocab_size(),
                        config.vocab_size
                    );
                }
                Some(Critic::Value(Box::new(value)))
            }
        };
        let critic = match critic {
            None => None,
            Some(critic) => {
                let mut opt = critic_opt(critic.vars())?;
                if let Some(ckpt) = checkpoint {
                    critic.load_weights(&ckpt.tensor_file(CRITIC_FILE, &device)?)?;
                    let st = state.critic_optimizer.context("the checkpoint has no critic optimizer state")?;
                    opt.load_state(&st, &ckpt.tensor_file(CRITIC_OPTIMIZER_FILE, &device)?)?;
                }
                Some((critic, opt))
            }
        };
        let sampler_model = policy.frozen_view()?;
        Ok(Self {
            recipe,
            run_dir,
            policy,
            sampler_model,
            reference,
            tokenizer,
            optimizer,
            critic,
            rewards,
            prompts,
            generation,
            update,
            plan,
            state,
            metrics,
            notes,
        })
    }

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
    /// row (the last good checkpoint kept) and with 130 on SIGINT/SIGTERM (after saving the last finished step).
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
        say(&format!(
            "memory:     micro-batches of {} completions, about {:.2} GB per step",
            self.plan.micro_batch_size,
            self.plan.bytes as f64 / 1e9
        ));
        let mut saved_at = self.state.step;
        while self.state.step < max_steps {
            if signal::requested() {
                break;
            }
            let report = self.step().or_exit(exit::TRAINING_FAILED)?;
            let r = &self.recipe.run;
            let step = report.step;
            if step % r.log_every == 0 || step == max_steps {
                self.metrics.write(&report.record).or_exit(exit::TRAINING_FAILED)?;
                say(&report.record.console_line());
            }
            let f = |n: &str| report.record.get(n).filter(|v| v.is_finite()).map_or("-".into(), |v| format!("{v:.3}"));
            bar.set_message(format!("reward {} kl {}", f(names::REWARD), f(names::KL)));
            bar.set_position(step);
            if let StepOutcome::Skipped { stage, reason } = &report.outcome {
                warn(&format!("step {step} skipped ({stage}): {reason}"));
                if self.state.bad_steps_in_a_row > r.max_bad_steps {
                    bar.abandon();
                    let last = checkpoint::latest_complete(&self.run_dir)
                        .map_or("none was written".to_string(), |p| p.display().to_string());
                    return Err(Failure::training(anyhow!(
                        "stopping after {} bad steps in a row (run.max_bad_steps = {}); the last good checkpoint is \
                         {last}. Last problem ({stage}): {reason}",
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
        Ok(())
    }

    /// Write a checkpoint of the current state.
    pub fn save(&self) -> Result<PathBuf> {
        let mut state = self.state.clone();
        let mut extra = Vec::new();
        if let Some((value, opt)) = &self.critic {
            state.critic_optimizer = Some(opt.state());
            extra.push((CRITIC_FILE.to_string(), value.named_tensors()));
            extra.push((CRITIC_OPTIMIZER_FILE.to_string(), opt.state_tensors()));
        }
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

        let t = Instant::now();
        let Rollouts { samples, rewards: given_rewards } = self.rollout(step)?;
        let rollout_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let scored = self.score(&samples, given_rewards).and_then(|mut s| {
            self.shape(&samples, &mut s, &mut record)?;
            Ok(s)
        });
        let reward_s = t.elapsed().as_secs_f64();

        let mut update_s = 0.0;
        let outcome = match scored {
            Err(e) => StepOutcome::Skipped { stage: "reward", reason: format!("{e:#}") },
            Ok(mut scored) => {
                for (name, value) in &scored.metrics {
                    record.set(name.clone(), *value);
                }
                let g = self.recipe.rollout.num_generations;
                if let Some(gl) = &self.recipe.algorithm.grpo_lambda {
                    grpo_lambda_rewards(gl, &samples, g, &mut scored, &mut record)?;
                }
                completion_metrics(&mut record, &samples);
                let write_completions =
                    self.recipe.run.completions_every > 0 && step.is_multiple_of(self.recipe.run.completions_every);
                let t = Instant::now();
                let outcome = if self.recipe.algorithm.safe.is_some() {
                    // SAFE: sequence-level advantages from the soft-min critic, made inside the update.
                    if write_completions {
                        self.write_completions(step, &samples, &scored, None)?;
                    }
                    self.safe_update(&samples, &scored, &mut record)?
                } else if self.critic.is_some() {
                    // PPO: advantages are per token (GAE over the critic's values), made inside the update.
                    if write_completions {
                        self.write_completions(step, &samples, &scored, None)?;
                    }
                    self.ppo_update(step, &samples, &scored, &mut record)?
                } else {
                    let rewards: Vec<Option<f64>> = scored.total.iter().map(|&r| (!r.is_nan()).then_some(r)).collect();
                    let adv = group_advantages(&rewards, g, self.recipe.algorithm.scale_rewards)?;
                    record.set(names::REWARD_STD, adv.reward_std);
                    record.set(names::FRAC_REWARD_ZERO_STD, adv.frac_reward_zero_std);
                    if write_completions {
                        self.write_completions(step, &samples, &scored, Some(&adv.advantages))?;
                    }
                    self.update(&samples, &adv.advantages, &mut record)?
                };
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
        Ok(StepReport { step, record, outcome })
    }

    /// The step's samples: `prompts_per_step` groups of `num_generations`, group-major; and the rewards when a replay
    /// file carries them.
    fn rollout(&mut self, step: u64) -> Result<Rollouts> {
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
                    key: RowKey { seed: self.recipe.run.seed, step, prompt: i as u64, sample: g as u64 },
                });
            }
        }
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
            return Ok(ScoredBatch { per_reward: Vec::new(), total, metrics });
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

    /// μ optimizer updates on the step's samples. A non-finite loss or grad norm stops the step (weights untouched
    /// by that update) and makes it a skipped step.
    fn update(&mut self, samples: &[Sample], advantages: &[f64], record: &mut Record) -> Result<StepOutcome> {
        let a = &self.recipe.algorithm;
        let prompts: Vec<Vec<u32>> = samples.iter().map(|s| s.prompt_ids.clone()).collect();
        let completions: Vec<Vec<u32>> = samples.iter().map(|s| s.completion_ids.clone()).collect();
        let keep: Vec<bool> =
            samples.iter().map(|s| !(a.mask_truncated_completions && s.finish == FinishReason::Length)).collect();
        // μ > 1 reuses the batch: ρ needs the sampling policy's log-probs, taken before the first update.
        let old = if a.num_iterations > 1 { Some(self.old_logprobs(&prompts, &completions)?) } else { None };
        let batch = UpdateBatch {
            prompts: &prompts,
            completions: &completions,
            advantages,
            old_logprobs: old.as_deref(),
            keep: &keep,
        };
        let mu = a.num_iterations as u64;
        let o = &self.recipe.optim;
        let total_updates = self.recipe.run.max_steps * mu;
        let mut sum: Option<UpdateMetrics> = None;
        let mut lr = 0.0;
        for it in 0..mu {
            lr = lr_at(self.optimizer.state().step, o.lr, o.schedule, o.warmup_steps * mu, total_updates);
            self.optimizer.set_lr(lr);
            // The frozen model is the KL reference only when β > 0 (it may be loaded for PAR's references alone).
            let kl_reference = self.reference.as_ref().filter(|_| a.beta > 0.0);
            let m = grpo_update(&self.policy, kl_reference, &mut self.optimizer, &batch, &self.update)?;
            let which = if mu > 1 { format!(" (update {} of {mu})", it + 1) } else { String::new() };
            if !m.loss.is_finite() {
                return Ok(StepOutcome::Skipped { stage: "loss", reason: format!("the loss is {}{which}", m.loss) });
            }
            if !m.grad_norm.is_finite() {
                return Ok(StepOutcome::Skipped {
                    stage: "gradient",
                    reason: format!("the gradient norm is {}{which}", m.grad_norm),
                });
            }
            sum = Some(match sum {
                None => m,
                Some(s) => UpdateMetrics {
                    loss: s.loss + m.loss,
                    grad_norm: s.grad_norm + m.grad_norm,
                    kl: s.kl.zip(m.kl).map(|(a, b)| a + b),
                    clip_low: s.clip_low + m.clip_low,
                    clip_high: s.clip_high + m.clip_high,
                    clip_region: s.clip_region + m.clip_region,
                    // The policy's entropy on its own samples: the first update's.
                    entropy: s.entropy,
                },
            });
        }
        let m = sum.expect("μ ≥ 1");
        let k = mu as f64;
        if let Some(kl) = m.kl {
            record.set(names::KL, kl / k);
        }
        record.set(names::ENTROPY, m.entropy);
        record.set(names::LOSS, m.loss / k);
        record.set(names::GRAD_NORM, m.grad_norm / k);
        record.set(names::LEARNING_RATE, lr);
        record.set(names::CLIP_LOW, m.clip_low / k);
        record.set(names::CLIP_HIGH, m.clip_high / k);
        record.set(names::CLIP_REGION, m.clip_region / k);
        Ok(StepOutcome::Trained)
    }

    /// One SAFE step: the controller and normaliser advance in the state; their internals are logged.
    fn safe_update(&mut self, samples: &[Sample], scored: &ScoredBatch, record: &mut Record) -> Result<StepOutcome> {
        let (base_cfg, _, _) = self.recipe.algorithm.safe.as_ref().expect("safe settings");
        let o = &self.recipe.optim;
        let cfg = SafeConfig {
            micro_batch_size: self.update.micro_batch_size,
            temperature: self.update.temperature,
            pad_id: self.update.pad_id,
            logprob_chunk: self.update.logprob_chunk,
            ..*base_cfg
        };
        let prompts: Vec<Vec<u32>> = samples.iter().map(|s| s.prompt_ids.clone()).collect();
        let completions: Vec<Vec<u32>> = samples.iter().map(|s| s.completion_ids.clone()).collect();
        if let Some(i) = scored.total.iter().position(|r| r.is_nan()) {
            let reason = format!("no reward applied to completion {i}; safe needs one reward per completion");
            return Ok(StepOutcome::Skipped { stage: "reward", reason });
        }
        let lr = lr_at(self.state.step, o.lr, o.schedule, o.warmup_steps, self.recipe.run.max_steps);
        self.optimizer.set_lr(lr);
        let Some((Critic::Heads(heads), heads_opt)) = self.critic.as_mut() else {
            bail!("safe needs its critic heads")
        };
        heads_opt.set_lr(self.recipe.critic.lr * if o.lr > 0.0 { lr / o.lr } else { 0.0 });
        let state = self.state.safe.as_mut().expect("safe state");
        // Work on copies: a step that fails leaves the controller and normaliser as they were.
        let (mut controller, mut normalizer) = (state.controller.clone(), state.normalizer);
        let reference = self.reference.as_ref().expect("safe loads the reference");
        let batch = SafeBatch { prompts: &prompts, completions: &completions, rewards: &scored.total };
        let m = safe_update(
            &self.policy,
            &self.sampler_model,
            reference,
            heads,
            &mut self.optimizer,
            heads_opt,
            &mut controller,
            &mut normalizer,
            &batch,
            &cfg,
        )?;
        if let Some(reason) = m.failed {
            return Ok(StepOutcome::Skipped { stage: "loss", reason });
        }
        *state = SafeState { controller, normalizer };
        let c = m.control.expect("at least one epoch");
        let phase = match c.phase {
            Phase::Warmup => 0.0,
            Phase::Climbing => 1.0,
            Phase::Plateau => 2.0,
            Phase::Converged => 3.0,
        };
        for (name, v) in [
            (names::KL, m.kl),
            (names::ENTROPY, m.rollout_entropy),
            (names::LOSS, m.pg_loss + cfg.value_weight * m.value_loss + c.penalty - cfg.entropy_coef * m.entropy_bonus),
            (names::PPO_LOSS_POLICY, m.pg_loss),
            (names::PPO_LOSS_VALUE, m.value_loss),
            (names::GRAD_NORM, m.grad_norm),
            (names::CRITIC_GRAD_NORM, m.heads_grad_norm),
            (names::LEARNING_RATE, lr),
            (names::SAFE_KL_SHORT, c.kl_short),
            (names::SAFE_KL_LONG, c.kl_long),
            (names::SAFE_PID, c.pid),
            (names::SAFE_PHASE, phase),
            (names::SAFE_PHI, c.phi),
            (names::SAFE_THRESHOLD, c.threshold),
            (names::SAFE_ENTROPY_FACTOR, c.gate),
            (names::SAFE_PENALTY, c.penalty),
            (names::SAFE_ACTIVE, c.active as u8 as f64),
            (names::SAFE_ENTROPY_BONUS, m.entropy_bonus),
            (names::SAFE_V1_MEAN, m.v1_mean),
            (names::SAFE_V2_MEAN, m.v2_mean),
            (names::SAFE_VALUE_MEAN, m.value_mean),
            (names::SAFE_NORMALIZED_REWARD, m.normalized_mean),
        ] {
            record.set(name, v);
        }
        Ok(StepOutcome::Trained)
    }

    /// One PPO step (TRL's PPOTrainer semantics) with the value model; the KL controller moves after it.
    fn ppo_update(
        &mut self,
        step: u64,
        samples: &[Sample],
        scored: &ScoredBatch,
        record: &mut Record,
    ) -> Result<StepOutcome> {
        let a = &self.recipe.algorithm;
        let p = a.ppo.as_ref().expect("ppo settings");
        let o = &self.recipe.optim;
        let prompts: Vec<Vec<u32>> = samples.iter().map(|s| s.prompt_ids.clone()).collect();
        let completions: Vec<Vec<u32>> = samples.iter().map(|s| s.completion_ids.clone()).collect();
        // A sample no reward applied to scores 0.
        let scores: Vec<f64> = scored.total.iter().map(|&r| if r.is_nan() { 0.0 } else { r }).collect();
        let eos: Vec<bool> = samples.iter().map(|s| s.finish == FinishReason::Eos).collect();
        let cfg = PpoConfig {
            params: *p,
            clip: ClipConfig { eps_low: a.epsilon, eps_high: a.epsilon_high, delta: None },
            micro_batch_size: self.update.micro_batch_size,
            temperature: self.update.temperature,
            max_grad_norm: o.max_grad_norm,
            critic_max_grad_norm: self.recipe.critic.max_grad_norm,
            pad_id: self.update.pad_id,
            logprob_chunk: self.update.logprob_chunk,
            seed: self.recipe.run.seed,
        };
        // The schedule counts training steps (TRL steps its scheduler once per batch of rollouts).
        let lr = lr_at(self.state.step, o.lr, o.schedule, o.warmup_steps, self.recipe.run.max_steps);
        self.optimizer.set_lr(lr);
        let Some((Critic::Value(critic), critic_opt)) = self.critic.as_mut() else {
            bail!("ppo needs its value model")
        };
        let critic_lr = self.recipe.critic.lr * if o.lr > 0.0 { lr / o.lr } else { 0.0 };
        critic_opt.set_lr(critic_lr);
        let kl = self.state.kl_controller.expect("ppo has a KL controller");
        let reference = self.reference.as_ref().filter(|_| kl.beta > 0.0 || kl.target.is_some());
        let batch = PpoBatch { prompts: &prompts, completions: &completions, scores: &scores, ended_with_eos: &eos };
        let m = ppo_update(
            &self.policy,
            &self.sampler_model,
            reference,
            critic,
            &mut self.optimizer,
            critic_opt,
            &kl,
            &batch,
            &cfg,
            step,
        )?;
        if !m.pg_loss.is_finite() {
            return Ok(StepOutcome::Skipped { stage: "loss", reason: "the PPO loss is not finite".into() });
        }
        if !m.grad_norm.is_finite() || !m.critic_grad_norm.is_finite() {
            let reason =
                format!("the gradient norm is {} (policy) / {} (value model)", m.grad_norm, m.critic_grad_norm);
            return Ok(StepOutcome::Skipped { stage: "gradient", reason });
        }
        if let Some(c) = self.state.kl_controller.as_mut() {
            c.update(m.kl_token_mean, samples.len());
        }
        for (name, v) in [
            (names::PPO_KL, m.kl_sum),
            (names::PPO_ENTROPY, m.entropy_sum),
            (names::PPO_NON_SCORE_REWARD, m.non_score_reward),
            (names::PPO_RLHF_REWARD, m.rlhf_reward),
            (names::PPO_SCORES, m.scores),
            (names::PPO_APPROXKL, m.approxkl),
            (names::PPO_CLIPFRAC, m.clipfrac),
            (names::PPO_POLICY_ENTROPY, m.entropy),
            (names::PPO_LOSS_POLICY, m.pg_loss),
            (names::PPO_LOSS_VALUE, m.vf_loss),
            (names::PPO_VAL_CLIPFRAC, m.vf_clipfrac),
            (names::PPO_VAL_RATIO, m.ratio_mean),
            (names::PPO_VAL_RATIO_VAR, m.ratio_var),
            (names::PPO_VAL_NUM_EOS, m.num_eos),
            (names::PPO_KL_COEF, m.kl_coef),
            (names::KL, m.kl_token_mean),
            (names::ENTROPY, m.entropy),
            (names::LOSS, m.pg_loss + p.vf_coef * m.vf_loss),
            (names::GRAD_NORM, m.grad_norm),
            (names::CRITIC_GRAD_NORM, m.critic_grad_norm),
            (names::LEARNING_RATE, lr),
        ] {
            record.set(name, v);
        }
        Ok(StepOutcome::Trained)
    }

    /// Per-token log-probs of each completion under the current policy, without a graph, one micro-batch at a time.
    fn old_logprobs(&self, prompts: &[Vec<u32>], completions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        use crate::model::logprobs::{completion_logprobs, SequenceBatch};
        let micro = self.update.micro_batch_size.max(1);
        let mut out = Vec::with_capacity(completions.len());
        for start in (0..completions.len()).step_by(micro) {
            let end = (start + micro).min(completions.len());
            let seqs = SequenceBatch::new(
                &prompts[start..end],
                &completions[start..end],
                self.update.pad_id,
                self.policy.config().sliding_window,
                self.policy.device(),
            )?;
            let (lp, _) = completion_logprobs(
                &self.sampler_model,
                &seqs,
                self.update.temperature,
                self.update.logprob_chunk,
                false,
            )?;
            for (row, c) in lp.to_vec2::<f32>()?.into_iter().zip(&completions[start..end]) {
                out.push(row[..c.len()].to_vec());
            }
        }
        Ok(out)
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
                // PPO's advantages are per token: none per completion.
                "advantage": advantages.map(|a| finite_or_null(a[i])),
            });
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        Ok(())
    }
}

fn finite_or_null(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// GRPO-λ: replace the step's rewards by 0/1 correctness, or the length-penalised reward for the top-λ groups, and
/// log the selection. Correctness is the raw value of the recipe's correctness reward (or a replay file's reward).
fn grpo_lambda_rewards(
    gl: &crate::recipe::GrpoLambdaSettings,
    samples: &[Sample],
    group_size: usize,
    scored: &mut ScoredBatch,
    record: &mut Record,
) -> Result<()> {
    let raw: Vec<Option<f64>> = match scored.per_reward.iter().find(|(n, _)| *n == gl.correctness_reward) {
        Some((_, v)) => v.clone(),
        None => scored.total.iter().map(|&x| (!x.is_nan()).then_some(x)).collect(),
    };
    let correct: Vec<bool> = raw.iter().map(|v| v.is_some_and(|x| x >= gl.correct_min)).collect();
    let lengths: Vec<usize> = samples.iter().map(|s| s.completion_ids.len()).collect();
    let out = crate::algo::grpo_lambda::grpo_lambda_rewards(&correct, &lengths, group_size, &gl.config)?;
    let groups = out.efficiency.len() as f64;
    record.set(names::REWARD, out.rewards.iter().sum::<f64>() / out.rewards.len().max(1) as f64);
    record.set(names::GRPO_LAMBDA_N_EFFICIENCY, out.n_efficiency as f64);
    record.set(names::GRPO_LAMBDA_FRAC_EFFICIENCY, out.n_efficiency as f64 / groups);
    record.set(names::GRPO_LAMBDA_RATIO_EFFICIENCY, out.ratio_efficiency);
    record.set(names::GRPO_LAMBDA_RATIO_ACCURACY, out.ratio_accuracy);
    scored.total = out.rewards;
    Ok(())
}

/// The trainer's state saved in a checkpoint.
fn train_state(c: &Checkpoint) -> Result<TrainState> {
    serde_json::from_value(c.state().clone())
        .with_context(|| format!("{}: the training state is not one this safe can read", c.dir().display()))
}

/// TRL's completion-length metrics: mean/min/max length, the fraction cut at max_new_tokens, and the mean length
/// of those that ended on their own.
fn completion_metrics(record: &mut Record, samples: &[Sample]) {
    let lens: Vec<f64> = samples.iter().map(|s| s.completion_ids.len() as f64).collect();
    let n = lens.len().max(1) as f64;
    let clipped = samples.iter().filter(|s| s.finish == FinishReason::Length).count();
    let ended: Vec<f64> =
        samples.iter().filter(|s| s.finish != FinishReason::Length).map(|s| s.completion_ids.len() as f64).collect();
    record.set(names::COMPLETION_MEAN_LENGTH, lens.iter().sum::<f64>() / n);
    record.set(names::COMPLETION_MIN_LENGTH, lens.iter().copied().fold(f64::INFINITY, f64::min));
    record.set(names::COMPLETION_MAX_LENGTH, lens.iter().copied().fold(0.0, f64::max));
    record.set(names::COMPLETION_CLIPPED_RATIO, clipped as f64 / n);
    record.set(
        names::COMPLETION_MEAN_TERMINATED_LENGTH,
        if ended.is_empty() { 0.0 } else { ended.iter().sum::<f64>() / ended.len() as f64 },
    );
}
