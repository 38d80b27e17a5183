//! PPO end to end: every trainable tensor of policy and value model gets a gradient (the reference none), the first
//! update is exactly on-policy, TRL's metric names, and exact resume with the value model, its optimizer and the
//! adaptive KL controller in the checkpoint.

mod common;

use candle_core::{DType, Device};
use common::train::*;
use safe::advantage::gae::{ScorePlacement, Whitening};
use safe::algo::loss::{ClipConfig, KlEstimator};
use safe::algo::ppo::{ppo_update, KlController, PpoBatch, PpoConfig, PpoParams};
use safe::model::value::ValueModel;
use safe::model::{CausalLm, LoadedModel, ModelSource};
use safe::optim::{AdamW, AdamWConfig};

fn tiny() -> LoadedModel {
    let src = ModelSource::parse("builtin:tiny", None).unwrap();
    LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap()
}

fn snapshot(vars: &[(String, candle_core::Var)]) -> Vec<(String, Vec<f32>)> {
    vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect()
}

fn config(epochs: usize) -> PpoConfig {
    PpoConfig {
        params: PpoParams {
            gamma: 1.0,
            lam: 0.95,
            epochs,
            num_mini_batches: 2,
            vf_coef: 0.1,
            value_clip: 0.2,
            kl_estimator: KlEstimator::K1,
            whitening: Whitening::Unbiased,
            placement: ScorePlacement::LastToken,
            missing_eos_penalty: Some(1.0),
            kl_target: None,
            kl_horizon: 10000.0,
        },
        clip: ClipConfig { eps_low: 0.2, eps_high: 0.2, delta: None },
        micro_batch_size: 2,
        temperature: 0.9,
        max_grad_norm: 1.0,
        critic_max_grad_norm: 1.0,
        pad_id: 258,
        logprob_chunk: 3,
        seed: 0,
    }
}

#[test]
fn every_policy_and_value_tensor_gets_a_gradient_and_the_first_update_is_on_policy() {
    let (policy, _) = tiny().into_model(true, &Device::Cpu, DType::F32).unwrap();
    let view = policy.frozen_view().unwrap();
    let (reference, _): (CausalLm, _) = tiny().into_model(false, &Device::Cpu, DType::F32).unwrap();
    let critic = ValueModel::from_loaded(tiny(), &Device::Cpu, DType::F32).unwrap();
    let cfg = AdamWConfig { lr: 1e-2, ..Default::default() };
    let mut popt = AdamW::new(policy.vars().to_vec(), cfg).unwrap();
    let mut copt = AdamW::new(critic.vars().to_vec(), cfg).unwrap();
    let prompts = vec![vec![257, 72, 105], vec![257, 50, 43, 50], vec![257, 65], vec![257, 66, 67, 68, 69]];
    let completions = vec![vec![52, 258], vec![53, 54, 55], vec![56], vec![57, 58, 258]];
    let batch = PpoBatch {
        prompts: &prompts,
        completions: &completions,
        scores: &[1.0, -0.5, 0.25, 0.0],
        ended_with_eos: &[true, false, false, true],
        old_logprobs: None,
    };
    let kl = KlController { beta: 0.05, target: None, horizon: 10000.0 };
    let (p0, c0, r0) = (snapshot(policy.vars()), snapshot(critic.vars()), reference.named_tensors());
    // One epoch, one mini-batch: the first update sees ρ = 1 exactly (rollout and training log-probs agree).
    let mut one = config(1);
    one.params.num_mini_batches = 1;
    let m = ppo_update(&policy, &view, Some(&reference), &critic, &mut popt, &mut copt, &kl, &batch, &one, 1).unwrap();
    assert_eq!((m.ratio_mean, m.approxkl, m.clipfrac), (1.0, 0.0, 0.0), "{m:?}");
    assert!(m.grad_norm > 0.0 && m.critic_grad_norm > 0.0);
    // Four epochs of two mini-batches more: every tensor moves (the zero-initialised value head first, then the
    // value model's trunk through it).
    let m = ppo_update(&policy, &view, Some(&reference), &critic, &mut popt, &mut copt, &kl, &batch, &config(4), 2)
        .unwrap();
    assert!(m.pg_loss.is_finite() && m.vf_loss > 0.0, "{m:?}");
    for ((name, before), (_, after)) in p0.iter().zip(snapshot(policy.vars())) {
        assert!(*before != after, "policy tensor `{name}` got no gradient");
    }
    for ((name, before), (_, after)) in c0.iter().zip(snapshot(critic.vars())) {
        assert!(*before != after, "value-model tensor `{name}` got no gradient");
    }
    assert!(reference.vars().is_empty(), "the reference is frozen");
    for ((name, before), (_, after)) in r0.iter().zip(reference.named_tensors()) {
        let (a, b): (Vec<f32>, Vec<f32>) =
            (before.flatten_all().unwrap().to_vec1().unwrap(), after.flatten_all().unwrap().to_vec1().unwrap());
        assert!(a == b, "reference tensor `{name}` changed");
    }
    assert_eq!(m.num_eos, 2.0);
}

