//! The GRPO update step: gradient accumulation over micro-batches gives the same step as the whole batch at once
//! (exactly for `dapo`, whose normaliser is the step's token count, and for `grpo` with equal micro-batches);
//! the step moves probability toward positive-advantage completions; a non-finite loss changes nothing.

mod common;

use candle_core::{DType, Device};
use safe::algo::grpo::{grpo_backward, grpo_update, GrpoLossConfig, UpdateBatch, UpdateConfig};
use safe::algo::loss::{Aggregation, ClipConfig, LossType};
use safe::model::logprobs::{completion_logprobs, SequenceBatch};
use safe::model::CausalLm;
use safe::optim::{AdamW, AdamWConfig};

fn tiny(trainable: bool) -> CausalLm {
    let dir = common::fixture("tiny/tiny-llama");
    let src = safe::model::ModelSource::parse(dir.to_str().unwrap(), None).unwrap();
    let lm = safe::model::LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap();
    lm.into_model(trainable, &Device::Cpu, DType::F32).unwrap().0
}

fn data() -> (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<f64>) {
    let prompts = vec![vec![1, 17, 300], vec![1, 5, 6, 7], vec![1, 9], vec![1, 40, 41]];
    let completions = vec![vec![7, 99, 2], vec![3, 88, 4, 5, 2], vec![501], vec![8, 2]];
    (prompts, completions, vec![1.0, -1.0, 0.5, -0.5])
}

fn config(loss_type: LossType, micro: usize) -> UpdateConfig {
    UpdateConfig {
        loss: GrpoLossConfig {
            beta: 0.04,
            clip: ClipConfig { eps_low: 0.2, eps_high: 0.28, delta: None },
            aggregation: Aggregation::new(loss_type, 8),
            use_bias_correction_kl: true,
            importance_sampling_level: Default::default(),
        },
        micro_batch_size: micro,
        temperature: 0.9,
        max_grad_norm: 1.0,
        pad_id: 0,
        logprob_chunk: 2,
        gradient_checkpointing: false,
    }
}

