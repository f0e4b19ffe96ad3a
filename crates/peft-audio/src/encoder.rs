//! The Whisper encoder over a short window, with a mean-pooled linear head ([`AudioClassifier`]).
//!
//! [`encode_window`] runs `peft_models::whisper::WhisperEncoder`'s layers unchanged on `[B, n_mels, T]` features
//! for any even `T` up to `2 · max_source_positions`, adding the first `T / 2` rows of `embed_positions` (the
//! positions a clip at the start of a 30 s window has). At `T = 3000` it is exactly `WhisperEncoder::forward`
//! (tested). Prompt tokens (prompt tuning) and key/value prefixes (prefix tuning) enter through the layers'
//! prefix sites as in the full encoder; the residual, linear and parameter sites are the encoder's own, so every
//! method attaches as it does to the 30 s model.

use std::path::Path;

use peft_core::io::{SafeTensorsFile, WhisperConfig};
use peft_core::nn::{Ctx, Module, PromptedSeq, Visitor};
use peft_core::{Error, Param, Tensor};
use peft_models::whisper::{WhisperClassifier, WhisperEncoder};

use crate::error::{AudioDataError, Result};

/// `last_hidden_state [B, T/2, d_model]` of `features [B, n_mels, T]` (`T` even, at most the encoder's input
/// frames), with the first `T / 2` positional embeddings.
///
/// # Errors
/// [`Error::Shape`] for another mel count, an odd `T` or `T` beyond `2 · max_source_positions`.
pub fn encode_window(enc: &WhisperEncoder, features: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
    let s = features.shape();
    let max = enc.input_frames();
    if s.len() != 3 || s[1] != enc.config.num_mel_bins || s[2] == 0 || !s[2].is_multiple_of(2) || s[2] > max {
        return Err(Error::Shape {
            op: "encode_window (even frames <= 2 * max_source_positions)",
            lhs: s.to_vec(),
            rhs: vec![s.first().copied().unwrap_or(0), enc.config.num_mel_bins, max],
        });
    }
    let positions = s[2] / 2;
    let h = enc.conv1.forward(features)?.gelu();
    let h = enc.conv2.forward(&h)?.gelu();
    let pos = enc.embed_positions.tensor().narrow(0, 0, positions)?;
    let h = h.permute(&[0, 2, 1])?.add(&pos)?;
    let mut seq = PromptedSeq::new(h, None);
    for layer in &enc.layers {
        seq.enter(&layer.attn.prefix, ctx)?;
        let h = layer.forward(seq.hidden(), None, ctx)?;
        seq.set_hidden(h)?;
    }
    enc.layer_norm.forward(&seq.finish()?)
}

/// Whisper encoder + frame-mean pooling + linear `classifier`, on fixed windows of `frames` mel frames.
#[derive(Clone)]
pub struct AudioClassifier {
    /// The encoder and the head (`classifier`).
    pub inner: WhisperClassifier,
    /// Mel frames per input window.
    pub frames: usize,
}

impl AudioClassifier {
    /// A fresh trainable head (seeded) for `num_labels` classes on `encoder`, for windows of `frames` frames.
    ///
    /// # Errors
    /// [`AudioDataError::InvalidConfig`] for an odd or too large `frames`; zero labels.
    pub fn new(encoder: WhisperEncoder, num_labels: usize, frames: usize, seed: u64) -> Result<Self> {
        if frames == 0 || !frames.is_multiple_of(2) || frames > encoder.input_frames() {
            return Err(AudioDataError::config(
                "AudioClassifier",
                "frames",
                format!("{frames}: need an even count in 2..={}", encoder.input_frames()),
            ));
        }
        Ok(AudioClassifier { inner: WhisperClassifier::new(encoder, num_labels, seed)?, frames })
    }

    /// Loads `config.json` and `model.safetensors` from a Whisper encoder folder and adds a fresh head.
    ///
    /// # Errors
    /// File, config and weight errors; as [`AudioClassifier::new`].
    pub fn load(dir: &Path, num_labels: usize, frames: usize, seed: u64) -> Result<Self> {
        let cfg = WhisperConfig::load(dir.join("config.json"))?;
        let enc = WhisperEncoder::load(&cfg, &SafeTensorsFile::open(dir.join("model.safetensors"))?)?;
        Self::new(enc, num_labels, frames, seed)
    }

