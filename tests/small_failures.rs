//! The smaller findings of the hostile test (issue 13, finding 7), one regression test each.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::train::*;

fn safe(args: &[&str]) -> Output {
    safe_cmd().args(args).env("RUST_BACKTRACE", "1").output().unwrap()
}

fn assert_exit(out: &Output, code: i32, needles: &[&str]) {
    let e = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{e}");
    for n in needles {
        assert!(e.contains(n), "message lacks {n:?}: {e}");
    }
}

#[test]
fn generate_output_that_cannot_be_created_fails_before_generating() {
    // 4096 completions of 64 tokens would take a while: the bad --output must be found first, as bad input.
    let t = Instant::now();
    let out = safe(&[
        "generate",
        "--model",
        "builtin:tiny",
        "--prompt",
        "x",
        "--num-samples",
        "4096",
        "--max-new-tokens",
        "64",
        "--output",
        "/no/such/dir/out.jsonl",
    ]);
    assert_exit(&out, 2, &["--output: cannot create /no/such/dir/out.jsonl"]);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn logprobs_output_that_cannot_be_created_fails_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("r.jsonl");
    std::fs::write(&input, "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    let out =
        safe(&["logprobs", "--model", "builtin:tiny", "--input", input.to_str().unwrap(), "--output", "/no/such/x"]);
    assert_exit(&out, 2, &["--output: cannot create /no/such/x"]);
}

#[test]
fn candle_backtraces_stay_out_of_error_messages() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUFxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").unwrap();
    let out = safe(&["generate", "--model", bad.to_str().unwrap(), "--prompt", "x"]);
    assert_exit(&out, 2, &["bad.gguf is not a readable GGUF file", "unsupported magic"]);
    let e = stderr(&out);
    assert!(!e.contains("candle_core::") && !e.contains("   0: "), "a backtrace leaked: {e}");
}

#[test]
fn prompt_plus_completion_beyond_the_context_is_warned() {
    // builtin:tiny has a 1024-token context.
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    let out = train(&recipe, &["run.max_steps=1", "data.max_prompt_tokens=1020"], "never");
    ok(&out);
    assert!(stderr(&out).contains("= 1026 exceeds the model's context of 1024 tokens"), "{}", stderr(&out));
    let out = train(&recipe, &["run.max_steps=1", "run.name=fits"], "never");
    ok(&out);
    assert!(!stderr(&out).contains("exceeds the model's context"), "{}", stderr(&out));
}

#[test]
fn a_huge_jsonl_line_is_refused_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    let mut data = data_lines(2);
    data.push_str(&format!("{{\"prompt\": \"{}\", \"answer\": 1}}\n", "x".repeat(9 << 20)));
    std::fs::write(dir.path().join("data.jsonl"), data).unwrap();
    let out = train(&recipe, &[], "never");
    assert_exit(&out, 2, &["data.jsonl: cannot read it: line 3 is longer than 8 MiB"]);
}

#[test]
fn a_config_that_never_ends_is_refused() {
    let t = Instant::now();
    let out = safe(&["train", "--config", "/dev/zero"]);
    assert_exit(&out, 2, &["/dev/zero: is larger than 1 MiB: not a recipe"]);
    assert!(t.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_failed_checkpoint_write_leaves_no_temporary_behind() {
    // A write that fails half-way (here: an extra file name the checkpoint refuses, after the model is written; a
    // full disk fails the same way) must remove its `.tmp-step-*`, not leave it filling the disk.
    use safe::checkpoint::{self, SaveRequest};
    use safe::model::{LoadedModel, ModelSource};
    use safe::optim::{AdamW, AdamWConfig};
    let loaded = LoadedModel::load(
        &ModelSource::parse("builtin:tiny", None).unwrap(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let (model, tok) = loaded.into_model(true, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let opt = AdamW::new(model.vars().to_vec(), AdamWConfig::default()).unwrap();
    let run = tempfile::tempdir().unwrap();
    let state = serde_json::json!({});
    let extra = [("../escape.safetensors".to_string(), Vec::new())];
    let req = SaveRequest {
        step: 1,
        model: &model,
        tokenizer: tok.as_ref().unwrap(),
        optimizer: &opt,
        training_state: &state,
        extra_tensor_files: &extra,
    };
    let e = format!("{:#}", checkpoint::save(run.path(), &req, 3).unwrap_err());
    assert!(e.contains("(removed)") && e.contains("is not allowed"), "{e}");
    let left: Vec<_> =
        std::fs::read_dir(run.path().join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_failed_generate_leaves_an_existing_output_untouched() {
    // Regression: --output was created (truncated) before the model was even opened.
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("gen.out");
    std::fs::write(&out_file, "precious\n").unwrap();
    let out = safe(&["generate", "--model", "/no/such/model", "--prompt", "x", "--output", out_file.to_str().unwrap()]);
    assert_exit(&out, 2, &["/no/such/model"]);
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "precious\n");
    // A logprobs run whose --output is its own --input, refused for its input, keeps it too.
    let input = dir.path().join("lp.jsonl");
    std::fs::write(&input, "\n").unwrap();
    let out = safe(&[
        "logprobs",
        "--model",
        "builtin:tiny",
        "--input",
        input.to_str().unwrap(),
        "--output",
        input.to_str().unwrap(),
    ]);
    assert_exit(&out, 2, &["has no lines"]);
    assert_eq!(std::fs::read_to_string(&input).unwrap(), "\n");
    // A good run replaces the file, leaving no temporary behind.
    let out = safe(&[
        "generate",
        "--model",
        "builtin:tiny",
        "--prompt",
        "x",
        "--max-new-tokens",
        "4",
        "--output",
        out_file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_ne!(std::fs::read_to_string(&out_file).unwrap(), "precious\n");
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}
