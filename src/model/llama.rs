//! Llama / Qwen2 / Mistral decoder, built only from ops that have a backward in Candle.
//!
//! Why not candle-transformers: its fused `rms_norm`, `rope` and `softmax_last_dim` have no backward (gradients are
//! silently dropped), it returns last-position logits only and its padding mask is not causal+padding. Here:
//! RMSNorm, rotate-half RoPE from per-row position ids, the masked softmax and SwiGLU from [`super::fused_ops`]
//! (ops with their own backward on the CPU, composite ops elsewhere), an additive finite mask (no NaN rows under
//! left padding), grouped-query attention without copying K/V, and a KV cache. Tensor names are HF's.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Device, Module, Tensor, Var, D};

use super::config::ModelConfig;
use super::fused_ops;
use super::lora::{DropoutControl, DropoutKey, LoraSpec};

/// Value added to masked attention scores. Finite, so a fully masked row stays a uniform distribution, not NaN.
pub const MASK_VALUE: f32 = -1.0e30;

/// Where a model's tensors come from and whether they are trained.
pub struct ParamStore {
    tensors: HashMap<String, Tensor>,
    trainable: bool,
    /// Trainable variables in creation order with their HF names.
    vars: Vec<(String, Var)>,
}

impl ParamStore {
    pub fn new(tensors: HashMap<String, Tensor>, trainable: bool) -> Self {
        Self { tensors, trainable, vars: Vec::new() }
    }

    /// Take the tensor `name` (expected shape `shape`), wrapping it in a [`Var`] if the model is trainable.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.remove(name).with_context(|| format!("weight `{name}` is missing"))?;
        if t.dims() != shape {
            bail!("weight `{name}` has shape {:?}, expected {:?}", t.dims(), shape);
        }
        if self.trainable {
            let var = Var::from_tensor(&t)?;
            let t = var.as_tensor().clone();
            self.vars.push((name.to_string(), var));
            Ok(t)
        } else {
            Ok(t)
        }
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// A decode copy of `weight` that decoding reads instead (see [`CausalLm::enable_decode_copies`]); with an
    /// adapter, the copy has it merged in.
    shadow: Option<Shadow>,
    /// A LoRA adapter added to the output (see [`CausalLm::add_lora`]).
    lora: Option<Adapter>,
}

/// `y += scale · (x · Aᵀ) · Bᵀ` with `A: [r, in]`, `B: [out, r]`. Decoding reads it merged into the layer's decode
/// copy instead, when the model has decode copies.
#[derive(Debug, Clone)]
struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    /// `lora.dropout > 0`: the model's dropout control and this adapter's place (see [`DropoutControl`]).
    dropout: Option<AdapterDropout>,
}

#[derive(Debug, Clone)]
struct AdapterDropout {
    control: std::sync::Arc<DropoutControl>,
    layer: usize,
    /// Index in [`super::lora::LINEAR_MODULES`].
    module: usize,
}

/// One adapter's dropout mask in one training forward, drawn again wherever it is needed (forward, backward,
/// a checkpointed layer's recomputation) instead of being kept.
#[derive(Debug, Clone, Copy)]
struct Mask {
    key: DropoutKey,
    layer: usize,
    module: usize,
}

impl Mask {
    /// `[rows, cols]` in `dtype` on `device`.
    fn tensor(&self, rows: usize, cols: usize, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
        let m = super::lora::dropout_mask(self.key, self.layer, self.module, rows, cols);
        Tensor::from_vec(m, (rows, cols), device)?.to_dtype(dtype)
    }
}

impl Adapter {
    /// The mask of the training forward under way, if one is and this adapter has dropout.
    fn mask(&self) -> Option<Mask> {
        let d = self.dropout.as_ref()?;
        Some(Mask { key: d.control.current()?, layer: d.layer, module: d.module })
    }

    /// `A` and `B` in `dtype` (trained adapters are f32 masters, cast for a bf16 forward).
    fn factors(&self, dtype: DType) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((weight_in(&self.a, dtype)?, weight_in(&self.b, dtype)?))
    }

    /// `s · B A` in f32, `[out, in]`: what merging adds to the base weight (PEFT's `get_delta_weight`).
    fn delta(&self) -> Result<Tensor> {
        Ok((self.b.to_dtype(DType::F32)?.matmul(&self.a.to_dtype(DType::F32)?)? * self.scale)?)
    }
}

/// A copy of a weight for decoding, in bf16 (half the bytes to stream per token) or f32, with the layer's adapter
/// merged in when `merged` (one product per weight instead of three per token); refreshed from the weights by
/// [`CausalLm::refresh_decode_copies`].
#[derive(Debug, Clone)]
struct Shadow {
    data: std::sync::Arc<std::sync::RwLock<ShadowData>>,
    /// Whether the copy includes the layer's adapter (so the forward must not add it again).
    merged: bool,
}

#[derive(Debug)]
enum ShadowData {
    Bf16(Vec<half::bf16>),
    F32(Vec<f32>),
    /// A tensor on the weight's device in `dtype` (`None` until refreshed), for the device's own matmul.
    Tensor {
        dtype: DType,
        copy: Option<Tensor>,
    },
}

impl Shadow {
    /// A host copy, for the CPU's weight-streaming kernel.
    fn new(bf16: bool, merged: bool) -> Self {
        let data = if bf16 { ShadowData::Bf16(Vec::new()) } else { ShadowData::F32(Vec::new()) };
        Self { data: std::sync::Arc::new(std::sync::RwLock::new(data)), merged }
    }

    /// A copy as a tensor in `dtype` on the weight's device.
    fn tensor(dtype: DType, merged: bool) -> Self {
        let data = ShadowData::Tensor { dtype, copy: None };
        Self { data: std::sync::Arc::new(std::sync::RwLock::new(data)), merged }
    }

    /// Whether `x` decodes from this copy: few rows without a gradient; for a host copy, the CPU kernel's inputs
    /// ([`decode_rows`]).
    fn decodes(&self, x: &Tensor, w: &Tensor) -> bool {
        match &*self.data.read().expect("shadow lock") {
            ShadowData::Tensor { .. } => x.dim(0).is_ok_and(|r| r <= super::gemv::MAX_ROWS) && !x.track_op(),
            _ => decode_rows(x, w),
        }
    }

    /// The tensor copy, for a copy kept as one (an error if it was never refreshed); `None` for a host copy.
    fn device_copy(&self) -> Option<candle_core::Result<Tensor>> {
        match &*self.data.read().expect("shadow lock") {
            ShadowData::Tensor { copy, .. } => {
                Some(copy.clone().ok_or_else(|| candle_core::Error::Msg("decode copies were not refreshed".into())))
            }
            _ => None,
        }
    }

    /// Copy `weight` (the layer's weight, or [`Linear::merged_weight`] for a merged copy) into this copy's dtype.
    fn refresh(&self, weight: &Tensor) -> Result<()> {
        use rayon::prelude::*;
        let mut dst = self.data.write().expect("shadow lock");
        if let ShadowData::Tensor { dtype, copy } = &mut *dst {
            // A fresh tensor even in the weight's own dtype: the weight is updated in place by the optimizer.
            let t = if weight.dtype() == *dtype { weight.copy()? } else { weight.to_dtype(*dtype)? };
            *copy = Some(t.detach());
            return Ok(());
        }
        crate::cpu::with_f32(weight, |w| match &mut *dst {
            ShadowData::Bf16(d) => {
                d.resize(w.len(), half::bf16::ZERO);
                d.par_chunks_mut(1 << 16).zip(w.par_chunks(1 << 16)).for_each(|(d, s)| {
                    for (d, s) in d.iter_mut().zip(s) {
                        *d = half::bf16::from_f32(*s);
                    }
                });
            }
            ShadowData::F32(d) => {
                d.clear();
                d.extend_from_slice(w);
            }
            ShadowData::Tensor { .. } => unreachable!("handled above"),
        })
    }

