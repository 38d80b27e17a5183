//! Loading a model the three ways users have one: a local HF directory, a hub id (through the standard HF cache),
//! or a GGUF file. Each ends as HF-named tensors plus a validated [`ModelConfig`], so one model type serves all.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::config::{Arch, HfConfig, ModelConfig, RopeScaling};
use super::llama::CausalLm;
use super::tokenizer::Tokenizer;

/// Built-in models are always created from this seed, so `builtin:tiny` names one fixed set of weights.
const BUILTIN_SEED: u64 = 0;

/// Where a model comes from, decided from the `id` string alone.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A directory in HF layout.
    Dir(PathBuf),
    /// A `.gguf` file.
    Gguf(PathBuf),
    /// A hub repository `org/name` at a revision (branch, tag or commit).
    Hub { repo: String, revision: String },
    /// `builtin:<name>`: a model created in-process from a fixed seed (see [`super::builtin`]).
    Builtin(String),
}

impl ModelSource {
    /// A path that exists is a directory or a GGUF file; `org/name` that is not a path is a hub id.
    pub fn parse(id: &str, revision: Option<&str>) -> Result<Self> {
        if let Some(name) = id.strip_prefix("builtin:") {
            super::builtin::config(name)?;
            return Ok(Self::Builtin(name.to_string()));
        }
        let path = Path::new(id);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        if path.is_file() {
            if id.to_ascii_lowercase().ends_with(".gguf") {
                return Ok(Self::Gguf(path.to_path_buf()));
            }
            bail!("model `{id}` is a file but not a .gguf file (expected a directory in HF layout, a .gguf file or a hub id org/name)");
        }
        if id.to_ascii_lowercase().ends_with(".gguf") || id.starts_with('.') || id.starts_with('/') {
            bail!("model path `{id}` does not exist");
        }
        let parts: Vec<&str> = id.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|p| !p.is_empty()) {
            return Ok(Self::Hub { repo: id.to_string(), revision: revision.unwrap_or("main").to_string() });
        }
        bail!("model `{id}` is neither an existing directory, a .gguf file, nor a hub id of the form org/name")
    }
}

/// Everything loaded for a model: config, weights (HF names, on device, in dtype) and tokenizer.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
    /// `None` when the directory has no tokenizer.json (weights-only fixtures); generation and training need one.
    pub tokenizer: Option<Tokenizer>,
    /// Human-readable origin for messages and checkpoints.
    pub origin: String,
    /// LoRA adapters beside the weights (a LoRA run's checkpoint: `adapter_config.json` +
    /// `adapter_model.safetensors`); [`Self::into_model`] applies them.
    pub adapters: Option<(super::lora::LoraSpec, HashMap<String, Tensor>)>,
}

