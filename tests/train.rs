//! `safe train` end to end: the run directory, the quickstart learning, checkpoints that load elsewhere, replayed
//! rollouts, non-finite steps, and bad inputs that exit 2 before anything is trained.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use common::train::*;
use safe::reward::{RewardInput, RewardPipeline, RewardSource};
use safe::rollout::{generate, GenerationConfig, Request, RowKey, SamplingParams};
use safe::train::run_dir::Start;
use safe::train::Trainer;

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn rewards(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"].as_f64().unwrap()).collect()
}

/// README's first command learns visibly: the held-out evaluation (greedy, 100 prompts training never sees) goes
/// from chance to near 1, and the training reward with it.
#[test]
fn quickstart_learns_to_copy_and_the_held_out_evaluation_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
    let out = train(&config, &[&format!("run.output_dir={}", dir.path().display())], "never");
    ok(&out);
    let text = std::fs::read_to_string(dir.path().join("quickstart/metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let evals: Vec<(u64, f64)> =
        lines.iter().filter_map(|l| Some((l["step"].as_u64()?, l.get("eval/reward")?.as_f64()?))).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 100, 200, 300, 400]);
    // Measured (seeds 0, 1, 2): 0.00 before training, 1.00 after 400 steps.
    let (first, last) = (evals[0].1, evals[4].1);
    assert!(first < 0.1 && last >= 0.9, "eval/reward {first:.2} before training, {last:.2} after");
    let r: Vec<f64> = lines.iter().filter_map(|l| l.get("reward")?.as_f64()).collect();
    let (early, late) = (mean(&r[..3]), mean(&r[r.len() - 3..]));
    assert!(early < 0.1 && late > 0.7, "training reward {early:.2} early, {late:.2} late");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = stdout.lines().rev().take(2).collect();
    assert!(tail[1].starts_with("eval    400 | reward"), "{stdout}");
    assert!(tail[0].starts_with("report: safe report "), "{stdout}");
}

#[test]
fn run_directory_layout_and_metrics_names() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    let out = train(&recipe, &["run.max_steps=2", "run.save_every=1", "run.keep_last=1"], "never");
    ok(&out);
    let run = dir.path().join("runs/t");
    let resolved = std::fs::read_to_string(run.join("recipe.resolved.toml")).unwrap();
    assert!(resolved.contains("max_steps = 2") && resolved.contains("use_bias_correction_kl = true"));
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for name in [
        "step",
        "reward",
        "reward_std",
        "rewards/correct/mean",
        "rewards/short/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "kl",
        "entropy",
        "loss",
        "grad_norm",
        "learning_rate",
        "clip_ratio/region_mean",
        "timing/rollout",
        "timing/reward",
        "timing/update",
        "timing/step",
        "timing/reference",
        "timing/optimizer",
        "tokens_per_second",
        "tokens/prompt",
        "tokens/completion",
    ] {
        assert!(first.get(name).is_some_and(|v| v.is_number()), "metric `{name}` missing or null in {first}");
    }
    assert_eq!(first["step"], 1);
    // Warm-up of 1 step × μ = 2 updates: the first update of step 1 runs at lr 0, the second at lr/2.
    assert_eq!(first["learning_rate"].as_f64().unwrap(), 3e-3 / 2.0);
    // Completions: one line per completion, with each reward and the advantage.
    let comp = std::fs::read_to_string(run.join("completions/step-2.jsonl")).unwrap();
    assert_eq!(comp.lines().count(), 8);
    let c: serde_json::Value = serde_json::from_str(comp.lines().next().unwrap()).unwrap();
    for k in ["prompt", "completion", "rewards", "reward", "advantage", "finish_reason"] {
        assert!(c.get(k).is_some(), "completions line lacks `{k}`: {c}");
    }
    assert!(c["rewards"]["correct"].is_number() && c["rewards"]["short"].is_number());
    // keep_last = 1: only the newest checkpoint, and `latest` names it.
    let ckpts: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    assert!(ckpts.contains(&"step-2".to_string()) && ckpts.contains(&"latest".to_string()));
    let state = common::read_json(&step_dir(&run, 2).join("state.json"));
    let t = &state["training"];
    assert_eq!((t["step"].as_u64(), t["optimizer_steps"].as_u64()), (Some(2), Some(4)));
    assert_eq!(state["optimizer"]["step"], 4);
    assert!(t["recipe"].as_str().unwrap().contains("[algorithm]"));
}

