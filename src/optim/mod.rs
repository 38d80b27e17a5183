//! Our optimizer: AdamW with savable state, global grad-norm clipping and learning-rate schedules.

pub mod accumulate;
pub mod adamw;
pub mod clip;
pub mod schedule;

pub use accumulate::GradAccumulator;
pub use adamw::{AdamW, AdamWConfig, AdamWState};
pub use clip::{clip_grad_norm, grad_norm_and_scale};
pub use schedule::{lr_at, LrSchedule};
