//! Hugging Face `config.json` for the architectures peft-rs builds: BERT, DINOv2, Whisper (encoder) and LLaMA.
//!
//! Each struct mirrors the transformers configuration class field by field, with the same defaults
//! (`BertConfig`, `Dinov2Config`, `WhisperConfig`, `LlamaConfig` in transformers), so a config that omits a key
//! means what it means in Python. Unknown keys are tolerated and kept in `extra`. [`ArchConfig`] picks the
//! architecture from `model_type` (or, failing that, `architectures`), and parsing validates the few invariants
//! the models rely on (head counts dividing widths), reporting violations as [`IoError::InvalidConfig`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{IoError, IoResult};

/// Path reported in errors for configs parsed from a string.
const INLINE: &str = "<inline config.json>";

/// A token id field that transformers allows to be one id or a list (e.g. `eos_token_id: [128001, 128009]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(i64),
    /// Several ids.
    Many(Vec<i64>),
}

impl TokenIds {
    /// The ids as a slice.
    pub fn as_slice(&self) -> &[i64] {
        match self {
            TokenIds::One(x) => std::slice::from_ref(x),
            TokenIds::Many(v) => v,
        }
    }
}

/// transformers `BertConfig` (e.g. sentence-transformers/all-MiniLM-L6-v2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)] // fields are transformers' own, documented there
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<i64>,
    pub position_embedding_type: String,
    pub classifier_dropout: Option<f64>,
    pub model_type: String,
    pub architectures: Vec<String>,
    pub torch_dtype: Option<String>,
    /// Keys this struct does not model, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for BertConfig {
    fn default() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
            position_embedding_type: "absolute".into(),
            classifier_dropout: None,
            model_type: "bert".into(),
            architectures: Vec::new(),
            torch_dtype: None,
            extra: BTreeMap::new(),
        }
    }
}

impl BertConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// transformers `Dinov2Config` (ViT backbone with layer scale).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub mlp_ratio: f64,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
    pub layerscale_value: f64,
    pub drop_path_rate: f64,
    pub use_swiglu_ffn: bool,
    pub apply_layernorm: bool,
    pub reshape_hidden_states: bool,
    pub use_mask_token: bool,
    pub model_type: String,
    pub architectures: Vec<String>,
    pub torch_dtype: Option<String>,
    /// Keys this struct does not model, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for Dinov2Config {
    fn default() -> Self {
        Dinov2Config {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-6,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            qkv_bias: true,
            layerscale_value: 1.0,
            drop_path_rate: 0.0,
            use_swiglu_ffn: false,
            apply_layernorm: true,
            reshape_hidden_states: true,
            use_mask_token: true,
            model_type: "dinov2".into(),
            architectures: Vec::new(),
            torch_dtype: None,
            extra: BTreeMap::new(),
        }
    }
}

impl Dinov2Config {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Hidden width of the feed-forward block, as transformers computes it: `int(hidden_size * mlp_ratio)`, and
    /// for SwiGLU `(int(h * 2 / 3) + 7) // 8 * 8` of that.
    pub fn intermediate_size(&self) -> usize {
        let h = (self.hidden_size as f64 * self.mlp_ratio) as usize;
        if self.use_swiglu_ffn {
            (h * 2 / 3).div_ceil(8) * 8
        } else {
            h
        }
    }

    /// Patches per side at the configured `image_size`.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// transformers `WhisperConfig` (peft-rs uses the encoder; decoder fields are kept for completeness).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct WhisperConfig {
    pub vocab_size: usize,
    pub num_mel_bins: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_layers: usize,
    pub decoder_attention_heads: usize,
    pub decoder_ffn_dim: usize,
    pub encoder_ffn_dim: usize,
    pub encoder_layerdrop: f64,
    pub decoder_layerdrop: f64,
    pub decoder_start_token_id: Option<i64>,
    pub use_cache: bool,
    pub is_encoder_decoder: bool,
    pub activation_function: String,
    pub d_model: usize,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub activation_dropout: f64,
    pub init_std: f64,
    pub scale_embedding: bool,
    pub max_source_positions: usize,
    pub max_target_positions: usize,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub model_type: String,
    pub architectures: Vec<String>,
    pub torch_dtype: Option<String>,
    /// Keys this struct does not model, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for WhisperConfig {
    fn default() -> Self {
        WhisperConfig {
            vocab_size: 51865,
            num_mel_bins: 80,
            encoder_layers: 4,
            encoder_attention_heads: 6,
            decoder_layers: 4,
            decoder_attention_heads: 6,
            decoder_ffn_dim: 1536,
            encoder_ffn_dim: 1536,
            encoder_layerdrop: 0.0,
            decoder_layerdrop: 0.0,
            decoder_start_token_id: Some(50257),
            use_cache: true,
            is_encoder_decoder: true,
            activation_function: "gelu".into(),
            d_model: 384,
            dropout: 0.0,
            attention_dropout: 0.0,
            activation_dropout: 0.0,
            init_std: 0.02,
            scale_embedding: false,
            max_source_positions: 1500,
            max_target_positions: 448,
            pad_token_id: Some(50256),
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
            model_type: "whisper".into(),
            architectures: Vec::new(),
            torch_dtype: None,
            extra: BTreeMap::new(),
        }
    }
}

