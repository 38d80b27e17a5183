//! Exact resume: a run that is stopped and continued ends bit for bit where an uninterrupted run ends (weights,
//! optimizer moments, metrics lines, completions), whether it is continued with `--resume auto`, from a checkpoint
//! directory, after SIGKILL at arbitrary moments, or after SIGINT; also when the stop falls on an epoch boundary.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::train::*;

/// 6 steps straight vs 3 steps + `--resume auto` (with run.max_steps raised, a key that may change) + 3 steps.
fn three_plus_three_equals_six(examples: usize) {
    three_plus_three_equals_six_with(examples, TINY);
}

fn three_plus_three_equals_six_with(examples: usize, body: &str) {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), body, examples);
    ok(&train(&recipe, &["run.name=straight"], "never"));
    ok(&train(&recipe, &["run.name=split", "run.max_steps=3"], "never"));
    let out = train(&recipe, &["run.name=split"], "auto");
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("resuming:   from"), "the second half must resume");

    let (a, b) = (dir.path().join("runs/straight"), dir.path().join("runs/split"));
    assert_eq!(checkpoint_bytes(&step_dir(&a, 6)), checkpoint_bytes(&step_dir(&b, 6)), "weights/optimizer differ");
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), 6);
    assert_eq!(ma, mb);
    for step in 1..=6 {
        let f = format!("completions/step-{step}.jsonl");
        assert_eq!(std::fs::read(a.join(&f)).unwrap(), std::fs::read(b.join(&f)).unwrap(), "{f} differs");
    }
    // The run really trained: the weights moved from the built-in initialisation.
    let first = checkpoint_bytes(&step_dir(&a, 3)).0;
    assert_ne!(first, checkpoint_bytes(&step_dir(&a, 6)).0);
}

#[test]
fn resume_auto_three_plus_three_equals_six_steps() {
    // 5 examples, 2 prompts a step: the third step takes the last example of epoch 0 and the first of epoch 1.
    three_plus_three_equals_six(5);
}

#[test]
fn resume_auto_exactly_on_an_epoch_boundary() {
    // 6 examples, 2 prompts a step: the checkpoint after step 3 sits exactly at (epoch 1, cursor 0).
    three_plus_three_equals_six(6);
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 6);
    ok(&train(&recipe, &["run.max_steps=3"], "never"));
    let state = common::read_json(&step_dir(&dir.path().join("runs/t"), 3).join("state.json"));
    assert_eq!(state["training"]["sampler"], serde_json::json!({"epoch": 1, "cursor": 0}));
}

/// TINY with a G-RA gate on its length reward and a `[shaping]` table.
fn shaped(shaping: &str) -> String {
    format!("{}\ngate = {{ on = \"correct\", min = 1.0 }}\n\n[shaping]\n{shaping}\n", TINY.trim_end())
}

#[test]
fn resume_is_exact_with_par_references_and_gates() {
    // PAR's references are sampled once per prompt and kept in the checkpoint.
    three_plus_three_equals_six_with(5, &shaped("kind = \"par\"\nmax_refs = 2"));
}

#[test]
fn resume_is_exact_with_bf16_rollout_weights() {
    // The bf16 decoding copies are remade from the weights at every rollout, so a resumed run samples alike.
    three_plus_three_equals_six_with(
        5,
        &TINY.replace("max_new_tokens = 6\n", "max_new_tokens = 6\nweights = \"bf16\"\n"),
    );
}

#[test]
fn resume_is_exact_with_bf16_master_weights() {
    // model.dtype = "bf16": the checkpoint holds the f32 master weights the bf16 forwards cast from.
    three_plus_three_equals_six_with(
        5,
        &TINY.replace("id = \"builtin:tiny\"\n", "id = \"builtin:tiny\"\ndtype = \"bf16\"\n"),
    );
}

#[test]
fn resume_is_exact_with_running_shaping_statistics() {
    three_plus_three_equals_six_with(5, &shaped("kind = \"meanstd\"\nceil = 1.0"));
}