/// Regression: `model.dtype = "bf16"` trained the bf16 weights themselves, so an update below bf16's spacing
/// rounded away (lr 1e-6 on weights of about 0.02, where bf16 steps by 2⁻¹³ ≈ 1.2e-4: no weight moved). The
/// trainable weights are f32 masters computing in bf16; the checkpoint holds them, in f32.
#[test]
fn bf16_training_keeps_updates_below_bf16_spacing() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    let sets = ["run.max_steps=1", "run.save_every=1", "model.dtype=bf16", "optim.lr=1e-6", "optim.warmup_steps=0"];
    ok(&train(&recipe, &sets, "never"));
    let ckpt = step_dir(&dir.path().join("runs/t"), 1).join("model.safetensors");
    let trained = candle_core::safetensors::load(ckpt, &Device::Cpu).unwrap();
    let src = safe::model::ModelSource::parse("builtin:tiny", None).unwrap();
    let init = safe::model::LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap().tensors;
    let (mut moved, mut below_bf16, mut total) = (0usize, 0usize, 0usize);
    for (name, t) in &trained {
        assert_eq!(t.dtype(), DType::F32, "{name}: the checkpoint holds the f32 master weights");
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = init[name].flatten_all().unwrap().to_vec1().unwrap();
        for (&x, &w) in a.iter().zip(&b) {
            total += 1;
            if x != w {
                moved += 1;
                // A change bf16 could not hold: the two values round to the same bf16.
                below_bf16 += (half::bf16::from_f32(x) == half::bf16::from_f32(w)) as usize;
            }
        }
    }
    assert!(moved * 2 > total, "{moved} of {total} weights moved");
    assert!(below_bf16 * 2 > moved, "{below_bf16} of {moved} moves are below bf16's spacing");
}

/// `rollout.weights = "bf16"`: completions are sampled from bf16 copies of the weights and the loss applies the
/// truncated importance weights, logged under TRL's names; the copies differ from the f32 policy, a little.
#[test]
fn bf16_rollout_weights_log_the_importance_correction() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    ok(&train(&recipe, &["run.max_steps=2", "rollout.weights=bf16", "rollout.importance_cap=3.0"], "never"));
    let lines = std::fs::read_to_string(dir.path().join("runs/t/metrics.jsonl")).unwrap();
    for line in lines.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let get = |k: &str| m[k].as_f64().unwrap_or_else(|| panic!("metric `{k}` missing in {m}"));
        let (mean, min, max) = (
            get("sampling/importance_sampling_ratio/mean"),
            get("sampling/importance_sampling_ratio/min"),
            get("sampling/importance_sampling_ratio/max"),
        );
        assert!(0.0 < min && min <= mean && mean <= max && max <= 3.0, "{m}");
        let diff = get("sampling/sampling_logp_difference/max");
        assert!(diff > 0.0 && diff < 1.0, "bf16 copies should differ from f32 a little: {diff}");
        assert!(get("sampling/sampling_logp_difference/mean") <= diff);
    }
    // Only GRPO's loss applies the correction.
    let ppo = setup(dir.path(), &TINY.replace("num_iterations = 2\n", ""), 5);
    let out = train(&ppo, &["rollout.weights=bf16", "algorithm.kind=ppo", "run.name=p"], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`rollout.weights` = \"bf16\" is for grpo"));
}