/// TINY as a PPO recipe: 8 completions, 2 mini-batches of micro-batches of 2, an adaptive KL target.
fn ppo_recipe() -> String {
    TINY.replace(
        "[algorithm]\n",
        "[algorithm]\nkind = \"ppo\"\nppo_epochs = 2\nnum_mini_batches = 2\nkl_target = 0.01\n",
    )
    .replace("micro_batch_size = 4", "micro_batch_size = 2")
    .replace("num_iterations = 2\n", "")
    .replace("[optim]\n", "[critic]\nlr = 1e-3\n\n[optim]\n")
}

#[test]
fn ppo_resume_is_exact_with_the_value_model_and_kl_controller() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &ppo_recipe(), 5);
    ok(&train(&recipe, &["run.name=straight"], "never"));
    ok(&train(&recipe, &["run.name=split", "run.max_steps=3"], "never"));
    ok(&train(&recipe, &["run.name=split"], "auto"));
    let (a, b) = (dir.path().join("runs/straight"), dir.path().join("runs/split"));
    assert_eq!(checkpoint_bytes(&step_dir(&a, 6)), checkpoint_bytes(&step_dir(&b, 6)));
    for f in ["critic.safetensors", "critic_optimizer.safetensors"] {
        assert_eq!(
            std::fs::read(step_dir(&a, 6).join(f)).unwrap(),
            std::fs::read(step_dir(&b, 6).join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(metrics(&a), metrics(&b));
    let state = common::read_json(&step_dir(&a, 6).join("state.json"));
    let beta = state["training"]["algorithm"]["kl_controller"]["beta"].as_f64().unwrap();
    assert!(beta != 0.04, "the adaptive controller moved β: {beta}");
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(a.join("metrics.jsonl")).unwrap().lines().next().unwrap())
            .unwrap();
    for name in [
        "objective/kl",
        "objective/scores",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/ratio",
        "objective/kl_coef",
    ] {
        assert!(first.get(name).is_some_and(|v| v.is_number()), "{name} missing: {first}");
    }
    // One completion per prompt is allowed for PPO (no groups), not for GRPO.
    ok(&train(
        &recipe,
        &["run.name=single", "rollout.num_generations=1", "run.max_steps=1", "algorithm.num_mini_batches=1"],
        "never",
    ));
    let grpo = setup(dir.path(), TINY, 5);
    let out = train(&grpo, &["run.name=g", "rollout.num_generations=1"], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("grpo compares completions within a group"), "{}", stderr(&out));
}

/// Regression: an old, edited or truncated `state.json` once reached `expect` (PPO's KL controller, SAFE's
/// controller) and panicked, or failed without naming the field. Now each is exit 2 naming the field.
#[test]
fn edited_or_old_checkpoint_state_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &ppo_recipe(), 5);
    ok(&train(&recipe, &["run.max_steps=1"], "never"));
    let state_path = step_dir(&dir.path().join("runs/t"), 1).join("state.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &[&str]); 5] = [
        (
            |v| drop(v["training"]["algorithm"].as_object_mut().unwrap().remove("kl_controller")),
            &["`training.algorithm`", "missing field `kl_controller`"],
        ),
        // A checkpoint of a safe from before the algorithm state existed.
        (|v| drop(v["training"].as_object_mut().unwrap().remove("algorithm")), &["`training.algorithm` is missing"]),
        (
            |v| v["training"]["algorithm"]["kl_controller"]["beta"] = "big".into(),
            &["`training.algorithm.kl_controller.beta`", "invalid type"],
        ),
        (|v| v["training"]["step"] = "one".into(), &["`training.step`", "invalid type"]),
        (
            |v| drop(v["training"].as_object_mut().unwrap().remove("bad_steps_in_a_row")),
            &["missing field `bad_steps_in_a_row`"],
        ),
    ];
    for (edit, expected) in cases {
        let mut v = original.clone();
        // As written before the digests (an edit with them in place is caught by the digest: checkpoint_integrity).
        for key in ["digest", "files"] {
            v.as_object_mut().unwrap().remove(key);
        }
        edit(&mut v);
        std::fs::write(&state_path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        let out = train(&recipe, &["run.max_steps=2"], "auto");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        for e in expected {
            assert!(err.contains(e), "expected {e:?} in:\n{err}");
        }
    }
}
