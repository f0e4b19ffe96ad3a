//! Prefix tuning (Li & Liang, 2021; PEFT's `PREFIX_TUNING`) and P-tuning v2 (Liu et al., 2022; the same
//! `peft_type` with `prefix_projection = false`): `num_virtual_tokens` learned key and value rows prepended to
//! every attention layer's keys and values (the attention-prefix site's [`Prefix::KeyValue`]), visible to every
//! query and never masked.
//!
//! The encoder is PEFT's `PrefixEncoder`: with `prefix_projection` an embedding `[P, token_dim]` through the
//! reparameterisation MLP `Linear(token_dim, encoder_hidden_size) → tanh → Linear(encoder_hidden_size,
//! num_layers·2·token_dim)`; without it (P-tuning v2, "deep prompts") a table `[P, num_layers·2·token_dim]`.
//! Row `p` of the table holds, for layer `l`, the key at columns `[2l·D, (2l+1)·D)` and the value at
//! `[(2l+1)·D, (2l+2)·D)`, each split into heads `h·hd + j` (PEFT's `view(B, P, 2L, H, hd).permute(2, 0, 3, 1,
//! 4).split(2)`). Init as PyTorch's defaults: embedding/table N(0, 1), MLP weights and biases U(±1/√fan_in).
//!
//! Not identity at init; disabled, the model is the base model exactly.
//!
//! Files: PEFT's `PrefixTuningConfig` keys (`peft_type = "PREFIX_TUNING"`, `num_virtual_tokens`, `token_dim`,
//! `num_transformer_submodules`, `num_attention_heads`, `num_layers` — filled from the model at injection —,
//! `encoder_hidden_size`, `prefix_projection`) and one tensor `prompt_embeddings [P, num_layers·2·token_dim]`:
//! the table, or with the MLP the table it **computes** (PEFT's `get_prompt_embedding_to_save`; the MLP itself is
//! not saved). As in PEFT, a saved adapter loads (with `inference_mode = true`, as saved) as a table and the MLP
//! is gone; loading that table into an MLP-mode adapter is refused. `token_dim` is the key/value width
//! (`kv_heads · head_dim`), the hidden size on the multi-head backbones here. PEFT's bookkeeping keys
//! (`base_model_name_or_path`, `peft_version`, ...) are kept in `extra` and written back.
//!
//! Positions: transformers treats the prefix like cached past tokens, so on BERT the real tokens' absolute
//! positions start at `P` and on LLaMA their rotary positions do; the backbones here do the same
//! ([`peft_core::nn::PrefixSite::key_value_len`]).
//!
//! Checked against PEFT 0.21.2 + transformers 4.57.6 on all-MiniLM-L6-v2 (`tests/peft_interop.rs`, fixtures from
//! `tests/fixtures/gen_peft_minilm.py`): PEFT-written files with and without the MLP load and give PEFT's
//! `last_hidden_state` within 4e-6, load -> save is byte-identical, and a file written here gives the same
//! outputs in PEFT.

use std::any::Any;
use std::sync::Arc;

use ndarray::ArrayD;
use peft_core::adapter::{
    site_rng, AdapterError, AdapterResult, AdapterTensors, InjectCx, PeftConfig, Tuner, TunerConfig,
};
use peft_core::nn::{prefix_sites, Ctx, Module, Prefix, PrefixAdapter, PrefixSite};
use peft_core::{Param, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::common::{config_json, kaiming, normal, parse_config, uniform};
use crate::error::{AdaptersError, Result};
use crate::prompt_common::{agree, PromptEncoder, PromptTuner, PROMPT_EMBEDDINGS};

/// Prefix tuning's `peft_type`.
pub const PREFIX_TUNING_TYPE: &str = "PREFIX_TUNING";

fn d_peft_type() -> String {
    PREFIX_TUNING_TYPE.into()
}

/// PEFT's `PrefixTuningConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    /// Always `"PREFIX_TUNING"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// `"SEQ_CLS"`, ... (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Prefix length.
    pub num_virtual_tokens: usize,
    /// Key/value width `D` (filled at injection).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for encoder-only / decoder-only models (filled at injection).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Key/value heads (filled at injection).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Attention layers (filled at injection).
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Hidden width of the reparameterisation MLP (default: `token_dim`; filled at injection).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Reparameterise through the MLP (prefix tuning) or learn the table directly (P-tuning v2).
    #[serde(default)]
    pub prefix_projection: bool,
    /// Modules trained and saved in full next to the adapter (`null` when none, as PEFT writes).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files (as PEFT writes).
    #[serde(default)]
    pub inference_mode: bool,
    /// PEFT's bookkeeping keys (`base_model_name_or_path`, `peft_version`, `revision`, `auto_mapping`, ...) and
    /// any other key the file held, kept as read so that load -> save writes them back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "task_type",
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "encoder_hidden_size",
    "prefix_projection",
    "modules_to_save",
    "inference_mode",
];

