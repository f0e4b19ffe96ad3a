//! Visual Prompt Tuning (Jia et al., 2022): `num_tokens` learned vectors join the token sequence of a frozen ViT.
//!
//! - **VPT-shallow**: one prompt enters before the first encoder layer and travels through every layer.
//! - **VPT-deep**: each layer `i` gets its own prompt `P_i`; the prompt positions the previous layer produced are
//!   dropped and `P_i` takes their place, so `x_i = L_i([CLS, P_i, E_{i-1}])`.
//!
//! The paper inserts the prompt right after CLS. Here it goes through peft-core's attention-prefix site
//! ([`Prefix::Tokens`]), which puts it at the front of the sequence, before CLS, and strips it after the last
//! layer. The two orders give the same outputs: the encoder layers are permutation-equivariant over tokens
//! (bidirectional attention, no mask between real tokens, position embeddings added before layer 0 and never to
//! the prompts), so moving the prompt block from positions `1..=P` to `0..P` only permutes rows of every
//! intermediate sequence. The test `prompt_in_front_equals_prompt_after_cls` checks this against the
//! after-CLS forward written out by hand.
//!
//! Init: uniform in `[-v, v]`, `v = sqrt(6 / (3·p² + d))` (Xavier-uniform over a patch-embedding fan-in of
//! `3·p²` and the width `d`, as the VPT reference code does for `patch_size` `p`). Not identity at init (the
//! prompts change every attention); with the adapter disabled the model is the base model exactly.
//!
//! Files: our own `peft_type = "VPT"` (PEFT has no VPT) in PEFT's layout: `adapter_config.json` with
//! `num_tokens`, `deep`, `patch_size`, `token_dim`, `num_layers`, and one tensor `prompt_embeddings
//! [layers, num_tokens, token_dim]` (`layers` = 1 for shallow), no key prefix, as PEFT writes prompt-learning
//! adapters.

use std::any::Any;
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use peft_adapters::common::{config_json, expect_tensor, parse_config};
use peft_adapters::prompt_common::{PromptEncoder, PromptTuner, PROMPT_EMBEDDINGS};
use peft_core::adapter::{site_rng, AdapterResult, AdapterTensors, InjectCx, PeftConfig, Tuner, TunerConfig};
use peft_core::nn::{prefix_sites, Ctx, Module, Prefix, PrefixAdapter, PrefixSite};
use peft_core::Param;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, VisionError};

/// VPT's `peft_type`.
pub const VPT_TYPE: &str = "VPT";

fn d_peft_type() -> String {
    VPT_TYPE.into()
}
fn d_patch() -> usize {
    14
}

/// VPT's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VptConfig {
    /// Always `"VPT"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// Prompt tokens per layer.
    pub num_tokens: usize,
    /// VPT-deep (a prompt per layer) instead of VPT-shallow (one prompt before the first layer).
    #[serde(default)]
    pub deep: bool,
    /// Patch size of the backbone, for the init's fan-in only (DINOv2: 14).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Width of a token (filled at injection).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// Encoder layers of the model (filled at injection).
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Modules trained and saved in full next to the adapter (the classification head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
}

const KNOWN: &[&str] =
    &["peft_type", "num_tokens", "deep", "patch_size", "token_dim", "num_layers", "modules_to_save", "inference_mode"];

