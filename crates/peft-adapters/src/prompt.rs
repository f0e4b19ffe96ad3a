//! Prompt tuning (Lester et al., 2021; PEFT's `PROMPT_TUNING`): `num_virtual_tokens` learned vectors inserted in
//! front of the sequence at the first attention layer's prefix site (the attention-prefix site's
//! [`Prefix::Tokens`]; see "Placement" below); they attend and are attended to like real tokens, and are stripped from the outputs, so
//! pooling and heads see the usual positions.
//!
//! Init (`prompt_tuning_init`): `"RANDOM"` N(0, 1) (PyTorch's `nn.Embedding` default, as PEFT leaves it);
//! `"SAMPLE_VOCAB"` rows of the model's word-embedding matrix drawn uniformly (PEFT's). `"TEXT"` needs a
//! tokenizer, which this crate does not load: it is refused with a typed error (tokenize the text and copy the
//! embedding rows into [`PromptEmbedding::table`] instead).
//!
//! Not identity at init (new tokens change every attention); with the adapter disabled the model is the base
//! model exactly.
//!
//! Files: PEFT's `PromptTuningConfig` keys (`peft_type = "PROMPT_TUNING"`, `num_virtual_tokens`, `token_dim`,
//! `num_transformer_submodules`, `num_attention_heads`, `num_layers`, `prompt_tuning_init`,
//! `prompt_tuning_init_text`, `tokenizer_name_or_path`, ...; the model-derived ones filled at injection; PEFT's
//! bookkeeping keys kept in `extra`) and one tensor `prompt_embeddings [num_virtual_tokens, token_dim]` with no key
//! prefix, as PEFT's `get_peft_model_state_dict` writes it.
//!
//! Placement: where the backbone has an embedding block that adds positions (BERT/MiniLM), the prompt goes in front
//! of the word embeddings *before* it, as PEFT's `inputs_embeds = cat(prompt, embed(ids))` does: the prompt takes
//! positions `0..P` and token type 0, the real tokens `P..P+L`, and the embedding LayerNorm sees all. On LLaMA
//! (no positional embedding in the embedding block) the tokens enter the first layer, which is the same thing. On
//! DINOv2 / Whisper they enter the first layer without positional embedding (the VPT convention).
//!
//! Checked against PEFT 0.21.2 + transformers 4.57.6 on all-MiniLM-L6-v2 (`tests/peft_interop.rs`): a PEFT-written
//! file loads and gives PEFT's `last_hidden_state` (virtual-token rows aside) within 3e-6, load -> save is
//! byte-identical, and a file written here gives the same outputs in PEFT.

use std::any::Any;
use std::sync::Arc;

use ndarray::{ArrayD, Axis, Ix2};
use peft_core::adapter::{site_rng, AdapterResult, AdapterTensors, InjectCx, PeftConfig, Tuner, TunerConfig};
use peft_core::nn::{prefix_sites, Ctx, Module, Prefix, PrefixAdapter, PrefixSite};
use peft_core::Param;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::common::{config_json, normal, parse_config};
use crate::error::{AdaptersError, Result};
use crate::prompt_common::{agree, PromptEncoder, PromptTuner, PROMPT_EMBEDDINGS};

/// Prompt tuning's `peft_type`.
pub const PROMPT_TUNING_TYPE: &str = "PROMPT_TUNING";

/// How the prompt starts (PEFT's `PromptTuningInit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptTuningInit {
    /// N(0, 1).
    #[serde(rename = "RANDOM")]
    Random,
    /// Rows of the word-embedding matrix, drawn uniformly.
    #[serde(rename = "SAMPLE_VOCAB")]
    SampleVocab,
    /// The embeddings of a tokenized text (refused here: no tokenizer).
    #[serde(rename = "TEXT")]
    Text,
}

fn d_peft_type() -> String {
    PROMPT_TUNING_TYPE.into()
}
fn d_init() -> PromptTuningInit {
    PromptTuningInit::Random
}

