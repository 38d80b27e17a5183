//! Models: config mirror, our trainable decoder, loading (dir | hub | gguf), tokenizer and chat template.

pub mod builtin;
pub mod chat;
pub mod config;
pub mod fused_head;
pub mod fused_ops;
pub mod gemv;
pub mod llama;
pub mod load;
pub mod logprobs;
pub mod lora;
#[cfg(feature = "onednn")]
pub mod onednn;
pub mod tokenizer;
pub mod value;

pub use config::{Arch, HfConfig, ModelConfig};
pub use llama::{attention_mask, master_dtype, positions_from_mask, CausalLm, KvCache, Packing};
pub use load::{LoadedModel, ModelSource};
pub use tokenizer::{ChatMessage, Tokenizer};
