//! `safe`: reinforcement-learning fine-tuning of Hugging Face causal language models on Candle.

#[macro_use]
mod choice;
pub mod advantage;
pub mod algo;
pub mod checkpoint;
pub mod child;
pub mod cli;
pub mod cpu;
pub mod data;
pub mod eval;
pub mod exit;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod recipe;
pub mod report;
pub mod reward;
pub mod rollout;
pub mod signal;
pub mod train;

/// Fix the CPU thread count once, before any work. Candle asks for it on every matmul and, unless
/// `RAYON_NUM_THREADS` is set, recomputes it from /proc and /sys each time: about a quarter of batch-1 decode
/// time went to those reads. An explicit `RAYON_NUM_THREADS` is respected.
pub fn init_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        // Called first thing in main, before any other thread exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