impl LoadedModel {
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        match source {
            ModelSource::Dir(dir) => load_dir(dir, device, dtype),
            ModelSource::Gguf(path) => load_gguf(path, device, dtype),
            ModelSource::Hub { repo, revision } => {
                let dir = hub::resolve(repo, revision)?;
                load_dir(&dir, device, dtype).with_context(|| format!("loading hub model {repo}@{revision}"))
            }
            ModelSource::Builtin(name) => {
                let origin = format!("builtin:{name}");
                let config = super::builtin::config(name)?;
                let tensors = super::builtin::weights(&config, BUILTIN_SEED, device, dtype)?;
                let tokenizer = Some(super::builtin::tokenizer(&config, &origin)?);
                Ok(LoadedModel { config, tensors, tokenizer, origin, adapters: None })
            }
        }
    }

    /// The model's config alone, without its weights: what the memory plan needs before anything loads. The same
    /// config [`Self::load`] would return (`eos_token_ids` aside, which only generation reads).
    pub fn config_only(source: &ModelSource) -> Result<ModelConfig> {
        match source {
            ModelSource::Dir(dir) => dir_config(dir),
            ModelSource::Gguf(path) => {
                let origin = path.display().to_string();
                let mut file = File::open(path).with_context(|| format!("cannot open {origin}"))?;
                let content = gguf_file::Content::read(&mut file)
                    .map_err(|e| anyhow::anyhow!("{origin} is not a readable GGUF file: {e}"))?;
                gguf_config(&content, &origin)
            }
            ModelSource::Hub { repo, revision } => dir_config(&hub::resolve(repo, revision)?),
            ModelSource::Builtin(name) => super::builtin::config(name),
        }
    }

    /// Build the model (trainable or frozen) for `model.dtype` resolved to `dtype`: a trainable model in bf16
    /// holds f32 master weights and computes in bf16 ([`super::llama::master_dtype`]). Consumes the tensors.
    /// Adapters found beside the weights are applied (frozen, for generating and scoring); a trainable model with
    /// adapters is an error, since full fine-tuning would drop them (training continues them with `[lora]`, which
    /// takes [`Self::adapters`] first).
    pub fn into_model(self, trainable: bool, device: &Device, dtype: DType) -> Result<(CausalLm, Option<Tokenizer>)> {
        if self.config.head == super::config::Head::SequenceClassification {
            bail!(
                "{} is a reward model ({}ForSequenceClassification): it scores text and cannot generate; use it as a \
                 [[reward]] with kind = \"model\"",
                self.origin,
                match self.config.arch {
                    Arch::Llama => "Llama",
                    Arch::Qwen2 => "Qwen2",
                    Arch::Mistral => "Mistral",
                }
            );
        }
        if trainable && self.adapters.is_some() {
            bail!(
                "{} holds LoRA adapters ({}): fully fine-tuning it would drop them; train it with a [lora] table, \
                 or merge them into the weights first with `safe export DIR --merge OUT`",
                self.origin,
                super::lora::ADAPTER_CONFIG_FILE
            );
        }
        // A trainable model computing in bf16 holds f32 master weights (the tensors may have been loaded in either).
        let weights = super::llama::master_dtype(dtype, trainable);
        let mut model =
            CausalLm::from_tensors(&self.config, tensors_in(self.tensors, weights)?, trainable, device, weights)
                .with_context(|| format!("building the model from {}", self.origin))?
                .with_compute_dtype(dtype);
        if let Some((spec, tensors)) = &self.adapters {
            model
                .add_frozen_lora(spec, tensors)
                .with_context(|| format!("applying the LoRA adapters of {}", self.origin))?;
        }
        Ok((model, self.tokenizer))
    }
}

