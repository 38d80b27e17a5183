//! `safe`: reinforcement-learning fine-tuning of Hugging Face causal language models on Candle.

pub mod advantage;
pub mod algo;
pub mod model;
pub mod optim;
pub mod rollout;
