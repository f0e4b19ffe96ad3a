//! MixLoRA (Li et al., 2024; TUDB-Labs/MixLoRA, MoE-PEFT): a top-k mixture of LoRA experts in the feed-forward
//! block, plus plain LoRA on the attention projections.
//!
//! The frozen FFN is shared by `E` experts; expert `e` is the FFN with its own LoRA on every projection
//! (BERT: `intermediate.dense` → act → `output.dense`; LLaMA: `gate_proj`, `up_proj` → SwiGLU → `down_proj`).
//! A token-level router `gate [E, d]` (init N(0, `router_init_range`)) gives `p = softmax(x·gateᵀ)`; the top-k
//! experts (ties: lower index) get weights `p` renormalised over the top-k, and `FFN(x) = Σ_{e∈topk} w_e
//! out_e(x)`. Because the weights sum to 1 this is `base(x) + Σ_e w_e (out_e(x) − base(x))`; peft-rs computes the
//! base projections once for all experts and runs each expert only on its routed tokens. At init every expert B is
//! 0, so the MoE FFN equals the base FFN exactly.
//!
//! Load-balancing loss (Mixtral form): over the (non-padding) tokens, `f[k,e]` = fraction of tokens whose k-th
//! choice is `e`, `P[e]` = mean router probability of `e`, `L_aux = E · Σ_{k,e} f[k,e]·P[e]`; a uniform router
//! gives exactly `top_k`. [`MixLoraFfn::forward`] returns it in [`RouterLosses`] (raw, and weighted by
//! `router_aux_loss_coef` together with Switch's z-loss) and, for FFNs driven through a model's block site,
//! [`MixLoraTuner`]'s [`Tuner::aux_loss`] collects the weighted sum so a trainer can add it to its loss.
//!
//! Wiring: MixLoRA attaches to the feed-forward **block** sites ([`peft_core::nn::BlockSite`]) through
//! [`BlockTuner`]: the site hands [`MixLoraFfn`] the block's input (after the pre-norm in pre-norm layers), so the
//! same adapter works on BERT's post-norm `intermediate.dense → act → output.dense` and on LLaMA's pre-norm SwiGLU
//! MLP. The experts use the FFN's frozen projection bases (adapters attached to those linear sites act only in
//! the base output the site passes in). Experts are not mergeable (input-dependent routing); the attention LoRAs
//! are, but the adapter merges as a whole, so a MixLoRA adapter refuses to merge. The load-balancing loss of the
//! last forward reaches the trainer through [`Tuner::aux_loss`] ([`MixLoraTuner`]), over the non-padding tokens
//! when the context carries a [`peft_core::nn::TokenMask`].
//!
//! Routing strategies ([`RoutingStrategy`], MoE-PEFT's `routing_strategy`):
//! - `"mixlora"` ([`RoutingStrategy::TopK`], the default, as above);
//! - `"mixlora-dynamic"` ([`RoutingStrategy::Dynamic`]): experts sorted by probability (divided by `temperature`
//!   when it is positive) are kept until their cumulative sum exceeds `top_p`, the crossing expert included (all
//!   experts when the sum never does). As in MoE-PEFT the kept probabilities are the weights *without*
//!   renormalisation, so the FFN output is scaled by the kept mass and the mixture is **not** the base FFN at init
//!   (the spec's "sort logits" is, in the authors' code, a sort of the softmax probabilities; we follow the code).
//!   The load-balancing loss is the Mixtral form over the variable-length choices;
//! - `"mixlora-switch"` ([`RoutingStrategy::Switch`], Switch Transformers): top-1 by probability, output
//!   `p_max · out_e(x)`; per sequence, a token whose position in its expert's queue exceeds `expert_capacity` is
//!   dropped and its FFN output is `p_max · x` (the Switch Transformers / MoE-PEFT rule); `ffn_dropout` on the
//!   mixture output in training; loss `router_z_loss_coef · mean(logsumexp(logits)²) + router_aux_loss_coef ·
//!   E²·mean_e(f_e·P_e)` (f from the top-1 choice before the capacity check). Not the base FFN at init either (the
//!   output is scaled by `p_max`). MoE-PEFT's Switch block returns its *input* unchanged in inference mode; that
//!   is a bug in the authors' code and is not reproduced: evaluation uses the same mixture without dropout.
//!
//! Router jitter multiplies only the router input. Unlike MoE-PEFT, the padding mask (when given) applies to the
//! loss of every strategy (MoE-PEFT masks it for top-k only). Not implemented: MoE-PEFT's router entropy loss
//! (`router_dyn_loss_coef`, `entropy_*`) and Switch's `sparse_step`.
//!
//! Files: the LoRA layout with `peft_type = "MIXLORA"`: attention LoRA at `<site>.lora_A.weight`/`lora_B.weight`,
//! expert `e` of projection site `p` at `<p>.experts.<e>.lora_A.weight` / `.lora_B.weight`, the router at
//! `<ffn prefix>.mixlora_router.weight` `[E, d]`, where the FFN prefix is the longest common module path of its
//! projections (`encoder.layer.<i>` in BERT, `model.layers.<i>.mlp` in LLaMA). Configs written when MixLoRA sat
//! on the residual site (with `ffn_residual`, `ffn_up`, `ffn_down`, `hidden_act`) load unchanged: the FFN now
//! comes from the block site, and those keys are reported as ignored.

