//! f32 matmul throughput of Candle on this machine at SmolLM2-135M's shapes, in both orientations our Linear
//! layer can use: `x · Wᵀ` (x: [rows, in]) and `W · xᵀ` (then transposed). Rows span decoding (1-32) to
//! training (1024+). Run: `cargo bench --bench matmul`.
//!
//! `cargo bench --bench matmul -- --summary` prints one JSON object instead: the machine's f32 matmul rate for one
//! training pass of SmolLM2-135M's layers over 1024 rows (every linear layer in proportion, plus the LM head), the
//! figure `scripts/bench-vs-trl.sh` compares the update's achieved rate with.
//!
//! `-- --backends` prints the workloads of scripts/matmul-backends/bench.c (decoding and training products at
//! SmolLM2-135M's shapes, one JSON line each) for Candle's `gemm` and our decode kernel, so that
//! `scripts/matmul-backends.sh` can set them beside OpenBLAS, MKL and oneDNN.

use std::time::Instant;

use candle_core::{Device, Tensor};

fn time_it(f: impl Fn()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let iters = 10;
        for _ in 0..iters {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
    }
    best
}

/// Total FLOPs over total seconds of `x · Wᵀ` at `rows` rows for each `(in, out, count)` weight shape.
fn weighted_rate(rows: usize, shapes: &[(usize, usize, usize)]) -> f64 {
    let dev = Device::Cpu;
    let (mut flops, mut secs) = (0.0, 0.0);
    for &(k, n, count) in shapes {
        let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (rows, k), &dev).unwrap();
        secs += count as f64
            * time_it(|| {
                x.matmul(&w.t().unwrap()).unwrap();
            });
        flops += count as f64 * 2.0 * (rows * k * n) as f64;
    }
    flops / secs / 1e9
}

/// On a pool thread, as the binary runs (`safe::on_pool`).
fn main() {
    safe::init_threads();
    safe::on_pool(bench);
}

/// (in, out, count) of SmolLM2-135M's linear layers (30 layers) and of its tied LM head.
const LAYER: [(usize, usize, usize); 4] = [(576, 576, 60), (576, 192, 60), (576, 1536, 60), (1536, 576, 30)];
const HEAD: (usize, usize, usize) = (576, 49152, 1);

/// Median seconds of 7 repeats of `f`, each repeat as many calls as fill 50 ms.
fn median_secs(f: impl Fn()) -> f64 {
    f();
    let (mut iters, t0) = (1, Instant::now());
    while t0.elapsed().as_secs_f64() < 0.05 {
        f();
        iters += 1;
    }
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() / iters as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[3]
}

/// GFLOP/s over `shapes` (each timed apart, weighted by its count) at `rows` rows, forward only or forward and the
/// two backward products (dy·W, dyᵀ·x), with Candle's matmul in `dtype` (bf16: Candle widens to f32 and back).
fn candle_rate(dtype: candle_core::DType, train: bool, rows: usize, shapes: &[(usize, usize, usize)]) -> f64 {
    let dev = Device::Cpu;
    let (mut flops, mut secs) = (0.0, 0.0);
    for &(k, n, count) in shapes {
        let t = |shape: (usize, usize)| Tensor::randn(0f32, 1., shape, &dev).unwrap().to_dtype(dtype).unwrap();
        let (w, x, dy) = (t((n, k)), t((rows, k)), t((rows, n)));
        secs += count as f64
            * median_secs(|| {
                std::hint::black_box(x.matmul(&w.t().unwrap()).unwrap());
                if train {
                    std::hint::black_box(dy.matmul(&w).unwrap());
                    std::hint::black_box(dy.t().unwrap().matmul(&x).unwrap());
                }
            });
        flops += count as f64 * if train { 3.0 } else { 1.0 } * 2.0 * (rows * k * n) as f64;
    }
    flops / secs / 1e9
}

