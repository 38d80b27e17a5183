//! The sampler of `sampling.rs` in tensor ops, run where the logits are (a GPU): only each row's uniform draw goes
//! to the device and only the chosen ids and their log-probs come back, never the full-vocabulary logits.
//!
//! Same rules and the same per-row uniform `u` as the host sampler, so a row draws the same token on either path
//! unless f32 rounding (here) and f64 (there) put a cumulative sum on different sides of `u · total`. Every op is
//! one Candle has on CUDA and Metal; no sort (Candle's CUDA `arg_sort` holds a whole row in shared memory, which a
//! 49k-150k vocabulary overflows):
//! - top-k and top-p thresholds by bisection on `s - max(s)` (the log of the unnormalised probability): the
//!   largest `τ` whose kept set `{s - max ≥ τ}` still holds k tokens, or `top_p` of the mass. Tokens tied at the
//!   threshold are all kept (the host keeps every tie for top-k, and for top-p the prefix in id order).
//! - the inverse CDF by a two-level prefix sum: sums of blocks of `BLOCK` ids, their running sum, then the running
//!   sum inside the one block `u · total` falls in. The token is the first with mass at or after the count of
//!   prefix sums `≤ u · total`, which is the host's rule (`cum > target`) and cannot land on a masked token.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};

use super::sampling::SamplingParams;

/// Ids per block of the inverse CDF's first level.
const BLOCK: usize = 256;
/// Bisection steps for a threshold: the interval [-LOG_FLOOR, 1] shrinks 2^-40 ≈ 1e-12, below f32's spacing of
/// any `s - max` but the closest few to 0.
const BISECTION_STEPS: usize = 40;
/// exp(-104) underflows f32 to 0: tokens further below the maximum never carry mass here.
const LOG_FLOOR: f64 = 104.0;

/// A scalar as a (1, 1) tensor made on the device itself: Candle's scalar operands are host tensors copied over
/// each time they are used, one synchronising copy per op on a GPU.
fn scalar(v: f64, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((1, 1), DType::F32, dev)?.affine(0.0, v)?)
}

/// One row's draw: the ids seen so far (for the repetition penalty) and its uniform in [0, 1) (unused when greedy).
pub struct RowDraw<'a> {
    pub history: &'a [u32],
    pub u: f64,
}

/// Sampling on one device for one vocabulary: holds the ids 0..vocab there (made once, not per token).
pub struct TensorSampler {
    ids: Tensor,
}

impl TensorSampler {
    pub fn new(vocab: usize, dev: &Device) -> Result<Self> {
        Ok(Self { ids: Tensor::arange(0f32, vocab as f32, dev)?.unsqueeze(0)? })
    }

    /// Choose a token for each row of `logits` (rows × vocab, any float dtype); returns each row's id and its
    /// log-prob under the temperature-scaled full distribution of the raw logits (the host sampler's contract).
    pub fn sample(&self, logits: &Tensor, params: &SamplingParams, rows: &[RowDraw]) -> Result<Vec<(u32, f32)>> {
        sample_rows(&self.ids, logits, params, rows)
    }
}

fn sample_rows(ids: &Tensor, logits: &Tensor, params: &SamplingParams, rows: &[RowDraw]) -> Result<Vec<(u32, f32)>> {
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (n, vocab) = logits.dims2()?;
    ensure!(n == rows.len(), "{} rows of logits for {} draws", n, rows.len());
    ensure!(ids.dim(1)? == vocab, "a sampler for {} ids given logits over {}", ids.dim(1)?, vocab);
    let dev = logits.device().clone();
    let t = if params.is_greedy() { 1.0 } else { params.temperature };
    let raw = (&logits / t)?;
    let lse = log_sum_exp(&raw)?;

    let scores = if params.repetition_penalty != 1.0 { penalised(&logits, params, rows, vocab)? } else { logits };
    let token = if params.is_greedy() {
        scores.argmax_keepdim(D::Minus1)?.to_dtype(DType::F32)?
    } else {
        let s = (scores / params.temperature)?;
        let d = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?;
        let mut kept = d.broadcast_ge(&scalar(-LOG_FLOOR, &dev)?)?.to_dtype(DType::F32)?;
        if params.top_k > 0 && params.top_k < vocab {
            let k = scalar(params.top_k as f64, &dev)?;
            let tau = bisect(&d, &kept, |m| Ok(m.sum_keepdim(D::Minus1)?.broadcast_ge(&k)?))?;
            kept = at_least(&kept, &d, &tau)?;
        }
        let p = (d.exp()? * &kept)?;
        if params.top_p < 1.0 {
            let need = (p.sum_keepdim(D::Minus1)? * params.top_p)?;
            let tau = bisect(&d, &kept, |m| Ok((&p * m)?.sum_keepdim(D::Minus1)?.ge(&need)?))?;
            kept = at_least(&kept, &d, &tau)?;
        }
        if params.min_p > 0.0 {
            // The maximum has p = 1 and is always kept, so the host's `p / total ≥ min_p · p_max / total` is this.
            kept = at_least(&kept, &d, &scalar(params.min_p.ln(), &dev)?)?;
        }
        let p = (p * kept)?;
        let u: Vec<f32> = rows.iter().map(|r| r.u as f32).collect();
        let target = (Tensor::from_vec(u, (n, 1), &dev)? * p.sum_keepdim(D::Minus1)?)?;
        inverse_cdf(ids, &p, &target)?
    };
    let token_ids = token.to_dtype(DType::U32)?;
    let logprob = (raw.gather(&token_ids, D::Minus1)? - lse)?;
    // One transfer: ids (exact in f32 below 2^24) beside their log-probs.
    let out = Tensor::cat(&[token, logprob], D::Minus1)?.to_vec2::<f32>()?;
    Ok(out.into_iter().map(|r| (r[0] as u32, r[1])).collect())
}