impl WhisperConfig {
    /// Width of one encoder attention head.
    pub fn encoder_head_dim(&self) -> usize {
        self.d_model / self.encoder_attention_heads
    }
}

/// transformers `LlamaConfig` (also SmolLM2 and other LLaMA-architecture models).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None` means multi-head attention (as many KV heads as query heads); see [`LlamaConfig::num_kv_heads`].
    pub num_key_value_heads: Option<usize>,
    /// `None` means `hidden_size / num_attention_heads`; see [`LlamaConfig::head_dim`].
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub initializer_range: f64,
    pub rms_norm_eps: f64,
    pub use_cache: bool,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub pretraining_tp: usize,
    pub tie_word_embeddings: bool,
    /// `None` when absent; transformers >= 5 may move it into `rope_parameters`. See [`LlamaConfig::rope_theta`].
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub mlp_bias: bool,
    pub model_type: String,
    pub architectures: Vec<String>,
    pub torch_dtype: Option<String>,
    /// Keys this struct does not model, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        LlamaConfig {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            use_cache: true,
            pad_token_id: None,
            bos_token_id: Some(TokenIds::One(1)),
            eos_token_id: Some(TokenIds::One(2)),
            pretraining_tp: 1,
            tie_word_embeddings: false,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            attention_bias: false,
            attention_dropout: 0.0,
            mlp_bias: false,
            model_type: "llama".into(),
            architectures: Vec::new(),
            torch_dtype: None,
            extra: BTreeMap::new(),
        }
    }
}

impl LlamaConfig {
    /// Number of key/value heads (grouped-query attention), defaulting to `num_attention_heads`.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head, defaulting to `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE base: `rope_theta`, else `rope_parameters.rope_theta`, else transformers' default 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64()).unwrap_or(10000.0)
    }
}

/// A parsed `config.json` of one of the supported architectures.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ArchConfig {
    /// `model_type: "bert"`.
    Bert(BertConfig),
    /// `model_type: "dinov2"`.
    Dinov2(Dinov2Config),
    /// `model_type: "whisper"`.
    Whisper(WhisperConfig),
    /// `model_type: "llama"`.
    Llama(LlamaConfig),
}

impl ArchConfig {
    /// Reads and parses a `config.json` file.
    ///
    /// # Errors
    /// [`IoError::NotFound`] / [`IoError::Io`] reading the file, plus the errors of [`ArchConfig::from_json`].
    pub fn load(path: impl AsRef<Path>) -> IoResult<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| IoError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses a `config.json` held in a string.
    ///
    /// ```
    /// use peft_core::io::ArchConfig;
    /// let cfg = ArchConfig::from_json(r#"{"model_type": "bert", "hidden_size": 384, "num_attention_heads": 12}"#)?;
    /// let ArchConfig::Bert(bert) = cfg else { unreachable!() };
    /// assert_eq!((bert.hidden_size, bert.num_hidden_layers, bert.layer_norm_eps), (384, 12, 1e-12));
    /// # Ok::<(), peft_core::io::IoError>(())
    /// ```
    ///
    /// # Errors
    /// [`IoError::Json`] for invalid JSON or a field of the wrong type; [`IoError::UnknownArchitecture`] when
    /// neither `model_type` nor `architectures` names a supported architecture; [`IoError::InvalidConfig`] for
    /// inconsistent values.
    pub fn from_json(json: &str) -> IoResult<Self> {
        Self::parse(json, Path::new(INLINE))
    }

    fn parse(text: &str, path: &Path) -> IoResult<Self> {
        let json_err = |source| IoError::Json { path: path.to_path_buf(), source };
        let root: Value = serde_json::from_str(text).map_err(json_err)?;
        let model_type = root.get("model_type").and_then(Value::as_str).map(str::to_string);
        let architectures: Vec<String> = root
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        let from_arch = |prefix: &str| architectures.iter().any(|a| a.starts_with(prefix));
        let kind = match model_type.as_deref() {
            Some(t @ ("bert" | "dinov2" | "whisper" | "llama")) => t,
            _ if from_arch("Bert") => "bert",
            _ if from_arch("Dinov2") => "dinov2",
            _ if from_arch("Whisper") => "whisper",
            _ if from_arch("Llama") => "llama",
            _ => return Err(IoError::UnknownArchitecture { path: path.to_path_buf(), model_type, architectures }),
        };
        Ok(match kind {
            "bert" => ArchConfig::Bert(parse_config(text, path)?),
            "dinov2" => ArchConfig::Dinov2(parse_config(text, path)?),
            "whisper" => ArchConfig::Whisper(parse_config(text, path)?),
            _ => ArchConfig::Llama(parse_config(text, path)?),
        })
    }

