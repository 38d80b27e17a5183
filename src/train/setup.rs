//! Setting a run up: model, tokenizer, reference, critic, data, rewards, optimizer, and the state a checkpoint
//! restores. Everything that can be wrong with the inputs is found here, before the first step (exit 2).

use anyhow::{anyhow, bail, Context, Result};

use super::references::ReferenceRewards;
use super::run_dir::{self, Start};
use super::{memory, Prompts, TrainState, Trainer};
use crate::algo::{OptimSchedule, Runtime};
use crate::checkpoint::Checkpoint;
use crate::data::{Dataset, Sampler, TruncationCounter};
use crate::eval::Evaluator;
use crate::exit::{self, Failure, OrExit};
use crate::metrics::MetricsWriter;
use crate::model::{LoadedModel, ModelSource};
use crate::optim::{AdamW, AdamWConfig};
use crate::recipe::{Recipe, RolloutSource};
use crate::reward::shaping::RunningStats;
use crate::reward::RewardPipeline;
use crate::rollout::Replay;

impl Trainer {
    /// Load everything and check that the run can go ahead. Every error here is bad input (exit 2): nothing has
    /// been trained and no checkpoint touched.
    pub fn new(recipe: Recipe, start: Start) -> Result<Self, Failure> {
        Self::build(recipe, start).or_exit(exit::BAD_INPUT)
    }

