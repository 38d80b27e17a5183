//! Memory planning: before training starts, estimate what one step needs, pick the micro-batch when the recipe
//! says `auto`, and refuse a recipe that cannot fit, naming the keys to change.
//!
//! The estimate is deliberately simple and on the safe side: model state (weights, summed and per-micro-batch
//! gradients, AdamW's two f32 moments, the frozen reference) plus what the autograd graph of one micro-batch keeps
//! alive. Per row of T = prompt + completion tokens, each layer keeps about `T·(8·hidden + 4·intermediate)` values
//! (norm outputs, q/k/v and their rotated copies, attention output, residuals, the MLP's gate/up/activation/product)
//! and `3·heads·T²` attention values (scores, masked scores, probabilities); with gradient checkpointing only each
//! layer's input (`T·hidden`) is kept, plus one layer's activations during backward. The composite LM head keeps
//! `4·C·vocab` f32 values for the C completion positions (logits, scaled logits, shifted logits, exp) because the
//! whole micro-batch's log-probs stay in the graph until backward; the fused CPU head keeps none, only its
//! per-chunk buffers.

use crate::model::ModelConfig;

/// The step's memory plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Completions per forward/backward.
    pub micro_batch_size: usize,
    /// Completion positions per LM-head call in graph-free forwards (reference and old log-probs).
    pub logprob_chunk: usize,
    /// Estimated peak bytes of a step with this plan.
    pub bytes: u64,
}

/// The shape of one step, as the recipe gives it.
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    /// Completions per step (prompts × generations).
    pub completions: usize,
    /// `algorithm.micro_batch_size` (0 = auto).
    pub micro_batch_size: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    /// Whether a frozen reference model is loaded.
    pub reference: bool,
    /// Whether it is loaded for the KL term alone, so `algorithm.beta = 0` would drop it.
    pub reference_optional: bool,
    /// Whether a trainable value model is loaded (PPO): its state and activations count like the policy's.
    pub critic: bool,
    /// Bytes per weight (4 for f32, 2 for bf16).
    pub dtype_bytes: usize,
    /// The LM head runs as the fused CPU op (no vocab-sized tensors in the graph).
    pub fused_head: bool,
    /// `algorithm.gradient_checkpointing`.
    pub gradient_checkpointing: bool,
    /// Whether the algorithm offers gradient checkpointing (GRPO, GRPO-λ), so the advice may suggest it.
    pub can_checkpoint: bool,
}

/// Bytes of the graph-free logits chunk we aim for (reference/old log-probs).
const CHUNK_BYTES: usize = 64 << 20;
/// Plans use at most this fraction of the available memory.
const HEADROOM: f64 = 0.85;

/// Number of weights of a model with this config.
pub fn parameter_count(cfg: &ModelConfig) -> u64 {
    let (h, i, v) = (cfg.hidden_size as u64, cfg.intermediate_size as u64, cfg.vocab_size as u64);
    let (q, kv) = ((cfg.num_heads * cfg.head_dim) as u64, (cfg.num_kv_heads * cfg.head_dim) as u64);
    let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
    let head = if cfg.tie_word_embeddings { 0 } else { v * h };
    v * h + cfg.num_layers as u64 * layer + h + head
}

/// Estimated peak bytes of a step that runs micro-batches of `micro` completions.
pub fn step_bytes(cfg: &ModelConfig, shape: &StepShape, micro: usize) -> u64 {
    let p = parameter_count(cfg);
    let b = shape.dtype_bytes as u64;
    // Weights, accumulated gradients, one micro-batch's gradients, two f32 moments; the reference's weights.
    let critic = shape.critic as u64;
    let state = p * (3 * b + 8) * (1 + critic) + if shape.reference { p * b } else { 0 };
    let t = (shape.max_prompt_tokens + shape.max_new_tokens) as u64;
    let c = shape.max_new_tokens as u64;
    let (h, i, heads) = (cfg.hidden_size as u64, cfg.intermediate_size as u64, cfg.num_heads as u64);
    let (layers, vocab) = (cfg.num_layers as u64, cfg.vocab_size as u64);
    let layer_row = (t * (8 * h + 4 * i) + 3 * heads * t * t) * b;
    let activations = if shape.gradient_checkpointing { layers * t * h * b + layer_row } else { layers * layer_row };
    // The fused head keeps only its chunk buffers (logits, and in backward the input gradient); the composite head
    // keeps its logits in the graph for every row.
    let (head_fixed, head_row) = if shape.fused_head {
        (2 * crate::model::fused_head::ROWS as u64 * vocab * 4, 0)
    } else {
        (0, 4 * c * vocab * 4)
    };
    state + head_fixed + micro as u64 * (activations + head_row)
}

