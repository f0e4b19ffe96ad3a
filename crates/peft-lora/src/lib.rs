//! peft-lora: LoRA and its family (rsLoRA, DoRA, PiSSA/OLoRA inits), multi-adapter models with merge/unmerge, and
//! the Hugging Face PEFT file format (`adapter_config.json` + `adapter_model.safetensors`).

/// `return Err(Error::Invalid { op, msg: format!(..) })`.
macro_rules! bail {
    ($op:expr, $($fmt:tt)+) => {
        return Err(peft_core::Error::Invalid { op: $op, msg: format!($($fmt)+) })
    };
}
pub(crate) use bail;

pub mod config;
pub mod pyjson;

pub use config::{Bias, ConfigError, Init, InitLoraWeights, LoraConfig};
pub mod layer;

pub use layer::{convert_mutated_to_lora, LoraLinear, LoraSpec};
pub mod io;
pub mod model;
#[cfg(test)]
mod testutil;

pub use model::{AdapterSet, LoraModel};
pub mod methods;

pub use methods::{methods, methods_for, LoraMethod, LoraPrepared};
