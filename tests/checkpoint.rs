//! Checkpoints: HF layout that reloads bit-identically, optimizer round trip, rotation, stale-temp cleanup, and a
//! writer killed with SIGKILL mid-save leaving a resumable checkpoint.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use safe::checkpoint::{self, latest_complete, Checkpoint, SaveRequest};
use safe::model::{attention_mask, builtin, CausalLm, LoadedModel, ModelSource, Tokenizer};
use safe::optim::adamw::{AdamW, AdamWConfig};
use serde_json::json;

fn tiny(dtype: DType) -> (CausalLm, Tokenizer) {
    let cfg = builtin::config("tiny").unwrap();
    let w = builtin::weights(&cfg, 7, &Device::Cpu, dtype).unwrap();
    let tok = builtin::tokenizer(&cfg, "builtin:tiny").unwrap();
    (CausalLm::from_tensors(&cfg, w, true, &Device::Cpu, dtype).unwrap(), tok)
}

const IDS: [u32; 6] = [257, 50, 43, 51, 61, 258];

fn logits(model: &CausalLm) -> Vec<f32> {
    let ids = Tensor::new(&IDS[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let pos = Tensor::new(&[0u32, 1, 2, 3, 4, 5][..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mask = attention_mask(&[vec![true; IDS.len()]], IDS.len(), None, &Device::Cpu).unwrap();
    model
        .forward(&ids, &pos, &mask, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// One AdamW step on the sum of the logits, so the moments are non-zero.
fn train_step(model: &CausalLm, opt: &mut AdamW) {
    let ids = Tensor::new(&IDS[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let pos = Tensor::new(&[0u32, 1, 2, 3, 4, 5][..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mask = attention_mask(&[vec![true; IDS.len()]], IDS.len(), None, &Device::Cpu).unwrap();
    let loss = model.forward(&ids, &pos, &mask, None).unwrap().sqr().unwrap().mean_all().unwrap();
    opt.step(&loss.backward().unwrap()).unwrap();
}

fn save(run: &Path, step: u64, model: &CausalLm, tok: &Tokenizer, opt: &AdamW, keep_last: usize) -> std::path::PathBuf {
    let state = json!({ "step": step, "data_cursor": step * 4, "rng": [1, 2, 3] });
    let req =
        SaveRequest { step, model, tokenizer: tok, optimizer: opt, training_state: &state, extra_tensor_files: &[] };
    checkpoint::save(run, &req, keep_last).unwrap()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The JSON header of a safetensors file.
fn safetensors_header(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

#[test]
fn checkpoint_reloads_with_identical_logits_names_config_and_optimizer() {
    let (model, tok) = tiny(DType::F32);
    let mut opt = AdamW::new(model.vars().to_vec(), AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    train_step(&model, &mut opt);
    let run = tempfile::tempdir().unwrap();
    let dir = save(run.path(), 3, &model, &tok, &opt, 3);
    assert_eq!(dir, run.path().join("checkpoints/step-3"));
    assert_eq!(latest_complete(run.path()).unwrap(), dir);
    assert_eq!(std::fs::read_to_string(run.path().join("checkpoints/latest")).unwrap().trim(), "step-3");

    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.step(), 3);
    assert_eq!(ckpt.state(), &json!({ "step": 3, "data_cursor": 12, "rng": [1, 2, 3] }));
    assert_eq!(ckpt.safe_version(), env!("CARGO_PKG_VERSION"));

    // HF layout: safetensors metadata, no lm_head for tied embeddings, config.json = to_hf_json.
    let header = safetensors_header(&dir.join("model.safetensors"));
    assert_eq!(header["__metadata__"], json!({ "format": "pt" }));
    assert!(header.get("lm_head.weight").is_none());
    assert_eq!(header["model.embed_tokens.weight"]["dtype"], "F32");
    assert_eq!(read_json(&dir.join("config.json")), model.config().to_hf_json("float32"));
    assert_eq!(
        read_json(&dir.join("generation_config.json")),
        json!({ "bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 258 })
    );
    for f in ["tokenizer.json", "tokenizer_config.json", "state.json", "optimizer.safetensors"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let state_text = std::fs::read_to_string(dir.join("state.json")).unwrap();
    assert!(state_text.trim_end().trim_end_matches('}').trim_end().ends_with("\"complete\": true"), "{state_text}");

    // Reload through the ordinary model loader.
    let loaded =
        LoadedModel::load(&ModelSource::Dir(ckpt.model_dir().to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    let mut names: Vec<&String> = loaded.tensors.keys().collect();
    names.sort();
    let mut want: Vec<String> = model.named_tensors().into_iter().map(|(n, _)| n).collect();
    want.sort();
    assert_eq!(names, want.iter().collect::<Vec<_>>());
    assert_eq!(serde_json::to_value(&loaded.config).unwrap(), serde_json::to_value(model.config()).unwrap());
    let (reloaded, reloaded_tok) = loaded.into_model(true, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(logits(&reloaded), logits(&model));
    let text = "<|im_start|>user\n2+3?<|im_end|>";
    assert_eq!(reloaded_tok.unwrap().encode(text).unwrap(), tok.encode(text).unwrap());

    // Optimizer: restored over the reloaded model's vars, the next step matches the uninterrupted one bit for bit.
    let mut opt2 = AdamW::new(reloaded.vars().to_vec(), AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    ckpt.restore_optimizer(&mut opt2).unwrap();
    assert_eq!(opt2.state(), opt.state());
    let saved: HashMap<String, Tensor> = ckpt.optimizer_tensors(&Device::Cpu).unwrap();
    for (name, t) in opt.state_tensors() {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = saved[&name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name}");
    }
    train_step(&model, &mut opt);
    train_step(&reloaded, &mut opt2);
    assert_eq!(logits(&reloaded), logits(&model));
}

#[test]
fn bf16_checkpoint_keeps_its_dtype() {
    let (model, tok) = tiny(DType::BF16);
    let opt = AdamW::new(model.vars().to_vec(), AdamWConfig::default()).unwrap();
    let run = tempfile::tempdir().unwrap();
    let dir = save(run.path(), 1, &model, &tok, &opt, 0);
    assert_eq!(safetensors_header(&dir.join("model.safetensors"))["model.norm.weight"]["dtype"], "BF16");
    assert_eq!(read_json(&dir.join("config.json"))["dtype"], "bfloat16");
    let loaded = LoadedModel::load(&ModelSource::Dir(dir), &Device::Cpu, DType::BF16).unwrap();
    let (reloaded, _) = loaded.into_model(false, &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(logits(&reloaded), logits(&model));
}

#[test]
fn rotation_keeps_the_newest_and_stale_temporaries_are_removed() {
    let (model, tok) = tiny(DType::F32);
    let opt = AdamW::new(model.vars().to_vec(), AdamWConfig::default()).unwrap();
    let run = tempfile::tempdir().unwrap();
    let root = run.path().join("checkpoints");
    let list = || {
        let mut v: Vec<String> =
            std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    for step in 1..=4 {
        save(run.path(), step, &model, &tok, &opt, 2);
    }
    assert_eq!(list(), ["latest", "step-3", "step-4"]);

    // An interrupted save and an interrupted rotation leave `.tmp-*`; an incomplete step dir is never chosen.
    std::fs::create_dir_all(root.join(".tmp-step-5-999999")).unwrap();
    std::fs::write(root.join(".tmp-step-5-999999/model.safetensors"), b"half").unwrap();
    std::fs::write(root.join(".tmp-latest-999999"), b"step-5").unwrap();
    std::fs::create_dir_all(root.join("step-9")).unwrap();
    std::fs::write(root.join("step-9/state.json"), br#"{"format": 1, "safe_version": "0", "step": 9"#).unwrap();
    assert_eq!(latest_complete(run.path()).unwrap(), root.join("step-4"));
    let err = Checkpoint::open(&root.join("step-9")).unwrap_err();
    assert!(format!("{err:#}").contains("step-9/state.json is corrupt"), "{err:#}");
    let err = Checkpoint::open(&root.join("nope")).unwrap_err();
    assert!(format!("{err:#}").contains("nope/state.json cannot be read"), "{err:#}");

    // A dangling `latest` falls back to the highest complete step.
    std::fs::write(root.join("latest"), "step-77\n").unwrap();
    assert_eq!(latest_complete(run.path()).unwrap(), root.join("step-4"));

    save(run.path(), 5, &model, &tok, &opt, 2);
    assert_eq!(list(), ["latest", "step-4", "step-5", "step-9"]);

    // Re-saving an existing step (a resumed run) replaces it; keep_last 1 keeps only the newest.
    let req_state = json!({ "again": true });
    let req = SaveRequest {
        step: 5,
        model: &model,
        tokenizer: &tok,
        optimizer: &opt,
        training_state: &req_state,
        extra_tensor_files: &[],
    };
    checkpoint::save(run.path(), &req, 1).unwrap();
    assert_eq!(list(), ["latest", "step-5", "step-9"]);
    assert_eq!(Checkpoint::open(&root.join("step-5")).unwrap().state(), &json!({ "again": true }));
}

const WRITER_ENV: &str = "SAFE_TEST_CHECKPOINT_WRITER_RUN_DIR";
const KILL_TEST: &str = "sigkill_during_a_checkpoint_write_leaves_a_resumable_checkpoint";

/// Child mode: save checkpoints forever (with a large extra file so writes take a while), continuing the step count.
fn writer_loop(run: &Path) -> ! {
    let cfg = AdamWConfig { lr: 1e-3, ..Default::default() };
    let (model, tok, mut opt, mut step) = match latest_complete(run) {
        None => {
            let (model, tok) = tiny(DType::F32);
            let opt = AdamW::new(model.vars().to_vec(), cfg).unwrap();
            (model, tok, opt, 0)
        }
        Some(dir) => {
            // Resume exactly as a trainer would: model, tokenizer and optimizer from the checkpoint.
            let ckpt = Checkpoint::open(&dir).unwrap();
            let loaded = LoadedModel::load(&ModelSource::Dir(dir), &Device::Cpu, DType::F32).unwrap();
            let (model, tok) = loaded.into_model(true, &Device::Cpu, DType::F32).unwrap();
            let mut opt = AdamW::new(model.vars().to_vec(), cfg).unwrap();
            ckpt.restore_optimizer(&mut opt).unwrap();
            (model, tok.unwrap(), opt, ckpt.step())
        }
    };
    let critic = vec![("v".to_string(), Tensor::zeros((1024, 1024), DType::F32, &Device::Cpu).unwrap())];
    let extra = [("critic.safetensors".to_string(), critic)];
    loop {
        step += 1;
        train_step(&model, &mut opt);
        let state = json!({ "step": step });
        let req = SaveRequest {
            step,
            model: &model,
            tokenizer: &tok,
            optimizer: &opt,
            training_state: &state,
            extra_tensor_files: &extra,
        };
        checkpoint::save(run, &req, 2).unwrap();
    }
}

/// Resumable = opens, the model loads through the ordinary loader, the optimizer restores over it.
fn assert_resumable(run: &Path) -> u64 {
    let dir = latest_complete(run).expect("a complete checkpoint");
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.state()["step"], ckpt.step());
    assert_eq!(dir.file_name().unwrap().to_string_lossy(), format!("step-{}", ckpt.step()));
    let loaded =
        LoadedModel::load(&ModelSource::Dir(ckpt.model_dir().to_path_buf()), &Device::Cpu, DType::F32).unwrap();
    let (model, _) = loaded.into_model(true, &Device::Cpu, DType::F32).unwrap();
    let mut opt = AdamW::new(model.vars().to_vec(), AdamWConfig::default()).unwrap();
    ckpt.restore_optimizer(&mut opt).unwrap();
    assert_eq!(opt.state().step, ckpt.step());
    assert_eq!(ckpt.tensor_file("critic.safetensors", &Device::Cpu).unwrap()["v"].dims(), [1024, 1024]);
    ckpt.step()
}

#[test]
fn sigkill_during_a_checkpoint_write_leaves_a_resumable_checkpoint() {
    if let Some(run) = std::env::var_os(WRITER_ENV) {
        writer_loop(Path::new(&run));
    }
    let run = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // Delays from the clock (printed, so a failure can be replayed by hand), spread over the first few saves.
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut last = 0;
    for round in 0..6 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay_ms = 150 + (seed >> 33) % 600;
        let mut child = Command::new(&exe)
            .args(["--exact", KILL_TEST, "--test-threads=1", "--nocapture"])
            .env(WRITER_ENV, run.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("writer exited early ({status}): {err}");
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let names: Vec<String> = std::fs::read_dir(run.path().join("checkpoints"))
            .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        eprintln!("round {round}: killed after {delay_ms} ms; checkpoints/ = {names:?}");
        if round == 0 && latest_complete(run.path()).is_none() {
            continue; // killed before the first save finished: nothing to check yet
        }
        let step = assert_resumable(run.path());
        assert!(step >= last, "went back from step {last} to {step}");
        last = step;
    }
    assert!(last > 0, "no checkpoint was ever completed");
}

#[test]
fn state_json_records_the_sha256_of_every_file() {
    let (model, tok) = tiny(DType::F32);
    let opt = AdamW::new(model.vars().to_vec(), AdamWConfig::default()).unwrap();
    let run = tempfile::tempdir().unwrap();
    let dir = save(run.path(), 1, &model, &tok, &opt, 0);
    let state = read_json(&dir.join("state.json"));
    let files = state["files"].as_object().unwrap();
    let mut listed: Vec<&str> = files.keys().map(String::as_str).collect();
    listed.sort();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "state.json")
        .collect();
    on_disk.sort();
    assert_eq!(listed, on_disk);
    // `sha256sum` of the file, computed independently here.
    use sha2::Digest;
    let want = format!("{:x}", sha2::Sha256::digest(std::fs::read(dir.join("model.safetensors")).unwrap()));
    assert_eq!(files["model.safetensors"], want);
    // `complete` stays the last key written.
    let text = std::fs::read_to_string(dir.join("state.json")).unwrap();
    assert!(text.trim_end().trim_end_matches('}').trim_end().ends_with("\"complete\": true"), "{text}");
    Checkpoint::open(&dir).unwrap();
}