impl LoadedModel {
    /// Put the PEFT LoRA adapter in `dir` (`adapter_config.json` + `adapter_model.safetensors`, as PEFT's
    /// `save_pretrained` or a LoRA run's checkpoint writes them) on this base; [`Self::into_model`] applies it,
    /// frozen. Everything is checked here against the base's weights, each error naming the file and the key: a
    /// tensor name that is not a targeted layer of this base (a layer index beyond its layers, a module the
    /// config does not target), a missing tensor, a shape that does not match, and a base that already holds
    /// adapters.
    pub fn with_adapter_dir(mut self, dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        use super::lora::{ADAPTER_CONFIG_FILE, ADAPTER_FILE};
        if !dir.is_dir() {
            bail!("adapter directory {} does not exist", dir.display());
        }
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        if self.adapters.is_some() {
            bail!(
                "{} already holds LoRA adapters ({ADAPTER_CONFIG_FILE}); --adapter {} needs a base model without \
                 adapters",
                self.origin,
                dir.display()
            );
        }
        let (spec, tensors) = super::lora::read_adapters(dir, device, dtype)?
            .with_context(|| format!("{} does not exist (expected a PEFT adapter directory)", config_path.display()))?;
        let file = dir.join(ADAPTER_FILE).display().to_string();
        let layers = self.config.num_layers;
        let mut expected = HashMap::new();
        for layer in 0..layers {
            for module in &spec.targets {
                let path = if ["gate_proj", "up_proj", "down_proj"].contains(&module.as_str()) {
                    format!("mlp.{module}")
                } else {
                    format!("self_attn.{module}")
                };
                let base_name = format!("model.layers.{layer}.{path}.weight");
                let base = self.tensors.get(&base_name).with_context(|| {
                    format!("{}: the base {} has no `{base_name}` to adapt", config_path.display(), self.origin)
                })?;
                let (out_dim, in_dim) = base.dims2()?;
                expected.insert(super::lora::peft_name(layer, &path, "lora_A"), [spec.rank, in_dim]);
                expected.insert(super::lora::peft_name(layer, &path, "lora_B"), [out_dim, spec.rank]);
            }
        }
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let Some(shape) = expected.get(name) else {
                let layer = name
                    .strip_prefix("base_model.model.model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|n| n.parse::<usize>().ok());
                match layer {
                    Some(l) if l >= layers => {
                        bail!("{file}: adapter `{name}` is for layer {l}, but the base {} has {layers} layers", self.origin)
                    }
                    _ => bail!(
                        "{file}: unexpected adapter `{name}` (not a lora_A/lora_B of a layer that {ADAPTER_CONFIG_FILE}'s \
                         target_modules {:?} names)",
                        spec.targets
                    ),
                }
            };
            let dims = tensors[name].dims();
            if dims != shape {
                bail!(
                    "{file}: adapter `{name}` has shape {dims:?}, expected {shape:?} for the base {} (an adapter made \
                     for another base model?)",
                    self.origin
                );
            }
        }
        let mut missing: Vec<&String> = expected.keys().filter(|n| !tensors.contains_key(*n)).collect();
        missing.sort();
        if let Some(name) = missing.first() {
            bail!("{file}: adapter `{name}` is missing ({ADAPTER_CONFIG_FILE}'s target_modules name it)");
        }
        self.adapters = Some((spec, tensors));
        Ok(self)
    }
}

fn dir_config(dir: &Path) -> Result<ModelConfig> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        bail!("{} has no config.json (expected a model directory in Hugging Face layout)", dir.display());
    }
    HfConfig::from_file(&config_path)?.validate(&config_path.display().to_string())
}

/// `tensors` converted to `dtype` (those already in it as they are).
pub(crate) fn tensors_in(tensors: HashMap<String, Tensor>, dtype: DType) -> Result<HashMap<String, Tensor>> {
    tensors.into_iter().map(|(n, t)| Ok((n, t.to_dtype(dtype)?))).collect()
}

fn load_dir(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let mut config = dir_config(dir)?;
    // generation_config.json may list more EOS ids than config.json (Llama 3 instruct models do).
    let gen_path = dir.join("generation_config.json");
    if gen_path.is_file() {
        let text = std::fs::read_to_string(&gen_path)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", gen_path.display()))?;
        if let Some(eos) = v.get("eos_token_id") {
            let ids: super::config::TokenIds = serde_json::from_value(eos.clone())
                .with_context(|| format!("{}: eos_token_id must be an id or a list of ids", gen_path.display()))?;
            for id in ids.to_vec() {
                if !config.eos_token_ids.contains(&id) {
                    config.eos_token_ids.push(id);
                }
            }
        }
    }
    let files = safetensors_files(dir)?;
    let mut tensors = HashMap::new();
    for file in &files {
        let loaded = candle_core::safetensors::load(file, &Device::Cpu)
            .with_context(|| format!("cannot read weights from {} (truncated or not safetensors?)", file.display()))?;
        for (name, t) in loaded {
            // Some checkpoints prefix the decoder with nothing ("layers.0...") or carry "model." twice; we accept
            // the HF CausalLM layout only and let the model report anything else.
            tensors.insert(name, t.to_dtype(dtype)?.to_device(device)?);
        }
    }
    let tokenizer = if dir.join("tokenizer.json").is_file() { Some(Tokenizer::from_dir(dir, &config)?) } else { None };
    // In f32 whatever `dtype`: trainable adapters on a bf16 base are f32 masters (resumed exactly); frozen ones are
    // converted to the base's dtype as they are attached.
    let adapters = super::lora::read_adapters(dir, device, DType::F32)?;
    Ok(LoadedModel { config, tensors, tokenizer, origin: dir.display().to_string(), adapters })
}

