//! Memory planning: before any weights load, estimate the peak of a step's two phases, pick the rollout batch and
//! the update's micro-batch when the recipe says `auto` (0), and refuse a recipe that cannot fit, naming the keys to
//! change. Estimates are upper bounds of the measured peak RSS (docs/memory-plan.md has the table), within +35%.
//!
//! What counts (T = prompt + completion tokens, H heads, L layers, b bytes per value):
//! - The process itself ([`BASELINE`], plus the tokenizer's tables per vocabulary entry) and every completion's
//!   bookkeeping (ids, texts, log-probs; [`per_completion`]): a step of 10⁹ completions is refused here.
//! - Model state: weights, AdamW's two f32 moments, the reference; in the update also the summed and per-micro-batch
//!   gradients and the sum being formed.
//! - Rollout, per batch of B sequences over D distinct prompts: the prefill's attention of one layer (4 `[D, H, P, P]`
//!   tensors alive at once: scores, masked scores, exp, probabilities) and its mask, then the KV cache of B rows
//!   grown to T positions, the logits and the sampler's per-row buffers.
//! - Update, per micro-batch row: every layer keeps its linear activations and its `H·T²` attention tensors for
//!   backward (the autograd graph holds each op's inputs: 8 with the composite ops, 2 with the fused CPU ops;
//!   [`LayerCounts`]), and backward materialises a few more for the layer it is in. With gradient checkpointing
//!   only each layer's input is kept, plus one layer.

use crate::model::ModelConfig;

/// The step's memory plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Sequences generated together (`rollout.batch_size`, resolved).
    pub rollout_batch_size: usize,
    /// Completions per forward/backward.
    pub micro_batch_size: usize,
    /// Completion positions per LM-head call in graph-free forwards (reference and old log-probs).
    pub logprob_chunk: usize,
    /// Estimated peak bytes while generating (0 when the step replays its completions).
    pub rollout_bytes: u64,
    /// Estimated peak bytes of the update.
    pub update_bytes: u64,
    /// The step's estimated peak: the larger of the two.
    pub bytes: u64,
}

impl Plan {
    /// The startup line's text: both phases and the step's peak.
    pub fn summary(&self) -> String {
        let rollout = if self.rollout_bytes > 0 {
            format!("rollout batches of {} sequences (about {}), ", self.rollout_batch_size, gb(self.rollout_bytes))
        } else {
            "replayed rollouts, ".to_string()
        };
        format!(
            "{rollout}update micro-batches of {} completions (about {}): peak about {} per step",
            self.micro_batch_size,
            gb(self.update_bytes),
            gb(self.bytes)
        )
    }
}

/// The shape of one step, as the recipe gives it.
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    /// `rollout.prompts_per_step`.
    pub prompts: usize,
    /// `rollout.num_generations` (G).
    pub group_size: usize,
    /// `rollout.batch_size` (0 = the largest that fits).
    pub rollout_batch_size: usize,
    /// Whether the step generates (false: a replay file gives the completions).
    pub generates: bool,
    /// `rollout.weights = "bf16"`: a bf16 copy of the weights for decoding.
    pub bf16_decode: bool,
    /// `algorithm.micro_batch_size` (0 = auto).
    pub micro_batch_size: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    /// Whether a frozen reference model is loaded.
    pub reference: bool,
    /// Whether it is loaded for the KL term alone, so `algorithm.beta = 0` would drop it.
    pub reference_optional: bool,
    /// The trainable value model loaded beside the policy (PPO), if any.
    pub critic: Critic,
    /// Bytes per weight of the frozen models and per activation (4 for f32, 2 for bf16).
    pub dtype_bytes: usize,
    /// Bytes per trainable weight (or LoRA adapter) and gradient: `dtype_bytes`, or 4 for f32 master weights under
    /// bf16 (`model::master_dtype`), whose bf16 casts the graph also keeps (one per weight) until backward ends.
    pub master_bytes: usize,
    /// The LM head runs as the fused CPU op (no vocab-sized tensors in the graph).
    pub fused_head: bool,
    /// The norms, RoPE, softmax and SwiGLU run as the fused CPU ops (`model::fused_ops`), which keep fewer tensors.
    pub fused_ops: bool,
    /// `algorithm.gradient_checkpointing`.
    pub gradient_checkpointing: bool,
    /// Whether the algorithm offers gradient checkpointing (GRPO, GRPO-λ), so the advice may suggest it.
    pub can_checkpoint: bool,
    /// With LoRA, the adapters' sizes: only they have gradients and AdamW moments, and the frozen head has no
    /// vocab-sized gradient. `None`: full fine-tuning.
    pub lora: Option<LoraShape>,
}

/// A trainable value model beside the policy (PPO's), whose activations count like the policy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Critic {
    None,
    /// Every weight trains: weights, gradients and moments like the policy's.
    Full,
    /// `critic.lora`: adapters of the policy's [`LoraShape`] (and a head) train on a frozen backbone, which is the
    /// policy's own base when `shares_policy`.
    Lora {
        shares_policy: bool,
    },
}

/// LoRA adapters' sizes, in parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraShape {
    /// The adapters themselves (A and B of every targeted layer): the policy's trainable parameters.
    pub adapter_params: u64,
    /// The base weights they adapt: the f32 decode copies that hold them merged (without bf16 decode copies).
    pub adapted_weights: u64,
    /// Every linear weight of the decoder, adapted or not: what `lora.base_dtype = "bf16"` holds in bf16.
    pub linear_weights: u64,
    /// `lora.base_dtype = "bf16"`.
    pub base_bf16: bool,
    /// `lora.dropout > 0`: each adapted product draws a mask the size of its input (and the masked input, and in
    /// backward the masked gradient), one product at a time.
    pub dropout: bool,
}

