//! The `peft_type`s peft-adapters reads (one line each), on top of peft-core's.

use peft_core::adapter::ConfigRegistry;

/// peft-core's types plus this crate's.
pub fn registry() -> ConfigRegistry {
    ConfigRegistry::new()
        .with::<crate::bottleneck::BottleneckConfig>()
        .with::<crate::ia3::Ia3Config>()
        .with::<crate::prompt::PromptTuningConfig>()
        .with::<crate::prefix::PrefixTuningConfig>()
        .with::<crate::composition::CompositionConfig>()
        .with::<crate::invertible::InvertibleConfig>()
        .with::<crate::llm_adapter::LlmAdapterConfig>()
}
