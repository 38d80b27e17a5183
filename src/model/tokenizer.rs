//! Tokenizer: from `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`)
//! or rebuilt from GGUF metadata the way transformers' GGUF converter does; chat templates (see [`super::chat`]).
//!
//! Special token ids: EOS is the union of the model config's `eos_token_id`s and the tokenizer's EOS token; pad is
//! the tokenizer's pad token, else the config's `pad_token_id`, else the first EOS.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value as Json};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

pub use super::chat::{ChatMessage, ChatTemplate};
use super::config::ModelConfig;

/// The special token strings a tokenizer names (as in `tokenizer_config.json`).
#[derive(Debug, Clone, Default, PartialEq)]
struct SpecialTokens {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
}

/// A Hugging Face tokenizer plus what transformers keeps beside it: special tokens and the chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    /// `add_bos_token` as the source stated it (written back on save); encoding follows `inner`'s post-processor.
    add_bos_token: Option<bool>,
    chat: Option<ChatTemplate>,
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// A special token in `tokenizer_config.json`: a string or an AddedToken dict `{"content": ...}`.
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(m) => m.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// The chat template of a `tokenizer_config.json`: a string, or a list of `{name, template}` (we take "default").
fn config_chat_template(cfg: &Json, path: &Path) -> Result<Option<(String, String)>> {
    let origin = format!("{} (chat_template)", path.display());
    match cfg.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some((s.clone(), origin))),
        Some(Json::Array(list)) => {
            let named: Vec<(&str, &str)> =
                list.iter().filter_map(|t| Some((t.get("name")?.as_str()?, t.get("template")?.as_str()?))).collect();
            if named.len() != list.len() {
                bail!("{origin}: a list of chat templates must hold {{\"name\": ..., \"template\": ...}} objects");
            }
            let (name, tmpl) = match named.iter().find(|(n, _)| *n == "default") {
                Some(t) => *t,
                None => {
                    let first = *named.first().with_context(|| format!("{origin}: the list of templates is empty"))?;
                    eprintln!("warning: {origin} has no template named \"default\"; using \"{}\"", first.0);
                    first
                }
            };
            Ok(Some((tmpl.to_string(), format!("{} (chat_template \"{name}\")", path.display()))))
        }
        Some(_) => bail!("{origin}: chat_template must be a string or a list of {{name, template}} objects"),
    }
}

