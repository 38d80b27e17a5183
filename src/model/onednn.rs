//! The linear layers' f32 matmuls on the CPU through oneDNN's `dnnl_sgemm` (cargo feature `onednn`, linking the
//! system's libdnnl: Debian's `libdnnl-dev`). At SmolLM2-135M's training shapes oneDNN ran 189-209 GFLOP/s
//! against Candle's `gemm` build's 129-195 on a 2-core AMD EPYC (`scripts/matmul-backends.sh`), so the products
//! of a linear layer under the autograd graph — forward `x·Wᵀ`, backward `dy·W` and `dyᵀ·x` — and graph-free
//! products of more than a few rows go through it; decoding rows keep our weight-streaming kernel.
//!
//! [`applies`] is the one dispatch point ([`super::llama`]'s `matmul_by_weight_t` asks it). `SAFE_ONEDNN=0` turns
//! it off at run time (for side-by-side benchmarks of one build).

use std::os::raw::{c_char, c_int};
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::cpu::storage_f32;

#[link(name = "gomp")]
extern "C" {
    fn omp_set_num_threads(n: c_int);
}

#[link(name = "dnnl")]
extern "C" {
    /// Row-major `C = α·op(A)·op(B) + β·C`; `dnnl_dim_t` is `int64_t`, the status an enum (0 = success).
    fn dnnl_sgemm(
        transa: c_char,
        transb: c_char,
        m: i64,
        n: i64,
        k: i64,
        alpha: f32,
        a: *const f32,
        lda: i64,
        b: *const f32,
        ldb: i64,
        beta: f32,
        c: *mut f32,
        ldc: i64,
    ) -> c_int;
}

/// Rows above which a product leaves the decode kernel and Candle's small-row path for oneDNN.
const MIN_ROWS: usize = 16;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SAFE_ONEDNN").map_or(true, |v| v != "0"))
}

/// Whether `x · Wᵀ` (`x: [rows, in]`, `W: [out, in]`) runs here: f32 on the CPU, more than [`MIN_ROWS`] rows.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    enabled()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.rank() == 2
        && w.rank() == 2
        && x.dim(0).is_ok_and(|r| r > MIN_ROWS)
}

/// `x · Wᵀ` with its backward (`dx = dy·W`, `dW = dyᵀ·x`) by oneDNN.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// `op(A) · op(B)` for row-major `A`, `B` (`ta`/`tb`: transposed), by oneDNN; `m × n` out.
///
/// The rows of the output are split across our rayon pool, each block one single-threaded oneDNN call: oneDNN's
/// own OpenMP team would spin beside the pool between calls (measured: 13.6% of the update in libgomp, and no gain
/// over Candle's gemm), where one pool for everything keeps both cores on the work.
pub fn sgemm(ta: bool, tb: bool, m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> candle_core::Result<Vec<f32>> {
    use rayon::prelude::*;
    if a.len() != m * k || b.len() != k * n {
        candle_core::bail!("onednn sgemm: {} and {} elements for m {m}, n {n}, k {k}", a.len(), b.len());
    }
    let mut c = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return Ok(c);
    }
    // Enough blocks for the pool, each at least 16 rows (oneDNN's kernels block rows in 16s and fewer).
    let blocks = rayon::current_num_threads().min(m.div_ceil(16)).max(1);
    let per = m.div_ceil(blocks);
    c.par_chunks_mut(per * n)
        .enumerate()
        .try_for_each(|(i, dst)| block(ta, tb, i * per, dst.len() / n, m, n, k, a, b, dst))?;
    Ok(c)
}

