//! A value model (PPO's critic): a decoder with the policy's architecture and a scalar head, read at every
//! completion position with the same alignment as log-probs (the hidden state that predicts token t gives V_t), as
//! TRL's PPOTrainer does. Initialised from a causal LM (the policy's starting weights; the head starts at zero, so
//! V = 0 before training) or from a `*ForSequenceClassification` reward model (its `score` head). Trainable; its
//! weights save in the reward-model layout (`model.*` and `score.weight`).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::config::Head;
use super::logprobs::SequenceBatch;
use super::{CausalLm, LoadedModel};

pub struct ValueModel {
    backbone: CausalLm,
    /// `[1, hidden]` in the model dtype.
    head: Var,
    /// Backbone variables, then `score.weight`.
    vars: Vec<(String, Var)>,
}

impl ValueModel {
    /// From a loaded model: a causal LM (its LM head is dropped, a zero head added) or a reward model (its head kept).
    pub fn from_loaded(mut loaded: LoadedModel, device: &Device, dtype: DType) -> Result<Self> {
        let origin = loaded.origin.clone();
        let hidden = loaded.config.hidden_size;
        let head = match loaded.config.head {
            Head::SequenceClassification => {
                let s =
                    loaded.tensors.remove("score.weight").with_context(|| format!("{origin} has no score.weight"))?;
                if s.dims() != [1, hidden] {
                    bail!("{origin}: score.weight has shape {:?}, a value head needs [1, {hidden}]", s.dims());
                }
                s.to_dtype(dtype)?.to_device(device)?
            }
            Head::CausalLm => Tensor::zeros((1, hidden), dtype, device)?,
        };
        loaded.tensors.remove("lm_head.weight");
        let mut cfg = loaded.config.clone();
        cfg.tie_word_embeddings = true; // the unused LM head aliases the embedding: no extra weights
        cfg.head = Head::CausalLm;
        let backbone = CausalLm::from_tensors(&cfg, loaded.tensors, true, device, dtype)
            .with_context(|| format!("building the value model from {origin}"))?;
        let head = Var::from_tensor(&head)?;
        let mut vars = backbone.vars().to_vec();
        vars.push(("score.weight".to_string(), head.clone()));
        Ok(Self { backbone, head, vars })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn vocab_size(&self) -> usize {
        self.backbone.config().vocab_size
    }

    /// Values `[b, C]` (f32) at the completion positions of `seqs`; differentiable.
    pub fn values(&self, seqs: &SequenceBatch) -> Result<Tensor> {
        let hidden = self.backbone.forward_hidden(&seqs.input_ids, &seqs.positions, &seqs.mask, None)?;
        let h = hidden.narrow(1, seqs.prompt_width - 1, seqs.completion_width)?;
        let (b, c, d) = h.dims3()?;
        let v = h.reshape((b * c, d))?.matmul(&self.head.as_tensor().t()?)?;
        Ok(v.reshape((b, c))?.to_dtype(DType::F32)?)
    }

    /// Every weight with its name, in the reward-model layout.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.vars.iter().map(|(n, v)| (n.clone(), v.as_detached_tensor())).collect()
    }

    /// Replace the weights with saved ones (every variable must be present with its shape).
    pub fn load_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.vars {
            let t = tensors.get(name).with_context(|| format!("value model weights lack `{name}`"))?;
            if t.dims() != var.dims() {
                bail!("value weight `{name}` has shape {:?}, expected {:?}", t.dims(), var.dims());
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}
