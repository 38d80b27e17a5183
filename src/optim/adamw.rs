//! AdamW with PyTorch's semantics and state we can save and restore exactly.
//!
//! One step at t (1-based), per parameter p with gradient g (torch.optim.AdamW, single-tensor path):
//! p ← p·(1 − lr·wd); m ← m + (1 − β1)·(g − m); v ← β2·v + (1 − β2)·g²;
//! p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps).
//! Moments are kept in f32 whatever the parameter dtype; the update is computed in f32 and cast back.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::cpu;

/// AdamW hyperparameters (defaults: transformers' Trainer, except `lr`, which the recipe always sets).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate; the schedule overwrites it each step via [`AdamW::set_lr`] (TRL GRPO default 1e-6).
    pub lr: f64,
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// Added to the bias-corrected √v so tiny second moments do not explode the step.
    pub eps: f64,
    /// Decoupled weight decay, applied as p·(1 − lr·wd) before the Adam step (transformers default 0.0).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-6, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// The scalar part of the optimizer state (the moments are tensors, see [`AdamW::state_tensors`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    /// Optimizer steps taken so far (t of the last step; the bias corrections depend on it).
    pub step: u64,
}

/// One AdamW update of a parameter in f32, element by element, with the tensor path's operations in its order
/// (`x · c` there is `x·c + 0` in f32, kept here so the results are bit for bit the same).
struct Kernel {
    grad_scale: Option<f32>,
    c1: f32,
    beta2: f32,
    c2: f32,
    inv_bc2: f32,
    eps: f32,
    decay: Option<f32>,
    step_size: f32,
}

impl Kernel {
    fn run(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) -> Result<()> {
        use rayon::prelude::*;
        if p.len() != g.len() || m.len() != g.len() || v.len() != g.len() {
            bail!("AdamW: parameter, moments and gradient differ in size");
        }
        const CHUNK: usize = 1 << 16;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let g = match self.grad_scale {
                        Some(s) => g[i] * s + 0.0,
                        None => g[i],
                    };
                    let m_new = m[i] + ((g - m[i]) * self.c1 + 0.0);
                    let v_new = (v[i] * self.beta2 + 0.0) + ((g * g) * self.c2 + 0.0);
                    let denom = (v_new.sqrt() * self.inv_bc2 + 0.0) + self.eps;
                    let mut w = p[i];
                    if let Some(d) = self.decay {
                        w = w * d + 0.0;
                    }
                    p[i] = w - ((m_new / denom) * self.step_size + 0.0);
                    m[i] = m_new;
                    v[i] = v_new;
                }
            });
        Ok(())
    }
}

/// AdamW over named variables (e.g. [`crate::model::CausalLm::vars`]).
pub struct AdamW {
    vars: Vec<(String, Var)>,
    /// First moments, f32, one per variable.
    exp_avg: Vec<Var>,
    /// Second moments, f32, one per variable.
    exp_avg_sq: Vec<Var>,
    step: u64,
    cfg: AdamWConfig,
    /// Use the in-place CPU kernel where it applies (on by default; off only to measure it).
    fused: bool,
}

