//! RLOO end to end on the built-in tiny model: five steps train (KL-shaped rewards, leave-one-out advantages,
//! μ = 2 with stored old log-probs), and three steps + resume + two equal five, bit for bit.

mod common;

use common::train::*;

/// TINY as an RLOO recipe: β = 0.05 (TRL's default), normalised advantages, μ = 2, five steps.
fn rloo_recipe() -> String {
    TINY.replace("[algorithm]\n", "[algorithm]\nkind = \"rloo\"\nnormalize_advantages = true\n")
        .replace("beta = 0.04\n", "")
        .replace("max_steps = 6", "max_steps = 5")
}

#[test]
fn rloo_trains_five_steps_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &rloo_recipe(), 5);
    ok(&train(&recipe, &["run.name=straight"], "never"));
    ok(&train(&recipe, &["run.name=split", "run.max_steps=3"], "never"));
    ok(&train(&recipe, &["run.name=split"], "auto"));
    let (a, b) = (dir.path().join("runs/straight"), dir.path().join("runs/split"));
    assert_eq!(checkpoint_bytes(&step_dir(&a, 5)), checkpoint_bytes(&step_dir(&b, 5)));
    assert_eq!(metrics(&a), metrics(&b));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for m in &lines {
        for k in ["loss", "grad_norm", "kl", "entropy", "clip_ratio/region_mean", "reward_std", "learning_rate"] {
            assert!(m.get(k).is_some_and(|v| v.is_number()), "{k} missing: {m}");
        }
    }
    // β = 0.05 was the default: the resolved recipe says so, and the KL reward needed the reference.
    let resolved = std::fs::read_to_string(a.join("recipe.resolved.toml")).unwrap();
    assert!(resolved.contains("kind = \"rloo\"") && resolved.contains("beta = 0.05"), "{resolved}");
    // The completions file carries the advantages; whitened over the batch, they sum to 0.
    let c = std::fs::read_to_string(a.join("completions/step-1.jsonl")).unwrap();
    let adv: Vec<f64> = c
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["advantage"].as_f64().unwrap())
        .collect();
    assert_eq!(adv.len(), 8);
    assert!(adv.iter().sum::<f64>().abs() < 1e-9, "{adv:?}");
}

#[test]
fn rloo_refuses_grpo_keys_and_needs_groups() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &rloo_recipe(), 5);
    let out = train(&recipe, &["algorithm.loss_type=grpo"], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`algorithm.loss_type` only applies when `algorithm.kind` is"), "{}", stderr(&out));
    let out = train(&recipe, &["rollout.num_generations=1"], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("rloo compares completions within a group"), "{}", stderr(&out));
}
