//! The device choice in every build (issue 15), and tests that run on each device this machine has: the CPU
//! always, a CUDA GPU when the build has CUDA and one opens. CI runs this file in the CUDA build too, with a stub
//! driver and no GPU (scripts/cuda-check.sh), where `auto` must mean the CPU.

use candle_core::{DType, Device, Tensor};
use safe::model::logprobs::{completion_logprobs, SequenceBatch};
use safe::model::{attention_mask, builtin, CausalLm};
use safe::optim::{AdamW, AdamWConfig};
use safe::recipe::DeviceSpec;

/// The devices to test on: the CPU, then CUDA's first GPU when this build can open one.
fn devices() -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    if let Ok(gpu) = Device::new_cuda(0) {
        out.push(gpu);
    }
    out
}

fn gpu_visible() -> bool {
    devices().len() > 1
}

#[test]
fn auto_is_a_gpu_when_one_opens_else_the_cpu() {
    let device = DeviceSpec::Auto.device().unwrap();
    assert_eq!(device.is_cpu(), !gpu_visible(), "{device:?}");
}

#[test]
fn an_explicit_cuda_device_without_a_gpu_is_an_error_naming_it() {
    if gpu_visible() {
        return; // nothing to refuse here
    }
    // As the binary prints it (Candle's backtrace, there under RUST_BACKTRACE=1, left out).
    let e = safe::exit::Failure::bad_input("cuda".parse::<DeviceSpec>().unwrap().device().unwrap_err()).message();
    assert!(e.contains("opening cuda:0") && e.contains("--features cuda"), "{e}");
    assert!(!e.contains("candle_core::"), "no backtrace in the message: {e}");
}

/// The tiny model (f32, no gradient) on `device`.
fn frozen_tiny(device: &Device) -> CausalLm {
    let cfg = builtin::config("tiny").unwrap();
    let w = builtin::weights(&cfg, 7, device, DType::F32).unwrap();
    CausalLm::from_tensors(&cfg, w, false, device, DType::F32).unwrap()
}

/// `model`'s logits over one fixed 6-token row, in f32, as a host vector.
fn logits_of(model: &CausalLm) -> Vec<f32> {
    let device = model.device();
    let ids: [u32; 6] = [257, 50, 43, 51, 61, 258];
    let ids = Tensor::new(&ids[..], device).unwrap().unsqueeze(0).unwrap();
    let pos = Tensor::new(&[0u32, 1, 2, 3, 4, 5][..], device).unwrap().unsqueeze(0).unwrap();
    let mask = attention_mask(&[vec![true; 6]], 6, None, device).unwrap();
    let logits = model.forward(&ids, &pos, &mask, None).unwrap();
    logits.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_vec1().unwrap()
}

/// The tiny model's logits on `device` in f32, as a host vector.
fn tiny_logits(device: &Device) -> Vec<f32> {
    logits_of(&frozen_tiny(device))
}

#[test]
fn decoder_logits_agree_on_every_device() {
    // f32 everywhere: a GPU's f32 matmuls (TF32 off by default in Candle) stay within 1e-4 of the CPU's.
    let cpu = tiny_logits(&Device::Cpu);
    assert!(cpu.iter().all(|x| x.is_finite()));
    for device in devices().iter().skip(1) {
        let got = tiny_logits(device);
        let worst = cpu.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{device:?}: max |Δlogit| = {worst}");
    }
}

/// The tiny model, trainable on `device` (f32 master weights), computing its update forwards in `compute`.
fn trainable_tiny(device: &Device, compute: DType) -> CausalLm {
    let cfg = builtin::config("tiny").unwrap();
    let w = builtin::weights(&cfg, 7, device, DType::F32).unwrap();
    CausalLm::from_tensors(&cfg, w, true, device, DType::F32).unwrap().with_compute_dtype(compute)
}

/// A policy-gradient loss over two sequences of unequal lengths (padding and packing exercised; 35 real tokens, so
/// the linear layers take the many-row paths, oneDNN's under `--features onednn`) on `model`, and its gradient:
/// the loss, and each variable's gradient as a host vector.
fn pg_loss_and_grads(model: &CausalLm) -> (f32, candle_core::backprop::GradStore, Vec<Vec<f32>>) {
    let device = model.device().clone();
    let prompts = vec![vec![257u32, 50, 43, 51, 44, 52, 45, 53, 46, 54], vec![257, 61, 47, 55, 48, 56]];
    let completions =
        vec![vec![62u32, 63, 64, 65, 66, 67, 68, 258], vec![70u32, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80]];
    let batch = SequenceBatch::new(&prompts, &completions, 0, None, &device).unwrap();
    let (lp, _) = completion_logprobs(model, &batch, 0.9, 0, false).unwrap();
    let adv = Tensor::new(&[1.0f32, -0.5], &device).unwrap().unsqueeze(1).unwrap();
    let loss = ((lp * &batch.completion_mask).unwrap().broadcast_mul(&adv).unwrap().sum_all().unwrap() / -8.0).unwrap();
    let grads = loss.backward().unwrap();
    let host = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_vec1().unwrap()
    };
    let g = model
        .vars()
        .iter()
        .map(|(_, v)| host(grads.get(v.as_tensor()).expect("every variable has a gradient")))
        .collect();
    (loss.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap(), grads, g)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b)).max(1e-300)
}