/// PEFT's `PromptTuningConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptTuningConfig {
    /// Always `"PROMPT_TUNING"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// `"SEQ_CLS"`, ... (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Prompt length.
    pub num_virtual_tokens: usize,
    /// Width of a token (the model's hidden size; filled at injection).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for encoder-only / decoder-only models (filled at injection).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Attention heads of the model (filled at injection).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Layers of the model (filled at injection).
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Initialisation.
    #[serde(default = "d_init")]
    pub prompt_tuning_init: PromptTuningInit,
    /// The text of a `"TEXT"` init.
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The tokenizer of a `"TEXT"` init.
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
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
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "modules_to_save",
    "inference_mode",
];

impl PromptTuningConfig {
    /// `n` random virtual tokens.
    pub fn new(n: usize) -> Self {
        PromptTuningConfig {
            peft_type: d_peft_type(),
            task_type: None,
            num_virtual_tokens: n,
            token_dim: None,
            num_transformer_submodules: None,
            num_attention_heads: None,
            num_layers: None,
            prompt_tuning_init: PromptTuningInit::Random,
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            modules_to_save: None,
            inference_mode: false,
            extra: Map::new(),
        }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`AdaptersError::InvalidConfig`] for no virtual tokens or more than one transformer submodule.
    pub fn validate(&self) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return Err(AdaptersError::config(PROMPT_TUNING_TYPE, "num_virtual_tokens", "must be at least 1"));
        }
        if self.num_transformer_submodules.is_some_and(|n| n != 1) {
            return Err(AdaptersError::config(
                PROMPT_TUNING_TYPE,
                "num_transformer_submodules",
                "only 1 (encoder-only or decoder-only models) is supported",
            ));
        }
        Ok(())
    }

    /// Checks that the init can run here (a loaded adapter needs none: [`TunerConfig::for_loading`]).
    ///
    /// # Errors
    /// [`AdaptersError::Unsupported`] for a `"TEXT"` init.
    pub fn check_init(&self) -> Result<()> {
        if self.prompt_tuning_init == PromptTuningInit::Text {
            return Err(AdaptersError::Unsupported {
                method: PROMPT_TUNING_TYPE,
                what: "prompt_tuning_init = \"TEXT\"".into(),
                reason: "this crate loads no tokenizer; use \"SAMPLE_VOCAB\", or set the table from the tokenized \
                         text's embedding rows"
                    .into(),
            });
        }
        Ok(())
    }

    fn first_site(model: &dyn Module) -> Result<(PrefixSite, usize)> {
        let sites = prefix_sites(model);
        let n = sites.len();
        sites
            .into_iter()
            .next()
            .map(|s| (s, n))
            .ok_or_else(|| AdaptersError::NoSites { method: PROMPT_TUNING_TYPE, what: "attention-prefix site".into() })
    }

    fn init_table(&self, d: usize, base: &[Param], rng: &mut impl Rng) -> Result<ArrayD<f32>> {
        let p = self.num_virtual_tokens;
        match self.prompt_tuning_init {
            PromptTuningInit::Random | PromptTuningInit::Text => Ok(normal(&[p, d], 1.0, rng)),
            PromptTuningInit::SampleVocab => {
                let emb = base
                    .iter()
                    .find(|q| {
                        let n = q.name();
                        (n.ends_with("word_embeddings.weight") || n.ends_with("embed_tokens.weight"))
                            && q.shape().get(1) == Some(&d)
                    })
                    .ok_or(AdaptersError::MissingBaseParam {
                        method: PROMPT_TUNING_TYPE,
                        name: "*.word_embeddings.weight / *.embed_tokens.weight".into(),
                        why: "SAMPLE_VOCAB draws the prompt from the word embeddings",
                    })?;
                let w = emb.value().to_owned().into_dimensionality::<Ix2>().map_err(|_| {
                    AdaptersError::config(
                        PROMPT_TUNING_TYPE,
                        "prompt_tuning_init",
                        "the word embeddings are not a matrix",
                    )
                })?;
                let rows: Vec<usize> = (0..p).map(|_| rng.gen_range(0..w.nrows())).collect();
                Ok(w.select(Axis(0), &rows).into_dyn())
            }
        }
    }

    fn filled(&self, d: usize, heads: usize, layers: usize) -> Self {
        PromptTuningConfig {
            token_dim: Some(d),
            num_transformer_submodules: Some(1),
            num_attention_heads: Some(heads),
            num_layers: Some(layers),
            ..self.clone()
        }
    }
}

