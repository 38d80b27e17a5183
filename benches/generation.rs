//! Generation throughput on SmolLM2-135M-Instruct (CPU, f32, greedy, 64 new tokens): our batched generator at
//! batch 1 and 16, and candle-transformers' own Llama (batch 1, KV cache) on the same dequantised weights.
//!
//! Run: `cargo bench --bench generation` (the GGUF path comes from SAFE_SMOLLM2_GGUF or the cache filled by
//! scripts/fetch-smollm2.sh). Prints one line per configuration and a JSON summary line.

mod common;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use safe::model::{CausalLm, LoadedModel, ModelSource};
use safe::rollout::generate;

const NEW_TOKENS: usize = 64;
const REPEATS: usize = 3;

/// Prompts of different lengths (fixture-like texts), tokenised by the model's own tokenizer.
fn prompt_ids(tok: &safe::model::Tokenizer) -> Vec<Vec<u32>> {
    [
        "The quick brown fox jumps over the lazy dog. Meanwhile, in the small village by the river,",
        "Question: If a train travels at 60 miles per hour for 3 hours, how many miles does it travel?\nAnswer:",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "Once upon a time there was a",
    ]
    .iter()
    .map(|t| tok.encode(t).expect("tokenize"))
    .collect()
}

fn ours(model: &CausalLm, prompts: &[Vec<u32>], batch: usize) -> f64 {
    let (reqs, cfg) = common::greedy_workload(prompts, batch, NEW_TOKENS);
    let mut best = f64::MAX;
    for _ in 0..REPEATS {
        let t = Instant::now();
        let out = generate(model, None, &reqs, &cfg, None).expect("generate");
        assert!(out.iter().all(|c| c.ids.len() == NEW_TOKENS));
        best = best.min(t.elapsed().as_secs_f64());
    }
    (batch * NEW_TOKENS) as f64 / best
}

fn candle_llama(model: &CausalLm, prompt: &[u32]) -> f64 {
    use candle_transformers::models::llama as ct;
    let cfg = model.config().candle_llama_config();
    let dev = Device::Cpu;
    let vb = candle_nn::VarBuilder::from_tensors(model.named_tensors().into_iter().collect(), DType::F32, &dev);
    let theirs = ct::Llama::load(vb, &cfg).expect("candle-transformers llama");
    let mut best = f64::MAX;
    for _ in 0..REPEATS {
        let mut cache = ct::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
        let t = Instant::now();
        let mut input = Tensor::new(prompt, &dev).unwrap().unsqueeze(0).unwrap();
        let mut pos = 0;
        for _ in 0..NEW_TOKENS {
            let len = input.dim(1).unwrap();
            let logits = theirs.forward(&input, pos, &mut cache).unwrap();
            pos += len;
            let next = logits.squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
            input = Tensor::new(&[[next]], &dev).unwrap();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    NEW_TOKENS as f64 / best
}

/// On a pool thread, as the binary runs (`safe::on_pool`).
fn main() {
    safe::init_threads();
    safe::on_pool(bench);
}

fn bench() {
    let path = common::gguf_path();
    let src = ModelSource::parse(&path, None).expect("run scripts/fetch-smollm2.sh first");
    let loaded = LoadedModel::load(&src, &Device::Cpu, DType::F32).expect("load SmolLM2");
    let (model, tok) = loaded.into_model(false, &Device::Cpu, DType::F32).expect("build");
    let tok = tok.expect("the GGUF carries a tokenizer");
    let prompts = prompt_ids(&tok);
    println!("SmolLM2-135M-Instruct, CPU f32, greedy, {NEW_TOKENS} new tokens, best of {REPEATS}");
    let b1 = ours(&model, &prompts, 1);
    println!("safe batch 1:                 {b1:8.1} tokens/s");
    let b16 = ours(&model, &prompts, 16);
    println!("safe batch 16:                {b16:8.1} tokens/s  ({:.1}x batch 1)", b16 / b1);
    let ct = candle_llama(&model, &prompts[0]);
    println!("candle-transformers batch 1:  {ct:8.1} tokens/s");
    println!(
        "{}",
        serde_json::json!({"bench": "generation", "new_tokens": NEW_TOKENS, "safe_b1_tok_s": b1,
            "safe_b16_tok_s": b16, "candle_transformers_b1_tok_s": ct, "b16_over_b1": b16 / b1,
            "safe_b1_over_candle_b1": b1 / ct})
    );
}
