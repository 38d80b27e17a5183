//! Built-in models created in-process from a seed: no download, same weights on every machine. `builtin:tiny`
//! (a small Llama over a byte-level vocabulary) drives the quickstart and the tests of the training loop.
//! `builtin:random-360m` and `builtin:random-1.5b` are random Llamas with the shapes of SmolLM2-360M and
//! Qwen2.5-1.5B (their vocabulary sizes too), for measuring speed and memory at those sizes: they generate byte
//! tokens and ids the byte tokenizer does not know (decoded as nothing).
//!
//! Weights follow transformers' initialisation: linear and embedding weights ~ N(0, 0.02²), norm weights 1. The
//! normal draws come from our own counter-based stream (SplitMix64 + Box-Muller), not a library RNG whose
//! sequence could change between versions.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::config::{Arch, ModelConfig, RopeScaling};
use crate::rollout::rng::{RowKey, RowRng};

/// Byte-level vocabulary: 256 byte tokens then the three ChatML specials.
pub const BYTE_VOCAB: usize = 256;
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Names accepted after `builtin:`.
pub const BUILTIN_MODELS: &[&str] = &["tiny", "random-360m", "random-1.5b"];

pub fn config(name: &str) -> Result<ModelConfig> {
    let bytes = BYTE_VOCAB + SPECIAL_TOKENS.len();
    let (hidden, layers, heads, kv_heads, inter, vocab_size) = match name {
        "tiny" => (64, 2, 4, 2, 192, bytes),
        // SmolLM2-360M's shape.
        "random-360m" => (960, 32, 15, 5, 2560, 49152),
        // Qwen2.5-1.5B's shape (as a Llama: no q/k/v biases).
        "random-1.5b" => (1536, 28, 12, 2, 8960, 151936),
        other => bail!("unknown built-in model `builtin:{other}` (available: {})", BUILTIN_MODELS.join(", ")),
    };
    Ok(ModelConfig {
        arch: Arch::Llama,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 1024,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
        bos_token_id: Some((BYTE_VOCAB + 1) as u32),
        eos_token_ids: vec![(BYTE_VOCAB + 2) as u32],
        pad_token_id: Some((BYTE_VOCAB + 2) as u32),
        head: Default::default(),
    })
}

/// `n` draws of N(0, std²) from the stream keyed by (seed, tensor index).
fn normal(seed: u64, index: u64, n: usize, std: f64) -> Vec<f32> {
    let mut rng = RowRng::new(RowKey { seed, step: u64::MAX, prompt: index, sample: 0 });
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Box-Muller; 1 - u keeps the log argument in (0, 1].
        let (u1, u2) = (1.0 - rng.next_f64(), rng.next_f64());
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Seeded weights with HF names for `cfg`.
pub fn weights(cfg: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h])];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![cfg.num_heads * d, h]));
        shapes.push((format!("{p}.self_attn.k_proj.weight"), vec![cfg.num_kv_heads * d, h]));
        shapes.push((format!("{p}.self_attn.v_proj.weight"), vec![cfg.num_kv_heads * d, h]));
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![h, cfg.num_heads * d]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![cfg.intermediate_size, h]));
        shapes.push((format!("{p}.mlp.up_proj.weight"), vec![cfg.intermediate_size, h]));
        shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h, cfg.intermediate_size]));
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    let mut out = HashMap::new();
    for (index, (name, shape)) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("norm.weight") { vec![1.0f32; n] } else { normal(seed, index as u64, n, 0.02) };
        out.insert(name, Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?);
    }
    Ok(out)
}

/// ChatML without a default system prompt.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + \
message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The byte-level `tokenizers` model of the built-in models: ids 0..256 are bytes, then the ChatML specials.
pub fn byte_tokenizer() -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let vocab: tokenizers::models::bpe::Vocab = super::tokenizer::bytes_to_unicode()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), id as u32))
        .collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).build().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<tokenizers::AddedToken> =
        SPECIAL_TOKENS.iter().map(|s| tokenizers::AddedToken::from(s.to_string(), true)).collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}

/// The built-in models' tokenizer with its special tokens and ChatML template.
pub fn tokenizer(cfg: &ModelConfig, origin: &str) -> Result<super::Tokenizer> {
    let [_, im_start, im_end] = SPECIAL_TOKENS;
    super::Tokenizer::from_parts(
        byte_tokenizer()?,
        Some(im_start),
        Some(im_end),
        Some(im_end),
        Some(CHAT_TEMPLATE),
        cfg,
        origin,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_the_right_moments_and_are_seeded() {
        let x = normal(3, 1, 20000, 0.02);
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / x.len() as f64;
        assert!(mean.abs() < 0.001, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 0.001, "{}", var.sqrt());
        assert_eq!(x, normal(3, 1, 20000, 0.02));
        assert_ne!(x[..10], normal(4, 1, 10, 0.02)[..]);
    }

    #[test]
    fn tiny_builds_with_every_weight() {
        let cfg = config("tiny").unwrap();
        let w = weights(&cfg, 0, &Device::Cpu, DType::F32).unwrap();
        let m = crate::model::CausalLm::from_tensors(&cfg, w, true, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(m.vars().len(), 2 + 9 * cfg.num_layers);
        assert!(config("huge").unwrap_err().to_string().contains("available: tiny"));
        // The scale shapes count what their namesakes do: SmolLM2-360M 361,821,120 parameters (tied); Qwen2.5-1.5B
        // 1,543,714,304 less its q/k/v biases (28 layers × (1536 + 256 + 256) = 57,344) = 1,543,656,960.
        let count = |name| crate::train::memory::parameter_count(&config(name).unwrap());
        assert_eq!(count("random-360m"), 361_821_120);
        assert_eq!(count("random-1.5b"), 1_543_656_960);
    }

    #[test]
    fn byte_tokenizer_maps_bytes_to_ids_and_round_trips() {
        let tok = byte_tokenizer().unwrap();
        let text = "<|im_start|>user\n2 + 3 = é?<|im_end|>";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut want = vec![257u32];
        want.extend("user\n2 + 3 = é?".bytes().map(u32::from));
        want.push(258);
        assert_eq!(ids, want);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(tok.get_vocab_size(true), BYTE_VOCAB + SPECIAL_TOKENS.len());
    }
}