#[test]
fn resume_refuses_changed_recipes_and_never_refuses_an_existing_run() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    ok(&train(&recipe, &["run.max_steps=1"], "never"));
    // A key that may not change.
    let out = train(&recipe, &["run.max_steps=2", "optim.lr=1e-2"], "auto");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`optim.lr`") && stderr(&out).contains("may change on resume"), "{}", stderr(&out));
    // `never` refuses the non-empty run directory, `--overwrite` starts over.
    let out = train(&recipe, &["run.max_steps=1"], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--resume never --overwrite"), "{}", stderr(&out));
    let mut c = safe_cmd();
    c.args(["train", "--config", recipe.to_str().unwrap(), "--resume", "never", "--overwrite"]);
    ok(&c.args(["--set", "run.max_steps=1"]).output().unwrap());
    // Already at max_steps: says so and trains nothing.
    let out = train(&recipe, &["run.max_steps=1"], "auto");
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to train"));
    // A directory that is not a checkpoint.
    let out = train(&recipe, &[], dir.path().to_str().unwrap());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("state.json"), "{}", stderr(&out));
}

fn load_recipe(dir: &Path, body: &str, sets: &[&str]) -> safe::recipe::Recipe {
    let path = setup(dir, body, 5);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    safe::recipe::load(&path, &sets).unwrap()
}

#[test]
fn checkpoint_reloads_in_safe_generate_with_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = load_recipe(dir.path(), TINY, &["run.max_steps=2"]);
    let mut trainer = Trainer::new(recipe, Start::Fresh).unwrap();
    trainer.run().unwrap();
    let ckpt = step_dir(trainer.run_dir(), 2);
    // In-process: the trained policy, sampling with safe generate's random streams (seed 7, step 0).
    let prompt = "What is 3 + 4?";
    let ids = trainer.tokenizer().encode(prompt).unwrap();
    let cfg = GenerationConfig {
        sampling: SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, min_p: 0.0, repetition_penalty: 1.0 },
        max_new_tokens: 12,
        eos_ids: trainer.tokenizer().eos_ids().to_vec(),
        stop_strings: vec![],
        batch_size: 16,
        pad_id: trainer.tokenizer().padding_id(),
    };
    let requests: Vec<Request> = (0..3)
        .map(|s| Request { prompt: ids.clone(), key: RowKey { seed: 7, step: 0, prompt: 0, sample: s } })
        .collect();
    let view = trainer.policy().frozen_view().unwrap();
    let expected: Vec<Vec<u32>> =
        generate(&view, Some(trainer.tokenizer()), &requests, &cfg, None).unwrap().into_iter().map(|c| c.ids).collect();
    let out = safe_cmd()
        .args(["generate", "--model", ckpt.to_str().unwrap(), "--prompt", prompt, "--num-samples", "3"])
        .args(["--seed", "7", "--max-new-tokens", "12", "--format", "jsonl"])
        .output()
        .unwrap();
    ok(&out);
    let got: Vec<Vec<u32>> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| common::json_ids(&serde_json::from_str::<serde_json::Value>(l).unwrap()["token_ids"]))
        .collect();
    assert_eq!(got, expected);
}

/// The names of the tensors in a safetensors file, sorted.
fn tensor_names(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = candle_core::safetensors::load(path, &Device::Cpu).unwrap().into_keys().collect();
    names.sort();
    names
}

/// The config keys a checkpoint must carry over from its input model.
const CONFIG_KEYS: [&str; 12] = [
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
];

fn same_config(ckpt: &Path, input: &Path) {
    let (a, b) = (common::read_json(&ckpt.join("config.json")), common::read_json(&input.join("config.json")));
    for k in CONFIG_KEYS {
        assert_eq!(a[k], b[k], "config.json `{k}`");
    }
    let theta = |v: &serde_json::Value| v["rope_theta"].as_f64().or(v["rope_parameters"]["rope_theta"].as_f64());
    assert_eq!(theta(&a), theta(&b));
}

