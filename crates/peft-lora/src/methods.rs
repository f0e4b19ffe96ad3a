//! The registry entries for trainers and the bench, one line each: `"lora"`, `"dora"`, `"pissa"`, `"lora-all"`
//! (LoRA on every linear site), `"allora"`, `"corda"`, `"eva"`, `"loldu"`, `"lora-sb"`, and the structured variants `"hydra"`,
//! `"mos"`, `"mixlora"`, `"poly"`.
//!
//! Learning rates: the LoRA paper trains RoBERTa-base on GLUE at 4e-4..5e-4 for 30-80 epochs (Hu et al., 2021,
//! Table 9). The registry defaults serve the bench's short budgets (about 60-200 steps on MiniLM-L6), where 5e-4
//! left LoRA at chance on SST-2 (50.9 dev accuracy after 63 steps) and 2.5e-3 reached 77.9, so LoRA and DoRA
//! (which uses the LoRA rate, Liu et al., 2024) default to 2.5e-3. PiSSA starts from the principal components, so
//! its updates move the dominant directions of `W` directly; it defaults to 1e-3 (2.5x below LoRA). CorDA starts
//! from principal (IPM) components like PiSSA and takes PiSSA's 1e-3; EVA trains as LoRA (2.5e-3). LoLDU trains
//! only `r` scalars per site and LoRA-SB only an `r × r` matrix per site, so they take a higher 1e-2 / 5e-3
//! (LoRA-XS-style methods train at higher rates than LoRA; not tuned). LoRA-SB needs calibration data. `lora-all`
//! adapts 6x the sites of the q,v recipe and takes 1e-3 (not tuned). These are measured choices for short runs, not
//! paper values: build a [`MethodSpec`] with another rate for long runs.
//!
//! The structured variants train on the bench's sequence classifier. Hydra uses its NLU recipe (both branches on
//! the FFN output dense, `r_p = 4`, `r_s = 8`, scale 1); MoS uses rank 8, α = 16 on the given targets with a
//! budget of 3 equivalent ranks (1 private) and 4 shards per vector (8/3 times fewer trainable parameters than
//! LoRA r = 8; the pool must hold the 28 distinct shards one module draws, so at least 4 adapted modules are
//! needed); MixLoRA uses the README example (8 experts, top-2, r = 8, α = 16, router std 0.02) on every
//! feed-forward block site with LoRA on the given attention targets, and its load-balancing loss reaches the
//! trainer through the tuner's `aux_loss` hook; Poly uses PEFT's defaults (r = 8, 4 skills, 1 split, LoRA scaling
//! 1/r) on the given targets and is registered single-task (`n_tasks = 1`, every row routed as task 0, as a
//! single-task trainer sets no [`peft_core::nn::TaskIds`]): it learns one soft mixture of its skills. The
//! learning rate is the bench's LoRA rate (2.5e-3) for all four: not tuned per method.

use peft_core::adapter::{MethodName, MethodSpec, ModulePattern};

use crate::allora::{AlloraConfig, AlloraLoraConfig};
use crate::config::{InitLoraWeights, LoraConfig};
use crate::corda::CordaLoraConfig;
use crate::eva::EvaLoraConfig;
use crate::hydra::HydraConfig;
use crate::loldu::LolduConfig;
use crate::lora_sb::LoraSbConfig;
use crate::mixlora::MixLoraConfig;
use crate::mos::MosConfig;
use crate::poly::PolyConfig;

/// `"lora"`.
pub const LORA: MethodName = MethodName("lora");
/// `"dora"`.
pub const DORA: MethodName = MethodName("dora");
/// `"pissa"`.
pub const PISSA: MethodName = MethodName("pissa");
/// `"lora-all"`.
pub const LORA_ALL: MethodName = MethodName("lora-all");
/// `"allora"`.
pub const ALLORA: MethodName = MethodName("allora");
/// `"corda"`.
pub const CORDA: MethodName = MethodName("corda");
/// `"eva"`.
pub const EVA: MethodName = MethodName("eva");
/// `"loldu"`.
pub const LOLDU: MethodName = MethodName("loldu");
/// `"lora-sb"`.
pub const LORA_SB: MethodName = MethodName("lora-sb");
/// `"hydra"`.
pub const HYDRA: MethodName = MethodName("hydra");
/// `"mos"`.
pub const MOS: MethodName = MethodName("mos");
/// `"mixlora"`.
pub const MIXLORA: MethodName = MethodName("mixlora");
/// `"poly"`.
pub const POLY: MethodName = MethodName("poly");