/// `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no weight_map object", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        let files: Vec<PathBuf> = shards.iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.is_file() {
                bail!("{} lists shard {} which does not exist", index.display(), f.display());
            }
        }
        return Ok(files);
    }
    bail!("{} has neither model.safetensors nor model.safetensors.index.json", dir.display())
}

fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let origin = path.display().to_string();
    let mut file = File::open(path).with_context(|| format!("cannot open {origin}"))?;
    let file_len = file.metadata()?.len();
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| anyhow::anyhow!("{origin} is not a readable GGUF file: {}", crate::exit::without_backtrace(&e)))?;
    // A truncated file reads its header fine and fails later; check every tensor's extent up front.
    for (name, info) in &content.tensor_infos {
        let bytes = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > file_len {
            bail!("{origin} is truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes");
        }
    }
    let config = gguf_config(&content, &origin)?;
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let hf = gguf_to_hf_name(name).with_context(|| format!("{origin}: unexpected tensor `{name}`"))?;
        let q = content.tensor(&mut file, name, &Device::Cpu).with_context(|| format!("{origin}: reading `{name}`"))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        // llama.cpp permutes q/k rows for its interleaved RoPE; undo it for HF's rotate-half layout.
        if config.arch == Arch::Llama && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            let heads = if name.ends_with("attn_q.weight") { config.num_heads } else { config.num_kv_heads };
            t = unpermute_rows(&t, heads)?;
        }
        tensors.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
    }
    let tokenizer = Some(Tokenizer::from_gguf(&content, path, &config)?);
    Ok(LoadedModel { config, tensors, tokenizer, origin, adapters: None })
}

