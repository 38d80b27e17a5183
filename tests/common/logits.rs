//! Reading `transformers` / PEFT reference logits and comparing our forward with them.

use candle_core::{Device, Tensor};
use safe::model::{attention_mask, positions_from_mask, CausalLm};
use serde_json::Value;

pub fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn rows_of(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

pub fn max_abs_diff(ours: &[Vec<f32>], reference: &[Vec<f32>]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "row count");
    ours.iter()
        .zip(reference)
        .flat_map(|(a, b)| {
            assert_eq!(a.len(), b.len(), "row width");
            a.iter().zip(b).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

/// Logits `[s, vocab]` of one unpadded sequence.
pub fn logits_unpadded(model: &CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let valid = vec![vec![true; ids.len()]];
    let pos = Tensor::new(positions_from_mask(&valid), &dev).unwrap();
    let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let mask = attention_mask(&valid, ids.len(), None, &dev).unwrap();
    model.forward(&input, &pos, &mask, None).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}