impl VptConfig {
    /// VPT-shallow with `n` tokens.
    pub fn shallow(n: usize) -> Self {
        VptConfig {
            peft_type: d_peft_type(),
            num_tokens: n,
            deep: false,
            patch_size: d_patch(),
            token_dim: None,
            num_layers: None,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// VPT-deep with `n` tokens per layer.
    pub fn deep(n: usize) -> Self {
        VptConfig { deep: true, ..Self::shallow(n) }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`VisionError::Config`] for no tokens or a zero patch size.
    pub fn validate(&self) -> Result<()> {
        if self.num_tokens == 0 {
            return Err(VisionError::config(VPT_TYPE, "num_tokens", "must be at least 1"));
        }
        if self.patch_size == 0 {
            return Err(VisionError::config(VPT_TYPE, "patch_size", "must be at least 1"));
        }
        Ok(())
    }

    fn sites(&self, model: &dyn Module) -> Result<(Vec<PrefixSite>, usize)> {
        let sites = prefix_sites(model);
        let n = sites.len();
        if n == 0 {
            return Err(VisionError::config(VPT_TYPE, "<model>", "the model has no attention-prefix site"));
        }
        let used = if self.deep { sites } else { sites.into_iter().take(1).collect() };
        Ok((used, n))
    }

    fn check_agrees(&self, field: &'static str, set: Option<usize>, model: usize) -> Result<()> {
        match set {
            Some(v) if v != model => {
                Err(VisionError::config(VPT_TYPE, field, format!("the config says {v} but the model has {model}")))
            }
            _ => Ok(()),
        }
    }
}

/// The prompts of one VPT adapter, `[layers, num_tokens, token_dim]` (`layers` = 1 for shallow).
pub struct VptPrompts {
    table: Param,
}

impl VptPrompts {
    /// The table.
    pub fn table(&self) -> &Param {
        &self.table
    }
}

impl PromptEncoder for VptPrompts {
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

/// Layer `layer`'s slice of the table on that layer's prefix site.
struct VptLayer {
    name: String,
    prompts: Arc<VptPrompts>,
    layer: usize,
}

impl PrefixAdapter for VptLayer {
    fn name(&self) -> &str {
        &self.name
    }
    fn prefix(&self, batch: usize, _ctx: &Ctx) -> peft_core::Result<Prefix> {
        let t = self.prompts.table.tensor();
        let (p, d) = (t.shape()[1], t.shape()[2]);
        let mine = t.narrow(0, self.layer, 1)?;
        Ok(Prefix::Tokens(mine.broadcast_to(&[batch, p, d])?))
    }
    fn params(&self) -> Vec<Param> {
        self.prompts.params()
    }
}

/// An injected VPT adapter.
pub type VptTuner = PromptTuner<VptPrompts>;

impl TunerConfig for VptConfig {
    fn peft_type(&self) -> &str {
        VPT_TYPE
    }
    fn describe(&self) -> String {
        format!(
            "VPT-{}, {} prompt tokens{}",
            if self.deep { "deep" } else { "shallow" },
            self.num_tokens,
            if self.deep { " per layer" } else { "" }
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        Ok(config_json(self, VPT_TYPE)?)
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
        let (sites, layers) = self.sites(model)?;
        let d = sites[0].hidden();
        self.check_agrees("token_dim", self.token_dim, d)?;
        self.check_agrees("num_layers", self.num_layers, layers)?;
        let rows = sites.len();
        let v = (6.0 / (3.0 * (self.patch_size * self.patch_size) as f64 + d as f64)).sqrt() as f32;
        let mut rng = site_rng(cx.seed, cx.name, "vpt_prompts");
        let table = ArrayD::from_shape_fn(IxDyn(&[rows, self.num_tokens, d]), |_| rng.gen_range(-v..=v));
        let prompts = Arc::new(VptPrompts { table: Param::new(format!("vpt.{}.prompts", cx.name), table, true) });
        let attached: Vec<(PrefixSite, Arc<dyn PrefixAdapter>)> = sites
            .into_iter()
            .enumerate()
            .map(|(layer, s)| {
                let a: Arc<dyn PrefixAdapter> =
                    Arc::new(VptLayer { name: cx.name.into(), prompts: prompts.clone(), layer });
                (s, a)
            })
            .collect();
        let saved = Box::new(VptConfig { token_dim: Some(d), num_layers: Some(layers), ..self.clone() });
        Ok(Box::new(PromptTuner::attach(cx.name, VPT_TYPE, prompts, attached, saved)?))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        let (sites, _) = self.sites(model)?;
        expect_tensor(file, PROMPT_EMBEDDINGS, &[sites.len(), self.num_tokens, sites[0].hidden()])
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl PeftConfig for VptConfig {
    const PEFT_TYPE: &'static str = VPT_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (Self, _) = parse_config(v, VPT_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "vpt_tests.rs"]
mod tests;
