//! The LM head, log-softmax and target gather as one CPU op with its own backward: the log-prob of each row's
//! target token (and, as a metric, the entropy) from hidden states, without a `[rows, vocab]` tensor in the
//! autograd graph. Rows are processed in chunks; the backward recomputes a chunk's logits instead of keeping them.
//! Rows that are not active (padding) cost nothing: no logits, a log-prob of 0 and no gradient.
//!
//! For a row with hidden state x, weight W `[V, h]`, z = (W·x)/T and target t:
//!   logp = z_t − lse(z),  entropy = lse(z) − Σ_v p_v·z_v  with p = softmax(z);
//!   ∂logp/∂(W·x)_v = (δ_vt − p_v)/T, so with upstream g: dx = Wᵀ·dz and dW = dz·xᵀ for dz_v = g·(δ_vt − p_v)/T.
//! The entropy column carries no gradient (it is a metric; a differentiable entropy takes the composite path).

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows per chunk: one `[ROWS, vocab]` f32 buffer (50 MB at a 49k vocabulary) at a time, and enough rows for the
/// weight-gradient GEMM to run near the machine's matmul rate.
pub const ROWS: usize = 256;

/// Log-probs `[n]` of `targets` under `softmax(hidden · weightᵀ / temperature)` and the per-row entropy `[n]` (no
/// gradient), for `hidden` `[n, h]` and `weight` `[vocab, h]` on the CPU, computed in f32: bf16 ones (a bf16
/// forward's hidden states, a frozen bf16 head) are widened, which is more precise than a bf16 head and, on the
/// CPU, faster (an f32 master head is used as it is). Rows with `active[r] = false` give 0 for both.
/// Differentiable with respect to `hidden` and `weight`.
pub fn head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    active: &[bool],
    temperature: f64,
    chunk_rows: usize,
) -> Result<(Tensor, Tensor)> {
    let (n, h) = hidden.dims2()?;
    let (vocab, h2) = weight.dims2()?;
    if h != h2 || targets.len() != n || active.len() != n {
        bail!("fused LM head: hidden {n}x{h}, weight {vocab}x{h2}, {} targets, {} flags", targets.len(), active.len());
    }
    if let Some(t) = targets.iter().zip(active).find(|(t, a)| **a && **t as usize >= vocab) {
        bail!("fused LM head: target id {} is outside the vocabulary ({vocab})", t.0);
    }
    let op = HeadLogprobs {
        targets: targets.to_vec(),
        active: active.to_vec(),
        inv_t: if temperature > 0.0 { (1.0 / temperature) as f32 } else { 1.0 },
        chunk_rows: chunk_rows.max(1),
    };
    let (hidden, weight) = (hidden.to_dtype(DType::F32)?, weight.to_dtype(DType::F32)?);
    let out = hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)?;
    Ok((out.narrow(1, 0, 1)?.squeeze(1)?, out.narrow(1, 1, 1)?.squeeze(1)?.detach()))
}

/// Whether [`head_logprobs`] can run for tensors on `device` in `dtype` (f32, or bf16 widened to it).
pub fn supported(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::BF16)
}

