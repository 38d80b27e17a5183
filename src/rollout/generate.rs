//! Batched generation: prompts left-padded into a batch, one prefill, then one decode step per token over a KV
//! cache. Each row has its own position ids and random stream. Finished rows are dropped from the batch (the cache
//! keeps only live rows), so no compute goes to padding after a row stops.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use indicatif::ProgressBar;
use serde::Serialize;

use super::rng::{RowKey, RowRng};
use super::sampling::{sample, SamplingParams};
use super::tensor_sampling::{self, RowDraw, TensorSampler};
use crate::model::{attention_mask, positions_from_mask, CausalLm, KvCache, Tokenizer};

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Sampled an EOS id (included in the completion).
    Eos,
    /// The decoded text reached a stop string (the token completing it is included).
    Stop,
    /// Hit `max_new_tokens` without EOS: the completion is truncated.
    Length,
}

impl FinishReason {
    /// The one rule for "truncated" (`algorithm.mask_truncated_completions`, `completions/clipped_ratio`): cut at
    /// `max_new_tokens`. A completion that ended at EOS or at a stop string ended on its own.
    pub fn is_truncated(self) -> bool {
        self == FinishReason::Length
    }
}

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub eos_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Rows decoded together (prompts × samples are chunked by this).
    pub batch_size: usize,
    /// Token id used to left-pad prompts (never attended to).
    pub pad_id: u32,
}

/// One completion to produce: its prompt ids and the key of its random stream.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub key: RowKey,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub ids: Vec<u32>,
    /// Log-prob of each sampled id under the temperature-scaled full distribution.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// State of one live row during decoding.
struct Row {
    index: usize,
    history: Vec<u32>,
    valid: Vec<bool>,
    next_pos: u32,
    rng: RowRng,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
}

/// Generate one completion per request, in request order. `tokenizer` is needed only for stop strings.
pub fn generate(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    requests: &[Request],
    cfg: &GenerationConfig,
    progress: Option<&ProgressBar>,
) -> Result<Vec<Completion>> {
    if cfg.batch_size == 0 {
        bail!("generation batch size must be at least 1");
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        bail!("stop strings need a tokenizer");
    }
    let mut out: Vec<Option<Completion>> = vec![None; requests.len()];
    let on_device = tensor_sampling::on_device(model.device());
    for (chunk_no, chunk) in requests.chunks(cfg.batch_size).enumerate() {
        crate::signal::check()?;
        let base = chunk_no * cfg.batch_size;
        for (i, c) in generate_batch(model, tokenizer, chunk, cfg, on_device)?.into_iter().enumerate() {
            out[base + i] = Some(c);
        }
        if let Some(p) = progress {
            p.inc(chunk.len() as u64);
        }
    }
    Ok(out.into_iter().map(|c| c.expect("every request produced a completion")).collect())
}

fn generate_batch(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    requests: &[Request],
    cfg: &GenerationConfig,
    on_device: bool,
) -> Result<Vec<Completion>> {
    let dev = model.device();
    let width = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    if requests.iter().any(|r| r.prompt.is_empty()) {
        bail!("cannot generate from an empty prompt");
    }
    let mut rows: Vec<Row> = requests
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let pad = width - r.prompt.len();
            Row {
                index,
                history: r.prompt.clone(),
                valid: [vec![false; pad], vec![true; r.prompt.len()]].concat(),
                next_pos: r.prompt.len() as u32,
                rng: RowRng::new(r.key),
                ids: Vec::new(),
                logprobs: Vec::new(),
            }
        })
        .collect();
    let mut done: Vec<Option<Completion>> = vec![None; requests.len()];

    // Prefill each distinct prompt once (the G samples of a GRPO group share one), then copy its cache rows to
    // every request with that prompt. Only the last column's logits are needed.
    let mut distinct: Vec<usize> = Vec::new();
    let mut slot_of: Vec<u32> = Vec::with_capacity(requests.len());
    let mut first_seen: std::collections::HashMap<&[u32], u32> = std::collections::HashMap::new();
    for (i, r) in requests.iter().enumerate() {
        let slot = *first_seen.entry(r.prompt.as_slice()).or_insert_with(|| {
            distinct.push(i);
            (distinct.len() - 1) as u32
        });
        slot_of.push(slot);
    }
    let mut cache = KvCache::new(model.config().num_layers);
    let flat: Vec<u32> = distinct
        .iter()
        .flat_map(|&i| {
            let p = &requests[i].prompt;
            std::iter::repeat_n(cfg.pad_id, width - p.len()).chain(p.iter().copied())
        })
        .collect();
    let input = Tensor::from_vec(flat, (distinct.len(), width), dev)?;
    let valid: Vec<Vec<bool>> = distinct.iter().map(|&i| rows[i].valid.clone()).collect();
    let pos = Tensor::new(positions_from_mask(&valid), dev)?;
    let mask = attention_mask(&valid, width, model.config().sliding_window, dev)?;
    let hidden = model.forward_hidden(&input, &pos, &mask, Some(&mut cache))?;
    let mut logits = model.logits(&hidden.narrow(1, width - 1, 1)?)?;
    if distinct.len() < requests.len() {
        let slots = Tensor::new(slot_of.as_slice(), dev)?;
        cache.select_rows(&slots)?;
        logits = logits.index_select(&slots, 0)?;
    }

    let sampler = if on_device { Some(TensorSampler::new(logits.dim(D::Minus1)?, dev)?) } else { None };
    while !rows.is_empty() {
        // A stop request abandons the rollout (the step is not finished, so nothing of it is kept).
        crate::signal::check()?;
        let picks = choose(sampler.as_ref(), &logits.squeeze(1)?, &cfg.sampling, &mut rows)?;
        let mut keep = Vec::with_capacity(rows.len());
        for (slot, (row, (token, lp))) in rows.iter_mut().zip(picks).enumerate() {
            row.ids.push(token);
            row.logprobs.push(lp);
            row.history.push(token);
            let finish = if cfg.eos_ids.contains(&token) {
                Some(FinishReason::Eos)
            } else if hits_stop(tokenizer, &row.ids, &cfg.stop_strings)? {
                Some(FinishReason::Stop)
            } else if row.ids.len() >= cfg.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            match finish {
                Some(finish) => {
                    done[row.index] = Some(Completion {
                        ids: std::mem::take(&mut row.ids),
                        logprobs: std::mem::take(&mut row.logprobs),
                        finish,
                    })
                }
                None => keep.push(slot as u32),
            }
        }
        if keep.len() < rows.len() {
            // `keep` is ascending: walk it alongside the rows.
            let mut slot = 0u32;
            let mut next = keep.iter().peekable();
            rows.retain(|_| {
                let live = next.next_if_eq(&&slot).is_some();
                slot += 1;
                live
            });
            if rows.is_empty() {
                break;
            }
            cache.select_rows(&Tensor::new(keep.as_slice(), dev)?)?;
        }
        // One decode step for the live rows.
        let last: Vec<u32> = rows.iter().map(|r| *r.history.last().unwrap()).collect();
        let positions: Vec<u32> = rows.iter().map(|r| r.next_pos).collect();
        for r in rows.iter_mut() {
            r.valid.push(true);
            r.next_pos += 1;
        }
        let n = rows.len();
        let input = Tensor::from_vec(last, (n, 1), dev)?;
        let pos = Tensor::from_vec(positions, (n, 1), dev)?;
        let valid: Vec<Vec<bool>> = rows.iter().map(|r| r.valid.clone()).collect();
        let mask = attention_mask(&valid, 1, model.config().sliding_window, dev)?;
        logits = model.forward(&input, &pos, &mask, Some(&mut cache))?;
    }
    Ok(done.into_iter().map(|c| c.expect("every row finished")).collect())
}

