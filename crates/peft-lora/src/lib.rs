//! peft-lora: LoRA and its family, multi-adapter models with merge/unmerge, and the Hugging Face PEFT file format
//! (`adapter_config.json` + `adapter_model.safetensors`).
//!
//! - LoRA, rsLoRA, DoRA with inits true/false/gaussian/PiSSA/OLoRA ([`layer`], [`model`]); data-driven inits CorDA
//!   ([`corda`]) and EVA ([`eva`]) from calibration statistics ([`calib`]); LoLDU ([`loldu`]); LoRA-SB ([`lora_sb`]);
//!   ALLoRA's norm-scaled learning rate as an optimizer wrapper ([`allora`]).
//! - Structured variants: Hydra ([`hydra`]), MoS ([`mos`]), MixLoRA ([`mixlora`]), Poly/MHR ([`poly`]).
//! - Adapter arithmetic: `add_weighted_adapter` with linear/cat/svd/ties/dare/magnitude-prune ([`weighted`],
//!   [`merge_utils`]).
//! - Registry entries for trainers and `cargo xtask bench` ([`mod@methods`], [`init_methods`], [`struct_methods`]).
//!
//! ```
//! use peft_core::nn::{Ctx, Linear, Module, RandomInit, Visitor};
//! use peft_core::Tensor;
//! use peft_lora::{LoraConfig, LoraModel};
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
//! let lm = LoraModel::new(&net, LoraConfig::new(4, 8.0, ["query"]), "default", 0)?;
//! // B starts at zero: the adapted model is the base model until trained.
//! assert_eq!(net.0.forward(&x, &Ctx::eval())?.to_vec(), y0.to_vec());
//! assert_eq!(lm.trainable_params().len(), 2); // lora_A, lora_B
//! # let dir = std::env::temp_dir().join(format!("peft-lora-doc-{}", std::process::id()));
//! lm.save_pretrained(&dir)?; // adapter_config.json + adapter_model.safetensors, as PEFT writes them
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), peft_core::Error>(())
//! ```

/// `return Err(Error::Invalid { op, msg: format!(..) })`.
macro_rules! bail {
    ($op:expr, $($fmt:tt)+) => {
        return Err(peft_core::Error::Invalid { op: $op, msg: format!($($fmt)+) })
    };
}
pub(crate) use bail;

pub mod allora;
pub mod calib;
pub mod config;
pub mod corda;
pub mod eva;
pub mod hydra;
pub mod init_methods;
pub mod io;
pub mod layer;
pub mod loldu;
pub mod lora_sb;
pub mod merge_utils;
pub mod methods;
pub mod mixlora;
pub mod model;
pub mod mos;
pub mod poly;
pub mod pyjson;
pub mod sitemodel;
pub mod struct_methods;
pub mod structured;
#[cfg(test)]
mod testutil;
pub mod weighted;

pub use config::{Bias, ConfigError, Init, InitLoraWeights, LoraConfig};
pub use hydra::{HydraConfig, HydraLinear, HydraModel};
pub use layer::{convert_mutated_to_lora, LoraLinear, LoraSpec};
pub use merge_utils::{MajoritySign, Merge};
pub use methods::{methods, methods_for, LoraMethod, LoraPrepared};
pub use mixlora::{FfnKind, MixLoraConfig, MixLoraFfn, MixLoraModel, RouterLosses, RoutingStrategy};
pub use model::{AdapterSet, LoraModel};
pub use mos::{MosConfig, MosLinear, MosModel};
pub use poly::{PolyConfig, PolyLinear, PolyModel, PolySelector};
pub use weighted::Combination;
