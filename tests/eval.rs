//! Held-out evaluation: it changes nothing training does, gives the same numbers every time (and under resume),
//! `safe eval` on a checkpoint reproduces training's last evaluation, and bad [eval] keys are exit 2.

mod common;

use std::path::Path;

use common::train::*;

/// TINY evaluated on a held-out file of 3 prompts, 4 samples each at temperature 1, every 2 steps.
fn with_eval(extra: &str) -> String {
    format!(
        "{}\n[eval]\nsource = \"{{dir}}/held.jsonl\"\nevery = 2\nnum_samples = 4\ntemperature = 1.0\n{extra}\n",
        TINY.trim_end()
    )
}

fn setup_eval(dir: &Path, recipe: &str) -> std::path::PathBuf {
    let path = setup(dir, recipe, 5);
    let held: String =
        (0..3).map(|i| format!("{{\"prompt\": \"What is {i} + 2?\", \"answer\": \"{}\"}}\n", i + 2)).collect();
    std::fs::write(dir.join("held.jsonl"), held).unwrap();
    path
}

fn lines(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A metrics line without wall-clock fields and, with `drop_eval`, without evaluation fields.
fn training_part(line: &serde_json::Map<String, serde_json::Value>) -> Vec<(String, serde_json::Value)> {
    line.iter()
        .filter(|(k, _)| !k.starts_with("timing/") && *k != "tokens_per_second" && !k.starts_with("eval/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn evaluation_changes_nothing_training_does_and_runs_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup_eval(dir.path(), &with_eval(""));
    ok(&train(&recipe, &["run.name=with"], "never"));
    let plain = setup(dir.path(), TINY, 5);
    ok(&train(&plain, &["run.name=without"], "never"));
    let (with, without) = (lines(&dir.path().join("runs/with")), lines(&dir.path().join("runs/without")));

    // Step 0 (before training), 2, 4 and 6 (every = 2, and the end) carry eval metrics; the others none.
    let steps: Vec<u64> =
        with.iter().filter(|l| l.contains_key("eval/reward")).map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![0, 2, 4, 6]);
    assert_eq!(
        with[0].keys().filter(|k| !k.starts_with("eval/") && !k.starts_with("timing/")).count(),
        1,
        "{:?}",
        with[0]
    );
    for l in with.iter().filter(|l| l.contains_key("eval/reward")) {
        for k in
            ["eval/correct/mean", "eval/short/mean", "eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/mean_length"]
        {
            assert!(l.contains_key(k), "step {}: no {k} in {l:?}", l["step"]);
        }
        let p = |k: &str| l[k].as_f64().unwrap();
        assert!(p("eval/pass@1") <= p("eval/pass@2") && p("eval/pass@2") <= p("eval/pass@4"), "{l:?}");
        assert!((0.0..=1.0).contains(&p("eval/pass@4")));
    }
    // Training is the same step for step: evaluation draws on streams of its own.
    let with_training: Vec<_> = with[1..].iter().map(training_part).collect();
    let without_training: Vec<_> = without.iter().map(training_part).collect();
    assert_eq!(with_training, without_training);
    let run = dir.path().join("runs/with");
    assert_eq!(checkpoint_bytes(&step_dir(&run, 6)), checkpoint_bytes(&step_dir(&dir.path().join("runs/without"), 6)));
    // Each evaluation wrote its completions: 3 prompts × 4 samples.
    for step in [0, 2, 4, 6] {
        let text = std::fs::read_to_string(run.join(format!("completions/eval-step-{step}.jsonl"))).unwrap();
        assert_eq!(text.lines().count(), 12);
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for k in ["prompt", "completion", "rewards", "score", "passed", "finish_reason", "num_tokens"] {
            assert!(first.get(k).is_some(), "no {k} in {first}");
        }
    }
}

#[test]
fn resume_is_exact_with_evaluation_on() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup_eval(dir.path(), &with_eval(""));
    ok(&train(&recipe, &["run.name=straight"], "never"));
    ok(&train(&recipe, &["run.name=split", "run.max_steps=3"], "never"));
    ok(&train(&recipe, &["run.name=split"], "auto"));
    let (a, b) = (dir.path().join("runs/straight"), dir.path().join("runs/split"));
    let strip = |ls: Vec<serde_json::Map<String, serde_json::Value>>| {
        ls.iter()
            .map(|l| {
                l.iter()
                    .filter(|(k, _)| !k.starts_with("timing/") && *k != "tokens_per_second")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    let (la, lb) = (strip(lines(&a)), strip(lines(&b)));
    // The split run also evaluated at its first end (step 3): the only line that differs.
    let mut lb_without_3 = lb.clone();
    for l in lb_without_3.iter_mut() {
        if l.iter().any(|f| f == "step=3") {
            l.retain(|f| !f.starts_with("eval/"));
        }
    }
    assert_eq!(la, lb_without_3);
    assert_eq!(checkpoint_bytes(&step_dir(&a, 6)), checkpoint_bytes(&step_dir(&b, 6)));
    for step in [0, 2, 4, 6] {
        let f = format!("completions/eval-step-{step}.jsonl");
        assert_eq!(std::fs::read(a.join(&f)).unwrap(), std::fs::read(b.join(&f)).unwrap(), "{f} differs");
    }
}

#[test]
fn safe_eval_on_the_last_checkpoint_reproduces_trainings_last_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup_eval(dir.path(), &with_eval(""));
    ok(&train(&recipe, &[], "never"));
    let run = dir.path().join("runs/t");
    let last = lines(&run).pop().unwrap();
    let out = safe_cmd()
        .args(["eval", "--config", recipe.to_str().unwrap(), "--json", "--model"])
        .arg(step_dir(&run, 6))
        .arg("--output")
        .arg(dir.path().join("eval.jsonl"))
        .output()
        .unwrap();
    ok(&out);
    let got: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert!(got.contains_key("eval/pass@4"), "{got:?}");
    for (k, v) in &got {
        assert_eq!(Some(v), last.get(k), "{k}");
    }
    // The same completions too (the step field aside).
    let strip_step = |text: String| {
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("step");
                v
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip_step(std::fs::read_to_string(dir.path().join("eval.jsonl")).unwrap()),
        strip_step(std::fs::read_to_string(run.join("completions/eval-step-6.jsonl")).unwrap())
    );
}

#[test]
fn eval_split_holds_rows_out_of_training() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}\n[eval]\nsplit = 0.2\nmax_prompts = 1\n", TINY.trim_end());
    let recipe = setup(dir.path(), &body, 10);
    ok(&train(&recipe, &["run.max_steps=5", "run.save_every=0"], "never"));
    let run = dir.path().join("runs/t");
    let eval_prompts: std::collections::BTreeSet<String> =
        std::fs::read_to_string(run.join("completions/eval-step-0.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(eval_prompts.len(), 1, "eval.max_prompts = 1");
    // 5 steps × 2 prompts = the 8 training rows and then some: every trained prompt is a training row.
    let mut trained = std::collections::BTreeSet::new();
    for step in 1..=5 {
        for l in std::fs::read_to_string(run.join(format!("completions/step-{step}.jsonl"))).unwrap().lines() {
            trained
                .insert(serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(trained.len(), 8, "10 rows less the 2 held out: {trained:?}");
    assert!(trained.is_disjoint(&eval_prompts));
}

#[test]
fn bad_eval_keys_are_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 4] = [
        ("[eval]\nsplit = 0.1\nnum_samples = 4\n", "eval.num_samples"),
        ("[eval]\nsplit = 0.1\nreward = \"corect\"\n", "did you mean `correct`"),
        ("[eval]\nsplit = 0.1\nsource = \"{dir}/held.jsonl\"\n", "keep one of them"),
        ("[eval]\nsplit = 1.5\n", "eval.split"),
    ];
    for (table, expected) in cases {
        let recipe = setup_eval(dir.path(), &format!("{}\n{table}", TINY.trim_end()));
        let out = train(&recipe, &["run.name=bad"], "never");
        assert_eq!(out.status.code(), Some(2), "{table}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{table}: {}", stderr(&out));
        assert!(stderr(&out).contains("recipe.toml:"), "the message names the file and line: {}", stderr(&out));
    }
}

#[test]
fn safe_eval_with_a_missing_model_or_bad_recipe_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup_eval(dir.path(), &with_eval(""));
    let missing = dir.path().join("no-such-model");
    let out = safe_cmd()
        .args(["eval", "--config", recipe.to_str().unwrap(), "--model", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-model"), "{}", stderr(&out));
    let out = safe_cmd()
        .args(["eval", "--config", recipe.to_str().unwrap(), "--set", "eval.num_samples=0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("eval.num_samples"), "{}", stderr(&out));
}
