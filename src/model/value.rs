//! A value model (PPO's critic): a decoder with the policy's architecture and a scalar head, read at every
//! completion position with the same alignment as log-probs (the hidden state that predicts token t gives V_t), as
//! TRL's PPOTrainer does. Initialised from a causal LM (the policy's starting weights; the head starts at zero, so
//! V = 0 before training) or from a `*ForSequenceClassification` reward model (its `score` head). Trainable; its
//! weights save in the reward-model layout (`model.*` and `score.weight`). With `critic.lora` only LoRA adapters on
//! a frozen backbone (PEFT names) and the head train and save.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::config::Head;
use super::llama::{master_dtype, weight_in};
use super::logprobs::SequenceBatch;
use super::lora::LoraSpec;
use super::{CausalLm, LoadedModel};

pub struct ValueModel {
    backbone: CausalLm,
    /// `[1, hidden]` in the backbone's weights' dtype.
    head: Var,
    /// Backbone variables, then `score.weight`.
    vars: Vec<(String, Var)>,
}

impl ValueModel {
    /// From a loaded model: a causal LM (its LM head is dropped, a zero head added) or a reward model (its head kept).
    /// `dtype` is `model.dtype` resolved: in bf16 the weights are f32 masters computing in bf16 ([`master_dtype`]).
    pub fn from_loaded(mut loaded: LoadedModel, device: &Device, dtype: DType) -> Result<Self> {
        let origin = loaded.origin.clone();
        let weights = master_dtype(dtype, true);
        let head = Self::head_of(&mut loaded, device, weights)?;
        let tensors = super::load::tensors_in(std::mem::take(&mut loaded.tensors), weights)?;
        let backbone = CausalLm::from_tensors(&Self::backbone_config(&loaded), tensors, true, device, weights)
            .with_context(|| format!("building the value model from {origin}"))?
            .with_compute_dtype(dtype);
        let head = Var::from_tensor(&head)?;
        let mut vars = backbone.vars().to_vec();
        vars.push(("score.weight".to_string(), head.clone()));
        Ok(Self { backbone, head, vars })
    }

    /// The starting value head, taken out of `loaded`: a reward model's `score.weight`, zeros for a causal LM (whose
    /// LM head is dropped too).
    fn head_of(loaded: &mut LoadedModel, device: &Device, dtype: DType) -> Result<Tensor> {
        let (origin, hidden) = (&loaded.origin, loaded.config.hidden_size);
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
        Ok(head)
    }

    /// The backbone's config: a causal LM whose unused LM head aliases the embedding (no extra weights).
    fn backbone_config(loaded: &LoadedModel) -> super::ModelConfig {
        let mut cfg = loaded.config.clone();
        cfg.tie_word_embeddings = true;
        cfg.head = Head::CausalLm;
        cfg
    }

    /// A LoRA value model on `backbone` (built frozen, without adapters): adapters from `spec` (A from its seeded
    /// streams, B zeros) and the value head `head` (`[1, hidden]`; `None`: zeros) are its only variables, so they
    /// alone are trained and saved. `backbone` may share its weights with the policy's frozen base.
    pub fn lora_on(mut backbone: CausalLm, head: Option<Tensor>, spec: &LoraSpec) -> Result<Self> {
        // The head is trained: f32 master weights over a bf16 backbone.
        let (hidden, device) = (backbone.config().hidden_size, backbone.device().clone());
        let dtype = master_dtype(backbone.dtype(), true);
        backbone.add_lora(spec, None).context("the value model's LoRA adapters (critic.lora, from [lora])")?;
        let head = match head {
            Some(h) => h.to_dtype(dtype)?,
            None => Tensor::zeros((1, hidden), dtype, &device)?,
        };
        let head = Var::from_tensor(&head)?;
        let mut vars = backbone.vars().to_vec();
        vars.push(("score.weight".to_string(), head.clone()));
        Ok(Self { backbone, head, vars })
    }