#[test]
fn checkpoint_tensor_names_and_config_match_the_input_model() {
    // An HF directory (tiny Llama with an untied head) given a byte-level tokenizer.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let fixture = common::fixture("tiny/tiny-llama");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), model.join(f)).unwrap();
    }
    let cfg = safe::model::builtin::config("tiny").unwrap();
    safe::model::builtin::tokenizer(&cfg, "test").unwrap().save(&model).unwrap();
    let body = TINY.replace("builtin:tiny", model.to_str().unwrap()).replace("beta = 0.04", "beta = 0.0");
    let recipe = setup(dir.path(), &body, 5);
    ok(&train(&recipe, &["run.max_steps=1"], "never"));
    let ckpt = step_dir(&dir.path().join("runs/t"), 1);
    assert_eq!(tensor_names(&ckpt.join("model.safetensors")), tensor_names(&fixture.join("model.safetensors")));
    same_config(&ckpt, &fixture);
}

#[test]
fn smollm2_checkpoint_matches_transformers_names_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = common::smollm2_gguf();
    let body = TINY
        .replace("builtin:tiny", gguf.to_str().unwrap())
        .replace("beta = 0.04", "beta = 0.0")
        .replace("prompts_per_step = 2", "prompts_per_step = 1")
        .replace("num_generations = 4", "num_generations = 2")
        .replace("max_new_tokens = 6", "max_new_tokens = 3")
        .replace("num_iterations = 2", "num_iterations = 1")
        .replace("micro_batch_size = 4", "micro_batch_size = 2");
    let recipe = setup(dir.path(), &body, 5);
    ok(&train(&recipe, &["run.max_steps=1"], "never"));
    let ckpt = step_dir(&dir.path().join("runs/t"), 1);
    let check = common::read_json(&common::fixture("smollm2/dequant_check.json"));
    let mut expected: Vec<String> =
        check["tensors"].as_array().unwrap().iter().map(|t| t["hf_name"].as_str().unwrap().to_string()).collect();
    expected.sort();
    assert_eq!(expected.len(), 272);
    assert_eq!(tensor_names(&ckpt.join("model.safetensors")), expected);
    same_config(&ckpt, &common::fixture("smollm2"));
    // The tokenizer travels with the weights.
    assert!(ckpt.join("tokenizer.json").is_file() && ckpt.join("tokenizer_config.json").is_file());
}

/// A reward that is NaN from its `from`-th call on.
struct NanFrom {
    calls: AtomicUsize,
    from: usize,
}

impl RewardSource for NanFrom {
    fn name(&self) -> &str {
        "nan"
    }
    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<Option<f64>>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(vec![Some(if call >= self.from { f64::NAN } else { 1.0 }); batch.len()])
    }
}

#[test]
fn non_finite_rewards_skip_steps_then_stop_with_exit_1_keeping_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = load_recipe(dir.path(), TINY, &["run.max_steps=10", "run.save_every=1", "run.max_bad_steps=1"]);
    let mut trainer = Trainer::new(recipe, Start::Fresh).unwrap();
    let source: Box<dyn RewardSource> = Box::new(NanFrom { calls: AtomicUsize::new(0), from: 3 });
    trainer.set_rewards(RewardPipeline::new(vec![(source, 1.0)]).unwrap());
    let failure = trainer.run().unwrap_err();
    assert_eq!(failure.code, safe::exit::TRAINING_FAILED);
    let msg = format!("{:#}", failure.error);
    assert!(msg.contains("2 bad steps in a row") && msg.contains("step-2") && msg.contains("NaN"), "{msg}");
    // Steps 3 and 4 were skipped (and logged); the newest checkpoint is step 2's, and it resumes.
    let run = trainer.run_dir().to_path_buf();
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 4);
    assert_eq!(safe::checkpoint::latest_complete(&run), Some(step_dir(&run, 2)));
    assert!(!step_dir(&run, 3).exists());
    let state = &safe::checkpoint::Checkpoint::open(&step_dir(&run, 2)).unwrap();
    assert_eq!(state.state()["bad_steps_in_a_row"], 0);
}