/// Run one update from fresh weights; return the weights after it and the metrics.
fn step(
    loss_type: LossType,
    micro: usize,
    advantages: Option<Vec<f64>>,
) -> (Vec<Vec<f32>>, safe::algo::grpo::UpdateMetrics) {
    let policy = tiny(true);
    let reference = tiny(false);
    let mut opt = AdamW::new(policy.vars().to_vec(), AdamWConfig { lr: 1e-3, ..AdamWConfig::default() }).unwrap();
    let (p, c, a) = data();
    let a = advantages.unwrap_or(a);
    let keep = vec![true; p.len()];
    let batch =
        UpdateBatch { prompts: &p, completions: &c, advantages: &a, old_logprobs: None, keep: &keep, sampling: None };
    let m = grpo_update(&policy, Some(&reference), &mut opt, &batch, &config(loss_type, micro)).unwrap();
    let weights = policy.vars().iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
    (weights, m)
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

/// Gradients of one backward over the batch split into micro-batches of `micro` (0 = whole), flattened per variable.
fn grads(loss_type: LossType, micro: usize) -> (Vec<Vec<f32>>, safe::algo::grpo::UpdateMetrics) {
    grads_with(config(loss_type, micro))
}

fn grads_with(cfg: UpdateConfig) -> (Vec<Vec<f32>>, safe::algo::grpo::UpdateMetrics) {
    let policy = tiny(true);
    let reference = tiny(false);
    let (p, c, a) = data();
    let keep = vec![true; p.len()];
    let batch =
        UpdateBatch { prompts: &p, completions: &c, advantages: &a, old_logprobs: None, keep: &keep, sampling: None };
    let (g, m) = grpo_backward(&policy, Some(&reference), &batch, &cfg).unwrap();
    let flat = policy
        .vars()
        .iter()
        .map(|(name, v)| {
            let grad = g.get(v.as_tensor()).unwrap();
            // A gradient still on its graph keeps the micro-batch's activations alive (see the regression test).
            assert!(
                !grad.track_op(),
                "{name} (checkpointing {}): its gradient keeps a graph",
                cfg.gradient_checkpointing
            );
            grad.flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect();
    (flat, m)
}

/// Gradient checkpointing recomputes each layer in backward: the same gradients (up to f32 summation order) and
/// the same loss and metrics, for whole batches and micro-batches.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    for micro in [0, 2] {
        let (plain, mp) = grads(LossType::Dapo, micro);
        let (ckpt, mc) = grads_with(UpdateConfig { gradient_checkpointing: true, ..config(LossType::Dapo, micro) });
        let scale = plain.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
        let d = max_diff(&plain, &ckpt);
        assert!(scale > 0.0 && d <= 1e-5 * scale, "micro-batch {micro}: checkpointing changes the gradient by {d}");
        assert!(ckpt.iter().all(|g| g.iter().any(|x| *x != 0.0)), "a variable got a zero gradient");
        assert_eq!((mp.loss, mp.kl, mp.entropy), (mc.loss, mc.kl, mc.entropy));
    }
}

/// Regression: the gradients handed to the optimizer held the autograd graph of every micro-batch (Candle leaves
/// a variable's gradient attached to it), so memory grew by a micro-batch's activations per micro-batch.
#[test]
fn update_gradients_hold_no_autograd_graph() {
    for gradient_checkpointing in [false, true] {
        // grads_with asserts that no gradient it returns tracks a graph.
        let (g, _) = grads_with(UpdateConfig { gradient_checkpointing, ..config(LossType::Dapo, 2) });
        assert!(g.iter().flatten().any(|x| *x != 0.0));
    }
}

#[test]
fn micro_batches_accumulate_to_the_whole_batch_gradient() {
    for (loss_type, micros) in [(LossType::Dapo, vec![1, 3]), (LossType::Grpo, vec![2])] {
        let (whole, mw) = grads(loss_type, 0);
        let scale = whole.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
        for micro in micros {
            let (acc, ma) = grads(loss_type, micro);
            // Equal up to f32 summation order: relative to the largest gradient entry.
            let d = max_diff(&whole, &acc);
            assert!(
                d <= 1e-5 * scale,
                "{loss_type}: micro-batch {micro} changes the gradient by {d} (max |g| {scale})"
            );
            assert!((mw.loss - ma.loss).abs() < 1e-6, "{loss_type}: loss {} vs {}", mw.loss, ma.loss);
            assert!((mw.kl.unwrap() - ma.kl.unwrap()).abs() < 1e-6);
        }
        // On-policy, first step: ρ = 1, so nothing is clipped and the KL to an identical reference is 0.
        assert_eq!(mw.clip_region, 0.0);
        assert!(mw.kl.unwrap().abs() < 1e-6);
        assert!(scale > 0.0 && mw.entropy > 0.0);
    }
    // The full step applies them: grad norm measured, weights moved.
    let (_, m) = step(LossType::Dapo, 2, None);
    assert!(m.grad_norm.is_finite() && m.grad_norm > 0.0);
}

#[test]
fn the_step_raises_the_log_prob_of_a_positive_advantage_completion() {
    let policy = tiny(true);
    let mut opt = AdamW::new(policy.vars().to_vec(), AdamWConfig { lr: 1e-2, ..AdamWConfig::default() }).unwrap();
    let (p, c, a) = data();
    let keep = vec![true; p.len()];
    let seqs = SequenceBatch::new(&p, &c, 0, None, &Device::Cpu).unwrap();
    let seq_logp = |m: &CausalLm| -> Vec<f32> {
        let (lp, _) = completion_logprobs(m, &seqs, 0.9, 0, false).unwrap();
        let lp = (lp * &seqs.completion_mask).unwrap();
        lp.sum(1).unwrap().to_vec1().unwrap()
    };
    let before = seq_logp(&policy);
    let mut cfg = config(LossType::Dapo, 0);
    cfg.loss.beta = 0.0;
    let batch =
        UpdateBatch { prompts: &p, completions: &c, advantages: &a, old_logprobs: None, keep: &keep, sampling: None };
    grpo_update(&policy, None, &mut opt, &batch, &cfg).unwrap();
    let after = seq_logp(&policy);
    assert!(after[0] > before[0], "A = +1: {} → {}", before[0], after[0]);
    assert!(after[1] < before[1], "A = −1: {} → {}", before[1], after[1]);
}

#[test]
fn a_non_finite_loss_leaves_the_weights_untouched() {
    let (after, m) = step(LossType::Dapo, 0, Some(vec![f64::NAN, 1.0, 0.0, 0.0]));
    assert!(!m.loss.is_finite(), "{m:?}");
    // A NaN advantage makes the loss NaN: the weights must equal a model that was never stepped.
    let untouched: Vec<Vec<f32>> =
        tiny(true).vars().iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect();
    assert_eq!(max_diff(&after, &untouched), 0.0);
}

/// bf16 rollouts: each token's loss is weighted by min(exp(logp_old − logp_sampling), C). When the sampling
/// log-probs are the policy's own (what full-precision decoding records), the correction changes nothing, bit for
/// bit. With sampling log-probs lowered by ln k the weights are min(k, C): on the first, on-policy step
/// (ρ = 1, KL 0 against an identical reference) dapo's loss is −Σ_i A_i Σ_t w_it / N.
#[test]
fn importance_correction_is_exact_on_policy_and_weights_tokens_off_policy() {
    let (p, c, a) = data();
    let keep = vec![true; p.len()];
    let cfg = config(LossType::Dapo, 0);
    let run = |sampling: Option<(&[Vec<f32>], f64)>| {
        let policy = tiny(true);
        let reference = tiny(false);
        let batch =
            UpdateBatch { prompts: &p, completions: &c, advantages: &a, old_logprobs: None, keep: &keep, sampling };
        let (g, m) = grpo_backward(&policy, Some(&reference), &batch, &cfg).unwrap();
        let flat: Vec<Vec<f32>> = policy
            .vars()
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        (flat, m)
    };
    // The policy's own log-probs (same temperature as the update).
    let own: Vec<Vec<f32>> = {
        let model = tiny(false);
        let seqs = SequenceBatch::new(&p, &c, 0, None, &Device::Cpu).unwrap();
        let (lp, _) = completion_logprobs(&model, &seqs, cfg.temperature, 0, false).unwrap();
        lp.to_vec2::<f32>().unwrap().into_iter().zip(&c).map(|(row, ci)| row[..ci.len()].to_vec()).collect()
    };
    let (plain, mp) = run(None);
    let (same, ms) = run(Some((&own, 2.0)));
    assert_eq!(plain, same, "on-policy sampling log-probs must leave the gradients unchanged");
    assert_eq!(mp.loss, ms.loss);
    let is = ms.importance.unwrap();
    assert_eq!((is.ratio_min, is.ratio_max, is.logp_diff_max), (1.0, 1.0, 0.0));

    // Rows lowered by ln k: k = 1.5, 4 (capped at C = 2), 0.5, 1.
    let ks = [1.5f64, 4.0, 0.5, 1.0];
    let shifted: Vec<Vec<f32>> =
        own.iter().zip(ks).map(|(row, k)| row.iter().map(|&x| (x as f64 - k.ln()) as f32).collect()).collect();
    let (_, mw) = run(Some((&shifted, 2.0)));
    // A = [1, −1, 0.5, −0.5], lengths [3, 5, 1, 2], N = 11:
    // −(1·1.5·3 − 1·2·5 + 0.5·0.5·1 − 0.5·1·2)/11 = −(4.5 − 10 + 0.25 − 1)/11 = 6.25/11.
    let want = 6.25 / 11.0;
    assert!((mw.loss - want).abs() < 1e-5, "loss {} vs {want}", mw.loss);
    let is = mw.importance.unwrap();
    assert!((is.ratio_min - 0.5).abs() < 1e-5 && (is.ratio_max - 2.0).abs() < 1e-6);
    // Mean of w over 11 tokens: (1.5·3 + 2·5 + 0.5 + 1·2)/11 = 17/11.
    assert!((is.ratio_mean - 17.0 / 11.0).abs() < 1e-5, "{}", is.ratio_mean);
    assert!((is.logp_diff_max - 4f64.ln()).abs() < 1e-5);
}