    fn build(recipe: Recipe, start: Start) -> Result<Self> {
        // Read before anything is loaded: the plan counts the model's own memory.
        let device = recipe.model.device.device()?;
        let host = memory::available_cpu_bytes();
        let available = memory::available_bytes(&device);
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
        let a = &recipe.algorithm;
        let needs = a.settings.needs();
        // The frozen starting policy: the algorithm's KL reference and the source of PAR's reference completions.
        let sh = &recipe.shaping;
        let needs_reference = needs.reference || sh.kind.needs_references(sh.relative);
        // Plan from the config alone: a step that cannot fit is refused before any weights load.
        let planned = LoadedModel::config_only(&policy_source)?;
        let ro = &recipe.rollout;
        let shape = memory::StepShape {
            prompts: ro.prompts_per_step,
            group_size: ro.num_generations,
            rollout_batch_size: ro.batch_size,
            generates: matches!(ro.source, RolloutSource::Sample) || sh.kind.needs_references(sh.relative),
            bf16_decode: ro.bf16_importance_cap.is_some(),
            micro_batch_size: a.micro_batch_size,
            max_prompt_tokens: recipe.data.max_prompt_tokens,
            // Evaluation generates in the same batches, possibly longer.
            max_new_tokens: if recipe.eval.enabled() {
                ro.max_new_tokens.max(recipe.eval.max_new_tokens)
            } else {
                ro.max_new_tokens
            },
            // With LoRA and no model.reference, the reference is the policy's own frozen base: no memory of its own.
            reference: needs_reference && (recipe.lora.is_none() || recipe.model.reference.is_some()),
            reference_optional: needs.reference_for_beta_only && !sh.kind.needs_references(sh.relative),
            critic: match (needs.value_model, needs.value_model_lora) {
                (false, _) => memory::Critic::None,
                (true, false) => memory::Critic::Full,
                (true, true) => memory::Critic::Lora { shares_policy: needs.value_model_shares_policy },
            },
            dtype_bytes: dtype.size_in_bytes(),
            // What is trained (the weights, or LoRA's adapters) is f32 master weights under bf16.
            master_bytes: crate::model::master_dtype(dtype, true).size_in_bytes(),
            // A differentiable entropy needs the composite head.
            fused_head: crate::model::fused_head::supported(&device, dtype) && !needs.entropy_gradient,
            fused_ops: crate::model::fused_ops::supported(&device, dtype),
            gradient_checkpointing: needs.gradient_checkpointing,
            can_checkpoint: needs.can_checkpoint,
            lora: recipe.lora.as_ref().map(|l| {
                let bf16 = l.base_dtype == crate::recipe::LoraBaseDtype::Bf16;
                memory::LoraShape {
                    dropout: l.dropout > 0.0,
                    ..memory::LoraShape::of(&planned, l.rank, &l.targets, bf16)
                }
            }),
        };
        let plan = memory::plan(&planned, &shape, available, host).map_err(|e| anyhow!(e))?;
        // In the master weights' dtype: a checkpoint of a bf16 run holds f32 masters, which resume exactly.
        let mut loaded =
            LoadedModel::load(&policy_source, &device, crate::model::master_dtype(dtype, recipe.lora.is_none()))?;
        // A LoRA run's checkpoint has its adapters beside the base: [lora] continues training them.
        let saved_adapters = if recipe.lora.is_some() { loaded.adapters.take() } else { None };
        let origin = loaded.origin.clone();
        let config = loaded.config.clone();
        // With LoRA the base is built frozen and the adapters are its only variables; a checkpoint's
        // model.safetensors is the base unchanged and its adapters are read back from adapter_model.safetensors.
        let (mut policy, tokenizer) = loaded.into_model(recipe.lora.is_none(), &device, dtype)?;
        if let Some(lora) = &recipe.lora {
            if checkpoint.is_some() && saved_adapters.is_none() {
                bail!("the checkpoint has no LoRA adapters ({})", crate::checkpoint::ADAPTER_FILE);
            }
            let saved = saved_adapters.map(|(_, tensors)| tensors);
            policy.add_lora(&lora.spec(recipe.run.seed, &recipe.model.id), saved.as_ref()).context("[lora]")?;
        }
        let tokenizer = tokenizer.with_context(|| format!("{origin} has no tokenizer (tokenizer.json)"))?;
        let longest = recipe.data.max_prompt_tokens.saturating_add(ro.max_new_tokens);
        let context_note = (longest > config.max_position_embeddings).then(|| {
            format!(
                "data.max_prompt_tokens + rollout.max_new_tokens = {longest} exceeds the model's context of {} \
                 tokens (max_position_embeddings of {origin}): positions past it were never trained; lower them",
                config.max_position_embeddings
            )
        });
        let reference = if needs_reference && recipe.lora.is_some() && recipe.model.reference.is_none() {
            // The frozen base is the starting policy: the policy with its adapters off, sharing its weights.
            Some(policy.without_adapters()?)
        } else if needs_reference {
            let source = match &recipe.model.reference {
                Some(id) => ModelSource::parse(id, None).context("model.reference")?,
                None => base.clone(),
            };
            let loaded = LoadedModel::load(&source, &device, dtype)?;
            if recipe.model.reference.is_some() {
                same_vocabulary(&loaded, &origin, &config, &tokenizer)?;
            }
            let (r, _) = loaded.into_model(false, &device, dtype)?;
            Some(r)
        } else {
            None
        };

        let mut notes: Vec<String> = context_note.into_iter().collect();
        // Replayed runs read no data.source: only eval.source can name held-out prompts (validated).
        let mut eval_data = crate::eval::source_dataset(&recipe.data, &recipe.eval)?;
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
                let (dataset, held_out) = crate::eval::split_off(Dataset::load(&recipe.data)?, &recipe.eval)?;
                eval_data = eval_data.or(held_out);
                let chat = recipe.data.chat;
                if chat && !tokenizer.has_chat_template() {
                    bail!(
                        "data.chat = true but {origin} has no chat template: set data.chat = false to use prompts as \
                         plain text"
                    );
                }
                let encoded = dataset.encode_prompts(
                    dataset.len(),
                    &tokenizer,
                    chat,
                    recipe.data.max_prompt_tokens,
                    &mut truncation,
                )?;
                let seed = recipe.run.seed;
                let sampler = match checkpoint.map(train_state).transpose()?.and_then(|s| s.sampler) {
                    Some(s) => Sampler::from_state(seed, dataset.len(), recipe.data.shuffle, s)?,
                    None => Sampler::new(seed, dataset.len(), recipe.data.shuffle),
                };
                Prompts::Data { dataset, sampler, encoded }
            }
        };
        notes.extend(truncation.warning(recipe.data.max_prompt_tokens));
        if let (Prompts::Replay(r), RolloutSource::File(path)) = (&prompts, &ro.source) {
            if r.has_old_logprobs() && !needs.recorded_logprobs {
                bail!(
                    "{}: the replay file has `old_logprobs`, which {} does not read (it recomputes its rollout-time \
                     quantities from the policy): drop the field or use another algorithm.kind",
                    path.display(),
                    a.kind
                );
            }
        }

        let rewards = RewardPipeline::from_settings(&recipe.rewards, &device, dtype)?;
        // Every row must be able to feed the rewards that will score it: found now, not at step 40.
        match &prompts {
            Prompts::Data { dataset, .. } => {
                rewards.check_rows(dataset.examples().iter().map(|e| (dataset.location(e.index), &e.columns)))?
            }
            Prompts::Replay(r) if !r.has_rewards() => rewards.check_rows(r.rows())?,
            Prompts::Replay(_) => {}
        }
        if let Some(held) = &eval_data {
            rewards.check_rows(held.examples().iter().map(|e| (held.location(e.index), &e.columns)))?;
        }
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
                algorithm: serde_json::Value::Null,
            },
        };

        let run_dir = recipe.run.dir();
        for name in run_dir::prepare(&recipe, state.step)? {
            notes.push(format!(
                "checkpoint {name} was written after step {} (the one this run continues from): moved aside, it counts \
                 toward run.keep_last and is the first rotated out",
                state.step
            ));
        }
        let tensorboard = recipe.run.tensorboard().then(|| run_dir.join(run_dir::TENSORBOARD_DIR));
        let metrics =
            MetricsWriter::open_with_tensorboard(&run_dir.join(run_dir::METRICS_FILE), tensorboard.as_deref())?;
        let pad_id = tokenizer.padding_id();
        let generation = super::generation_config(ro, &tokenizer, plan.rollout_batch_size);
        let evaluator = match eval_data {
            Some(held) => {
                let (ev, note) =
                    Evaluator::new(&recipe.eval, held, &tokenizer, &recipe.data, &generation, recipe.run.seed)?;
                notes.extend(note);
                Some(ev)
            }
            None => {
                if recipe.eval.is_customised() {
                    notes.push(
                        "[eval] keys are set but no eval.source or eval.split names held-out prompts: training does \
                         not evaluate"
                            .into(),
                    );
                }
                None
            }
        };
        let runtime = Runtime {
            step: state.step,
            max_steps: recipe.run.max_steps,
            seed: recipe.run.seed,
            micro_batch_size: plan.micro_batch_size,
            logprob_chunk: plan.logprob_chunk,
            temperature: ro.temperature,
            pad_id,
            max_new_tokens: ro.max_new_tokens,
            group_size: ro.num_generations,
            optim: OptimSchedule {
                lr: o.lr,
                schedule: o.schedule,
                warmup_steps: o.warmup_steps,
                max_grad_norm: o.max_grad_norm,
            },
        };
        let reward_model = recipe.rewards.iter().find_map(|w| match &w.source {
            crate::recipe::RewardSource::Model { id, .. } => Some(id.as_str()),
            _ => None,
        });
        let setup = crate::algo::Setup {
            device: &device,
            dtype,
            policy: &config,
            policy_source: &base,
            reward_model,
            seed: recipe.run.seed,
            optim: *optimizer.config(),
            policy_model: &policy,
        };
        let mut algorithm = crate::algo::build(&a.settings, &setup)?;
        if let Some(ckpt) = checkpoint {
            let files = |name: &str| ckpt.tensor_file(name, &device);
            algorithm.restore(&state.algorithm, &files).with_context(|| {
                format!(
                    "{}: cannot restore the {} state",
                    ckpt.dir().join(crate::checkpoint::STATE_FILE).display(),
                    a.kind
                )
            })?;
        }
        let mut sampler_model = policy.frozen_view()?;
        // bf16 copies with rollout.weights = "bf16"; with LoRA, copies with the adapters merged in.
        let bf16 = recipe.rollout.bf16_importance_cap.is_some();
        sampler_model.enable_decode_copies(bf16).with_context(|| match bf16 {
            true => "rollout.weights = \"bf16\"",
            false => "decode copies with the adapters merged",
        })?;
        Ok(Self {
            recipe,
            run_dir,
            policy,
            sampler_model,
            reference,
            tokenizer,
            optimizer,
            algorithm,
            rewards,
            prompts,
            generation,
            runtime,
            plan,
            state,
            metrics,
            evaluator,
            last_eval: None,
            last_eval_reward: None,
            notes,
        })
    }
}

