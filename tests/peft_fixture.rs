//! PEFT LoRA adapters (tests/fixtures/peft, made by scripts/make-peft-fixture.py): our forward with PEFT's own
//! adapters on the tiny Llama and Qwen2 matches PEFT's logits (every position, a left-padded batch, the merged
//! model), `safe logprobs --adapter` end to end, the adapter our checkpoint code exports loads in PEFT unchanged
//! and gives our logits, and a bad adapter is exit 2 naming the file and the key.

mod common;

use common::logits::{ids_of, logits_unpadded, max_abs_diff, rows_of};
use common::{assert_bad_input, safe};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Device, Tensor, D};
use safe::model::lora::LoraSpec;
use safe::model::{attention_mask, positions_from_mask, CausalLm, LoadedModel, ModelSource};
use safe::optim::{AdamW, AdamWConfig};
use serde_json::Value;

const TOL: f32 = 1e-5;

fn peft_fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft").join(rel)
}

fn base(name: &str) -> LoadedModel {
    let dir = common::fixture(&format!("tiny/{name}"));
    let src = ModelSource::parse(dir.to_str().unwrap(), None).unwrap();
    LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap()
}

fn with_adapter(name: &str, adapter: &Path) -> CausalLm {
    let loaded = base(name).with_adapter_dir(adapter, &Device::Cpu, DType::F32).unwrap();
    loaded.into_model(false, &Device::Cpu, DType::F32).unwrap().0
}

/// The real rows of `b` left-padded (id 0) to `a`'s length in a batch of two.
fn logits_left_padded_second(model: &CausalLm, a: &[u32], b: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let pad = a.len() - b.len();
    let valid = vec![vec![true; a.len()], [vec![false; pad], vec![true; b.len()]].concat()];
    let batch: Vec<u32> = a.iter().copied().chain(std::iter::repeat_n(0, pad)).chain(b.iter().copied()).collect();
    let input = Tensor::from_vec(batch, (2, a.len()), &dev).unwrap();
    let pos = Tensor::new(positions_from_mask(&valid), &dev).unwrap();
    let mask = attention_mask(&valid, a.len(), None, &dev).unwrap();
    let logits = model.forward(&input, &pos, &mask, None).unwrap();
    logits.get(1).unwrap().narrow(0, pad, b.len()).unwrap().to_vec2().unwrap()
}

/// Our forward with PEFT's adapter against PEFT's logits; returns the largest difference.
fn check_peft_adapter(name: &str) -> f32 {
    let model = with_adapter(name, &peft_fixture(&format!("{name}/adapter")));
    assert!(model.lora().is_some());
    let reference = common::read_json(&peft_fixture(&format!("{name}/logits.json")));
    let seqs = reference["sequences"].as_array().unwrap();
    let mut worst = 0.0f32;
    for seq in seqs {
        let ids = ids_of(&seq["input_ids"]);
        worst = worst.max(max_abs_diff(&logits_unpadded(&model, &ids), &rows_of(&seq["logits"])));
    }
    let (a, b) = (ids_of(&seqs[0]["input_ids"]), ids_of(&seqs[1]["input_ids"]));
    let padded = logits_left_padded_second(&model, &a, &b);
    worst = worst.max(max_abs_diff(&padded, &rows_of(&reference["left_padded_second_row_logits"])));
    // merge_and_unload's model gives the same logits: what we compute is the merged model's function too.
    worst = worst.max(max_abs_diff(&logits_unpadded(&model, &a), &rows_of(&reference["merged_first_logits"])));
    assert!(worst < TOL, "{name}: max |ours - PEFT| = {worst}");
    // The adapter matters: the base alone is far from these logits.
    let plain = base(name).into_model(false, &Device::Cpu, DType::F32).unwrap().0;
    let off = max_abs_diff(&logits_unpadded(&plain, &a), &rows_of(&seqs[0]["logits"]));
    assert!(off > 0.1, "{name}: the adapter changes the logits by only {off}");
    eprintln!("{name}: max |ours - PEFT| = {worst:e}");
    worst
}

#[test]
fn peft_llama_adapter_matches_peft_logits() {
    check_peft_adapter("tiny-llama");
}

