//! The decoder's elementwise and per-row ops (RMSNorm, SwiGLU, rotate-half RoPE, the attention's scaled and masked
//! softmax), each as one CPU f32 op with its own backward, and as the composite Candle ops every device has.
//! [`fused`] is the one place that picks: f32 tensors on the CPU take the fused op unless [`set_enabled`] turned
//! them off (for A/B benchmarks and checks). A fused op reads its inputs once and writes its output once, and saves
//! nothing for the backward but its inputs (or its output), where the composite chains keep every intermediate.
//!
//! Gradients, per row, for an upstream gradient g:
//! - RMSNorm y = w ⊙ x·r with r = (Σx²/h + ε)^-½: dx = r·(g⊙w) − x·r³·⟨g⊙w, x⟩/h, dw = Σ_rows g ⊙ x·r
//!   (∂r/∂x_j = −r³·x_j/h).
//! - SwiGLU y = silu(a) ⊙ b with σ = 1/(1 + e^-a), silu(a) = a·σ: da = g ⊙ b ⊙ σ·(1 + a·(1 − σ)), db = g ⊙ silu(a).
//! - RoPE y = x⊙cos + rot(x)⊙sin with rot([x₁, x₂]) = [−x₂, x₁]: dx = g⊙cos + rotᵀ(g⊙sin), rotᵀ([u₁, u₂]) = [u₂, −u₁].
//! - Softmax p = softmax(s·z + m): dz = s · p ⊙ (g − ⟨g, p⟩); the mask gets no gradient.
//!
//! Every output element is computed by one thread from one row, so values do not depend on the thread count; the
//! RMSNorm weight gradient is summed over fixed blocks of rows in a fixed order for the same reason (resume stays
//! bit-exact whatever the pool's size).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu::{storage_f32, with_f32};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turn the fused ops on (the default) or off for this process; off, every op takes its composite form.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the fused ops are on ([`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether tensors on `device` in `dtype` take the fused ops (the memory plan counts what they keep). The ops
/// compute in f32; bf16 tensors are widened into them and their outputs narrowed back ([`widened`]).
pub fn supported(device: &Device, dtype: DType) -> bool {
    enabled() && device.is_cpu() && matches!(dtype, DType::F32 | DType::BF16)
}

/// The dispatch point: the fused CPU op when every tensor is [`supported`], the composite ops otherwise.
fn fused(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| supported(t.device(), t.dtype()))
}

/// `op` over `ts` widened to f32 (a copy only where one is bf16), its output in the first input's dtype: bf16
/// forwards take the f32 ops between casts that carry the gradient back, which costs two passes where the
/// composite ops take several per op, each converting bf16.
fn widened(ts: &[&Tensor], op: impl FnOnce(&[Tensor]) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
    let dtype = ts[0].dtype();
    let wide = ts.iter().map(|t| t.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
    op(&wide)?.to_dtype(dtype)
}

/// Rows per parallel task for rows of `width` elements: about 16k elements a task, so small (decode) shapes run
/// on one thread and large ones split evenly.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// `Σ a_i·b_i` with 16 independent accumulators (vectorised; a fixed order, so deterministic).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `f` over the elements of two f32 CPU tensors (made contiguous, borrowed without a copy when they are).
fn read2<R>((a, b): (&Tensor, &Tensor), f: impl FnOnce(&[f32], &[f32]) -> R) -> candle_core::Result<R> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    with_f32(&a, |a| with_f32(&b, |b| f(a, b))).and_then(|r| r).map_err(candle_core::Error::wrap)
}

/// `f` over the elements of three f32 CPU tensors (made contiguous, borrowed without a copy when they are).
fn read3<R>(
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> R,
) -> candle_core::Result<R> {
    let (a, b, c) = (a.contiguous()?, b.contiguous()?, c.contiguous()?);
    with_f32(&a, |a| with_f32(&b, |b| with_f32(&c, |c| f(a, b, c))))
        .and_then(|r| r)
        .and_then(|r| r)
        .map_err(candle_core::Error::wrap)
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm over the last dimension, `x / rms(x) · weight`, computed in f32 as transformers does; `weight` in any
/// float dtype (an f32 master under a bf16 `x`), the result in `x`'s.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if fused(&[x, weight]) {
        fused_rms_norm(x, weight, eps)
    } else {
        composite_rms_norm(x, weight, eps)
    }
}

