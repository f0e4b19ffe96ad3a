//! The registry entries of this crate, one line each: `"vpt-shallow"` and `"vpt-deep"` (VPT's default of 10
//! prompt tokens for DINOv2-S-sized models is not fixed by the paper, which sweeps 1-200 per task; 10 here).
//!
//! Learning rate: VPT trains prompts with SGD at large rates (the paper's grid reaches 50 with a linear head);
//! with AdamW the prompts move like any other parameter, and 1e-2 (prompt tuning's 3e-2 scaled down for the
//! deeper stack) is used, untuned. Build a [`MethodSpec`] with another rate for long runs.

use peft_core::adapter::{ConfigRegistry, MethodName, MethodSpec};

use crate::vpt::VptConfig;

/// `"vpt-shallow"`.
pub const VPT_SHALLOW: MethodName = MethodName("vpt-shallow");
/// `"vpt-deep"`.
pub const VPT_DEEP: MethodName = MethodName("vpt-deep");

/// The methods of this crate, ready to train.
pub fn methods() -> Vec<MethodSpec> {
    vec![
        MethodSpec::new(VPT_SHALLOW, VptConfig::shallow(10), 1e-2),
        MethodSpec::new(VPT_DEEP, VptConfig::deep(10), 1e-2),
    ]
}

/// The `peft_type`s this crate loads from files (`"VPT"`).
pub fn registry() -> ConfigRegistry {
    ConfigRegistry::new().with::<VptConfig>()
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
            assert!(s.describe().starts_with("VPT-"), "{}", s.describe());
        }
        assert!(registry().peft_types().contains(&"VPT"));
    }
}