use std::any::Any;
use std::sync::Arc;

use peft_core::adapter::{
    site_rng, AdapterError, AdapterResult, AdapterTensors, BlockTuner, InjectCx, LinearTuner, ModulePattern,
    PeftConfig, Tuner, TunerConfig,
};
use peft_core::nn::{block_sites, BlockSite, Linear, Module};
use peft_core::{Error, Param, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod ffn;

use ffn::{common_prefix, sites_of};
pub use ffn::{MixLoraFfn, Routing};

use crate::layer::LoraLinear;
use crate::structured::{config_json, describe_targets, expect_tensor, parse_config, target_spec};
use crate::LoraConfig;

/// MixLoRA's `peft_type`.
pub const MIXLORA_TYPE: &str = "MIXLORA";

fn d_peft_type() -> String {
    "MIXLORA".into()
}

/// MixLoRA's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MixLoraConfig {
    /// Always `"MIXLORA"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// LoRA rank of the experts and the attention adapters.
    pub r: usize,
    /// Scaling numerator `s = lora_alpha / r`.
    pub lora_alpha: f64,
    /// Attention sites with plain LoRA (`None`: none).
    #[serde(default)]
    pub target_modules: Option<ModulePattern>,
    /// Experts `E`.
    pub num_experts: usize,
    /// Experts per token `k`.
    pub top_k: usize,
    /// Std of the router init.
    pub router_init_range: f64,
    /// Weight of the load-balancing loss.
    pub router_aux_loss_coef: f64,
    /// Multiplicative router-input jitter `U(1−ε, 1+ε)` in training (0: off).
    #[serde(default)]
    pub jitter_noise: f64,
    /// How the router picks experts (absent in files from before this option: top-k).
    #[serde(default)]
    pub routing_strategy: RoutingStrategy,
    /// [`RoutingStrategy::Dynamic`] only: the cumulative probability to exceed (MoE-PEFT default 0.8 when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// [`RoutingStrategy::Dynamic`] only: divides the probabilities before the top-p cut when positive (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// [`RoutingStrategy::Switch`] only: tokens per expert and sequence (MoE-PEFT default 32 when `None`; the
    /// Switch paper sets `max_seq_len / num_experts · capacity_factor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_capacity: Option<usize>,
    /// [`RoutingStrategy::Switch`] only: weight of the router z-loss (MoE-PEFT and transformers default 0.001 when
    /// `None`; the spec quotes 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_z_loss_coef: Option<f64>,
    /// [`RoutingStrategy::Switch`] only: dropout on the mixture output in training (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_dropout: Option<f64>,
    /// Which feed-forward block sites get the mixture (PEFT's target rules on the block paths,
    /// `encoder.layer.<i>.output` / `model.layers.<i>.mlp`); `None`: every block site. The FFN's projections and
    /// activation come from the site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_modules: Option<ModulePattern>,
    /// Informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Modules trained and saved in full next to the adapter (PEFT's `modules_to_save`; written only when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
}

impl MixLoraConfig {
    /// The README example (`E = 8`, `k = 2`, r = 8, α = 16, router std 0.02, aux coef 0.01): experts on every
    /// feed-forward block, LoRA on `attention` (e.g. `["query", "value"]`, or `["q_proj", "v_proj"]` in LLaMA).
    pub fn new<S: Into<String>>(attention: impl IntoIterator<Item = S>) -> Self {
        Self::bert(attention)
    }

