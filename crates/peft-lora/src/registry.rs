//! The `peft_type`s peft-lora reads: LoRA (incl. DoRA, PiSSA, OLoRA, CorDA/EVA-initialised adapters), and this
//! crate's own types (one line each).

use peft_core::adapter::ConfigRegistry;

/// peft-core's types plus peft-lora's.
pub fn registry() -> ConfigRegistry {
    ConfigRegistry::new().with::<crate::LoraConfig>()
    // MIGRATING: .with::<HydraConfig>() .with::<MosConfig>() .with::<MixLoraConfig>() .with::<PolyConfig>()
    // .with::<LolduConfig>() .with::<LoraSbConfig>()
}
