//! The `peft_type`s peft-lora reads: LoRA (incl. DoRA, PiSSA, OLoRA, CorDA/EVA-initialised adapters), PEFT's
//! POLY, and this crate's own types (HYDRA, MOS, MIXLORA, LOLDU, LORA_SB), one line each.

use peft_core::adapter::ConfigRegistry;

/// peft-core's types plus peft-lora's.
pub fn registry() -> ConfigRegistry {
    ConfigRegistry::new()
        .with::<crate::LoraConfig>()
        .with::<crate::hydra::HydraConfig>()
        .with::<crate::loldu::LolduConfig>()
        .with::<crate::lora_sb::LoraSbConfig>()
        .with::<crate::mixlora::MixLoraConfig>()
        .with::<crate::mos::MosConfig>()
        .with::<crate::poly::PolyConfig>()
}