    /// `x · Wᵀ` from the copy, for `x` `[rows, k]` (contiguous CPU f32) and the weight's shape `[n, k]`.
    fn matmul_t(&self, x: &Tensor, n: usize, k: usize) -> Result<Vec<f32>> {
        let w = self.data.read().expect("shadow lock");
        let rows = x.elem_count() / k;
        crate::cpu::with_f32(x, |xs| match &*w {
            ShadowData::Bf16(w) if w.len() == n * k => Ok(super::gemv::matmul_t_bf16(xs, w, rows, k, n)),
            ShadowData::F32(w) if w.len() == n * k => Ok(super::gemv::matmul_t(xs, w, rows, k, n)),
            ShadowData::Tensor { .. } => bail!("a device decode copy read by the host kernel"),
            _ => bail!("decode copies of the weights were not refreshed"),
        })?
    }
}

impl Linear {
    fn load(p: &mut ParamStore, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = p.take(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias { Some(p.take(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        Ok(Self { weight, bias, shadow: None, lora: None })
    }
}

impl Linear {
    /// `W + s · B A` in f32 for a layer with an adapter (PEFT's merge), `None` without one.
    fn merged_weight(&self) -> Result<Option<Tensor>> {
        match &self.lora {
            Some(l) => Ok(Some((self.weight.to_dtype(DType::F32)? + l.delta()?)?)),
            None => Ok(None),
        }
    }

    /// Whether `x` takes the decode path ([`matmul_by_weight_t`]'s) over a copy with the adapter merged in.
    fn decodes_merged(&self, x: &Tensor) -> bool {
        self.shadow.as_ref().is_some_and(|s| s.merged && s.decodes(x, &self.weight))
    }
}

impl Module for Linear {
    /// `x` is `[.., in]`; flattened to 2-D so one GEMM covers every row.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has a last dim");
        let rows = x.elem_count() / in_dim;
        let x = x.reshape((rows, in_dim))?;
        let y = match &self.lora {
            // Under a graph: one op for both terms, keeping no [rows, out] intermediates for backward.
            Some(l) if !self.weight.track_op() && (x.track_op() || l.a.track_op() || l.b.track_op()) => {
                let op = LoraMatmul { w: self.weight.clone(), mask: l.mask() };
                let (a, b) = l.factors(x.dtype())?;
                x.apply_op3(&a, &b.affine(l.scale, 0.0)?, op)?
            }
            // Without one (intermediates are freed as they go): the base product by the same kernels as the base
            // model's, so zero adapters give it exactly, plus the adapter term (on its dropped-out input in a
            // checkpointed training forward); decoding reads the merged copy.
            Some(l) if !self.decodes_merged(&x) || l.mask().is_some() => {
                let y = matmul_by_weight_t(&x, &self.weight, self.shadow.as_ref().filter(|s| !s.merged))?;
                let xa = match l.mask() {
                    Some(m) => (&x * m.tensor(rows, in_dim, x.device(), x.dtype())?)?,
                    None => x.clone(),
                };
                let (a, b) = l.factors(x.dtype())?;
                (y + (xa.matmul(&a.t()?)?.matmul(&b.t()?)? * l.scale)?)?
            }
            _ => matmul_by_weight_t(&x, &self.weight, self.shadow.as_ref())?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&weight_in(b, y.dtype())?)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// Rows that decode through [`super::gemv`]'s weight-streaming kernel: few, without a gradient, CPU f32 inputs
/// and an f32 weight (or a bf16 one: a LoRA base held in bf16, streamed as it is).
fn decode_rows(x: &Tensor, w: &Tensor) -> bool {
    x.dim(0).is_ok_and(|rows| rows <= super::gemv::MAX_ROWS)
        && !x.track_op()
        && !w.track_op()
        && (crate::cpu::is_cpu_f32(w) || crate::cpu::is_cpu_bf16(w))
        && x.device().is_cpu()
        && x.dtype() == DType::F32
}

/// `w` in `dtype`: itself, or a transient converted copy. A LoRA base held in bf16 (`lora.base_dtype`) multiplies
/// f32 activations through it, one weight at a time, so at most one layer's widened weight exists at once; f32
/// master weights ([`master_dtype`]) enter bf16 forwards the same way, the cast differentiable (its gradient is
/// the f32 gradient of the master weight).
pub(crate) fn weight_in(w: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if w.dtype() == dtype {
        Ok(w.clone())
    } else {
        w.to_dtype(dtype)
    }
}

/// `x · Wᵀ` for `x: [rows, in]`, `W: [out, in]`; `shadow` is W's decode copy, if the model has one. Decoding rows
/// without a gradient on the CPU go through the weight-streaming kernel of [`super::gemv`], over the decode copy
/// when there is one. Otherwise, with few rows Candle's gemm is about 1.5× faster
/// computing `W · xᵀ` and transposing the small result; with many rows the direct product is. Both have a backward.
fn matmul_by_weight_t(x: &Tensor, w: &Tensor, shadow: Option<&Shadow>) -> candle_core::Result<Tensor> {
    const FEW_ROWS: usize = 16; // measured by benches/matmul.rs: W·xᵀ wins up to 16 rows, x·Wᵀ from 32
    let rows = x.dim(0)?;
    // Decoding from a copy on the device (a GPU): the device's matmul in the copy's dtype.
    if let Some(copy) = shadow.filter(|s| s.decodes(x, w)).and_then(Shadow::device_copy) {
        let copy = copy?;
        return x.to_dtype(copy.dtype())?.matmul(&copy.t()?)?.to_dtype(x.dtype());
    }
    // Decoding (few rows, no gradient, CPU f32): the weight-streaming kernel, over the decode copy when there is one.
    if decode_rows(x, w) {
        let x = x.contiguous()?;
        let (n, k) = w.dims2()?;
        let out = match shadow {
            Some(s) => s.matmul_t(&x, n, k),
            None if w.dtype() == DType::BF16 => crate::cpu::with_f32(&x, |xs| {
                crate::cpu::with_bf16(w, |ws| super::gemv::matmul_t_bf16(xs, ws, rows, k, n))
            })
            .and_then(|r| r),
            None => {
                crate::cpu::with_f32(&x, |xs| crate::cpu::with_f32(w, |ws| super::gemv::matmul_t(xs, ws, rows, k, n)))
                    .and_then(|r| r)
            }
        }
        .map_err(candle_core::Error::wrap)?;
        return Tensor::from_vec(out, (rows, n), x.device());
    }
    // A frozen weight (LoRA's base) under a graph: Candle's matmul backward differentiates both operands, which
    // would compute (and hold until the backward ends) a gradient the size of every base weight. The frozen ops'
    // backward gives the input's gradient only.
    if x.track_op() && !w.track_op() {
        return x.contiguous()?.apply_op1(FrozenWeightMatmul { w: w.clone() });
    }
    #[cfg(feature = "onednn")]
    if super::onednn::applies(x, w) {
        return super::onednn::linear(x, &weight_in(w, x.dtype())?);
    }
    let w = weight_in(w, x.dtype())?;
    if rows <= FEW_ROWS {
        w.matmul(&x.t()?)?.t()?.contiguous()
    } else {
        x.matmul(&w.t()?)
    }
}

/// `x · Wᵀ` of a frozen weight on the CPU, `W` already in `x`'s dtype: oneDNN's kernels where they apply (under
/// `--features onednn`), else Candle's. The one choice for the frozen products' forwards ([`FrozenWeightMatmul`],
/// [`LoraMatmul`]'s base term).
fn frozen_product_cpu(
    x: &candle_core::CpuStorage,
    lx: &candle_core::Layout,
    w: &candle_core::CpuStorage,
    lw: &candle_core::Layout,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    #[cfg(feature = "onednn")]
    if lx.is_contiguous()
        && lw.is_contiguous()
        && super::onednn::applies_to(candle_core::backend::BackendStorage::dtype(x), lx.shape().dims2()?.0)
    {
        return super::onednn::weight_product(x, lx, w, lw);
    }
    FrozenWeightMatmul::fwd(x, lx, w, lw)
}

/// `g · W`, the input's gradient through a frozen weight (cast to `g`'s dtype for the pass): the same choice as
/// [`frozen_product_cpu`], on every device.
fn frozen_input_grad(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let w = weight_in(w, g.dtype())?;
    #[cfg(feature = "onednn")]
    if super::onednn::applies(g, &w) {
        return super::onednn::times(g, &w);
    }
    g.matmul(&w)
}

/// `x · Wᵀ` for a weight `W: [out, in]` (held by the op) that takes no gradient: the backward returns `x`'s only.
/// A bf16 `W` (`lora.base_dtype`) is widened to `x`'s dtype in each pass and the copy dropped, so the graph keeps
/// the bf16 weight alone. Candle's matmuls on every device, oneDNN's on the CPU where they apply.
struct FrozenWeightMatmul {
    w: Tensor,
}

impl FrozenWeightMatmul {
    fn fwd<S: candle_core::backend::BackendStorage>(
        x: &S,
        lx: &candle_core::Layout,
        w: &S,
        lw: &candle_core::Layout,
    ) -> candle_core::Result<(S, candle_core::Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, kw) = lw.shape().dims2()?;
        if k != kw {
            candle_core::bail!("frozen matmul: x {m}x{k}, W {n}x{kw}");
        }
        Ok((x.matmul(w, (1, m, n, k), lx, &lw.transpose(0, 1)?)?, candle_core::Shape::from((m, n))))
    }
}

impl candle_core::CustomOp1 for FrozenWeightMatmul {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let w = weight_in(&self.w, candle_core::backend::BackendStorage::dtype(s))?.contiguous()?;
        let (w, lw) = w.storage_and_layout();
        match &*w {
            candle_core::Storage::Cpu(w) => frozen_product_cpu(s, l, w, lw),
            _ => candle_core::bail!("frozen matmul: the weight is not on the CPU"),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let w = weight_in(&self.w, candle_core::backend::BackendStorage::dtype(s))?;
        let (w, lw) = w.storage_and_layout();
        match &*w {
            candle_core::Storage::Cuda(w) => Self::fwd(s, l, w, lw),
            _ => candle_core::bail!("frozen matmul: the weight is not on the GPU"),
        }
    }
    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
        let w = weight_in(&self.w, candle_core::backend::BackendStorage::dtype(s))?;
        let (w, lw) = w.storage_and_layout();
        match &*w {
            candle_core::Storage::Metal(w) => Self::fwd(s, l, w, lw),
            _ => candle_core::bail!("frozen matmul: the weight is not on the GPU"),
        }
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d(x·Wᵀ)/dx · g = g · W
        Ok(Some(frozen_input_grad(grad, &self.w)?))
    }
}

/// `x · Wᵀ + (x · Aᵀ) · Bsᵀ` for a frozen `W: [out, in]` (held by the op; bf16 is widened per pass, as in
/// [`FrozenWeightMatmul`]) and a LoRA adapter `A: [r, in]`, `Bs = s · B: [out, r]`, as one node of the graph. Composed from Candle's ops, the adapter term would keep three
/// `[rows, out]` tensors per layer alive until backward (the base product, `B(Ax)` and its scaled copy, each an
/// input of the next op): more memory than the full fine-tuning it replaces. This op keeps only its inputs (and
/// `x` is kept anyway); backward recomputes the small `x · Aᵀ`. The base term's products are [`FrozenWeightMatmul`]'s
/// (oneDNN's on the CPU where they apply); the adapter's rank-r products are Candle's, on every device.
struct LoraMatmul {
    w: Tensor,
    /// `lora.dropout`: the adapter term reads `x ⊙ mask` (the base term `x`); the mask is drawn again in
    /// backward rather than kept.
    mask: Option<Mask>,
}

impl LoraMatmul {
    #[allow(clippy::too_many_arguments)]
    fn fwd<S: candle_core::backend::BackendStorage>(
        x: &S,
        lx: &candle_core::Layout,
        a: &S,
        la: &candle_core::Layout,
        bs: &S,
        lbs: &candle_core::Layout,
        (xw, lxw): (S, candle_core::Shape),
        mask: Option<(&S, &candle_core::Layout)>,
    ) -> candle_core::Result<(S, candle_core::Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (mw, n) = lxw.dims2()?;
        let (r, ka) = la.shape().dims2()?;
        let (nb, rb) = lbs.shape().dims2()?;
        if m != mw || k != ka || n != nb || r != rb {
            candle_core::bail!("lora matmul: x {m}x{k}, x·Wᵀ {mw}x{n}, A {r}x{ka}, B {nb}x{rb}");
        }
        let xa = match mask {
            Some((ms, lm)) => {
                let xd = x.binary_impl::<candle_core::op::Mul>(ms, lx, lm)?;
                xd.matmul(a, (1, m, r, k), &candle_core::Layout::contiguous((m, k)), &la.transpose(0, 1)?)?
            }
            None => x.matmul(a, (1, m, r, k), lx, &la.transpose(0, 1)?)?,
        };
        let z = xa.matmul(bs, (1, m, n, r), &candle_core::Layout::contiguous((m, r)), &lbs.transpose(0, 1)?)?;
        let out = candle_core::Layout::contiguous((m, n));
        Ok((xw.binary_impl::<candle_core::op::Add>(&z, &out, &out)?, candle_core::Shape::from((m, n))))
    }
}

impl LoraMatmul {
    /// The dropout mask for an input of layout `lx`, on the weight's device.
    fn mask_tensor(&self, lx: &candle_core::Layout, dtype: DType) -> candle_core::Result<Option<Tensor>> {
        let Some(m) = &self.mask else { return Ok(None) };
        let (rows, cols) = lx.shape().dims2()?;
        Ok(Some(m.tensor(rows, cols, self.w.device(), dtype)?))
    }
}

impl candle_core::CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-matmul"
    }
    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let dtype = candle_core::backend::BackendStorage::dtype(s1);
        let w = weight_in(&self.w, dtype)?.contiguous()?;
        let mask = self.mask_tensor(l1, dtype)?;
        let mask = mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &mask {
            Some((g, l)) => match &**g {
                candle_core::Storage::Cpu(s) => Some((s, *l)),
                _ => candle_core::bail!("lora matmul: the dropout mask is not on the CPU"),
            },
            None => None,
        };
        let (w, lw) = w.storage_and_layout();
        match &*w {
            candle_core::Storage::Cpu(w) => Self::fwd(s1, l1, s2, l2, s3, l3, frozen_product_cpu(s1, l1, w, lw)?, mask),
            _ => candle_core::bail!("lora matmul: the base weight is not on the CPU"),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let dtype = candle_core::backend::BackendStorage::dtype(s1);
        let w = weight_in(&self.w, dtype)?.contiguous()?;
        let mask = self.mask_tensor(l1, dtype)?;
        let mask = mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &mask {
            Some((g, l)) => match &**g {
                candle_core::Storage::Cuda(s) => Some((s, *l)),
                _ => candle_core::bail!("lora matmul: the dropout mask is not on the GPU"),
            },
            None => None,
        };
        let (w, lw) = w.storage_and_layout();
        match &*w {
            candle_core::Storage::Cuda(w) => {
                Self::fwd(s1, l1, s2, l2, s3, l3, FrozenWeightMatmul::fwd(s1, l1, w, lw)?, mask)
            }
            _ => candle_core::bail!("lora matmul: the base weight is not on the GPU"),
        }
    }
    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::MetalStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::MetalStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
        let dtype = candle_core::backend::BackendStorage::dtype(s1);
        let w = weight_in(&self.w, dtype)?.contiguous()?;
        let mask = self.mask_tensor(l1, dtype)?;
        let mask = mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &mask {
            Some((g, l)) => match &**g {
                candle_core::Storage::Metal(s) => Some((s, *l)),
                _ => candle_core::bail!("lora matmul: the dropout mask is not on the GPU"),
            },
            None => None,
        };
        let (w, lw) = w.storage_and_layout();
        match &*w {
            candle_core::Storage::Metal(w) => {
                Self::fwd(s1, l1, s2, l2, s3, l3, FrozenWeightMatmul::fwd(s1, l1, w, lw)?, mask)
            }
            _ => candle_core::bail!("lora matmul: the base weight is not on the GPU"),
        }
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bs: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // With gb = g·Bs [rows, r] and the adapter's input xd = x ⊙ M (M = 1 without dropout):
        // dx = g·W + (gb·A) ⊙ M, dA = gbᵀ·xd, dBs = gᵀ·(xd·Aᵀ).
        let mask = self.mask_tensor(x.layout(), x.dtype())?;
        let xd = match &mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let gb = g.matmul(bs)?;
        let gx = match &mask {
            Some(m) => (gb.matmul(a)? * m)?,
            None => gb.matmul(a)?,
        };
        let dx = (frozen_input_grad(g, &self.w)? + gx)?;
        let da = gb.t()?.matmul(&xd)?;
        let dbs = g.t()?.matmul(&xd.matmul(&a.t()?)?)?;
        Ok((Some(dx), Some(da), Some(dbs)))
    }
}