/// LoRA r=8, alpha=16 on `targets`.
pub fn lora<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> LoraConfig {
    LoraConfig::new(8, 16.0, targets)
}

/// DoRA r=8, alpha=16 on `targets`.
pub fn dora<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> LoraConfig {
    LoraConfig { use_dora: true, ..lora(targets) }
}

/// PiSSA r=8, alpha=8 (PEFT's PiSSA examples use `lora_alpha = r`) on `targets`.
pub fn pissa<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> LoraConfig {
    LoraConfig { init_lora_weights: InitLoraWeights::Named("pissa".into()), ..LoraConfig::new(8, 8.0, targets) }
}

/// LoRA r=8, alpha=16 on every linear site but the output layer (PEFT's `target_modules="all-linear"`, the QLoRA
/// paper's placement).
pub fn lora_all() -> LoraConfig {
    LoraConfig { target_modules: Some(ModulePattern::Regex("all-linear".into())), ..lora(Vec::<String>::new()) }
}

/// LoRA-SB r=8 on `targets`, η from a 200-step run at 5e-3 with 2% warm-up, 8 calibration batches.
pub fn lora_sb<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> LoraSbConfig {
    let mut c = LoraSbConfig::new(8, targets);
    c.lr = 5e-3;
    c.total_steps = 200;
    c.num_batches = 8;
    c
}

/// Hydra's NLU recipe: `r_p = 4`, `r_s = 8`, scale 1 on the FFN output dense of each layer (a regex: the list
/// entry `output.dense` would also match `attention.output.dense`).
pub fn hydra() -> HydraConfig {
    let mut c = HydraConfig::new(4, 8, Vec::<String>::new());
    c.target_modules = ModulePattern::Regex(r".*\.\d+\.output\.dense".into());
    c
}

/// The LoRA-family methods with targets `query,value` (BERT site names).
pub fn methods() -> Vec<MethodSpec> {
    methods_for(&["query", "value"])
}

/// The LoRA-family methods on the given target names.
pub fn methods_for(targets: &[&str]) -> Vec<MethodSpec> {
    let t = || targets.iter().map(|s| s.to_string());
    vec![
        MethodSpec::new(LORA, lora(t()), 2.5e-3),
        MethodSpec::new(DORA, dora(t()), 2.5e-3),
        MethodSpec::new(PISSA, pissa(t()), 1e-3),
        MethodSpec::new(LORA_ALL, lora_all(), 1e-3),
        MethodSpec::new(ALLORA, AlloraLoraConfig::new(8, t(), AlloraConfig::default()), 2.5e-3),
        MethodSpec::new(CORDA, CordaLoraConfig::new(LoraConfig::new(8, 8.0, t())), 1e-3),
        MethodSpec::new(EVA, EvaLoraConfig::new(LoraConfig::new(8, 16.0, t())), 2.5e-3),
        MethodSpec::new(LOLDU, LolduConfig::new(8, t()), 1e-2),
        MethodSpec::new(LORA_SB, lora_sb(t()), 5e-3),
        MethodSpec::new(HYDRA, hydra(), 2.5e-3),
        MethodSpec::new(MOS, MosConfig::new(8, 16.0, 3, 1, 4, t()), 2.5e-3),
        MethodSpec::new(MIXLORA, MixLoraConfig::new(t()), 2.5e-3),
        MethodSpec::new(POLY, PolyConfig::new(8, 1, 4, 1, t()), 2.5e-3),
    ]
}

#[cfg(test)]
#[path = "methods_tests.rs"]
mod tests;