impl LoraShape {
    /// Adapters of rank `rank` on the `targets` (module names) of every layer: r·(in + out) parameters each, on
    /// in·out weights; the base's linear weights in bf16 when `base_bf16`.
    pub fn of(cfg: &ModelConfig, rank: usize, targets: &[String], base_bf16: bool) -> Self {
        let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
        let (q, kv) = ((cfg.num_heads * cfg.head_dim) as u64, (cfg.num_kv_heads * cfg.head_dim) as u64);
        let dims = |t: &str| match t {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            _ => (h, i), // gate_proj, up_proj, down_proj
        };
        let layers = cfg.num_layers as u64;
        let (mut adapter, mut adapted) = (0u64, 0u64);
        for t in targets {
            let (a, b) = dims(t);
            adapter = adapter.saturating_add((rank as u64).saturating_mul(a + b));
            adapted = adapted.saturating_add(a.saturating_mul(b));
        }
        let linear = crate::model::lora::LINEAR_MODULES
            .iter()
            .map(|m| dims(m))
            .fold(0u64, |sum, (a, b)| sum.saturating_add(a.saturating_mul(b)));
        Self {
            adapter_params: adapter.saturating_mul(layers),
            adapted_weights: adapted.saturating_mul(layers),
            linear_weights: linear.saturating_mul(layers),
            base_bf16,
            dropout: false,
        }
    }
}

/// A frozen base's weights (the policy's under LoRA, or a LoRA value model's own backbone): `model.dtype`, except
/// the linear weights at 2 bytes with `lora.base_dtype = "bf16"`, plus the one weight widened to f32 at a time
/// (forward and backward each hold one).
fn frozen_base_bytes(cfg: &ModelConfig, shape: &StepShape, l: &LoraShape) -> Sat {
    let (p, b) = (parameter_count(cfg), sat(shape.dtype_bytes));
    if !l.base_bf16 || shape.dtype_bytes <= 2 {
        return sat(p) * b;
    }
    let widest = sat(cfg.hidden_size) * sat(cfg.intermediate_size.max(cfg.num_heads * cfg.head_dim));
    sat(p.saturating_sub(l.linear_weights)) * b + sat(l.linear_weights) * sat(2) + sat(2) * widest * b
}

impl StepShape {
    /// Completions per step (prompts × generations), saturating.
    pub fn completions(&self) -> usize {
        self.prompts.saturating_mul(self.group_size)
    }
}

/// Bytes of the graph-free logits chunk we aim for (reference/old log-probs).
const CHUNK_BYTES: usize = 64 << 20;
/// Plans use at most this fraction of the available memory.
const HEADROOM: f64 = 0.85;
/// The process before any model: binary, allocator arenas, thread stacks, the dataset (measured: 31 MB with the
/// tiny model).
pub const BASELINE: u64 = 48 << 20;
/// Tokenizer tables per vocabulary entry (token strings, merges, both directions).
const TOKENIZER_PER_TOKEN: u64 = 1024;
/// What one layer's ops keep: counted op by op in llama.rs and fused_ops.rs, for the composite ops (every device)
/// and the fused CPU ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LayerCounts {
    /// `H·T²` attention tensors per layer and row that outlive the layer's backward.
    attn_kept: u64,
    /// `H·T²` tensors alive at once during one layer's attention backward.
    attn_backward: u64,
    /// `H·P²` tensors alive at once in a graph-free attention (prefill, reference log-probs).
    attn_graph_free: u64,
    /// Per-token activations that are not attention scores, in units of (hidden, q, kv, intermediate) values.
    linear: (u64, u64, u64, u64),
}

/// The composite ops. Attention kept: the 6 the autograd graph holds (scores, scaled, masked, shifted, exp,
/// probabilities) and 2 gradients candle's backward makes for the untracked right-hand sides of the mask's add and
/// the max's subtraction (nothing consumes them, so they stay in the gradient store until backward returns).
/// Backward: the incoming gradient, the division's two gradients and their temporaries (`grad·lhs`, `rhs²`), the
/// zeros a first gradient starts from (where `.sub` still does) and the sums. Graph-free: the scores, the masked
/// scores, the shift and its exp, then the probabilities. Linear: norm outputs and their squares, q/k/v (projected,
/// unpacked, made contiguous, rotated through negation, concatenation and two products, and the dead gradients of
/// RoPE's cos/sin), the attention output, residuals, the MLP's gate/silu/up/product.
const COMPOSITE: LayerCounts =
    LayerCounts { attn_kept: 8, attn_backward: 8, attn_graph_free: 4, linear: (10, 14, 15, 4) };

/// The fused CPU ops (f32 on the CPU). Attention kept: the scores and the probabilities (the masked softmax's input
/// and output). Backward: the probabilities' gradient, the scores' and one contiguous copy. Graph-free: the scores
/// and the probabilities. Linear: 2 norm outputs, 4 residual-stream values (attention and MLP outputs and their
/// sums); q projected, unpacked, made contiguous, rotated, the attention output, made contiguous and packed (8); k
/// the same to rotation (5) and v to contiguity (4); the MLP's gate, up and SwiGLU output (3).
const FUSED: LayerCounts = LayerCounts { attn_kept: 2, attn_backward: 3, attn_graph_free: 2, linear: (6, 8, 9, 3) };

fn layer_counts(shape: &StepShape) -> &'static LayerCounts {
    if shape.fused_ops {
        &FUSED
    } else {
        &COMPOSITE
    }
}

/// Allocator slack on the update's linear activations, as a fraction (measured: SmolLM2 with 64-token prompts peaks
/// at 1.2× their count).
const LINEAR_SLACK: (u64, u64) = (5, 4);

/// Saturating byte arithmetic: an absurd recipe gives `u64::MAX` (refused), never a wrapped small number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Sat(u64);

fn sat(x: impl TryInto<u64>) -> Sat {
    Sat(x.try_into().unwrap_or(u64::MAX))
}

impl std::ops::Add for Sat {
    type Output = Sat;
    fn add(self, o: Sat) -> Sat {
        Sat(self.0.saturating_add(o.0))
    }
}

impl std::ops::Mul for Sat {
    type Output = Sat;
    fn mul(self, o: Sat) -> Sat {
        Sat(self.0.saturating_mul(o.0))
    }
}

impl std::ops::Div<u64> for Sat {
    type Output = Sat;
    fn div(self, d: u64) -> Sat {
        Sat(self.0 / d)
    }
}

fn max(a: Sat, b: Sat) -> Sat {
    a.max(b)
}