#[test]
fn one_skipped_step_is_tolerated_and_leaves_weights_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = load_recipe(dir.path(), TINY, &["run.max_steps=3", "run.max_bad_steps=1"]);
    let mut trainer = Trainer::new(recipe, Start::Fresh).unwrap();
    // NaN on the first call only: step 1 skipped, steps 2-3 train.
    struct NanFirst(AtomicUsize);
    impl RewardSource for NanFirst {
        fn name(&self) -> &str {
            "first"
        }
        fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<Option<f64>>> {
            let first = self.0.fetch_add(1, Ordering::SeqCst) == 0;
            Ok(batch
                .iter()
                .map(|b| {
                    Some(if first { f64::NAN } else { b.completion_ids.iter().map(|&t| t % 7).sum::<u32>() as f64 })
                })
                .collect())
        }
    }
    trainer.set_rewards(RewardPipeline::new(vec![(Box::new(NanFirst(AtomicUsize::new(0))), 1.0)]).unwrap());
    let before: Vec<Vec<f32>> = weights(trainer.policy());
    let report = trainer.step().unwrap();
    match &report.outcome {
        safe::train::StepOutcome::Skipped { stage, reason } => {
            assert_eq!(*stage, "reward");
            assert!(reason.contains("NaN") && reason.contains("`first`"), "{reason}");
        }
        other => panic!("expected a skipped step, got {other:?}"),
    }
    assert!(weights(trainer.policy()) == before, "a skipped step must not touch the weights");
    assert_eq!(trainer.state().bad_steps_in_a_row, 1);
    trainer.run().unwrap();
    assert_eq!(trainer.state().step, 3);
    assert_eq!(trainer.state().skipped_steps, 1);
    assert!(weights(trainer.policy()) != before, "the trained steps must change the weights");
}

