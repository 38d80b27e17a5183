//! Per-token log-probs of completions given their prompts: the quantity every policy-gradient loss and KL term
//! is built from. Prompts are left-padded to one width and completions right-padded to another, so completion
//! token `j` of every row sits at the same column and one forward covers the batch; its per-token layers run on the
//! real tokens only ([`SequenceBatch::hidden`]). Only completion positions go through the LM head and only the
//! sampled token's log-prob is kept: on the CPU in f32 by the fused op of [`super::fused_head`] (no vocab-sized
//! tensor in the graph), elsewhere in chunks of `[rows, chunk, vocab]` logits (all of the micro-batch's chunks stay
//! in the graph when gradients are recorded).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

use super::llama::{attention_mask, log_softmax_last_dim, positions_from_mask, CausalLm, Packing};

/// A batch of prompt + completion sequences laid out for one forward.
pub struct SequenceBatch {
    /// `[b, P + C]` token ids (padding: `pad_id`).
    pub input_ids: Tensor,
    /// `[b, P + C]` position ids counted from each row's first prompt token.
    pub positions: Tensor,
    /// Additive causal + padding mask `[b, 1, P + C, P + C]`.
    pub mask: Tensor,
    /// P: the padded prompt width.
    pub prompt_width: usize,
    /// C: the padded completion width.
    pub completion_width: usize,
    /// `[b, C]` completion ids (the targets; padding positions hold `pad_id`).
    pub targets: Tensor,
    /// `[b, C]` f32: 1 for real completion tokens (up to and including EOS), 0 for padding.
    pub completion_mask: Tensor,
    /// The real tokens, for a forward that spends nothing on padding ([`SequenceBatch::hidden`]).
    pub packing: Packing,
}

impl SequenceBatch {
    pub fn new(
        prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
        pad_id: u32,
        sliding_window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        Self::with_width(prompts, completions, pad_id, sliding_window, device, 0)
    }

    /// Like [`SequenceBatch::new`], with completions padded to at least `min_completion_width` columns (so
    /// micro-batches of one step line up with the step's `[n, C]` arrays).
    pub fn with_width(
        prompts: &[Vec<u32>],
        completions: &[Vec<u32>],
        pad_id: u32,
        sliding_window: Option<usize>,
        device: &Device,
        min_completion_width: usize,
    ) -> Result<Self> {
        if prompts.len() != completions.len() || prompts.is_empty() {
            bail!("sequence batch: {} prompts for {} completions", prompts.len(), completions.len());
        }
        if prompts.iter().any(Vec::is_empty) {
            bail!("sequence batch: empty prompt");
        }
        let p = prompts.iter().map(Vec::len).max().unwrap();
        let c = completions.iter().map(Vec::len).max().unwrap().max(1).max(min_completion_width);
        let b = prompts.len();
        let mut ids = Vec::with_capacity(b * (p + c));
        let mut valid = Vec::with_capacity(b);
        let mut targets = Vec::with_capacity(b * c);
        let mut cmask = Vec::with_capacity(b * c);
        for (pr, co) in prompts.iter().zip(completions) {
            let (lpad, rpad) = (p - pr.len(), c - co.len());
            ids.extend(std::iter::repeat_n(pad_id, lpad).chain(pr.iter().copied()));
            ids.extend(co.iter().copied().chain(std::iter::repeat_n(pad_id, rpad)));
            valid.push([vec![false; lpad], vec![true; pr.len() + co.len()], vec![false; rpad]].concat());
            targets.extend(co.iter().copied().chain(std::iter::repeat_n(pad_id, rpad)));
            cmask.extend(std::iter::repeat_n(1f32, co.len()).chain(std::iter::repeat_n(0f32, rpad)));
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, p + c), device)?,
            positions: Tensor::new(positions_from_mask(&valid), device)?,
            mask: attention_mask(&valid, p + c, sliding_window, device)?,
            prompt_width: p,
            completion_width: c,
            targets: Tensor::from_vec(targets, (b, c), device)?,
            completion_mask: Tensor::from_vec(cmask, (b, c), device)?,
            packing: Packing::new(&valid, device)?,
        })
    }

    /// The final hidden states `[b, P + C, hidden]` of `model` on this batch (zeros at padding positions), with the
    /// per-token layers run on the real tokens only.
    pub fn hidden(&self, model: &CausalLm) -> Result<Tensor> {
        model.forward_hidden_packed(&self.input_ids, &self.positions, &self.mask, None, Some(&self.packing))
    }
}

/// What to compute of the per-token entropy of the sampling distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entropy {
    None,
    /// A metric: from detached log-probs, so no vocab-sized tensor joins the autograd graph.
    Metric,
    /// Differentiable (an entropy bonus in the loss); keeps `[b, chunk, vocab]` tensors in the graph.
    Differentiable,
}