/// The update's loss and every gradient agree across devices in f32 (within 1e-4 of the largest), and in bf16 over
/// f32 masters follow f32 on the same device (cosine ≥ 0.999 per tensor): the update path, not only the forward.
#[test]
fn update_gradients_agree_on_every_device() {
    let (cpu_loss, _, cpu) = pg_loss_and_grads(&trainable_tiny(&Device::Cpu, DType::F32));
    assert!(cpu_loss.is_finite() && cpu_loss != 0.0);
    for device in devices() {
        let model = trainable_tiny(&device, DType::F32);
        let (loss, grads, got) = pg_loss_and_grads(&model);
        assert!((loss - cpu_loss).abs() <= 1e-4 * cpu_loss.abs().max(1.0), "{device:?}: loss {loss} vs {cpu_loss}");
        let norm = safe::optim::grad_norm_and_scale(&grads, model.vars(), 1.0).unwrap().0;
        let cpu_norm = cpu.iter().flatten().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - cpu_norm).abs() <= 1e-5 * cpu_norm, "{device:?}: gradient norm {norm} vs {cpu_norm}");
        for (i, (a, b)) in got.iter().zip(&cpu).enumerate() {
            let top = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(top > 0.0, "variable {i} has a zero gradient on the CPU");
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-4 * top.max(1e-3), "{device:?}: variable {i} gradient differs by {worst} (top {top})");
        }
        let (loss16, _, bf16) = pg_loss_and_grads(&trainable_tiny(&device, DType::BF16));
        assert!((loss16 - loss).abs() <= 2e-2 * loss.abs(), "{device:?}: bf16 loss {loss16} vs f32 {loss}");
        for (i, (a, b)) in bf16.iter().zip(&got).enumerate() {
            let c = cosine(a, b);
            assert!(c >= 0.999, "{device:?}: variable {i}: bf16 gradient cosine {c} to f32's");
        }
    }
}

/// Two AdamW steps (the fused in-place kernel where the device has it) over the same gradients (the CPU's, copied
/// to each device) move the weights the same on every device.
#[test]
fn an_optimizer_step_agrees_on_every_device() {
    let (_, _, cpu_grads) = pg_loss_and_grads(&trainable_tiny(&Device::Cpu, DType::F32));
    let step = |device: &Device| -> Vec<Vec<f32>> {
        let model = trainable_tiny(device, DType::F32);
        let (_, mut grads, _) = pg_loss_and_grads(&model);
        for ((_, v), g) in model.vars().iter().zip(&cpu_grads) {
            grads.insert(v.as_tensor(), Tensor::from_slice(g, v.shape(), device).unwrap());
        }
        let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(model.vars().to_vec(), cfg).unwrap();
        opt.step(&grads).unwrap();
        opt.step(&grads).unwrap();
        model
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_vec1().unwrap())
            .collect()
    };
    let before: Vec<Vec<f32>> = trainable_tiny(&Device::Cpu, DType::F32)
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let cpu = step(&Device::Cpu);
    assert!(cpu.iter().zip(&before).all(|(a, b)| a != b), "every variable moved on the CPU");
    for device in devices().iter().skip(1) {
        for (i, (a, b)) in step(device).iter().zip(&cpu).enumerate() {
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            // The same gradients: only f32 rounding of the update's arithmetic differs (weights are O(0.1)).
            assert!(worst <= 1e-6, "{device:?}: variable {i} after two steps differs by {worst}");
        }
    }
}

/// Sampled generation (filters and repetition penalty on) gives the CPU's completions on every device: a GPU samples
/// with tensor ops there (only ids and log-probs come back), the CPU on the host, both from the same row streams.
/// f32 logits agree to 1e-4 (above), so only a draw within that of a CDF boundary could differ: none in these rows.
#[test]
fn sampled_generation_agrees_on_every_device() {
    use safe::rollout::{generate, GenerationConfig, Request, RowKey, SamplingParams};
    let cfg = builtin::config("tiny").unwrap();
    let requests: Vec<Request> = (0..8u64)
        .map(|i| Request {
            prompt: vec![257, 50 + i as u32, 43, 51, 44][..2 + i as usize % 4].to_vec(),
            key: RowKey { seed: 9, step: 3, prompt: i / 2, sample: i % 2 },
        })
        .collect();
    let sampling = SamplingParams { temperature: 0.9, top_k: 50, top_p: 0.95, min_p: 0.01, repetition_penalty: 1.1 };
    let gen = GenerationConfig {
        sampling,
        max_new_tokens: 32,
        eos_ids: cfg.eos_token_ids.clone(),
        stop_strings: vec![],
        batch_size: 8,
        pad_id: 0,
    };
    let run = |device: &Device| generate(&frozen_tiny(device), None, &requests, &gen, None).unwrap();
    let cpu = run(&Device::Cpu);
    assert!(cpu.iter().any(|c| c.ids.len() > 4), "the completions are not all trivially short");
    for device in devices().iter().skip(1) {
        for (i, (a, b)) in run(device).iter().zip(&cpu).enumerate() {
            assert_eq!(a.ids, b.ids, "{device:?}: request {i}");
            let worst = a.logprobs.iter().zip(&b.logprobs).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-3, "{device:?}: request {i}: log-probs differ by {worst}");
        }
    }
}

/// `rollout.weights = "bf16"` on every device: decoding from bf16 copies of an f32 model (the host kernel's on the
/// CPU, tensors and the device's bf16 matmul on a GPU) stays within bf16's rounding of the f32 logits.
#[test]
fn bf16_decode_copies_follow_f32_on_every_device() {
    let want = tiny_logits(&Device::Cpu);
    let top = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    for device in devices() {
        let mut model = frozen_tiny(&device);
        model.enable_decode_copies(true).unwrap();
        let got = logits_of(&model);
        let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst > 0.0, "{device:?}: the copies are bf16, not the f32 weights");
        assert!(worst < 2e-2 * top, "{device:?}: max |Δlogit| = {worst} (top {top})");
    }
}