    /// [`MixLoraConfig::new`] (the name of the BERT recipe).
    pub fn bert<S: Into<String>>(attention: impl IntoIterator<Item = S>) -> Self {
        let t: Vec<String> = attention.into_iter().map(Into::into).collect();
        MixLoraConfig {
            peft_type: d_peft_type(),
            r: 8,
            lora_alpha: 16.0,
            target_modules: (!t.is_empty()).then(|| ModulePattern::list(t)),
            num_experts: 8,
            top_k: 2,
            router_init_range: 0.02,
            router_aux_loss_coef: 0.01,
            jitter_noise: 0.0,
            routing_strategy: RoutingStrategy::TopK,
            top_p: None,
            temperature: None,
            expert_capacity: None,
            router_z_loss_coef: None,
            ffn_dropout: None,
            block_modules: None,
            task_type: None,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// Checks the counts.
    ///
    /// # Errors
    /// [`AdapterError::InvalidConfig`] for `r = 0`, no experts, `top_k` of 0 or above `num_experts`, bad numbers,
    /// or keys of another routing strategy.
    pub fn validate(&self) -> AdapterResult<()> {
        let bad = |field: &str, reason: String| Err(AdapterError::config(MIXLORA_TYPE, field, reason));
        if self.r == 0 {
            return bad("r", "must be positive".into());
        }
        if self.num_experts == 0 {
            return bad("num_experts", "must be positive".into());
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return bad("top_k", format!("{} must be in 1..={}", self.top_k, self.num_experts));
        }
        if self.router_init_range.is_nan() || self.router_init_range < 0.0 {
            return bad("router_init_range", format!("{} must be >= 0", self.router_init_range));
        }
        if !(0.0..1.0).contains(&self.jitter_noise) {
            return bad("jitter_noise", format!("{} must be in [0, 1)", self.jitter_noise));
        }
        if !self.lora_alpha.is_finite() {
            return bad("lora_alpha", format!("{} must be finite", self.lora_alpha));
        }
        let strategy = self.routing_strategy;
        let misplaced = |set: bool, key: &str, owner: RoutingStrategy| -> AdapterResult<()> {
            if set && strategy != owner {
                return bad(key, format!("belongs to routing_strategy {owner:?}, not {strategy:?}"));
            }
            Ok(())
        };
        misplaced(self.top_p.is_some(), "top_p", RoutingStrategy::Dynamic)?;
        misplaced(self.temperature.is_some(), "temperature", RoutingStrategy::Dynamic)?;
        misplaced(self.expert_capacity.is_some(), "expert_capacity", RoutingStrategy::Switch)?;
        misplaced(self.router_z_loss_coef.is_some(), "router_z_loss_coef", RoutingStrategy::Switch)?;
        misplaced(self.ffn_dropout.is_some(), "ffn_dropout", RoutingStrategy::Switch)?;
        if !(self.router_aux_loss_coef >= 0.0 && self.router_aux_loss_coef.is_finite()) {
            return bad("router_aux_loss_coef", format!("{} must be finite and >= 0", self.router_aux_loss_coef));
        }
        self.router().map(|_| ())
    }

    /// The router rule with the strategy's defaults filled in.
    fn router(&self) -> AdapterResult<Router> {
        let bad = |field: &str, reason: String| Err(AdapterError::config(MIXLORA_TYPE, field, reason));
        Ok(match self.routing_strategy {
            RoutingStrategy::TopK => Router::TopK(self.top_k),
            RoutingStrategy::Dynamic => {
                let (top_p, temperature) = (self.top_p.unwrap_or(0.8), self.temperature.unwrap_or(0.0));
                if !(top_p > 0.0 && top_p <= 1.0 && temperature >= 0.0 && temperature.is_finite()) {
                    return if top_p > 0.0 && top_p <= 1.0 {
                        bad("temperature", format!("{temperature} must be finite and >= 0"))
                    } else {
                        bad("top_p", format!("{top_p} must be in (0, 1]"))
                    };
                }
                Router::Dynamic { top_p, temperature }
            }
            RoutingStrategy::Switch => {
                if self.top_k != 1 {
                    return bad("top_k", format!("routing_strategy Switch routes top-1; {} given", self.top_k));
                }
                let capacity = self.expert_capacity.unwrap_or(32);
                let z_coef = self.router_z_loss_coef.unwrap_or(0.001);
                let dropout = self.ffn_dropout.unwrap_or(0.0);
                if capacity == 0 {
                    return bad("expert_capacity", "must be positive".into());
                }
                if !(z_coef >= 0.0 && z_coef.is_finite()) {
                    return bad("router_z_loss_coef", format!("{z_coef} must be finite and >= 0"));
                }
                if !(0.0..1.0).contains(&dropout) {
                    return bad("ffn_dropout", format!("{dropout} must be in [0, 1)"));
                }
                Router::Switch { capacity, z_coef, dropout }
            }
        })
    }

    /// MoE-PEFT's `"mixlora-dynamic"`: top-p routing with the given `top_p` and `temperature` (MoE-PEFT defaults
    /// 0.8 and 0).
    pub fn with_dynamic_routing(mut self, top_p: f64, temperature: f64) -> Self {
        self.routing_strategy = RoutingStrategy::Dynamic;
        (self.top_p, self.temperature) = (Some(top_p), Some(temperature));
        (self.expert_capacity, self.router_z_loss_coef, self.ffn_dropout) = (None, None, None);
        self
    }

    /// MoE-PEFT's `"mixlora-switch"` with its defaults: top-1, `expert_capacity` tokens per expert and sequence,
    /// router std 1.0, jitter 0.01, z-loss coefficient 0.001, no FFN dropout.
    pub fn with_switch_routing(mut self, expert_capacity: usize) -> Self {
        self.routing_strategy = RoutingStrategy::Switch;
        self.top_k = 1;
        (self.router_init_range, self.jitter_noise) = (1.0, 0.01);
        (self.expert_capacity, self.router_z_loss_coef, self.ffn_dropout) =
            (Some(expert_capacity), Some(0.001), Some(0.0));
        (self.top_p, self.temperature) = (None, None);
        self
    }

    fn scaling(&self) -> f32 {
        (self.lora_alpha / self.r as f64) as f32
    }
}

/// How the router picks experts; serialised as MoE-PEFT's `routing_strategy` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoutingStrategy {
    /// `"mixlora"`: top-k, weights renormalised over the k.
    #[default]
    #[serde(rename = "mixlora")]
    TopK,
    /// `"mixlora-dynamic"`: top-p over the sorted probabilities, weights not renormalised.
    #[serde(rename = "mixlora-dynamic")]
    Dynamic,
    /// `"mixlora-switch"`: top-1 with a per-sequence expert capacity and a z-loss.
    #[serde(rename = "mixlora-switch")]
    Switch,
}

/// A validated routing rule with its numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Router {
    TopK(usize),
    Dynamic { top_p: f64, temperature: f64 },
    Switch { capacity: usize, z_coef: f64, dropout: f64 },
}

