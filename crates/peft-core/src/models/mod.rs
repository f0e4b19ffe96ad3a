//! Model architectures built from the `nn` layers, loaded from Hugging Face checkpoints.

pub mod audio;
pub mod whisper;