#[test]
fn peft_qwen2_rslora_adapter_matches_peft_logits() {
    let model = with_adapter("tiny-qwen2", &peft_fixture("tiny-qwen2/adapter"));
    let spec = model.lora().unwrap();
    assert!(spec.rslora);
    assert_eq!((spec.rank, spec.alpha), (6, 5.0));
    assert_eq!(spec.targets, ["q_proj", "k_proj", "o_proj", "gate_proj"]);
    check_peft_adapter("tiny-qwen2");
}

// --- the binary ---------------------------------------------------------------------------------------------------

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// tiny-llama with the built-in byte tokenizer beside it, so `safe logprobs` can run on it.
fn tiny_llama_with_tokenizer(tmp: &Path) -> PathBuf {
    let dir = tmp.join("tiny-llama");
    copy_dir(&common::fixture("tiny/tiny-llama"), &dir);
    let cfg = base("tiny-llama").config;
    safe::model::builtin::tokenizer(&cfg, "builtin").unwrap().save(&dir).unwrap();
    dir
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|&x| x as f64 - lse).collect()
}

#[test]
fn logprobs_cli_with_adapter_gives_peft_logprobs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama_with_tokenizer(tmp.path());
    // The fixture's second sequence [1, 5, 6, 7, 8]: prompt [1, 5], completion [6, 7, 8].
    let reference = common::read_json(&peft_fixture("tiny-llama/logits.json"));
    let seq = &reference["sequences"][1];
    let ids = ids_of(&seq["input_ids"]);
    let rows = rows_of(&seq["logits"]);
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, format!("{}\n", serde_json::json!({"prompt_ids": &ids[..2], "completion_ids": &ids[2..]})))
        .unwrap();
    let adapter = peft_fixture("tiny-llama/adapter");
    let out = safe(&[
        "logprobs",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--temperature",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<f64> = line["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(got.len(), 3);
    for (k, lp) in got.iter().enumerate() {
        let pos = 2 + k;
        let want = log_softmax(&rows[pos - 1])[ids[pos] as usize];
        assert!((lp - want).abs() < 1e-4, "token {k}: ours {lp}, PEFT's {want}");
    }
    // Without the adapter the log-probs differ: the flag did something.
    let plain = safe(&["logprobs", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()]);
    assert_eq!(plain.status.code(), Some(0));
    let plain: Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert_ne!(plain["logprobs"], line["logprobs"]);
}

#[test]
fn generate_cli_takes_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_llama_with_tokenizer(tmp.path());
    let adapter = peft_fixture("tiny-llama/adapter");
    let run = |with: bool| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "ab", "--temperature", "0"];
        args.extend(["--max-new-tokens", "6", "--format", "jsonl"]);
        if with {
            args.extend(["--adapter", adapter.to_str().unwrap()]);
        }
        let out = safe(&args);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token_ids"].clone()
    };
    assert_ne!(run(true), run(false));
}

/// The llama adapter, copied into `tmp/name` with `edit` applied to its config.
fn edited_adapter(tmp: &Path, name: &str, edit: impl Fn(&mut Value)) -> PathBuf {
    let dir = tmp.join(name);
    copy_dir(&peft_fixture("tiny-llama/adapter"), &dir);
    let path = dir.join("adapter_config.json");
    let mut v = common::read_json(&path);
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    dir
}

fn logprobs_with(model: &str, adapter: &Path, tmp: &Path) -> Output {
    let input = tmp.join("in.jsonl");
    std::fs::write(&input, "{\"prompt_ids\": [1, 5], \"completion_ids\": [6, 7]}\n").unwrap();
    safe(&["logprobs", "--model", model, "--adapter", adapter.to_str().unwrap(), "--input", input.to_str().unwrap()])
}

