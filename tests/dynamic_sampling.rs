//! DAPO's dynamic sampling (`rollout.dynamic_sampling`) on the built-in tiny model: groups whose rewards are all
//! equal are dropped and more prompts sampled; five steps train, three + resume + two equal five bit for bit, a
//! step that runs out of rounds trains on what it has (or is skipped with none) with a warning, and algorithms
//! without groups refuse the key.

mod common;

use common::train::*;

/// TINY with one sparse-ish reward (a digit anywhere), so some groups tie and get dropped.
fn recipe(rounds: usize) -> String {
    let tiny =
        TINY.replace("[rollout]\n", &format!("[rollout]\ndynamic_sampling = true\nmax_sampling_rounds = {rounds}\n"));
    let cut = tiny.find("[[reward]]").unwrap();
    format!("{}[[reward]]\nname = \"digit\"\nrule = \"regex\"\npattern = \"[0-9]\"\n", &tiny[..cut])
        .replace("max_steps = 6", "max_steps = 5")
}

fn lines(run: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn dynamic_sampling_drops_tied_groups_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = setup(dir.path(), &recipe(3), 5);
    ok(&train(&path, &["run.name=straight"], "never"));
    ok(&train(&path, &["run.name=split", "run.max_steps=3"], "never"));
    ok(&train(&path, &["run.name=split"], "auto"));
    let (a, b) = (dir.path().join("runs/straight"), dir.path().join("runs/split"));
    assert_eq!(checkpoint_bytes(&step_dir(&a, 5)), checkpoint_bytes(&step_dir(&b, 5)));
    assert_eq!(metrics(&a), metrics(&b));
    let m = lines(&a);
    let rounds: Vec<f64> = m.iter().map(|l| l["sampling/rounds"].as_f64().unwrap()).collect();
    let filtered: f64 = m.iter().map(|l| l["sampling/filtered_groups"].as_f64().unwrap()).sum();
    assert!(rounds.iter().any(|r| *r > 1.0) && filtered > 0.0, "no group was dropped: {rounds:?}");
    // The kept groups are never tied: the training batch has no zero-std group.
    for l in &m {
        if l["sampling/rounds"].as_f64().unwrap() < 3.0 {
            assert_eq!(l["frac_reward_zero_std"].as_f64(), Some(0.0), "{l}");
        }
    }
    // Without dynamic sampling round 0 is the same draw: the first step of a run whose first round kept both
    // groups equals a plain run's first step.
    if rounds[0] == 1.0 && m[0]["sampling/filtered_groups"].as_f64() == Some(0.0) {
        let plain = setup(dir.path(), &recipe(3).replace("dynamic_sampling = true\nmax_sampling_rounds = 3\n", ""), 5);
        ok(&train(&plain, &["run.name=plain", "run.max_steps=1"], "never"));
        let p = lines(&dir.path().join("runs/plain"));
        assert_eq!(p[0]["reward"], m[0]["reward"]);
    }
}

#[test]
fn dynamic_sampling_out_of_rounds_warns_and_other_algorithms_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    // A reward that is 0 for every completion: every group ties, every round is dropped.
    let never = recipe(2).replace("pattern = \"[0-9]\"", "pattern = \"^NEVER$\"");
    let path = setup(dir.path(), &never, 5);
    let out = train(&path, &["run.max_steps=2", "run.max_bad_steps=5"], "never");
    ok(&out);
    let err = stderr(&out);
    assert!(err.contains("dynamic sampling kept 0 of 2 groups in 2 rounds"), "{err}");
    assert!(err.contains("every group's rewards were equal in 2 rounds"), "{err}");
    let m = lines(&dir.path().join("runs/t"));
    assert_eq!(m[0]["sampling/filtered_groups"].as_f64(), Some(4.0));
    // PPO has no groups to drop.
    let path = setup(
        dir.path(),
        &recipe(2).replace("[algorithm]\n", "[algorithm]\nkind = \"ppo\"\n").replace("num_iterations = 2\n", ""),
        5,
    );
    let out = train(&path, &["run.name=p"], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`rollout.dynamic_sampling` drops groups"), "{}", stderr(&out));
}
