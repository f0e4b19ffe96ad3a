//! Pretrained model architectures assembled from the [`crate::nn`] layers, loading Hugging Face checkpoints (and
//! GGUF files where noted) under their checkpoint names so adapter sites keep the names PEFT uses.

pub mod audio;
pub mod bert;
pub mod image_proc;
pub mod llama;
pub mod registry;
pub mod tokenizer;
pub mod vit;
pub mod whisper;
