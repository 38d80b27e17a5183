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
pub mod threads;
pub mod train;

pub use threads::{init_threads, on_pool};
