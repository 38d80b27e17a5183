//! f32 matmul throughput of Candle on this machine at SmolLM2-135M's shapes, in both orientations our Linear
//! layer can use: `x · Wᵀ` (x: [rows, in]) and `W · xᵀ` (then transposed). Rows span decoding (1-32) to
//! training (1024+). Run: `cargo bench --bench matmul`.

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

fn main() {
    safe::init_threads();
    let dev = Device::Cpu;
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
