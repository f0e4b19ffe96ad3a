//! peft-lora: LoRA and its family as peft-core tuners, with the Hugging Face PEFT file format
//! (`adapter_config.json` + `adapter_model.safetensors`).
//!
//! - LoRA, rsLoRA, DoRA with inits true/false/gaussian/PiSSA/OLoRA ([`config`], [`layer`], [`tuner`]);
//!   data-driven inits CorDA ([`corda`]) and EVA ([`eva`]) from calibration statistics ([`calib`]); ALLoRA's
//!   norm-scaled learning rate ([`allora`]); LoLDU ([`loldu`]); LoRA-SB ([`lora_sb`]).
//! - Structured variants: Hydra ([`hydra`]), MoS ([`mos`]), MixLoRA on the feed-forward block sites
//!   ([`mixlora`]), Poly/MHR routed by task ids ([`poly`]); their shared helpers ([`structured`]).
//! - Adapter arithmetic: `add_weighted_adapter` with linear/cat/svd/ties/dare/magnitude-prune ([`weighted`],
//!   [`merge_utils`]).
//! - Registry entries for trainers and `cargo xtask bench` ([`mod@methods`]); the `peft_type`s this crate
//!   reads ([`mod@registry`]).
//!
//! Every method here is a [`peft_core::adapter::TunerConfig`]: [`peft_core::adapter::PeftModel`] owns the model
//! and its adapters and saves and loads them in PEFT's layout.
//!
//! ```
//! use peft_core::adapter::PeftModel;
//! use peft_core::nn::{Ctx, Linear, Module, RandomInit, Visitor};
//! use peft_core::Tensor;
//! use peft_lora::LoraConfig;
//!
//! struct Net(Linear);
//! impl Module for Net {
//!     fn visit(&self, v: &mut dyn Visitor) {
//!         self.0.visit(v);
//!     }
//! }
//! let net = Net(Linear::load("encoder.query", 8, 8, true, &RandomInit::new(0, 0.1))?);
//! let x = Tensor::ones(&[2, 8]);
//! let y0 = net.0.forward(&x, &Ctx::eval())?;
//! let model = PeftModel::new(net, LoraConfig::new(4, 8.0, ["query"]), "default", 0)?;
//! // B starts at zero: the adapted model is the base model until trained.
//! assert_eq!(model.0.forward(&x, &Ctx::eval())?.to_vec(), y0.to_vec());
//! assert_eq!(model.trainable_params().len(), 2); // lora_A, lora_B
//! # let dir = std::env::temp_dir().join(format!("peft-lora-doc-{}", std::process::id()));
//! model.save_pretrained(&dir)?; // adapter_config.json + adapter_model.safetensors, as PEFT writes them
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), peft_core::adapter::AdapterError>(())
//! ```

pub mod allora;
pub mod calib;
pub mod config;
pub mod corda;
pub mod error;
pub mod eva;
pub mod hydra;
pub mod layer;
pub mod loldu;
pub mod lora_sb;
pub mod merge_utils;
pub mod methods;
pub mod mixlora;
pub mod mos;
pub mod poly;
pub mod registry;
pub mod structured;
#[cfg(test)]
mod testutil;
pub mod tuner;
pub mod weighted;

pub use config::{Bias, ConfigError, Init, InitLoraWeights, LoraConfig};
pub use error::{CombineProblem, LoraError};
pub use layer::{convert_mutated_to_lora, LoraLinear, LoraSpec};
pub use merge_utils::{MajoritySign, Merge};
pub use methods::methods;
pub use registry::registry;
pub use tuner::LoraModelExt;
pub use weighted::{Combination, WeightedExt};
