//! Helpers for tests that run `safe train`: recipes in a temporary directory, the binary, run-directory readers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A small GRPO recipe on the built-in tiny model: 2 prompts × 4 generations, 6 new tokens, β > 0 (a reference
/// model), μ = 2 (stored old log-probs), warm-up, two rewards. `{dir}` is replaced by the test's directory.
pub const TINY: &str = r#"
[run]
name = "t"
output_dir = "{dir}/runs"
max_steps = 6
save_every = 3
completions_every = 1

[model]
id = "builtin:tiny"

[data]
source = "{dir}/data.jsonl"
chat = false

[rollout]
prompts_per_step = 2
num_generations = 4
max_new_tokens = 6

[algorithm]
beta = 0.04
num_iterations = 2
micro_batch_size = 4

[optim]
lr = 3e-3
warmup_steps = 1
schedule = "constant"

[[reward]]
name = "correct"
rule = "exact_answer"

[[reward]]
name = "short"
rule = "length"
target = 3
weight = 0.1
"#;

/// `n` arithmetic-style prompts with answers.
pub fn data_lines(n: usize) -> String {
    (0..n).map(|i| format!("{{\"prompt\": \"What is {i} + 1?\", \"answer\": \"{}\"}}\n", i + 1)).collect()
}

/// Write `recipe.toml` (with `{dir}` filled in) and `data.jsonl` (`n` lines) into `dir`; returns the recipe path.
pub fn setup(dir: &Path, recipe: &str, n: usize) -> PathBuf {
    std::fs::write(dir.join("data.jsonl"), data_lines(n)).unwrap();
    let path = dir.join("recipe.toml");
    std::fs::write(&path, recipe.replace("{dir}", dir.to_str().unwrap())).unwrap();
    path
}

pub fn safe_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_safe"));
    c.env("RAYON_NUM_THREADS", "2");
    c
}

/// `safe train --config <recipe> --set ... --resume <resume>`.
pub fn train(recipe: &Path, sets: &[&str], resume: &str) -> Output {
    let mut c = safe_cmd();
    c.args(["train", "--config", recipe.to_str().unwrap(), "--resume", resume]);
    for s in sets {
        c.args(["--set", s]);
    }
    c.output().unwrap()
}

pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "safe failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The run's metrics lines without the wall-clock fields (`timing/*`, `tokens_per_second`).
pub fn metrics(run_dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(l).unwrap();
            let kept: Vec<String> = v
                .iter()
                .filter(|(k, _)| !k.starts_with("timing/") && *k != "tokens_per_second")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            kept.join(",")
        })
        .collect()
}

/// The bytes of a checkpoint's weights and optimizer state.
pub fn checkpoint_bytes(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (std::fs::read(dir.join("model.safetensors")).unwrap(), std::fs::read(dir.join("optimizer.safetensors")).unwrap())
}

pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step}"))
}