/// Number of weights of a model with this config.
pub fn parameter_count(cfg: &ModelConfig) -> u64 {
    let (h, i, v) = (sat(cfg.hidden_size), sat(cfg.intermediate_size), sat(cfg.vocab_size));
    let (q, kv) = (sat(cfg.num_heads) * sat(cfg.head_dim), sat(cfg.num_kv_heads) * sat(cfg.head_dim));
    let layer = h * q + sat(2) * h * kv + q * h + sat(3) * h * i + sat(2) * h;
    let head = if cfg.tie_word_embeddings { sat(0) } else { v * h };
    (v * h + sat(cfg.num_layers) * layer + h + head).0
}

/// The process and every completion's bookkeeping: what both phases hold whatever the batch sizes.
fn fixed(cfg: &ModelConfig, shape: &StepShape) -> Sat {
    sat(BASELINE) + sat(cfg.vocab_size) * sat(TOKENIZER_PER_TOKEN) + sat(shape.completions()) * per_completion(shape)
}

/// Bookkeeping bytes of one completion between rollout and update: its request, the decoding row, the sample
/// (prompt text and ids, completion text, ids and log-probs) and the update batch's copies, with slack.
fn per_completion(shape: &StepShape) -> Sat {
    sat(1024) + sat(48) * (sat(shape.max_prompt_tokens) + sat(shape.max_new_tokens))
}

/// Weights, the moments AdamW allocates up front, the reference and the bf16 decode copy: what the rollout sees.
fn resident_state(cfg: &ModelConfig, shape: &StepShape) -> Sat {
    let p = sat(parameter_count(cfg));
    let (b, m) = (sat(shape.dtype_bytes), sat(shape.master_bytes));
    let adapters = sat(shape.lora.map_or(0, |l| l.adapter_params));
    let critic = match (shape.critic, shape.lora) {
        (Critic::None, _) => sat(0),
        (Critic::Lora { shares_policy: false }, Some(l)) => adapters * (m + sat(8)) + frozen_base_bytes(cfg, shape, &l),
        (Critic::Lora { .. }, _) => adapters * (m + sat(8)),
        (Critic::Full, _) => p * (m + sat(8)),
    };
    let reference = if shape.reference { p * b } else { sat(0) };
    // bf16 decode copies: of every weight, or with a bf16 base only of the adapted layers (merged) and the head.
    let bf16 = match shape.lora {
        _ if !shape.bf16_decode => sat(0),
        Some(l) if l.base_bf16 => (sat(l.adapted_weights) + sat(cfg.vocab_size) * sat(cfg.hidden_size)) * sat(2),
        _ => p * sat(2),
    };
    let policy = match shape.lora {
        // The frozen base, the adapters with their two f32 moments, and (without bf16 copies) f32 decode copies of
        // the adapted weights with the adapters merged in.
        Some(l) => {
            let merged = if shape.bf16_decode { sat(0) } else { sat(l.adapted_weights) * sat(4) };
            frozen_base_bytes(cfg, shape, &l) + sat(l.adapter_params) * (m + sat(8)) + merged
        }
        None => p * (m + sat(8)),
    };
    policy + critic + reference + bf16
}

/// Bytes per activation value and per attention score. The softmax computes in f32 whatever the activations'
/// dtype; the fused ops compute in f32 too, so under bf16 each keeps its widened f32 inputs and output beside the
/// bf16 values (counted as both).
fn value_bytes(shape: &StepShape) -> (Sat, Sat) {
    let b = sat(shape.dtype_bytes);
    if shape.fused_ops && shape.dtype_bytes < 4 {
        (b + sat(4), b + sat(4))
    } else {
        (b, sat(4).max(b))
    }
}

/// Activations of one layer for T tokens that are not attention scores ([`LayerCounts::linear`]).
fn layer_linear(cfg: &ModelConfig, shape: &StepShape, t: Sat) -> Sat {
    let (h, i) = (sat(cfg.hidden_size), sat(cfg.intermediate_size));
    let (q, kv) = (sat(cfg.num_heads) * sat(cfg.head_dim), sat(cfg.num_kv_heads) * sat(cfg.head_dim));
    let (ch, cq, ckv, ci) = layer_counts(shape).linear;
    t * (sat(ch) * h + sat(cq) * q + sat(ckv) * kv + sat(ci) * i)
}

/// Estimated peak bytes of the update with micro-batches of `micro` completions.
pub fn update_bytes(cfg: &ModelConfig, shape: &StepShape, micro: usize) -> u64 {
    let p = sat(parameter_count(cfg));
    let (b, m) = (sat(shape.dtype_bytes), sat(shape.master_bytes));
    // The summed gradients and this micro-batch's (the sum is formed one variable at a time); the embedding's
    // gradient is summed in backward from the LM head's and the lookup's, each started from zeros (three more
    // vocab × hidden). The optimizer's step, after backward, holds one gradient and per-variable temporaries: less.
    // With LoRA only the adapters have gradients; the frozen embedding and head have none.
    let embedding = sat(3) * sat(cfg.vocab_size) * sat(cfg.hidden_size) * m;
    let adapters = sat(shape.lora.map_or(0, |l| l.adapter_params));
    // f32 master weights under bf16: the graph keeps each weight's bf16 cast until backward ends.
    let casts = if shape.master_bytes != shape.dtype_bytes { p * b } else { sat(0) };
    let policy_grads = match shape.lora {
        Some(_) => adapters * sat(2) * m,
        None => p * sat(2) * m + embedding + casts,
    };
    let critic_grads = match shape.critic {
        Critic::None => sat(0),
        Critic::Full => p * sat(2) * m + casts + if shape.lora.is_some() { embedding } else { sat(0) },
        Critic::Lora { .. } => adapters * sat(2) * m,
    };
    let grads = policy_grads + critic_grads;
    let critic = sat((shape.critic != Critic::None) as u64);
    let state = resident_state(cfg, shape) + grads;
    let t = sat(shape.max_prompt_tokens) + sat(shape.max_new_tokens);
    let c = sat(shape.max_new_tokens);
    let (heads, layers, vocab) = (sat(cfg.num_heads), sat(cfg.num_layers), sat(cfg.vocab_size));
    let (value, score) = value_bytes(shape);
    let scores = heads * t * t * score;
    // Linear activations are many tensors of a few MB, below glibc's mmap threshold: they come from malloc's arenas,
    // which keep what the reference's and the last step's forwards freed in their own sizes ([`LINEAR_SLACK`]).
    let counts = layer_counts(shape);
    let linear = layer_linear(cfg, shape, t) * value * sat(LINEAR_SLACK.0) / LINEAR_SLACK.1;
    let kept_layer = linear + sat(counts.attn_kept) * scores;
    // Backward of the layer it is in: its attention's gradients and half a layer's linear gradients (they are
    // consumed as they are made).
    let dropout = match shape.lora {
        Some(l) if l.dropout => sat(3) * t * sat(cfg.hidden_size.max(cfg.intermediate_size)) * b,
        _ => sat(0),
    };
    let backward = sat(counts.attn_backward) * scores + linear / 2 + dropout;
    let kept = if shape.gradient_checkpointing {
        layers * t * sat(cfg.hidden_size) * b + kept_layer
    } else {
        layers * kept_layer
    };
    // The additive mask `[T, T]` (f32) per row.
    let mask = t * t * sat(4);
    // The fused head keeps only its chunk buffers (logits, and in backward the input gradient); the composite head
    // keeps its logits in the graph for every row.
    // Under bf16 a LoRA policy's frozen bf16 head is widened to an f32 copy the graph keeps.
    let head_copy =
        if shape.lora.is_some() && shape.dtype_bytes < 4 { vocab * sat(cfg.hidden_size) * sat(4) } else { sat(0) };
    let (head_fixed, head_row) = if shape.fused_head {
        (sat(2) * sat(crate::model::fused_head::ROWS) * vocab * sat(4) + head_copy, sat(0))
    } else {
        (sat(0), sat(4) * c * vocab * sat(4))
    };
    let row = (kept + backward + mask + head_row) * (sat(1) + critic);
    (fixed(cfg, shape) + state + head_fixed + sat(micro) * row).0
}

