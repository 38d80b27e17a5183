//! `safe export`: a merged export equals the adapter forward (PEFT's own adapters against PEFT's
//! `merge_and_unload` logits, and a LoRA run's checkpoint against itself), in the checkpoint's dtype or `--dtype`;
//! an adapter export is the checkpoint's PEFT files unchanged; bad input is exit 2 naming what is wrong and writes
//! nothing.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::logits::{ids_of, logits_unpadded, max_abs_diff, rows_of};
use common::train::*;
use common::{assert_bad_input, safe};
use safe::model::{CausalLm, LoadedModel, ModelSource};

const TOL: f32 = 1e-5;

/// The base the LoRA runs here train on.
fn builtin_tiny() -> LoadedModel {
    LoadedModel::load(&ModelSource::parse("builtin:tiny", None).unwrap(), &Device::Cpu, DType::F32).unwrap()
}

fn load(dir: &Path) -> CausalLm {
    let src = ModelSource::Dir(dir.to_path_buf());
    LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap().into_model(false, &Device::Cpu, DType::F32).unwrap().0
}

/// A model directory holding a tiny fixture base and PEFT's adapter for it (tests/fixtures/peft).
fn base_with_peft_adapter(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(format!("{name}-with-adapter"));
    std::fs::create_dir(&out).unwrap();
    let base = common::fixture(&format!("tiny/{name}"));
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(base.join(f), out.join(f)).unwrap();
    }
    let adapter = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/peft/{name}/adapter"));
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(f), out.join(f)).unwrap();
    }
    out
}

fn export(args: &[&str]) -> std::process::Output {
    let mut all = vec!["export"];
    all.extend_from_slice(args);
    safe(&all)
}

fn merged_equals_peft_merge(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = base_with_peft_adapter(dir.path(), name);
    let out = dir.path().join("merged");
    let o = export(&[src.to_str().unwrap(), "--merge", out.to_str().unwrap()]);
    ok(&o);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), out.to_str().unwrap());
    // A plain model: no adapter files, weights only (the fixture base has no tokenizer), f32 as the base.
    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["config.json", "generation_config.json", "model.safetensors"]);
    assert_eq!(common::read_json(&out.join("config.json"))["dtype"], "float32");
    let merged = load(&out);
    assert!(merged.lora().is_none());
    let reference = common::read_json(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/peft/{name}/logits.json")),
    );
    let seqs = reference["sequences"].as_array().unwrap();
    let first = ids_of(&seqs[0]["input_ids"]);
    let vs_peft_merged = max_abs_diff(&logits_unpadded(&merged, &first), &rows_of(&reference["merged_first_logits"]));
    let mut vs_adapter = 0.0f32;
    let adapted = load(&src);
    assert!(adapted.lora().is_some());
    for seq in seqs {
        let ids = ids_of(&seq["input_ids"]);
        vs_adapter = vs_adapter.max(max_abs_diff(&logits_unpadded(&merged, &ids), &logits_unpadded(&adapted, &ids)));
        vs_adapter = vs_adapter.max(max_abs_diff(&logits_unpadded(&merged, &ids), &rows_of(&seq["logits"])));
    }
    eprintln!(
        "{name}: merged export vs PEFT merge_and_unload {vs_peft_merged:e}, vs the adapter forward {vs_adapter:e}"
    );
    assert!(vs_peft_merged < TOL && vs_adapter < TOL, "{name}: {vs_peft_merged} / {vs_adapter}");
}

#[test]
fn merged_export_of_peft_llama_adapter_equals_peft_merge_and_unload() {
    merged_equals_peft_merge("tiny-llama");
}

#[test]
fn merged_export_of_peft_qwen2_rslora_adapter_equals_peft_merge_and_unload() {
    merged_equals_peft_merge("tiny-qwen2");
}

const LORA: &str = "\n[lora]\nrank = 4\nalpha = 8.0\ntargets = [\"all-linear\"]\n";

/// A 3-step LoRA run on the built-in tiny model (its adapters' B no longer zero); returns the run directory.
fn lora_run(dir: &Path) -> PathBuf {
    let recipe = setup(dir, &format!("{TINY}{LORA}"), 5);
    ok(&train(&recipe, &["run.max_steps=3"], "never"));
    dir.join("runs/t")
}

#[test]
fn merged_export_of_a_lora_run_equals_its_adapter_forward_in_its_dtype_or_another() {
    let dir = tempfile::tempdir().unwrap();
    let run = lora_run(dir.path());
    let ckpt = step_dir(&run, 3);
    // The run directory means its newest complete checkpoint.
    let out = dir.path().join("out/merged");
    let o = export(&[run.to_str().unwrap(), "--merge", out.to_str().unwrap()]);
    ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("step-3") && stderr.contains("merged model (f32)"), "{stderr}");
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    for f in ["adapter_config.json", "adapter_model.safetensors", "state.json", "optimizer.safetensors"] {
        assert!(!out.join(f).exists(), "{f} is not part of a merged model");
    }
    let (merged, adapted) = (load(&out), load(&ckpt));
    assert!(merged.lora().is_none() && adapted.lora().is_some());
    let ids: Vec<u32> = vec![1, 17, 200, 42, 7, 99, 254, 3, 11, 64];
    let diff = max_abs_diff(&logits_unpadded(&merged, &ids), &logits_unpadded(&adapted, &ids));
    let base = builtin_tiny().into_model(false, &Device::Cpu, DType::F32).unwrap().0;
    let trained = max_abs_diff(&logits_unpadded(&base, &ids), &logits_unpadded(&adapted, &ids));
    eprintln!(
        "builtin:tiny LoRA run: merged export vs adapter forward {diff:e} (the adapters moved the logits {trained:e})"
    );
    assert!(diff < TOL, "{diff}");
    assert!(trained > 1e-3, "the adapters did not train: {trained}");
    // The merged model generates like the checkpoint (greedy): the CLI opens it as any model directory.
    let gen = |m: &Path| {
        let o = safe(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "What is 2 + 1?",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ]);
        ok(&o);
        o.stdout
    };
    assert_eq!(gen(&out), gen(&ckpt));

    // --dtype bf16: bf16 tensors, config.json says so, and the logits are the f32 merge's within bf16 rounding.
    let bf16 = dir.path().join("merged-bf16");
    ok(&export(&[ckpt.to_str().unwrap(), "--merge", bf16.to_str().unwrap(), "--dtype", "bf16"]));
    assert_eq!(common::read_json(&bf16.join("config.json"))["dtype"], "bfloat16");
    let tensors = candle_core::safetensors::load(bf16.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.values().all(|t| t.dtype() == DType::BF16));
    let rounded = max_abs_diff(&logits_unpadded(&load(&bf16), &ids), &logits_unpadded(&merged, &ids));
    assert!(rounded > 0.0 && rounded < 0.05, "bf16 merge vs f32 merge: {rounded}");
}

