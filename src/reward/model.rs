//! `kind = "model"`: a sequence-classification reward model in Hugging Face layout (`LlamaForSequenceClassification`,
//! `Qwen2ForSequenceClassification`, `MistralForSequenceClassification`): the same decoder as a policy with a scalar
//! `score` head, read at the last non-pad token as transformers does. Loaded like a policy (directory, hub id through
//! the HF cache, offline mode respected), frozen, scored in batches without a graph.
//!
//! What it reads: with `chat = false`, the prompt as the policy saw it followed by the completion, tokenised with the
//! reward model's tokenizer and its special tokens (transformers' default); with `chat = true`, the conversation (the
//! data's messages, or the prompt text as one user message, then the completion as the assistant's message) rendered
//! with the reward model's own chat template, tokenised without adding special tokens (the template writes them).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{RewardInput, RewardSource};
use crate::data::Prompt;
use crate::model::config::Head;
use crate::model::{attention_mask, positions_from_mask, CausalLm, ChatMessage, LoadedModel, ModelSource, Tokenizer};

pub struct RewardModel {
    name: String,
    origin: String,
    backbone: CausalLm,
    /// `[1, hidden]`, f32.
    score: Tensor,
    tokenizer: Tokenizer,
    pad_id: u32,
    chat: bool,
    batch_size: usize,
}

impl RewardModel {
    /// Load `id` (a directory or hub id) for reward `name`.
    pub fn load(name: &str, id: &str, chat: bool, batch_size: usize, device: &Device, dtype: DType) -> Result<Self> {
        let source = ModelSource::parse(id, None).with_context(|| format!("reward `{name}`"))?;
        let mut loaded = LoadedModel::load(&source, device, dtype).with_context(|| format!("reward `{name}`"))?;
        let origin = loaded.origin.clone();
        if loaded.config.head != Head::SequenceClassification {
            bail!(
                "reward `{name}`: {origin} is not a sequence-classification reward model (its config.json names {}); \
                 expected LlamaForSequenceClassification, Qwen2ForSequenceClassification or \
                 MistralForSequenceClassification",
                loaded.config.arch.hf_class()
            );
        }
        let score = loaded.tensors.remove("score.weight").with_context(|| format!("{origin} has no `score.weight`"))?;
        if score.dims() != [1, loaded.config.hidden_size] {
            bail!(
                "reward `{name}`: {origin}'s score head has shape {:?}; a reward model has one label ([1, {}])",
                score.dims(),
                loaded.config.hidden_size
            );
        }
        if loaded.tensors.contains_key("score.bias") {
            bail!("reward `{name}`: {origin} has a `score.bias`, which transformers' reward models do not have");
        }
        let tokenizer =
            loaded.tokenizer.take().with_context(|| format!("{origin} has no tokenizer (tokenizer.json)"))?;
        if chat && !tokenizer.has_chat_template() {
            bail!("reward `{name}`: chat = true but {origin} has no chat template; set chat = false");
        }
        let pad_id = loaded.config.pad_token_id.unwrap_or_else(|| tokenizer.padding_id());
        // The backbone without an LM head: the embedding stands in as a tied head that is never used.
        let mut cfg = loaded.config.clone();
        cfg.tie_word_embeddings = true;
        cfg.head = Head::CausalLm;
        loaded.tensors.remove("lm_head.weight");
        let backbone = CausalLm::from_tensors(&cfg, loaded.tensors, false, device, dtype)
            .with_context(|| format!("building reward model {origin}"))?;
        Ok(Self {
            name: name.to_string(),
            origin,
            backbone,
            score: score.to_dtype(DType::F32)?,
            tokenizer,
            pad_id,
            chat,
            batch_size: batch_size.max(1),
        })
    }

    /// The token ids the model scores for one sample.
    fn encode(&self, input: &RewardInput) -> Result<Vec<u32>> {
        if !self.chat {
            return self.tokenizer.encode(&format!("{}{}", input.prompt, input.completion));
        }
        let mut messages = match input.raw_prompt {
            Some(Prompt::Messages(m)) => m.clone(),
            Some(Prompt::Text(t)) => vec![ChatMessage::new("user", t.as_str())],
            None => vec![ChatMessage::new("user", input.prompt)],
        };
        messages.push(ChatMessage::new("assistant", input.completion));
        let text = self.tokenizer.apply_chat_template(&messages, false)?;
        self.tokenizer.encode_plain(&text)
    }

    /// Scores of token sequences, in batches: left-padded, read at the last position (every row's last real token).
    pub fn score_ids(&self, seqs: &[Vec<u32>]) -> Result<Vec<f64>> {
        let device = self.backbone.device();
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(self.batch_size) {
            crate::signal::check()?;
            if let Some(i) = chunk.iter().position(Vec::is_empty) {
                bail!("reward `{}`: sample {i} has no tokens to score", self.name);
            }
            let width = chunk.iter().map(Vec::len).max().unwrap_or(1);
            let mut ids = Vec::with_capacity(chunk.len() * width);
            let mut valid = Vec::with_capacity(chunk.len());
            for s in chunk {
                let pad = width - s.len();
                ids.extend(std::iter::repeat_n(self.pad_id, pad).chain(s.iter().copied()));
                valid.push([vec![false; pad], vec![true; s.len()]].concat());
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), width), device)?;
            let positions = Tensor::new(positions_from_mask(&valid), device)?;
            let mask = attention_mask(&valid, width, self.backbone.config().sliding_window, device)?;
            let hidden = self.backbone.forward_hidden(&ids, &positions, &mask, None)?;
            let last = hidden.narrow(1, width - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?;
            let scores = last.matmul(&self.score.t()?)?.squeeze(1)?.to_vec1::<f32>()?;
            out.extend(scores.into_iter().map(f64::from));
        }
        Ok(out)
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl RewardSource for RewardModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        let seqs = batch.iter().map(|b| self.encode(b)).collect::<Result<Vec<_>>>()?;
        Ok(self.score_ids(&seqs)?.into_iter().map(Some).collect())
    }
}