    /// [`Self::lora_on`] a loaded model (a causal LM, its head zeros, or a reward model, its `score` head kept).
    pub fn lora_from_loaded(mut loaded: LoadedModel, spec: &LoraSpec, device: &Device, dtype: DType) -> Result<Self> {
        let origin = loaded.origin.clone();
        let head = Self::head_of(&mut loaded, device, dtype)?;
        let backbone = CausalLm::from_tensors(&Self::backbone_config(&loaded), loaded.tensors, false, device, dtype)
            .with_context(|| format!("building the value model from {origin}"))?;
        Self::lora_on(backbone, Some(head), spec)
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Start step `step`'s training forwards for LoRA dropout (see [`CausalLm::begin_dropout_step`]).
    pub fn begin_dropout_step(&self, seed: u64, step: u64) {
        self.backbone.begin_dropout_step(seed, step);
    }

    pub fn vocab_size(&self) -> usize {
        self.backbone.config().vocab_size
    }

    /// Values `[b, C]` (f32) at the completion positions of `seqs`; differentiable.
    pub fn values(&self, seqs: &SequenceBatch) -> Result<Tensor> {
        let hidden = seqs.hidden(&self.backbone)?;
        let h = hidden.narrow(1, seqs.prompt_width - 1, seqs.completion_width)?;
        let (b, c, d) = h.dims3()?;
        let v = h.reshape((b * c, d))?.matmul(&weight_in(self.head.as_tensor(), h.dtype())?.t()?)?;
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

/// SAFE's critic: two small heads on the policy's own final hidden state (official `DoubleCritic`):
/// LayerNorm(d) (learned affine, eps 1e-5) → for each head Linear(d → d/4) → GELU (erf) → Linear(d/4 → 1).
/// Built from ops with a backward (Candle's fused layer norm has none). f32; initialised like PyTorch's defaults
/// (LayerNorm 1 and 0; Linear weights and biases U(±1/√fan_in)) from a seeded stream.
pub struct SoftMinHeads {
    norm_weight: Var,
    norm_bias: Var,
    /// Per head: (w1 [d/4, d], b1 [d/4], w2 [1, d/4], b2 [1]).
    heads: [(Var, Var, Var, Var); 2],
    vars: Vec<(String, Var)>,
}

impl SoftMinHeads {
    pub fn new(hidden: usize, seed: u64, device: &Device) -> Result<Self> {
        use crate::rollout::rng::{RowKey, RowRng};
        let q = (hidden / 4).max(1);
        let mut index = 0u64;
        let mut uniform = |shape: &[usize], fan_in: usize| -> Result<Var> {
            index += 1;
            let mut rng = RowRng::new(RowKey { seed, step: u64::MAX - 2, prompt: index, sample: 0 });
            let bound = 1.0 / (fan_in as f64).sqrt();
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
            Ok(Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?)
        };
        let head = |u: &mut dyn FnMut(&[usize], usize) -> Result<Var>| -> Result<(Var, Var, Var, Var)> {
            Ok((u(&[q, hidden], hidden)?, u(&[q], hidden)?, u(&[1, q], q)?, u(&[1], q)?))
        };
        let heads = [head(&mut uniform)?, head(&mut uniform)?];
        let norm_weight = Var::from_tensor(&Tensor::ones(hidden, DType::F32, device)?)?;
        let norm_bias = Var::from_tensor(&Tensor::zeros(hidden, DType::F32, device)?)?;
        let mut vars =
            vec![("norm.weight".to_string(), norm_weight.clone()), ("norm.bias".to_string(), norm_bias.clone())];
        for (i, (w1, b1, w2, b2)) in heads.iter().enumerate() {
            for (name, v) in [("0.weight", w1), ("0.bias", b1), ("2.weight", w2), ("2.bias", b2)] {
                vars.push((format!("head{}.{name}", i + 1), v.clone()));
            }
        }
        Ok(Self { norm_weight, norm_bias, heads, vars })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// (V1, V2), each `[b]` f32, from hidden states `[b, d]` (differentiable in both).
    pub fn values(&self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = h.to_dtype(DType::F32)?;
        let mean = h.mean_keepdim(1)?;
        let centered = h.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(1)?;
        let normed = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let x = normed.broadcast_mul(self.norm_weight.as_tensor())?.broadcast_add(self.norm_bias.as_tensor())?;
        let head = |(w1, b1, w2, b2): &(Var, Var, Var, Var)| -> Result<Tensor> {
            let y = x.matmul(&w1.as_tensor().t()?)?.broadcast_add(b1.as_tensor())?.gelu_erf()?;
            Ok(y.matmul(&w2.as_tensor().t()?)?.broadcast_add(b2.as_tensor())?.squeeze(1)?)
        };
        Ok((head(&self.heads[0])?, head(&self.heads[1])?))
    }

    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.vars.iter().map(|(n, v)| (n.clone(), v.as_detached_tensor())).collect()
    }

    pub fn load_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.vars {
            let t = tensors.get(name).with_context(|| format!("critic head weights lack `{name}`"))?;
            if t.dims() != var.dims() {
                bail!("critic head weight `{name}` has shape {:?}, expected {:?}", t.dims(), var.dims());
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }
}