/// Distinct prompts in a generation batch of `batch` sequences: groups are contiguous, so a batch that is a
/// multiple of G holds batch/G prompts, any other at most two more (the groups cut at either end).
fn distinct_prompts(shape: &StepShape, batch: usize) -> usize {
    let g = shape.group_size.max(1);
    let d = if batch.is_multiple_of(g) { batch / g } else { batch / g + 2 };
    d.min(batch).min(shape.prompts.max(1))
}

/// Estimated peak bytes of generating in batches of `batch` sequences (graph-free: one layer's transients at a
/// time; the prefill and the end of decoding are the two peaks).
pub fn rollout_bytes(cfg: &ModelConfig, shape: &StepShape, batch: usize) -> u64 {
    // Decoding computes in the policy's weights' dtype: f32 master weights under bf16, a LoRA base's own.
    let b = sat(if shape.lora.is_none() { shape.master_bytes } else { shape.dtype_bytes });
    let (p, t) = (sat(shape.max_prompt_tokens), sat(shape.max_prompt_tokens) + sat(shape.max_new_tokens));
    let (heads, layers, vocab) = (sat(cfg.num_heads), sat(cfg.num_layers), sat(cfg.vocab_size));
    let kv = sat(cfg.num_kv_heads) * sat(cfg.head_dim);
    let (rows, d) = (sat(batch), sat(distinct_prompts(shape, batch)));
    // Keys and values of every layer per row and position.
    let cache_per = layers * sat(2) * kv * b;
    // Prefill of the distinct prompts: their cache, one layer's attention, its mask, linear activations and the
    // last column's logits; then the cache copied to every row.
    let graph_free = sat(layer_counts(shape).attn_graph_free);
    let (value, score) = value_bytes(shape);
    let prefill = d * (cache_per * p + graph_free * heads * p * p * score + p * p * sat(4))
        + d * (layer_linear(cfg, shape, p) * value + vocab * sat(4))
        + rows * cache_per * p;
    // The end of decoding: the cache at T positions plus one layer's copy while it grows, logits and their table,
    // the step's attention, and one row's sampling buffers (f64 scores and probabilities, the candidates).
    let decode = rows * (cache_per * t + sat(2) * kv * t * b + sat(8) * vocab + graph_free * heads * t * score)
        + rows * layer_linear(cfg, shape, sat(1)) * value
        + vocab * sat(40);
    (fixed(cfg, shape) + resident_state(cfg, shape) + max(prefill, decode)).0
}

/// Divisors of `n`, largest first (trial division to √n: a huge step plans in milliseconds).
fn divisors_desc(n: usize) -> Vec<usize> {
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let mut d = 1;
    while d <= n / d {
        if n.is_multiple_of(d) {
            small.push(d);
            if d != n / d {
                large.push(n / d);
            }
        }
        d += 1;
    }
    large.into_iter().chain(small.into_iter().rev()).collect()
}

/// The largest `x` in `1..=hi` with `fits(x)`, for `fits` true up to some point and false after.
fn largest_fitting(hi: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if hi == 0 || !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1, hi);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