/// log Σ exp(x) over the last dim, kept as (rows, 1).
fn log_sum_exp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    Ok((x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?)
}

/// transformers' repetition penalty on each row's seen ids: negative scores multiplied, positive divided.
fn penalised(logits: &Tensor, params: &SamplingParams, rows: &[RowDraw], vocab: usize) -> Result<Tensor> {
    let seen: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| r.history.iter().copied().filter(|&id| (id as usize) < vocab).collect::<Vec<_>>())
        .collect();
    let width = seen.iter().map(Vec::len).max().unwrap_or(0);
    if width == 0 {
        return Ok(logits.clone());
    }
    // Pad each row with its own first id (or 0): a repeated index writes the same penalised value twice.
    let flat: Vec<u32> = seen
        .iter()
        .flat_map(|ids| {
            let pad = ids.first().copied().unwrap_or(0);
            ids.iter().copied().chain(std::iter::repeat_n(pad, width - ids.len()))
        })
        .collect();
    let idx = Tensor::from_vec(flat, (rows.len(), width), logits.device())?;
    let at = logits.gather(&idx, D::Minus1)?;
    let rp = params.repetition_penalty;
    let penalised = at.broadcast_lt(&scalar(0.0, logits.device())?)?.where_cond(&(&at * rp)?, &(&at / rp)?)?;
    // Rows with no seen id wrote their padding id 0 with the penalty: undo by writing them from the raw logits.
    let empty: Vec<u8> = seen.iter().flat_map(|ids| std::iter::repeat_n(ids.is_empty() as u8, width)).collect();
    let empty = Tensor::from_vec(empty, (rows.len(), width), logits.device())?;
    let source = empty.where_cond(&at, &penalised)?;
    Ok(logits.scatter(&idx, &source, D::Minus1)?)
}

/// The mask `kept` (1/0 as f32) narrowed to ids with `d ≥ tau` (`tau` per row, or one for all).
fn at_least(kept: &Tensor, d: &Tensor, tau: &Tensor) -> Result<Tensor> {
    Ok((kept * d.broadcast_ge(tau)?.to_dtype(DType::F32)?)?)
}

/// The largest τ in [-LOG_FLOOR, 0] (per row) with `holds(kept · [d ≥ τ])`, where `holds` is monotone: true for
/// small τ (the whole kept set), false above the maximum. Returns (rows, 1).
fn bisect(d: &Tensor, kept: &Tensor, holds: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let n = d.dim(0)?;
    let dev = d.device();
    let mut lo = scalar(-LOG_FLOOR, dev)?.broadcast_as((n, 1))?.contiguous()?;
    let mut hi = scalar(1.0, dev)?.broadcast_as((n, 1))?.contiguous()?;
    for _ in 0..BISECTION_STEPS {
        let mid = ((&lo + &hi)? * 0.5)?;
        let mask = at_least(kept, d, &mid)?;
        let ok = holds(&mask)?;
        lo = ok.where_cond(&mid, &lo)?;
        hi = ok.where_cond(&hi, &mid)?;
    }
    Ok(lo)
}

