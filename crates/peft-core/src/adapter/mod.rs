//! The adapter abstraction shared by method crates: target selection (PEFT rules) and
//! the method interface trainers use.

pub mod method;
pub mod target;

pub use method::{methods, BitFit, FullFineTune, HeadOnly, Method, Prepared};
pub use target::{layer_index, ModulePattern, PatternMap, TargetSpec};