fn weights(m: &safe::model::CausalLm) -> Vec<Vec<f32>> {
    m.vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn replayed_rollouts_train_reproducibly_with_recorded_or_scored_rewards() {
    let dir = tempfile::tempdir().unwrap();
    // Two groups of 4 completions (text), with recorded rewards; group 1's prompt uses chat messages.
    let mut lines = String::new();
    let recorded = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.25, 0.0, 0.0]];
    for (g, rs) in recorded.iter().enumerate() {
        for (i, r) in rs.iter().enumerate() {
            let prompt = if g == 0 {
                serde_json::json!("What is 2 + 2?")
            } else {
                serde_json::json!([{"role": "user", "content": "What is 3 + 3?"}])
            };
            let line = serde_json::json!({"prompt": prompt, "completion": format!("{} is it", i + 3), "reward": r, "answer": "4"});
            lines.push_str(&format!("{line}\n"));
        }
    }
    std::fs::write(dir.path().join("rollouts.jsonl"), &lines).unwrap();
    let body =
        TINY.replace("max_new_tokens = 6", "max_new_tokens = 16\nsource = \"file\"\nfile = \"{dir}/rollouts.jsonl\"");
    let recipe = setup(dir.path(), &body, 5);
    let sets = ["run.max_steps=3", "rollout.prompts_per_step=1", "algorithm.micro_batch_size=2"];
    ok(&train(&recipe, &[&sets[..], &["run.name=a"]].concat(), "never"));
    ok(&train(&recipe, &[&sets[..], &["run.name=b"]].concat(), "never"));
    let (a, b) = (dir.path().join("runs/a"), dir.path().join("runs/b"));
    assert_eq!(checkpoint_bytes(&step_dir(&a, 3)), checkpoint_bytes(&step_dir(&b, 3)));
    // Steps take the groups in order and wrap: 0, 1, 0. The logged reward is the recorded one.
    assert_eq!(rewards(&a), vec![0.5, 0.1875, 0.5]);
    // Without recorded rewards the recipe's rewards score the same completions ("3 is it" … "6 is it" vs "4").
    let unrewarded: String = lines
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("reward");
            format!("{v}\n")
        })
        .collect();
    std::fs::write(dir.path().join("rollouts.jsonl"), unrewarded).unwrap();
    ok(&train(&recipe, &[&sets[..], &["run.name=c", "run.max_steps=1"]].concat(), "never"));
    let m: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(dir.path().join("runs/c/metrics.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    assert_eq!(m["rewards/correct/mean"], 0.25); // only "4 is it" is right
}

#[test]
fn bad_inputs_exit_2_naming_file_and_line_or_key_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    let run = dir.path().join("runs/t");
    let data = dir.path().join("data.jsonl");
    let expect = |sets: &[&str], needles: &[&str]| {
        let out = train(&recipe, sets, "never");
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        for n in needles {
            assert!(stderr(&out).contains(n), "stderr lacks {n:?}:\n{}", stderr(&out));
        }
        assert!(!run.join("checkpoints").exists(), "nothing may be trained");
    };
    // A malformed JSONL line.
    std::fs::write(&data, "{\"prompt\": \"a\", \"answer\": \"1\"}\n{\"prompt\": \"b\"\n").unwrap();
    expect(&[], &["data.jsonl:2", "not valid JSON"]);
    // A line without the prompt field.
    std::fs::write(&data, "{\"question\": \"a\", \"answer\": \"1\"}\n").unwrap();
    expect(&[], &["data.jsonl:1", "no `prompt` field"]);
    std::fs::write(&data, data_lines(5)).unwrap();
    // Batch sizes that do not divide.
    expect(&["algorithm.micro_batch_size=3"], &["algorithm.micro_batch_size", "one of 1, 2, 4, 8"]);
    // An unknown reward rule.
    let body = std::fs::read_to_string(&recipe).unwrap().replace("rule = \"exact_answer\"", "rule = \"exact\"");
    std::fs::write(&recipe, &body).unwrap();
    expect(&[], &["recipe.toml:", "reward.rule", "exact_answer"]);
    std::fs::write(&recipe, body.replace("rule = \"exact\"", "rule = \"exact_answer\"")).unwrap();
    // A step that cannot fit in memory.
    expect(&["rollout.max_new_tokens=1000000"], &["rollout.max_new_tokens", "GB"]);
    // A replay file with a bad line.
    std::fs::write(dir.path().join("r.jsonl"), "{\"prompt\": \"a\"}\n").unwrap();
    let file = format!("rollout.file={}", dir.path().join("r.jsonl").display());
    expect(&["rollout.source=file", &file], &["r.jsonl:1", "no `completion`"]);
    // A replayed completion longer than rollout.max_new_tokens (6).
    std::fs::write(dir.path().join("r.jsonl"), "{\"prompt\": \"a\", \"completion_ids\": [1,2,3,4,5,6,7]}\n").unwrap();
    expect(&["rollout.source=file", &file], &["r.jsonl:1", "raise rollout.max_new_tokens"]);
}