#[test]
fn adapter_export_is_the_checkpoints_peft_files_and_applies_to_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let run = lora_run(dir.path());
    let ckpt = step_dir(&run, 3);
    let out = dir.path().join("adapter");
    // An empty directory may be the target.
    std::fs::create_dir(&out).unwrap();
    let o = export(&[ckpt.to_str().unwrap(), "--adapter", out.to_str().unwrap()]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("PEFT adapter"));
    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"]);
    for f in &files {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(ckpt.join(f)).unwrap(), "{f}");
    }
    let base = builtin_tiny()
        .with_adapter_dir(&out, &Device::Cpu, DType::F32)
        .unwrap()
        .into_model(false, &Device::Cpu, DType::F32)
        .unwrap()
        .0;
    let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    assert_eq!(logits_unpadded(&base, &ids), logits_unpadded(&load(&ckpt), &ids));
}

#[test]
fn bad_exports_are_exit_2_naming_the_problem_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = lora_run(dir.path());
    let ckpt = step_dir(&run, 3);
    let c = ckpt.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    // A non-empty output directory is left as it is.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    assert_bad_input(&export(&[c, "--merge", o]), &["already exists and is not an empty directory", o]);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    std::fs::remove_dir_all(&out).unwrap();
    // Exactly one of --merge and --adapter; --dtype only with --merge; a dtype export writes.
    assert_bad_input(&export(&[c, "--merge", o, "--adapter", o]), &["--merge"]);
    assert_bad_input(&export(&[c]), &["--merge"]);
    assert_bad_input(&export(&[c, "--adapter", o, "--dtype", "bf16"]), &["--dtype"]);
    assert_bad_input(&export(&[c, "--merge", o, "--dtype", "int8"]), &["expected f32, bf16 or f16"]);
    // Nothing there, inside the checkpoint itself, a run without adapters.
    let missing = dir.path().join("nope");
    assert_bad_input(&export(&[missing.to_str().unwrap(), "--merge", o]), &["is not a directory"]);
    let inside = ckpt.join("merged");
    assert_bad_input(&export(&[c, "--merge", inside.to_str().unwrap()]), &["is inside"]);
    let full = tempfile::tempdir().unwrap();
    let recipe = setup(full.path(), TINY, 5);
    ok(&train(&recipe, &["run.max_steps=1", "run.save_every=1"], "never"));
    let plain = step_dir(&full.path().join("runs/t"), 1);
    assert_bad_input(&export(&[plain.to_str().unwrap(), "--adapter", o]), &["holds no LoRA adapters"]);
    assert_bad_input(&export(&[plain.to_str().unwrap(), "--merge", o]), &["holds no LoRA adapters", "--dtype"]);
    // A damaged checkpoint is refused by its digests, not exported.
    let adapters = ckpt.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&adapters).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&adapters, bytes).unwrap();
    assert_bad_input(&export(&[c, "--adapter", o]), &["adapter_model.safetensors", "SHA-256"]);
    assert!(!out.exists(), "a refused export wrote {}", out.display());
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(".tmp-")),
        "a temporary directory was left behind"
    );
}

/// A full fine-tuning checkpoint has nothing to merge; `--merge OUT --dtype bf16` writes its weights in bf16 (a bf16
/// run's checkpoint holds f32 master weights), which load and compute what the weights rounded to bf16 compute.
#[test]
fn plain_checkpoint_exports_in_another_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    ok(&train(&recipe, &["run.max_steps=1", "run.save_every=1", "model.dtype=bf16"], "never"));
    let ckpt = step_dir(&dir.path().join("runs/t"), 1);
    let out = dir.path().join("bf16");
    ok(&export(&[ckpt.to_str().unwrap(), "--merge", out.to_str().unwrap(), "--dtype", "bf16"]));
    let masters = candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu).unwrap();
    let copy = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(masters.len(), copy.len());
    for (name, t) in &masters {
        let c = &copy[name];
        assert_eq!((t.dtype(), c.dtype()), (DType::F32, DType::BF16), "{name}");
        let want: Vec<half::bf16> = t.to_dtype(DType::BF16).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(c.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(), want, "{name}");
    }
    let config = common::read_json(&out.join("config.json"));
    assert_eq!(config["torch_dtype"].as_str().or(config["dtype"].as_str()), Some("bfloat16"));
}
