//! The Whisper audio encoder (transformers `WhisperEncoder`) and a mean-pooled classification head.
//!
//! `input_features [B, n_mels, 3000]` -> `conv1` (k3, p1) + GELU -> `conv2` (k3, stride 2, p1) + GELU ->
//! `[B, 1500, d_model]` + `embed_positions` -> pre-LN encoder layers (k_proj without bias) -> `layer_norm`.
//! Tensor names are transformers' (`conv1.weight`, `layers.0.self_attn.q_proj.weight`, ...), optionally under an
//! `encoder.` or `model.encoder.` prefix, which [`WhisperEncoder::load`] detects.

use peft_core::error::{Error, Result};
use peft_core::io::hf_config::WhisperConfig;
use peft_core::nn::{
    Activation, Ctx, EncoderConfig, EncoderLayer, EncoderNames, LayerNorm, Linear, Module, NormPlacement, PromptedSeq,
    RandomInit, Visitor, WeightSource,
};
use peft_core::param::Param;
use peft_core::tensor::Tensor;

/// Prefixes under which a checkpoint may store the encoder, tried in this order.
pub const ENCODER_PREFIXES: [&str; 3] = ["", "encoder", "model.encoder"];

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A 1-d convolution with `<path>.weight [out, in, k]` and `<path>.bias [out]`.
#[derive(Clone)]
pub struct Conv1d {
    /// Kernel `[out, in, k]`.
    pub weight: Param,
    /// Bias `[out]`.
    pub bias: Param,
    /// Stride.
    pub stride: usize,
    /// Zero padding on both ends.
    pub padding: usize,
}

impl Conv1d {
    /// Loads `<path>.weight` and `<path>.bias` (frozen).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn load(path: &str, shape: [usize; 3], stride: usize, padding: usize, src: &dyn WeightSource) -> Result<Self> {
        let (w, b) = (join(path, "weight"), join(path, "bias"));
        Ok(Conv1d {
            weight: Param::new(w.clone(), src.get(&w, &shape)?, false),
            bias: Param::new(b.clone(), src.get_or(&b, &[shape[0]], 0.0)?, false),
            stride,
            padding,
        })
    }

    /// Applies the convolution to `x [B, in, L]`.
    ///
    /// # Errors
    /// Shape errors.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv1d(&self.weight.tensor(), Some(&self.bias.tensor()), self.stride, self.padding)
    }
}

impl Module for Conv1d {
    fn visit(&self, v: &mut dyn Visitor) {
        v.param(&self.weight);
        v.param(&self.bias);
    }
}

/// The Whisper encoder.
#[derive(Clone)]
pub struct WhisperEncoder {
    /// `conv1`: n_mels -> d_model, k3, p1.
    pub conv1: Conv1d,
    /// `conv2`: d_model -> d_model, k3, stride 2, p1.
    pub conv2: Conv1d,
    /// `embed_positions.weight [max_source_positions, d_model]` (sinusoidal, stored).
    pub embed_positions: Param,
    /// Encoder layers (`layers.N`).
    pub layers: Vec<EncoderLayer>,
    /// Final `layer_norm`.
    pub layer_norm: LayerNorm,
    /// The config it was built from.
    pub config: WhisperConfig,
    /// The checkpoint prefix the tensors were found under (`""`, `"encoder"` or `"model.encoder"`).
    pub prefix: String,
}

