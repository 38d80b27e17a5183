//! REINFORCE++ and REINFORCE++-baseline end to end on the built-in tiny model: five steps train (per-token KL
//! rewards, whitened returns, two epochs of two shuffled mini-batches), and three steps + resume + two equal five,
//! bit for bit.

mod common;

use common::train::*;

/// TINY as a REINFORCE++ recipe of `kind`: β = 0.01 (OpenRLHF's default), 2 epochs × 2 mini-batches, five steps.
fn recipe(kind: &str) -> String {
    TINY.replace("[algorithm]\n", &format!("[algorithm]\nkind = \"{kind}\"\nppo_epochs = 2\nnum_mini_batches = 2\n"))
        .replace("beta = 0.04\n", "")
        .replace("num_iterations = 2\n", "")
        .replace("max_steps = 6", "max_steps = 5")
}

fn trains_and_resumes_exactly(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &recipe(kind), 5);
    ok(&train(&recipe, &["run.name=straight"], "never"));
    ok(&train(&recipe, &["run.name=split", "run.max_steps=3"], "never"));
    ok(&train(&recipe, &["run.name=split"], "auto"));
    let (a, b) = (dir.path().join("runs/straight"), dir.path().join("runs/split"));
    assert_eq!(checkpoint_bytes(&step_dir(&a, 5)), checkpoint_bytes(&step_dir(&b, 5)));
    assert_eq!(metrics(&a), metrics(&b));
    let text = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    for m in &lines {
        for k in ["loss", "grad_norm", "kl", "entropy", "clip_ratio/region_mean", "learning_rate"] {
            assert!(m.get(k).is_some_and(|v| v.as_f64().is_some_and(f64::is_finite)), "{kind}: {k} missing: {m}");
        }
    }
    let resolved = std::fs::read_to_string(a.join("recipe.resolved.toml")).unwrap();
    assert!(resolved.contains("beta = 0.01") && resolved.contains("reward_clip = 10.0"), "{resolved}");
}

#[test]
fn reinforce_pp_trains_five_steps_and_resumes_exactly() {
    trains_and_resumes_exactly("reinforce_pp");
}

#[test]
fn reinforce_pp_baseline_trains_five_steps_and_resumes_exactly() {
    trains_and_resumes_exactly("reinforce_pp_baseline");
}

#[test]
fn reinforce_pp_baseline_fixes_gamma_and_needs_groups() {
    let dir = tempfile::tempdir().unwrap();
    let path = setup(dir.path(), &recipe("reinforce_pp_baseline"), 5);
    // The baseline variant forces γ = 1 (OpenRLHF), so the key is not read: refused.
    let out = train(&path, &["algorithm.gamma=0.9"], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`algorithm.gamma` only applies when `algorithm.kind` is"), "{}", stderr(&out));
    let out = train(&path, &["rollout.num_generations=1", "algorithm.num_mini_batches=1"], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("compares completions within a group"), "{}", stderr(&out));
    // Plain REINFORCE++ reads γ and needs no groups.
    let path = setup(dir.path(), &recipe("reinforce_pp"), 5);
    ok(&train(
        &path,
        &["algorithm.gamma=0.9", "rollout.num_generations=1", "algorithm.micro_batch_size=2", "run.max_steps=1"],
        "never",
    ));
}
