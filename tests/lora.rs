//! LoRA (`[lora]`): adapters are the only trainable tensors and each gets a gradient, the model starts as the base
//! exactly, decoding includes the adapters, checkpoints hold PEFT-named adapters and resume bit for bit (GRPO, PPO,
//! SAFE), and bad settings are exit 2 naming the key.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use common::train::*;
use safe::model::lora::LoraSpec;
use safe::model::{attention_mask, positions_from_mask, CausalLm, LoadedModel, ModelSource};
use safe::optim::{AdamW, AdamWConfig};

fn tiny() -> CausalLm {
    let src = ModelSource::parse("builtin:tiny", None).unwrap();
    LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap().into_model(false, &Device::Cpu, DType::F32).unwrap().0
}

fn spec(rank: usize, targets: &[&str]) -> LoraSpec {
    LoraSpec {
        rank,
        alpha: 16.0,
        dropout: 0.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        rslora: false,
        base_dtype: None,
        seed: 7,
        base_model: "builtin:tiny".into(),
    }
}

const ALL: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Two left-padded rows: input ids, positions, mask.
fn batch() -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids: Vec<u32> = vec![1, 17, 200, 42, 7, 99, 254, 3];
    let valid = vec![[vec![false; 2], vec![true; 6]].concat(), vec![true; 8]];
    let input = Tensor::new(vec![ids.clone(), ids.iter().rev().copied().collect::<Vec<_>>()], &dev).unwrap();
    let pos = Tensor::new(positions_from_mask(&valid), &dev).unwrap();
    (input, pos, attention_mask(&valid, 8, None, &dev).unwrap())
}

/// A language-model loss over every position.
fn loss(model: &CausalLm) -> Tensor {
    let (input, pos, mask) = batch();
    let logp = safe::model::llama::log_softmax_last_dim(&model.forward(&input, &pos, &mask, None).unwrap()).unwrap();
    let target = Tensor::new(vec![vec![5u32; 8], vec![9u32; 8]], &Device::Cpu).unwrap();
    logp.gather(&target.unsqueeze(D::Minus1).unwrap(), D::Minus1).unwrap().mean_all().unwrap().neg().unwrap()
}

