//! `safe logprobs` and a replay file's recorded `old_logprobs`: the log-probs `safe logprobs` prints replay as
//! on-policy old log-probs (ratio 1), shifted ones make an off-policy batch that clips on both sides, and bad
//! values are exit 2 naming the file and line.

mod common;

use std::path::Path;

use common::train::*;

/// One group of 4 text completions with recorded rewards [1, 0, 1, 0].
fn rollouts(dir: &Path) -> std::path::PathBuf {
    let lines: String = (0..4)
        .map(|i| {
            let reward = [1.0, 0.0, 1.0, 0.0][i];
            let line = serde_json::json!({"prompt": "What is 2 + 2?", "completion": format!("{} is it", i + 3), "reward": reward});
            format!("{line}\n")
        })
        .collect();
    let path = dir.join("rollouts.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

/// `safe logprobs` of the rollouts under the built-in tiny model (the recipe's starting policy), at temperature 0.9.
fn logprobs(input: &Path, batch: usize) -> Vec<serde_json::Value> {
    let out = safe_cmd()
        .args(["logprobs", "--model", "builtin:tiny", "--input", input.to_str().unwrap(), "--temperature", "0.9"])
        .args(["--batch-size", &batch.to_string()])
        .output()
        .unwrap();
    ok(&out);
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Rewrite the rollouts with `old_logprobs` = `f(line, logprobs)`.
fn with_old(path: &Path, lp: &[serde_json::Value], f: impl Fn(usize, f64) -> serde_json::Value) {
    let text: String = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let old: Vec<serde_json::Value> = floats(&lp[i]["logprobs"]).into_iter().map(|x| f(i, x)).collect();
            v["old_logprobs"] = old.into();
            format!("{v}\n")
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

fn first_metrics(run: &Path) -> serde_json::Value {
    serde_json::from_str(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap()
}

#[test]
fn recorded_old_logprobs_replay_exactly_and_off_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = rollouts(dir.path());
    let lp = logprobs(&path, 8);
    assert_eq!(lp.len(), 4);
    for (line, one) in lp.iter().zip(logprobs(&path, 1)) {
        let (a, b) = (floats(&line["logprobs"]), floats(&one["logprobs"]));
        let n = line["completion_ids"].as_array().unwrap().len();
        assert_eq!((a.len(), floats(&line["entropies"]).len(), line["tokens"].as_array().unwrap().len()), (n, n, n));
        assert!(a.iter().all(|x| *x <= 0.0) && floats(&line["entropies"]).iter().all(|h| *h >= 0.0));
        // Alone or in a batch of 4, the same log-probs.
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        assert_eq!(line["prompt"], "What is 2 + 2?"); // the input's fields are echoed
    }
    let body = TINY
        .replace(
            "max_new_tokens = 6",
            "max_new_tokens = 16\ntemperature = 0.9\nsource = \"file\"\nfile = \"{dir}/rollouts.jsonl\"",
        )
        .replace("beta = 0.04\n", "")
        .replace("num_iterations = 2\n", "");
    let recipe = setup(dir.path(), &body, 5);
    let sets = ["run.max_steps=1", "rollout.prompts_per_step=1"];
    ok(&train(&recipe, &[&sets[..], &["run.name=plain"]].concat(), "never"));
    let plain = first_metrics(&dir.path().join("runs/plain"));
    // The model's own log-probs as the recorded ones: on-policy, the same step to float noise.
    with_old(&path, &lp, |_, x| x.into());
    ok(&train(&recipe, &[&sets[..], &["run.name=same"]].concat(), "never"));
    let same = first_metrics(&dir.path().join("runs/same"));
    assert!((same["loss"].as_f64().unwrap() - plain["loss"].as_f64().unwrap()).abs() < 1e-5, "{same} vs {plain}");
    assert_eq!(same["clip_ratio/region_mean"].as_f64(), Some(0.0));
    // Shifted: ρ = e^±1 per token. Completions 0 and 2 (A > 0) with ρ = e > 1.2 are clipped high; 1 and 3 (A < 0)
    // with ρ = e^−1 < 0.8 clipped low: both sides, which an on-policy step never is.
    with_old(&path, &lp, |i, x| (if i % 2 == 0 { x - 1.0 } else { x + 1.0 }).min(0.0).into());
    ok(&train(&recipe, &[&sets[..], &["run.name=shifted"]].concat(), "never"));
    let shifted = first_metrics(&dir.path().join("runs/shifted"));
    assert!(shifted["clip_ratio/low_mean"].as_f64().unwrap() > 0.0, "{shifted}");
    assert!(shifted["clip_ratio/high_mean"].as_f64().unwrap() > 0.0, "{shifted}");
    assert_eq!(plain["clip_ratio/low_mean"].as_f64(), Some(0.0));
}

#[test]
fn bad_old_logprobs_are_exit_2_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = rollouts(dir.path());
    let lp = logprobs(&path, 8);
    let body = TINY
        .replace("max_new_tokens = 6", "max_new_tokens = 16\nsource = \"file\"\nfile = \"{dir}/rollouts.jsonl\"")
        .replace("num_iterations = 2\n", "");
    let recipe = setup(dir.path(), &body, 5);
    let sets = ["run.max_steps=1", "rollout.prompts_per_step=1", "run.name=bad"];
    let expect = |what: &str| {
        let out = train(&recipe, &sets, "never");
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(what), "expected {what:?} in {}", stderr(&out));
    };
    // One value too few on line 2.
    let text = std::fs::read_to_string(&path).unwrap();
    with_old(&path, &lp, |_, x| x.into());
    let good = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<serde_json::Value> = good.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    lines[1]["old_logprobs"].as_array_mut().unwrap().pop();
    let write = |lines: &[serde_json::Value]| {
        std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap()
    };
    write(&lines);
    expect("rollouts.jsonl:2: `old_logprobs` has");
    // A non-number, and a positive log-prob.
    let mut bad = lines.clone();
    bad[1] = serde_json::from_str(good.lines().nth(1).unwrap()).unwrap();
    bad[1]["old_logprobs"][0] = "x".into();
    write(&bad);
    expect("rollouts.jsonl:2: `old_logprobs` must be a list of");
    bad[1]["old_logprobs"][0] = 0.5.into();
    write(&bad);
    expect("log-probs are ≤ 0");
    // On some lines only.
    let mut some: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    some[0] = serde_json::from_str(good.lines().next().unwrap()).unwrap();
    write(&some);
    expect("rollouts.jsonl:2: no `old_logprobs`, but other lines have them");
    // SAFE recomputes its rollout-time quantities: it refuses them.
    std::fs::write(&path, &good).unwrap();
    let safe = setup(
        dir.path(),
        &body.replace("[algorithm]\n", "[algorithm]\nkind = \"safe\"\n").replace("beta = 0.04\n", ""),
        5,
    );
    let out = train(
        &safe,
        &["run.max_steps=1", "rollout.prompts_per_step=1", "run.name=s", "algorithm.micro_batch_size=2"],
        "never",
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("which safe does not read"), "{}", stderr(&out));
}