/// Log-probs `[b, C]` (f32) of each completion token under `softmax(logits / temperature)`, and optionally the
/// per-token entropy `[b, C]` of that distribution (a metric: it carries no gradient). `chunk` = completion positions per LM-head call (0 = all).
/// Differentiable when `model` is trainable; padding positions hold 0 (or finite values) that the mask removes.
pub fn completion_logprobs(
    model: &CausalLm,
    batch: &SequenceBatch,
    temperature: f64,
    chunk: usize,
    with_entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let hidden = batch.hidden(model)?;
    let entropy = if with_entropy { Entropy::Metric } else { Entropy::None };
    logprobs_from_hidden(model, &hidden, batch, temperature, chunk, entropy)
}

/// [`completion_logprobs`] from the final hidden states `[b, P + C, hidden]` of a forward already made (so a caller
/// can also read other positions, e.g. a value head's).
pub fn logprobs_from_hidden(
    model: &CausalLm,
    hidden: &Tensor,
    batch: &SequenceBatch,
    temperature: f64,
    chunk: usize,
    entropy: Entropy,
) -> Result<(Tensor, Option<Tensor>)> {
    // The hidden state at column t predicts the token at column t + 1.
    let (p, c) = (batch.prompt_width, batch.completion_width);
    let hidden = hidden.narrow(1, p - 1, c)?;
    // On the CPU, one fused op (no `[rows, vocab]` tensor in the graph, nothing computed at padding), in f32.
    if entropy != Entropy::Differentiable && super::fused_head::supported(hidden.device(), hidden.dtype()) {
        let b = hidden.dim(0)?;
        let flat = hidden.reshape((b * c, hidden.dim(2)?))?;
        let targets = batch.targets.flatten_all()?.to_vec1::<u32>()?;
        let active: Vec<bool> =
            batch.completion_mask.flatten_all()?.to_vec1::<f32>()?.iter().map(|&m| m > 0.0).collect();
        let rows = super::fused_head::ROWS;
        let (lp, ent) =
            super::fused_head::head_logprobs(&flat, model.lm_head_weight(), &targets, &active, temperature, rows)?;
        let ent = (entropy == Entropy::Metric).then(|| ent.reshape((b, c))).transpose()?;
        return Ok((lp.reshape((b, c))?, ent));
    }
    composite_logprobs(model, &hidden, batch, temperature, chunk, entropy)
}

/// [`logprobs_from_hidden`] from tensor ops (any device and dtype, and a differentiable entropy): the LM head over
/// `chunk` completion positions at a time, log-softmax, gather. `hidden` is `[b, C, hidden]`, already narrowed to the
/// positions that predict the completion tokens. With gradients, every chunk's logits stay in the graph.
pub fn composite_logprobs(
    model: &CausalLm,
    hidden: &Tensor,
    batch: &SequenceBatch,
    temperature: f64,
    chunk: usize,
    entropy: Entropy,
) -> Result<(Tensor, Option<Tensor>)> {
    let c = batch.completion_width;
    let chunk = if chunk == 0 { c } else { chunk.min(c) };
    let inv_t = if temperature > 0.0 { 1.0 / temperature } else { 1.0 };
    let mut lps = Vec::new();
    let mut ents = Vec::new();
    let mut start = 0;
    while start < c {
        let len = chunk.min(c - start);
        let logits = (model.logits(&hidden.narrow(1, start, len)?)?.to_dtype(DType::F32)? * inv_t)?;
        let logp = log_softmax_last_dim(&logits)?;
        let target = batch.targets.narrow(1, start, len)?.contiguous()?.unsqueeze(D::Minus1)?;
        lps.push(logp.gather(&target, D::Minus1)?.squeeze(D::Minus1)?);
        let lp = match entropy {
            Entropy::None => None,
            Entropy::Metric => Some(logp.detach()),
            Entropy::Differentiable => Some(logp),
        };
        if let Some(lp) = lp {
            ents.push((lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?);
        }
        start += len;
    }
    let lp = Tensor::cat(&lps, 1)?;
    let ent = if entropy == Entropy::None { None } else { Some(Tensor::cat(&ents, 1)?) };
    Ok((lp, ent))
}

/// Column of each row's last real token in a [`SequenceBatch`] layout: `P + len − 1` (`P − 1`, the last prompt
/// token, for an empty completion).
pub fn last_token_columns(batch: &SequenceBatch, completion_lens: &[usize]) -> Vec<usize> {
    completion_lens.iter().map(|&l| batch.prompt_width + l - 1).collect()
}

/// Rows of `hidden` `[b, T, d]` at one column each → `[b, d]`.
pub fn select_columns(hidden: &Tensor, columns: &[usize]) -> Result<Tensor> {
    let (b, _, d) = hidden.dims3()?;
    let idx: Vec<u32> = columns.iter().flat_map(|&c| std::iter::repeat_n(c as u32, d)).collect();
    let idx = Tensor::from_vec(idx, (b, 1, d), hidden.device())?;
    Ok(hidden.contiguous()?.gather(&idx, 1)?.squeeze(1)?)
}