impl WhisperEncoder {
    /// Builds the encoder from `cfg` with tensors from `src` (transformers names, prefix detected from
    /// [`ENCODER_PREFIXES`] by looking for `conv1.weight`). Parameters start frozen.
    ///
    /// # Errors
    /// Missing or mis-shaped tensors; an unsupported `activation_function`; `d_model` not divisible by the heads.
    pub fn load(cfg: &WhisperConfig, src: &dyn WeightSource) -> Result<Self> {
        let prefix = ENCODER_PREFIXES
            .iter()
            .find(|p| src.contains(&join(p, "conv1.weight")))
            .ok_or_else(|| Error::UnknownName { name: "conv1.weight (also tried encoder., model.encoder.)".into() })?;
        let p = |n: &str| join(prefix, n);
        let (d, heads) = (cfg.d_model, cfg.encoder_attention_heads);
        if heads == 0 || d % heads != 0 {
            crate::error::fail!(crate::ModelError::Config {
                model: "WhisperEncoder",
                field: "d_model",
                value: d.to_string(),
                reason: "must be a positive multiple of encoder_attention_heads",
            });
        }
        let layer_cfg = EncoderConfig {
            hidden: d,
            heads,
            intermediate: cfg.encoder_ffn_dim,
            act: Activation::from_hf(&cfg.activation_function)?,
            eps: 1e-5,
            norm: NormPlacement::Pre,
            k_bias: false,
            dropout: cfg.dropout,
        };
        let layers = (0..cfg.encoder_layers)
            .map(|i| EncoderLayer::load(&p(&format!("layers.{i}")), &EncoderNames::WHISPER, &layer_cfg, src))
            .collect::<Result<Vec<_>>>()?;
        let pos = p("embed_positions.weight");
        Ok(WhisperEncoder {
            conv1: Conv1d::load(&p("conv1"), [d, cfg.num_mel_bins, 3], 1, 1, src)?,
            conv2: Conv1d::load(&p("conv2"), [d, d, 3], 2, 1, src)?,
            embed_positions: Param::new(pos.clone(), src.get(&pos, &[cfg.max_source_positions, d])?, false),
            layers,
            layer_norm: LayerNorm::load(&p("layer_norm"), d, 1e-5, src)?,
            config: cfg.clone(),
            prefix: prefix.to_string(),
        })
    }

    /// The number of input frames the encoder requires (`2 * max_source_positions`, 3000 for 30 s).
    pub fn input_frames(&self) -> usize {
        2 * self.config.max_source_positions
    }

    /// `last_hidden_state [B, max_source_positions, d_model]` for `features [B, n_mels, 2 * max_source_positions]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for features of another shape (Whisper needs exactly 3000 frames, like transformers).
    pub fn forward(&self, features: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let s = features.shape();
        let want = [s.first().copied().unwrap_or(0), self.config.num_mel_bins, self.input_frames()];
        if s.len() != 3 || s[1..] != want[1..] {
            return Err(Error::Shape { op: "WhisperEncoder", lhs: s.to_vec(), rhs: want.to_vec() });
        }
        let h = self.conv1.forward(features)?.gelu();
        let h = self.conv2.forward(&h)?.gelu();
        let h = h.permute(&[0, 2, 1])?.add(&self.embed_positions.tensor())?;
        let mut seq = PromptedSeq::new(h, None);
        for layer in &self.layers {
            seq.enter(&layer.attn.prefix, ctx)?;
            let h = layer.forward(seq.hidden(), None, ctx)?;
            seq.set_hidden(h)?;
        }
        self.layer_norm.forward(&seq.finish()?)
    }

    /// The encoder output averaged over frames, `[B, d_model]`.
    ///
    /// # Errors
    /// As [`WhisperEncoder::forward`].
    pub fn pooled(&self, features: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.forward(features, ctx)?.mean(&[1], false)
    }
}

impl Module for WhisperEncoder {
    fn visit(&self, v: &mut dyn Visitor) {
        self.conv1.visit(v);
        self.conv2.visit(v);
        v.param(&self.embed_positions);
        for l in &self.layers {
            l.visit(v);
        }
        self.layer_norm.visit(v);
    }
}

/// The encoder plus a linear `classifier` on the frame-averaged encoder output.
#[derive(Clone)]
pub struct WhisperClassifier {
    /// The encoder.
    pub encoder: WhisperEncoder,
    /// `classifier`: d_model -> num_labels (the model's output layer).
    pub classifier: Linear,
}

impl WhisperClassifier {
    /// A fresh, trainable head (normal(0, `init_std`) weight, zero bias, seeded) on `encoder`.
    ///
    /// # Errors
    /// [`crate::ModelError::Config`] for zero labels.
    pub fn new(encoder: WhisperEncoder, num_labels: usize, seed: u64) -> Result<Self> {
        if num_labels == 0 {
            crate::error::fail!(crate::ModelError::Config {
                model: "WhisperClassifier",
                field: "num_labels",
                value: 0.to_string(),
                reason: "must be positive"
            });
        }
        let init = RandomInit::new(seed, encoder.config.init_std as f32);
        let classifier = Linear::load("classifier", encoder.config.d_model, num_labels, true, &init)?.as_output();
        for p in classifier.base().params() {
            p.set_trainable(true);
        }
        Ok(WhisperClassifier { encoder, classifier })
    }