    /// Hidden states `[B, frames/2, d_model]`.
    ///
    /// # Errors
    /// As [`encode_window`], plus a window of another length.
    pub fn encode(&self, features: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
        if features.shape().get(2) != Some(&self.frames) {
            return Err(Error::Shape {
                op: "AudioClassifier",
                lhs: features.shape().to_vec(),
                rhs: vec![0, self.inner.encoder.config.num_mel_bins, self.frames],
            });
        }
        encode_window(&self.inner.encoder, features, ctx)
    }

    /// Logits `[B, num_labels]`: the classifier on the frame mean of the hidden states.
    ///
    /// # Errors
    /// As [`AudioClassifier::encode`].
    pub fn logits(&self, features: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
        self.inner.head(&self.encode(features, ctx)?.mean(&[1], false)?, ctx)
    }

    /// The head's parameters (trainable under every method).
    pub fn head(&self) -> Vec<Param> {
        self.inner.classifier.base().params()
    }

    /// The module names the bench keeps trainable under every method: the `classifier` and the encoder's final
    /// `layer_norm` (PETL-AST trains the final LayerNorm with every method).
    pub const HEAD_MODULES: [&'static str; 2] = ["classifier", "layer_norm"];
}

impl Module for AudioClassifier {
    fn visit(&self, v: &mut dyn Visitor) {
        self.inner.visit(v);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};
    use peft_core::nn::RandomInit;

    /// A 2-layer Whisper-shaped encoder (d 8, 2 heads, 4 mels, 6 positions = 12 input frames).
    pub(crate) fn tiny_encoder(seed: u64) -> WhisperEncoder {
        let cfg = WhisperConfig {
            d_model: 8,
            encoder_layers: 2,
            encoder_attention_heads: 2,
            encoder_ffn_dim: 16,
            num_mel_bins: 4,
            max_source_positions: 6,
            activation_function: "gelu".into(),
            ..WhisperConfig::default()
        };
        WhisperEncoder::load(&cfg, &RandomInit::new(seed, 0.2)).expect("tiny encoder")
    }

    pub(crate) fn feats(b: usize, t: usize) -> Tensor {
        Tensor::new(ArrayD::from_shape_fn(IxDyn(&[b, 4, t]), |ix| {
            ((ix[0] * 7 + ix[1] * 3 + ix[2]) as f32 * 0.37).sin()
        }))
    }

    #[test]
    fn full_window_equals_the_whisper_encoder() -> peft_core::Result<()> {
        let enc = tiny_encoder(1);
        let x = feats(2, 12);
        let (a, b) = (enc.forward(&x, &Ctx::eval())?, encode_window(&enc, &x, &Ctx::eval())?);
        assert_eq!(a.as_slice(), b.as_slice());
        Ok(())
    }

    #[test]
    fn short_window_uses_the_first_positions() -> peft_core::Result<()> {
        let enc = tiny_encoder(2);
        let y = encode_window(&enc, &feats(3, 4), &Ctx::eval())?;
        assert_eq!(y.shape(), &[3, 2, 8]);
        // with one layer-free check: zeroing positional rows beyond the window changes nothing
        let enc2 = enc.clone();
        enc2.embed_positions.update(|w| w.slice_mut(ndarray::s![2.., ..]).fill(0.0));
        assert_eq!(encode_window(&enc2, &feats(3, 4), &Ctx::eval())?.as_slice(), y.as_slice());
        for bad in [3, 14, 0] {
            assert!(matches!(encode_window(&enc, &feats(1, bad), &Ctx::eval()), Err(Error::Shape { .. })), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn classifier_checks_its_window_and_pools() -> Result<()> {
        let m = AudioClassifier::new(tiny_encoder(3), 5, 4, 0)?;
        assert_eq!(m.logits(&feats(2, 4), &Ctx::eval())?.shape(), &[2, 5]);
        assert!(m.logits(&feats(2, 6), &Ctx::eval()).is_err());
        assert!(matches!(AudioClassifier::new(tiny_encoder(3), 5, 5, 0), Err(AudioDataError::InvalidConfig { .. })));
        assert!(matches!(AudioClassifier::new(tiny_encoder(3), 5, 14, 0), Err(AudioDataError::InvalidConfig { .. })));
        Ok(())
    }
}
