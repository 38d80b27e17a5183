//! Tokenizer tests against the SmolLM2 fixtures: ids from the fixture `tokenizer.json` and from the GGUF-rebuilt
//! tokenizer must equal transformers' ids; chat templates, decoding, errors, save/reload.

mod common;

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use safe::model::tokenizer::ChatMessage;
use safe::model::{HfConfig, ModelConfig, Tokenizer};

const FIXTURE_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "config.json"];

fn model_config() -> ModelConfig {
    let path = common::fixture("smollm2/config.json");
    HfConfig::from_file(&path).unwrap().validate(&path.display().to_string()).unwrap()
}

/// A temp dir holding copies of `files` from the fixture directory.
fn fixture_dir(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::copy(common::fixture(&format!("smollm2/{f}")), dir.path().join(f)).unwrap();
    }
    dir
}

fn dir_tokenizer() -> Tokenizer {
    let dir = fixture_dir(FIXTURE_FILES);
    Tokenizer::from_dir(dir.path(), &model_config()).unwrap()
}

/// The GGUF, linked into an empty temp dir so no tokenizer.json is beside it: the metadata path is taken.
fn gguf_tokenizer() -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    let link: PathBuf = dir.path().join("model.gguf");
    std::os::unix::fs::symlink(common::smollm2_gguf(), &link).unwrap();
    assert!(!dir.path().join("tokenizer.json").exists());
    let mut file = std::fs::File::open(&link).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Tokenizer::from_gguf(&content, &link, &model_config()).unwrap()
}

struct Prompt {
    name: String,
    text: String,
    ids: Vec<u32>,
}

fn prompts() -> Vec<Prompt> {
    let v = common::read_json(&common::fixture("smollm2/reference_logits.json"));
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Prompt {
            name: p["name"].as_str().unwrap().to_string(),
            text: p["text"].as_str().unwrap().to_string(),
            ids: p["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
        })
        .collect()
}

fn france() -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", "What is the capital of France?")]
}

fn check_fixture_prompts(tok: &Tokenizer, source: &str) {
    let prompts = prompts();
    assert_eq!(prompts.len(), 4);
    for p in &prompts {
        assert_eq!(tok.encode(&p.text).unwrap(), p.ids, "{source}: ids of prompt `{}`", p.name);
    }
    let chat = prompts.iter().find(|p| p.name == "chat").unwrap();
    assert_eq!(tok.apply_chat_template(&france(), true).unwrap(), chat.text, "{source}: chat template");
}

#[test]
fn fixture_tokenizer_json_matches_reference_ids() {
    let tok = dir_tokenizer();
    check_fixture_prompts(&tok, "tokenizer.json");
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.pad_id(), Some(2));
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn gguf_rebuilt_tokenizer_matches_reference_ids() {
    let tok = gguf_tokenizer();
    check_fixture_prompts(&tok, "GGUF metadata");
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.pad_id(), Some(2));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn both_sources_agree_on_digits_and_more() {
    let (a, b) = (dir_tokenizer(), gguf_tokenizer());
    for text in [
        "at 60 miles, 2024 and 3.14 x=180",
        "Ünïcödé — 日本語のテキスト 🦀🚀 naïve café",
        "<|im_start|>user\nhi<|im_end|>\n",
        "  leading spaces\t\ttabs\n\n\nnewlines   ",
        "I'm sure they'll say 'it's fine' — DON'T.",
    ] {
        assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap(), "ids of {text:?}");
    }
}

#[test]
fn decode_round_trips_and_skips_special() {
    for (tok, source) in [(dir_tokenizer(), "tokenizer.json"), (gguf_tokenizer(), "GGUF")] {
        let mut texts: Vec<String> = prompts().into_iter().map(|p| p.text).collect();
        texts.push("Ünïcödé — 日本語のテキスト 🦀🚀 naïve café\n\ttab".to_string());
        for text in &texts {
            let ids = tok.encode(text).unwrap();
            assert_eq!(&tok.decode(&ids, false).unwrap(), text, "{source}: round trip");
        }
        let ids = tok.encode("<|im_start|>assistant\nParis.<|im_end|>").unwrap();
        assert_eq!(ids.first(), Some(&1), "{source}: <|im_start|> is one token");
        assert_eq!(ids.last(), Some(&2), "{source}: <|im_end|> is one token");
        assert_eq!(tok.decode(&ids, true).unwrap(), "assistant\nParis.", "{source}: skip_special");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>assistant\nParis.<|im_end|>");
    }
}