/// The model dimensions a prefix needs: `(sites, kv_heads, head_dim)`.
type Dims = (Vec<PrefixSite>, usize, usize);

impl PrefixTuningConfig {
    /// Prefix tuning with the reparameterisation MLP, `n` virtual tokens.
    pub fn prefix(n: usize) -> Self {
        PrefixTuningConfig {
            peft_type: d_peft_type(),
            task_type: None,
            num_virtual_tokens: n,
            token_dim: None,
            num_transformer_submodules: None,
            num_attention_heads: None,
            num_layers: None,
            encoder_hidden_size: None,
            prefix_projection: true,
            modules_to_save: None,
            inference_mode: false,
            extra: Map::new(),
        }
    }

    /// P-tuning v2 (deep prompts): the key/value table learned directly, `n` virtual tokens.
    pub fn p_tuning_v2(n: usize) -> Self {
        PrefixTuningConfig { prefix_projection: false, ..Self::prefix(n) }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`AdaptersError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return Err(AdaptersError::config(PREFIX_TUNING_TYPE, "num_virtual_tokens", "must be at least 1"));
        }
        if self.encoder_hidden_size == Some(0) {
            return Err(AdaptersError::config(PREFIX_TUNING_TYPE, "encoder_hidden_size", "must be at least 1"));
        }
        if self.num_transformer_submodules.is_some_and(|n| n != 1) {
            return Err(AdaptersError::config(
                PREFIX_TUNING_TYPE,
                "num_transformer_submodules",
                "only 1 (encoder-only or decoder-only models) is supported",
            ));
        }
        Ok(())
    }

    /// Whether this config builds the MLP (PEFT: `prefix_projection and not inference_mode`).
    pub fn uses_mlp(&self) -> bool {
        self.prefix_projection && !self.inference_mode
    }

    fn dims(&self, model: &dyn Module) -> Result<Dims> {
        let sites = prefix_sites(model);
        let first = sites.first().ok_or_else(|| AdaptersError::NoSites {
            method: PREFIX_TUNING_TYPE,
            what: "attention-prefix site".into(),
        })?;
        let (h, hd) = (first.kv_heads(), first.head_dim());
        if let Some(s) = sites.iter().find(|s| (s.kv_heads(), s.head_dim()) != (h, hd)) {
            return Err(AdaptersError::config(
                PREFIX_TUNING_TYPE,
                "token_dim",
                format!(
                    "`{}` has another key/value shape than `{}`: one table cannot serve both",
                    s.path(),
                    first.path()
                ),
            ));
        }
        agree(PREFIX_TUNING_TYPE, "token_dim", self.token_dim, h * hd)?;
        agree(PREFIX_TUNING_TYPE, "num_attention_heads", self.num_attention_heads, h)?;
        agree(PREFIX_TUNING_TYPE, "num_layers", self.num_layers, sites.len())?;
        Ok((sites, h, hd))
    }
}

/// PEFT's `PrefixEncoder`: the table, or the embedding and MLP that compute it.
pub enum PrefixEncoder {
    /// `[P, L·2·D]`, learned directly.
    Table(Param),
    /// `tanh(E·W₁ᵀ + b₁)·W₂ᵀ + b₂`.
    Mlp {
        /// `[P, D]`.
        embedding: Param,
        /// `transform.0`: `[hidden, D]`, `[hidden]`.
        w1: Param,
        /// Its bias.
        b1: Param,
        /// `transform.2`: `[L·2·D, hidden]`, `[L·2·D]`.
        w2: Param,
        /// Its bias.
        b2: Param,
    },
}

impl PrefixEncoder {
    /// The key/value table `[P, L·2·D]`.
    ///
    /// # Errors
    /// Shape errors.
    pub fn table(&self) -> peft_core::Result<Tensor> {
        match self {
            PrefixEncoder::Table(t) => Ok(t.tensor()),
            PrefixEncoder::Mlp { embedding, w1, b1, w2, b2 } => embedding
                .tensor()
                .linear(&w1.tensor(), Some(&b1.tensor()))?
                .tanh()
                .linear(&w2.tensor(), Some(&b2.tensor())),
        }
    }

    /// The number of virtual tokens `P` (rows of the table).
    pub fn virtual_tokens(&self) -> usize {
        let p = match self {
            PrefixEncoder::Table(t) => t,
            PrefixEncoder::Mlp { embedding, .. } => embedding,
        };
        p.shape().first().copied().unwrap_or(0)
    }
}

impl PromptEncoder for PrefixEncoder {
    fn params(&self) -> Vec<Param> {
        match self {
            PrefixEncoder::Table(t) => vec![t.clone()],
            PrefixEncoder::Mlp { embedding, w1, b1, w2, b2 } => {
                vec![embedding.clone(), w1.clone(), b1.clone(), w2.clone(), b2.clone()]
            }
        }
    }
    fn saved(&self) -> peft_core::Result<Param> {
        match self {
            PrefixEncoder::Table(t) => Ok(t.clone()),
            PrefixEncoder::Mlp { .. } => {
                let t = peft_core::no_grad(|| self.table())?;
                Ok(Param::new(PROMPT_EMBEDDINGS, t.data().to_owned(), false))
            }
        }
    }
    fn load(&self, src: &AdapterTensors) -> AdapterResult<()> {
        match self {
            PrefixEncoder::Table(t) => {
                t.set(src.get(PROMPT_EMBEDDINGS, &t.shape())?)?;
                Ok(())
            }
            PrefixEncoder::Mlp { .. } => Err(AdapterError::Unsupported {
                method: PREFIX_TUNING_TYPE.into(),
                what: "loading prompt_embeddings into the reparameterisation MLP".into(),
                reason: "the file holds the computed table, not the MLP (as PEFT saves it); load it with \
                         inference_mode = true, as saved"
                    .into(),
            }),
        }
    }
}

/// Layer `layer`'s keys and values from the shared encoder.
struct PrefixLayer {
    name: String,
    encoder: Arc<PrefixEncoder>,
    layer: usize,
    heads: usize,
    head_dim: usize,
}

impl PrefixLayer {
    /// Columns `[j·D, (j+1)·D)` of the table as `[B, H, P, hd]`.
    fn part(&self, table: &Tensor, j: usize, batch: usize) -> peft_core::Result<Tensor> {
        let d = self.heads * self.head_dim;
        let p = table.shape()[0];
        table
            .narrow(1, j * d, d)?
            .reshape(&[p, self.heads, self.head_dim])?
            .permute(&[1, 0, 2])?
            .unsqueeze(0)?
            .broadcast_to(&[batch, self.heads, p, self.head_dim])
    }
}

impl PrefixAdapter for PrefixLayer {
    fn name(&self) -> &str {
        &self.name
    }
    fn prefix(&self, batch: usize, _ctx: &Ctx) -> peft_core::Result<Prefix> {
        let t = self.encoder.table()?;
        Ok(Prefix::KeyValue {
            keys: self.part(&t, 2 * self.layer, batch)?,
            values: self.part(&t, 2 * self.layer + 1, batch)?,
        })
    }
    fn params(&self) -> Vec<Param> {
        self.encoder.params()
    }
    fn key_value_len(&self) -> Option<usize> {
        Some(self.encoder.virtual_tokens())
    }
}

/// An injected prefix-tuning / P-tuning v2 adapter.
pub type PrefixTuningTuner = PromptTuner<PrefixEncoder>;

impl TunerConfig for PrefixTuningConfig {
    fn peft_type(&self) -> &str {
        PREFIX_TUNING_TYPE
    }
    fn describe(&self) -> String {
        if self.prefix_projection {
            format!("prefix tuning, {} virtual tokens, MLP reparameterisation", self.num_virtual_tokens)
        } else {
            format!("P-tuning v2 (deep prompts), {} virtual tokens", self.num_virtual_tokens)
        }
    }
    fn to_json(&self) -> AdapterResult<Value> {
        Ok(config_json(self, PREFIX_TUNING_TYPE)?)
    }
    fn modules_to_save(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }
    fn set_modules_to_save(&mut self, modules: Vec<String>) -> AdapterResult<()> {
        self.modules_to_save = (!modules.is_empty()).then_some(modules);
        Ok(())
    }
    fn inference_mode(&self) -> bool {
        self.inference_mode
    }
    fn set_inference_mode(&mut self, on: bool) {
        self.inference_mode = on;
    }
    fn key_prefix(&self) -> &str {
        ""
    }
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.validate()?;
        let (sites, heads, head_dim) = self.dims(model)?;
        let (p, d, l) = (self.num_virtual_tokens, heads * head_dim, sites.len());
        let width = l * 2 * d;
        let hidden = self.encoder_hidden_size.unwrap_or(d);
        let rng = &mut site_rng(cx.seed, cx.name, "prompt_encoder");
        let key = |k: &str| format!("prompt_encoder.{}.{k}", cx.name);
        let encoder = Arc::new(if self.uses_mlp() {
            PrefixEncoder::Mlp {
                embedding: Param::new(key("embedding.weight"), normal(&[p, d], 1.0, rng), true),
                w1: Param::new(key("transform.0.weight"), kaiming(hidden, d, rng), true),
                b1: Param::new(key("transform.0.bias"), bias(hidden, d, rng), true),
                w2: Param::new(key("transform.2.weight"), kaiming(width, hidden, rng), true),
                b2: Param::new(key("transform.2.bias"), bias(width, hidden, rng), true),
            }
        } else {
            PrefixEncoder::Table(Param::new(key("embedding.weight"), normal(&[p, width], 1.0, rng), true))
        });
        let layers = sites
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let a: Arc<dyn PrefixAdapter> =
                    Arc::new(PrefixLayer { name: cx.name.into(), encoder: encoder.clone(), layer: i, heads, head_dim });
                (s.clone(), a)
            })
            .collect();
        let saved = PrefixTuningConfig {
            token_dim: Some(d),
            num_transformer_submodules: Some(1),
            num_attention_heads: Some(heads),
            num_layers: Some(l),
            encoder_hidden_size: self.prefix_projection.then_some(hidden),
            ..self.clone()
        };
        Ok(Box::new(PromptTuner::attach(cx.name, PREFIX_TUNING_TYPE, encoder, layers, Box::new(saved))?))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        let (sites, h, hd) = self.dims(model)?;
        crate::common::expect_tensor(file, PROMPT_EMBEDDINGS, &[self.num_virtual_tokens, sites.len() * 2 * h * hd])
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// PyTorch's `nn.Linear` bias init: U(±1/√fan_in).
fn bias(n: usize, fan_in: usize, rng: &mut impl rand::Rng) -> ArrayD<f32> {
    uniform(&[n], 1.0 / (fan_in.max(1) as f32).sqrt(), rng)
}

impl PeftConfig for PrefixTuningConfig {
    const PEFT_TYPE: &'static str = PREFIX_TUNING_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (Self, _) = parse_config(v, PREFIX_TUNING_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "prefix_tests.rs"]
mod tests;