/// Plan a step within `available` bytes (`None`: unknown, e.g. a GPU; the recipe's choice is taken, `auto` = the
/// whole step at once). Errors say how much is needed and which keys to change.
pub fn plan(cfg: &ModelConfig, shape: &StepShape, available: Option<u64>) -> Result<Plan, String> {
    let n = shape.completions;
    let budget = available.map(|a| (a as f64 * HEADROOM) as u64);
    let micro = match (shape.micro_batch_size, budget) {
        (0, None) => n,
        (0, Some(budget)) => {
            // The largest divisor of n that fits.
            match (1..=n).rev().filter(|d| n.is_multiple_of(*d)).find(|&d| step_bytes(cfg, shape, d) <= budget) {
                Some(d) => d,
                None => return Err(too_big(cfg, shape, 1, budget, true)),
            }
        }
        (m, Some(budget)) if step_bytes(cfg, shape, m) > budget => return Err(too_big(cfg, shape, m, budget, false)),
        (m, _) => m,
    };
    // Graph-free log-probs run one micro-batch at a time.
    let chunk = (CHUNK_BYTES / (cfg.vocab_size * 4 * micro.max(1))).clamp(1, shape.max_new_tokens.max(1));
    Ok(Plan { micro_batch_size: micro, logprob_chunk: chunk, bytes: step_bytes(cfg, shape, micro) })
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn too_big(cfg: &ModelConfig, shape: &StepShape, micro: usize, budget: u64, auto: bool) -> String {
    let need = step_bytes(cfg, shape, micro);
    let state = step_bytes(cfg, shape, 0);
    let fits = (1..=shape.completions)
        .rev()
        .filter(|d| shape.completions.is_multiple_of(*d))
        .find(|&d| step_bytes(cfg, shape, d) <= budget);
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
            let without_reference = step_bytes(cfg, &StepShape { reference: false, ..*shape }, 0);
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
        gb(need - state),
        shape.max_prompt_tokens,
        shape.max_new_tokens,
        gb(budget)
    )
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

    fn smollm2() -> ModelConfig {
        let mut c = crate::model::builtin::config("tiny").unwrap();
        (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) = (49152, 576, 1536, 30);
        (c.num_heads, c.num_kv_heads, c.head_dim) = (9, 3, 64);
        c
    }

    fn shape(micro: usize) -> StepShape {
        StepShape {
            completions: 16,
            micro_batch_size: micro,
            max_prompt_tokens: 64,
            max_new_tokens: 64,
            reference: true,
            reference_optional: true,
            critic: false,
            dtype_bytes: 4,
            fused_head: false,
            gradient_checkpointing: false,
            can_checkpoint: true,
        }
    }

    #[test]
    fn parameter_count_matches_smollm2() {
        // SmolLM2-135M: 134,515,008 parameters (tied embeddings), as transformers counts them.
        assert_eq!(parameter_count(&smollm2()), 134_515_008);
    }

    #[test]
    fn auto_picks_the_largest_divisor_that_fits_and_errors_name_keys() {
        let cfg = smollm2();
        let state = step_bytes(&cfg, &shape(0), 0);
        let per_row = step_bytes(&cfg, &shape(0), 1) - state;
        // Room for exactly 5 rows: the largest divisor of 16 that fits is 4.
        let avail = ((state + 5 * per_row) as f64 / HEADROOM) as u64 + 1;
        assert_eq!(plan(&cfg, &shape(0), Some(avail)).unwrap().micro_batch_size, 4);
        // Unknown memory: the whole step, or what the recipe says.
        assert_eq!(plan(&cfg, &shape(0), None).unwrap().micro_batch_size, 16);
        assert_eq!(plan(&cfg, &shape(8), None).unwrap().micro_batch_size, 8);
        // An explicit micro-batch that does not fit names the one that does.
        let e = plan(&cfg, &shape(8), Some(avail)).unwrap_err();
        assert!(e.contains("algorithm.micro_batch_size = 4"), "{e}");
        // Nothing fits: the state alone is too big; dropping the reference helps only if the rest fits.
        let without_reference = step_bytes(&cfg, &StepShape { reference: false, ..shape(0) }, 0);
        let e = plan(&cfg, &shape(0), Some((without_reference as f64 / HEADROOM) as u64 + 1)).unwrap_err();
        assert!(e.contains("algorithm.beta = 0"), "{e}");
        let e = plan(&cfg, &shape(0), Some(state / 2)).unwrap_err();
        assert!(!e.contains("algorithm.beta = 0") && e.contains("use a smaller model"), "{e}");
        // Regression: SAFE (its controller always reads the KL) and PAR need the reference whatever β is, so β = 0
        // is no advice for them.
        let needed = StepShape { reference_optional: false, ..shape(0) };
        let e = plan(&cfg, &needed, Some((without_reference as f64 / HEADROOM) as u64 + 1)).unwrap_err();
        assert!(!e.contains("algorithm.beta") && e.contains("use a smaller model"), "{e}");
        // State fits, one row does not: shorten the sequences.
        let e = plan(&cfg, &shape(0), Some(((state + per_row / 2) as f64 / HEADROOM) as u64)).unwrap_err();
        assert!(e.contains("rollout.max_new_tokens"), "{e}");
        assert!(e.contains("algorithm.gradient_checkpointing = true"), "{e}");
        // PPO and SAFE have no checkpointing to suggest.
        let no_ckpt = StepShape { can_checkpoint: false, ..shape(0) };
        let e = plan(&cfg, &no_ckpt, Some(((state + per_row / 2) as f64 / HEADROOM) as u64)).unwrap_err();
        assert!(e.contains("rollout.max_new_tokens") && !e.contains("gradient_checkpointing"), "{e}");
    }

    #[test]
    fn checkpointing_and_the_fused_head_shrink_the_activations() {
        let cfg = smollm2();
        let rows = |s: StepShape| step_bytes(&cfg, &s, 8) - step_bytes(&cfg, &s, 0);
        let plain = rows(shape(0));
        let fused = rows(StepShape { fused_head: true, ..shape(0) });
        let ckpt = rows(StepShape { fused_head: true, gradient_checkpointing: true, ..shape(0) });
        // Per row of 128 tokens: 30 layers × (128·(8·576 + 4·1536) + 3·9·128²)·4 bytes
        // = 30 × (1,376,256 + 442,368)·4 = 30 × 7,274,496 bytes, plus
        // the composite head's 4·64·49152·4 bytes; checkpointing keeps 30 × 128·576·4 bytes and one layer.
        assert_eq!(plain, 8 * (30 * 7_274_496 + 4 * 64 * 49152 * 4));
        assert_eq!(fused, 8 * 30 * 7_274_496);
        assert_eq!(ckpt, 8 * (30 * 128 * 576 * 4 + 7_274_496));
    }
}