/// The router losses of one forward.
pub struct RouterLosses {
    /// The load-balancing loss, unweighted (Mixtral form `E·Σ_{k,e} f[k,e]·P[e]`; equal to Switch's
    /// `E²·mean_e(f_e·P_e)` for top-1).
    pub load_balance: Tensor,
    /// Switch only: the z-loss `mean_t(logsumexp(logits_t)²)`, unweighted.
    pub z: Option<Tensor>,
    /// What a trainer adds to its loss: `router_aux_loss_coef · load_balance (+ router_z_loss_coef · z)`.
    pub weighted: Tensor,
}

/// An injected MixLoRA adapter: the mixtures on the block sites ([`BlockTuner`]) and the attention LoRA.
pub struct MixLoraTuner {
    name: String,
    blocks: BlockTuner<MixLoraFfn>,
    attention: Option<LinearTuner<LoraLinear>>,
}

impl MixLoraTuner {
    /// The mixtures, one per feed-forward block.
    pub fn ffns(&self) -> Vec<Arc<MixLoraFfn>> {
        self.blocks.blocks().iter().map(|(_, f)| f.clone()).collect()
    }

    /// The attention LoRA layers.
    pub fn attention(&self) -> Option<&LinearTuner<LoraLinear>> {
        self.attention.as_ref()
    }
}

impl Tuner for MixLoraTuner {
    fn name(&self) -> &str {
        &self.name
    }
    /// Routers and experts, then the attention LoRA.
    fn params(&self) -> Vec<Param> {
        let mut v = self.blocks.params();
        if let Some(a) = &self.attention {
            v.extend(a.params());
        }
        v
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        let mut v: Vec<(String, Param)> = self.blocks.blocks().iter().flat_map(|(_, f)| f.saved()).collect();
        if let Some(a) = &self.attention {
            v.extend(a.state_dict());
        }
        v
    }
    fn wrapped_modules(&self) -> Vec<String> {
        self.attention.as_ref().map(|a| a.wrapped_modules()).unwrap_or_default()
    }
    fn set_active(&self, on: bool) {
        self.blocks.set_active(on);
        if let Some(a) = &self.attention {
            a.set_active(on);
        }
    }
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        self.blocks.detach(keep_merged)?;
        match &self.attention {
            Some(a) => a.detach(keep_merged),
            None => Ok(()),
        }
    }
    fn kind(&self) -> &str {
        MIXLORA_TYPE
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    /// The sum over blocks of the weighted router loss recorded by the last forward (taken).
    fn aux_loss(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for (_, f) in self.blocks.blocks() {
            if let Some(a) = f.take_aux_loss() {
                total = Some(match total {
                    Some(t) => t.add(&a)?,
                    None => a,
                });
            }
        }
        Ok(total)
    }
}