/// Plan a step within `available` bytes of the model's device (`None`: unknown, e.g. a GPU; the recipe's choices are
/// taken, `auto` = the whole step at once). The completions' bookkeeping lives in host memory, so `host` bytes
/// (the CPU's; `None`: unknown) bound it on any device. Errors say how much is needed and which keys to change.
pub fn plan(cfg: &ModelConfig, shape: &StepShape, available: Option<u64>, host: Option<u64>) -> Result<Plan, String> {
    let n = shape.completions();
    let budget = available.map(|a| (a as f64 * HEADROOM) as u64);
    if let Some(budget) = budget.or(host.map(|h| (h as f64 * HEADROOM) as u64)) {
        let need = fixed(cfg, shape);
        if need.0 > budget {
            return Err(format!(
                "a step of {n} completions (rollout.prompts_per_step = {} × rollout.num_generations = {}) needs \
                 about {} for its completions' tokens and texts alone, but about {} is available: lower \
                 rollout.num_generations or rollout.prompts_per_step",
                shape.prompts,
                shape.group_size,
                gb(need.0),
                gb(budget)
            ));
        }
    }
    // The model's state alone: the update's own message names the keys.
    if let Some(budget) = budget.filter(|&b| update_bytes(cfg, shape, 0) > b) {
        return Err(too_big(cfg, shape, 1, budget, true));
    }
    let rollout_batch = if shape.generates {
        match (shape.rollout_batch_size, budget) {
            (0, None) => n,
            (0, Some(budget)) => largest_fitting(n, |b| rollout_bytes(cfg, shape, b) <= budget)
                .ok_or_else(|| rollout_too_big(cfg, shape, 1, budget, true))?,
            (m, Some(budget)) if rollout_bytes(cfg, shape, m.min(n)) > budget => {
                return Err(rollout_too_big(cfg, shape, m.min(n), budget, false))
            }
            (m, _) => m.min(n),
        }
    } else {
        n
    };
    let micro = match (shape.micro_batch_size, budget) {
        (0, None) => n,
        (0, Some(budget)) => {
            // The largest divisor of n that fits.
            match divisors_desc(n).into_iter().find(|&d| update_bytes(cfg, shape, d) <= budget) {
                Some(d) => d,
                None => return Err(too_big(cfg, shape, 1, budget, true)),
            }
        }
        (m, Some(budget)) if update_bytes(cfg, shape, m) > budget => return Err(too_big(cfg, shape, m, budget, false)),
        (m, _) => m,
    };
    // Graph-free log-probs run one micro-batch at a time.
    let chunk = (CHUNK_BYTES / (cfg.vocab_size.max(1) * 4 * micro.max(1))).clamp(1, shape.max_new_tokens.max(1));
    let rollout_bytes = if shape.generates { rollout_bytes(cfg, shape, rollout_batch) } else { 0 };
    let update_bytes = update_bytes(cfg, shape, micro);
    Ok(Plan {
        rollout_batch_size: rollout_batch.max(1),
        micro_batch_size: micro,
        logprob_chunk: chunk,
        rollout_bytes,
        update_bytes,
        bytes: rollout_bytes.max(update_bytes),
    })
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn rollout_too_big(cfg: &ModelConfig, shape: &StepShape, batch: usize, budget: u64, auto: bool) -> String {
    let need = rollout_bytes(cfg, shape, batch);
    let advice = match largest_fitting(shape.completions(), |b| rollout_bytes(cfg, shape, b) <= budget) {
        Some(b) if !auto => format!("set rollout.batch_size = {b} (or 0 to pick the largest that fits)"),
        _ => "lower data.max_prompt_tokens or rollout.max_new_tokens".to_string(),
    };
    let what = if auto { "even one sequence at a time".to_string() } else { format!("batches of {batch} sequences") };
    format!(
        "generating {what} needs about {} (KV cache and attention for up to {} prompt + {} completion tokens), but \
         about {} is available: {advice}",
        gb(need),
        shape.max_prompt_tokens,
        shape.max_new_tokens,
        gb(budget)
    )
}

fn too_big(cfg: &ModelConfig, shape: &StepShape, micro: usize, budget: u64, auto: bool) -> String {
    let need = update_bytes(cfg, shape, micro);
    let state = update_bytes(cfg, shape, 0);
    let fits = divisors_desc(shape.completions()).into_iter().find(|&d| update_bytes(cfg, shape, d) <= budget);
    let what = if auto {
        "even one completion per micro-batch".to_string()
    } else {
        format!("{micro} completions per micro-batch")
    };
    let advice = match fits {
        Some(d) if !auto => format!("set algorithm.micro_batch_size = {d} (or 0 for auto)"),
        _ if state > budget => {
            // β = 0 is advice only where the reference is there for β's KL alone (not SAFE's, not PAR's).
            let droppable = shape.reference && shape.reference_optional;
            let without_reference = update_bytes(cfg, &StepShape { reference: false, ..*shape }, 0);
            if droppable && without_reference <= budget {
                "the model's weights, gradients and optimizer state alone do not fit: set algorithm.beta = 0 to drop \
                 the reference model, or use a smaller model"
                    .to_string()
            } else {
                format!(
                    "the model's weights, gradients and optimizer state alone ({}) do not fit: use a smaller model",
                    gb(if droppable { without_reference } else { state })
                )
            }
        }
        _ if shape.can_checkpoint && !shape.gradient_checkpointing => {
            "set algorithm.gradient_checkpointing = true, or lower rollout.max_new_tokens or data.max_prompt_tokens"
                .to_string()
        }
        _ => "lower rollout.max_new_tokens or data.max_prompt_tokens".to_string(),
    };
    format!(
        "a training step with {what} needs about {} ({} of model state and {} of activations for rows of up to {} \
         prompt + {} completion tokens), but about {} is available: {advice}",
        gb(need),
        gb(state),
        gb(need.saturating_sub(state)),
        shape.max_prompt_tokens,
        shape.max_new_tokens,
        gb(budget)
    )
}

/// Memory the plan may use on `device`: [`available_cpu_bytes`] on the CPU, the GPU's free memory
/// (`cuMemGetInfo`, read before any model is loaded) on CUDA; `None` where it cannot be read (Metal, or a CUDA
/// query that fails), and then the plan does not bound the device's memory.
pub fn available_bytes(device: &candle_core::Device) -> Option<u64> {
    match device {
        candle_core::Device::Cpu => available_cpu_bytes(),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(gpu) => gpu.cuda_stream().context().mem_get_info().ok().map(|(free, _)| free as u64),
        _ => None,
    }
}

/// Memory available to this process on the CPU: `MemAvailable` from /proc/meminfo, capped by a cgroup limit.
/// `None` where it cannot be read.
pub fn available_cpu_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)?;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok());
    Some(cgroup.map_or(avail, |c| c.min(avail)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        crate::model::builtin::config("tiny").unwrap()
    }

    fn smollm2() -> ModelConfig {
        let mut c = tiny();
        (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) = (49152, 576, 1536, 30);
        (c.num_heads, c.num_kv_heads, c.head_dim) = (9, 3, 64);
        c
    }

    fn shape(micro: usize) -> StepShape {
        StepShape {
            prompts: 4,
            group_size: 4,
            rollout_batch_size: 0,
            generates: true,
            bf16_decode: false,
            micro_batch_size: micro,
            max_prompt_tokens: 64,
            max_new_tokens: 64,
            reference: true,
            reference_optional: true,
            critic: Critic::None,
            dtype_bytes: 4,
            master_bytes: 4,
            fused_head: false,
            fused_ops: false,
            gradient_checkpointing: false,
            can_checkpoint: true,
            lora: None,
        }
    }

    /// configs/quickstart.toml: 8 prompts × 8 generations, 8 new tokens, β = 0 (no reference), the fused head.
    fn quickstart(max_prompt_tokens: usize) -> StepShape {
        StepShape {
            prompts: 8,
            group_size: 8,
            max_prompt_tokens,
            max_new_tokens: 8,
            reference: false,
            fused_head: true,
            ..shape(0)
        }
    }

    #[test]
    fn a_lora_value_model_on_the_policys_base_plans_no_second_model() {
        let all: Vec<String> = crate::model::lora::LINEAR_MODULES.iter().map(|m| m.to_string()).collect();
        let cfg = smollm2();
        let lora = Some(LoraShape::of(&cfg, 8, &all, false));
        let with = |critic| update_bytes(&cfg, &StepShape { lora, critic, ..shape(4) }, 4);
        let (none, full) = (with(Critic::None), with(Critic::Full));
        let (shared, own) = (with(Critic::Lora { shares_policy: true }), with(Critic::Lora { shares_policy: false }));
        let p = parameter_count(&cfg);
        // A full value model: its weights, two moments and gradients (16 bytes a weight in f32) at least.
        assert!(full - none >= p * 16, "{full} vs {none}");
        // A LoRA one on the shared base: its activations and the adapters' state only, far below a full one.
        assert!(shared > none && full - shared >= p * 14, "{shared} vs {full}");
        // On a backbone of its own: that backbone's weights more.
        assert_eq!(own - shared, p * 4);
    }

    /// lora.base_dtype = "bf16": the linear weights at 2 bytes instead of 4, less the one weight widened at a time
    /// in each of forward and backward; with bf16 decode copies, no copy of the layers without adapters either.
    #[test]
    fn a_bf16_base_plans_two_bytes_a_linear_weight() {
        let cfg = smollm2();
        let targets: Vec<String> = vec!["q_proj".into(), "v_proj".into()];
        let (f32_base, bf16_base) = (LoraShape::of(&cfg, 8, &targets, false), LoraShape::of(&cfg, 8, &targets, true));
        // SmolLM2: 30 layers of q, o 576² + k, v 576·192 + gate, up, down 576·1536.
        assert_eq!(bf16_base.linear_weights, 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536));
        let widened = 2 * 576 * 1536 * 4;
        for bf16_decode in [false, true] {
            let with = |l| update_bytes(&cfg, &StepShape { lora: Some(l), bf16_decode, ..shape(4) }, 4);
            let saved = with(f32_base) - with(bf16_base);
            let copies =
                if bf16_decode { (parameter_count(&cfg) - 49152 * 576 - bf16_base.adapted_weights) * 2 } else { 0 };
            assert_eq!(saved, bf16_base.linear_weights * 2 - widened + copies, "bf16_decode = {bf16_decode}");
        }
    }

    #[test]
    fn lora_counts_adapters_only_and_plans_less_memory() {
        let cfg = tiny();
        let all: Vec<String> = crate::model::lora::LINEAR_MODULES.iter().map(|m| m.to_string()).collect();
        // tiny per layer: q 64+64, k and v 64+32 each, o 64+64, gate and up 64+192 each, down 192+64.
        let l = LoraShape::of(&cfg, 4, &all, false);
        assert_eq!(l.adapter_params, 4 * (128 + 96 + 96 + 128 + 3 * 256) * 2);
        // The adapted weights: every linear weight of both layers (64·64 q and o, 64·32 k and v, 64·192 ×3).
        assert_eq!(l.adapted_weights, (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192) * 2);
        assert_eq!(
            LoraShape::of(&cfg, 2, &["q_proj".into()], false),
            LoraShape { adapter_params: 2 * 128 * 2, adapted_weights: 64 * 64 * 2, ..l }
        );
        let full = update_bytes(&smollm2(), &shape(4), 4);
        let adapters = LoraShape::of(&smollm2(), 8, &all, false);
        let lora = StepShape { lora: Some(adapters), ..shape(4) };
        let with_lora = update_bytes(&smollm2(), &lora, 4);
        // No full-size gradients or moments: the difference is at least p·(8 + 2·4) bytes minus the adapters' and
        // the merged decode copies.
        let p = parameter_count(&smollm2());
        let lora_bytes = adapters.adapter_params * 16 + adapters.adapted_weights * 4;
        assert!(full - with_lora >= p * 16 - lora_bytes, "{full} vs {with_lora}");
    }

    #[test]
    fn parameter_count_matches_smollm2_and_tiny() {
        // SmolLM2-135M: 134,515,008 parameters (tied embeddings), as transformers counts them.
        assert_eq!(parameter_count(&smollm2()), 134_515_008);
        // tiny: embedding 259·64 = 16,576; per layer q, k, v, o = 64·64 + 2·64·32 + 64·64 = 12,288, MLP 3·64·192 =
        // 36,864, norms 128: 49,280; 2 layers + final norm 64 = 16,576 + 98,560 + 64.
        assert_eq!(parameter_count(&tiny()), 115_200);
    }

    #[test]
    fn auto_picks_the_largest_divisor_that_fits_and_errors_name_keys() {
        let cfg = smollm2();
        let state = update_bytes(&cfg, &shape(0), 0);
        let per_row = update_bytes(&cfg, &shape(0), 1) - state;
        // Room for exactly 5 rows: the largest divisor of 16 that fits is 4.
        let avail = ((state + 5 * per_row) as f64 / HEADROOM) as u64 + 1;
        assert_eq!(plan(&cfg, &shape(0), Some(avail), Some(avail)).unwrap().micro_batch_size, 4);
        // Unknown memory: the whole step, or what the recipe says.
        assert_eq!(plan(&cfg, &shape(0), None, None).unwrap().micro_batch_size, 16);
        assert_eq!(plan(&cfg, &shape(8), None, None).unwrap().micro_batch_size, 8);
        // An explicit micro-batch that does not fit names the one that does.
        let e = plan(&cfg, &shape(8), Some(avail), None).unwrap_err();
        assert!(e.contains("algorithm.micro_batch_size = 4"), "{e}");
        // Nothing fits: the state alone is too big; dropping the reference helps only if the rest fits.
        let without_reference = update_bytes(&cfg, &StepShape { reference: false, ..shape(0) }, 0);
        let e = plan(&cfg, &shape(0), Some((without_reference as f64 / HEADROOM) as u64 + 1), None).unwrap_err();
        assert!(e.contains("algorithm.beta = 0"), "{e}");
        let e = plan(&cfg, &shape(0), Some(state / 2), None).unwrap_err();
        assert!(!e.contains("algorithm.beta = 0") && e.contains("use a smaller model"), "{e}");
        // Regression: SAFE (its controller always reads the KL) and PAR need the reference whatever β is, so β = 0
        // is no advice for them.
        let needed = StepShape { reference_optional: false, ..shape(0) };
        let e = plan(&cfg, &needed, Some((without_reference as f64 / HEADROOM) as u64 + 1), None).unwrap_err();
        assert!(!e.contains("algorithm.beta") && e.contains("use a smaller model"), "{e}");
        // State fits, one row does not: shorten the sequences.
        let e = plan(&cfg, &shape(0), Some(((state + per_row / 2) as f64 / HEADROOM) as u64), None).unwrap_err();
        assert!(e.contains("rollout.max_new_tokens"), "{e}");
        assert!(e.contains("algorithm.gradient_checkpointing = true"), "{e}");
        // PPO and SAFE have no checkpointing to suggest.
        let no_ckpt = StepShape { can_checkpoint: false, ..shape(0) };
        let e = plan(&cfg, &no_ckpt, Some(((state + per_row / 2) as f64 / HEADROOM) as u64), None).unwrap_err();
        assert!(e.contains("rollout.max_new_tokens") && !e.contains("gradient_checkpointing"), "{e}");
    }

    #[test]
    fn checkpointing_and_the_fused_head_shrink_the_activations() {
        let cfg = smollm2();
        let rows = |s: StepShape| update_bytes(&cfg, &s, 8) - update_bytes(&cfg, &s, 0);
        let plain = rows(shape(0));
        let fused = rows(StepShape { fused_head: true, ..shape(0) });
        let ckpt = rows(StepShape { fused_head: true, gradient_checkpointing: true, ..shape(0) });
        // Per row of T = 128 tokens: one H·T² tensor is 9·128²·4 = 589,824 bytes; a layer's linear activations
        // 128·(10·576 + 14·576 + 15·192 + 4·1536)·4 = 128·22,848·4 = 11,698,176 bytes, 14,622,720 with 5/4 slack.
        // A kept layer is 14,622,720 + 8·589,824 = 19,341,312 bytes; backward's layer 8·589,824 + 14,622,720/2 =
        // 12,029,952; the mask 128²·4 = 65,536; the composite head keeps 4·64·49152·4 = 50,331,648.
        // Checkpointing keeps 30 layer inputs of 128·576·4 bytes and one layer.
        assert_eq!(plain, 8 * (30 * 19_341_312 + 12_029_952 + 65_536 + 50_331_648));
        assert_eq!(fused, 8 * (30 * 19_341_312 + 12_029_952 + 65_536));
        assert_eq!(ckpt, 8 * (30 * 128 * 576 * 4 + 19_341_312 + 12_029_952 + 65_536));
    }

    #[test]
    fn the_fused_ops_keep_fewer_tensors() {
        let cfg = smollm2();
        let rows = |s: StepShape| update_bytes(&cfg, &s, 8) - update_bytes(&cfg, &s, 0);
        let fused = rows(StepShape { fused_head: true, fused_ops: true, ..shape(0) });
        // Per row of T = 128 tokens: one H·T² tensor is 9·128²·4 = 589,824 bytes; a layer's linear activations
        // 128·(6·576 + 8·576 + 9·192 + 3·1536)·4 = 128·14,400·4 = 7,372,800 bytes, 9,216,000 with 5/4 slack.
        // A kept layer is 9,216,000 + 2·589,824 = 10,395,648 bytes; backward's layer 3·589,824 + 9,216,000/2 =
        // 6,377,472; the mask 128²·4 = 65,536.
        assert_eq!(fused, 8 * (30 * 10_395_648 + 6_377_472 + 65_536));
        let composite = rows(StepShape { fused_head: true, ..shape(0) });
        assert!(fused * 18 < composite * 10, "{fused} vs {composite}");
    }

    #[test]
    fn long_prompts_count_attention_scores() {
        // Issue 13, finding 1: quickstart with data.max_prompt_tokens = 500 peaked at 6.4-6.6 GB against a plan of
        // 1.92 GB, which counted 3 H·T² tensors per layer and none of backward's.
        let cfg = tiny();
        let s = quickstart(500);
        let row = update_bytes(&cfg, &s, 1) - update_bytes(&cfg, &s, 0);
        // T = 508: one H·T² tensor is 4·508²·4 = 4,129,024 bytes; 2 layers keep 8 each and backward makes 8 more
        // (24); the mask is 508²·4 = 1,032,256; linear activations 508·(10·64 + 14·64 + 15·32 + 4·192)·4 =
        // 5,657,088 per layer, 7,071,360 with 5/4 slack, for 2 kept layers and half of backward's.
        assert_eq!(row, 24 * 4_129_024 + 1_032_256 + 2 * 7_071_360 + 3_535_680);
        // The old per-row estimate, 2·(508·(8·64 + 4·192) + 3·4·508²)·4 = 29,976,064, was 3.9× lower.
        assert!(row > 3 * 29_976_064);
        // The whole step at once (64 completions) plans above the 6.59 GB measured with the composite ops on the
        // CPU (before the fused ops; docs/memory-plan.md's earlier table).
        let whole = update_bytes(&cfg, &s, 64);
        // fixed: 48 MiB + 259·1024 + 64·(1024 + 48·508); state: 115,200·(4 + 8); gradients 2·115,200·4 +
        // 3·259·64·4; fused head buffers 2·256·259·4.
        let fixed = 50_331_648 + 265_216 + 64 * (1024 + 48 * 508);
        let state = 115_200 * 12 + 115_200 * 8 + 3 * 259 * 64 * 4 + 2 * 256 * 259 * 4;
        assert_eq!(whole, fixed + state + 64 * row);
        assert!(whole as f64 >= 6.59e9 && (whole as f64) <= 1.3 * 6.59e9, "{whole}");
    }

    #[test]
    fn rollout_counts_the_prefill_the_cache_and_picks_the_largest_batch_that_fits() {
        let cfg = tiny();
        let s = quickstart(64);
        // All 64 completions of 8 prompts at once (D = 8 distinct prompts). Keys and values: 2 layers · 2 · 32 · 4 =
        // 512 bytes per row and position.
        // Prefill: 8·(512·64 + 4·4·64²·4 + 64²·4) + 8·(64·2784·4 + 259·4) + 64·512·64 = 2,490,368 + 5,709,920 +
        // 2,097,152 = 10,297,440. The end of decoding (T = 72): 64·(512·72 + 2·32·72·4 + 8·259 + 4·4·72·4) +
        // 64·2784·4 + 259·40 = 4,689,528, the smaller.
        // fixed: 48 MiB + 259·1024 + 64·(1024 + 48·72) = 50,883,584; weights and moments 115,200·12 = 1,382,400.
        assert_eq!(rollout_bytes(&cfg, &s, 64), 50_883_584 + 1_382_400 + 10_297_440);
        // A 4000-token prompt's prefill attention (4·4·4000²·4 = 1,024,000,000 bytes) dominates: one prompt at a time.
        let long = quickstart(4000);
        assert!(rollout_bytes(&cfg, &long, 8) > 1_024_000_000);
        assert!(rollout_bytes(&cfg, &long, 8) < rollout_bytes(&cfg, &long, 9), "a second prompt in the batch");
        // Auto: the largest batch whose estimate fits, whether or not it divides the step. 64 distinct 2000-token
        // prompts: each row's prefill (4·4·2000²·4 bytes) is below one update row's (24·4·2008²·4), so 20 rows of
        // rollout leave room for an update micro-batch.
        let wide = StepShape { prompts: 64, group_size: 1, ..quickstart(2000) };
        let budget = rollout_bytes(&cfg, &wide, 20);
        let avail = (budget as f64 / HEADROOM) as u64 + 1;
        let p = plan(&cfg, &wide, Some(avail), Some(avail)).unwrap();
        assert_eq!((p.rollout_batch_size, p.rollout_bytes), (20, budget));
        assert!(p.bytes >= p.rollout_bytes.max(p.update_bytes));
        // An explicit batch that does not fit names the one that does.
        let e = plan(&cfg, &StepShape { rollout_batch_size: 64, ..wide }, Some(avail), None).unwrap_err();
        assert!(e.contains("rollout.batch_size = 20"), "{e}");
        // Unknown memory: the recipe's batch, 0 = the whole step; a replayed step generates nothing.
        assert_eq!(plan(&cfg, &s, None, None).unwrap().rollout_batch_size, 64);
        let replay = plan(&cfg, &StepShape { generates: false, ..s }, None, None).unwrap();
        assert_eq!(replay.rollout_bytes, 0);
        assert!(replay.summary().contains("replayed rollouts"), "{}", replay.summary());
        assert!(p.summary().starts_with("rollout batches of 20 sequences"), "{}", p.summary());
    }

    #[test]
    fn huge_num_generations_is_refused_not_allocated() {
        // Issue 13, finding 2: num_generations = 10⁹ printed a 12 GB plan, then aborted allocating 448 GB (8·10⁹
        // requests of 56 bytes). Each completion's bookkeeping, 1024 + 48·(256 + 8) = 13,696 bytes, puts the step
        // at 8·10⁹ · 13,696 ≈ 110 TB: refused by the plan, naming the keys.
        let cfg = tiny();
        let s = StepShape { group_size: 1_000_000_000, ..quickstart(256) };
        assert_eq!(fixed(&cfg, &s).0, 50_331_648 + 265_216 + 8_000_000_000 * 13_696);
        let e = plan(&cfg, &s, Some(24 << 30), Some(24 << 30)).unwrap_err();
        assert!(e.contains("rollout.num_generations") && e.contains("rollout.prompts_per_step"), "{e}");
        // On a GPU the device's memory is unknown, but the bookkeeping lives in host memory: refused all the same.
        let e = plan(&cfg, &s, None, Some(24 << 30)).unwrap_err();
        assert!(e.contains("rollout.num_generations"), "{e}");
        // And quickly: no search over 8·10⁹ candidate batch sizes.
        let many = StepShape { group_size: 1 << 20, ..quickstart(8) };
        let t = std::time::Instant::now();
        let _ = plan(&cfg, &many, Some(1 << 40), Some(1 << 40));
        assert!(t.elapsed().as_secs_f64() < 2.0, "{:?}", t.elapsed());
    }

    #[test]
    fn plan_saturates_instead_of_wrapping() {
        let cfg = tiny();
        // 2³³ prompts × 2³¹ generations = 2⁶⁴ completions, which wraps to 0 in u64 arithmetic.
        let s = StepShape { prompts: 1 << 33, group_size: 1 << 31, ..quickstart(8) };
        assert_eq!(s.completions(), usize::MAX);
        assert_eq!(update_bytes(&cfg, &s, 1), u64::MAX);
        // T² for T near 2⁶⁴ wraps to a small number without saturation.
        let long = StepShape { max_prompt_tokens: usize::MAX - 8, ..quickstart(8) };
        assert_eq!(update_bytes(&cfg, &long, 1), u64::MAX);
        assert_eq!(rollout_bytes(&cfg, &long, 1), u64::MAX);
        assert!(plan(&cfg, &long, Some(24 << 30), None).is_err());
        let mut huge = tiny();
        huge.hidden_size = usize::MAX;
        assert_eq!(parameter_count(&huge), u64::MAX);
        assert_eq!(Sat(u64::MAX) + sat(1u64), Sat(u64::MAX));
        assert_eq!(Sat(1 << 40) * Sat(1 << 40), Sat(u64::MAX));
    }

    #[test]
    fn divisors_and_the_search_are_exact() {
        assert_eq!(divisors_desc(12), vec![12, 6, 4, 3, 2, 1]);
        assert_eq!(divisors_desc(1), vec![1]);
        assert_eq!(divisors_desc(49), vec![49, 7, 1]);
        assert_eq!(largest_fitting(100, |x| x <= 37), Some(37));
        assert_eq!(largest_fitting(100, |_| true), Some(100));
        assert_eq!(largest_fitting(100, |_| false), None);
    }
}
