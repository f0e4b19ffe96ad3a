//! peft-audio: parameter-efficient transfer learning for audio transformers (the PETL-AST method set) on the
//! Whisper encoder.
//!
//! - [`dataset`]: labelled clip sets from a folder + CSV index (FSDD's `split.csv`, ESC-50's `meta/esc50.csv`)
//!   or Speech Commands' class folders + list files, with shipped splits and group (speaker / fold) hold-outs;
//! - [`features`]: WAV reading, band-limited (Kaiser-windowed sinc, polyphase) resampling to 16 kHz, Whisper's
//!   log-mel over a short fixed window, SpecAugment masking;
//! - [`encoder`]: the Whisper encoder on short windows (first `T/2` positional embeddings) with a mean-pooled
//!   linear head, [`encoder::AudioClassifier`], a [`peft_core::nn::Module`] exposing every adapter site;
//! - [`conformer`]: the Conformer convolution adapter of PETL-AST (a depthwise-convolution op with its own
//!   backward, BatchNorm with running statistics), a [`peft_core::adapter::TunerConfig`];
//! - [`mod@methods`]: the PETL-AST set (linear probe, full, BitFit, LoRA, Pfeiffer/Houlsby sequential and
//!   parallel, prompt, prefix, Conformer) as registry entries, and the parameter-budget sweep.
//!
//! Log-mel and WAV decoding live in `peft_models::audio` (shared with `cargo xtask embed`); this crate
//! re-exports what it uses.
//!
//! ```
//! use peft_audio::conformer::ConformerConfig;
//! use peft_audio::encoder::AudioClassifier;
//! use peft_core::adapter::PeftModel;
//! use peft_core::io::WhisperConfig;
//! use peft_core::nn::{Ctx, RandomInit};
//! use peft_core::Tensor;
//! use peft_models::whisper::WhisperEncoder;
//!
//! let cfg = WhisperConfig { d_model: 8, encoder_layers: 1, encoder_attention_heads: 2, encoder_ffn_dim: 16,
//!     num_mel_bins: 4, max_source_positions: 6, activation_function: "gelu".into(), ..WhisperConfig::default() };
//! let enc = WhisperEncoder::load(&cfg, &RandomInit::new(0, 0.1))?;
//! // 4-frame windows (2 encoder positions) instead of Whisper's full 12 here (3000 for the real model)
//! let model = AudioClassifier::new(enc, 3, 4, 0)?;
//! let x = Tensor::ones(&[2, 4, 4]);
//! let y0 = model.logits(&x, &Ctx::eval())?.to_vec();
//! let pm = PeftModel::new(model, ConformerConfig { kernel_size: 3, ..ConformerConfig::new(4.0) }, "default", 0)?;
//! assert_eq!(pm.logits(&x, &Ctx::eval())?.to_vec(), y0); // identity at init
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod conformer;
pub mod dataset;
pub mod encoder;
pub mod error;
pub mod features;
pub mod methods;

pub use error::{AudioDataError, Result};
pub use methods::methods;

/// The `peft_type`s this crate defines (for `PeftModel::from_pretrained`): `CONFORMER_ADAPTER`.
pub fn registry() -> peft_core::adapter::ConfigRegistry {
    peft_core::adapter::ConfigRegistry::new().with::<conformer::ConformerConfig>()
}
