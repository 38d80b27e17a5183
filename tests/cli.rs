//! The `safe` binary: exit codes and messages of `check`, `train` and `--help`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::safe;

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/example.toml")
}

fn write_recipe(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("recipe.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn check_accepts_the_example_and_prints_the_resolved_recipe() {
    let out = safe(&["check", "--config", example().to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("[rollout]") && stdout.contains("max_new_tokens = 16"), "{stdout}");
    // The printed recipe is itself a valid recipe.
    let dir = tempfile::tempdir().unwrap();
    let p = write_recipe(dir.path(), &stdout);
    let again = safe(&["check", "--config", p.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again).1);
    assert_eq!(text(&again).0, stdout);
}

#[test]
fn check_set_good_value_changes_the_resolved_recipe() {
    let out = safe(&["check", "--config", example().to_str().unwrap(), "--set", "rollout.max_new_tokens=99"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    assert!(text(&out).0.contains("max_new_tokens = 99"));
}

#[test]
fn check_set_wrong_type_exits_2_naming_the_argument() {
    let out = safe(&["check", "--config", example().to_str().unwrap(), "--set", "rollout.max_new_tokens=lots"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains("--set `rollout.max_new_tokens=lots`") && stderr.contains("must be an integer"),
        "{stderr}"
    );
}

#[test]
fn check_bad_recipe_exits_2_with_file_line_and_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let body = std::fs::read_to_string(example()).unwrap().replace("max_new_tokens = 16", "max_new_token = 16");
    let line = body.lines().position(|l| l.starts_with("max_new_token")).unwrap() + 1;
    let p = write_recipe(dir.path(), &body);
    let out = safe(&["check", "--config", p.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains(&format!(
            "recipe.toml:{line}: unknown key `rollout.max_new_token`; did you mean `max_new_tokens`?"
        )),
        "{stderr}"
    );
}

/// A GRPO-only key under `kind = "ppo"` is refused with the key's line and the algorithms that read it.
#[test]
fn check_grpo_only_key_under_ppo_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let body = std::fs::read_to_string(example()).unwrap();
    assert!(body.contains("kind = \"grpo\"\n"));
    let body = body.replace("kind = \"grpo\"\n", "kind = \"ppo\"\nnum_iterations = 2\n");
    let line = body.lines().position(|l| l.starts_with("num_iterations")).unwrap() + 1;
    let p = write_recipe(dir.path(), &body);
    let out = safe(&["check", "--config", p.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "recipe.toml:{line}: `algorithm.num_iterations` only applies when `algorithm.kind` is \"grpo\" or \
             \"grpo_lambda\" or \"rloo\", but `algorithm.kind` = \"ppo\""
        )),
        "{stderr}"
    );
}

#[test]
fn check_missing_file_exits_2() {
    let out = safe(&["check", "--config", "/nonexistent/recipe.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("/nonexistent/recipe.toml"));
}

#[test]
fn check_explain_lists_every_key_without_a_config() {
    let out = safe(&["check", "--explain"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    let stdout = text(&out).0;
    for k in safe::recipe::schema::KEYS {
        assert!(stdout.contains(k.path), "{} missing", k.path);
    }
    let md = safe(&["check", "--explain", "--markdown"]);
    assert_eq!(text(&md).0, safe::recipe::explain(true));
}

#[test]
fn train_prints_the_batch_arithmetic_then_trains() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = format!("run.output_dir={}", dir.path().display());
    let cfg = example();
    let out = safe(&["train", "--config", cfg.to_str().unwrap(), "--set", &out_dir, "--set", "run.max_steps=1"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("4 prompts × 4 generations = 16 completions per step"), "{stdout}");
    assert!(stdout.contains("micro-batches: 2 of 8"), "{stdout}");
    assert!(stdout.contains("step     1 | reward"), "{stdout}");
    assert!(dir.path().join("example/checkpoints/step-1/model.safetensors").is_file());
    // A bad recipe is a 2, before anything else.
    let out = safe(&["train", "--config", cfg.to_str().unwrap(), "--set", "algorithm.micro_batch_size=3"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("algorithm.micro_batch_size") && stderr.contains("rollout.prompts_per_step"), "{stderr}");
}

#[test]
fn help_documents_exit_codes_and_usage_errors_exit_2() {
    let out = safe(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out).0;
    assert!(
        stdout.contains("Exit codes:") && stdout.contains("130") && stdout.contains("nothing was trained"),
        "{stdout}"
    );
    for sub in ["train", "check", "generate"] {
        let out = safe(&[sub, "--help"]);
        assert_eq!(out.status.code(), Some(0));
        assert!(text(&out).0.contains("Example"), "{sub} --help has no example");
    }
    assert_eq!(safe(&["--version"]).status.code(), Some(0));
    assert_eq!(safe(&["train"]).status.code(), Some(2)); // --config missing
    assert_eq!(safe(&["bogus"]).status.code(), Some(2));
    assert_eq!(safe(&["generate", "--model", "x"]).status.code(), Some(2)); // neither --prompt nor --input
    assert_eq!(safe(&["generate", "--model", "x", "--prompt", "p", "--top-p", "0"]).status.code(), Some(2));
}