impl Tokenizer {
    /// Load `dir/tokenizer.json` with the optional `tokenizer_config.json`, `special_tokens_map.json` and
    /// `chat_template.jinja` beside it (the `.jinja` file wins over a template inside `tokenizer_config.json`,
    /// as in transformers).
    pub fn from_dir(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let inner: tokenizers::Tokenizer =
            text.parse().map_err(|e| anyhow!("{} is not a valid tokenizer.json: {e}", path.display()))?;

        let config_path = dir.join("tokenizer_config.json");
        let tok_cfg = if config_path.is_file() { read_json(&config_path)? } else { json!({}) };
        let map_path = dir.join("special_tokens_map.json");
        let map = if map_path.is_file() { read_json(&map_path)? } else { json!({}) };
        let pick = |key: &str| token_string(tok_cfg.get(key)).or_else(|| token_string(map.get(key)));
        let special = SpecialTokens {
            bos: pick("bos_token"),
            eos: pick("eos_token"),
            pad: pick("pad_token"),
            unk: pick("unk_token"),
        };

        let jinja_path = dir.join("chat_template.jinja");
        let template = if jinja_path.is_file() {
            let src = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("cannot read {}", jinja_path.display()))?;
            Some((src, jinja_path.display().to_string()))
        } else {
            config_chat_template(&tok_cfg, &config_path)?
        };
        let chat = template.map(|(src, origin)| ChatTemplate::new(src, origin)).transpose()?;
        let add_bos_token = tok_cfg.get("add_bos_token").and_then(|v| v.as_bool());
        Self::assemble(inner, special, chat, add_bos_token, cfg, &path.display().to_string())
    }

    /// The tokenizer of a GGUF file: a `tokenizer.json` beside the file if there is one (loaded as by
    /// [`Tokenizer::from_dir`]), otherwise rebuilt from the `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let md = &content.metadata;
        let origin = path.display().to_string();
        let metadata_template = || -> Result<Option<ChatTemplate>> {
            md_str(md, "tokenizer.chat_template")
                .map(|src| ChatTemplate::new(src.to_string(), format!("{origin} (tokenizer.chat_template)")))
                .transpose()
        };
        if let Some(dir) = path.parent().filter(|d| d.join("tokenizer.json").is_file()) {
            let mut tok = Self::from_dir(dir, cfg)?;
            if tok.chat.is_none() {
                tok.chat = metadata_template()?;
            }
            return Ok(tok);
        }

        let model = md_str(md, "tokenizer.ggml.model").with_context(|| {
            format!("{origin}: GGUF metadata has no tokenizer.ggml.model (and no tokenizer.json is beside the file)")
        })?;
        let tokens = md_strings(md, "tokenizer.ggml.tokens", &origin)?
            .with_context(|| format!("{origin}: GGUF metadata has no tokenizer.ggml.tokens"))?;
        let token_types = md_ints(md, "tokenizer.ggml.token_type", &origin)?.unwrap_or_default();
        let merges = md_strings(md, "tokenizer.ggml.merges", &origin)?;
        let pre = md_str(md, "tokenizer.ggml.pre").unwrap_or("default");
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok());
        let id = |key: &str| md.get(key).and_then(as_int).and_then(|i| u32::try_from(i).ok());
        let name_of = |key: &str| id(key).and_then(|i| tokens.get(i as usize).cloned());
        let special = SpecialTokens {
            bos: name_of("tokenizer.ggml.bos_token_id"),
            eos: name_of("tokenizer.ggml.eos_token_id"),
            pad: name_of("tokenizer.ggml.padding_token_id"),
            unk: name_of("tokenizer.ggml.unknown_token_id"),
        };

        let (mut inner, add_bos) = match model {
            "gpt2" => {
                let merges =
                    merges.with_context(|| format!("{origin}: a gpt2 GGUF tokenizer needs tokenizer.ggml.merges"))?;
                (byte_level_bpe(&tokens, &merges, pre, &origin)?, add_bos.unwrap_or(false))
            }
            "llama" => {
                let scores = md_floats(md, "tokenizer.ggml.scores", &origin)?;
                let add_prefix_space = md.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok());
                let t = sentencepiece_bpe(
                    &tokens,
                    merges.as_deref(),
                    scores.as_deref(),
                    add_prefix_space,
                    &special,
                    &origin,
                )?;
                // llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
                (t, add_bos.unwrap_or(true))
            }
            other => bail!(
                "{origin}: GGUF tokenizer model `{other}` is not supported yet (supported: gpt2, llama); \
                 put the model's tokenizer.json beside the GGUF file"
            ),
        };
        add_gguf_added_tokens(&mut inner, &tokens, &token_types, model == "gpt2");
        if add_bos {
            let bos = special.bos.as_deref().with_context(|| {
                format!("{origin}: tokenizer.ggml.add_bos_token is true but there is no tokenizer.ggml.bos_token_id")
            })?;
            let bos_id = id("tokenizer.ggml.bos_token_id").expect("bos name implies its id");
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos}:0 $A:0"))
                .and_then(|b| b.try_pair(format!("{bos}:0 $A:0 {bos}:1 $B:1")))
                .map_err(|e| anyhow!("{origin}: BOS post-processor: {e}"))?
                .special_tokens(vec![(bos.to_string(), bos_id)])
                .build()
                .map_err(|e| anyhow!("{origin}: BOS post-processor: {e}"))?;
            inner.with_post_processor(Some(post));
        }
        let chat = metadata_template()?;
        Self::assemble(inner, special, chat, Some(add_bos), cfg, &origin)
    }

    /// A tokenizer built in code (the built-in models): special tokens named by their strings, optional template.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos: Option<&str>,
        eos: Option<&str>,
        pad: Option<&str>,
        chat_template: Option<&str>,
        cfg: &ModelConfig,
        origin: &str,
    ) -> Result<Self> {
        let special = SpecialTokens {
            bos: bos.map(str::to_string),
            eos: eos.map(str::to_string),
            pad: pad.map(str::to_string),
            unk: None,
        };
        let chat = chat_template.map(|t| ChatTemplate::new(t.to_string(), origin.to_string())).transpose()?;
        Self::assemble(inner, special, chat, Some(false), cfg, origin)
    }

    /// Resolve special token ids from the token strings, falling back on the model config.
    fn assemble(
        inner: tokenizers::Tokenizer,
        mut special: SpecialTokens,
        chat: Option<ChatTemplate>,
        add_bos_token: Option<bool>,
        cfg: &ModelConfig,
        origin: &str,
    ) -> Result<Self> {
        let lookup = |name: &Option<String>, what: &str| -> Option<u32> {
            let name = name.as_deref()?;
            let id = inner.token_to_id(name);
            if id.is_none() {
                eprintln!("warning: {origin}: {what} `{name}` is not in the vocabulary");
            }
            id
        };
        let bos_id = lookup(&special.bos, "bos_token").or(cfg.bos_token_id);
        let mut eos_ids = cfg.eos_token_ids.clone();
        if let Some(id) = lookup(&special.eos, "eos_token") {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let pad_id = lookup(&special.pad, "pad_token").or(cfg.pad_token_id).or(eos_ids.first().copied());
        let unk_id = lookup(&special.unk, "unk_token");
        // Name the tokens the config gave only by id, so templates see `bos_token` / `eos_token`.
        let name = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
        special.bos = special.bos.clone().or_else(|| name(bos_id));
        special.eos = special.eos.clone().or_else(|| name(eos_ids.first().copied()));
        special.pad = special.pad.clone().or_else(|| name(pad_id));
        special.unk = special.unk.clone().or_else(|| name(unk_id));
        Ok(Self { inner, special, bos_id, eos_ids, pad_id, add_bos_token, chat })
    }

    /// Token ids of `text`, with the tokenizer's own special tokens added (its post-processor: BOS for
    /// Llama-style tokenizers, nothing for SmolLM2 or Qwen2).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| anyhow!("tokenizer: cannot encode: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` without any special tokens added (completions: they follow a prompt).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizer: cannot encode: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; `skip_special` drops special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("tokenizer: cannot decode: {e}"))
    }

    /// Every id that ends generation (config and tokenizer EOS together).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The id to pad batches with: the pad token, else the first EOS, else 0 (padding is never attended to).
    pub fn padding_id(&self) -> u32 {
        self.pad_id.or(self.eos_ids.first().copied()).unwrap_or(0)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// The chat template source, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat.as_ref().map(|c| c.source())
    }

    /// Replace the chat template (`origin` is named in its errors).
    pub fn set_chat_template(&mut self, source: String, origin: String) -> Result<()> {
        self.chat = Some(ChatTemplate::new(source, origin)?);
        Ok(())
    }

    /// The conversation as the model's chat template writes it. The template sees `messages`,
    /// `add_generation_prompt`, and the special token strings (`bos_token`, `eos_token`, `pad_token`, `unk_token`).
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let chat = self.chat.as_ref().context("this tokenizer has no chat template")?;
        let mut vars = BTreeMap::new();
        for (key, value) in [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("pad_token", &self.special.pad),
            ("unk_token", &self.special.unk),
        ] {
            if let Some(v) = value {
                vars.insert(key.to_string(), v.clone());
            }
        }
        chat.render(messages, add_generation_prompt, &vars)
    }

    /// `tokenizer.json` as a string.
    pub fn to_json_string(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| anyhow!("tokenizer: cannot serialize: {e}"))
    }

    /// `tokenizer_config.json` as transformers reads it: special tokens, chat template, `add_bos_token`.
    pub fn config_json(&self) -> Json {
        let mut cfg = serde_json::Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        for (key, value) in [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("pad_token", &self.special.pad),
            ("unk_token", &self.special.unk),
        ] {
            cfg.insert(key.into(), value.as_ref().map_or(Json::Null, |v| json!(v)));
        }
        if let Some(add) = self.add_bos_token {
            cfg.insert("add_bos_token".into(), json!(add));
        }
        if let Some(chat) = &self.chat {
            cfg.insert("chat_template".into(), json!(chat.source()));
        }
        Json::Object(cfg)
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` into `dir` (created if needed), so the directory
    /// opens with `AutoTokenizer.from_pretrained` and with [`Tokenizer::from_dir`].
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
        };
        write("tokenizer.json", self.to_json_string()?)?;
        write("tokenizer_config.json", serde_json::to_string_pretty(&self.config_json())? + "\n")?;
        // A stale chat_template.jinja would override the template we just wrote.
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            std::fs::remove_file(&jinja).with_context(|| format!("cannot remove stale {}", jinja.display()))?;
        }
        Ok(())
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

// ---------------------------------------------------------------------------------------------------------------
// GGUF metadata

fn md_str<'a>(md: &'a std::collections::HashMap<String, gguf_file::Value>, key: &str) -> Option<&'a str> {
    md.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
}

fn as_int(v: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    Some(match v {
        V::U8(x) => *x as i64,
        V::I8(x) => *x as i64,
        V::U16(x) => *x as i64,
        V::I16(x) => *x as i64,
        V::U32(x) => *x as i64,
        V::I32(x) => *x as i64,
        V::U64(x) => *x as i64,
        V::I64(x) => *x,
        _ => return None,
    })
}

fn md_array<'a>(
    md: &'a std::collections::HashMap<String, gguf_file::Value>,
    key: &str,
    origin: &str,
) -> Result<Option<&'a Vec<gguf_file::Value>>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => v.to_vec().map(Some).map_err(|_| anyhow!("{origin}: GGUF metadata `{key}` is not an array")),
    }
}

/// The metadata array `key` converted element by element; an element `convert` rejects is an error saying the
/// array is not one of `what`.
fn md_typed<T>(
    md: &std::collections::HashMap<String, gguf_file::Value>,
    key: &str,
    origin: &str,
    what: &str,
    convert: impl Fn(&gguf_file::Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(arr) = md_array(md, key, origin)? else { return Ok(None) };
    arr.iter()
        .map(|v| convert(v).with_context(|| format!("{origin}: GGUF metadata `{key}` is not an array of {what}")))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn md_strings(
    md: &std::collections::HashMap<String, gguf_file::Value>,
    key: &str,
    origin: &str,
) -> Result<Option<Vec<String>>> {
    md_typed(md, key, origin, "strings", |v| v.to_string().ok().cloned())
}

fn md_ints(
    md: &std::collections::HashMap<String, gguf_file::Value>,
    key: &str,
    origin: &str,
) -> Result<Option<Vec<i64>>> {
    md_typed(md, key, origin, "integers", as_int)
}

fn md_floats(
    md: &std::collections::HashMap<String, gguf_file::Value>,
    key: &str,
    origin: &str,
) -> Result<Option<Vec<f64>>> {
    md_typed(md, key, origin, "floats", |v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
}

// ---------------------------------------------------------------------------------------------------------------
// Rebuilding tokenizers from GGUF metadata (after transformers' `integrations/gguf/gguf_tokenizer_mapping.py`)

/// GPT-2's byte → printable character table.
pub(crate) fn bytes_to_unicode() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid code point")
        };
    }
    table
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Split regex that a `tokenizer.ggml.pre` value implies, `None` for plain GPT-2 ByteLevel.
fn pre_split(pre: &str, origin: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "dbrx"
        | "smaug-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "megrez" => Some(QWEN2_SPLIT),
        "smollm" | "gpt2" | "default" | "gpt-2" | "starcoder" => None,
        other => {
            eprintln!(
                "warning: {origin}: unknown GGUF pre-tokenizer `{other}`; using GPT-2 byte-level splitting \
                 (token ids may differ from the original tokenizer)"
            );
            None
        }
    }
}

/// Byte-level BPE (`tokenizer.ggml.model == "gpt2"`), as transformers' `GPT2Tokenizer` with the file's split regex.
fn byte_level_bpe(tokens: &[String], merges: &[String], pre: &str, origin: &str) -> Result<tokenizers::Tokenizer> {
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (i, token) in tokens.iter().enumerate() {
        let key = if token.chars().all(|c| alphabet.contains(&c)) {
            token.clone()
        } else {
            token.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(key, i as u32);
    }
    let merges = parse_merges(merges, origin)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("{origin}: cannot build the BPE model from GGUF metadata: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let pre_tokenizer: PreTokenizerWrapper = match pre_split(pre, origin) {
        None => ByteLevel::new(false, true, true).into(),
        Some(regex) => {
            let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow!("{origin}: split regex for `{pre}`: {e}"))?;
            tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

fn parse_merges(merges: &[String], origin: &str) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("{origin}: GGUF merge `{m}` is not two tokens separated by a space"))
        })
        .collect()
}

/// Sentencepiece BPE (`tokenizer.ggml.model == "llama"`), as transformers' `LlamaTokenizer`: byte fallback,
/// Metaspace pre-tokenization (prefix `▁` on the first word), and a decoder that undoes both.
fn sentencepiece_bpe(
    tokens: &[String],
    merges: Option<&[String]>,
    scores: Option<&[f64]>,
    add_prefix_space: Option<bool>,
    special: &SpecialTokens,
    origin: &str,
) -> Result<tokenizers::Tokenizer> {
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (i, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), i as u32);
    }
    let merges = match merges {
        Some(m) => parse_merges(m, origin)?,
        None => {
            let scores = scores.with_context(|| {
                format!("{origin}: a llama GGUF tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores")
            })?;
            merges_from_scores(tokens, &vocab, scores)
        }
    };
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
    if let Some(unk) = &special.unk {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(|e| anyhow!("{origin}: cannot build the BPE model from GGUF metadata: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let prefix = add_prefix_space.unwrap_or(true);
    let scheme = if prefix { PrependScheme::First } else { PrependScheme::Never };
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(|e| anyhow!("{origin}: decoder: {e}"))?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(decoders)));
    Ok(tok)
}

/// Merges implied by a sentencepiece vocabulary with scores (transformers' `generate_merges`): every split of a
/// token into two tokens of the vocabulary, best-scoring merged token first.
fn merges_from_scores(
    tokens: &[String],
    vocab: &tokenizers::models::bpe::Vocab,
    scores: &[f64],
) -> Vec<(String, String)> {
    let mut merges: Vec<(String, String, f64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (token, &score) in tokens.iter().zip(scores) {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let mut local = Vec::new();
        for (idx, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(idx);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((l.to_string(), r.to_string(), score, li, ri));
            }
        }
        local.sort_by_key(|x| (x.3, x.4));
        merges.extend(local.into_iter().map(|(l, r, s, _, _)| (l, r, s)));
    }
    // Python: sorted(key=(score, len(l), len(r)), reverse=True), a stable sort.
    merges.sort_by(|a, b| {
        let ka = (a.2, a.0.chars().count(), a.1.chars().count());
        let kb = (b.2, b.0.chars().count(), b.1.chars().count());
        kb.partial_cmp(&ka).unwrap_or(std::cmp::Ordering::Equal)
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens, so neither
/// is cut into pieces. In a byte-level vocabulary a control token outside the byte alphabet is a llama.cpp
/// mislabel and is skipped (as transformers does).
fn add_gguf_added_tokens(tok: &mut tokenizers::Tokenizer, tokens: &[String], types: &[i64], byte_level: bool) {
    let alphabet: std::collections::HashSet<char> = bytes_to_unicode().into_iter().collect();
    let control: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(t, &ty)| ty == 3 && (!byte_level || t.chars().all(|c| alphabet.contains(&c))))
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    if !control.is_empty() {
        tok.add_special_tokens(&control);
    }
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(t, &ty)| ty == 4 && tok.token_to_id(t).is_some())
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    if !user.is_empty() {
        tok.add_tokens(&user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn splits(pre: &str, text: &str) -> Vec<String> {
        let tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
        let tok = byte_level_bpe(&tokens, &[], pre, "test").unwrap();
        let mut pts = PreTokenizedString::from(text);
        tok.get_pre_tokenizer().unwrap().pre_tokenize(&mut pts).unwrap();
        pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    }

    #[test]
    fn gguf_pre_tokenizer_regexes() {
        assert_eq!(splits("llama-bpe", "I'm 123456!"), ["I", "'m", "Ġ", "123", "456", "!"]);
        assert_eq!(splits("qwen2", "ab 12"), ["ab", "Ġ", "1", "2"]);
        assert_eq!(splits("smollm", "ab 12"), ["ab", "Ġ12"]);
        assert_eq!(splits("something-new", "ab 12"), ["ab", "Ġ12"]);
    }
}
