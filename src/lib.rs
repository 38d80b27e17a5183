//! `safe`: reinforcement-learning fine-tuning of Hugging Face causal language models on Candle.

pub mod cli;
pub mod exit;
pub mod model;
pub mod recipe;
pub mod rollout;
