//! The update's levers, each on its own, on SmolLM2-135M (CPU, f32): one forward + backward of a GRPO-style loss
//! over 8 sequences (a 40-token prompt, completions of 64, 64, 56, 48, 40, 32, 24 and 16 tokens: the lengths a
//! GRPO step samples), and one AdamW step over the model's gradients. Prints seconds (best of 3) and the peak RSS
//! growth of each variant, each variant in a fresh process (an allocator keeps what an earlier one freed).
//! Run: `bash scripts/fetch-smollm2.sh && cargo bench --bench update`.
//!
//! Variants: the padded forward with the composite LM head (log-softmax over `[rows, vocab]` logits in the graph),
//! the fused LM-head op, the packed forward (no per-token work on padding), the fused norm/RoPE/softmax/SwiGLU
//! ops against their composite forms, gradient checkpointing, bf16 compute over f32 master weights
//! (`model.dtype = "bf16"`; with `--features onednn` its matmuls run in bf16 where the CPU has the kernels), LoRA
//! adapters (rank 16 on every linear module, the base frozen); AdamW
//! through tensor ops vs the in-place kernel.

mod common;

use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Device, Tensor};
use safe::model::logprobs::{composite_logprobs, logprobs_from_hidden, Entropy, SequenceBatch};
use safe::model::{CausalLm, LoadedModel, ModelSource};
use safe::optim::{AdamW, AdamWConfig};

/// A `/proc/self/status` figure in MiB: `VmHWM` (peak RSS since the last reset) or `VmRSS`.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim_start_matches(':').trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
fn peak_mib() -> f64 {
    status_mib("VmHWM")
}
fn rss_mib() -> f64 {
    status_mib("VmRSS")
}
/// Reset the peak RSS (writing 5 to clear_refs).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    PaddedComposite,
    PaddedFused,
    /// PackedFused with the norms, RoPE, softmax and SwiGLU as composite ops (`fused_ops` off).
    PackedCompositeOps,
    PackedFused,
    Checkpointed,
    /// PackedFused computing in bf16 over f32 master weights (`model.dtype = "bf16"`).
    PackedBf16,
    /// PackedFused with LoRA adapters (rank 16, every linear module) the only trainable tensors.
    PackedLora,
    /// PackedLora computing in bf16.
    PackedLoraBf16,
}

/// Forward + backward of Σ mask·adv·logp / tokens; returns the gradients.
fn backward(model: &CausalLm, batch: &SequenceBatch, adv: &Tensor, v: Variant) -> GradStore {
    let loss_of = |hidden: &Tensor| -> anyhow::Result<(Tensor, ())> {
        let (lp, _) = if v == Variant::PaddedComposite {
            let (p, c) = (batch.prompt_width, batch.completion_width);
            composite_logprobs(model, &hidden.narrow(1, p - 1, c)?, batch, 1.0, 0, Entropy::Metric)?
        } else {
            logprobs_from_hidden(model, hidden, batch, 1.0, 0, Entropy::Metric)?
        };
        let tokens = batch.completion_mask.sum_all()?.to_scalar::<f32>()? as f64;
        Ok((((lp * &batch.completion_mask)?.broadcast_mul(adv)?.sum_all()? / -tokens)?, ()))
    };
    match v {
        Variant::Checkpointed => {
            model
                .checkpointed_backward(&batch.input_ids, &batch.positions, &batch.mask, &batch.packing, loss_of)
                .unwrap()
                .0
        }
        Variant::PackedFused
        | Variant::PackedCompositeOps
        | Variant::PackedBf16
        | Variant::PackedLora
        | Variant::PackedLoraBf16 => loss_of(&batch.hidden(model).unwrap()).unwrap().0.backward().unwrap(),
        _ => {
            let hidden = model.forward_hidden(&batch.input_ids, &batch.positions, &batch.mask, None).unwrap();
            loss_of(&hidden).unwrap().0.backward().unwrap()
        }
    }
}

