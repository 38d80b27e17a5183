//! Advantages: turning per-completion rewards into the per-completion signal the policy loss scales.
//!
//! Pure functions over plain `f64` slices, so every algorithm (GRPO, RLOO, PPO, REINFORCE++, SAFE) can call and test them
//! without a model.

pub mod gae;
pub mod group;

pub use group::{
    group_advantages, leave_one_out, normalize_batch, zero_std_groups, GroupAdvantages, ScaleRewards, STD_EPS,
};
