//! `safe generate` end to end through the binary: outputs, and exit code 2 with a message naming the file for
//! every kind of bad model or prompt input.

mod common;

use common::assert_bad_input;

use std::path::Path;
use std::process::{Command, Output};

fn safe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_safe"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run safe")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// tiny-llama's weights with the built-in byte tokenizer saved beside them: a complete HF directory.
fn tiny_model_dir(to: &Path) {
    copy_dir(&common::fixture("tiny/tiny-llama"), to);
    let cfg = safe::model::builtin::config("tiny").unwrap();
    safe::model::builtin::tokenizer(&cfg, "test").unwrap().save(to).unwrap();
}

#[test]
fn builtin_model_generates_text_and_jsonl() {
    let out = safe(&["generate", "--model", "builtin:tiny", "--prompt", "2+3=", "--max-new-tokens", "5"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = safe(
        &["generate", "--model", "builtin:tiny", "--prompt", "hi", "--chat", "--num-samples", "3", "--format", "jsonl"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["sample_index"], i);
        assert!(l["prompt"].as_str().unwrap().starts_with("<|im_start|>user\nhi<|im_end|>"));
        assert!(["eos", "stop", "length"].contains(&l["finish_reason"].as_str().unwrap()));
        assert_eq!(l["num_tokens"].as_u64().unwrap() as usize, l["token_ids"].as_array().unwrap().len());
    }
}

#[test]
fn smollm2_gguf_answers_greedily() {
    let gguf = common::smollm2_gguf();
    let out = safe(
        &[
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("Paris"), "{}", stdout(&out));
}

#[test]
fn input_jsonl_prompts_and_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("p.jsonl");
    std::fs::write(&good, "{\"prompt\": \"a\"}\n\n{\"prompt\": [{\"role\": \"user\", \"content\": \"b\"}]}\n").unwrap();
    let out = safe(
        &[
            "generate",
            "--model",
            "builtin:tiny",
            "--input",
            good.to_str().unwrap(),
            "--format",
            "jsonl",
            "--max-new-tokens",
            "3",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\"}\n{\"prompt\": \n").unwrap();
    let out = safe(&["generate", "--model", "builtin:tiny", "--input", bad.to_str().unwrap()], &[]);
    assert_bad_input(&out, &["bad.jsonl:2", "not valid JSON"]);
    std::fs::write(&bad, "{\"text\": \"a\"}\n").unwrap();
    let out = safe(&["generate", "--model", "builtin:tiny", "--input", bad.to_str().unwrap()], &[]);
    assert_bad_input(&out, &["bad.jsonl:1", "`prompt`"]);
}

#[test]
fn bad_models_exit_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let gen = |model: &str| safe(&["generate", "--model", model, "--prompt", "x"], &[]);
    // Missing config.json.
    let no_cfg = dir.path().join("no-config");
    std::fs::create_dir_all(&no_cfg).unwrap();
    std::fs::copy(common::fixture("tiny/tiny-llama/model.safetensors"), no_cfg.join("model.safetensors")).unwrap();
    assert_bad_input(&gen(no_cfg.to_str().unwrap()), &["no-config", "config.json"]);
    // Truncated safetensors.
    let cut = dir.path().join("cut");
    tiny_model_dir(&cut);
    let w = cut.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 3]).unwrap();
    assert_bad_input(&gen(cut.to_str().unwrap()), &["model.safetensors", "truncated"]);
    // Truncated GGUF.
    let g = dir.path().join("half.gguf");
    let bytes = std::fs::read(common::smollm2_gguf()).unwrap();
    std::fs::write(&g, &bytes[..bytes.len() / 2]).unwrap();
    assert_bad_input(&gen(g.to_str().unwrap()), &["half.gguf", "truncated"]);
    // Unsupported architecture.
    let arch = dir.path().join("gpt2");
    tiny_model_dir(&arch);
    let cfg = arch.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&cfg, text).unwrap();
    assert_bad_input(&gen(arch.to_str().unwrap()), &["GPT2LMHeadModel", "supported", "config.json"]);
    // A weights-only directory has no tokenizer.
    assert_bad_input(&gen(common::fixture("tiny/tiny-llama").to_str().unwrap()), &["tiny-llama", "tokenizer"]);
    // Unknown built-in.
    assert_bad_input(&gen("builtin:huge"), &["builtin:huge", "available"]);
}

#[test]
fn hub_ids_resolve_offline_from_the_cache_or_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let snap = cache.join("models--tiny-org--tiny-chat").join("snapshots").join(commit);
    tiny_model_dir(&snap);
    std::fs::create_dir_all(cache.join("models--tiny-org--tiny-chat/refs")).unwrap();
    std::fs::write(cache.join("models--tiny-org--tiny-chat/refs/main"), commit).unwrap();
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let out = safe(&["generate", "--model", "tiny-org/tiny-chat", "--prompt", "hello", "--max-new-tokens", "4"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // HF_HOME/hub is the cache when HF_HUB_CACHE is unset.
    let env_home = [("HF_HOME", dir.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let out =
        safe(&["generate", "--model", "tiny-org/tiny-chat", "--prompt", "hello", "--max-new-tokens", "4"], &env_home);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = safe(&["generate", "--model", "tiny-org/absent", "--prompt", "hello"], &env);
    assert_bad_input(&out, &["tiny-org/absent", "HF_HUB_OFFLINE", "not in the cache"]);
}
