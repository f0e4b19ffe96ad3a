//! The registry entries for trainers and the bench, one line each: `"houlsby"`, `"seqbn"`, `"parallel"`,
//! `"adaptformer"` (bottleneck adapters on the residual sites), `"ia3"`, `"prompt"`, `"prefix"`, `"ptuning-v2"`,
//! and `"llm-series"` / `"llm-parallel"` (LLM-Adapters' bottlenecks on a LLaMA model's MLP projections, the
//! `cargo xtask bench --suite llm-adapters` methods; on a model without `gate_proj` / `up_proj` / `down_proj` they
//! fail to inject with a typed no-target error).
//!
//! Learning rates. Adapters are trained at 1e-4 (AdapterHub's recommendation, Pfeiffer et al.) to 1e-3 (Houlsby
//! et al. sweep 3e-5..3e-3) for several epochs; the bench's budgets are short (about 60-200 steps on MiniLM-L6),
//! where peft-lora measured LoRA's paper rate (5e-4) staying at chance and took 2.5e-3 instead. The series
//! bottleneck adapters here take 1e-3 (the up projection starts at zero like LoRA's B); AdaptFormer, whose output
//! is scaled by 0.1, takes LoRA's 2.5e-3 (not tuned). IA3 learns
//! one scale per channel: the IA3 paper (T-Few) trains at 3e-3 and PEFT's IA3 examples at 1e-2..3e-3; 1e-2 here.
//! Prompt tuning (Lester et al.: 0.3 with Adafactor) takes 3e-2, PEFT's prompt-tuning example rate; prefix
//! tuning and P-tuning v2 1e-2 (P-tuning v2's GLUE range 5e-3..1e-2). Measured on the bench (MiniLM-L6, SST-2,
//! 1,000 examples, 63 steps, one seed): `parallel` (scale 4, 889K parameters) and `prefix` (the MLP, 1.9M
//! parameters) stayed at chance (50.9) at 2.5e-3 / 1e-2 and reached 76.1 / 75.6 at 1e-3, so both take 1e-3 (Li &
//! Liang train the MLP at 5e-5..8e-5 for many epochs). The others are not tuned: build a [`MethodSpec`] with
//! another rate for long runs.
//!
//! Composition blocks (`"fusion"`, `"fusion-static"`, `"average"`, `"scalearn"`, `"scalearn-uniform"`,
//! `"scalearn-pp"`, `"scalearn-uniform-pp"`) come from [`composition_methods`] with the names of their source
//! adapters; [`methods`] lists them with no sources (inject refuses that with a typed error), for a harness that
//! fills them in (`cargo xtask bench` trains SeqBn source adapters on other GLUE tasks and names them). Rates, not
//! tuned: fusion 1e-3 (its query and key start near zero, as the bottleneck adapters' up projections do);
//! ScaLearn 5e-3 (its few scales start at 2/N); average 1e-3 (only the task head trains).

use peft_core::adapter::{MethodName, MethodSpec};

use crate::bottleneck::BottleneckConfig;
use crate::composition::CompositionConfig;
use crate::ia3::Ia3Config;
use crate::llm_adapter::LlmAdapterConfig;
use crate::prefix::PrefixTuningConfig;
use crate::prompt::PromptTuningConfig;

/// `"houlsby"`.
pub const HOULSBY: MethodName = MethodName("houlsby");
/// `"seqbn"`.
pub const SEQBN: MethodName = MethodName("seqbn");
/// `"parallel"`.
pub const PARALLEL: MethodName = MethodName("parallel");
/// `"adaptformer"`.
pub const ADAPTFORMER: MethodName = MethodName("adaptformer");
/// `"ia3"`.
pub const IA3: MethodName = MethodName("ia3");
/// `"prompt"`.
pub const PROMPT: MethodName = MethodName("prompt");
/// `"prefix"`.
pub const PREFIX: MethodName = MethodName("prefix");
/// `"ptuning-v2"`.
pub const PTUNING_V2: MethodName = MethodName("ptuning-v2");

/// `"llm-series"`.
pub const LLM_SERIES: MethodName = MethodName("llm-series");
/// `"llm-parallel"`.
pub const LLM_PARALLEL: MethodName = MethodName("llm-parallel");

