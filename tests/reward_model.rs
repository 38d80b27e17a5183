//! The `model` reward source against transformers: tiny LlamaForSequenceClassification and
//! Qwen2ForSequenceClassification models saved by transformers (tests/fixtures/reward-model, made by
//! scripts/make-reward-model-fixture.py) score the fixture texts within 1e-4 of transformers' scores, alone and in
//! left-padded batches, through the reward pipeline and with the chat template.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use safe::data::Prompt;
use safe::model::ChatMessage;
use safe::reward::model::RewardModel;
use safe::reward::{RewardInput, RewardSource};
use safe::rollout::FinishReason;
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reward-model")
}

fn cases(model: &str) -> Vec<(String, Vec<u32>, f64)> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("scores.json")).unwrap()).unwrap();
    v["models"][model]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            (c["text"].as_str().unwrap().to_string(), ids, c["score"].as_f64().unwrap())
        })
        .collect()
}

fn load(model: &str, chat: bool, batch_size: usize) -> RewardModel {
    let dir = fixtures().join(model);
    RewardModel::load("rm", dir.to_str().unwrap(), chat, batch_size, &Device::Cpu, DType::F32).unwrap()
}

fn input<'a>(
    prompt: &'a str,
    raw: Option<&'a Prompt>,
    completion: &'a str,
    cols: &'a Map<String, Value>,
) -> RewardInput<'a> {
    RewardInput { prompt, raw_prompt: raw, completion, completion_ids: &[], finish: FinishReason::Eos, columns: cols }
}

#[test]
fn scores_match_transformers_alone_and_left_padded() {
    for model in ["tiny-llama-rm", "tiny-qwen2-rm"] {
        let cases = cases(model);
        let ids: Vec<Vec<u32>> = cases.iter().map(|c| c.1.clone()).collect();
        // One at a time, then all five in one left-padded batch.
        let alone = load(model, false, 1).score_ids(&ids).unwrap();
        let batched = load(model, false, 16).score_ids(&ids).unwrap();
        let worst = cases.iter().enumerate().map(|(i, c)| (alone[i] - c.2).abs().max((batched[i] - c.2).abs()));
        eprintln!("{model}: max |safe − transformers| = {:.2e}", worst.fold(0.0, f64::max));
        for (i, (text, _, expected)) in cases.iter().enumerate() {
            assert!((alone[i] - expected).abs() < 1e-4, "{model} {text:?}: {} vs transformers {expected}", alone[i]);
            assert!((batched[i] - expected).abs() < 1e-4, "{model} {text:?} batched: {} vs {expected}", batched[i]);
        }
        // Through the RewardSource interface: prompt text + completion, tokenised by the model's own tokenizer.
        let rm = load(model, false, 2);
        let cols = Map::new();
        let (text, _, expected) = &cases[1];
        let (p, c) = text.split_at(15);
        let got = rm.score(&[input(p, None, c, &cols)]).unwrap();
        assert!((got[0].unwrap() - expected).abs() < 1e-4, "{model}: {got:?} vs {expected}");
    }
}

#[test]
fn chat_mode_renders_the_conversation_with_the_reward_models_template() {
    // A ChatML template without a trailing newline renders [user "Hello", assistant "Hi there!"] to exactly the
    // fixture's third text, so the score must be transformers' score of that text.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tiny-llama-rm").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        // Newlines as expressions: chat templates render with trim_blocks, which drops a newline after a tag.
        r"{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' }}{% if not loop.last %}{{ '\n' }}{% endif %}{% endfor %}",
    )
    .unwrap();
    let rm = RewardModel::load("rm", dir.path().to_str().unwrap(), true, 4, &Device::Cpu, DType::F32).unwrap();
    let (text, _, expected) = &cases("tiny-llama-rm")[2];
    assert!(text.starts_with("<|im_start|>user\nHello"));
    let cols = Map::new();
    let messages = Prompt::Messages(vec![ChatMessage::new("user", "Hello")]);
    let text_prompt = Prompt::Text("Hello".into());
    for raw in [&messages, &text_prompt] {
        // The rendered policy prompt is ignored in chat mode: the raw prompt is re-rendered.
        let got = rm.score(&[input("<policy template>", Some(raw), "Hi there!", &cols)]).unwrap();
        assert!((got[0].unwrap() - expected).abs() < 1e-4, "{got:?} vs {expected}");
    }
    // Without a template, chat mode is refused at load time.
    let e =
        RewardModel::load("rm", fixtures().join("tiny-llama-rm").to_str().unwrap(), true, 4, &Device::Cpu, DType::F32)
            .err()
            .unwrap();
    assert!(format!("{e:#}").contains("no chat template"), "{e:#}");
}

#[test]
fn a_causal_lm_is_not_a_reward_model_and_a_reward_model_is_not_a_policy() {
    let lm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny/tiny-llama");
    let e = RewardModel::load("rm", lm.to_str().unwrap(), false, 4, &Device::Cpu, DType::F32).err().unwrap();
    assert!(format!("{e:#}").contains("is not a sequence-classification reward model"), "{e:#}");
    let src = safe::model::ModelSource::parse(fixtures().join("tiny-qwen2-rm").to_str().unwrap(), None).unwrap();
    let loaded = safe::model::LoadedModel::load(&src, &Device::Cpu, DType::F32).unwrap();
    let e = loaded.into_model(true, &Device::Cpu, DType::F32).err().unwrap();
    assert!(format!("{e:#}").contains("is a reward model (Qwen2ForSequenceClassification)"), "{e:#}");
}
