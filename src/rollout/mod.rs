//! Rollout: batched KV-cache generation and sampling, and replayed rollouts.

pub mod batch;
pub mod generate;
pub mod replay;
pub mod rng;
pub mod sampling;
pub mod tensor_sampling;

pub use batch::{Rollouts, Sample};
pub use generate::{generate, Completion, FinishReason, GenerationConfig, Request};
pub use replay::Replay;
pub use rng::{RowKey, RowRng};
pub use sampling::SamplingParams;
