//! # peft-models
//!
//! Pretrained backbones assembled from the [`peft_core::nn`] layers: BERT/MiniLM, DINOv2 (ViT), the Whisper
//! encoder and LLaMA-style decoders (Hugging Face folders or GGUF files), with their tokenizers and image/audio
//! preprocessing. Parameters keep their checkpoint names, so adapter sites keep the names PEFT uses.
//!
//! The backbones live in their own crate (as candle keeps `candle-transformers` apart from `candle-core`): a
//! method crate such as `peft-lora` needs only the tensor, nn and adapter layers of `peft-core`, and does not
//! compile tokenizers, image codecs or WAV readers. Cargo features pick the preprocessing a user needs: `text`
//! (tokenizers), `image` (PNG/JPEG decode), `audio` (WAV reading); all on by default.

// Leaner feature sets leave some shared imports and helpers unused.
#![cfg_attr(
    not(all(feature = "text", feature = "image", feature = "audio", feature = "gguf")),
    allow(unused_imports, dead_code)
)]

pub mod audio;
pub mod bert;
pub mod error;
pub mod image_proc;
pub mod llama;
pub mod registry;
pub mod tokenizer;
pub mod vit;
pub mod whisper;

pub use error::{ImageProblem, ModelError};