fn logits(model: &CausalLm) -> Vec<f32> {
    let (input, pos, mask) = batch();
    model.forward(&input, &pos, &mask, None).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn norm2(t: &Tensor) -> f32 {
    t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn only_adapters_are_variables_and_the_base_is_plain_tensors() {
    let mut model = tiny();
    model.add_lora(&spec(4, ALL), None).unwrap();
    let layers = model.config().num_layers;
    assert_eq!(model.vars().len(), 2 * 7 * layers);
    for (name, var) in model.vars() {
        assert!(name.starts_with("base_model.model.model.layers."), "{name}");
        assert!(name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight"), "{name}");
        assert!(var.as_tensor().is_variable());
    }
    for (name, t) in model.named_tensors() {
        assert!(!t.is_variable(), "base tensor {name} is a variable");
    }
    // A is PEFT's Kaiming-uniform (|a| ≤ 1/√in, not all zero), B zeros.
    for (name, t) in model.adapter_tensors() {
        if name.ends_with("lora_B.weight") {
            assert_eq!(norm2(&t), 0.0, "{name}");
        } else {
            let bound = 1.0 / (t.dim(1).unwrap() as f32).sqrt();
            let max = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(max > 0.5 * bound && max <= bound, "{name}: max |a| = {max}, bound {bound}");
        }
    }
    // Same seed, same adapters; another seed, another A.
    let mut again = tiny();
    again.add_lora(&spec(4, ALL), None).unwrap();
    let mut other = tiny();
    other.add_lora(&LoraSpec { seed: 8, ..spec(4, ALL) }, None).unwrap();
    let a0 = |m: &CausalLm| m.adapter_tensors()[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a0(&model), a0(&again));
    assert_ne!(a0(&model), a0(&other));
    // A trainable (full fine-tuning) model cannot take adapters.
    let src = ModelSource::parse("builtin:tiny", None).unwrap();
    let (mut full, _) =
        LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap().into_model(true, &Device::Cpu, DType::F32).unwrap();
    assert!(full.add_lora(&spec(4, ALL), None).is_err());
}

#[test]
fn at_init_the_adapted_model_is_the_base_exactly() {
    let base = tiny();
    let mut model = tiny();
    model.add_lora(&spec(8, ALL), None).unwrap();
    let want = logits(&base);
    // Without a graph the same kernels run, and the adapters add exact zeros.
    assert_eq!(logits(&model.frozen_view().unwrap()), want);
    assert_eq!(logits(&model.without_adapters().unwrap()), want);
    // With the adapters' graph the matmuls run through other kernels (Candle's GEMM, not the decode kernel):
    // the same values up to rounding.
    let d = logits(&model).iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn only_adapters_get_gradients_and_every_adapter_gets_one_after_a_step() {
    let mut model = tiny();
    model.add_lora(&spec(4, ALL), None).unwrap();
    let base: Vec<(String, Tensor)> = model.named_tensors();
    // At init B = 0: B's gradients are non-zero, A's are exactly zero (dL/dA = s·Bᵀ·…), as in PEFT.
    let grads = loss(&model).backward().unwrap();
    for (name, var) in model.vars() {
        let g = norm2(grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient")));
        if name.ends_with("lora_B.weight") {
            assert!(g > 0.0 && g.is_finite(), "{name}: gradient norm² {g}");
        } else {
            assert_eq!(g, 0.0, "{name}");
        }
    }
    // No base matrix gets a gradient (the embedding, tied LM head and every linear weight): none is computed.
    // (Candle differentiates every operand of an op with a graph, so the hidden-sized norm scales still get a
    // transient one; they are not variables and nothing keeps it.)
    for (name, t) in &base {
        if t.rank() == 2 {
            assert!(grads.get(t).is_none(), "frozen {name} got a gradient");
        }
    }
    let cfg = AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = AdamW::new(model.vars().to_vec(), cfg).unwrap();
    opt.step(&grads).unwrap();
    let before: HashMap<String, Vec<f32>> =
        base.iter().map(|(n, t)| (n.clone(), t.flatten_all().unwrap().to_vec1().unwrap())).collect();
    // After one step B ≠ 0, and every adapter tensor gets a non-zero gradient.
    let grads = loss(&model).backward().unwrap();
    for (name, var) in model.vars() {
        if name.ends_with("lora_B.weight") {
            assert!(norm2(var.as_tensor()) > 0.0, "{name} did not move");
        }
        let g = norm2(grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient")));
        assert!(g > 0.0 && g.is_finite(), "{name}: gradient norm² {g}");
    }
    // The base did not move, and the adapted model now differs from it.
    for (name, t) in model.named_tensors() {
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), before[&name], "{name} moved");
    }
    assert_ne!(logits(&model), logits(&tiny()));
}

/// `rows` copies of a 9-token row (the first two padding), as ids, positions and mask.
fn rows_batch(rows: usize) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids: Vec<Vec<u32>> = (0..rows as u32).map(|r| (0..9).map(|j| (r * 37 + j * 11) % 250 + 1).collect()).collect();
    let valid = vec![[vec![false; 2], vec![true; 7]].concat(); rows];
    let pos = Tensor::new(positions_from_mask(&valid), &dev).unwrap();
    (Tensor::new(ids, &dev).unwrap(), pos, attention_mask(&valid, 9, None, &dev).unwrap())
}

fn logits_of(model: &CausalLm, rows: usize) -> Vec<f32> {
    let (input, pos, mask) = rows_batch(rows);
    model.forward(&input, &pos, &mask, None).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Move every B off zero (the same values on every model), so the adapters change the output.
fn trained_looking(model: &CausalLm) {
    for (name, var) in model.vars() {
        if name.ends_with("lora_B.weight") {
            let (o, r) = var.as_tensor().dims2().unwrap();
            let data: Vec<f32> = (0..o * r).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect();
            var.set(&Tensor::from_vec(data, (o, r), &Device::Cpu).unwrap()).unwrap();
        }
    }
}

/// `lora.base_dtype = "bf16"`: the base's linear weights held in bf16 compute what an f32 model holding the same
/// bf16 values computes, bit for bit: the training loss and the adapters' gradients (adapted layers by the fused
/// LoRA op, the others by the frozen-weight op, both widening per pass), graph-free forwards of many rows and of
/// decoding rows (the bf16 weights streamed as they are), merged decode copies, and the base with the adapters off
/// (the KL reference). Only the linear weights change dtype.
#[test]
fn a_bf16_base_computes_exactly_what_an_f32_base_of_the_same_values_does() {
    let base = tiny();
    let rounded: HashMap<String, Tensor> = base
        .named_tensors()
        .into_iter()
        .map(|(n, t)| {
            let t = if n.ends_with("_proj.weight") {
                t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    let targets = ["q_proj", "v_proj", "down_proj"];
    let mut want = CausalLm::from_tensors(base.config(), rounded, false, &Device::Cpu, DType::F32).unwrap();
    want.add_lora(&spec(4, &targets), None).unwrap();
    let mut got = tiny();
    got.add_lora(&LoraSpec { base_dtype: Some(DType::BF16), ..spec(4, &targets) }, None).unwrap();
    for (name, t) in got.named_tensors() {
        let dtype = if name.ends_with("_proj.weight") { DType::BF16 } else { DType::F32 };
        assert_eq!(t.dtype(), dtype, "{name}");
    }
    trained_looking(&want);
    trained_looking(&got);
    assert_ne!(logits_of(&got, 3), logits_of(&got.without_adapters().unwrap(), 3), "the adapters act");
    // The graph path: loss and every adapter's gradient.
    let (lw, lg) = (loss(&want), loss(&got));
    assert_eq!(lw.to_scalar::<f32>().unwrap(), lg.to_scalar::<f32>().unwrap());
    let (gw, gg) = (lw.backward().unwrap(), lg.backward().unwrap());
    for ((name, vw), (_, vg)) in want.vars().iter().zip(got.vars()) {
        let flat = |g: &candle_core::backprop::GradStore, v: &candle_core::Var| {
            g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b) = (flat(&gw, vw), flat(&gg, vg));
        assert!(a.iter().any(|x| *x != 0.0), "{name}: zero gradient");
        assert_eq!(a, b, "{name}");
    }
    // Graph-free: 3 rows of 9 tokens (27 rows for each product: the GEMM path) and 1 (9: the decoding kernel);
    // the reference; merged f32 and bf16 copies.
    let (vw, vg) = (want.frozen_view().unwrap(), got.frozen_view().unwrap());
    for rows in [3, 1] {
        assert_eq!(logits_of(&vw, rows), logits_of(&vg, rows), "{rows} rows");
        let (rw, rg) = (want.without_adapters().unwrap(), got.without_adapters().unwrap());
        assert_eq!(logits_of(&rw, rows), logits_of(&rg, rows), "reference, {rows} rows");
    }
    for bf16 in [false, true] {
        let (mut mw, mut mg) = (want.frozen_view().unwrap(), got.frozen_view().unwrap());
        mw.enable_decode_copies(bf16).unwrap();
        mg.enable_decode_copies(bf16).unwrap();
        assert_eq!(logits_of(&mw, 1), logits_of(&mg, 1), "merged copies, bf16 = {bf16}");
    }
}

/// LoRA dropout (PEFT's, in train mode): a training forward's adapters read a masked, rescaled input; a forward
/// outside a step (no `begin_dropout_step`) and the graph-free views (rollout, stored log-probs) read none; each
/// training forward of a step draws new masks, and the step begun again draws the same ones.
#[test]
fn dropout_acts_in_training_forwards_only_and_is_keyed_by_step_and_forward() {
    let (mut plain, mut dropped) = (tiny(), tiny());
    plain.add_lora(&spec(4, ALL), None).unwrap();
    dropped.add_lora(&LoraSpec { dropout: 0.5, ..spec(4, ALL) }, None).unwrap();
    trained_looking(&plain);
    trained_looking(&dropped);
    let want = logits_of(&plain, 3);
    assert_eq!(logits_of(&dropped, 3), want, "no step begun");
    dropped.begin_dropout_step(1, 1);
    let (first, second) = (logits_of(&dropped, 3), logits_of(&dropped, 3));
    assert_ne!(first, want);
    assert_ne!(first, second, "each training forward draws its own masks");
    let (view, plain_view) = (dropped.frozen_view().unwrap(), plain.frozen_view().unwrap());
    assert_eq!(logits_of(&view, 3), logits_of(&plain_view, 3), "a graph-free view reads no dropout");
    assert_eq!(logits_of(&view, 1), logits_of(&plain_view, 1), "nor in decoding");
    dropped.begin_dropout_step(1, 1);
    assert_eq!(logits_of(&dropped, 3), first, "the step again: the same masks");
    dropped.begin_dropout_step(1, 2);
    assert_ne!(logits_of(&dropped, 3), first, "another step: other masks");
    // Only the adapter term drops out: with B = 0 the masks change nothing, and the model is the base. (With
    // `--features onednn` an adapter-less model's products go through oneDNN, the adapted layers' through Candle:
    // the same values to float rounding, so there only the first holds bit for bit.)
    let mut fresh = tiny();
    fresh.add_lora(&LoraSpec { dropout: 0.5, ..spec(4, ALL) }, None).unwrap();
    let undropped = logits_of(&fresh, 3);
    fresh.begin_dropout_step(1, 1);
    assert_eq!(logits_of(&fresh, 3), undropped);
    #[cfg(not(feature = "onednn"))]
    assert_eq!(undropped, logits_of(&tiny(), 3));
}

#[test]
fn grpo_resume_with_dropout_is_exact() {
    three_plus_three_with(TINY, &format!("{LORA}dropout = 0.1\n"), None, &[]);
}

#[test]
fn ppo_resume_with_dropout_on_a_lora_value_model_is_exact() {
    let lora = format!("{LORA}dropout = 0.1\n");
    three_plus_three_with(&ppo_body("lr = 1e-2\nlora = true\n"), &lora, None, &["critic.safetensors"]);
}

#[test]
fn grpo_resume_with_a_bf16_base_is_exact_and_checkpoints_hold_it() {
    three_plus_three_with(TINY, &format!("{LORA}base_dtype = \"bf16\"\n"), Some(DType::BF16), &[]);
}

#[test]
fn decoding_includes_the_adapters() {
    let mut model = tiny();
    model.add_lora(&spec(4, ALL), None).unwrap();
    // Move B off zero so the adapters change the output.
    for (name, var) in model.vars() {
        if name.ends_with("lora_B.weight") {
            let (o, r) = var.as_tensor().dims2().unwrap();
            let data: Vec<f32> = (0..o * r).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect();
            var.set(&Tensor::from_vec(data, (o, r), &Device::Cpu).unwrap()).unwrap();
        }
    }
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 80, 33]], &dev).unwrap();
    let pos = Tensor::new(&[[0u32, 1, 2]], &dev).unwrap();
    let mask = attention_mask(&[vec![true; 3]], 3, None, &dev).unwrap();
    let out = |m: &CausalLm| -> Vec<f32> {
        m.forward(&ids, &pos, &mask, None).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    // The graph path (trainable variables) vs the no-grad view's decode kernels, f32 and bf16 copies.
    let want = out(&model);
    let base = out(&tiny());
    let mut view = model.frozen_view().unwrap();
    let got = out(&view);
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff(&want, &base) > 1e-3, "the adapters change the logits");
    assert!(diff(&got, &want) < 1e-5, "decode without the adapters? {}", diff(&got, &want));
    // Decode copies with the adapters merged in (f32): the same logits.
    let mut merged = model.frozen_view().unwrap();
    merged.enable_decode_copies(false).unwrap();
    let got = out(&merged);
    assert!(diff(&got, &want) < 1e-5, "merged f32 decode copies: {}", diff(&got, &want));
    view.enable_decode_copies(true).unwrap();
    let bf16 = out(&view);
    assert!(diff(&bf16, &want) < 0.1 * diff(&want, &base), "bf16 decode: {}", diff(&bf16, &want));
    // After the adapters change (an optimizer step), a refresh merges the new values: the copies never decode a
    // stale policy once refreshed.
    for (name, var) in model.vars() {
        if name.ends_with("lora_B.weight") {
            var.set(&(var.as_tensor() * -2.0).unwrap()).unwrap();
        }
    }
    let want = out(&model);
    merged.refresh_decode_copies().unwrap();
    let got = out(&merged);
    assert!(diff(&got, &want) < 1e-5, "refreshed merged copies: {}", diff(&got, &want));
    // The same copies as tensors (a GPU's kind, here on the CPU): merged f32 gives the logits, refreshed too;
    // bf16 (activations cast to bf16 as well) stays as close as the host's bf16 copies.
    let mut on_device = model.frozen_view().unwrap();
    on_device.enable_decode_copies_on_device(false).unwrap();
    let got = out(&on_device);
    assert!(diff(&got, &want) < 1e-5, "merged f32 device copies: {}", diff(&got, &want));
    for (name, var) in model.vars() {
        if name.ends_with("lora_B.weight") {
            var.set(&(var.as_tensor() * 0.5).unwrap()).unwrap();
        }
    }
    let want = out(&model);
    let stale = out(&on_device);
    assert!(diff(&stale, &want) > 1e-4, "the copies hold the weights of their last refresh");
    on_device.refresh_decode_copies().unwrap();
    let got = out(&on_device);
    assert!(diff(&got, &want) < 1e-5, "refreshed device copies: {}", diff(&got, &want));
    let mut bf16_device = model.frozen_view().unwrap();
    bf16_device.enable_decode_copies_on_device(true).unwrap();
    let got = out(&bf16_device);
    assert!(diff(&got, &want) < 0.1 * diff(&want, &base), "bf16 device copies: {}", diff(&got, &want));
}

const LORA: &str = "\n[lora]\nrank = 4\nalpha = 8.0\ntargets = [\"all-linear\"]\n";

fn lora_bytes(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (m, o) = checkpoint_bytes(dir);
    (m, o, std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
}

fn three_plus_three(body: &str, extra: &[&str]) {
    three_plus_three_with(body, LORA, None, extra);
}

/// Three steps, then three more resumed, against six straight, with the `[lora]` table `lora` whose base is held
/// in `base_dtype`.
/// `model.dtype = "bf16"` under LoRA: the frozen base is held in bf16 and the adapters, which train, are f32 master
/// weights cast to bf16 as each forward uses them (in bf16 most of AdamW's updates would round away). The checkpoint
/// holds them in f32, so a resumed run ends bit for bit where an uninterrupted one does.
#[test]
fn bf16_lora_trains_f32_adapters_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &format!("{TINY}{LORA}"), 5);
    let bf16 = "model.dtype=bf16";
    ok(&train(&recipe, &["run.name=straight", bf16], "never"));
    ok(&train(&recipe, &["run.name=split", "run.max_steps=3", bf16], "never"));
    ok(&train(&recipe, &["run.name=split", bf16], "auto"));
    let (a, b) = (dir.path().join("runs/straight"), dir.path().join("runs/split"));
    assert_eq!(lora_bytes(&step_dir(&a, 6)), lora_bytes(&step_dir(&b, 6)), "base/optimizer/adapters differ");
    assert_eq!(metrics(&a), metrics(&b));
    assert_ne!(lora_bytes(&step_dir(&a, 3)).2, lora_bytes(&step_dir(&a, 6)).2, "the adapters did not train");
    let load = |f: &str| candle_core::safetensors::load(step_dir(&a, 6).join(f), &Device::Cpu).unwrap();
    assert!(load("adapter_model.safetensors").values().all(|t| t.dtype() == DType::F32), "f32 adapters");
    assert!(load("model.safetensors").values().all(|t| t.dtype() == DType::BF16), "a bf16 base");
}

fn three_plus_three_with(body: &str, lora: &str, base_dtype: Option<DType>, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &format!("{body}{lora}"), 5);
    ok(&train(&recipe, &["run.name=straight"], "never"));
    ok(&train(&recipe, &["run.name=split", "run.max_steps=3"], "never"));
    let out = train(&recipe, &["run.name=split"], "auto");
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("resuming:   from"), "the second half must resume");
    assert!(stdout.contains("lora:       rank 4, alpha 8 (α/r), on q_proj, k_proj"), "{stdout}");
    let (a, b) = (dir.path().join("runs/straight"), dir.path().join("runs/split"));
    assert_eq!(lora_bytes(&step_dir(&a, 6)), lora_bytes(&step_dir(&b, 6)), "base/optimizer/adapters differ");
    for f in extra {
        assert_eq!(
            std::fs::read(step_dir(&a, 6).join(f)).unwrap(),
            std::fs::read(step_dir(&b, 6).join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(metrics(&a), metrics(&b));
    // The adapters trained; the base in model.safetensors did not change.
    let (m3, _, a3) = lora_bytes(&step_dir(&a, 3));
    let (m6, _, a6) = lora_bytes(&step_dir(&a, 6));
    assert_eq!(m3, m6, "the frozen base changed");
    assert_ne!(a3, a6, "the adapters did not train");
    // The optimizer holds the adapters' moments only.
    let opt = candle_core::safetensors::load(step_dir(&a, 6).join("optimizer.safetensors"), &Device::Cpu).unwrap();
    assert!(!opt.is_empty());
    assert!(opt.keys().all(|k| k.contains(".lora_A.weight") || k.contains(".lora_B.weight")), "{:?}", opt.keys());
    // The checkpoint's base is the base as it trained: its linear weights in bf16 under lora.base_dtype = "bf16".
    let saved = candle_core::safetensors::load(step_dir(&a, 6).join("model.safetensors"), &Device::Cpu).unwrap();
    let q = &saved["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(q.dtype(), base_dtype.unwrap_or(DType::F32));
    assert_eq!(saved["model.norm.weight"].dtype(), DType::F32);
    loads_with_its_adapters(&step_dir(&a, 6), base_dtype);
}

/// A LoRA checkpoint opened as a model (`safe generate`, `safe eval --model`) is the base plus its adapters, frozen;
/// opening it for full fine-tuning is refused (that would drop the adapters).
fn loads_with_its_adapters(ckpt: &Path, base_dtype: Option<DType>) {
    let src = ModelSource::Dir(ckpt.to_path_buf());
    let load = || LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap();
    let (model, _) = load().into_model(false, &Device::Cpu, DType::F32).unwrap();
    assert!(model.vars().is_empty());
    let lora = model.lora().expect("the checkpoint's adapters are applied");
    assert_eq!((lora.rank, lora.alpha, lora.targets.len()), (4, 8.0, 7));
    // The same as the trained adapters on the built-in base.
    let saved = candle_core::safetensors::load(ckpt.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut trained = tiny();
    trained.add_lora(&LoraSpec { alpha: 8.0, base_dtype, ..spec(4, ALL) }, Some(&saved)).unwrap();
    assert_eq!(logits(&model), logits(&trained.frozen_view().unwrap()));
    assert_ne!(logits(&model), logits(&tiny()), "the adapters change the model");
    let err = load().into_model(true, &Device::Cpu, DType::F32).err().expect("full fine-tuning is refused");
    assert!(err.to_string().contains("LoRA adapters"), "{err}");
}

#[test]
fn grpo_resume_with_lora_is_exact_and_checkpoints_hold_peft_adapters() {
    three_plus_three(TINY, &[]);
}

/// TINY as PPO (2 epochs of 2 mini-batches, an adaptive KL) with `critic` as its [critic] table.
fn ppo_body(critic: &str) -> String {
    TINY.replace(
        "[algorithm]\n",
        "[algorithm]\nkind = \"ppo\"\nppo_epochs = 2\nnum_mini_batches = 2\nkl_target = 0.01\n",
    )
    .replace("micro_batch_size = 4", "micro_batch_size = 2")
    .replace("num_iterations = 2\n", "")
    .replace("[optim]\n", &format!("[critic]\n{critic}\n[optim]\n"))
}

#[test]
fn ppo_resume_with_lora_is_exact() {
    three_plus_three(&ppo_body("lr = 1e-3\n"), &["critic.safetensors", "critic_optimizer.safetensors"]);
}

/// `critic.lora = true`: PPO's value model trains adapters (the [lora] settings) and its head on the policy's own
/// frozen base; the critic's files hold only those (PEFT names + `score.weight`), each of which trains, and resume
/// is exact.
#[test]
fn ppo_with_a_lora_value_model_trains_only_its_adapters_and_head_and_resumes_exactly() {
    let body = ppo_body("lr = 1e-2\nlora = true\n");
    three_plus_three(&body, &["critic.safetensors", "critic_optimizer.safetensors"]);
    // Rerun the straight half alone to read its critic files at steps 3 and 6.
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &format!("{body}{LORA}"), 5);
    let out = train(&recipe, &[], "never");
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("critic from policy (LoRA)"));
    let run = dir.path().join("runs/t");
    let critic = |step: u64| {
        candle_core::safetensors::load(step_dir(&run, step).join("critic.safetensors"), &Device::Cpu).unwrap()
    };
    let (c3, c6) = (critic(3), critic(6));
    // 2 layers × 7 modules × (A, B) + the head; no base weight.
    assert_eq!(c6.len(), 2 * 7 * 2 + 1, "{:?}", c6.keys());
    for (name, t) in &c6 {
        assert!(
            name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight") || name == "score.weight",
            "{name}"
        );
        let moved = (t - &c3[name]).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 0.0, "critic tensor {name} did not train");
    }
    // Its A is not the policy's: its own streams.
    let policy =
        candle_core::safetensors::load(step_dir(&run, 3).join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    assert_ne!(
        policy[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        c3[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

/// `critic.lora = true` without a [lora] table has no adapter settings to take: exit 2 naming the key.
#[test]
fn a_lora_value_model_needs_a_lora_table() {
    let dir = tempfile::tempdir().unwrap();
    let body = TINY
        .replace("[algorithm]\n", "[algorithm]\nkind = \"ppo\"\n")
        .replace("num_iterations = 2\n", "")
        .replace("[optim]\n", "[critic]\nlora = true\n\n[optim]\n");
    let recipe = setup(dir.path(), &body, 5);
    let out = train(&recipe, &["run.max_steps=1"], "never");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("critic.lora") && stderr(&out).contains("[lora]"), "{}", stderr(&out));
}

#[test]
fn safe_resume_with_lora_is_exact() {
    let body = TINY
        .replace("[algorithm]\n", "[algorithm]\nkind = \"safe\"\n")
        .replace("num_iterations = 2\n", "")
        .replace("beta = 0.04\n", "")
        .replace("num_generations = 4", "num_generations = 2")
        .replace("micro_batch_size = 4", "micro_batch_size = 2")
        .replace("[optim]\n", "[algorithm.safe]\nphase_window = 4\n\n[critic]\nlr = 1e-3\n\n[optim]\n");
    three_plus_three(&body, &["critic.safetensors", "critic_optimizer.safetensors"]);
}

#[test]
fn checkpoint_adapters_have_peft_names_shapes_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{TINY}\n[lora]\nrank = 2\nalpha = 4.0\ntargets = [\"v_proj\", \"q_proj\"]\nrslora = true\n");
    let recipe = setup(dir.path(), &body, 5);
    ok(&train(&recipe, &["run.max_steps=1"], "never"));
    let ckpt = step_dir(&dir.path().join("runs/t"), 1);
    let adapters = candle_core::safetensors::load(ckpt.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<(&String, Vec<usize>)> = adapters.iter().map(|(n, t)| (n, t.dims().to_vec())).collect();
    names.sort();
    // builtin:tiny: hidden 64, 4 heads of 16 (q: 64 out), 2 KV heads (v: 32 out), 2 layers.
    let want: Vec<(String, Vec<usize>)> = (0..2)
        .flat_map(|i| {
            let p = format!("base_model.model.model.layers.{i}.self_attn");
            [
                (format!("{p}.q_proj.lora_A.weight"), vec![2, 64]),
                (format!("{p}.q_proj.lora_B.weight"), vec![64, 2]),
                (format!("{p}.v_proj.lora_A.weight"), vec![2, 64]),
                (format!("{p}.v_proj.lora_B.weight"), vec![32, 2]),
            ]
        })
        .collect();
    assert_eq!(names.iter().map(|(n, d)| ((*n).clone(), d.clone())).collect::<Vec<_>>(), want);
    let cfg = common::read_json(&ckpt.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 2);
    assert_eq!(cfg["lora_alpha"], 4.0);
    assert_eq!(cfg["lora_dropout"], 0.0);
    assert_eq!(cfg["use_rslora"], true);
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert_eq!(cfg["base_model_name_or_path"], "builtin:tiny");
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["init_lora_weights"], true);
    // model.safetensors is the base unchanged: exactly the built-in weights, no adapter keys.
    let base = candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu).unwrap();
    let fresh = tiny().named_tensors();
    assert_eq!(base.len(), fresh.len());
    for (n, t) in fresh {
        assert_eq!(
            base[&n].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{n}"
        );
    }
}

/// `safe train` with `sets` exits 2 and its stderr names `key`.
fn refused(sets: &[&str], key: &str) {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    let mut all = vec!["run.max_steps=1"];
    all.extend_from_slice(sets);
    let out = train(&recipe, &all, "never");
    assert_eq!(out.status.code(), Some(2), "{sets:?}: {}", stderr(&out));
    assert!(stderr(&out).contains(key), "{sets:?}: stderr does not name {key}: {}", stderr(&out));
}

#[test]
fn bad_lora_settings_are_exit_2_naming_the_key() {
    refused(&["lora.rank=0"], "lora.rank");
    refused(&["lora.targets=[\"q_proj\", \"qkv_proj\"]"], "lora.targets");
    refused(&["lora.targets=[\"all-linear\", \"q_proj\"]"], "lora.targets");
    refused(&["lora.targets=[]"], "lora.targets");
    refused(&["lora.dropout=1.0"], "lora.dropout");
    refused(&["lora.dropout=-0.1"], "lora.dropout");
    refused(&["lora.rank=4", "lora.base_dtype=\"f16\""], "lora.base_dtype");
    // k_proj of builtin:tiny is 32×64: rank 48 does not fit.
    refused(&["lora.rank=48", "lora.targets=[\"k_proj\"]"], "lora.rank");
}

#[test]
fn lora_keys_may_not_change_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &format!("{TINY}{LORA}"), 5);
    ok(&train(&recipe, &["run.max_steps=1"], "never"));
    let out = train(&recipe, &["run.max_steps=2", "lora.rank=2"], "auto");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("lora.rank"), "{}", stderr(&out));
}

/// The adapters of a run's checkpoint after `step`, by name.
fn adapters_at(run: &Path, step: u64) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(step_dir(run, step).join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

#[test]
fn gradient_checkpointing_trains_the_same_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &format!("{TINY}{LORA}"), 5);
    let runs = dir.path().join("runs");
    // With LoRA dropout too: the checkpointed first pass and every recomputed layer draw the plain forward's masks.
    for dropout in ["0.0", "0.3"] {
        let d = format!("lora.dropout={dropout}");
        ok(&train(&recipe, &[&format!("run.name=plain{dropout}"), "run.max_steps=3", &d], "never"));
        let ckpt = [&format!("run.name=ckpt{dropout}"), "run.max_steps=3", "algorithm.gradient_checkpointing=true", &d];
        ok(&train(&recipe, &ckpt, "never"));
        let plain = adapters_at(&runs.join(format!("plain{dropout}")), 3);
        assert_eq!(plain, adapters_at(&runs.join(format!("ckpt{dropout}")), 3), "dropout {dropout}");
    }
    assert_ne!(adapters_at(&runs.join("plain0.0"), 3), adapters_at(&runs.join("plain0.3"), 3), "dropout acts");
}

#[test]
fn rloo_and_reinforce_pp_train_only_the_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let body = TINY.replace("num_iterations = 2\n", "");
    let recipe = setup(dir.path(), &format!("{body}{LORA}"), 5);
    for kind in ["rloo", "reinforce_pp"] {
        ok(&train(
            &recipe,
            &[&format!("run.name={kind}"), &format!("algorithm.kind={kind}"), "run.max_steps=3"],
            "never",
        ));
        let run = dir.path().join("runs").join(kind);
        // B moved off zero: the adapters trained.
        let adapters = adapters_at(&run, 3);
        assert!(adapters
            .iter()
            .filter(|(n, _)| n.ends_with("lora_B.weight"))
            .all(|(_, b)| b.iter().any(|x| *x != 0.0)));
        // The base is the built-in model's, bit for bit.
        let saved = candle_core::safetensors::load(step_dir(&run, 3).join("model.safetensors"), &Device::Cpu).unwrap();
        for (n, t) in tiny().named_tensors() {
            let want: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(saved[&n].flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{kind}: {n}");
        }
    }
}

#[test]
fn the_lora_table_is_off_unless_present_and_round_trips() {
    let text = TINY.replace("{dir}", "/tmp/x");
    let without = safe::recipe::from_str(&text, "r.toml", &[]).unwrap();
    assert!(without.lora.is_none());
    // Absent: no [lora] in the resolved recipe (so recipes without it keep their resolved text and hash).
    assert!(!without.to_toml_string().contains("[lora]"));
    // An empty table turns it on with PEFT's defaults (r = 8, alpha = 8, q_proj and v_proj).
    let empty = safe::recipe::from_str(&format!("{text}\n[lora]\n"), "r.toml", &[]).unwrap();
    let l = empty.lora.as_ref().unwrap();
    assert_eq!((l.rank, l.alpha, l.dropout, l.rslora), (8, 8.0, 0.0, false));
    assert_eq!(l.targets, ["q_proj", "v_proj"]);
    assert_ne!(empty.hash(), without.hash());
    // --set alone turns it on too; "all-linear" expands to every module, in layer order.
    let set = safe::recipe::from_str(&text, "r.toml", &["lora.targets=[\"all-linear\"]".into()]).unwrap();
    assert_eq!(set.lora.as_ref().unwrap().targets, ALL);
    // Targets are kept in module order, whatever the recipe's order.
    let order = safe::recipe::from_str(&text, "r.toml", &["lora.targets=[\"v_proj\", \"q_proj\"]".into()]).unwrap();
    assert_eq!(order.lora.as_ref().unwrap().targets, ["q_proj", "v_proj"]);
    // The resolved text loads back to an equal recipe.
    for r in [&without, &empty, &set] {
        assert_eq!(&safe::recipe::from_str(&r.to_toml_string(), "resolved.toml", &[]).unwrap(), r);
    }
}