/// Timed repeats per variant: 3, or `UPDATE_REPEATS` (more, to profile the timed part with `perf`).
fn repeats() -> usize {
    std::env::var("UPDATE_REPEATS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(3)
}

fn best_of(n: usize, mut f: impl FnMut()) -> f64 {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

const VARIANTS: [(&str, Variant); 8] = [
    ("padded, composite LM head (before)", Variant::PaddedComposite),
    ("padded, fused LM head", Variant::PaddedFused),
    ("packed, fused head, composite norms/rope/...", Variant::PackedCompositeOps),
    ("packed, fused head and ops (default)", Variant::PackedFused),
    ("packed, fused, gradient checkpointing", Variant::Checkpointed),
    ("packed, fused, bf16 compute (f32 masters)", Variant::PackedBf16),
    ("packed, fused, LoRA r16 all-linear", Variant::PackedLora),
    ("packed, fused, LoRA r16, bf16 compute", Variant::PackedLoraBf16),
];
const OPTIMIZERS: [(&str, bool); 2] = [("tensor ops (before)", false), ("in-place kernel (default)", true)];

fn main() {
    safe::init_threads();
    // `--run K`: measure variant K (0-7: forward + backward, 8-9: AdamW) in this process; otherwise one child each.
    let args: Vec<String> = std::env::args().collect();
    if let Some(k) = args.iter().position(|a| a == "--run").and_then(|i| args.get(i + 1)).and_then(|k| k.parse().ok()) {
        return safe::on_pool(move || run(k));
    }
    let exe = std::env::current_exe().unwrap();
    for k in 0..VARIANTS.len() + OPTIMIZERS.len() {
        if k == 0 || k == VARIANTS.len() {
            let what = if k == 0 { "forward + backward" } else { "AdamW step (134.5M parameters)" };
            println!("{what:<44} {:>10} {:>16}", "seconds", "peak +MiB");
        }
        let out = std::process::Command::new(&exe).args(["--run", &k.to_string()]).output().unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

fn run(k: usize) {
    let dev = Device::Cpu;
    let src = ModelSource::parse(&common::gguf_path(), None).expect("run scripts/fetch-smollm2.sh first");
    let loaded = LoadedModel::load(&src, &dev, DType::F32).expect("load SmolLM2");
    let bf16 = VARIANTS.get(k).is_some_and(|v| matches!(v.1, Variant::PackedBf16 | Variant::PackedLoraBf16));
    let compute = if bf16 { DType::BF16 } else { DType::F32 };
    let lora = VARIANTS.get(k).is_some_and(|v| matches!(v.1, Variant::PackedLora | Variant::PackedLoraBf16));
    let (mut model, _) = loaded.into_model(!lora, &dev, compute).expect("build");
    if lora {
        let spec = safe::model::lora::LoraSpec {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
            rslora: false,
            base_dtype: None,
            seed: 0,
            base_model: "SmolLM2-135M".into(),
        };
        model.add_lora(&spec, None).expect("adapters");
    }
    let lens = [64usize, 64, 56, 48, 40, 32, 24, 16];
    let prompts: Vec<Vec<u32>> =
        (0..8).map(|r| (0..40).map(|j| 1 + ((r * 131 + j * 17) % 40000) as u32).collect()).collect();
    let completions: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(r, &l)| (0..l).map(|j| 2 + ((r * 7919 + j * 31) % 49000) as u32).collect())
        .collect();
    let batch = SequenceBatch::new(&prompts, &completions, 2, None, &dev).unwrap();
    let adv = Tensor::new(&[1.0f32, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5], &dev).unwrap().unsqueeze(1).unwrap();
    let real: usize = prompts.iter().map(Vec::len).sum::<usize>() + lens.iter().sum::<usize>();
    if k == 0 {
        println!(
            "SmolLM2-135M, CPU f32, 8 sequences: {real} real tokens of {} padded, {} completion tokens",
            8 * (40 + 64),
            lens.iter().sum::<usize>()
        );
    }
    if k < VARIANTS.len() {
        let (name, v) = VARIANTS[k];
        safe::model::fused_ops::set_enabled(v != Variant::PackedCompositeOps);
        let base = rss_mib();
        reset_peak();
        backward(&model, &batch, &adv, v); // warm-up, and the peak of one pass
        let peak = peak_mib() - base;
        let secs = best_of(repeats(), || {
            backward(&model, &batch, &adv, v);
        });
        println!("{name:<44} {secs:>10.3} {peak:>16.0}");
    } else {
        let (name, fused) = OPTIMIZERS[k - VARIANTS.len()];
        let grads = backward(&model, &batch, &adv, Variant::PackedFused);
        let mut opt = AdamW::new(model.vars().to_vec(), AdamWConfig { lr: 1e-9, ..Default::default() }).unwrap();
        opt.set_fused_kernel(fused);
        opt.step(&grads).unwrap(); // touches the moments' pages
        let base = rss_mib();
        reset_peak();
        let secs = best_of(repeats(), || opt.step(&grads).unwrap());
        println!("{name:<44} {secs:>10.3} {:>16.0}", peak_mib() - base);
    }
}
