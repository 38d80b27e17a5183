//! Decoding with LoRA adapters on SmolLM2-135M-Instruct (CPU, greedy, 64 new tokens): the adapters merged into
//! decode copies of the weights (`CausalLm::enable_decode_copies`, what rollouts use) against the adapter term
//! computed beside each layer (two extra products per layer per token), with the base alone for scale; f32 and
//! bf16 copies. Rounds alternate the variants so a noisy machine slows them alike; medians are printed.
//!
//! Run: `cargo bench --bench lora_decode` (the GGUF path comes from SAFE_SMOLLM2_GGUF or the cache filled by
//! scripts/fetch-smollm2.sh). Prints one line per variant and batch size and a JSON summary line.

mod common;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use safe::model::lora::{LoraSpec, LINEAR_MODULES};
use safe::model::{CausalLm, LoadedModel, ModelSource};
use safe::rollout::generate;

const NEW_TOKENS: usize = 64;
const ROUNDS: usize = 5;
const RANK: usize = 16;

/// Seconds to decode `batch` rows of NEW_TOKENS greedy tokens.
fn decode_seconds(model: &CausalLm, prompts: &[Vec<u32>], batch: usize) -> f64 {
    let (reqs, cfg) = common::greedy_workload(prompts, batch, NEW_TOKENS);
    let t = Instant::now();
    let out = generate(model, None, &reqs, &cfg, None).expect("generate");
    assert!(out.iter().all(|c| c.ids.len() == NEW_TOKENS));
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// On a pool thread, as the binary runs (`safe::on_pool`).
fn main() {
    safe::init_threads();
    safe::on_pool(bench);
}

fn bench() {
    let src = ModelSource::parse(&common::gguf_path(), None).expect("run scripts/fetch-smollm2.sh first");
    let build = || {
        let loaded = LoadedModel::load(&src, &Device::Cpu, DType::F32).expect("load SmolLM2");
        loaded.into_model(false, &Device::Cpu, DType::F32).expect("build")
    };
    let (base, tok) = build();
    let tok = tok.expect("the GGUF carries a tokenizer");
    let prompts: Vec<Vec<u32>> =
        ["The quick brown fox jumps over the lazy dog. Meanwhile,", "Once upon a time there was a"]
            .iter()
            .map(|t| tok.encode(t).expect("tokenize"))
            .collect();
    let spec = LoraSpec {
        rank: RANK,
        alpha: 32.0,
        dropout: 0.0,
        targets: LINEAR_MODULES.iter().map(|m| m.to_string()).collect(),
        rslora: false,
        base_dtype: None,
        seed: 0,
        base_model: "SmolLM2-135M-Instruct".into(),
    };
    let adapted = |spec: &LoraSpec| {
        let mut policy = build().0;
        policy.add_lora(spec, None).expect("lora");
        // Trained-looking adapters: B off zero, so the merged copies differ from the base.
        for (name, var) in policy.vars() {
            if name.ends_with("lora_B.weight") {
                let (o, r) = var.as_tensor().dims2().unwrap();
                let data: Vec<f32> = (0..o * r).map(|i| ((i % 13) as f32 - 6.0) * 1e-3).collect();
                var.set(&Tensor::from_vec(data, (o, r), &Device::Cpu).unwrap()).unwrap();
            }
        }
        policy
    };
    let policy = adapted(&spec);
    // lora.base_dtype = "bf16": the base held in bf16, unmerged (bf16 weights streamed as they are) and merged.
    let bf16_base = adapted(&LoraSpec { base_dtype: Some(DType::BF16), ..spec.clone() });
    let unmerged_bf16_base = bf16_base.frozen_view().unwrap();
    let mut merged_bf16_base = bf16_base.frozen_view().unwrap();
    merged_bf16_base.enable_decode_copies(true).unwrap();
    let unmerged = policy.frozen_view().unwrap();
    let mut merged = policy.frozen_view().unwrap();
    merged.enable_decode_copies(false).unwrap();
    let mut merged_bf16 = policy.frozen_view().unwrap();
    merged_bf16.enable_decode_copies(true).unwrap();
    let mut base_bf16 = base.frozen_view().unwrap();
    base_bf16.enable_decode_copies(true).unwrap();
    let t = Instant::now();
    merged.refresh_decode_copies().unwrap();
    let refresh_f32 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    merged_bf16.refresh_decode_copies().unwrap();
    let refresh_bf16 = t.elapsed().as_secs_f64();
    let variants: [(&str, &CausalLm); 7] = [
        ("base, no adapters (f32)", &base),
        ("LoRA unmerged (f32)", &unmerged),
        ("LoRA merged copies (f32)", &merged),
        ("base, bf16 copies", &base_bf16),
        ("LoRA merged bf16 copies", &merged_bf16),
        ("bf16 base, LoRA unmerged", &unmerged_bf16_base),
        ("bf16 base, merged bf16", &merged_bf16_base),
    ];
    println!(
        "SmolLM2-135M-Instruct + LoRA r{RANK} on all linear layers, CPU, greedy, {NEW_TOKENS} new tokens, median of {ROUNDS} alternating rounds"
    );
    println!("refresh of the merged copies: f32 {:.3} s, bf16 {:.3} s", refresh_f32, refresh_bf16);
    let mut summary = serde_json::json!({"bench": "lora_decode", "rank": RANK, "new_tokens": NEW_TOKENS,
        "refresh_f32_s": refresh_f32, "refresh_bf16_s": refresh_bf16});
    for batch in [1usize, 16] {
        let mut times = vec![Vec::new(); variants.len()];
        decode_seconds(&base, &prompts, batch); // warm-up
        for _ in 0..ROUNDS {
            for (i, (_, m)) in variants.iter().enumerate() {
                times[i].push(decode_seconds(m, &prompts, batch));
            }
        }
        let med: Vec<f64> = times.into_iter().map(median).collect();
        for (i, (name, _)) in variants.iter().enumerate() {
            let tok_s = (batch * NEW_TOKENS) as f64 / med[i];
            println!("batch {batch:2}  {name:26} {tok_s:8.1} tokens/s  ({:.2}x the unmerged LoRA)", med[1] / med[i]);
            summary[format!("b{batch}_{}", name.replace([' ', ',', '(', ')'], "_"))] = tok_s.into();
        }
        summary[format!("b{batch}_merged_over_unmerged")] = (med[1] / med[2]).into();
    }
    println!("{summary}");
}