struct HeadLogprobs {
    targets: Vec<u32>,
    active: Vec<bool>,
    inv_t: f32,
    chunk_rows: usize,
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with explicit (row, column) strides, on gemm's f32 kernels.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    let span = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(dst.len() >= span(m, n, dst_rs, dst_cs), "gemm: dst too small");
    assert!(lhs.len() >= span(m, k, lhs_rs, lhs_cs), "gemm: lhs too small");
    assert!(rhs.len() >= span(k, n, rhs_rs, rhs_cs), "gemm: rhs too small");
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above keep every strided access inside the slices; dst does not alias lhs or rhs
    // (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

impl HeadLogprobs {
    /// Gradients `(d hidden [n, h], d weight [vocab, h])` for the upstream gradient `g` of the log-probs; the
    /// weight's only when `weight_grad` (a frozen head, as under LoRA, gets none: no `[vocab, h]` buffer).
    fn backward(
        &self,
        hidden: &[f32],
        weight: &[f32],
        g: &[f32],
        (n, h, vocab): (usize, usize, usize),
        weight_grad: bool,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut dh = vec![0f32; n * h];
        let mut dw = if weight_grad { vec![0f32; vocab * h] } else { Vec::new() };
        let mut buf = vec![0f32; self.chunk_rows.min(n).max(1) * vocab];
        let mut x = Vec::new();
        let mut dx = vec![0f32; self.chunk_rows.min(n).max(1) * h];
        let mut first = true;
        // Rows with a zero upstream gradient (masked tokens) contribute nothing: skip them.
        for rows in self.chunks(|r| g[r] != 0.0) {
            let buf = &mut buf[..rows.len() * vocab];
            self.chunk_logits(hidden, weight, h, &rows, &mut x, buf);
            // dz = g·(onehot − p)/T, in place over the logits.
            buf.par_chunks_mut(vocab).zip(rows.par_iter()).for_each(|(row, &r)| {
                let (lse, _) = scaled_lse(row, self.inv_t);
                let scale = g[r] * self.inv_t;
                for z in row.iter_mut() {
                    *z = -scale * ((*z as f64 - lse).exp() as f32);
                }
                row[self.targets[r] as usize] += scale;
            });
            let dx = &mut dx[..rows.len() * h];
            // dx[R, h] = dz[R, V] · W[V, h]
            gemm_f32((rows.len(), h, vocab), dx, (h, 1), false, buf, (vocab, 1), weight, (h, 1));
            for (i, &r) in rows.iter().enumerate() {
                dh[r * h..(r + 1) * h].copy_from_slice(&dx[i * h..(i + 1) * h]);
            }
            // dW[V, h] += dzᵀ[V, R] · x[R, h]
            if weight_grad {
                gemm_f32((vocab, h, rows.len()), &mut dw, (h, 1), !first, buf, (1, vocab), &x, (h, 1));
            }
            first = false;
        }
        (dh, weight_grad.then_some(dw))
    }

    /// The active rows, in chunks of at most `chunk_rows`.
    fn chunks(&self, also: impl Fn(usize) -> bool) -> Vec<Vec<usize>> {
        let rows: Vec<usize> = (0..self.targets.len()).filter(|&r| self.active[r] && also(r)).collect();
        rows.chunks(self.chunk_rows).map(<[usize]>::to_vec).collect()
    }