/// The trainer's state saved in a checkpoint.
fn train_state(c: &Checkpoint) -> Result<TrainState> {
    crate::checkpoint::from_state(c.state(), "training").with_context(|| {
        format!(
            "{}: the training state is not one this safe can read",
            c.dir().join(crate::checkpoint::STATE_FILE).display()
        )
    })
}

/// `model.reference` must read the policy's token ids as the policy does: same architecture, vocabulary size and,
/// when it has a tokenizer, the same token for every id.
fn same_vocabulary(
    reference: &LoadedModel,
    policy: &str,
    config: &crate::model::ModelConfig,
    tokenizer: &crate::model::Tokenizer,
) -> Result<()> {
    let r = &reference.config;
    let what = |arch, vocab| format!("{arch:?} with a vocabulary of {vocab} tokens");
    if r.arch != config.arch || r.vocab_size != config.vocab_size {
        bail!(
            "model.reference = {} is a {}, the policy {policy} a {}: the reference scores the policy's tokens, so it \
             needs the same architecture and vocabulary",
            reference.origin,
            what(r.arch, r.vocab_size),
            what(config.arch, config.vocab_size)
        );
    }
    if let Some(rt) = &reference.tokenizer {
        let differs = (0..config.vocab_size as u32).find(|&id| rt.id_to_token(id) != tokenizer.id_to_token(id));
        if let Some(id) = differs {
            bail!(
                "model.reference = {}: token {id} is {:?} there and {:?} in the policy {policy}: the tokenizers differ",
                reference.origin,
                rt.id_to_token(id),
                tokenizer.id_to_token(id)
            );
        }
    }
    Ok(())
}
