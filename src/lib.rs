//! `safe`: reinforcement-learning fine-tuning of Hugging Face causal language models on Candle.

#[macro_use]
mod choice;
pub mod advantage;
pub mod algo;
pub mod cli;
pub mod exit;
pub mod model;
pub mod optim;
pub mod recipe;
pub mod rollout;