/// `"fusion"`.
pub const FUSION: MethodName = MethodName("fusion");
/// `"fusion-static"`.
pub const FUSION_STATIC: MethodName = MethodName("fusion-static");
/// `"average"`.
pub const AVERAGE: MethodName = MethodName("average");
/// `"scalearn"`.
pub const SCALEARN: MethodName = MethodName("scalearn");
/// `"scalearn-uniform"`.
pub const SCALEARN_UNIFORM: MethodName = MethodName("scalearn-uniform");
/// `"scalearn-pp"`.
pub const SCALEARN_PP: MethodName = MethodName("scalearn-pp");
/// `"scalearn-uniform-pp"`.
pub const SCALEARN_UNIFORM_PP: MethodName = MethodName("scalearn-uniform-pp");

/// Bottleneck width of `"llm-series"` on SmolLM2-135M's 576-wide stream (LLM-Adapters' 256 is for LLaMA-7B's
/// 4096; 32 keeps the parameter count near LoRA r = 8 on q, k, v, up, down: 2.2M vs 1.7M).
pub const LLM_SERIES_WIDTH: usize = 32;
/// Bottleneck width of `"llm-parallel"` (16: on up and down, 576 <-> 1536, 2.0M parameters on SmolLM2-135M).
pub const LLM_PARALLEL_WIDTH: usize = 16;
/// Learning rate of the LLM-Adapters entries: LLM-Adapters trains every method at 3e-4 for 3 epochs of
/// math_10k; the suite's budget is 120 steps, where LoRA takes the same 1e-3 (not tuned).
pub const LLM_LR: f64 = 1e-3;

/// The composition blocks over source adapters `sources` (see the module docs).
pub fn composition_methods(sources: &[&str]) -> Vec<MethodSpec> {
    vec![
        MethodSpec::new(FUSION, CompositionConfig::fuse(sources), 1e-3),
        MethodSpec::new(FUSION_STATIC, CompositionConfig::fuse_static(sources), 1e-3),
        MethodSpec::new(AVERAGE, CompositionConfig::average(sources, None), 1e-3),
        MethodSpec::new(SCALEARN, CompositionConfig::scalearn(sources), 5e-3),
        MethodSpec::new(SCALEARN_UNIFORM, CompositionConfig::scalearn_uniform(sources), 5e-3),
        MethodSpec::new(SCALEARN_PP, CompositionConfig::scalearn_pp(sources), 5e-3),
        MethodSpec::new(SCALEARN_UNIFORM_PP, CompositionConfig::scalearn_uniform_pp(sources), 5e-3),
    ]
}

/// The methods of this crate, ready to train (the composition blocks without sources: see the module docs).
pub fn methods() -> Vec<MethodSpec> {
    let mut v = vec![
        MethodSpec::new(HOULSBY, BottleneckConfig::houlsby(), 1e-3),
        MethodSpec::new(SEQBN, BottleneckConfig::seq_bn(), 1e-3),
        MethodSpec::new(PARALLEL, BottleneckConfig::parallel(), 1e-3),
        MethodSpec::new(ADAPTFORMER, BottleneckConfig::adaptformer(), 2.5e-3),
        MethodSpec::new(IA3, Ia3Config::bert(), 1e-2),
        MethodSpec::new(PROMPT, PromptTuningConfig::new(20), 3e-2),
        MethodSpec::new(PREFIX, PrefixTuningConfig::prefix(20), 1e-3),
        MethodSpec::new(PTUNING_V2, PrefixTuningConfig::p_tuning_v2(20), 1e-2),
        MethodSpec::new(LLM_SERIES, LlmAdapterConfig::llama_series(LLM_SERIES_WIDTH), LLM_LR),
        MethodSpec::new(LLM_PARALLEL, LlmAdapterConfig::llama_parallel(LLM_PARALLEL_WIDTH), LLM_LR),
    ];
    v.extend(composition_methods(&[]));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::adapter::duplicate_name;

    #[test]
    fn names_are_unique_and_configs_valid() {
        let m = methods();
        assert_eq!(duplicate_name(&m), None);
        for s in &m {
            assert!(s.lr > 0.0 && s.lr < 0.1, "{}: lr {}", s.name, s.lr);
            assert!(!s.describe().is_empty());
        }
    }
}