/// Per row, the first id with mass at or after the number of prefix sums of `p` that are `≤ target`; falls back
/// to the last id with mass when rounding puts `target` at or past the total. Returns ids as f32, (rows, 1).
fn inverse_cdf(ids: &Tensor, p: &Tensor, target: &Tensor) -> Result<Tensor> {
    let (n, vocab) = p.dims2()?;
    let dev = p.device();
    let blocks = vocab.div_ceil(BLOCK);
    let padded = if blocks * BLOCK == vocab {
        p.clone()
    } else {
        Tensor::cat(&[p, &Tensor::zeros((n, blocks * BLOCK - vocab), DType::F32, dev)?], 1)?
    };
    let grid = padded.reshape((n, blocks, BLOCK))?;
    let block_sums = grid.sum(D::Minus1)?; // (n, blocks)
    let block_cum = block_sums.cumsum(D::Minus1)?;
    let below = block_cum.broadcast_le(target)?.to_dtype(DType::F32)?.sum_keepdim(D::Minus1)?;
    let block = below.broadcast_minimum(&scalar((blocks - 1) as f64, dev)?)?; // (n, 1): the block holding target
    let block_ids = block.to_dtype(DType::U32)?;
    // The mass of the blocks before it.
    let before = (block_cum.gather(&block_ids, D::Minus1)? - block_sums.gather(&block_ids, D::Minus1)?)?;
    let pick = block_ids.unsqueeze(2)?.broadcast_as((n, 1, BLOCK))?.contiguous()?;
    let inner = grid.gather(&pick, 1)?.squeeze(1)?.cumsum(D::Minus1)?.broadcast_add(&before)?; // (n, BLOCK)
    let within = inner.broadcast_le(target)?.to_dtype(DType::F32)?.sum_keepdim(D::Minus1)?;
    let count = ((block * BLOCK as f64)? + within)?; // (n, 1) in [0, vocab]
                                                     // First id ≥ count with mass; else the last id with mass.
    let ids = ids.broadcast_as((n, vocab))?;
    let has_mass = p.broadcast_gt(&scalar(0.0, dev)?)?.to_dtype(DType::F32)?;
    // vocab where an id is no candidate, so the minimum is the first candidate (or vocab if none).
    let candidate = (has_mass.clone() * ids.broadcast_ge(&count)?.to_dtype(DType::F32)?)?;
    let first = (candidate.affine(-(vocab as f64), vocab as f64)? + (&candidate * &ids)?)?.min_keepdim(D::Minus1)?;
    let last = (has_mass * &ids)?.max_keepdim(D::Minus1)?;
    let found = first.broadcast_lt(&scalar(vocab as f64, dev)?)?;
    Ok(found.where_cond(&first, &last)?)
}