/// Rows `r0..r0 + rows` of `op(A)·op(B)` into `dst` (`rows × n`), one oneDNN call on this thread alone.
#[allow(clippy::too_many_arguments)]
fn block(
    ta: bool,
    tb: bool,
    r0: usize,
    rows: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    dst: &mut [f32],
) -> candle_core::Result<()> {
    thread_local!(static ONE_THREAD: () = unsafe { omp_set_num_threads(1) });
    ONE_THREAD.with(|_| ());
    // Row r of op(A): row r of A `[m, k]` (stride k), or column r of A `[k, m]` (stride m).
    let (a0, lda) = if ta { (r0, m) } else { (r0 * k, k) };
    let ldb = if tb { k } else { n };
    let t = |yes: bool| if yes { b'T' as c_char } else { b'N' as c_char };
    assert!(dst.len() == rows * n && r0 + rows <= m, "onednn block: rows {r0}+{rows} of {m}");
    // SAFETY: op(A)'s rows r0..r0+rows lie in `a` (m·k elements, checked by the caller) at leading dimension lda,
    // op(B) is all of `b` (k·n), and `dst` holds rows·n (asserted); the call keeps no pointer.
    let status = unsafe {
        dnnl_sgemm(
            t(ta),
            t(tb),
            rows as i64,
            n as i64,
            k as i64,
            1.0,
            a[a0..].as_ptr(),
            lda as i64,
            b.as_ptr(),
            ldb as i64,
            0.0,
            dst.as_mut_ptr(),
            n as i64,
        )
    };
    if status != 0 {
        candle_core::bail!("onednn sgemm failed (status {status}) for rows {rows}, n {n}, k {k}");
    }
    Ok(())
}

/// `x · Wᵀ` (the [`Product`] with `W` transposed); backward by [`Product`]s.
struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "onednn-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Product { ta: false, tb: true }.cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        // dx = g·W ([rows, out]·[out, in]); dW = gᵀ·x ([out, rows]·[rows, in]).
        let dx = g.apply_op2_no_bwd(w, &Product { ta: false, tb: false })?;
        let dw = g.apply_op2_no_bwd(x, &Product { ta: true, tb: false })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `op(A) · op(B)` without a backward of its own (the backward's products).
struct Product {
    ta: bool,
    tb: bool,
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "onednn-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (r1, c1) = l1.shape().dims2()?;
        let (r2, c2) = l2.shape().dims2()?;
        let (m, k) = if self.ta { (c1, r1) } else { (r1, c1) };
        let (k2, n) = if self.tb { (c2, r2) } else { (r2, c2) };
        if k != k2 {
            candle_core::bail!(
                "onednn product: {:?} and {:?} (ta {}, tb {})",
                l1.shape(),
                l2.shape(),
                self.ta,
                self.tb
            );
        }
        let a = storage_f32(s1, l1, "onednn product: lhs")?;
        let b = storage_f32(s2, l2, "onednn product: rhs")?;
        Ok((CpuStorage::F32(sgemm(self.ta, self.tb, m, n, k, a, b)?), Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / s.max(1e-30)
    }

    /// Values and both gradients equal Candle's matmul's (f32 sums in another order: within 1e-5 of the largest).
    #[test]
    fn linear_values_and_gradients_equal_candles_matmul() {
        let dev = Device::Cpu;
        for (rows, k, n) in [(17, 64, 48), (100, 576, 192), (33, 1536, 576)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (rows, k), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap()).unwrap();
            let up = Tensor::randn(0f32, 1., (rows, n), &dev).unwrap();
            let ours = linear(x.as_tensor(), w.as_tensor()).unwrap();
            let theirs = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
            assert!(close(&ours, &theirs) < 1e-5, "values at {rows}×{k}×{n}");
            let g1 = (&ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("w", &w)] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(close(a, b) < 1e-5, "d{name} at {rows}×{k}×{n}: {}", close(a, b));
            }
        }
    }

    #[test]
    fn products_in_every_orientation_equal_candles() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (20, 30), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., (30, 40), &dev).unwrap();
        let want = a.matmul(&b).unwrap();
        let (at, bt) = (a.t().unwrap().contiguous().unwrap(), b.t().unwrap().contiguous().unwrap());
        for (ta, tb, l, r) in
            [(false, false, &a, &b), (true, false, &at, &b), (false, true, &a, &bt), (true, true, &at, &bt)]
        {
            let got = l.apply_op2_no_bwd(r, &Product { ta, tb }).unwrap();
            assert!(close(&got, &want) < 1e-5, "ta {ta}, tb {tb}");
        }
    }
}