/// The learned prompt `[num_virtual_tokens, token_dim]` (PEFT's `PromptEmbedding.embedding.weight`).
pub struct PromptEmbedding {
    table: Param,
}

impl PromptEmbedding {
    /// The table.
    pub fn table(&self) -> &Param {
        &self.table
    }
}

impl PromptEncoder for PromptEmbedding {
    fn params(&self) -> Vec<Param> {
        vec![self.table.clone()]
    }
    fn saved(&self) -> peft_core::Result<Param> {
        Ok(self.table.clone())
    }
    fn load(&self, src: &AdapterTensors) -> AdapterResult<()> {
        self.table.set(src.get(PROMPT_EMBEDDINGS, &self.table.shape())?)?;
        Ok(())
    }
}

/// The prompt on the first attention-prefix site.
struct PromptLayer {
    name: String,
    encoder: Arc<PromptEmbedding>,
}

impl PrefixAdapter for PromptLayer {
    fn name(&self) -> &str {
        &self.name
    }
    fn prefix(&self, batch: usize, _ctx: &Ctx) -> peft_core::Result<Prefix> {
        let t = self.encoder.table.tensor();
        let s = t.shape().to_vec();
        Ok(Prefix::Tokens(t.unsqueeze(0)?.broadcast_to(&[batch, s[0], s[1]])?))
    }
    fn params(&self) -> Vec<Param> {
        self.encoder.params()
    }
}

/// An injected prompt-tuning adapter.
pub type PromptTuningTuner = PromptTuner<PromptEmbedding>;

impl TunerConfig for PromptTuningConfig {
    fn peft_type(&self) -> &str {
        PROMPT_TUNING_TYPE
    }
    fn describe(&self) -> String {
        format!("prompt tuning, {} virtual tokens ({:?} init)", self.num_virtual_tokens, self.prompt_tuning_init)
    }
    fn to_json(&self) -> AdapterResult<Value> {
        Ok(config_json(self, PROMPT_TUNING_TYPE)?)
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
        self.check_init()?;
        let (site, layers) = Self::first_site(model)?;
        let d = site.hidden();
        agree(PROMPT_TUNING_TYPE, "token_dim", self.token_dim, d)?;
        agree(PROMPT_TUNING_TYPE, "num_layers", self.num_layers, layers)?;
        let table = self.init_table(d, cx.base_params, &mut site_rng(cx.seed, cx.name, "prompt_encoder"))?;
        let encoder = Arc::new(PromptEmbedding {
            table: Param::new(format!("prompt_encoder.{}.embedding.weight", cx.name), table, true),
        });
        let layer: Arc<dyn PrefixAdapter> = Arc::new(PromptLayer { name: cx.name.into(), encoder: encoder.clone() });
        let saved = Box::new(self.filled(d, site.kv_heads(), layers));
        Ok(Box::new(PromptTuner::attach(cx.name, PROMPT_TUNING_TYPE, encoder, vec![(site, layer)], saved)?))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        let (site, _) = Self::first_site(model)?;
        crate::common::expect_tensor(file, PROMPT_EMBEDDINGS, &[self.num_virtual_tokens, site.hidden()])
    }
    /// The saved table overwrites the init, so a `"TEXT"` adapter loads with a random init underneath.
    fn for_loading(&self) -> AdapterResult<Box<dyn TunerConfig>> {
        Ok(Box::new(PromptTuningConfig { prompt_tuning_init: PromptTuningInit::Random, ..self.clone() }))
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl PeftConfig for PromptTuningConfig {
    const PEFT_TYPE: &'static str = PROMPT_TUNING_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (Self, _) = parse_config(v, PROMPT_TUNING_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "prompt_tests.rs"]
mod tests;
