//! peft-lora: LoRA and its family (rsLoRA, DoRA, PiSSA/OLoRA inits), multi-adapter models with merge/unmerge, and
//! the Hugging Face PEFT file format (`adapter_config.json` + `adapter_model.safetensors`).

pub mod config;
pub mod pyjson;

pub use config::{Bias, ConfigError, Init, InitLoraWeights, LoraConfig};