#[test]
fn resume_from_a_checkpoint_directory_with_a_linear_schedule() {
    // Linear decay depends on max_steps, so here the recipe stays the same and the run is continued from step 3's
    // directory: the later checkpoint is moved aside (never deleted), metrics after step 3 are dropped, and the
    // re-run steps reproduce it exactly.
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &TINY.replace("schedule = \"constant\"", "schedule = \"linear\""), 5);
    ok(&train(&recipe, &[], "never"));
    let run = dir.path().join("runs/t");
    let before = (checkpoint_bytes(&step_dir(&run, 6)), metrics(&run));
    let out = train(&recipe, &[], step_dir(&run, 3).to_str().unwrap());
    ok(&out);
    let kept = run.join("checkpoints/superseded-step-6");
    assert!(kept.join("model.safetensors").is_file(), "the later checkpoint must be kept aside");
    assert!(stderr(&out).contains("superseded-step-6"), "{}", stderr(&out));
    assert_eq!(checkpoint_bytes(&kept), before.0);
    assert_eq!((checkpoint_bytes(&step_dir(&run, 6)), metrics(&run)), before);
    assert_eq!(std::fs::read_to_string(run.join("checkpoints/latest")).unwrap().trim(), "step-6");
}

fn latest_step(run: &Path) -> Option<u64> {
    let name = std::fs::read_to_string(run.join("checkpoints/latest")).ok()?;
    name.trim().strip_prefix("step-")?.parse().ok()
}

#[test]
fn sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    // Longer completions make a step long enough to be killed inside it.
    let body = TINY
        .replace("max_steps = 6", "max_steps = 8")
        .replace("save_every = 3", "save_every = 1")
        .replace("max_new_tokens = 6", "max_new_tokens = 48");
    let recipe = setup(dir.path(), &body, 5);
    ok(&train(&recipe, &["run.name=straight"], "never"));
    let run = dir.path().join("runs/killed");
    let set = |resume: &str| {
        let mut c = safe_cmd();
        c.args(["train", "--config", recipe.to_str().unwrap(), "--set", "run.name=killed", "--resume", resume]);
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        c
    };
    // Kill at staggered moments after the newest checkpoint moves: mid-step, mid-save, wherever it lands.
    let mut first = true;
    let mut killed_running = 0;
    for delay_ms in [0u64, 7, 23, 41] {
        let mut child = set(if first { "never" } else { "auto" }).spawn().unwrap();
        first = false;
        let seen = latest_step(&run);
        let t = Instant::now();
        while latest_step(&run) == seen && t.elapsed() < Duration::from_secs(120) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed_running += 1;
        }
        child.wait().unwrap();
        if latest_step(&run) == Some(8) {
            break;
        }
    }
    assert!(killed_running >= 2, "only {killed_running} kills landed while training");
    let out = set("auto").output().unwrap();
    ok(&out);
    let straight = dir.path().join("runs/straight");
    assert_eq!(checkpoint_bytes(&step_dir(&run, 8)), checkpoint_bytes(&step_dir(&straight, 8)));
    assert_eq!(metrics(&run), metrics(&straight));
}

#[test]
fn sigint_saves_the_last_step_and_exits_130_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let body = TINY.replace("max_steps = 6", "max_steps = 100000").replace("save_every = 3", "save_every = 0");
    let recipe = setup(dir.path(), &body, 5);
    let child = safe_cmd()
        .args(["train", "--config", recipe.to_str().unwrap(), "--resume", "never"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run = dir.path().join("runs/t");
    let t = Instant::now();
    while metrics_lines(&run) < 2 {
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("--resume auto"), "{}", stderr(&out));
    let done = metrics_lines(&run) as u64;
    assert_eq!(latest_step(&run), Some(done), "the checkpoint is of the last finished step");
    let out = train(&recipe, &[&format!("run.max_steps={}", done + 1)], "auto");
    ok(&out);
    assert_eq!(latest_step(&run), Some(done + 1));
}

fn metrics_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}
