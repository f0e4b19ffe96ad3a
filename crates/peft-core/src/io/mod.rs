//! Checkpoint and config IO: safetensors (mmap read, atomic write), GGUF (read + dequantise), Hugging Face
//! `config.json`, and the one documented lookup of the shared test assets.
//!
//! Every failure is a typed [`IoError`] that names the file and, where relevant, the tensor. Every file the
//! workspace writes goes through [`atomic_write`].

pub mod assets;
pub mod atomic;
pub mod error;
#[cfg(feature = "gguf")]
pub mod gguf;
pub mod hf_config;
pub mod safetensors;
pub mod stale;
mod strict_json;
pub mod unused;

pub use assets::{assets_dir, find_smollm2_gguf};
pub use atomic::atomic_write;
pub use error::{IoError, IoResult};
#[cfg(feature = "gguf")]
pub use gguf::{GgmlType, GgufFile, GgufTensorInfo, GgufValue};
pub use hf_config::{ArchConfig, BertConfig, Dinov2Config, LlamaConfig, WhisperConfig};
pub use safetensors::{read_safetensors, write_safetensors, write_safetensors_as, DType, SafeTensorsFile, TensorInfo};
pub use stale::{remove_stale_temps, restore_moved_aside};
