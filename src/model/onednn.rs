//! The linear layers' matmuls on the CPU through oneDNN (cargo feature `onednn`, linking the system's libdnnl:
//! Debian's `libdnnl-dev`): f32 by `dnnl_sgemm`, bf16 by the matmul primitive through a C shim
//! (`onednn_bf16.c`, built by build.rs; oneDNN 2.6 has no BLAS-style bf16 call). At SmolLM2-135M's training
//! shapes oneDNN ran 189-209 GFLOP/s in f32 against Candle's `gemm` build's 129-195, and 320-357 in bf16
//! (AVX512-BF16), on a 2-core AMD EPYC (`scripts/matmul-backends.sh`; Candle widens bf16 to f32), so the products
//! of a linear layer under the autograd graph — forward `x·Wᵀ`, backward `dy·W` and `dyᵀ·x` — and graph-free
//! products of more than a few rows go through it; decoding rows keep our weight-streaming kernel.
//!
//! [`applies`] is the one dispatch point ([`super::llama`]'s `matmul_by_weight_t` asks it for trained weights, its
//! frozen-weight products, the plain ones and LoRA's base term, ask it through `frozen_product_cpu` and
//! `frozen_input_grad`). `SAFE_ONEDNN=0` turns
//! it off at run time (for side-by-side benchmarks of one build).

use std::os::raw::{c_char, c_int};
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use half::bf16;

use crate::cpu::storage;

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

// src/model/onednn_bf16.c (built by build.rs): bf16 through the matmul primitive.
extern "C" {
    /// One bf16 product `C = op(A)·op(B)` (row-major, f32 accumulation) on this thread; 0 or a status.
    fn safe_dnnl_bf16_matmul(
        ta: c_int,
        tb: c_int,
        m: i64,
        n: i64,
        k: i64,
        a: *const u16,
        lda: i64,
        b: *const u16,
        ldb: i64,
        c: *mut u16,
        ldc: i64,
    ) -> c_int;
    /// The name of the implementation oneDNN picks for a bf16 product at a training shape into `name`.
    fn safe_dnnl_bf16_impl(name: *mut c_char, len: c_int) -> c_int;
}

/// Rows above which a product leaves the decode kernel and Candle's small-row path for oneDNN.
const MIN_ROWS: usize = 16;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SAFE_ONEDNN").map_or(true, |v| v != "0"))
}

/// Whether oneDNN has a real bf16 matmul kernel on this CPU (AVX-512 with or without AVX512-BF16, AMX): its
/// reference implementation, all that is left on older CPUs, is slower than Candle's widening to f32.
pub fn bf16_kernels() -> bool {
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| {
        let mut name = [0 as c_char; 128];
        // SAFETY: the shim writes at most `len` bytes, NUL-terminated, into `name`.
        let ok = unsafe { safe_dnnl_bf16_impl(name.as_mut_ptr(), name.len() as c_int) } == 0;
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy();
        ok && !name.starts_with("ref")
    })
}

/// Whether `x · Wᵀ` (`x: [rows, in]`, `W: [out, in]`, computed in `x`'s dtype) runs here: f32, or bf16 where
/// [`bf16_kernels`], on the CPU, more than [`MIN_ROWS`] rows; `W` f32 or bf16 (cast to `x`'s dtype by the caller,
/// per pass for a frozen weight).
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && matches!(w.dtype(), DType::F32 | DType::BF16)
        && x.rank() == 2
        && w.rank() == 2
        && x.dim(0).is_ok_and(|rows| applies_to(x.dtype(), rows))
}

/// [`applies`] for a custom op's CPU input of `rows` rows in `dtype` (its weight already cast to that dtype).
pub fn applies_to(dtype: DType, rows: usize) -> bool {
    enabled()
        && rows > MIN_ROWS
        && match dtype {
            DType::F32 => true,
            DType::BF16 => bf16_kernels(),
            _ => false,
        }
}

