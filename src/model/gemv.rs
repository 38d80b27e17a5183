//! `x · Wᵀ` for a few rows (decoding: one row per live sequence), CPU f32, no autograd. Decoding is bound by
//! reading the weights: this kernel streams each weight row once and dots it with every input row while it is in
//! cache, where the general GEMM repacks the weights per call and was 1.5-4× slower at 8-16 rows (benches/matmul.rs).
//! Each output is a 16-lane partial sum over the input dimension, then a horizontal sum: the same arithmetic for a
//! row whatever the number of rows, so a sequence decodes to the same numbers alone or in a batch.

use rayon::prelude::*;

/// Rows up to which decoding uses this kernel.
pub const MAX_ROWS: usize = 16;
const LANES: usize = 16;
/// Output features per parallel task.
const BLOCK: usize = 32;

/// `out[r, o] = Σ_k x[r, k] · w[o, k]` for `x` `[rows, k]` and `w` `[n, k]`, both row-major.
pub fn matmul_t(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
    blocked(x, w, rows, k, n, dispatch)
}

/// [`matmul_t`] with bf16 weights (a rollout copy: half the bytes to stream per decoded token); products and sums
/// in f32.
pub fn matmul_t_bf16(x: &[f32], w: &[half::bf16], rows: usize, k: usize, n: usize) -> Vec<f32> {
    blocked(x, w, rows, k, n, dispatch_bf16)
}

/// Blocks of [`BLOCK`] output features in parallel, each by `kernel` into `out_t[o, r]`, then transposed (it is
/// small) to `[rows, n]`.
fn blocked<W: Sync>(
    x: &[f32],
    w: &[W],
    rows: usize,
    k: usize,
    n: usize,
    kernel: impl Fn(&[f32], &[W], usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "gemv: x is not [rows, k]");
    assert_eq!(w.len(), n * k, "gemv: w is not [n, k]");
    let mut out_t = vec![0f32; n * rows];
    out_t.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(blk, dst)| {
        let o0 = blk * BLOCK;
        let count = dst.len() / rows;
        kernel(x, &w[o0 * k..(o0 + count) * k], rows, k, dst);
    });
    let mut out = vec![0f32; rows * n];
    for o in 0..n {
        for r in 0..rows {
            out[r * n + o] = out_t[o * rows + r];
        }
    }
    out
}

fn dispatch(x: &[f32], w: &[f32], rows: usize, k: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; `avx512::block` asserts the slice sizes it reads and writes.
            return unsafe { avx512::block(x, w, rows, k, dst) };
        }
    }
    block(x, w, rows, k, dst)
}

fn dispatch_bf16(x: &[f32], w: &[half::bf16], rows: usize, k: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; `avx512::block_bf16` asserts the slice sizes it reads and writes.
            return unsafe { avx512::block_bf16(x, w, rows, k, dst) };
        }
    }
    block(x, w, rows, k, dst)
}

