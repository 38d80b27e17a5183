//! Completion log-probs over a padded batch equal each sequence computed alone; chunking changes nothing; the
//! frozen view shares the trainable weights but records no graph.

mod common;

use candle_core::{DType, Device, Tensor};
use safe::model::logprobs::{completion_logprobs, SequenceBatch};
use safe::model::{attention_mask, positions_from_mask, CausalLm, LoadedModel, ModelSource};

fn tiny(trainable: bool) -> CausalLm {
    let dir = common::fixture("tiny/tiny-llama");
    let src = ModelSource::parse(dir.to_str().unwrap(), None).unwrap();
    LoadedModel::load(&src, &Device::Cpu, DType::F32)
        .unwrap()
        .into_model(trainable, &Device::Cpu, DType::F32)
        .unwrap()
        .0
}

fn prompts() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    (vec![vec![1, 17, 300, 42], vec![1, 5], vec![9, 10, 11]], vec![vec![7, 99, 254, 2], vec![3, 88], vec![501]])
}

/// Log-probs and entropies of one sequence's completion tokens from a plain full forward.
fn alone(model: &CausalLm, prompt: &[u32], completion: &[u32], t: f64) -> (Vec<f32>, Vec<f32>) {
    let dev = Device::Cpu;
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let valid = vec![vec![true; ids.len()]];
    let input = Tensor::new(ids.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
    let pos = Tensor::new(positions_from_mask(&valid), &dev).unwrap();
    let mask = attention_mask(&valid, ids.len(), None, &dev).unwrap();
    let logits = (model.forward(&input, &pos, &mask, None).unwrap().squeeze(0).unwrap() / t).unwrap();
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let mut lps = Vec::new();
    let mut ents = Vec::new();
    for (j, &tok) in completion.iter().enumerate() {
        let row = &rows[prompt.len() - 1 + j];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let lse = max + z.ln();
        lps.push((row[tok as usize] as f64 - lse) as f32);
        // H = −Σ p log p
        ents.push(
            -row.iter()
                .map(|&x| {
                    let lp = x as f64 - lse;
                    lp.exp() * lp
                })
                .sum::<f64>() as f32,
        );
    }
    (lps, ents)
}

#[test]
fn padded_batch_logprobs_and_entropy_equal_each_sequence_alone_for_any_chunk() {
    let model = tiny(false);
    let (ps, cs) = prompts();
    let batch = SequenceBatch::new(&ps, &cs, 0, None, &Device::Cpu).unwrap();
    assert_eq!((batch.prompt_width, batch.completion_width), (4, 4));
    let mask: Vec<Vec<f32>> = batch.completion_mask.to_vec2().unwrap();
    assert_eq!(mask[1], vec![1.0, 1.0, 0.0, 0.0]);
    let t = 0.7;
    let mut previous: Option<Vec<Vec<f32>>> = None;
    for chunk in [0, 1, 3] {
        let (lp, ent) = completion_logprobs(&model, &batch, t, chunk, true).unwrap();
        let lp: Vec<Vec<f32>> = lp.to_vec2().unwrap();
        let ent: Vec<Vec<f32>> = ent.unwrap().to_vec2().unwrap();
        for (r, (p, c)) in ps.iter().zip(&cs).enumerate() {
            let (want_lp, want_ent) = alone(&model, p, c, t);
            for j in 0..c.len() {
                assert!((lp[r][j] - want_lp[j]).abs() < 1e-5, "row {r} tok {j}: {} vs {}", lp[r][j], want_lp[j]);
                assert!((ent[r][j] - want_ent[j]).abs() < 1e-4, "row {r} tok {j} entropy");
            }
            assert!(lp[r].iter().all(|x| x.is_finite()));
        }
        if let Some(prev) = &previous {
            assert_eq!(prev, &lp, "chunk {chunk} changes the result");
        }
        previous = Some(lp);
    }
}

#[test]
fn gradients_of_completion_logprobs_reach_every_weight_and_frozen_view_records_none() {
    let model = tiny(true);
    let (ps, cs) = prompts();
    let batch = SequenceBatch::new(&ps, &cs, 0, None, &Device::Cpu).unwrap();
    let (lp, _) = completion_logprobs(&model, &batch, 1.0, 2, false).unwrap();
    let loss = (lp * &batch.completion_mask).unwrap().sum_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}");
    }
    // The frozen view computes the same numbers, without a graph.
    let frozen = model.frozen_view().unwrap();
    assert!(frozen.vars().is_empty());
    let (a, _) = completion_logprobs(&model, &batch, 1.0, 0, false).unwrap();
    let (b, _) = completion_logprobs(&frozen, &batch, 1.0, 0, false).unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    let grads = b.sum_all().unwrap().backward().unwrap();
    assert!(model.vars().iter().all(|(_, v)| grads.get(v.as_tensor()).is_none()), "frozen view recorded a graph");
    // It shares storage: an update to a variable is seen by the view.
    let (_, embed) = &model.vars()[0];
    embed.set(&(embed.as_tensor() * 2.0).unwrap()).unwrap();
    let (c, _) = completion_logprobs(&frozen, &batch, 1.0, 0, false).unwrap();
    let (d, _) = completion_logprobs(&model, &batch, 1.0, 0, false).unwrap();
    assert_eq!(c.to_vec2::<f32>().unwrap(), d.to_vec2::<f32>().unwrap());
    assert_ne!(c.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
}

/// The update's forward runs the per-token layers on the real tokens only (packed) and the LM head through the
/// fused CPU op; both must give the padded, composite computation's log-probs and gradients.
#[test]
fn packed_forward_and_fused_head_equal_the_padded_computation_in_loss_and_gradients() {
    use safe::model::logprobs::{logprobs_from_hidden, Entropy};
    let model = tiny(true);
    let (ps, cs) = prompts();
    let batch = SequenceBatch::new(&ps, &cs, 0, None, &Device::Cpu).unwrap();
    let weights = Tensor::new(&[[0.5f32, -1.0, 2.0, 0.25], [1.5, -0.5, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]], &Device::Cpu)
        .unwrap()
        .mul(&batch.completion_mask)
        .unwrap();
    let loss_of = |lp: &Tensor| (lp * &weights).unwrap().sum_all().unwrap();

    // Packed + fused (what training uses on the CPU).
    let (lp, ent) = completion_logprobs(&model, &batch, 0.8, 0, true).unwrap();
    let grads = loss_of(&lp).backward().unwrap();
    // Padded forward + composite head (Entropy::Differentiable takes the composite path).
    let hidden = model.forward_hidden(&batch.input_ids, &batch.positions, &batch.mask, None).unwrap();
    let (lp_ref, ent_ref) = logprobs_from_hidden(&model, &hidden, &batch, 0.8, 2, Entropy::Differentiable).unwrap();
    let grads_ref = loss_of(&lp_ref).backward().unwrap();

    let masked = |t: &Tensor| t.mul(&batch.completion_mask).unwrap().to_vec2::<f32>().unwrap();
    for (a, b) in [(masked(&lp), masked(&lp_ref)), (masked(&ent.unwrap()), masked(&ent_ref.unwrap()))] {
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
    for (name, var) in model.vars() {
        let a = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient (packed)"));
        let b = grads_ref.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient (padded)"));
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(diff <= 1e-4 * scale.max(1e-3), "{name}: gradients differ by {diff} (scale {scale})");
    }
}