/// RMSNorm ([`fused_ops::rms_norm`]; Candle's own `rms_norm` has no backward). Computed in f32 as transformers does.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(p: &mut ParamStore, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: p.take(&format!("{name}.weight"), &[dim])?, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The f32 master as it is: the fused op widens to f32 anyway, the composite one casts it to x's dtype.
        fused_ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// Log-softmax over the last dimension from primitive ops.
pub fn log_softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Per-layer cached keys and values, `[b, kv_heads, t, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep only the batch rows `rows` (compaction when rows finish, or sharing a prompt across a group).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// The real tokens of a padded `[b, s]` batch, packed: the per-token layers (projections, MLP, norms) run on these
/// rows only, so padding costs no FLOPs there; attention scatters them back to `[b, s]` for its per-row matmuls.
#[derive(Debug, Clone)]
pub struct Packing {
    /// `[n]` flat indices (row·s + column) of the real tokens.
    valid: Tensor,
    /// `[b·s]` for each padded position, its packed row; padding points at row n (a zero row appended).
    scatter: Tensor,
    b: usize,
    s: usize,
    n: usize,
}

impl Packing {
    /// From `valid[row][column]` (all rows the same length).
    pub fn new(valid: &[Vec<bool>], device: &Device) -> Result<Self> {
        let b = valid.len();
        let s = valid.first().map_or(0, Vec::len);
        let flat: Vec<bool> = valid.iter().flatten().copied().collect();
        if flat.len() != b * s {
            bail!("packing: rows of different lengths");
        }
        let idx: Vec<u32> = (0..flat.len() as u32).filter(|&i| flat[i as usize]).collect();
        let n = idx.len();
        let mut next = 0u32;
        let scatter: Vec<u32> = flat
            .iter()
            .map(|&v| {
                if v {
                    next += 1;
                    next - 1
                } else {
                    n as u32
                }
            })
            .collect();
        Ok(Self {
            valid: Tensor::from_vec(idx, n, device)?,
            scatter: Tensor::from_vec(scatter, b * s, device)?,
            b,
            s,
            n,
        })
    }

    /// `[b, s, ..]` → `[n, ..]`.
    fn pack(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rest: Vec<usize> = x.dims()[2..].to_vec();
        let width: usize = rest.iter().product();
        x.reshape((self.b * self.s, width))?.index_select(&self.valid, 0)?.reshape([vec![self.n], rest].concat())
    }

    /// `[n, width]` → `[b, s, width]` with zeros at padding.
    fn unpack(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let width = x.dim(1)?;
        let padded = Tensor::cat(&[x, &Tensor::zeros((1, width), x.dtype(), x.device())?], 0)?;
        padded.index_select(&self.scatter, 0)?.reshape((self.b, self.s, width))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(p: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q_proj: Linear::load(p, &format!("{prefix}.q_proj"), h, cfg.num_heads * d, cfg.qkv_bias)?,
            k_proj: Linear::load(p, &format!("{prefix}.k_proj"), h, cfg.num_kv_heads * d, cfg.qkv_bias)?,
            v_proj: Linear::load(p, &format!("{prefix}.v_proj"), h, cfg.num_kv_heads * d, cfg.qkv_bias)?,
            o_proj: Linear::load(p, &format!("{prefix}.o_proj"), cfg.num_heads * d, h, cfg.o_bias)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        packing: Option<&Packing>,
    ) -> candle_core::Result<Tensor> {
        // Projections run on the packed rows when packed; attention itself on the padded `[b, s]` layout.
        let (b, s) = match packing {
            Some(p) => (p.b, p.s),
            None => (x.dim(0)?, x.dim(1)?),
        };
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor, n: usize| {
            let t = match packing {
                Some(p) => p.unpack(&t)?,
                None => t,
            };
            t.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous()
        };
        let q = fused_ops::rope(&heads(self.q_proj.forward(x)?, nh)?, &rope.0, &rope.1)?;
        let k = fused_ops::rope(&heads(self.k_proj.forward(x)?, nkv)?, &rope.0, &rope.1)?;
        let v = heads(self.v_proj.forward(x)?, nkv)?;
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        // Grouped-query attention without repeating K/V: the n_rep query heads sharing a KV head are stacked
        // along the query axis, so one batched matmul per KV head covers them.
        let n_rep = nh / nkv;
        let q = q.reshape((b, nkv, n_rep * s, d))?;
        let probs = fused_ops::masked_softmax(&q.matmul(&k.t()?)?, mask, 1.0 / (d as f64).sqrt())?;
        let y = probs.matmul(&v)?.reshape((b, nh, s, d))?.transpose(1, 2)?.reshape((b, s, nh * d))?;
        let y = match packing {
            Some(p) => p.pack(&y)?,
            None => y,
        };
        self.o_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(p: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(p, &format!("{prefix}.gate_proj"), h, i, b)?,
            up_proj: Linear::load(p, &format!("{prefix}.up_proj"), h, i, b)?,
            down_proj: Linear::load(p, &format!("{prefix}.down_proj"), i, h, b)?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let act = fused_ops::swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&act)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        packing: Option<&Packing>,
    ) -> candle_core::Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let x = (x + self.self_attn.forward(&h, rope, mask, cache, packing)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        x + self.mlp.forward(&h)?
    }

    fn load(p: &mut ParamStore, i: usize, cfg: &ModelConfig) -> Result<Self> {
        let prefix = format!("model.layers.{i}");
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            input_layernorm: RmsNorm::load(p, &format!("{prefix}.input_layernorm"), cfg.hidden_size, eps)?,
            self_attn: Attention::load(p, &format!("{prefix}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                p,
                &format!("{prefix}.post_attention_layernorm"),
                cfg.hidden_size,
                eps,
            )?,
            mlp: Mlp::load(p, &format!("{prefix}.mlp"), cfg)?,
        })
    }
}

/// The dtype a model's weights are held in when `model.dtype` resolves to `dtype`: a trainable model computing in
/// bf16 keeps f32 master weights, which the optimizer updates and each forward casts to bf16 as it uses them (in
/// bf16 itself most updates would round away: a step of lr·g is far below bf16's 2⁻⁸ relative spacing); frozen
/// models hold `dtype`. What TRL's `bf16=True` does (torch autocast over f32 parameters).
pub fn master_dtype(dtype: DType, trainable: bool) -> DType {
    if trainable && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

/// A causal decoder with its LM head. Holds its trainable variables when built trainable.
pub struct CausalLm {
    cfg: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
    vars: Vec<(String, Var)>,
    device: Device,
    /// The weights' dtype (a trainable model's master weights, which the optimizer updates).
    dtype: DType,
    /// The activations' dtype in every forward without a KV cache (training, old and reference log-probs): the
    /// weights' own, or bf16 over f32 master weights ([`master_dtype`]), each weight cast as it is used. Decoding
    /// (forwards with a cache) computes in the weights' dtype, from them or their decode copies.
    compute: DType,
    /// The LM head's bf16 decode copy (with the layers' [`Linear::shadow`]s).
    head_shadow: Option<Shadow>,
    /// The adapters' settings when the model has LoRA adapters ([`Self::add_lora`]).
    lora: Option<LoraSpec>,
    /// `lora.dropout > 0` on trainable adapters: counts the training forwards (see [`DropoutControl`]).
    dropout: Option<std::sync::Arc<DropoutControl>>,
}

/// A training forward under way: the adapters read its dropout key until this is dropped.
struct TrainingForward<'a>(&'a DropoutControl);

impl Drop for TrainingForward<'_> {
    fn drop(&mut self) {
        self.0.end_forward();
    }
}

impl CausalLm {
    /// Build from HF-named tensors (already on `device` in `dtype`). Leftover tensors are an error, so a wrong
    /// architecture cannot load by accident.
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        trainable: bool,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut p = ParamStore::new(tensors, trainable);
        let embed_tokens = p.take("model.embed_tokens.weight", &[cfg.vocab_size, cfg.hidden_size])?;
        let layers = (0..cfg.num_layers).map(|i| Block::load(&mut p, i, cfg)).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&mut p, "model.norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            // Some tied checkpoints still store a copy of the head; it must equal the embedding, so drop it.
            p.tensors.remove("lm_head.weight");
            None
        } else if p.has("lm_head.weight") {
            Some(p.take("lm_head.weight", &[cfg.vocab_size, cfg.hidden_size])?)
        } else {
            bail!("weight `lm_head.weight` is missing and tie_word_embeddings is false");
        };
        // Rotary tables are buffers, not weights.
        p.tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
        if !p.tensors.is_empty() {
            let mut extra: Vec<_> = p.tensors.keys().cloned().collect();
            extra.sort();
            extra.truncate(5);
            bail!("unexpected weights for {}: {}", cfg.arch.hf_class(), extra.join(", "));
        }
        let inv_freq = Tensor::new(cfg.rope_inv_freq(), device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            vars: p.vars,
            device: device.clone(),
            dtype,
            compute: dtype,
            head_shadow: None,
            lora: None,
            dropout: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The activations' dtype of forwards without a KV cache (see the field).
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }
    /// This model computing its forwards without a KV cache in `compute` (bf16 over f32 master weights).
    pub fn with_compute_dtype(mut self, compute: DType) -> Self {
        self.compute = compute;
        self
    }
    /// Trainable variables with their HF names (empty for a frozen model).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// A no-grad view of this model: the same weight storage (so it sees every optimizer update) but no
    /// variables, so forwards through it record no autograd graph and free activations as they go. Rollout and
    /// old/reference log-probs use this. LoRA adapters come along (their storage shared too).
    pub fn frozen_view(&self) -> Result<CausalLm> {
        let mut view = self.without_adapters()?;
        for (dst, src) in view.linears_mut().into_iter().zip(self.linears()) {
            dst.2.lora = src.2.lora.as_ref().map(|l| Adapter {
                a: l.a.detach(),
                b: l.b.detach(),
                scale: l.scale,
                dropout: l.dropout.clone(),
            });
        }
        // The view opens no training forward of its own (it has no variables); it reads the one its model opens
        // (gradient checkpointing's first pass).
        view.lora = self.lora.clone();
        view.dropout = self.dropout.clone();
        Ok(view)
    }

    /// The base model alone: a no-grad view of the weights without the LoRA adapters (sharing their storage, so
    /// no second copy). With adapters, the base is frozen, so this is the starting policy: the KL reference.
    pub fn without_adapters(&self) -> Result<CausalLm> {
        let tensors = self.named_tensors().into_iter().map(|(n, t)| (n, t.detach())).collect();
        Ok(CausalLm::from_tensors(&self.cfg, tensors, false, &self.device, self.dtype)?
            .with_compute_dtype(self.compute))
    }

    /// Every linear layer of the decoder with its layer index and its path inside the layer (`self_attn.q_proj`),
    /// in layer order and [`super::lora::LINEAR_MODULES`] order within a layer.
    fn linears(&self) -> Vec<(usize, &'static str, &Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.layers.iter().enumerate() {
            let a = &b.self_attn;
            out.extend([
                (i, "self_attn.q_proj", &a.q_proj),
                (i, "self_attn.k_proj", &a.k_proj),
                (i, "self_attn.v_proj", &a.v_proj),
                (i, "self_attn.o_proj", &a.o_proj),
                (i, "mlp.gate_proj", &b.mlp.gate_proj),
                (i, "mlp.up_proj", &b.mlp.up_proj),
                (i, "mlp.down_proj", &b.mlp.down_proj),
            ]);
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<(usize, &'static str, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.layers.iter_mut().enumerate() {
            let a = &mut b.self_attn;
            out.extend([
                (i, "self_attn.q_proj", &mut a.q_proj),
                (i, "self_attn.k_proj", &mut a.k_proj),
                (i, "self_attn.v_proj", &mut a.v_proj),
                (i, "self_attn.o_proj", &mut a.o_proj),
            ]);
            let m = &mut b.mlp;
            out.extend([
                (i, "mlp.gate_proj", &mut m.gate_proj),
                (i, "mlp.up_proj", &mut m.up_proj),
                (i, "mlp.down_proj", &mut m.down_proj),
            ]);
        }
        out
    }

    /// Add LoRA adapters to the layers `spec` targets; they become the model's only trainable variables, named as
    /// PEFT saves them. The model must have been built frozen (`trainable = false`): the base weights stay plain
    /// tensors, with no gradient and no optimizer state. `saved` (a checkpoint's `adapter_model.safetensors`)
    /// gives the adapters' values; without it A is PEFT's Kaiming-uniform and B zeros, so the model starts as the
    /// base exactly. A rank larger than a layer's smaller dimension is an error naming `lora.rank`.
    pub fn add_lora(&mut self, spec: &LoraSpec, saved: Option<&HashMap<String, Tensor>>) -> Result<()> {
        self.attach_lora(spec, saved, true)
    }

    /// Saved adapters as plain tensors (no variables): for generating and scoring with a LoRA run's checkpoint.
    pub fn add_frozen_lora(&mut self, spec: &LoraSpec, saved: &HashMap<String, Tensor>) -> Result<()> {
        self.attach_lora(spec, Some(saved), false)
    }

    fn attach_lora(&mut self, spec: &LoraSpec, saved: Option<&HashMap<String, Tensor>>, trainable: bool) -> Result<()> {
        if !self.vars.is_empty() || self.lora.is_some() {
            bail!("LoRA adapters go on a frozen model (built with trainable = false) without adapters");
        }
        let mut saved = saved.cloned();
        // Trainable adapters on a bf16 base are f32 master weights, cast to bf16 as each forward uses them.
        let (device, dtype, r) = (self.device.clone(), master_dtype(self.dtype, trainable), spec.rank);
        let mut vars = Vec::new();
        // Dropout acts in training forwards only: trainable adapters alone get it.
        let control = (trainable && spec.dropout > 0.0).then(|| std::sync::Arc::new(DropoutControl::new(spec.dropout)));
        // lora.base_dtype: the frozen base's linear weights in their own dtype (every layer, targeted or not), each
        // converted in turn so the two copies of one weight at most exist at once.
        if let (Some(base), true) = (spec.base_dtype, trainable) {
            for (_, _, lin) in self.linears_mut() {
                lin.weight = lin.weight.to_dtype(base)?;
            }
        }
        for (layer, path, lin) in self.linears_mut() {
            let module = path.rsplit('.').next().unwrap();
            if !spec.targets(module) {
                continue;
            }
            let (out_dim, in_dim) = lin.weight.dims2()?;
            if r > in_dim.min(out_dim) {
                bail!(
                    "lora.rank = {r} is larger than layer {layer}'s {module} ({out_dim}×{in_dim}) allows: the rank is at most {} there",
                    in_dim.min(out_dim)
                );
            }
            let index = super::lora::LINEAR_MODULES.iter().position(|m| *m == module).unwrap();
            let mut take = |which: &str, shape: (usize, usize), init: &dyn Fn() -> Result<Tensor>| -> Result<Tensor> {
                let name = super::lora::peft_name(layer, path, which);
                let t = match saved.as_mut() {
                    Some(s) => {
                        let t = s.remove(&name).with_context(|| format!("adapter `{name}` is missing"))?;
                        if t.dims() != [shape.0, shape.1] {
                            bail!("adapter `{name}` has shape {:?}, expected {:?}", t.dims(), [shape.0, shape.1]);
                        }
                        t.to_device(&device)?.to_dtype(dtype)?
                    }
                    None => init()?,
                };
                if !trainable {
                    vars.push((name, None));
                    return Ok(t);
                }
                let var = Var::from_tensor(&t)?;
                let t = var.as_tensor().clone();
                vars.push((name, Some(var)));
                Ok(t)
            };
            let a = take("lora_A", (r, in_dim), &|| {
                let data = super::lora::kaiming_uniform(spec.seed, layer, index, r, in_dim)?;
                Ok(Tensor::from_vec(data, (r, in_dim), &device)?.to_dtype(dtype)?)
            })?;
            let b = take("lora_B", (out_dim, r), &|| Ok(Tensor::zeros((out_dim, r), dtype, &device)?))?;
            let dropout = control.clone().map(|control| AdapterDropout { control, layer, module: index });
            lin.lora = Some(Adapter { a, b, scale: spec.scale(), dropout });
        }
        if vars.is_empty() {
            bail!("lora.targets = {:?} names no layer of this model", spec.targets);
        }
        if let Some(left) = saved.filter(|s| !s.is_empty()) {
            let mut names: Vec<_> = left.into_keys().collect();
            names.sort();
            names.truncate(5);
            bail!("unexpected adapters (not in lora.targets): {}", names.join(", "));
        }
        self.vars = vars.into_iter().filter_map(|(n, v)| Some((n, v?))).collect();
        self.lora = Some(spec.clone());
        self.dropout = control;
        Ok(())
    }

    /// Start step `step`'s training forwards (LoRA dropout's masks are keyed by `seed`, the step and the forward's
    /// index in it); nothing without dropout. Before it, forwards draw no dropout.
    pub fn begin_dropout_step(&self, seed: u64, step: u64) {
        if let Some(c) = &self.dropout {
            c.begin_step(seed, step);
        }
    }

    /// A forward of the trainable model is a training forward: with dropout, it opens the next key.
    fn training_forward(&self) -> Option<TrainingForward<'_>> {
        let control = self.dropout.as_deref().filter(|_| !self.vars.is_empty())?;
        control.begin_forward();
        Some(TrainingForward(control))
    }

    /// The LoRA settings, when the model has adapters.
    pub fn lora(&self) -> Option<&LoraSpec> {
        self.lora.as_ref()
    }

    /// The adapters with their PEFT names (`adapter_model.safetensors`), A before B, in layer order; empty
    /// without LoRA.
    pub fn adapter_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (layer, path, lin) in self.linears() {
            if let Some(l) = &lin.lora {
                out.push((super::lora::peft_name(layer, path, "lora_A"), l.a.clone()));
                out.push((super::lora::peft_name(layer, path, "lora_B"), l.b.clone()));
            }
        }
        out
    }

    /// Decode (at most [`super::gemv::MAX_ROWS`] rows, no gradient) from copies of the weights made for it, on
    /// the CPU (f32 models): with `bf16`, bf16 copies of every linear layer and the LM head (half the bytes to
    /// stream per token; `rollout.weights = "bf16"`); and with LoRA, every adapted layer's copy holds `W + s·B·A`
    /// (f32 without `bf16`), so a token costs one product per layer instead of three. Prefill and every forward
    /// with a graph keep the weights and adapters as they are. The copies must be remade after the weights
    /// change, by [`Self::refresh_decode_copies`]. Nothing to do (and no copy made) without `bf16` or adapters.
    ///
    /// Off the CPU (a GPU) the copies are tensors on the device ([`Self::enable_decode_copies_on_device`]).
    pub fn enable_decode_copies(&mut self, bf16: bool) -> Result<()> {
        if !self.embed_tokens.device().is_cpu() {
            return self.enable_decode_copies_on_device(bf16);
        }
        if !crate::cpu::is_cpu_f32(&self.embed_tokens) {
            if bf16 {
                bail!("bf16 decoding copies need an f32 model on the CPU");
            }
            return Ok(());
        }
        self.add_decode_copies(bf16, |merged| Shadow::new(bf16, merged))
    }

    /// [`Self::enable_decode_copies`] with the copies as tensors on the model's device, decoded by its own
    /// matmul (cuBLAS on CUDA; the activations cast to a bf16 copy's dtype and back, as a bf16 forward computes):
    /// what a GPU uses, and on the CPU a check of that path against the host copies. A model already in bf16
    /// needs no bf16 copy.
    pub fn enable_decode_copies_on_device(&mut self, bf16: bool) -> Result<()> {
        let copy_dtype = if bf16 { DType::BF16 } else { DType::F32 };
        self.add_decode_copies(bf16, |merged| Shadow::tensor(copy_dtype, merged))
    }

    fn add_decode_copies(&mut self, bf16: bool, make: impl Fn(bool) -> Shadow) -> Result<()> {
        for (_, _, l) in self.linears_mut() {
            // A base weight held in bf16 (lora.base_dtype) decodes as it is: a bf16 copy would hold the same values.
            if l.lora.is_some() || (bf16 && l.weight.dtype() != DType::BF16) {
                l.shadow = Some(make(l.lora.is_some()));
            }
        }
        if bf16 && self.lm_head_weight().dtype() != DType::BF16 {
            self.head_shadow = Some(make(false));
        }
        self.refresh_decode_copies()
    }

    /// Copy the current weights (and adapters) into the decode copies (nothing without
    /// [`Self::enable_decode_copies`]).
    pub fn refresh_decode_copies(&self) -> Result<()> {
        for (_, _, l) in self.linears() {
            if let Some(s) = &l.shadow {
                let merged = if s.merged { l.merged_weight()? } else { None };
                s.refresh(merged.as_ref().unwrap_or(&l.weight))?;
            }
        }
        if let Some(s) = &self.head_shadow {
            s.refresh(self.lm_head_weight())?;
        }
        Ok(())
    }

    /// [`Self::named_tensors`] with every adapter merged into its base weight, `W + s · B A` (PEFT's
    /// `merge_and_unload`: the same sum, computed in f32 and returned in the model's dtype): a plain model whose
    /// forward equals this one's. Without adapters, the weights as they are.
    pub fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut merged = HashMap::new();
        for (layer, path, lin) in self.linears() {
            if let Some(w) = lin.merged_weight()? {
                merged.insert(format!("model.layers.{layer}.{path}.weight"), w.to_dtype(self.dtype)?);
            }
        }
        Ok(self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| {
                let t = merged.remove(&n).unwrap_or(t);
                (n, t)
            })
            .collect())
    }

    /// Every base weight with its HF name, in a stable order, as saved to `model.safetensors` (LoRA adapters are
    /// not among them: see [`Self::adapter_tensors`]).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        let lin = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| {
            out.push((format!("{name}.weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b.clone()));
            }
        };
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), b.input_layernorm.weight.clone()));
            lin(&mut out, format!("{p}.self_attn.q_proj"), &b.self_attn.q_proj);
            lin(&mut out, format!("{p}.self_attn.k_proj"), &b.self_attn.k_proj);
            lin(&mut out, format!("{p}.self_attn.v_proj"), &b.self_attn.v_proj);
            lin(&mut out, format!("{p}.self_attn.o_proj"), &b.self_attn.o_proj);
            out.push((format!("{p}.post_attention_layernorm.weight"), b.post_attention_layernorm.weight.clone()));
            lin(&mut out, format!("{p}.mlp.gate_proj"), &b.mlp.gate_proj);
            lin(&mut out, format!("{p}.mlp.up_proj"), &b.mlp.up_proj);
            lin(&mut out, format!("{p}.mlp.down_proj"), &b.mlp.down_proj);
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }

    /// cos/sin of shape `[b, 1, s, head_dim]` for per-row positions `[b, s]` (u32).
    fn rope_tables(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, ()))?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok((emb.cos()?.to_dtype(dtype)?, emb.sin()?.to_dtype(dtype)?))
    }

    /// Token embeddings of `ids` in `dtype`.
    fn embed(&self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        weight_in(&self.embed_tokens.index_select(ids, 0)?, dtype)
    }

    /// Final hidden states `[b, s, hidden]` (after the last norm: the LM head's input).
    ///
    /// `input_ids` and `positions` are `[b, s]` u32; `mask` is the additive `[b, 1, s, t]` mask from
    /// [`attention_mask`] where `t` = cached length + s. With `cache`, keys and values are appended to it.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_hidden_packed(input_ids, positions, mask, cache, None)
    }

    /// [`Self::forward_hidden`] with the per-token layers run on the real tokens only (`packing`), for a whole
    /// padded batch without a cache. Returns `[b, s, hidden]` with zeros at padding positions.
    pub fn forward_hidden_packed(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        packing: Option<&Packing>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if packing.is_some() && cache.is_some() {
            bail!("a packed forward does not use a KV cache");
        }
        let _training = self.training_forward();
        let act = if cache.is_some() { self.dtype } else { self.compute };
        let mut x = match packing {
            Some(p) => self.embed(&input_ids.flatten_all()?.index_select(&p.valid, 0)?, act)?,
            None => self.embed(&input_ids.flatten_all()?, act)?.reshape((b, s, ()))?,
        };
        let rope = self.rope_tables(positions, act)?;
        let mask = mask.to_dtype(act)?;
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                *c = KvCache::new(self.layers.len());
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &rope, &mask, slot, packing)?;
        }
        let x = self.norm.forward(&x)?;
        Ok(match packing {
            Some(p) => p.unpack(&x)?,
            None => x,
        })
    }

    /// Gradient checkpointing for a packed batch: a forward that keeps only each layer's input (no graph), then a
    /// backward one layer at a time, each layer's forward recomputed with its graph and differentiated against the
    /// gradient of its output. At most one layer's activations exist at a time, for one more forward of the layers.
    ///
    /// `head` maps the final hidden states `[b, s, hidden]` (zeros at padding, as [`Self::forward_hidden_packed`])
    /// to a scalar loss and anything else the caller wants; the gradients equal `head(forward).backward()`'s.
    /// Returns the trainable variables' gradients (empty when `head`'s loss is not finite), `head`'s extra value
    /// and the loss.
    pub fn checkpointed_backward<R>(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        packing: &Packing,
        head: impl FnOnce(&Tensor) -> Result<(Tensor, R)>,
    ) -> Result<(GradStore, R, f64)> {
        // One training forward: the first pass and every recomputed layer draw the same dropout masks.
        let _training = self.training_forward();
        let frozen = self.frozen_view()?;
        let rope = self.rope_tables(positions, self.compute)?;
        let mask = mask.to_dtype(self.compute)?;
        let ids = input_ids.flatten_all()?.index_select(&packing.valid, 0)?;
        // Forward without a graph, keeping every layer's input.
        let mut inputs = vec![frozen.embed(&ids, self.compute)?];
        for layer in &frozen.layers {
            let x = layer.forward(inputs.last().unwrap(), &rope, &mask, None, Some(packing))?;
            inputs.push(x);
        }
        let mut acc = crate::optim::GradAccumulator::new();
        // The head: final norm, `head`'s loss.
        let leaf = Var::from_tensor(&inputs.pop().unwrap())?;
        let (loss, extra) = head(&packing.unpack(&self.norm.forward(leaf.as_tensor())?)?)?;
        let loss_value = loss.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            return Ok((GradStore::default(), extra, loss_value));
        }
        let mut grads = loss.backward()?;
        // Detached: Candle leaves a variable's gradient attached to the graph it came from, which would keep every
        // recomputed layer alive (each layer's gradient built on the one above) and send the next backward into it.
        let mut grad_out =
            grads.remove(leaf.as_tensor()).context("checkpointing: no gradient reached the head")?.detach();
        acc.add(grads, &self.vars)?;
        // The layers, last to first: d(Σ out·g)/d(params, input) is the chain rule's step through the layer.
        for (layer, input) in self.layers.iter().zip(inputs.iter()).rev() {
            let leaf = Var::from_tensor(input)?;
            let out = layer.forward(leaf.as_tensor(), &rope, &mask, None, Some(packing))?;
            let mut grads = (out * &grad_out)?.sum_all()?.backward()?;
            grad_out =
                grads.remove(leaf.as_tensor()).context("checkpointing: no gradient reached a layer input")?.detach();
            acc.add(grads, &self.vars)?;
        }
        let embedded = self.embed(&ids, self.compute)?;
        acc.add((embedded * &grad_out)?.sum_all()?.backward()?, &self.vars)?;
        Ok((acc.finish(), extra, loss_value))
    }

    /// The LM head's weight `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Logits for hidden states `[.., hidden]` → `[.., vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let h = *dims.last().unwrap();
        let rows = hidden.elem_count() / h;
        let y = matmul_by_weight_t(&hidden.reshape((rows, h))?, self.lm_head_weight(), self.head_shadow.as_ref())?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.cfg.vocab_size;
        Ok(y.reshape(out)?)
    }

    /// Logits at every position `[b, s, vocab]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, positions, mask, cache)?;
        self.logits(&h)
    }
}

