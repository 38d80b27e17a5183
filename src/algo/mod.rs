//! RL algorithms: shared loss pieces ([`loss`]) and each algorithm's token loss built from them.

pub mod grpo;
pub mod grpo_lambda;
pub mod loss;
pub mod ppo;
pub mod safe;
