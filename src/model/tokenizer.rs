//! Tokenizer: from `tokenizer.json` (+ `tokenizer_config.json`) or rebuilt from GGUF metadata; chat templates.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;

use super::config::ModelConfig;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Ok(Self { inner, eos_ids: cfg.eos_token_ids.clone(), pad_id: cfg.pad_token_id })
    }

    pub fn from_gguf(_content: &gguf_file::Content, path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let json = path.with_file_name("tokenizer.json");
        let dir = path.parent().context("gguf path has no parent")?;
        anyhow::ensure!(json.is_file(), "tokenizer from GGUF metadata: not yet implemented");
        Self::from_dir(dir, cfg)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }
}
