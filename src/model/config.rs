//! `config.json` as Hugging Face writes it (serde mirror), validated into the settings our model is built from.
//!
//! Two layouts exist for RoPE: the older top-level `rope_theta` / `rope_scaling`, and transformers 5's
//! `rope_parameters`. Both are read; when both are present they must agree. A missing theta is never defaulted
//! silently: we use the architecture's transformers default and print a warning saying so.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// A token id or a list of them (`eos_token_id` is either in the wild).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// RoPE parameters in either layout (`rope_scaling` of old, `rope_parameters` of transformers 5).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct RopeParams {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// The fields of `config.json` we read. Unknown fields are ignored (HF configs carry many).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParams>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParams>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
}

/// Which head sits on the decoder: the LM head of a causal LM (policies), or a scalar `score` head on the last
/// non-pad token (`*ForSequenceClassification`: reward models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum Head {
    #[default]
    CausalLm,
    SequenceClassification,
}

/// Architectures we implement. Anything else is an error listing these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

pub const SUPPORTED_ARCHITECTURES: &str =
    "LlamaForCausalLM (Llama 2/3.x, SmolLM2, TinyLlama), Qwen2ForCausalLM (Qwen2, Qwen2.5), MistralForCausalLM, and \
     their *ForSequenceClassification reward models";

impl Arch {
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }
    /// transformers' default `rope_theta` for the architecture, used only when the config has none.
    fn default_rope_theta(self) -> f64 {
        match self {
            Arch::Llama => 10_000.0,
            Arch::Qwen2 => 10_000.0,
            Arch::Mistral => 10_000.0,
        }
    }
}

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (transformers' "linear").
    Linear {
        factor: f64,
    },
    /// Llama 3.x frequency-band scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Validated model settings: everything the model needs, nothing left to default.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Keys further back than this are masked (Mistral).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The head the checkpoint was saved with.
    pub head: Head,
}

impl HfConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a valid model config.json", path.display()))
    }

    fn arch(&self) -> Result<(Arch, Head)> {
        let class = self.architectures.as_ref().and_then(|a| a.first()).map(String::as_str);
        // `*ForSequenceClassification` is the same decoder with a `score` head.
        let (class, head) = match class.and_then(|c| c.strip_suffix("ForSequenceClassification")) {
            Some("Llama") => (Some("LlamaForCausalLM"), Head::SequenceClassification),
            Some("Qwen2") => (Some("Qwen2ForCausalLM"), Head::SequenceClassification),
            Some("Mistral") => (Some("MistralForCausalLM"), Head::SequenceClassification),
            _ => (class, Head::CausalLm),
        };
        let arch = match (class, self.model_type.as_deref()) {
            (Some("LlamaForCausalLM"), _) | (None, Some("llama")) => Arch::Llama,
            (Some("Qwen2ForCausalLM"), _) | (None, Some("qwen2")) => Arch::Qwen2,
            (Some("MistralForCausalLM"), _) | (None, Some("mistral")) => Arch::Mistral,
            (class, model_type) => bail!(
                "unsupported architecture {} (model_type {}); supported: {SUPPORTED_ARCHITECTURES}",
                class.unwrap_or("(none)"),
                model_type.unwrap_or("(none)")
            ),
        };
        Ok((arch, head))
    }

    /// Validate into [`ModelConfig`]. `origin` names the file in messages.
    pub fn validate(&self, origin: &str) -> Result<ModelConfig> {
        let (arch, head) = self.arch().with_context(|| format!("in {origin}"))?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("{origin}: hidden_act = {act:?} is not supported (expected \"silu\")");
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            bail!("{origin}: hidden_size, num_attention_heads and num_hidden_layers must be positive");
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "{origin}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                self.num_attention_heads
            );
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None => {
                if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
                    bail!("{origin}: hidden_size is not a multiple of num_attention_heads and head_dim is missing");
                }
                self.hidden_size / self.num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            bail!("{origin}: head_dim {head_dim} must be even for RoPE");
        }
        let (rope_theta, rope_scaling) = self.rope(arch, origin)?;
        let sliding_window = match arch {
            Arch::Mistral => self.sliding_window,
            Arch::Qwen2 if self.use_sliding_window == Some(true) => {
                bail!("{origin}: Qwen2 with use_sliding_window = true is not supported")
            }
            _ => None,
        };
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Llama => {
                let b = self.attention_bias.unwrap_or(false);
                (b, b)
            }
            Arch::Mistral => (false, false),
        };
        let first = |ids: &Option<TokenIds>| ids.as_ref().and_then(|t| t.to_vec().first().copied());
        Ok(ModelConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: arch == Arch::Llama && self.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: first(&self.bos_token_id),
            eos_token_ids: self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
            pad_token_id: first(&self.pad_token_id),
            head,
        })
    }

    fn rope(&self, arch: Arch, origin: &str) -> Result<(f64, RopeScaling)> {
        let nested_theta = self.rope_parameters.as_ref().and_then(|p| p.rope_theta);
        let theta = match (self.rope_theta, nested_theta) {
            (Some(a), Some(b)) if (a - b).abs() > 1e-9 * a.abs().max(1.0) => {
                bail!("{origin}: rope_theta = {a} disagrees with rope_parameters.rope_theta = {b}")
            }
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => {
                let d = arch.default_rope_theta();
                eprintln!(
                    "warning: {origin} sets neither rope_theta nor rope_parameters.rope_theta; \
                     using transformers' default {d} for {}",
                    arch.hf_class()
                );
                d
            }
        };
        // transformers 5 keeps the scaling inside rope_parameters; older configs use rope_scaling.
        let params = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref());
        let kind = params.and_then(|p| p.rope_type.clone()).unwrap_or_else(|| "default".into());
        let need = |v: Option<f64>, key: &str| {
            v.with_context(|| format!("{origin}: rope scaling type {kind:?} needs `{key}`"))
        };
        let scaling = match kind.as_str() {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: need(params.and_then(|p| p.factor), "factor")? },
            "llama3" => {
                let p = params.expect("kind came from params");
                RopeScaling::Llama3 {
                    factor: need(p.factor, "factor")?,
                    low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: p.original_max_position_embeddings.with_context(|| {
                        format!("{origin}: llama3 rope scaling needs original_max_position_embeddings")
                    })?,
                }
            }
            other => {
                bail!("{origin}: rope scaling type {other:?} is not supported (supported: default, linear, llama3)")
            }
        };
        Ok((theta, scaling))
    }
}