#[test]
fn bad_adapters_are_exit_2_naming_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = common::fixture("tiny/tiny-llama");
    let llama = llama.to_str().unwrap();
    let file = |dir: &Path, f: &str| dir.join(f).display().to_string();

    // A base that does not match: builtin:tiny's MLP is 192 wide, the adapter's base 128.
    let adapter = peft_fixture("tiny-llama/adapter");
    let out = logprobs_with("builtin:tiny", &adapter, tmp.path());
    assert_bad_input(
        &out,
        &[&file(&adapter, "adapter_model.safetensors"), "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"],
    );
    assert_bad_input(&out, &["has shape [4, 128], expected [4, 192]"]);

    // r = 0.
    let dir = edited_adapter(tmp.path(), "r0", |v| v["r"] = 0.into());
    assert_bad_input(&logprobs_with(llama, &dir, tmp.path()), &[&file(&dir, "adapter_config.json"), "`r`"]);

    // A target module the architecture lacks.
    let dir = edited_adapter(tmp.path(), "fc1", |v| v["target_modules"] = serde_json::json!(["q_proj", "fc1"]));
    assert_bad_input(&logprobs_with(llama, &dir, tmp.path()), &[&file(&dir, "adapter_config.json"), "`fc1`"]);

    // Options this implementation does not compute.
    let dir = edited_adapter(tmp.path(), "dora", |v| v["use_dora"] = true.into());
    assert_bad_input(&logprobs_with(llama, &dir, tmp.path()), &[&file(&dir, "adapter_config.json"), "`use_dora`"]);

    // A layer beyond the base's two.
    let dir = edited_adapter(tmp.path(), "layer5", |_| {});
    let st = dir.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let extra = "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight";
    tensors
        .insert(extra.to_string(), tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].clone());
    candle_core::safetensors::save(&tensors, &st).unwrap();
    assert_bad_input(
        &logprobs_with(llama, &dir, tmp.path()),
        &[&file(&dir, "adapter_model.safetensors"), extra, "2 layers"],
    );

    // A tensor the config's targets do not name, and a missing one.
    let dir = edited_adapter(tmp.path(), "narrow", |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "v_proj", "up_proj"])
    });
    assert_bad_input(
        &logprobs_with(llama, &dir, tmp.path()),
        &[&file(&dir, "adapter_model.safetensors"), "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"],
    );
    let dir = edited_adapter(tmp.path(), "missing", |_| {});
    let st = dir.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    tensors.remove(gone).unwrap();
    candle_core::safetensors::save(&tensors, &st).unwrap();
    assert_bad_input(
        &logprobs_with(llama, &dir, tmp.path()),
        &[&file(&dir, "adapter_model.safetensors"), gone, "missing"],
    );

    // No adapter there at all.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_bad_input(&logprobs_with(llama, &empty, tmp.path()), &[&file(&empty, "adapter_config.json")]);

    // A base that already holds adapters (a LoRA run's checkpoint, say).
    let with = tmp.path().join("base-with-adapters");
    copy_dir(&common::fixture("tiny/tiny-llama"), &with);
    copy_dir(&adapter, &with);
    assert_bad_input(
        &logprobs_with(with.to_str().unwrap(), &adapter, tmp.path()),
        &["already holds LoRA adapters", "adapter_config.json"],
    );
}

// --- our exported adapter, loaded by PEFT -------------------------------------------------------------------------

const OURS: &str = "ours-llama";