/// `x · Wᵀ` with its backward (`dx = dy·W`, `dW = dyᵀ·x`) by oneDNN; `W` in `x`'s dtype.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// `x · Wᵀ` at the storage level, for a custom op's forward (a frozen weight's product, LoRA's base term): `x`
/// `[rows, in]` and `W` `[out, in]` contiguous, in one dtype, where [`applies_to`] says so.
pub fn weight_product(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    Product { ta: false, tb: true }.cpu_fwd(x, lx, w, lw)
}

/// `g · W` without a backward (the input's gradient through a frozen weight), where [`applies`] says so.
pub fn times(g: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    g.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Product { ta: false, tb: false })
}

/// An element type oneDNN multiplies here: f32 by `dnnl_sgemm`, bf16 (accumulated in f32) by the matmul
/// primitive through the C shim.
trait Element: Copy + Default + Send + Sync {
    /// Row-major `C (rows × n, stride ldc) = op(A)·op(B)` on this thread, oneDNN's status back (0 = success).
    ///
    /// # Safety
    /// `a`, `b` and `c` hold what the dimensions and leading dimensions address.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        ta: bool,
        tb: bool,
        rows: i64,
        n: i64,
        k: i64,
        a: *const Self,
        lda: i64,
        b: *const Self,
        ldb: i64,
        c: *mut Self,
        ldc: i64,
    ) -> c_int;
}

impl Element for f32 {
    unsafe fn gemm(
        ta: bool,
        tb: bool,
        rows: i64,
        n: i64,
        k: i64,
        a: *const f32,
        lda: i64,
        b: *const f32,
        ldb: i64,
        c: *mut f32,
        ldc: i64,
    ) -> c_int {
        let t = |yes: bool| if yes { b'T' as c_char } else { b'N' as c_char };
        dnnl_sgemm(t(ta), t(tb), rows, n, k, 1.0, a, lda, b, ldb, 0.0, c, ldc)
    }
}

impl Element for bf16 {
    unsafe fn gemm(
        ta: bool,
        tb: bool,
        rows: i64,
        n: i64,
        k: i64,
        a: *const bf16,
        lda: i64,
        b: *const bf16,
        ldb: i64,
        c: *mut bf16,
        ldc: i64,
    ) -> c_int {
        safe_dnnl_bf16_matmul(ta.into(), tb.into(), rows, n, k, a.cast(), lda, b.cast(), ldb, c.cast(), ldc)
    }
}

