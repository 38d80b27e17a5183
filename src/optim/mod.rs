//! Our optimizer: AdamW with savable state, global grad-norm clipping and learning-rate schedules.

pub mod accumulate;
pub mod adamw;
pub mod clip;
pub mod schedule;

pub use accumulate::GradAccumulator;
pub use adamw::{AdamW, AdamWConfig, AdamWState};
pub use clip::{clip_grad_norm, clipped_step, grad_norm_and_scale, norm_limit};
pub use schedule::{lr_at, LrSchedule};