/// Whether sampling runs here rather than on the host: on any device but the CPU, where the host sampler reads
/// the logits in place (and is the path every CPU run's exact resume was measured on).
pub fn on_device(dev: &Device) -> bool {
    !dev.is_cpu()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::rng::{RowKey, RowRng};
    use crate::rollout::sampling::sample;

    /// Logits with a realistic spread (a few likely ids, a long tail), deterministic per (row, id).
    fn logits(rows: usize, vocab: usize, seed: u64) -> Vec<Vec<f32>> {
        (0..rows)
            .map(|r| {
                let mut rng = RowRng::new(RowKey { seed, step: 1, prompt: r as u64, sample: 0 });
                (0..vocab).map(|_| (rng.next_f64() * 6.0).powi(2) as f32 / 3.0 - 4.0).collect()
            })
            .collect()
    }

    /// Each row's (id, log-prob).
    type Picks = Vec<(u32, f32)>;

    /// Each row sampled by the host and by the tensor sampler from the same stream position.
    fn both(table: &[Vec<f32>], params: &SamplingParams, history: &[Vec<u32>]) -> (Picks, Picks) {
        let dev = Device::Cpu;
        let mut host = Vec::new();
        let mut draws_u = Vec::new();
        for (r, row) in table.iter().enumerate() {
            let mut rng = RowRng::new(RowKey { seed: 3, step: 0, prompt: r as u64, sample: 1 });
            draws_u.push(if params.is_greedy() { 0.0 } else { rng.clone().next_f64() });
            host.push(sample(row, params, &history[r], &mut rng));
        }
        let draws: Vec<RowDraw> = history.iter().zip(&draws_u).map(|(h, &u)| RowDraw { history: h, u }).collect();
        let vocab = table[0].len();
        let flat: Vec<f32> = table.concat();
        let t = Tensor::from_vec(flat, (table.len(), vocab), &dev).unwrap();
        let device = TensorSampler::new(vocab, &dev).unwrap().sample(&t, params, &draws).unwrap();
        (host, device)
    }

    /// The two paths agree on the token (all but rounding cases at a CDF boundary: none are expected in 128 rows)
    /// and on its log-prob to f32 rounding.
    fn assert_agree(params: SamplingParams, with_history: bool) {
        // 1000 ids: not a multiple of BLOCK, so the last block is padded.
        let table = logits(128, 1000, 11);
        let history: Vec<Vec<u32>> =
            (0..128).map(|r| if with_history { vec![r as u32 * 7 % 1000, 3, 999, 5000] } else { vec![] }).collect();
        let (host, device) = both(&table, &params, &history);
        let mismatched: Vec<usize> = (0..128).filter(|&r| host[r].0 != device[r].0).collect();
        assert!(mismatched.is_empty(), "{params:?}: rows {mismatched:?} differ: {:?} vs {:?}", host, device);
        for (h, d) in host.iter().zip(&device) {
            assert!((h.1 - d.1).abs() < 1e-4, "{params:?}: log-prob {} vs {}", h.1, d.1);
        }
    }

    #[test]
    fn greedy_matches_the_host_sampler() {
        assert_agree(SamplingParams::greedy(), false);
        assert_agree(SamplingParams { repetition_penalty: 1.3, ..SamplingParams::greedy() }, true);
    }

    #[test]
    fn unfiltered_draws_match_the_host_sampler() {
        assert_agree(SamplingParams::default(), false);
        assert_agree(SamplingParams { temperature: 0.7, ..Default::default() }, false);
        assert_agree(SamplingParams { temperature: 1.3, repetition_penalty: 1.2, ..Default::default() }, true);
    }

    #[test]
    fn top_k_top_p_and_min_p_draws_match_the_host_sampler() {
        assert_agree(SamplingParams { top_k: 20, ..Default::default() }, false);
        assert_agree(SamplingParams { top_k: 1, ..Default::default() }, false);
        assert_agree(SamplingParams { top_p: 0.9, ..Default::default() }, false);
        assert_agree(SamplingParams { top_p: 0.3, temperature: 0.8, ..Default::default() }, false);
        assert_agree(SamplingParams { min_p: 0.1, ..Default::default() }, false);
        assert_agree(
            SamplingParams { top_k: 50, top_p: 0.95, min_p: 0.05, temperature: 0.9, repetition_penalty: 1.1 },
            true,
        );
    }

    #[test]
    fn filters_restrict_the_support_and_keep_ties() {
        // probs ∝ [8, 4, 2, 1, 1] (as in sampling.rs), many draws: only the kept ids ever come out.
        let row: Vec<f32> = [8.0f32, 4.0, 2.0, 1.0, 1.0].iter().map(|x| x.ln()).collect();
        let n = 400;
        let table = vec![row; n];
        let support = |params: SamplingParams| {
            let (_, device) = both(&table, &params, &vec![vec![]; n]);
            let mut seen = [0usize; 5];
            for (id, _) in device {
                seen[id as usize] += 1;
            }
            seen
        };
        let s = support(SamplingParams { top_k: 2, ..Default::default() });
        assert!(s[0] > 0 && s[1] > 0 && s[2..].iter().all(|&c| c == 0), "{s:?}");
        // top_k = 4: the 4th most likely ties the 5th, and both are kept (transformers' rule).
        let s = support(SamplingParams { top_k: 4, ..Default::default() });
        assert!(s.iter().all(|&c| c > 0), "{s:?}");
        let s = support(SamplingParams { top_p: 0.7, ..Default::default() });
        assert!(s[0] > 0 && s[1] > 0 && s[2..].iter().all(|&c| c == 0), "{s:?}");
        let s = support(SamplingParams { min_p: 0.2, ..Default::default() });
        assert!(s[2] > 0 && s[3] == 0 && s[4] == 0, "{s:?}");
        // Unfiltered: id 0 about half the time.
        let s = support(SamplingParams::default());
        assert!((s[0] as f64 / n as f64 - 0.5).abs() < 0.08, "{s:?}");
    }

    #[test]
    fn masked_ids_are_never_drawn_even_at_the_top_of_the_cdf() {
        // Only ids 1 and 3 have mass; u just below 1 must land on 3, not on the masked ids after it.
        let row = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
        let t = Tensor::from_vec(row.repeat(3), (3, 6), &Device::Cpu).unwrap();
        let draws: Vec<RowDraw> = [0.0, 0.49, 0.999_999_999].iter().map(|&u| RowDraw { history: &[], u }).collect();
        let got = TensorSampler::new(6, &Device::Cpu).unwrap().sample(&t, &SamplingParams::default(), &draws).unwrap();
        let ids: Vec<u32> = got.iter().map(|g| g.0).collect();
        assert_eq!(ids, vec![1, 1, 3]);
        assert!(got.iter().all(|g| (g.1 - 0.5f32.ln()).abs() < 1e-6), "{got:?}");
    }
}