/// GFLOP/s of our decode kernel (`safe::model::gemv`) over `shapes` at `rows` rows, f32 or bf16 weights.
fn gemv_rate(bf16: bool, rows: usize, shapes: &[(usize, usize, usize)]) -> f64 {
    let (mut flops, mut secs) = (0.0, 0.0);
    for &(k, n, count) in shapes {
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 5) as f32 * 0.1).collect();
        secs += count as f64
            * median_secs(|| {
                if bf16 {
                    std::hint::black_box(safe::model::gemv::matmul_t_bf16(&x, &wb, rows, k, n));
                } else {
                    std::hint::black_box(safe::model::gemv::matmul_t(&x, &w, rows, k, n));
                }
            });
        flops += count as f64 * 2.0 * (rows * k * n) as f64;
    }
    flops / secs / 1e9
}

fn backends() {
    use candle_core::DType;
    let line = |backend: &str, dtype: &str, work: &str, rows: usize, gflops: f64| {
        println!(
            "{{\"backend\": \"{backend}\", \"dtype\": \"{dtype}\", \"work\": \"{work}\", \"rows\": {rows}, \"gflops\": {gflops:.1}}}"
        )
    };
    let all: Vec<_> = LAYER.iter().copied().chain([HEAD]).collect();
    for (dtype, name) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        for rows in [1, 4, 8, 16] {
            line("candle-gemm", name, "decode layers", rows, candle_rate(dtype, false, rows, &LAYER));
            line("candle-gemm", name, "decode head", rows, candle_rate(dtype, false, rows, &[HEAD]));
            let bf16 = dtype == DType::BF16;
            line("safe-gemv", name, "decode layers", rows, gemv_rate(bf16, rows, &LAYER));
            line("safe-gemv", name, "decode head", rows, gemv_rate(bf16, rows, &[HEAD]));
        }
        for rows in [128, 1024, 4096] {
            line("candle-gemm", name, "train fwd+bwd", rows, candle_rate(dtype, true, rows, &all));
        }
    }
}

fn bench() {
    if std::env::args().any(|a| a == "--backends") {
        return backends();
    }
    if std::env::args().any(|a| a == "--summary") {
        // One decoder layer: q and o 576→576, k and v 576→192, gate and up 576→1536, down 1536→576; 30 layers and
        // the tied LM head 576→49152 (here at every row; the trainers apply it at completion rows only).
        let rows = 1024;
        let layer = [(576, 576, 60), (576, 192, 60), (576, 1536, 60), (1536, 576, 30), (576, 49152, 1)];
        println!("{{\"rows\": {rows}, \"gflops\": {:.1}}}", weighted_rate(rows, &layer));
        return;
    }
    let dev = Device::Cpu;
    // The decode kernel (safe::model::gemv) at decoding row counts; GB/s counts the weight bytes streamed.
    println!("{:>6} {:>6} {:>6} | {:>12} {:>12}", "rows", "in", "out", "gemv GF/s", "weights GB/s");
    for &(k, n) in &[(576usize, 1536usize), (1536, 576), (576, 576), (576, 49152)] {
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
        for &m in &[1usize, 4, 8, 16] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 * 0.1).collect();
            let t = time_it(|| {
                std::hint::black_box(safe::model::gemv::matmul_t(&x, &w, m, k, n));
            });
            println!(
                "{m:>6} {k:>6} {n:>6} | {:>12.1} {:>12.1}",
                2.0 * (m * k * n) as f64 / t / 1e9,
                (n * k * 4) as f64 / t / 1e9
            );
        }
    }
    println!("{:>6} {:>6} {:>6} | {:>12} {:>12}", "rows", "in", "out", "x·Wᵀ GF/s", "W·xᵀ GF/s");
    for &(k, n) in &[(576usize, 1536usize), (1536, 576), (576, 576), (576, 49152)] {
        let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
        for &m in &[1usize, 8, 16, 32, 64, 128, 512, 1024] {
            if n == 49152 && m > 128 {
                continue;
            }
            let x = Tensor::randn(0f32, 1., (m, k), &dev).unwrap();
            let flops = 2.0 * (m * k * n) as f64;
            let a = time_it(|| {
                x.matmul(&w.t().unwrap()).unwrap();
            });
            let b = time_it(|| {
                w.matmul(&x.t().unwrap()).unwrap().t().unwrap().contiguous().unwrap();
            });
            println!("{m:>6} {k:>6} {n:>6} | {:>12.1} {:>12.1}", flops / a / 1e9, flops / b / 1e9);
        }
    }
}