/// A weight element the portable kernel reads: f32, or bf16 widened to f32.
pub(crate) trait Weight: Copy {
    fn f32(self) -> f32;
}
impl Weight for f32 {
    fn f32(self) -> f32 {
        self
    }
}
impl Weight for half::bf16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// Portable version: `dst[o·rows + r] = w[o] · x[r]` with a 16-lane partial sum per row.
fn block<W: Weight>(x: &[f32], w: &[W], rows: usize, k: usize, dst: &mut [f32]) {
    let full = k / LANES * LANES;
    for (o, wrow) in w.chunks_exact(k).enumerate() {
        for r in 0..rows {
            let xrow = &x[r * k..(r + 1) * k];
            let mut acc = [0f32; LANES];
            for (wc, xc) in wrow[..full].chunks_exact(LANES).zip(xrow[..full].chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += wc[l].f32() * xc[l];
                }
            }
            let mut sum: f32 = acc.iter().sum();
            for j in full..k {
                sum += wrow[j].f32() * xrow[j];
            }
            dst[o * rows + r] = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// A weight element the AVX-512 kernel reads 16 at a time as f32: f32 itself, or bf16 (the top half of an
    /// f32) widened.
    pub(super) trait Lanes: super::Weight {
        /// Elements `c·16 .. c·16 + 16` from `p`.
        unsafe fn lanes(p: *const Self, c: usize) -> __m512;
    }

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn lanes(p: *const f32, c: usize) -> __m512 {
            _mm512_loadu_ps(p.add(c * LANES))
        }
    }

    impl Lanes for half::bf16 {
        #[inline(always)]
        unsafe fn lanes(p: *const half::bf16, c: usize) -> __m512 {
            let h = _mm256_loadu_si256((p as *const u16).add(c * LANES) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    /// 8 (or 4) input rows at a time share each loaded weight chunk; each row has two fused multiply-add
    /// accumulators (even and odd chunks) so they do not wait on each other. A row's arithmetic does not depend on
    /// its group, nor on the weights' type: bf16 weights give the bits f32 weights holding the same values give.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(x: &[f32], w: &[f32], rows: usize, k: usize, dst: &mut [f32]) {
        rows_by_group(x, w, rows, k, dst)
    }

    /// [`block`] over bf16 weights, each 16-weight chunk widened to f32 as it is loaded.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block_bf16(x: &[f32], w: &[half::bf16], rows: usize, k: usize, dst: &mut [f32]) {
        rows_by_group(x, w, rows, k, dst)
    }

    #[inline(always)]
    unsafe fn rows_by_group<W: Lanes>(x: &[f32], w: &[W], rows: usize, k: usize, dst: &mut [f32]) {
        assert!(x.len() >= rows * k && dst.len() >= w.len() / k * rows);
        for (o, wrow) in w.chunks_exact(k).enumerate() {
            let mut r = 0;
            while r < rows {
                let group = if rows - r >= 8 { 8 } else { (rows - r).min(4) };
                let sums = match group {
                    8 => dots::<8, W>(wrow, x, r, k),
                    4 => dots::<4, W>(wrow, x, r, k),
                    _ => {
                        let mut s = [0f32; 8];
                        for (i, v) in s.iter_mut().take(group).enumerate() {
                            *v = dots::<1, W>(wrow, x, r + i, k)[0];
                        }
                        s
                    }
                };
                dst[o * rows + r..o * rows + r + group].copy_from_slice(&sums[..group]);
                r += group;
            }
        }
    }

    #[inline(always)]
    unsafe fn dots<const R: usize, W: Lanes>(w: &[W], x: &[f32], r0: usize, k: usize) -> [f32; 8] {
        let chunks = k / LANES;
        let wp = w.as_ptr();
        let xp: [*const f32; R] = std::array::from_fn(|i| x.as_ptr().add((r0 + i) * k));
        let mut even = [_mm512_setzero_ps(); R];
        let mut odd = [_mm512_setzero_ps(); R];
        let mut c = 0;
        while c + 2 <= chunks {
            let w0 = W::lanes(wp, c);
            let w1 = W::lanes(wp, c + 1);
            for i in 0..R {
                even[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp[i].add(c * LANES)), even[i]);
                odd[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp[i].add((c + 1) * LANES)), odd[i]);
            }
            c += 2;
        }
        if c < chunks {
            let w0 = W::lanes(wp, c);
            for i in 0..R {
                even[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp[i].add(c * LANES)), even[i]);
            }
        }
        let mut out = [0f32; 8];
        for i in 0..R {
            let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(even[i], odd[i]));
            for j in chunks * LANES..k {
                sum += (*wp.add(j)).f32() * *xp[i].add(j);
            }
            out[i] = sum;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_reference_and_rows_are_independent() {
        let (rows, k, n) = (5, 37, 70); // k not a multiple of the lanes, n not a multiple of the block
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 40.0).collect();
        let out = matmul_t(&x, &w, rows, k, n);
        for r in 0..rows {
            for o in 0..n {
                let want: f64 = (0..k).map(|j| x[r * k + j] as f64 * w[o * k + j] as f64).sum();
                assert!((out[r * n + o] as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
            }
            // The same row alone: bit-identical.
            let alone = matmul_t(&x[r * k..(r + 1) * k], &w, 1, k, n);
            assert_eq!(alone[..], out[r * n..(r + 1) * n]);
        }
        // bf16 weights: the f64 product with the rounded weights, and rows independent too.
        let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let out = matmul_t_bf16(&x, &wb, rows, k, n);
        for r in 0..rows {
            for o in 0..n {
                let want: f64 = (0..k).map(|j| x[r * k + j] as f64 * wb[o * k + j].to_f64()).sum();
                assert!((out[r * n + o] as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
            }
            let alone = matmul_t_bf16(&x[r * k..(r + 1) * k], &wb, 1, k, n);
            assert_eq!(alone[..], out[r * n..(r + 1) * n]);
        }
        // bf16 weights give the bits f32 weights of the same values give (lora.base_dtype = "bf16" decodes exactly
        // what the f32 model of its values does), at every group size.
        let widened: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        for rows in 1..=rows {
            let x = &x[..rows * k];
            assert_eq!(matmul_t_bf16(x, &wb, rows, k, n), matmul_t(x, &widened, rows, k, n), "{rows} rows");
        }
        // The portable kernel (what runs without AVX-512), for both weight types: `out_t[o·rows + r]`.
        let (mut pf, mut pb) = (vec![0f32; n * rows], vec![0f32; n * rows]);
        block(&x, &w, rows, k, &mut pf);
        block(&x, &wb, rows, k, &mut pb);
        for r in 0..rows {
            for o in 0..n {
                let want: f64 = (0..k).map(|j| x[r * k + j] as f64 * w[o * k + j] as f64).sum();
                assert!((pf[o * rows + r] as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
                let want: f64 = (0..k).map(|j| x[r * k + j] as f64 * wb[o * k + j].to_f64()).sum();
                assert!((pb[o * rows + r] as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
            }
        }
    }
}