impl AdamW {
    /// Zero moments, t = 0.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| Var::zeros(v.shape(), DType::F32, v.device());
        let exp_avg = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        let exp_avg_sq = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        Ok(Self { vars, exp_avg, exp_avg_sq, step: 0, cfg, fused: true })
    }

    /// Turn the in-place CPU kernel off (the tensor-op path then runs everywhere; same numbers, more memory
    /// traffic). For benchmarks.
    pub fn set_fused_kernel(&mut self, on: bool) {
        self.fused = on;
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Set the learning rate for the next step (schedules call this).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One AdamW step. t advances once per call; a variable without a gradient in `grads` is left untouched
    /// (no decay, moments unchanged), like a PyTorch parameter whose `.grad` is None.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, None)
    }

    /// [`Self::step`] with every gradient multiplied by `grad_scale` first (gradient clipping, see
    /// [`crate::optim::grad_norm_and_scale`]), as `g · scale` in f32. On the CPU in f32 each parameter is updated in
    /// one in-place pass over parameter, moments and gradient, with the same f32 arithmetic as the tensor path.
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: Option<f64>) -> Result<()> {
        self.step += 1;
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = self.cfg;
        let t = self.step as i32;
        let step_size = lr / (1.0 - beta1.powi(t));
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else { continue };
            let (m, v) = (self.exp_avg[i].as_tensor(), self.exp_avg_sq[i].as_tensor());
            if self.fused && [var.as_tensor(), grad, m, v].iter().all(|t| cpu::is_cpu_f32(t)) {
                let k = Kernel {
                    grad_scale: grad_scale.map(|s| s as f32),
                    c1: (1.0 - beta1) as f32,
                    beta2: beta2 as f32,
                    c2: (1.0 - beta2) as f32,
                    inv_bc2: (1.0 / bias_correction2_sqrt) as f32,
                    eps: eps as f32,
                    decay: (weight_decay != 0.0).then_some((1.0 - lr * weight_decay) as f32),
                    step_size: step_size as f32,
                };
                cpu::with_f32(grad, |g| {
                    cpu::with_f32_mut(m, |m| {
                        cpu::with_f32_mut(v, |v| cpu::with_f32_mut(var.as_tensor(), |p| k.run(p, m, v, g)))
                    })
                })?
                .with_context(|| format!("updating `{name}`"))?;
                continue;
            }
            let g = grad.to_dtype(DType::F32)?;
            let g = match grad_scale {
                Some(s) => (g * s)?,
                None => g,
            };
            let m = self.exp_avg[i].as_tensor();
            let v = self.exp_avg_sq[i].as_tensor();
            let m_new = (m + ((&g - m)? * (1.0 - beta1))?)?;
            let v_new = ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((v_new.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let p = if weight_decay != 0.0 { (p * (1.0 - lr * weight_decay))? } else { p };
            let p = (p - ((&m_new / denom)? * step_size)?)?;
            var.set(&p.to_dtype(var.dtype())?).with_context(|| format!("updating `{name}`"))?;
            self.exp_avg[i].set(&m_new)?;
            self.exp_avg_sq[i].set(&v_new)?;
        }
        Ok(())
    }

    /// Scalar state to save next to [`Self::state_tensors`].
    pub fn state(&self) -> AdamWState {
        AdamWState { step: self.step }
    }

    /// The moments, named `"{param}.exp_avg"` and `"{param}.exp_avg_sq"` (f32), ready for safetensors.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("{name}.exp_avg"), self.exp_avg[i].as_detached_tensor()));
            out.push((format!("{name}.exp_avg_sq"), self.exp_avg_sq[i].as_detached_tensor()));
        }
        out
    }

    /// Restore state saved by [`Self::state`] and [`Self::state_tensors`]. Every expected tensor must be present with
    /// the parameter's shape, and nothing else may be (a different model's state is an error, not a partial load).
    pub fn load_state(&mut self, state: &AdamWState, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut loaded = Vec::with_capacity(2 * self.vars.len());
        for (name, var) in &self.vars {
            for suffix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{name}.{suffix}");
                let t = tensors.get(&key).with_context(|| format!("optimizer state is missing tensor `{key}`"))?;
                if t.dims() != var.dims() {
                    bail!("optimizer tensor `{key}` has shape {:?}, parameter `{name}` has {:?}", t.dims(), var.dims());
                }
                loaded.push(t.to_dtype(DType::F32)?.to_device(var.device())?);
            }
        }
        if tensors.len() != loaded.len() {
            let expected: std::collections::HashSet<String> =
                self.state_tensors().into_iter().map(|(name, _)| name).collect();
            let mut extra: Vec<&String> = tensors.keys().filter(|k| !expected.contains(*k)).collect();
            extra.sort();
            bail!("optimizer state has tensors for no parameter: {extra:?}");
        }
        // Fresh variables (a copy), so the optimizer never aliases the caller's tensors.
        for (i, pair) in loaded.chunks(2).enumerate() {
            self.exp_avg[i] = Var::from_tensor(&pair[0].detach())?;
            self.exp_avg_sq[i] = Var::from_tensor(&pair[1].detach())?;
        }
        self.step = state.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Gradient store with gradient `g` for `var` (loss = Σ var·g).
    fn grads_for(var: &Var, g: &[f32]) -> GradStore {
        let g = Tensor::new(g, var.device()).unwrap();
        (var.as_tensor() * g).unwrap().sum_all().unwrap().backward().unwrap()
    }

    const GRADS: [[f32; 2]; 3] = [[0.1, -0.2], [0.3, 0.05], [-0.4, 0.2]];

    #[test]
    fn adamw_three_steps_match_pytorch_formula() {
        // lr 0.01, β (0.9, 0.999), eps 1e-8, wd 0.1; p0 = [1, −2]; grads [0.1, −0.2], [0.3, 0.05], [−0.4, 0.2].
        // Step 1: p·(1 − 0.001) = [0.999, −1.998]; m = 0.1·g = [0.01, −0.02]; v = 0.001·g² = [1e-5, 4e-5];
        //   step_size = 0.01/(1 − 0.9) = 0.1; √bc2 = √0.001 = 0.0316227766; denom = √v/√bc2 + eps = [0.1, 0.2] + 1e-8;
        //   p −= 0.1·m/denom = [0.0099999999, −0.0099999999…] → [0.9890000009999999, −1.9880000005].
        // Step 2: m = [0.01 + 0.1·(0.3 − 0.01), −0.02 + 0.1·(0.05 + 0.02)] = [0.039, −0.013];
        //   v = [0.999e-5 + 9e-5, 3.996e-5 + 2.5e-6] = [9.999e-5, 4.246e-5]; step_size = 0.01/0.19 = 0.0526315789;
        //   √bc2 = √0.001999 = 0.0447101778 → p = [0.978833190219559, −1.9813173191095448].
        // Step 3: m = [−0.0049, 0.0083]; v = [2.5989001e-4, 8.241754e-5]; step_size = 0.01/0.271 = 0.036900369;
        //   √bc2 = √0.002997001 = 0.0547448719 → p = [0.9784683670026686, −1.9811828975980441].
        // (Plain-Python f64 following torch's single-tensor AdamW; our update runs in f32, hence the 1e-6.)
        let expected = [
            [0.9890000009999999, -1.9880000005],
            [0.978833190219559, -1.9813173191095448],
            [0.9784683670026686, -1.9811828975980441],
        ];
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamWConfig { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], cfg).unwrap();
        for (g, e) in GRADS.iter().zip(expected) {
            opt.step(&grads_for(&p, g)).unwrap();
            let got = p.as_tensor().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(e) {
                assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
        assert_eq!(opt.state().step, 3);
        let m = opt.state_tensors()[0].1.to_vec1::<f32>().unwrap();
        assert!((m[0] as f64 + 0.0049).abs() < 1e-7 && (m[1] as f64 - 0.0083).abs() < 1e-7);
    }

    /// The in-place CPU kernel against the tensor ops it replaces, bit for bit (weight decay and a clip scale on).
    #[test]
    fn fused_step_equals_tensor_ops_bit_for_bit() {
        let dev = Device::Cpu;
        let n = 70_000; // more than one parallel chunk
        let init = Tensor::randn(0f32, 1., n, &dev).unwrap();
        let p = Var::from_tensor(&init).unwrap();
        let cfg = AdamWConfig { lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], cfg).unwrap();
        let (mut w, mut m, mut v) = (init.clone(), init.zeros_like().unwrap(), init.zeros_like().unwrap());
        for t in 1..=3 {
            let g = Tensor::randn(0f32, 1e-2, n, &dev).unwrap();
            let grads = (p.as_tensor() * &g).unwrap().sum_all().unwrap().backward().unwrap();
            opt.step_scaled(&grads, Some(0.3)).unwrap();
            // The tensor path, written out.
            let step_size = cfg.lr / (1.0 - cfg.beta1.powi(t));
            let bc2 = (1.0 - cfg.beta2.powi(t)).sqrt();
            let g = (g * 0.3).unwrap();
            m = (&m + ((&g - &m).unwrap() * (1.0 - cfg.beta1)).unwrap()).unwrap();
            v = ((&v * cfg.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - cfg.beta2)).unwrap()).unwrap();
            let denom = ((v.sqrt().unwrap() / bc2).unwrap() + cfg.eps).unwrap();
            w = (&w * (1.0 - cfg.lr * cfg.weight_decay)).unwrap();
            w = (&w - ((&m / denom).unwrap() * step_size).unwrap()).unwrap();
        }
        assert_eq!(p.as_tensor().to_vec1::<f32>().unwrap(), w.to_vec1::<f32>().unwrap());
        let st = opt.state_tensors();
        assert_eq!(st[0].1.to_vec1::<f32>().unwrap(), m.to_vec1::<f32>().unwrap());
        assert_eq!(st[1].1.to_vec1::<f32>().unwrap(), v.to_vec1::<f32>().unwrap());
    }

    #[test]
    fn adamw_save_load_resume_is_bit_identical() {
        let cfg = AdamWConfig { lr: 0.01, weight_decay: 0.1, ..Default::default() };
        let dev = Device::Cpu;
        // Uninterrupted: 3 steps.
        let p = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], cfg).unwrap();
        for g in &GRADS {
            opt.step(&grads_for(&p, g)).unwrap();
        }
        // Interrupted after 1 step: save moments to safetensors and the step to JSON, rebuild everything, load.
        let q = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut first = AdamW::new(vec![("w".into(), q.clone())], cfg).unwrap();
        first.step(&grads_for(&q, &GRADS[0])).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        let tensors: HashMap<String, Tensor> = first.state_tensors().into_iter().collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let json = serde_json::to_string(&first.state()).unwrap();
        let weights = q.as_tensor().to_vec1::<f32>().unwrap();
        drop(first);

        let r = Var::new(weights.as_slice(), &dev).unwrap();
        let mut resumed = AdamW::new(vec![("w".into(), r.clone())], cfg).unwrap();
        let loaded = candle_core::safetensors::load(&path, &dev).unwrap();
        resumed.load_state(&serde_json::from_str(&json).unwrap(), &loaded).unwrap();
        for g in &GRADS[1..] {
            resumed.step(&grads_for(&r, g)).unwrap();
        }
        assert_eq!(r.as_tensor().to_vec1::<f32>().unwrap(), p.as_tensor().to_vec1::<f32>().unwrap());
        for ((na, a), (nb, b)) in resumed.state_tensors().iter().zip(opt.state_tensors().iter()) {
            assert_eq!(na, nb);
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
        assert_eq!(resumed.state(), opt.state());
    }

    #[test]
    fn adamw_load_state_names_the_bad_tensor() {
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p)], AdamWConfig::default()).unwrap();
        let st = AdamWState { step: 1 };
        let mut t: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        t.remove("w.exp_avg_sq");
        let err = opt.load_state(&st, &t).unwrap_err().to_string();
        assert!(err.contains("missing tensor `w.exp_avg_sq`"), "{err}");
        t.insert("w.exp_avg_sq".into(), Tensor::zeros(3, DType::F32, &dev).unwrap());
        let err = opt.load_state(&st, &t).unwrap_err().to_string();
        assert!(err.contains("`w.exp_avg_sq` has shape [3]"), "{err}");
        t.insert("w.exp_avg_sq".into(), Tensor::zeros(2, DType::F32, &dev).unwrap());
        t.insert("v.exp_avg".into(), Tensor::zeros(2, DType::F32, &dev).unwrap());
        let err = opt.load_state(&st, &t).unwrap_err().to_string();
        assert!(err.contains("v.exp_avg"), "{err}");
        t.remove("v.exp_avg");
        opt.load_state(&st, &t).unwrap();
        assert_eq!(opt.state().step, 1);
    }
}
