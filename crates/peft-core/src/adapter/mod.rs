//! The adapter layer every method crate plugs into:
//! - [`TunerConfig`] / [`Tuner`] ([`tuner`]): a method's config (plain data with PEFT's `peft_type`) injects one
//!   named adapter onto the model's sites; the injected adapter has a state dict, activation, merge/unmerge where
//!   the method defines it, and training hooks;
//! - [`PeftModel`] ([`peft_model`]): owns the base model and its adapters (PEFT's model surface, files included);
//! - [`LinearTuner`], [`BlockTuner`], [`CompositeTuner`] ([`attach`]): ready-made tuners for the usual shapes;
//! - target selection by PEFT's rules ([`target`]), adapter files ([`files`], [`pyjson`]), load reports
//!   ([`report`]), the config and method registries ([`registry`]) and peft-core's own baselines
//!   ([`DeltaConfig`]: BitFit / LayerNorm tuning on the parameter-delta site; [`BaseTuneConfig`]: full
//!   fine-tuning and head-only).
//!
//! Adding a method: a config type implementing [`TunerConfig`] (+ [`PeftConfig`] to load it from files) whose
//! `inject` builds its layers (usually through [`LinearTuner::attach`]), and one [`MethodSpec`] line in its crate's
//! `methods()` list for the bench.

pub mod attach;
pub mod baselines;
pub mod error;
pub mod files;
pub mod peft_model;
pub mod pyjson;
pub mod registry;
pub mod report;
pub mod target;
pub mod tuner;

pub use attach::{not_supported, select_linear, site_rng, BlockTuner, CompositeTuner, LinearTuner, SavedTensors};
pub use baselines::{BaseTuneConfig, DeltaConfig};
pub use error::{AdapterError, AdapterResult};
pub use files::{adapter_dir, read_config_json, write_folder, CONFIG_NAME, WEIGHTS_NAME};
pub use peft_model::{get_peft_model, CalibFn, PeftModel, BASE_ROW};
pub use registry::{duplicate_name, ConfigRegistry, MethodName, MethodSpec, PeftConfig};
pub use report::LoadReport;
pub use target::{layer_index, ModulePattern, PatternMap, TargetSpec};
pub use tuner::{AdapterTensors, Calibrate, InjectCx, Tuner, TunerConfig};

/// The methods peft-core provides, for the bench: full fine-tuning, head-only, BitFit, LayerNorm tuning.
///
/// Learning rates (measured on the bench's short runs, MiniLM-L6 on SST-2, about 60-200 steps): full fine-tuning
/// at twice the usual 5e-5; a linear probe stayed at chance at 2e-3 after 63 steps and reached 74.9 dev accuracy
/// at 1e-2; BitFit (Ben Zaken et al. use 1e-4..1e-3 for many epochs) at 5e-3 for the short budgets; LayerNorm
/// tuning takes BitFit's rate (not tuned).
pub fn methods() -> Vec<MethodSpec> {
    vec![
        MethodSpec::new(FULL, BaseTuneConfig::full(), 1e-4),
        MethodSpec::new(HEAD, BaseTuneConfig::head_only(), 1e-2),
        MethodSpec::new(BITFIT, DeltaConfig::bitfit(), 5e-3),
        MethodSpec::new(LN_TUNING, DeltaConfig::layer_norm(), 5e-3),
    ]
}

/// `"full"`: full fine-tuning.
pub const FULL: MethodName = MethodName("full");
/// `"head"`: head only (linear probe).
pub const HEAD: MethodName = MethodName("head");
/// `"bitfit"`: biases only.
pub const BITFIT: MethodName = MethodName("bitfit");
/// `"ln-tuning"`: LayerNorm weights and biases only.
pub const LN_TUNING: MethodName = MethodName("ln-tuning");