    /// `logits[i, :] = weight · hidden[rows[i]]` for a chunk, written into `buf` (`[rows.len(), vocab]`).
    fn chunk_logits(
        &self,
        hidden: &[f32],
        weight: &[f32],
        h: usize,
        rows: &[usize],
        x: &mut Vec<f32>,
        buf: &mut [f32],
    ) {
        let vocab = weight.len() / h;
        x.clear();
        for &r in rows {
            x.extend_from_slice(&hidden[r * h..(r + 1) * h]);
        }
        // [R, h] · [h, V] where the right side is Wᵀ read in place: element (k, v) = W[v, k].
        gemm_f32((rows.len(), vocab, h), buf, (vocab, 1), false, x, (h, 1), weight, (1, h));
    }
}

/// For one row of raw logits: scale by 1/T in place, and return (lse, Σ p·z) of the scaled row.
fn scaled_lse(row: &mut [f32], inv_t: f32) -> (f64, f64) {
    let mut max = f32::NEG_INFINITY;
    for z in row.iter_mut() {
        *z *= inv_t;
        max = max.max(*z);
    }
    let (mut s, mut sz) = (0f64, 0f64);
    for &z in row.iter() {
        let e = ((z - max) as f64).exp();
        s += e;
        sz += e * z as f64;
    }
    let lse = max as f64 + s.ln();
    (lse, sz / s)
}

impl CustomOp2 for HeadLogprobs {
    fn name(&self) -> &'static str {
        "fused-lm-head-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let hidden = crate::cpu::storage_f32(s1, l1, "fused LM head: hidden")?;
        let weight = crate::cpu::storage_f32(s2, l2, "fused LM head: weight")?;
        let (n, h) = l1.shape().dims2()?;
        let vocab = l2.shape().dims2()?.0;
        let mut out = vec![0f32; n * 2];
        let mut buf = vec![0f32; self.chunk_rows.min(n).max(1) * vocab];
        let mut x = Vec::new();
        for rows in self.chunks(|_| true) {
            let buf = &mut buf[..rows.len() * vocab];
            self.chunk_logits(hidden, weight, h, &rows, &mut x, buf);
            let stats: Vec<(f64, f64, f32)> = buf
                .par_chunks_mut(vocab)
                .zip(rows.par_iter())
                .map(|(row, &r)| {
                    let (lse, mean_z) = scaled_lse(row, self.inv_t);
                    (lse, mean_z, row[self.targets[r] as usize])
                })
                .collect();
            for (&r, (lse, mean_z, zt)) in rows.iter().zip(stats) {
                out[2 * r] = (zt as f64 - lse) as f32;
                out[2 * r + 1] = (lse - mean_z) as f32;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        hidden_t: &Tensor,
        weight_t: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g: Vec<f32> = grad_res.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        let (n, h) = hidden_t.dims2()?;
        let vocab = weight_t.dim(0)?;
        // A weight that is neither a variable nor computed from one (a frozen head) needs no gradient.
        let weight_grad = weight_t.track_op();
        let (dh, dw) = crate::cpu::with_f32(hidden_t, |hidden| {
            crate::cpu::with_f32(weight_t, |weight| self.backward(hidden, weight, &g, (n, h, vocab), weight_grad))
        })
        .and_then(|r| r)
        .map_err(candle_core::Error::wrap)?;
        let dev = hidden_t.device();
        let dw = dw.map(|dw| Tensor::from_vec(dw, (vocab, h), dev)).transpose()?;
        Ok((Some(Tensor::from_vec(dh, (n, h), dev)?), dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::log_softmax_last_dim;
    use candle_core::{Var, D};

    /// The composite computation the fused op replaces: full logits, log-softmax, gather; entropy from the same.
    fn composite(x: &Tensor, w: &Tensor, targets: &[u32], temperature: f64) -> (Tensor, Tensor) {
        let logits = (x.matmul(&w.t().unwrap()).unwrap() / temperature).unwrap();
        let logp = log_softmax_last_dim(&logits).unwrap();
        let t = Tensor::new(targets, x.device()).unwrap().unsqueeze(1).unwrap();
        let lp = logp.gather(&t, D::Minus1).unwrap().squeeze(1).unwrap();
        let ent = (logp.exp().unwrap() * &logp).unwrap().sum(D::Minus1).unwrap().neg().unwrap();
        (lp, ent)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn values_and_gradients_equal_the_composite_computation() {
        let dev = Device::Cpu;
        let (n, h, vocab) = (11, 16, 53);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, h), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (vocab, h), &dev).unwrap()).unwrap();
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
        let active: Vec<bool> = (0..n).map(|i| i % 4 != 3).collect();
        let mask = Tensor::new(active.iter().map(|&a| a as u8 as f32).collect::<Vec<_>>(), &dev).unwrap();
        // Upstream weights that differ per row, so each row's gradient is checked, not only their sum.
        let weights = Tensor::new((0..n).map(|i| 0.5 + i as f32 / 7.0).collect::<Vec<_>>(), &dev).unwrap();
        let temperature = 0.7;

        let (lp_ref, ent_ref) = composite(x.as_tensor(), w.as_tensor(), &targets, temperature);
        let loss_ref = (lp_ref.clone() * &mask).unwrap().mul(&weights).unwrap().sum_all().unwrap();
        let g_ref = loss_ref.backward().unwrap();

        // chunk_rows = 3: several chunks, the last one short.
        let (lp, ent) = head_logprobs(x.as_tensor(), w.as_tensor(), &targets, &active, temperature, 3).unwrap();
        let loss = (lp.clone() * &mask).unwrap().mul(&weights).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();

        let masked = |t: &Tensor| t.mul(&mask).unwrap();
        assert!(max_diff(&masked(&lp), &masked(&lp_ref)) < 1e-5);
        assert!(max_diff(&masked(&ent), &masked(&ent_ref)) < 1e-5);
        // Inactive rows: exactly 0, no gradient.
        assert!(lp.to_vec1::<f32>().unwrap().iter().zip(&active).all(|(v, a)| *a || *v == 0.0));
        for var in [&x, &w] {
            let (a, b) = (g.get(var.as_tensor()).unwrap(), g_ref.get(var.as_tensor()).unwrap());
            let scale: f32 = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert!(scale > 0.0);
            assert!(max_diff(a, b) < 1e-5 * scale.max(1.0), "gradient differs by {}", max_diff(a, b));
        }
    }
}
