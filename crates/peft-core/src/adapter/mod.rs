//! The adapter abstraction shared by method crates: target selection (PEFT rules).

pub mod target;

pub use target::{layer_index, ModulePattern, PatternMap, TargetSpec};