/// The additive attention mask `[b, 1, s, t]` for queries at cache positions `past..past+s` over `t = past+s`
/// keys. `key_valid[row][j]` says whether key `j` is a real token (false = padding). A query may attend to a valid
/// key at or before itself (and within the sliding window); it may always attend to itself, so a padding row is
/// never fully masked. Masked entries get [`MASK_VALUE`].
pub fn attention_mask(
    key_valid: &[Vec<bool>],
    q_len: usize,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let b = key_valid.len();
    let t = key_valid.first().map_or(0, Vec::len);
    if t < q_len {
        bail!("attention mask: {t} keys for {q_len} queries");
    }
    let past = t - q_len;
    let mut data = vec![MASK_VALUE; b * q_len * t];
    for (r, valid) in key_valid.iter().enumerate() {
        if valid.len() != t {
            bail!("attention mask: rows of different lengths");
        }
        for i in 0..q_len {
            let abs = past + i;
            let row = &mut data[(r * q_len + i) * t..(r * q_len + i + 1) * t];
            for (j, v) in valid.iter().enumerate().take(abs + 1) {
                let in_window = sliding_window.is_none_or(|w| abs - j < w);
                if (*v && in_window) || j == abs {
                    row[j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, q_len, t), device)?)
}

/// Position ids counted from each row's first real token (padding gets 0), as transformers does for left padding.
pub fn positions_from_mask(key_valid: &[Vec<bool>]) -> Vec<Vec<u32>> {
    key_valid
        .iter()
        .map(|row| {
            let mut n = 0u32;
            row.iter()
                .map(|&v| {
                    let p = n.saturating_sub(1);
                    if v {
                        n += 1;
                        n - 1
                    } else {
                        p
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(data: impl Fn(usize) -> f32, shape: (usize, usize)) -> Var {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(data).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The fused LoRA op against the composite `x·Wᵀ + s·((x ⊙ M)·Aᵀ)·Bᵀ` (M = 1 without `mask`): the same
    /// output, and the same gradients for x, A and B (W frozen), under a loss that weights every output differently.
    fn lora_matmul_against_the_composite(rows: usize, inp: usize, out: usize, r: usize, mask: Option<Mask>) {
        let s = 1.5;
        let x = var(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1, (rows, inp));
        let w = var(|i| ((i * 5 % 13) as f32 - 6.0) * 0.05, (out, inp)).as_detached_tensor();
        let a = var(|i| ((i * 3 % 7) as f32 - 3.0) * 0.2, (r, inp));
        let b = var(|i| ((i * 11 % 5) as f32 - 2.0) * 0.3, (out, r));
        let c = var(|i| (i % 4) as f32 - 1.5, (rows, out)).as_detached_tensor();
        let fused = x.apply_op3(&a, &b.affine(s, 0.0).unwrap(), LoraMatmul { w: w.clone(), mask }).unwrap();
        let xd = match mask {
            Some(m) => {
                let m = m.tensor(rows, inp, &Device::Cpu, DType::F32).unwrap();
                let zeros = flat(&m).iter().filter(|v| **v == 0.0).count();
                assert!(zeros > 0 && zeros < rows * inp, "a mask that drops some: {zeros}");
                (x.as_tensor() * &m).unwrap()
            }
            None => x.as_tensor().clone(),
        };
        let composite = (x.matmul(&w.t().unwrap()).unwrap()
            + (xd.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap() * s).unwrap())
        .unwrap();
        let close = |p: &[f32], q: &[f32], what: &str| {
            let d = p.iter().zip(q).map(|(u, v)| (u - v).abs()).fold(0.0f32, f32::max);
            assert!(d < 1e-5 && p.iter().any(|u| *u != 0.0), "{what}: {d}");
        };
        close(&flat(&fused), &flat(&composite), "output");
        let g1 = (&fused * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&composite * &c).unwrap().sum_all().unwrap().backward().unwrap();
        for (v, what) in [(&x, "dx"), (&a, "dA"), (&b, "dB")] {
            close(&flat(g1.get(v).unwrap()), &flat(g2.get(v).unwrap()), what);
        }
    }

    #[test]
    fn lora_matmul_matches_the_composite_ops_and_their_gradients() {
        lora_matmul_against_the_composite(5, 8, 6, 3, None);
        // Many rows: the base term's products by oneDNN under `--features onednn`.
        lora_matmul_against_the_composite(40, 64, 48, 4, None);
    }

    /// With dropout, the mask drawn again in backward.
    #[test]
    fn lora_matmul_with_dropout_matches_the_composite_ops_and_their_gradients() {
        let mask = Mask { key: DropoutKey { p: 0.4, key: 9 }, layer: 1, module: 2 };
        lora_matmul_against_the_composite(6, 16, 5, 3, Some(mask));
        lora_matmul_against_the_composite(33, 64, 24, 4, Some(mask));
    }

    /// In bf16 compute (bf16 input and factors, the f32 base weight cast per pass; oneDNN's bf16 kernels under the
    /// feature where the CPU has them) the op follows its f32 self: output and every gradient within bf16's
    /// rounding of the largest.
    #[test]
    fn lora_matmul_in_bf16_follows_f32() {
        let (rows, inp, out, r, s) = (40, 64, 96, 4, 1.5);
        let x = var(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1, (rows, inp));
        let w = var(|i| ((i * 5 % 13) as f32 - 6.0) * 0.05, (out, inp)).as_detached_tensor();
        let a = var(|i| ((i * 3 % 7) as f32 - 3.0) * 0.2, (r, inp));
        let b = var(|i| ((i * 11 % 5) as f32 - 2.0) * 0.3, (out, r));
        let c = var(|i| (i % 4) as f32 - 1.5, (rows, out)).as_detached_tensor();
        let run = |dtype: DType| {
            let cast = |v: &Var| v.as_tensor().to_dtype(dtype).unwrap();
            let y = cast(&x)
                .apply_op3(&cast(&a), &cast(&b).affine(s, 0.0).unwrap(), LoraMatmul { w: w.clone(), mask: None })
                .unwrap();
            assert_eq!(y.dtype(), dtype);
            let g = (y.to_dtype(DType::F32).unwrap() * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Vec<f32>> =
                [&x, &a, &b].iter().map(|v| flat(&g.get(v).unwrap().to_dtype(DType::F32).unwrap())).collect();
            (flat(&y.to_dtype(DType::F32).unwrap()), grads)
        };
        let (y32, g32) = run(DType::F32);
        let (y16, g16) = run(DType::BF16);
        let near = |p: &[f32], q: &[f32], what: &str| {
            let top = q.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = p.iter().zip(q).map(|(u, v)| (u - v).abs()).fold(0.0f32, f32::max);
            assert!(top > 0.0 && d <= 2e-2 * top, "{what}: {d} of {top}");
        };
        near(&y16, &y32, "output");
        for (i, what) in ["dx", "dA", "dB"].iter().enumerate() {
            near(&g16[i], &g32[i], what);
        }
    }

    /// A bf16 frozen weight (`lora.base_dtype = "bf16"`) in both graph ops: the outputs and input gradients of an
    /// f32 weight holding the same values, bit for bit (the widened copy is those values).
    #[test]
    fn graph_ops_with_a_bf16_weight_equal_the_f32_weight_of_its_values() {
        let (rows, inp, out, r, s) = (27, 64, 192, 4, 1.5);
        let x = var(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1, (rows, inp));
        let w32 = var(|i| ((i * 5 % 13) as f32 - 6.0) * 0.0537, (out, inp)).as_detached_tensor();
        let w16 = w32.to_dtype(DType::BF16).unwrap();
        let wr = w16.to_dtype(DType::F32).unwrap();
        let a = var(|i| ((i * 3 % 7) as f32 - 3.0) * 0.2, (r, inp));
        let b = var(|i| ((i * 11 % 5) as f32 - 2.0) * 0.3, (out, r));
        let c = var(|i| (i % 4) as f32 - 1.5, (rows, out)).as_detached_tensor();
        for (name, f) in [("frozen", 0), ("lora", 1)] {
            let run = |w: &Tensor| {
                let y = match f {
                    0 => x.apply_op1(FrozenWeightMatmul { w: w.clone() }).unwrap(),
                    _ => x.apply_op3(&a, &b.affine(s, 0.0).unwrap(), LoraMatmul { w: w.clone(), mask: None }).unwrap(),
                };
                let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                (flat(&y), flat(g.get(&x).unwrap()))
            };
            let (y1, g1) = run(&wr);
            let (y2, g2) = run(&w16);
            assert!(g1.iter().any(|v| *v != 0.0));
            assert_eq!(y1, y2, "{name} forward");
            assert_eq!(g1, g2, "{name} backward");
        }
    }
}