/// Inverse of llama.cpp's q/k permutation: `w.reshape(h, d/2, 2, in).swapaxes(1, 2).reshape(out, in)`.
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let d = out / heads;
    Ok(w.reshape((heads, d / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

fn gguf_to_hf_name(name: &str) -> Result<String> {
    let (stem, suffix) = match name.rsplit_once('.') {
        Some((s, x @ ("weight" | "bias"))) => (s, x),
        _ => bail!("not a weight or bias"),
    };
    let mapped = match stem {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        "rope_freqs" => bail!("precomputed rope frequencies (Llama 3 rope scaling in GGUF) are not supported"),
        _ => {
            let rest = stem.strip_prefix("blk.").context("unknown tensor")?;
            let (layer, part) = rest.split_once('.').context("unknown tensor")?;
            let layer: usize = layer.parse().context("bad layer index")?;
            let part = match part {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                other => bail!("unknown layer tensor `{other}`"),
            };
            format!("model.layers.{layer}.{part}")
        }
    };
    Ok(format!("{mapped}.{suffix}"))
}

fn gguf_config(content: &gguf_file::Content, origin: &str) -> Result<ModelConfig> {
    let md = &content.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .with_context(|| format!("{origin}: GGUF metadata has no general.architecture"))?
        .clone();
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => bail!("{origin}: GGUF architecture `{other}` is not supported (supported: llama, qwen2)"),
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let get_u = |k: &str| -> Result<usize> {
        let v = md.get(&key(k)).with_context(|| format!("{origin}: GGUF metadata lacks `{}`", key(k)))?;
        Ok(v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x as u64))? as usize)
    };
    let get_f = |k: &str| -> Option<f64> { md.get(&key(k)).and_then(|v| v.to_f32().ok()).map(f64::from) };
    let hidden_size = get_u("embedding_length")?;
    let num_heads = get_u("attention.head_count")?;
    let num_kv_heads = get_u("attention.head_count_kv").unwrap_or(num_heads);
    let vocab_size = match get_u("vocab_size") {
        Ok(v) => v,
        Err(_) => md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .with_context(|| format!("{origin}: cannot tell the vocabulary size"))?,
    };
    let rope_theta = match get_f("rope.freq_base") {
        Some(t) => t,
        None => {
            eprintln!("warning: {origin} has no {}; using 10000", key("rope.freq_base"));
            10_000.0
        }
    };
    let rms_norm_eps = get_f("attention.layer_norm_rms_epsilon")
        .with_context(|| format!("{origin}: GGUF metadata lacks `{}`", key("attention.layer_norm_rms_epsilon")))?;
    let token_id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let has = |n: &str| content.tensor_infos.contains_key(n);
    Ok(ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: get_u("feed_forward_length")?,
        num_layers: get_u("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim: get_u("attention.key_length").unwrap_or(hidden_size / num_heads),
        rms_norm_eps,
        rope_theta,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: get_u("context_length").unwrap_or(4096),
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias"),
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        sliding_window: None,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: token_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: token_id("tokenizer.ggml.padding_token_id"),
        head: Default::default(),
    })
}

/// The Hugging Face hub through its standard cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`). With `HF_HUB_OFFLINE=1` nothing touches the network.
pub mod hub {
    use super::*;

    /// Files a model directory may hold besides weights; fetched when present upstream.
    const OPTIONAL: &[&str] =
        &["generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

    pub fn cache_dir() -> PathBuf {
        if let Ok(p) = std::env::var("HF_HUB_CACHE") {
            return PathBuf::from(p);
        }
        if let Ok(p) = std::env::var("HF_HOME") {
            return PathBuf::from(p).join("hub");
        }
        let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
        PathBuf::from(home).join(".cache").join("huggingface").join("hub")
    }

    pub fn offline() -> bool {
        std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false)
    }

    /// The snapshot directory of `repo@revision` in the cache, if it holds a config.json.
    pub fn cached_snapshot(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
        let commit = if is_commit {
            revision.to_string()
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?.trim().to_string()
        };
        let snap = repo_dir.join("snapshots").join(commit);
        snap.join("config.json").is_file().then_some(snap)
    }

    /// A local directory holding the model's files, from the cache the environment names; downloads first unless
    /// `HF_HUB_OFFLINE` is set.
    pub fn resolve(repo: &str, revision: &str) -> Result<PathBuf> {
        resolve_in(&cache_dir(), offline(), repo, revision)
    }

    /// [`resolve`] with the cache directory and offline mode given explicitly.
    pub fn resolve_in(cache: &Path, offline: bool, repo: &str, revision: &str) -> Result<PathBuf> {
        if let Some(snap) = cached_snapshot(cache, repo, revision) {
            if offline || snap.join("tokenizer.json").is_file() {
                return Ok(snap);
            }
        }
        if offline {
            bail!(
                "hub model {repo}@{revision} is not in the cache {} and HF_HUB_OFFLINE is set \
                 (download it first, or unset HF_HUB_OFFLINE)",
                cache.display()
            );
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
            .with_progress(true)
            .build()
            .context("cannot start the hub client")?;
        let r = api.repo(hf_hub::Repo::with_revision(repo.to_string(), hf_hub::RepoType::Model, revision.to_string()));
        let fetch = |f: &str| r.get(f).with_context(|| format!("downloading {f} of {repo}@{revision}"));
        let config = fetch("config.json")?;
        fetch("tokenizer.json")?;
        for f in OPTIONAL {
            let _ = r.get(f); // optional: absent upstream is fine
        }
        match r.get("model.safetensors") {
            Ok(_) => {}
            Err(_) => {
                let index = fetch("model.safetensors.index.json")?;
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
                let shards: BTreeSet<String> = v["weight_map"]
                    .as_object()
                    .context("index has no weight_map")?
                    .values()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect();
                for s in shards {
                    fetch(&s)?;
                }
            }
        }
        Ok(config.parent().expect("a cached file has a snapshot directory").to_path_buf())
    }
}