/// `op(A) · op(B)` for row-major `A`, `B` (`ta`/`tb`: transposed), by oneDNN; `m × n` out.
///
/// The rows of the output are split across our rayon pool, each block one single-threaded oneDNN call: oneDNN's
/// own OpenMP team would spin beside the pool between calls (measured: 13.6% of the update in libgomp, and no gain
/// over Candle's gemm), where one pool for everything keeps both cores on the work.
#[allow(private_bounds)]
pub fn gemm<T: Element>(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    b: &[T],
) -> candle_core::Result<Vec<T>> {
    use rayon::prelude::*;
    if a.len() != m * k || b.len() != k * n {
        candle_core::bail!("onednn gemm: {} and {} elements for m {m}, n {n}, k {k}", a.len(), b.len());
    }
    let mut c = vec![T::default(); m * n];
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
fn block<T: Element>(
    ta: bool,
    tb: bool,
    r0: usize,
    rows: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    b: &[T],
    dst: &mut [T],
) -> candle_core::Result<()> {
    thread_local!(static ONE_THREAD: () = unsafe { omp_set_num_threads(1) });
    ONE_THREAD.with(|_| ());
    // Row r of op(A): row r of A `[m, k]` (stride k), or column r of A `[k, m]` (stride m).
    let (a0, lda) = if ta { (r0, m) } else { (r0 * k, k) };
    let ldb = if tb { k } else { n };
    assert!(dst.len() == rows * n && r0 + rows <= m, "onednn block: rows {r0}+{rows} of {m}");
    // SAFETY: op(A)'s rows r0..r0+rows lie in `a` (m·k elements, checked by the caller) at leading dimension lda,
    // op(B) is all of `b` (k·n), and `dst` holds rows·n (asserted); the call keeps no pointer.
    let status = unsafe {
        T::gemm(
            ta,
            tb,
            rows as i64,
            n as i64,
            k as i64,
            a[a0..].as_ptr(),
            lda as i64,
            b.as_ptr(),
            ldb as i64,
            dst.as_mut_ptr(),
            n as i64,
        )
    };
    if status != 0 {
        candle_core::bail!("onednn gemm failed (status {status}) for rows {rows}, n {n}, k {k}");
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
        // The same product for either element type, each read through `storage`.
        let (ta, tb) = (self.ta, self.tb);
        fn of<T: Element + candle_core::WithDType>(
            (ta, tb, m, n, k): (bool, bool, usize, usize, usize),
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
        ) -> candle_core::Result<Vec<T>> {
            gemm(ta, tb, m, n, k, storage(s1, l1, "onednn product: lhs")?, storage(s2, l2, "onednn product: rhs")?)
        }
        let out = match (s1, s2) {
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => CpuStorage::BF16(of((ta, tb, m, n, k), (s1, l1), (s2, l2))?),
            _ => CpuStorage::F32(of((ta, tb, m, n, k), (s1, l1), (s2, l2))?),
        };
        Ok((out, Shape::from((m, n))))
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

    /// Elementwise: each bf16 value is the f32 product of the same (bf16) inputs rounded once — within bf16's
    /// relative rounding (2^-9) of itself, plus a hair of the largest for f32's other summation order.
    fn rounds(got: &Tensor, want: &Tensor) -> bool {
        let got = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= w.abs() / 256.0 + top * 1e-5)
    }

    /// bf16 (the matmul primitive, through the C shim): the linear layer's value and both gradients, and products
    /// in every orientation, are the f32 products of their bf16 inputs, rounded. Where oneDNN has no bf16 kernel,
    /// the layers keep Candle's matmul.
    #[test]
    fn bf16_products_and_gradients_round_the_f32_products() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (40, 576), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let w = Tensor::randn(0f32, 0.05, (192, 576), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        if !bf16_kernels() {
            assert!(!applies(&x, &w), "bf16 without a kernel must keep Candle's matmul");
            return;
        }
        assert!(applies(&x, &w));
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        for (rows, k, n) in [(17, 64, 48), (100, 576, 192), (33, 1536, 576)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (rows, k), &dev).unwrap().to_dtype(DType::BF16).unwrap())
                .unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap())
                .unwrap();
            let up = Tensor::randn(0f32, 1., (rows, n), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let y = linear(x.as_tensor(), w.as_tensor()).unwrap();
            assert_eq!(y.dtype(), DType::BF16);
            assert!(
                rounds(&y, &f(x.as_tensor()).matmul(&f(w.as_tensor()).t().unwrap()).unwrap()),
                "y at {rows}×{k}×{n}"
            );
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (dx, dw) = (g.get(x.as_tensor()).unwrap(), g.get(w.as_tensor()).unwrap());
            assert!(rounds(dx, &f(&up).matmul(&f(w.as_tensor())).unwrap()), "dx at {rows}×{k}×{n}");
            assert!(rounds(dw, &f(&up).t().unwrap().matmul(&f(x.as_tensor())).unwrap()), "dw at {rows}×{k}×{n}");
        }
        let a = Tensor::randn(0f32, 1., (20, 30), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let b = Tensor::randn(0f32, 1., (30, 40), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let want = f(&a).matmul(&f(&b)).unwrap();
        let (at, bt) = (a.t().unwrap().contiguous().unwrap(), b.t().unwrap().contiguous().unwrap());
        for (ta, tb, l, r) in
            [(false, false, &a, &b), (true, false, &at, &b), (false, true, &a, &bt), (true, true, &at, &bt)]
        {
            let got = l.apply_op2_no_bwd(r, &Product { ta, tb }).unwrap();
            assert!(rounds(&got, &want), "ta {ta}, tb {tb}");
        }
    }
}