/// Each live row's next token and its log-prob: on the device by `sampler` when there is one (only ids and
/// log-probs come back), else on the host from the logits read in place. Both draw the same uniform from the row's
/// stream (none when greedy).
fn choose(
    sampler: Option<&TensorSampler>,
    logits: &Tensor,
    params: &SamplingParams,
    rows: &mut [Row],
) -> Result<Vec<(u32, f32)>> {
    match sampler {
        Some(sampler) => {
            let us: Vec<f64> =
                rows.iter_mut().map(|r| if params.is_greedy() { 0.0 } else { r.rng.next_f64() }).collect();
            let draws: Vec<RowDraw> = rows.iter().zip(us).map(|(r, u)| RowDraw { history: &r.history, u }).collect();
            sampler.sample(logits, params, &draws)
        }
        None => {
            let table: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            Ok(rows.iter_mut().zip(&table).map(|(r, l)| sample(l, params, &r.history, &mut r.rng)).collect())
        }
    }
}

/// Whether the decoded completion contains a stop string. Only the tail can newly match, so decode just enough
/// trailing tokens to cover the longest stop string (a token decodes to at least one byte, or to nothing).
fn hits_stop(tokenizer: Option<&Tokenizer>, ids: &[u32], stops: &[String]) -> Result<bool> {
    let (Some(tok), false) = (tokenizer, stops.is_empty()) else { return Ok(false) };
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let tail = &ids[ids.len().saturating_sub(longest + 2)..];
    let text = tok.decode(tail, false)?;
    Ok(stops.iter().any(|s| text.contains(s.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::builtin;
    use candle_core::Device;

    /// The tensor sampler (a GPU's path) run on the CPU through the whole decode loop gives the host sampler's
    /// completions: same ids, finish reasons, and log-probs to f32 rounding (both draw from the same row streams).
    #[test]
    fn tensor_sampling_generates_what_host_sampling_does() {
        let cfg = builtin::config("tiny").unwrap();
        let w = builtin::weights(&cfg, 7, &Device::Cpu, DType::F32).unwrap();
        let model = CausalLm::from_tensors(&cfg, w, false, &Device::Cpu, DType::F32).unwrap();
        let requests: Vec<Request> = (0..6u64)
            .map(|i| Request {
                prompt: vec![257, 50 + i as u32, 43, 51][..2 + i as usize % 3].to_vec(),
                key: RowKey { seed: 5, step: 1, prompt: i / 2, sample: i % 2 },
            })
            .collect();
        let settings = [
            SamplingParams::default(),
            SamplingParams::greedy(),
            SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.9, min_p: 0.02, repetition_penalty: 1.2 },
        ];
        for sampling in settings {
            let gen = GenerationConfig {
                sampling: sampling.clone(),
                max_new_tokens: 24,
                eos_ids: cfg.eos_token_ids.clone(),
                stop_strings: vec![],
                batch_size: 6,
                pad_id: 0,
            };
            let host = generate_batch(&model, None, &requests, &gen, false).unwrap();
            let tensor = generate_batch(&model, None, &requests, &gen, true).unwrap();
            for (h, t) in host.iter().zip(&tensor) {
                assert_eq!((&h.ids, h.finish), (&t.ids, t.finish), "{sampling:?}");
                let worst = h.logprobs.iter().zip(&t.logprobs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{sampling:?}: log-probs differ by {worst}");
            }
        }
    }
}