#[test]
fn chat_template_from_tokenizer_config_string_and_named_list() {
    let expected = prompts().into_iter().find(|p| p.name == "chat").unwrap().text;
    let template = std::fs::read_to_string(common::fixture("smollm2/chat_template.jinja")).unwrap();
    let with_config = |chat_template: serde_json::Value| {
        let dir = fixture_dir(&["tokenizer.json"]);
        let cfg = serde_json::json!({
            "bos_token": {"content": "<|im_start|>", "special": true},
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "chat_template": chat_template,
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let tok = Tokenizer::from_dir(dir.path(), &model_config()).unwrap();
        tok.apply_chat_template(&france(), true).unwrap()
    };
    assert_eq!(with_config(serde_json::json!(template)), expected);
    let list = serde_json::json!([
        {"name": "tool_use", "template": "TOOLS {{ messages[0].content }}"},
        {"name": "default", "template": template},
    ]);
    assert_eq!(with_config(list), expected);
}

#[test]
fn template_errors_name_origin_and_message() {
    let dir = fixture_dir(&["tokenizer.json", "tokenizer_config.json"]);
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools, please') }}{% endif %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path(), &model_config()).unwrap();
    assert_eq!(tok.apply_chat_template(&[ChatMessage::new("user", "hi")], false).unwrap(), "hi");
    let err = tok.apply_chat_template(&[ChatMessage::new("tool", "x")], false).unwrap_err().to_string();
    assert!(err.contains("no tools, please"), "{err}");
    assert!(err.contains("chat_template.jinja"), "{err}");

    std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}{{ m.content }").unwrap();
    let err = Tokenizer::from_dir(dir.path(), &model_config()).err().unwrap().to_string();
    assert!(err.contains("chat_template.jinja") && err.contains("does not compile"), "{err}");
}

#[test]
fn template_python_methods_loop_controls_and_tojson() {
    let dir = fixture_dir(&["tokenizer.json", "tokenizer_config.json"]);
    let src = "{% for m in messages %}\n\
               {% if m.content.startswith('skip') %}{% continue %}{% endif %}\n\
               {% if m.content == 'stop' %}{% break %}{% endif %}\n\
               {{ m.role.title() }}: {{ m.content.strip().split(' ') | tojson }}\n\
               {% endfor %}\n\
               {{ eos_token }}";
    std::fs::write(dir.path().join("chat_template.jinja"), src).unwrap();
    let tok = Tokenizer::from_dir(dir.path(), &model_config()).unwrap();
    let msgs = [
        ChatMessage::new("user", "  a b "),
        ChatMessage::new("assistant", "skip me"),
        ChatMessage::new("user", "c"),
        ChatMessage::new("user", "stop"),
        ChatMessage::new("user", "never"),
    ];
    assert_eq!(tok.apply_chat_template(&msgs, false).unwrap(), "User: [\"a\", \"b\"]\nUser: [\"c\"]\n<|im_end|>");
}

fn save_and_reload(tok: &Tokenizer, source: &str) {
    let out = tempfile::tempdir().unwrap();
    tok.save(out.path()).unwrap();
    let cfg = common::read_json(&out.path().join("tokenizer_config.json"));
    assert_eq!(cfg["eos_token"], "<|im_end|>", "{source}");
    assert_eq!(cfg["bos_token"], "<|im_start|>", "{source}");
    assert_eq!(cfg["pad_token"], "<|im_end|>", "{source}");
    let back = Tokenizer::from_dir(out.path(), &model_config()).unwrap();
    for p in prompts() {
        assert_eq!(back.encode(&p.text).unwrap(), p.ids, "{source}: reloaded ids of `{}`", p.name);
    }
    assert_eq!(back.chat_template(), tok.chat_template(), "{source}: template");
    assert_eq!(back.apply_chat_template(&france(), true).unwrap(), tok.apply_chat_template(&france(), true).unwrap());
    assert_eq!((back.bos_id(), back.eos_ids(), back.pad_id()), (tok.bos_id(), tok.eos_ids(), tok.pad_id()));
    assert_eq!(back.to_json_string().unwrap(), tok.to_json_string().unwrap(), "{source}: tokenizer.json");
}

#[test]
fn save_then_reload_is_identical() {
    save_and_reload(&dir_tokenizer(), "tokenizer.json");
    save_and_reload(&gguf_tokenizer(), "GGUF");
}

#[test]
fn missing_and_broken_files_are_named() {
    let empty = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(empty.path(), &model_config()).err().unwrap().to_string();
    assert!(err.contains("cannot read") && err.contains("tokenizer.json"), "{err}");

    let dir = fixture_dir(&["tokenizer.json"]);
    std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(dir.path(), &model_config()).err().unwrap());
    assert!(err.contains(&dir.path().join("tokenizer_config.json").display().to_string()), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = Tokenizer::from_dir(dir.path(), &model_config()).err().unwrap().to_string();
    assert!(err.contains("not a valid tokenizer.json"), "{err}");
}

#[test]
fn gguf_with_tokenizer_json_beside_uses_it() {
    let dir = fixture_dir(&["tokenizer.json", "tokenizer_config.json"]);
    let link = dir.path().join("model.gguf");
    std::os::unix::fs::symlink(common::smollm2_gguf(), &link).unwrap();
    let content = gguf_file::Content::read(&mut std::fs::File::open(&link).unwrap()).unwrap();
    let tok = Tokenizer::from_gguf(&content, &link, &model_config()).unwrap();
    // The dir has no template of its own: the GGUF's is used.
    let chat = prompts().into_iter().find(|p| p.name == "chat").unwrap();
    assert_eq!(tok.apply_chat_template(&france(), true).unwrap(), chat.text);
    assert_eq!(tok.encode(&chat.text).unwrap(), chat.ids);
}