impl ModelConfig {
    /// Inverse frequencies of RoPE (length head_dim/2), with the configured scaling, in f64 then rounded to f32
    /// as transformers does (it computes them in float32 from an int64 arange; the values agree to f32 rounding).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| {
                // transformers: 1 / theta^(arange(0, d, 2).float() / d), computed in float32.
                let exponent = ((2 * i) as f32 / d as f32) as f64;
                1.0 / (self.rope_theta as f32 as f64).powf(exponent)
            })
            .collect();
        let scaled = match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }

    /// The `config.json` we write into checkpoints: the layout transformers reads, with both rope keys.
    pub fn to_hf_json(&self, dtype: &str) -> serde_json::Value {
        let mut rope = serde_json::json!({ "rope_theta": self.rope_theta, "rope_type": "default" });
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                rope["rope_type"] = "linear".into();
                rope["factor"] = (*factor).into();
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                rope["rope_type"] = "llama3".into();
                rope["factor"] = (*factor).into();
                rope["low_freq_factor"] = (*low_freq_factor).into();
                rope["high_freq_factor"] = (*high_freq_factor).into();
                rope["original_max_position_embeddings"] = (*original_max_position_embeddings).into();
            }
        }
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope.clone(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": dtype,
        });
        if !matches!(self.rope_scaling, RopeScaling::None) {
            v["rope_scaling"] = rope;
        }
        match self.arch {
            Arch::Llama => {
                v["attention_bias"] = self.qkv_bias.into();
                v["mlp_bias"] = self.mlp_bias.into();
            }
            Arch::Mistral => v["sliding_window"] = self.sliding_window.into(),
            Arch::Qwen2 => v["use_sliding_window"] = false.into(),
        }
        for (k, id) in self.special_token_json().as_object().expect("an object") {
            v[k] = id.clone();
        }
        v
    }

    /// `bos_token_id` / `eos_token_id` (one id or a list) / `pad_token_id` as HF writes them, for `config.json`
    /// and `generation_config.json`.
    pub fn special_token_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({});
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => v["eos_token_id"] = (*one).into(),
            many => v["eos_token_id"] = many.to_vec().into(),
        }
        if let Some(p) = self.pad_token_id {
            v["pad_token_id"] = p.into();
        }
        v
    }

    /// The same model as candle-transformers' Llama config (for the parity test and the benchmark). Rope scaling
    /// and biases are not carried over: use it for plain Llama shapes only.
    pub fn candle_llama_config(&self) -> candle_transformers::models::llama::Config {
        candle_transformers::models::llama::Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            num_hidden_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            num_key_value_heads: self.num_kv_heads,
            use_flash_attn: false,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta as f32,
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }
}
