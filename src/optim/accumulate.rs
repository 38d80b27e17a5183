//! Gradient accumulation over micro-batches: Candle returns a fresh `GradStore` per backward, so the sum over
//! micro-batches is built here, restricted to the trainable variables (activations' gradients are dropped at once).

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Sum of the variables' gradients over every backward added so far.
pub struct GradAccumulator {
    sum: Option<GradStore>,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self { sum: None }
    }

    /// Add the gradients of `vars` from one backward pass.
    pub fn add(&mut self, mut grads: GradStore, vars: &[(String, Var)]) -> Result<()> {
        let mut kept: Vec<(&Tensor, Tensor)> = Vec::with_capacity(vars.len());
        for (_, v) in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                kept.push((v.as_tensor(), g));
            }
        }
        let sum = self.sum.get_or_insert_with(GradStore::default);
        for (var, g) in kept {
            let total = match sum.remove(var) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            sum.insert(var, total);
        }
        Ok(())
    }

    /// The summed gradients (empty if nothing was added).
    pub fn finish(self) -> GradStore {
        self.sum.unwrap_or_default()
    }
}

impl Default for GradAccumulator {
    fn default() -> Self {
        Self::new()
    }
}