fn fused_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    widened(&[x, weight], |t| t[0].contiguous()?.apply_op2(&t[1].contiguous()?, RmsNormOp { eps: eps as f32 }))
}

fn composite_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&inv_rms)?.to_dtype(dtype)?.broadcast_mul(&weight.to_dtype(dtype)?)
}

struct RmsNormOp {
    eps: f32,
}

impl RmsNormOp {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        (dot(row, row) / row.len() as f32 + self.eps).sqrt().recip()
    }

    /// `(dx, dw)` for inputs `x` (rows of `w.len()`), weight `w` and upstream gradient `g`; `dw` only if wanted.
    fn backward(&self, x: &[f32], w: &[f32], g: &[f32], want_dw: bool) -> (Vec<f32>, Option<Vec<f32>>) {
        let h = w.len();
        // A block of rows per task; each block's share of dw is kept apart and the blocks summed in order.
        let per = rows_per_task(h) * h;
        let mut dx = vec![0f32; x.len()];
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(per)
            .zip(x.par_chunks(per).zip(g.par_chunks(per)))
            .map(|(dx, (x, g))| {
                let mut dw = if want_dw { vec![0f32; h] } else { Vec::new() };
                let mut gw = vec![0f32; h];
                for ((dx, x), g) in dx.chunks_exact_mut(h).zip(x.chunks_exact(h)).zip(g.chunks_exact(h)) {
                    let r = self.inv_rms(x);
                    for ((gw, g), w) in gw.iter_mut().zip(g).zip(w) {
                        *gw = g * w;
                    }
                    let c = r * r * r * dot(&gw, x) / h as f32;
                    for ((dx, gw), x) in dx.iter_mut().zip(&gw).zip(x) {
                        *dx = r * gw - c * x;
                    }
                    if want_dw {
                        for ((dw, g), x) in dw.iter_mut().zip(g).zip(x) {
                            *dw += g * x * r;
                        }
                    }
                }
                dw
            })
            .collect();
        let dw = want_dw.then(|| {
            let mut dw = vec![0f32; h];
            for p in &partials {
                for (a, b) in dw.iter_mut().zip(p) {
                    *a += b;
                }
            }
            dw
        });
        (dx, dw)
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = storage_f32(s1, l1, "rms norm: input")?;
        let w = storage_f32(s2, l2, "rms norm: weight")?;
        let h = w.len();
        if l1.shape().dims().last() != Some(&h) {
            candle_core::bail!("rms norm: input {:?}, weight [{h}]", l1.shape());
        }
        let mut y = vec![0f32; x.len()];
        let per = rows_per_task(h) * h;
        y.par_chunks_mut(per).zip(x.par_chunks(per)).for_each(|(y, x)| {
            for (y, x) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
                let r = self.inv_rms(x);
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x_t: &Tensor,
        w_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let want_dw = w_t.track_op();
        let (dx, dw) = read3((x_t, w_t, grad), |x, w, g| self.backward(x, w, g, want_dw))?;
        let dev = x_t.device();
        let dw = dw.map(|dw| Tensor::from_vec(dw, w_t.shape(), dev)).transpose()?;
        Ok((Some(Tensor::from_vec(dx, x_t.shape(), dev)?), dw))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) ⊙ up`, the gated MLP's activation.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if fused(&[gate, up]) && gate.shape() == up.shape() {
        fused_swiglu(gate, up)
    } else {
        composite_swiglu(gate, up)
    }
}

fn fused_swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    widened(&[gate, up], |t| t[0].contiguous()?.apply_op2(&t[1].contiguous()?, SwigluOp))
}

fn composite_swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.silu()? * up
}

struct SwigluOp;

/// silu(a) = a / (1 + e^-a), as Candle computes it.
fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

impl CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = storage_f32(s1, l1, "swiglu: gate")?;
        let b = storage_f32(s2, l2, "swiglu: up")?;
        let mut y = vec![0f32; a.len()];
        let per = rows_per_task(1);
        y.par_chunks_mut(per).zip(a.par_chunks(per).zip(b.par_chunks(per))).for_each(|(y, (a, b))| {
            for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                *y = silu(*a) * b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a_t: &Tensor,
        b_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = read3((a_t, b_t, grad), Self::backward)?;
        let dev = a_t.device();
        Ok((Some(Tensor::from_vec(da, a_t.shape(), dev)?), Some(Tensor::from_vec(db, b_t.shape(), dev)?)))
    }
}

impl SwigluOp {
    /// `(da, db)` for the gate `a`, the up projection `b` and the upstream gradient `g`.
    fn backward(a: &[f32], b: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; a.len()]);
        let per = rows_per_task(1);
        da.par_chunks_mut(per)
            .zip(db.par_chunks_mut(per))
            .zip(a.par_chunks(per).zip(b.par_chunks(per)).zip(g.par_chunks(per)))
            .for_each(|((da, db), ((a, b), g))| {
                for ((((da, db), a), b), g) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g) {
                    let s = 1.0 / (1.0 + (-a).exp());
                    *da = g * b * (s * (1.0 + a * (1.0 - s)));
                    *db = g * (a * s);
                }
            });
        (da, db)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// RoPE

/// Rotate-half RoPE, `x·cos + rotate_half(x)·sin`, for `x` `[b, heads, s, d]` and `cos`, `sin` `[b, 1, s, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    // The fused op gives the tables no gradient, so tables computed from a variable take the composite ops.
    let constant = !cos.track_op() && !sin.track_op();
    let shaped = match (x.dims4(), cos.dims4(), sin.dims4()) {
        (Ok((b, _, s, d)), Ok(c), Ok(sn)) => c == (b, 1, s, d) && sn == c && d % 2 == 0,
        _ => false,
    };
    if fused(&[x, cos, sin]) && constant && shaped {
        fused_rope(x, cos, sin)
    } else {
        composite_rope(x, cos, sin)
    }
}

fn fused_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    widened(&[x, cos, sin], |t| t[0].contiguous()?.apply_op3(&t[1].contiguous()?, &t[2].contiguous()?, RopeOp))
}

fn composite_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

struct RopeOp;

impl RopeOp {
    /// For each `[s, d]` head slab of `x` (`heads` per batch row), `f(out row, x row, cos row, sin row)`.
    fn map(
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
        (heads, s, d): (usize, usize, usize),
        f: impl Fn(&mut [f32], &[f32], &[f32], &[f32]) + Sync,
    ) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(s * d).zip(x.par_chunks(s * d)).enumerate().for_each(|(slab, (y, x))| {
            let table = (slab / heads) * s * d;
            for i in 0..s {
                let row = i * d..(i + 1) * d;
                let t = table + i * d..table + (i + 1) * d;
                f(&mut y[row.clone()], &x[row], &cos[t.clone()], &sin[t]);
            }
        });
        y
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = storage_f32(s1, l1, "rope: input")?;
        let (cos, sin) = (storage_f32(s2, l2, "rope: cos")?, storage_f32(s3, l3, "rope: sin")?);
        let (_, heads, s, d) = l1.shape().dims4()?;
        let half = d / 2;
        let y = Self::map(x, cos, sin, (heads, s, d), |y, x, c, sn| {
            for j in 0..half {
                y[j] = x[j] * c[j] - x[j + half] * sn[j];
                y[j + half] = x[j + half] * c[j + half] + x[j] * sn[j + half];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x_t: &Tensor,
        cos_t: &Tensor,
        sin_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, heads, s, d) = x_t.dims4()?;
        let half = d / 2;
        let dx = read3((grad, cos_t, sin_t), |g, cos, sin| {
            Self::map(g, cos, sin, (heads, s, d), |dx, g, c, sn| {
                for j in 0..half {
                    dx[j] = g[j] * c[j] + g[j + half] * sn[j + half];
                    dx[j + half] = g[j + half] * c[j + half] - g[j] * sn[j];
                }
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, x_t.shape(), x_t.device())?), None, None))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Scaled, masked softmax

/// `softmax(scale · scores + mask)` over the last dimension for attention `scores` `[b, kv_heads, n_rep·s, t]`
/// (query rows of the heads sharing a KV head stacked) and the additive `mask` `[b, 1, s, t]`.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (b, _, q, t) = scores.dims4()?;
    let (mb, m1, s, mt) = mask.dims4()?;
    if s == 0 || q % s != 0 || (mb != b && mb != 1) || m1 != 1 || mt != t {
        candle_core::bail!("masked softmax: scores {:?}, mask {:?}", scores.shape(), mask.shape());
    }
    // The fused op reads one mask row per query of each batch row; a mask shared by the batch broadcasts instead.
    if fused(&[scores, mask]) && mb == b && !mask.track_op() {
        fused_masked_softmax(scores, mask, scale)
    } else {
        composite_masked_softmax(scores, mask, scale)
    }
}

fn fused_masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let s = mask.dim(2)?;
    widened(&[scores, mask], |t| {
        t[0].contiguous()?.apply_op2(&t[1].contiguous()?, SoftmaxOp { scale: scale as f32, s })
    })
}

/// In f32 whatever the scores' dtype (transformers' eager attention does the same), returned in the scores' dtype.
fn composite_masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (b, nkv, q, t) = scores.dims4()?;
    let s = mask.dim(2)?;
    let dtype = scores.dtype();
    let scores = (scores.to_dtype(DType::F32)? * scale)?.reshape((b, nkv, q / s, s, t))?;
    let scores = scores.broadcast_add(&mask.to_dtype(DType::F32)?.unsqueeze(1)?)?;
    softmax_last_dim(&scores)?.reshape((b, nkv, q, t))?.to_dtype(dtype)
}

/// Softmax over the last dimension from primitive ops. The max is detached: softmax does not depend on the shift.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

struct SoftmaxOp {
    scale: f32,
    /// Query positions per row of the mask: score row r reads mask row (r / (kv_heads·n_rep·s))·s + r mod s.
    s: usize,
}

impl CustomOp2 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = storage_f32(s1, l1, "masked softmax: scores")?;
        let mask = storage_f32(s2, l2, "masked softmax: mask")?;
        let (_, nkv, q, t) = l1.shape().dims4()?;
        let (s, per_batch) = (self.s, nkv * q);
        let mut p = vec![0f32; z.len()];
        let rows = rows_per_task(t);
        p.par_chunks_mut(rows * t).zip(z.par_chunks(rows * t)).enumerate().for_each(|(task, (p, z))| {
            for (k, (p, z)) in p.chunks_exact_mut(t).zip(z.chunks_exact(t)).enumerate() {
                let r = task * rows + k;
                let m = ((r / per_batch) * s + r % s) * t;
                let m = &mask[m..m + t];
                let mut max = f32::NEG_INFINITY;
                for ((p, z), m) in p.iter_mut().zip(z).zip(m) {
                    *p = z * self.scale + m;
                    max = max.max(*p);
                }
                let mut sum = [0f32; 16];
                for (j, p) in p.iter_mut().enumerate() {
                    *p = (*p - max).exp();
                    sum[j % 16] += *p;
                }
                let sum: f32 = sum.iter().sum();
                for p in p.iter_mut() {
                    *p /= sum;
                }
            }
        });
        Ok((CpuStorage::F32(p), l1.shape().clone()))
    }

    fn bwd(
        &self,
        z_t: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let t = z_t.dim(D::Minus1)?;
        let per = rows_per_task(t) * t;
        let dz = read2((res, grad), |p, g| {
            let mut dz = vec![0f32; p.len()];
            dz.par_chunks_mut(per).zip(p.par_chunks(per).zip(g.par_chunks(per))).for_each(|(dz, (p, g))| {
                for ((dz, p), g) in dz.chunks_exact_mut(t).zip(p.chunks_exact(t)).zip(g.chunks_exact(t)) {
                    let pg = dot(p, g);
                    for ((dz, p), g) in dz.iter_mut().zip(p).zip(g) {
                        *dz = self.scale * p * (g - pg);
                    }
                }
            });
            dz
        })?;
        Ok((Some(Tensor::from_vec(dz, z_t.shape(), z_t.device())?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// `op(args)` over `vars`: the output and the gradients of Σ out ⊙ weights (weights that differ per element,
    /// so each element's gradient is checked).
    fn run(vars: &[&Var], op: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
        let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = op(&args);
        let n = out.elem_count();
        let w = Tensor::arange(0u32, n as u32, out.device()).unwrap().to_dtype(DType::F32).unwrap();
        let w = ((w * 0.37).unwrap().sin().unwrap() + 1.5).unwrap().reshape(out.shape()).unwrap();
        let grads = (&out * w.to_dtype(out.dtype()).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        (out, vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect())
    }

    /// Two runs' values and gradients agree to `tol` relative to their size, and every gradient is non-zero.
    fn agree((out, g): (Tensor, Vec<Tensor>), (ref_out, ref_g): (Tensor, Vec<Tensor>), tol: f32) {
        let d = max_diff(&out, &ref_out);
        assert!(d <= tol * max_abs(&ref_out).max(1.0), "values differ by {d}");
        for (i, (a, b)) in g.iter().zip(&ref_g).enumerate() {
            assert_eq!(a.dims(), b.dims());
            let scale = max_abs(b);
            assert!(scale > 0.0, "gradient {i} is zero");
            let d = max_diff(a, b);
            assert!(d <= tol * scale.max(1.0), "gradient {i} differs by {d} (scale {scale})");
        }
    }

    /// `op(fused, args)` over `vars` fused and composite agree to `tol` ([`agree`]). (The switch is an argument,
    /// not [`set_enabled`]: tests run side by side in one process.)
    fn check(vars: &[&Var], op: impl Fn(bool, &[Tensor]) -> Tensor, tol: f32) {
        agree(run(vars, |a| op(true, a)), run(vars, |a| op(false, a)), tol);
    }

    fn var(shape: &[usize], std: f32, seed: u64) -> Var {
        // A fixed pseudo-random fill (not Candle's RNG), so a failure reproduces.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * std
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn norm(fused: bool) -> fn(&Tensor, &Tensor, f64) -> candle_core::Result<Tensor> {
        if fused {
            fused_rms_norm
        } else {
            composite_rms_norm
        }
    }

    #[test]
    fn rms_norm_values_and_gradients_equal_the_composite_ops() {
        // 70 rows of 40: several parallel blocks (409 rows a block at width 40 would be one, so use a wide row too).
        let (x, w) = (var(&[7, 10, 40], 1.0, 1), var(&[40], 0.5, 2));
        check(&[&x, &w], |f, a| norm(f)(&a[0], &a[1], 1e-5).unwrap(), 1e-5);
        let (x, w) = (var(&[300, 576], 2.0, 3), var(&[576], 1.0, 4));
        check(&[&x, &w], |f, a| norm(f)(&a[0], &a[1], 1e-6).unwrap(), 1e-5);
    }

    #[test]
    fn swiglu_values_and_gradients_equal_the_composite_ops() {
        let (a, b) = (var(&[33, 1536], 4.0, 5), var(&[33, 1536], 1.0, 6));
        check(
            &[&a, &b],
            |f, t| if f { fused_swiglu(&t[0], &t[1]) } else { composite_swiglu(&t[0], &t[1]) }.unwrap(),
            1e-5,
        );
    }

    #[test]
    fn rope_values_and_gradients_equal_the_composite_ops() {
        let x = var(&[2, 3, 5, 8], 1.0, 7);
        let angles = var(&[2, 1, 5, 8], 3.0, 8);
        let (cos, sin) = (angles.as_tensor().cos().unwrap().detach(), angles.as_tensor().sin().unwrap().detach());
        check(
            &[&x],
            |f, t| if f { fused_rope(&t[0], &cos, &sin) } else { composite_rope(&t[0], &cos, &sin) }.unwrap(),
            1e-6,
        );
    }

    fn softmax(fused: bool) -> fn(&Tensor, &Tensor, f64) -> candle_core::Result<Tensor> {
        if fused {
            fused_masked_softmax
        } else {
            composite_masked_softmax
        }
    }

    #[test]
    fn masked_softmax_values_and_gradients_equal_the_composite_ops() {
        // b 2, kv heads 2, n_rep 3, s 4 queries over t 6 keys (2 cached), with masked keys.
        let (b, nkv, n_rep, s, t) = (2, 2, 3, 4, 6);
        let z = var(&[b, nkv, n_rep * s, t], 3.0, 9);
        let valid = vec![vec![false, true, true, true, true, true], vec![true; t]];
        let mask = crate::model::attention_mask(&valid, s, None, &Device::Cpu).unwrap();
        check(&[&z], |f, a| softmax(f)(&a[0], &mask, 0.125f64.sqrt()).unwrap(), 1e-6);
        // Wide rows, several tasks.
        let z = var(&[1, 1, 300, 300], 2.0, 10);
        let mask = crate::model::attention_mask(&[vec![true; 300]], 300, None, &Device::Cpu).unwrap();
        check(&[&z], |f, a| softmax(f)(&a[0], &mask, 0.125).unwrap(), 1e-6);
    }

    #[test]
    fn a_mask_shared_by_the_batch_broadcasts() {
        // b = 2 rows sharing one [1, 1, s, t] mask: the composite ops broadcast it; the fused op, given it repeated
        // per row, computes the same.
        let z = var(&[2, 1, 4, 6], 2.0, 11);
        let valid = vec![vec![false, true, true, true, true, true]];
        let shared = crate::model::attention_mask(&valid, 4, None, &Device::Cpu).unwrap();
        let repeated = Tensor::cat(&[&shared, &shared], 0).unwrap();
        let a = masked_softmax(z.as_tensor(), &shared, 0.5).unwrap();
        let b = fused_masked_softmax(z.as_tensor(), &repeated, 0.5).unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
        // A mask with a head axis other than 1 is refused, not misread.
        assert!(masked_softmax(z.as_tensor(), &Tensor::cat(&[&shared, &shared], 1).unwrap(), 0.5).is_err());
    }

    /// bf16 takes the fused ops widened to f32: values and gradients in bf16, each the f32 op's on the same values
    /// rounded (within 2⁻⁶ of the largest: a few bf16 roundings, of the inputs, the sum's weights and the results,
    /// where a wrong op is off by its whole size). f16 keeps the composite ops.
    #[test]
    fn bf16_takes_the_fused_ops_widened_and_f16_the_composite_ones() {
        let bf = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
        let wide = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        // The op on bf16 values against the op on the same values in f32.
        let widened_rounds = |vars: &[&Var], op: &dyn Fn(&[Tensor]) -> Tensor| {
            let wide: Vec<Var> = vars.iter().map(|v| wide(v)).collect();
            let (out, g) = run(vars, op);
            assert_eq!(out.dtype(), DType::BF16);
            agree((out, g), run(&wide.iter().collect::<Vec<_>>(), op), 2f32.powi(-6));
        };
        let (x, w) = (bf(&var(&[300, 576], 2.0, 3)), bf(&var(&[576], 1.0, 4)));
        assert!(fused(&[x.as_tensor(), w.as_tensor()]));
        widened_rounds(&[&x, &w], &|a| rms_norm(&a[0], &a[1], 1e-6).unwrap());
        let (a, b) = (bf(&var(&[33, 1536], 4.0, 5)), bf(&var(&[33, 1536], 1.0, 6)));
        widened_rounds(&[&a, &b], &|t| swiglu(&t[0], &t[1]).unwrap());
        let x = bf(&var(&[2, 3, 5, 8], 1.0, 7));
        let angles = var(&[2, 1, 5, 8], 3.0, 8);
        let (cos, sin) = (angles.as_tensor().cos().unwrap(), angles.as_tensor().sin().unwrap());
        let bf_table = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().detach();
        let (cos, sin) = (bf_table(&cos), bf_table(&sin));
        widened_rounds(&[&x], &|t| {
            let (c, s) = (cos.to_dtype(t[0].dtype()).unwrap(), sin.to_dtype(t[0].dtype()).unwrap());
            rope(&t[0], &c, &s).unwrap()
        });
        let z = bf(&var(&[1, 1, 300, 300], 2.0, 10));
        let mask = crate::model::attention_mask(&[vec![true; 300]], 300, None, &Device::Cpu).unwrap();
        widened_rounds(&[&z], &|a| masked_softmax(&a[0], &mask, 0.125).unwrap());

        let x = Tensor::ones((2, 4), DType::F16, &Device::Cpu).unwrap();
        let w = Tensor::ones(4, DType::F16, &Device::Cpu).unwrap();
        assert!(!fused(&[&x, &w]));
        assert_eq!(rms_norm(&x, &w, 1e-6).unwrap().dtype(), DType::F16);
    }
}
