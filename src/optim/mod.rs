//! Our optimizer: AdamW with savable state, global grad-norm clipping and learning-rate schedules.

pub mod adamw;
pub mod clip;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig, AdamWState};
pub use clip::clip_grad_norm;
pub use schedule::{lr_at, LrSchedule};