const KNOWN: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "num_experts",
    "top_k",
    "router_init_range",
    "router_aux_loss_coef",
    "jitter_noise",
    "routing_strategy",
    "top_p",
    "temperature",
    "expert_capacity",
    "router_z_loss_coef",
    "ffn_dropout",
    "block_modules",
    "task_type",
    "modules_to_save",
    "inference_mode",
];

impl MixLoraConfig {
    /// The attention LoRA config, when `target_modules` is set.
    fn attention_config(&self) -> Option<LoraConfig> {
        let t = self.target_modules.clone()?;
        let mut lc = LoraConfig::new(self.r, self.lora_alpha, Vec::<String>::new());
        lc.target_modules = Some(t);
        Some(lc)
    }

    /// The feed-forward block sites this config adapts in `model`.
    ///
    /// # Errors
    /// [`peft_core::Error::NoTargetMatched`] when the model has no (selected) block site; regex errors.
    pub fn blocks(&self, model: &dyn Module) -> AdapterResult<Vec<BlockSite>> {
        let sites = block_sites(model);
        let sites: Vec<BlockSite> = match &self.block_modules {
            None => sites,
            Some(p) => {
                let spec = target_spec(p, None)?;
                let keep = spec.select(sites.iter().map(|s| (s.path(), false)))?;
                sites.into_iter().filter(|s| keep.iter().any(|k| k == s.path())).collect()
            }
        };
        if sites.is_empty() {
            return Err(Error::NoTargetMatched { patterns: vec!["a feed-forward block site".into()] }.into());
        }
        Ok(sites)
    }
}

impl TunerConfig for MixLoraConfig {
    fn peft_type(&self) -> &str {
        MIXLORA_TYPE
    }
    fn describe(&self) -> String {
        format!(
            "MixLoRA E={} top-{} r={} alpha={} on FFN + {}",
            self.num_experts,
            self.top_k,
            self.r,
            self.lora_alpha,
            self.target_modules.as_ref().map_or("-".into(), describe_targets)
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        config_json(self, MIXLORA_TYPE)
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
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.validate()?;
        let name = cx.name;
        let sites = self.blocks(model)?;
        let attention = match self.attention_config() {
            Some(lc) => {
                let lsites = crate::tuner::lora_sites(model, &lc)?;
                Some(crate::tuner::attach_lora(&lc, &lsites, name, cx.seed, |site, spec, rng| {
                    Ok(LoraLinear::new(site.path(), name, site.base().as_ref(), spec, rng)?)
                })?)
            }
            None => None,
        };
        let blocks = BlockTuner::attach(name, MIXLORA_TYPE, &sites, |site| {
            MixLoraFfn::new(name, site.ffn().clone(), self, &mut site_rng(cx.seed, name, site.path()))
        });
        let blocks = match blocks {
            Ok(b) => b,
            Err(e) => {
                if let Some(a) = &attention {
                    let _ = a.detach(false);
                }
                return Err(e);
            }
        };
        Ok(Box::new(MixLoraTuner { name: name.into(), blocks, attention }))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        for site in self.blocks(model)? {
            let lins = sites_of(site.ffn());
            let paths: Vec<&str> = lins.iter().map(Linear::path).collect();
            let d = lins.first().map_or(0, Linear::in_features);
            expect_tensor(file, &format!("{}.mixlora_router.weight", common_prefix(&paths)), &[self.num_experts, d])?;
            for e in 0..self.num_experts {
                for l in &lins {
                    let p = l.path();
                    expect_tensor(file, &format!("{p}.experts.{e}.lora_A.weight"), &[self.r, l.in_features()])?;
                    expect_tensor(file, &format!("{p}.experts.{e}.lora_B.weight"), &[l.out_features(), self.r])?;
                }
            }
        }
        if let Some(lc) = self.attention_config() {
            lc.preflight(model, file)?;
        }
        Ok(())
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl PeftConfig for MixLoraConfig {
    const PEFT_TYPE: &'static str = MIXLORA_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (MixLoraConfig, _) = parse_config(v, MIXLORA_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "mixlora_tests.rs"]
mod tests;