/// A deterministic adapter from our code on tiny-llama: `add_lora` (our Kaiming-uniform A, B zeros), then one
/// AdamW step of a language-model loss, so B is not zero.
fn ours_llama() -> CausalLm {
    let mut model = base("tiny-llama").into_model(false, &Device::Cpu, DType::F32).unwrap().0;
    let spec = LoraSpec {
        rank: 4,
        alpha: 16.0,
        dropout: 0.0,
        targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        rslora: false,
        base_dtype: None,
        seed: 7,
        base_model: "../shared/fixtures/tiny/tiny-llama".into(),
    };
    model.add_lora(&spec, None).unwrap();
    let ids: Vec<u32> = vec![1, 17, 300, 42, 7, 99, 254, 3, 88, 501];
    let input = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let target = Tensor::new(&ids[1..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let valid = vec![vec![true; ids.len() - 1]];
    let pos = Tensor::new(positions_from_mask(&valid), &Device::Cpu).unwrap();
    let mask = attention_mask(&valid, ids.len() - 1, None, &Device::Cpu).unwrap();
    let logp = safe::model::llama::log_softmax_last_dim(&model.forward(&input, &pos, &mask, None).unwrap()).unwrap();
    let loss =
        logp.gather(&target.unsqueeze(D::Minus1).unwrap(), D::Minus1).unwrap().mean_all().unwrap().neg().unwrap();
    let mut opt =
        AdamW::new(model.vars().to_vec(), AdamWConfig { lr: 0.02, weight_decay: 0.0, ..Default::default() }).unwrap();
    opt.step(&loss.backward().unwrap()).unwrap();
    model
}

fn our_sequences() -> Vec<Vec<u32>> {
    let reference = common::read_json(&common::fixture("tiny/tiny-llama/reference_logits.json"));
    reference["sequences"].as_array().unwrap()[..2].iter().map(|s| ids_of(&s["input_ids"])).collect()
}

fn round6(rows: &[Vec<f32>]) -> Value {
    rows.iter().map(|r| r.iter().map(|&x| ((x as f64) * 1e6).round() / 1e6).collect::<Vec<f64>>()).collect()
}

/// `UPDATE_PEFT_FIXTURE=1` writes tests/fixtures/peft/ours-llama/ (the adapter through the checkpoint's own writer,
/// and our logits); then scripts/make-peft-fixture.py has PEFT load it and writes peft_logits.json. Without it,
/// checks that our code still makes those files and that PEFT's logits with them are ours.
#[test]
fn ours_llama_adapter_loads_in_peft_unchanged_and_gives_our_logits() {
    let model = ours_llama();
    let dir = peft_fixture(OURS);
    let seqs = our_sequences();
    let logits: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| logits_unpadded(&model, s)).collect();
    if std::env::var("UPDATE_PEFT_FIXTURE").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).unwrap();
        assert!(safe::checkpoint::write_adapter_files(&dir, &model).unwrap());
        let sequences: Vec<Value> =
            seqs.iter().zip(&logits).map(|(s, l)| serde_json::json!({"input_ids": s, "logits": round6(l)})).collect();
        let v = serde_json::json!({"model": "tiny-llama + ours-llama (safe)", "sequences": sequences});
        std::fs::write(dir.join("our_logits.json"), serde_json::to_string(&v).unwrap()).unwrap();
        let _ = std::fs::remove_file(dir.join("peft_logits.json"));
        eprintln!("wrote {}; now run scripts/make-peft-fixture.py", dir.display());
        return;
    }
    // (a) Our code makes the committed adapter: the same config, the same tensors.
    let config = common::read_json(&dir.join("adapter_config.json"));
    assert_eq!(config, model.lora().unwrap().peft_config());
    let saved = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let ours: HashMap<String, Tensor> = model.adapter_tensors().into_iter().collect();
    assert_eq!(saved.len(), ours.len());
    for (name, t) in &ours {
        let s = saved.get(name).unwrap_or_else(|| panic!("{name} not in the committed adapter"));
        let d = (t - s).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // One AdamW step made these values, so a gradient summed in another order (the fused CPU ops) moves them by
        // a few 1e-7; PEFT's logits below are checked against ours either way.
        assert!(d < 1e-6, "{name}: differs from the committed adapter by {d}");
        if name.ends_with("lora_B.weight") {
            assert!(t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3, "{name} is zero");
        }
    }
    // (b) PEFT, loading those files unchanged, gives our logits.
    let peft = common::read_json(&dir.join("peft_logits.json"));
    let peft_seqs = peft["sequences"].as_array().unwrap();
    assert_eq!(peft_seqs.len(), seqs.len());
    let mut worst = 0.0f32;
    for ((s, l), p) in seqs.iter().zip(&logits).zip(peft_seqs) {
        assert_eq!(&ids_of(&p["input_ids"]), s);
        worst = worst.max(max_abs_diff(l, &rows_of(&p["logits"])));
    }
    assert!(worst < TOL, "max |ours - PEFT with our adapter| = {worst}");
    eprintln!("ours-llama: max |ours - PEFT with our adapter| = {worst:e}");
    // And our loader reads the exported adapter back to the same model.
    let back = with_adapter("tiny-llama", &dir);
    assert!(max_abs_diff(&logits_unpadded(&back, &seqs[0]), &logits[0]) < 1e-6);
}