    /// The architecture's `model_type` string.
    pub fn model_type(&self) -> &'static str {
        match self {
            ArchConfig::Bert(_) => "bert",
            ArchConfig::Dinov2(_) => "dinov2",
            ArchConfig::Whisper(_) => "whisper",
            ArchConfig::Llama(_) => "llama",
        }
    }

    /// Model width (`hidden_size`, or `d_model` for Whisper).
    pub fn hidden_size(&self) -> usize {
        match self {
            ArchConfig::Bert(c) => c.hidden_size,
            ArchConfig::Dinov2(c) => c.hidden_size,
            ArchConfig::Whisper(c) => c.d_model,
            ArchConfig::Llama(c) => c.hidden_size,
        }
    }

    /// Number of transformer blocks (the encoder's, for Whisper).
    pub fn num_layers(&self) -> usize {
        match self {
            ArchConfig::Bert(c) => c.num_hidden_layers,
            ArchConfig::Dinov2(c) => c.num_hidden_layers,
            ArchConfig::Whisper(c) => c.encoder_layers,
            ArchConfig::Llama(c) => c.num_hidden_layers,
        }
    }
}

/// Consistency checks run after parsing.
trait Validate {
    fn validate(&self, path: &Path) -> IoResult<()>;
}

fn invalid(path: &Path, field: &'static str, reason: String) -> IoError {
    IoError::InvalidConfig { path: path.to_path_buf(), field, reason }
}

/// `heads` must be non-zero and divide `width`.
fn check_heads(path: &Path, field: &'static str, heads: usize, width_name: &str, width: usize) -> IoResult<()> {
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(invalid(path, field, format!("{heads} heads do not divide {width_name} {width}")));
    }
    Ok(())
}

impl Validate for BertConfig {
    fn validate(&self, path: &Path) -> IoResult<()> {
        check_heads(path, "num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)
    }
}

impl Validate for Dinov2Config {
    fn validate(&self, path: &Path) -> IoResult<()> {
        check_heads(path, "num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)?;
        if self.patch_size == 0 || self.patch_size > self.image_size {
            return Err(invalid(
                path,
                "patch_size",
                format!("{} with image_size {}", self.patch_size, self.image_size),
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) {
            return Err(invalid(path, "mlp_ratio", format!("{} is not a positive number", self.mlp_ratio)));
        }
        Ok(())
    }
}

impl Validate for WhisperConfig {
    fn validate(&self, path: &Path) -> IoResult<()> {
        check_heads(path, "encoder_attention_heads", self.encoder_attention_heads, "d_model", self.d_model)
    }
}

impl Validate for LlamaConfig {
    fn validate(&self, path: &Path) -> IoResult<()> {
        if self.head_dim.is_none() {
            check_heads(path, "num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)?;
        } else if self.num_attention_heads == 0 {
            return Err(invalid(path, "num_attention_heads", "must be positive".into()));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(invalid(
                path,
                "num_key_value_heads",
                format!("{kv} KV heads do not divide {} query heads", self.num_attention_heads),
            ));
        }
        Ok(())
    }
}

fn parse_config<T: DeserializeOwned + Validate>(text: &str, path: &Path) -> IoResult<T> {
    let cfg: T = serde_json::from_str(text).map_err(|source| IoError::Json { path: path.to_path_buf(), source })?;
    cfg.validate(path)?;
    Ok(cfg)
}

macro_rules! load_methods {
    ($($t:ty),*) => {$(
        impl $t {
            /// Reads and parses a `config.json` file, applying transformers' defaults to absent keys.
            ///
            /// # Errors
            /// [`IoError::NotFound`] / [`IoError::Io`], [`IoError::Json`], [`IoError::InvalidConfig`].
            pub fn load(path: impl AsRef<Path>) -> IoResult<Self> {
                let path: PathBuf = path.as_ref().to_path_buf();
                let text = std::fs::read_to_string(&path).map_err(|e| IoError::io(&path, e))?;
                parse_config(&text, &path)
            }

            /// Parses a `config.json` held in a string, applying transformers' defaults to absent keys.
            ///
            /// # Errors
            /// [`IoError::Json`], [`IoError::InvalidConfig`].
            pub fn from_json(json: &str) -> IoResult<Self> {
                parse_config(json, Path::new(INLINE))
            }
        }
    )*};
}
load_methods!(BertConfig, Dinov2Config, WhisperConfig, LlamaConfig);

#[cfg(test)]
#[path = "hf_config_tests.rs"]
mod tests;