#[test]
fn grpo_lambda_end_to_end_reproduces_the_worked_example() {
    // algorithms.md §3.6 as a replay file: 5 groups of 4 completions with the example's correctness and lengths,
    // α = 0.5, λ = 0.2. The completions file must carry the example's advantages.
    let dir = tempfile::tempdir().unwrap();
    let correct = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]];
    let lengths =
        [[100, 200, 300, 400], [150, 120, 450, 500], [300, 310, 320, 330], [220, 180, 260, 90], [500, 250, 400, 200]];
    let mut lines = String::new();
    for g in 0..5 {
        for i in 0..4 {
            let ids = vec![65u32 + i as u32; lengths[g][i]];
            let line = serde_json::json!({"prompt_ids": [70 + g], "completion_ids": ids, "reward": correct[g][i]});
            lines.push_str(&format!("{line}\n"));
        }
    }
    std::fs::write(dir.path().join("rollouts.jsonl"), lines).unwrap();
    let body = TINY
        .replace("max_new_tokens = 6", "max_new_tokens = 500\nsource = \"file\"\nfile = \"{dir}/rollouts.jsonl\"")
        .replace("[algorithm]\n", "[algorithm]\nkind = \"grpo_lambda\"\nalpha = 0.5\nlambda = 0.2\n")
        .replace("[[reward]]\nname = \"short\"\nrule = \"length\"\ntarget = 3\nweight = 0.1\n", "");
    let recipe = setup(dir.path(), &body, 5);
    let sets = ["run.max_steps=1", "rollout.prompts_per_step=5", "algorithm.num_iterations=1", "algorithm.beta=0"];
    ok(&train(&recipe, &sets, "never"));
    let run = dir.path().join("runs/t");
    let m: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().next().unwrap())
            .unwrap();
    // Rewards: A 3.0 (σ(z) + σ(−z) = 1 pairwise), B 2, C 0, D 3, E 1 → 9/20.
    assert!((m["reward"].as_f64().unwrap() - 0.45).abs() < 1e-12, "{m}");
    assert_eq!(m["grpo_lambda/n_efficiency_groups"], 1.0);
    assert_eq!(m["grpo_lambda/frac_efficiency"], 0.2);
    assert_eq!(m["grpo_lambda/ratio_efficiency"], 1.0);
    assert_eq!(m["grpo_lambda/ratio_accuracy"], 0.375);
    let adv: Vec<f64> = std::fs::read_to_string(run.join("completions/step-1.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["advantage"].as_f64().unwrap())
        .collect();
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
    for (a, e) in adv.iter().zip(expected) {
        assert!((a - e).abs() < 1e-12, "{adv:?}");
    }
    // Other rewards next to the correctness reward are refused: they would be scored and silently ignored.
    let with_extra = body.clone() + "\n[[reward]]\nname = \"short\"\nrule = \"length\"\ntarget = 3\n";
    std::fs::write(&recipe, with_extra.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
    let out = train(&recipe, &sets, "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("computes its reward from `correct` alone"), "{}", stderr(&out));
}

#[test]
fn par_shaping_scores_reference_completions_once_per_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}\n\n[shaping]\nkind = \"par\"\nmax_refs = 3\n", TINY.trim_end())
        .replace("beta = 0.04", "beta = 0.0");
    let recipe = setup(dir.path(), &body, 5);
    ok(&train(&recipe, &["run.max_steps=2", "run.save_every=2"], "never"));
    let run = dir.path().join("runs/t");
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    for line in lines.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(m["shaping/num_refs"], 3.0, "{m}");
        let shaped = m["rewards/shaped"].as_f64().unwrap();
        assert!(shaped > 0.0 && shaped < 1.0, "PAR is a mean of sigmoids: {m}");
        assert_eq!(m["rewards/raw"], m["reward"]);
        assert!(m.get("kl").is_none(), "β = 0: the frozen model serves the references only, no KL");
    }
    // Two steps of 2 prompts over 5 examples: 4 distinct prompts, each with 3 reference rewards in the checkpoint.
    let state = common::read_json(&step_dir(&run, 2).join("state.json"));
    let refs = state["training"]["references"]["by_prompt"].as_object().unwrap();
    assert_eq!(refs.len(), 4);
    assert!(refs.values().all(|v| v.as_array().unwrap().len() == 3));
    // Shaping a GRPO-λ reward is refused.
    let out = train(&recipe, &["algorithm.kind=grpo_lambda", "reward.1.weight=0"], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("shaping it is defined by no paper"), "{}", stderr(&out));
}
