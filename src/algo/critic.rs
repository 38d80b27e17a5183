//! A critic trained beside the policy (PPO's value model, SAFE's soft-min heads): the model, its own AdamW, its
//! learning rate (`critic.lr`, scheduled like the policy's), and its checkpoint files. Shared by every
//! actor-critic algorithm so none of them repeats the bookkeeping.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::boundary::{Runtime, TensorFileReader, TensorFiles};
use crate::model::value::{SoftMinHeads, ValueModel};
use crate::optim::{AdamW, AdamWConfig, AdamWState};

/// The critic's weights and optimizer moments in a checkpoint.
pub const CRITIC_FILE: &str = "critic.safetensors";
pub const CRITIC_OPTIMIZER_FILE: &str = "critic_optimizer.safetensors";

/// `[critic]` keys an actor-critic algorithm reads.
#[derive(Debug, Clone, PartialEq)]
pub struct CriticParams {
    /// Peak learning rate (`critic.lr`); follows the policy's schedule.
    pub lr: f64,
    /// Grad-norm clip of the critic alone (≤ 0 = off).
    pub max_grad_norm: f64,
}

impl Default for CriticParams {
    fn default() -> Self {
        Self { lr: 1e-5, max_grad_norm: 1.0 }
    }
}

impl CriticParams {
    pub fn from_keys(k: &dyn super::Keys) -> Self {
        Self { lr: k.float("critic.lr"), max_grad_norm: k.float("critic.max_grad_norm") }
    }
}

/// A model the critic can be: trainable variables, and weights to save and load.
pub trait CriticModel {
    fn vars(&self) -> &[(String, Var)];
    fn named_tensors(&self) -> Vec<(String, Tensor)>;
    fn load_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()>;
}

impl CriticModel for ValueModel {
    fn vars(&self) -> &[(String, Var)] {
        ValueModel::vars(self)
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        ValueModel::named_tensors(self)
    }
    fn load_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        ValueModel::load_weights(self, tensors)
    }
}

impl CriticModel for SoftMinHeads {
    fn vars(&self) -> &[(String, Var)] {
        SoftMinHeads::vars(self)
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        SoftMinHeads::named_tensors(self)
    }
    fn load_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        SoftMinHeads::load_weights(self, tensors)
    }
}

/// The critic's scalar state in `state.json` (its tensors are [`CRITIC_FILE`] and [`CRITIC_OPTIMIZER_FILE`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CriticState {
    pub optimizer: AdamWState,
}

/// A critic model with its optimizer.
pub struct Critic<M> {
    pub model: M,
    pub optimizer: AdamW,
    pub params: CriticParams,
}

impl<M: CriticModel> Critic<M> {
    /// `optim` is the policy's AdamW configuration: the critic shares its betas, eps and weight decay.
    pub fn new(model: M, params: CriticParams, optim: AdamWConfig) -> Result<Self> {
        let optimizer = AdamW::new(model.vars().to_vec(), AdamWConfig { lr: params.lr, ..optim })?;
        Ok(Self { model, optimizer, params })
    }

    pub fn state(&self) -> CriticState {
        CriticState { optimizer: self.optimizer.state() }
    }

    pub fn tensor_files(&self) -> TensorFiles {
        vec![
            (CRITIC_FILE.to_string(), self.model.named_tensors()),
            (CRITIC_OPTIMIZER_FILE.to_string(), self.optimizer.state_tensors()),
        ]
    }

    pub fn restore(&mut self, state: &CriticState, files: TensorFileReader) -> Result<()> {
        self.model.load_weights(&files(CRITIC_FILE)?).with_context(|| format!("restoring {CRITIC_FILE}"))?;
        self.optimizer
            .load_state(&state.optimizer, &files(CRITIC_OPTIMIZER_FILE)?)
            .with_context(|| format!("restoring {CRITIC_OPTIMIZER_FILE}"))
    }
}

/// PPO and SAFE: set this step's learning rates, the policy's from its per-step schedule ([`Runtime::lr_per_step`])
/// and the critic's scaled alike. Returns the policy's.
pub fn actor_critic_lr<M>(rt: &Runtime, policy: &mut AdamW, critic: &mut Critic<M>) -> f64 {
    let lr = rt.lr_per_step();
    policy.set_lr(lr);
    let base = rt.optim.lr;
    critic.optimizer.set_lr(critic.params.lr * if base > 0.0 { lr / base } else { 0.0 });
    lr
}