    /// Loads encoder and `classifier.{weight,bias}` from `src` (frozen, like every loaded parameter).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn load(cfg: &WhisperConfig, num_labels: usize, src: &dyn WeightSource) -> Result<Self> {
        let encoder = WhisperEncoder::load(cfg, src)?;
        let classifier = Linear::load("classifier", cfg.d_model, num_labels, true, src)?.as_output();
        Ok(WhisperClassifier { encoder, classifier })
    }

    /// Logits `[B, num_labels]` from pooled encoder output `[B, d_model]` (lets head-only training cache the
    /// frozen encoder's output).
    ///
    /// # Errors
    /// Shape errors.
    pub fn head(&self, pooled: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.classifier.forward(pooled, ctx)
    }

    /// Logits `[B, num_labels]` for `features [B, n_mels, 3000]`.
    ///
    /// # Errors
    /// As [`WhisperEncoder::forward`].
    pub fn forward(&self, features: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.head(&self.encoder.pooled(features, ctx)?, ctx)
    }
}

impl Module for WhisperClassifier {
    fn visit(&self, v: &mut dyn Visitor) {
        self.encoder.visit(v);
        self.classifier.visit(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};
    use peft_core::nn::{named_params, MapWeights};

    fn tiny_cfg() -> WhisperConfig {
        WhisperConfig {
            d_model: 8,
            encoder_layers: 2,
            encoder_attention_heads: 2,
            encoder_ffn_dim: 16,
            num_mel_bins: 4,
            max_source_positions: 6,
            activation_function: "gelu".into(),
            ..WhisperConfig::default()
        }
    }

    #[test]
    fn random_encoder_maps_features_to_half_length_hidden_states() -> Result<()> {
        let enc = WhisperEncoder::load(&tiny_cfg(), &RandomInit::new(1, 0.1))?;
        assert_eq!(enc.prefix, "");
        let y = enc.forward(&Tensor::ones(&[2, 4, 12]), &Ctx::eval())?;
        assert_eq!(y.shape(), &[2, 6, 8]);
        assert!(y.as_slice().iter().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn wrong_frame_count_is_a_shape_error() -> Result<()> {
        let enc = WhisperEncoder::load(&tiny_cfg(), &RandomInit::new(1, 0.1))?;
        let e = enc.forward(&Tensor::ones(&[1, 4, 10]), &Ctx::eval());
        assert!(matches!(e, Err(Error::Shape { op: "WhisperEncoder", .. })));
        Ok(())
    }

    #[test]
    fn prefixed_checkpoint_names_are_detected() -> Result<()> {
        let cfg = tiny_cfg();
        let plain = WhisperEncoder::load(&cfg, &RandomInit::new(2, 0.1))?;
        let map: std::collections::HashMap<String, ArrayD<f32>> = named_params(&plain)
            .into_iter()
            .map(|p| (format!("model.encoder.{}", p.name()), p.value().to_owned()))
            .collect();
        let enc = WhisperEncoder::load(&cfg, &MapWeights(map))?;
        assert_eq!(enc.prefix, "model.encoder");
        let x = Tensor::new(ArrayD::from_shape_fn(IxDyn(&[1, 4, 12]), |ix| (ix[1] * 12 + ix[2]) as f32 * 0.1));
        let (a, b) = (plain.forward(&x, &Ctx::eval())?, enc.forward(&x, &Ctx::eval())?);
        assert_eq!(a.as_slice(), b.as_slice());
        Ok(())
    }

    #[test]
    fn missing_conv_is_reported_by_name() {
        let e = WhisperEncoder::load(&tiny_cfg(), &MapWeights::default());
        assert!(matches!(e, Err(Error::UnknownName { .. })));
    }

    #[test]
    fn fresh_head_is_trainable_and_encoder_frozen() -> Result<()> {
        let enc = WhisperEncoder::load(&tiny_cfg(), &RandomInit::new(3, 0.1))?;
        let m = WhisperClassifier::new(enc, 3, 0)?;
        let trainable: Vec<String> =
            named_params(&m).into_iter().filter(|p| p.trainable()).map(|p| p.name().to_string()).collect();
        assert_eq!(trainable, ["classifier.weight", "classifier.bias"]);
        let y = m.forward(&Tensor::ones(&[2, 4, 12]), &Ctx::eval())?;
        assert_eq!(y.shape(), &[2, 3]);
        assert!(WhisperClassifier::new(m.encoder.clone(), 0, 0).is_err());
        Ok(())
    }
}
