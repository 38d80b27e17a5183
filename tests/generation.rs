//! Batched generation on SmolLM2: left-padded batches equal prompts decoded alone (and transformers' greedy ids),
//! seeded sampling is reproducible and independent of batch order and size, returned log-probs equal a
//! teacher-forced forward, and EOS / length end completions.

mod common;

use candle_core::{Device, Tensor, D};
use safe::model::{attention_mask, positions_from_mask};
use safe::rollout::{generate, Completion, FinishReason, GenerationConfig, Request, RowKey, SamplingParams};

fn prompts() -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let r = common::read_json(&common::fixture("smollm2/reference_logits.json"));
    r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                common::json_ids(&p["input_ids"]),
                common::json_ids(&p["greedy_ids"]),
            )
        })
        .collect()
}

fn config(sampling: SamplingParams, max_new_tokens: usize, eos_ids: Vec<u32>, batch_size: usize) -> GenerationConfig {
    GenerationConfig { sampling, max_new_tokens, eos_ids, stop_strings: vec![], batch_size, pad_id: 2 }
}

fn requests(prompts: &[Vec<u32>], samples: u64) -> Vec<Request> {
    let mut out = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for s in 0..samples {
            out.push(Request { prompt: p.clone(), key: RowKey { seed: 11, step: 0, prompt: i as u64, sample: s } });
        }
    }
    out
}

#[test]
fn left_padded_batched_greedy_equals_each_prompt_alone_and_transformers() {
    let ps = prompts();
    let ids: Vec<Vec<u32>> = ps.iter().map(|p| p.1.clone()).collect();
    let reqs = requests(&ids, 1);
    // No EOS: the reference greedy runs past <|im_end|>.
    let batched =
        generate(common::smollm2(), None, &reqs, &config(SamplingParams::greedy(), 24, vec![], 4), None).unwrap();
    let alone =
        generate(common::smollm2(), None, &reqs, &config(SamplingParams::greedy(), 24, vec![], 1), None).unwrap();
    for ((name, _, want), (b, a)) in ps.iter().zip(batched.iter().zip(&alone)) {
        assert_eq!(&b.ids, want, "{name}: batched greedy vs transformers");
        assert_eq!(b.ids, a.ids, "{name}: batched vs alone");
        assert_eq!(b.finish, FinishReason::Length);
        let d = b.logprobs.iter().zip(&a.logprobs).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(d < 1e-4, "{name}: log-probs batched vs alone differ by {d}");
    }
}

#[test]
fn greedy_stops_at_eos_and_includes_it() {
    let ps = prompts();
    let chat = ps.iter().find(|p| p.0 == "chat").unwrap();
    let reqs = requests(std::slice::from_ref(&chat.1), 1);
    let out =
        generate(common::smollm2(), None, &reqs, &config(SamplingParams::greedy(), 24, vec![2], 1), None).unwrap();
    let first_eos = chat.2.iter().position(|&t| t == 2).unwrap();
    assert_eq!(out[0].ids, chat.2[..=first_eos].to_vec());
    assert_eq!(out[0].finish, FinishReason::Eos);
}

fn sampled(order_reversed: bool, batch_size: usize) -> Vec<Completion> {
    let ids: Vec<Vec<u32>> = prompts().into_iter().map(|p| p.1).collect();
    let mut reqs = requests(&ids, 2);
    if order_reversed {
        reqs.reverse();
    }
    let sampling = SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 50, ..Default::default() };
    let mut out = generate(common::smollm2(), None, &reqs, &config(sampling, 12, vec![2], batch_size), None).unwrap();
    if order_reversed {
        out.reverse();
    }
    out
}

#[test]
fn seeded_sampling_is_reproducible_and_independent_of_batch_order_and_size() {
    let a = sampled(false, 8);
    assert_eq!(a, sampled(false, 8), "same seed, same batch: identical");
    let ids = |v: &[Completion]| v.iter().map(|c| c.ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&sampled(true, 8)), "reversed batch order");
    assert_eq!(ids(&a), ids(&sampled(false, 3)), "batch size 3");
    // Different samples of one prompt differ (the streams are distinct).
    assert!(a.chunks(2).any(|pair| pair[0].ids != pair[1].ids));
}

#[test]
fn sampled_logprobs_equal_teacher_forced_forward_at_temperature() {
    let temperature = 0.7;
    let ids: Vec<Vec<u32>> = prompts().into_iter().map(|p| p.1).take(2).collect();
    let reqs = requests(&ids, 1);
    let sampling = SamplingParams { temperature, ..Default::default() };
    let out = generate(common::smollm2(), None, &reqs, &config(sampling, 10, vec![2], 2), None).unwrap();
    let dev = Device::Cpu;
    let m = common::smollm2();
    for (req, c) in reqs.iter().zip(&out) {
        let full: Vec<u32> = req.prompt.iter().chain(&c.ids).copied().collect();
        let valid = vec![vec![true; full.len()]];
        let input = Tensor::new(full.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        let pos = Tensor::new(positions_from_mask(&valid), &dev).unwrap();
        let mask = attention_mask(&valid, full.len(), None, &dev).unwrap();
        let logits = (m.forward(&input, &pos, &mask, None).unwrap().squeeze(0).unwrap() / temperature).unwrap();
        let logp = safe::model::llama::log_softmax_last_dim(&logits).unwrap();
        let p = req.prompt.len();
        let targets = Tensor::new(&full[p..], &dev).unwrap().unsqueeze(1).unwrap();
        let lp: Vec<f32> = logp
            .narrow(0, p - 1, c.ids.len())
            .unwrap()
            .gather(&targets, D::Minus1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = lp.iter().zip(&c.logprobs).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(d < 2e-4, "rollout log-probs differ from the teacher-forced forward by {d}");
    }
}

#[test]
fn stop_strings_end_a_completion_after_the_token_that_completes_them() {
    let tok = common::smollm2_tokenizer();
    let prompt = tok
        .apply_chat_template(&[safe::model::ChatMessage::new("user", "What is the capital of France?")], true)
        .unwrap();
    let reqs =
        vec![Request { prompt: tok.encode(&prompt).unwrap(), key: RowKey { seed: 0, step: 0, prompt: 0, sample: 0 } }];
    let mut cfg = config(SamplingParams::greedy(), 30, vec![2], 1);
    let plain = generate(common::smollm2(), Some(tok), &reqs, &cfg, None).unwrap();
    let plain_text = tok.decode(&plain[0].ids, true).unwrap();
    assert!(plain_text.contains("Paris") && !plain_text.ends_with("Paris"), "{plain_text}");
    cfg.stop_strings = vec!["Paris".into()];
    let out = generate(common::smollm2(), Some(tok), &reqs, &cfg, None).unwrap();
    assert_eq!(out[0].finish, FinishReason::Stop);
    let text = tok.decode(&out[0].ids, true).unwrap();
    assert!(text.ends_with("Paris"), "{text}");
    assert_eq!(out[0].ids[..], plain[0].ids[..out[0].ids.len()], "same greedy prefix");
}

#[test]
fn a_prompt_shared_by_several_rows_is_prefilled_once_with_the_same_result() {
    let ids: Vec<Vec<u32>> = prompts().into_iter().map(|p| p.1).take(2).collect();
    // Rows: p0, p1, p0, p0, p1: two distinct prompts prefilled, their caches copied to the other rows.
    let order = [0usize, 1, 0, 0, 1];
    let reqs: Vec<Request> = order
        .iter()
        .enumerate()
        .map(|(i, &p)| Request {
            prompt: ids[p].clone(),
            key: RowKey { seed: 3, step: 0, prompt: p as u64, sample: i as u64 },
        })
        .collect();
    let greedy = config(SamplingParams::greedy(), 16, vec![], 5);
    let shared = generate(common::smollm2(), None, &reqs, &greedy, None).unwrap();
    let alone =
        generate(common::smollm2(), None, &reqs, &config(SamplingParams::greedy(), 16, vec![], 1), None).unwrap();
    for (s, a) in shared.iter().zip(&alone) {
        assert_eq!(s.ids, a.ids);
        let d = s.logprobs.iter().zip(&a.logprobs).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(d < 1e-4, "shared prefill changes log-probs by {d}");
    }
    assert_eq!(shared[0].ids, shared[2].ids);
}
