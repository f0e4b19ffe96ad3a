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
use std::sync::{Arc, Mutex};

use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::adapter::{
    site_rng, AdapterError, AdapterResult, AdapterTensors, BlockTuner, InjectCx, LinearTuner, ModulePattern,
    PeftConfig, SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{block_sites, BlockAdapter, BlockSite, Ctx, Ffn, Linear, Module};
use peft_core::{Error, Param, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::layer::LoraLinear;
use crate::structured::{config_json, describe_targets, expect_tensor, kaiming, parse_config, target_spec};
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
        self.check().map_err(|e| match e {
            Error::Invalid { msg, .. } => AdapterError::config(MIXLORA_TYPE, "<config>", msg),
            e => e.into(),
        })
    }

    fn check(&self) -> Result<()> {
        if self.r == 0 || self.num_experts == 0 {
            crate::bail!("MixLoraConfig", "r and num_experts must be positive");
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            crate::bail!("MixLoraConfig", "top_k = {} must be in 1..={}", self.top_k, self.num_experts);
        }
        if self.router_init_range.is_nan()
            || self.router_init_range < 0.0
            || !(0.0..1.0).contains(&self.jitter_noise)
            || !self.lora_alpha.is_finite()
        {
            crate::bail!("MixLoraConfig", "router_init_range ≥ 0, 0 ≤ jitter_noise < 1 and a finite alpha required");
        }
        let strategy = self.routing_strategy;
        let misplaced = |set: bool, key: &str, owner: RoutingStrategy| -> Result<()> {
            if set && strategy != owner {
                crate::bail!("MixLoraConfig", "`{key}` belongs to routing_strategy {owner:?}, not {strategy:?}");
            }
            Ok(())
        };
        misplaced(self.top_p.is_some(), "top_p", RoutingStrategy::Dynamic)?;
        misplaced(self.temperature.is_some(), "temperature", RoutingStrategy::Dynamic)?;
        misplaced(self.expert_capacity.is_some(), "expert_capacity", RoutingStrategy::Switch)?;
        misplaced(self.router_z_loss_coef.is_some(), "router_z_loss_coef", RoutingStrategy::Switch)?;
        misplaced(self.ffn_dropout.is_some(), "ffn_dropout", RoutingStrategy::Switch)?;
        if !(self.router_aux_loss_coef >= 0.0 && self.router_aux_loss_coef.is_finite()) {
            crate::bail!(
                "MixLoraConfig",
                "router_aux_loss_coef = {} must be finite and ≥ 0",
                self.router_aux_loss_coef
            );
        }
        self.router().map(|_| ())
    }

    /// The router rule with the strategy's defaults filled in.
    fn router(&self) -> Result<Router> {
        Ok(match self.routing_strategy {
            RoutingStrategy::TopK => Router::TopK(self.top_k),
            RoutingStrategy::Dynamic => {
                let (top_p, temperature) = (self.top_p.unwrap_or(0.8), self.temperature.unwrap_or(0.0));
                if !(top_p > 0.0 && top_p <= 1.0 && temperature >= 0.0 && temperature.is_finite()) {
                    crate::bail!(
                        "MixLoraConfig",
                        "top_p = {top_p} must be in (0, 1] and temperature = {temperature} ≥ 0"
                    );
                }
                Router::Dynamic { top_p, temperature }
            }
            RoutingStrategy::Switch => {
                if self.top_k != 1 {
                    crate::bail!("MixLoraConfig", "routing_strategy Switch routes top-1; top_k = {} given", self.top_k);
                }
                let capacity = self.expert_capacity.unwrap_or(32);
                let z_coef = self.router_z_loss_coef.unwrap_or(0.001);
                let dropout = self.ffn_dropout.unwrap_or(0.0);
                if capacity == 0 || !(z_coef >= 0.0 && z_coef.is_finite()) || !(0.0..1.0).contains(&dropout) {
                    crate::bail!(
                        "MixLoraConfig",
                        "expert_capacity = {capacity} must be positive, router_z_loss_coef = {z_coef} finite and ≥ 0, \
                         ffn_dropout = {dropout} in [0, 1)"
                    );
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

/// The projections of `ffn` in data-flow order (`fc1, fc2` or `gate, up, down`).
fn sites_of(ffn: &Ffn) -> Vec<Linear> {
    ffn.linears()
}

/// The longest common module path of `paths` (`encoder.layer.3` for BERT's `intermediate.dense` and
/// `output.dense`), the prefix of the router key.
fn common_prefix(paths: &[&str]) -> String {
    let split: Vec<Vec<&str>> = paths.iter().map(|p| p.split('.').collect()).collect();
    let Some(first) = split.first() else { return String::new() };
    let mut n = 0;
    while n < first.len() - 1 && split.iter().all(|s| s.len() > n + 1 && s[n] == first[n]) {
        n += 1;
    }
    first[..n].join(".")
}

/// One expert's LoRA on one projection.
struct ExpertLora {
    a: Param,
    b: Param,
}

impl ExpertLora {
    fn apply(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        Ok(x.linear(&self.a.tensor(), None)?.linear(&self.b.tensor(), None)?.mul_scalar(s))
    }
}

/// What the router decided for a batch of tokens.
pub struct Routing {
    /// Router logits `[N, E]` (of the jittered input in training).
    pub logits: Tensor,
    /// Router probabilities `[N, E]`.
    pub probs: Tensor,
    /// Each expert's output weight per token `[N, E]`, zero for experts not run on the token: top-k renormalised to
    /// sum 1; dynamic: the kept (temperature-divided) probabilities; Switch: `p_max` on the chosen expert, all zero
    /// for a dropped token.
    pub weights: Tensor,
    /// The chosen experts per token, best first (Switch: the top-1 before the capacity check), as counted by the
    /// load-balancing loss.
    pub choices: Vec<Vec<usize>>,
    /// Switch only: tokens over their expert's capacity (FFN output `p_max · x`); all false otherwise.
    pub dropped: Vec<bool>,
}

/// A MixLoRA mixture around one FFN.
pub struct MixLoraFfn {
    name: String,
    prefix: String,
    kind: Ffn,
    sites: Vec<Linear>,
    router: Router,
    scaling: f32,
    jitter: f64,
    aux_coef: f64,
    gate: Param,
    /// `experts[e][projection]`, projections in [`Ffn::linears`] order.
    experts: Vec<Vec<ExpertLora>>,
    last_aux: Mutex<Option<Tensor>>,
}

impl MixLoraFfn {
    /// Builds adapter `name` around `kind` (a feed-forward block), initialised from `rng`. The router is saved
    /// under the common module path of the projections.
    ///
    /// # Errors
    /// Invalid config; projections whose widths do not chain.
    pub fn new(name: &str, kind: Ffn, cfg: &MixLoraConfig, rng: &mut impl Rng) -> AdapterResult<Self> {
        cfg.validate()?;
        let sites = sites_of(&kind);
        let paths: Vec<&str> = sites.iter().map(Linear::path).collect();
        let prefix = common_prefix(&paths);
        let (Some(first), Some(down)) = (sites.first(), sites.last()) else {
            crate::bail!("mixlora", "a feed-forward block without projections");
        };
        let d = first.in_features();
        if down.out_features() != d
            || sites[..sites.len() - 1].iter().any(|s| s.in_features() != d || s.out_features() != down.in_features())
        {
            crate::bail!("mixlora", "the projections of `{prefix}` do not form an FFN of width {d}");
        }
        let n = Normal::new(0.0f32, cfg.router_init_range as f32)
            .map_err(|e| AdapterError::config(MIXLORA_TYPE, "router_init_range", e.to_string()))?;
        let gate = Array2::from_shape_fn((cfg.num_experts, d), |_| n.sample(rng));
        let gate = Param::new(format!("{prefix}.mixlora_router.{name}.weight"), gate.into_dyn(), true);
        let r = cfg.r;
        let experts = (0..cfg.num_experts)
            .map(|e| {
                sites
                    .iter()
                    .map(|s| {
                        let (i, o, p) = (s.in_features(), s.out_features(), s.path());
                        ExpertLora {
                            a: Param::new(
                                format!("{p}.experts.{e}.lora_A.{name}.weight"),
                                kaiming(i, r, i, rng).into_dyn(),
                                true,
                            ),
                            b: Param::new(
                                format!("{p}.experts.{e}.lora_B.{name}.weight"),
                                ArrayD::zeros(IxDyn(&[o, r])),
                                true,
                            ),
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(MixLoraFfn {
            name: name.to_string(),
            prefix,
            kind,
            sites,
            router: cfg.router()?,
            scaling: cfg.scaling(),
            jitter: cfg.jitter_noise,
            aux_coef: cfg.router_aux_loss_coef,
            gate,
            experts,
            last_aux: Mutex::new(None),
        })
    }

    /// The router weight `[E, d]`.
    pub fn router(&self) -> &Param {
        &self.gate
    }

    /// Expert `e`'s `(lora_A, lora_B)` on each projection, in FFN order.
    pub fn expert(&self, e: usize) -> Vec<(&Param, &Param)> {
        self.experts.get(e).map(|v| v.iter().map(|x| (&x.a, &x.b)).collect()).unwrap_or_default()
    }

    /// The saved tensors, keyed relative to the model root: the router at `<prefix>.mixlora_router.weight`, the
    /// experts at `<projection>.experts.<e>.lora_{A,B}.weight`.
    fn saved(&self) -> Vec<(String, Param)> {
        let mut v = vec![(format!("{}.mixlora_router.weight", self.prefix), self.gate.clone())];
        for (e, projs) in self.experts.iter().enumerate() {
            for (s, x) in self.sites.iter().zip(projs) {
                v.push((format!("{}.experts.{e}.lora_A.weight", s.path()), x.a.clone()));
                v.push((format!("{}.experts.{e}.lora_B.weight", s.path()), x.b.clone()));
            }
        }
        v
    }

    /// The module path the router is saved under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The feed-forward block this mixture wraps.
    pub fn ffn(&self) -> &Ffn {
        &self.kind
    }

    /// Routes tokens `x [N, d]` as one sequence (the Switch capacity counts over all `N` rows).
    ///
    /// # Errors
    /// Shape errors.
    pub fn route(&self, x: &Tensor, ctx: &Ctx) -> Result<Routing> {
        let n = x.shape().first().copied().unwrap_or(0);
        self.route_seq(x, n, ctx)
    }

    /// Routes tokens `x [N, d]` that are sequences of `seq_len` consecutive rows (`[B, L, d]` flattened; the
    /// Switch capacity is counted per sequence, in row order, as in Switch Transformers).
    ///
    /// # Errors
    /// Shape errors; [`Error::Invalid`] when `x` is not 2-D.
    pub fn route_seq(&self, x: &Tensor, seq_len: usize, ctx: &Ctx) -> Result<Routing> {
        if x.rank() != 2 {
            crate::bail!("mixlora", "route expects tokens [N, d], got shape {:?}", x.shape());
        }
        let xr = if ctx.train && self.jitter > 0.0 {
            let j = self.jitter as f32;
            let noise =
                ctx.with_rng(|rng| ArrayD::from_shape_fn(IxDyn(x.shape()), |_| rng.gen_range(1.0 - j..=1.0 + j)));
            x.mul(&Tensor::new(noise))?
        } else {
            x.clone()
        };
        let logits = xr.linear(&self.gate.tensor(), None)?;
        let probs = logits.softmax(1)?;
        let (n, e) = (probs.shape()[0], probs.shape()[1]);
        let pv = probs.data();
        // Experts by decreasing probability; the stable sort keeps the lower expert first on ties (torch's argmax
        // also returns the first maximum).
        let sorted = |t: usize| {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| pv[[t, b]].total_cmp(&pv[[t, a]]));
            order
        };
        let mut dropped = vec![false; n];
        let choices: Vec<Vec<usize>> = match self.router {
            Router::TopK(k) => (0..n).map(|t| sorted(t)[..k].to_vec()).collect(),
            Router::Dynamic { top_p, temperature } => {
                let div = if temperature > 0.0 { temperature as f32 } else { 1.0 };
                (0..n)
                    .map(|t| {
                        let order = sorted(t);
                        let mut cum = 0f32;
                        let keep = order
                            .iter()
                            .position(|&c| {
                                cum += pv[[t, c]] / div;
                                f64::from(cum) > top_p
                            })
                            .map_or(e, |i| i + 1);
                        order[..keep].to_vec()
                    })
                    .collect()
            }
            Router::Switch { capacity, .. } => {
                let mut used = vec![0usize; e];
                (0..n)
                    .map(|t| {
                        if t % seq_len.max(1) == 0 {
                            used.fill(0);
                        }
                        let c = sorted(t)[0];
                        used[c] += 1;
                        dropped[t] = used[c] > capacity;
                        vec![c]
                    })
                    .collect()
            }
        };
        let mut mask = ArrayD::<f32>::zeros(IxDyn(&[n, e]));
        for (t, cs) in choices.iter().enumerate() {
            if !dropped[t] {
                for &c in cs {
                    mask[[t, c]] = 1.0;
                }
            }
        }
        let pm = probs.mul(&Tensor::new(mask))?;
        let weights = match self.router {
            Router::TopK(_) => pm.div(&pm.sum(&[1], true)?)?,
            Router::Dynamic { temperature, .. } if temperature > 0.0 => pm.mul_scalar((1.0 / temperature) as f32),
            Router::Dynamic { .. } | Router::Switch { .. } => pm,
        };
        Ok(Routing { logits, probs, weights, choices, dropped })
    }

    /// The Mixtral load-balancing loss `E · Σ_{k,e} f[k,e]·P[e]` over the tokens with `valid[t]` (all when `None`),
    /// not multiplied by the coefficient.
    ///
    /// # Errors
    /// Shape errors; [`Error::Invalid`] when no token is valid or the mask length differs.
    pub fn aux_loss(&self, routing: &Routing, valid: Option<&[bool]>) -> Result<Tensor> {
        let rows = valid_rows(routing.choices.len(), valid)?;
        let e = self.experts.len();
        let mut f = vec![0f32; e];
        for &t in &rows {
            for &c in &routing.choices[t] {
                f[c] += 1.0 / rows.len() as f32;
            }
        }
        let p = routing.probs.index_select(0, &rows)?.mean(&[0], false)?;
        Ok(p.mul(&Tensor::from_vec(f, &[e])?)?.sum_all().mul_scalar(e as f32))
    }

    /// The router z-loss `mean_t(logsumexp(logits_t)²)` over the valid tokens (all when `None`), unweighted.
    ///
    /// # Errors
    /// As [`MixLoraFfn::aux_loss`].
    pub fn z_loss(&self, routing: &Routing, valid: Option<&[bool]>) -> Result<Tensor> {
        let rows = valid_rows(routing.choices.len(), valid)?;
        let l = routing.logits.index_select(0, &rows)?;
        // logsumexp(l) = l_0 − log_softmax(l)_0, stable and differentiable.
        let lse = l.narrow(1, 0, 1)?.sub(&l.log_softmax(1)?.narrow(1, 0, 1)?)?;
        Ok(lse.square().mean_all())
    }

    /// The router losses over the valid tokens, with the strategy's weighted sum for the trainer.
    ///
    /// # Errors
    /// As [`MixLoraFfn::aux_loss`].
    pub fn router_losses(&self, routing: &Routing, valid: Option<&[bool]>) -> Result<RouterLosses> {
        let load_balance = self.aux_loss(routing, valid)?;
        let mut weighted = load_balance.mul_scalar(self.aux_coef as f32);
        let z = match self.router {
            Router::Switch { z_coef, .. } => {
                let z = self.z_loss(routing, valid)?;
                weighted = weighted.add(&z.mul_scalar(z_coef as f32))?;
                Some(z)
            }
            _ => None,
        };
        Ok(RouterLosses { load_balance, z, weighted })
    }

    /// `Σ_e w_e (out_e(x) − base(x))` for tokens `x [N, d]`, each expert run only on its (kept) tokens.
    fn moe_delta(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let s = self.scaling;
        let n = x.shape()[0];
        let Some(down) = self.sites.last().map(Linear::base) else {
            crate::bail!("mixlora", "a feed-forward block without projections");
        };
        let d_out = down.out_features();
        let mut acc = Tensor::zeros(&[n, d_out]);
        // Base projections once for all experts.
        let pre: Vec<Tensor> = match &self.kind {
            Ffn::Mlp(m) => vec![m.fc1.base().forward(x)?],
            Ffn::SwiGlu(g) => vec![g.gate.base().forward(x)?, g.up.base().forward(x)?],
        };
        let w_down = Tensor::new(down.dense_weight()?);
        for (e, ex) in self.experts.iter().enumerate() {
            let rows: Vec<usize> = (0..n).filter(|&t| !routing.dropped[t] && routing.choices[t].contains(&e)).collect();
            if rows.is_empty() {
                continue;
            }
            let xe = x.index_select(0, &rows)?;
            let (h, h0) = match &self.kind {
                Ffn::Mlp(m) => {
                    let act = m.act;
                    let i0 = pre[0].index_select(0, &rows)?;
                    let i = i0.add(&ex[0].apply(&xe, s)?)?;
                    (act.apply(&i), act.apply(&i0))
                }
                Ffn::SwiGlu(_) => {
                    let (g0, u0) = (pre[0].index_select(0, &rows)?, pre[1].index_select(0, &rows)?);
                    let g = g0.add(&ex[0].apply(&xe, s)?)?;
                    let u = u0.add(&ex[1].apply(&xe, s)?)?;
                    (g.silu().mul(&u)?, g0.silu().mul(&u0)?)
                }
            };
            let Some(last) = ex.last() else { crate::bail!("mixlora", "an expert without projections") };
            let de = h.sub(&h0)?.linear(&w_down, None)?.add(&last.apply(&h, s)?)?;
            let we = routing.weights.narrow(1, e, 1)?.index_select(0, &rows)?;
            let index = ArrayD::from_shape_fn(IxDyn(&[rows.len(), d_out]), |ix| rows[ix[0]]);
            acc = acc.scatter_add(0, &index, &de.mul(&we)?)?;
        }
        Ok(acc)
    }

    /// The mixture output `Σ_e w_e out_e(x)` (+ `p_max · x` for Switch's dropped tokens, then Switch's FFN
    /// dropout in training) for tokens `x [N, d]`, given `base [N, d]`, the base FFN output of the same tokens:
    /// `(Σ_e w_e)·base + Σ_e w_e (out_e(x) − base(x))`; top-k's weights sum to 1, so there it is `base + Σ…`
    /// exactly.
    fn mixture(&self, x: &Tensor, base: &Tensor, routing: &Routing, ctx: &Ctx) -> Result<Tensor> {
        let delta = self.moe_delta(x, routing)?;
        if let Router::TopK(_) = self.router {
            return base.add(&delta);
        }
        let mut y = base.mul(&routing.weights.sum(&[1], true)?)?.add(&delta)?;
        let rows: Vec<usize> = (0..routing.dropped.len()).filter(|&t| routing.dropped[t]).collect();
        if !rows.is_empty() {
            let p_max = routing.probs.index_select(0, &rows)?.max(1, true)?;
            let pass = x.index_select(0, &rows)?.mul(&p_max)?;
            let index = ArrayD::from_shape_fn(IxDyn(pass.shape()), |ix| rows[ix[0]]);
            y = y.scatter_add(0, &index, &pass)?;
        }
        match self.router {
            Router::Switch { dropout, .. } if ctx.train && dropout > 0.0 => {
                ctx.with_rng(|rng| y.dropout(dropout, true, rng))
            }
            _ => Ok(y),
        }
    }

    /// The MoE FFN output for `x [.., d]` and the router losses over the tokens marked in `valid` (one flag per
    /// token of `x`'s leading axes; `None`: all). With three or more axes the second-to-last is the sequence (for
    /// Switch's capacity); a 2-D `x` is one sequence.
    ///
    /// # Errors
    /// Shape errors; a mask of the wrong length.
    pub fn forward(&self, x: &Tensor, valid: Option<&[bool]>, ctx: &Ctx) -> Result<(Tensor, RouterLosses)> {
        let shape = x.shape().to_vec();
        let (x2, seq) = tokens(x)?;
        let base = match &self.kind {
            Ffn::Mlp(m) => m.fc2.base().forward(&m.act.apply(&m.fc1.base().forward(&x2)?))?,
            Ffn::SwiGlu(g) => {
                g.down.base().forward(&g.gate.base().forward(&x2)?.silu().mul(&g.up.base().forward(&x2)?)?)?
            }
        };
        let routing = self.route_seq(&x2, seq, ctx)?;
        let losses = self.router_losses(&routing, valid)?;
        let y = self.mixture(&x2, &base, &routing, ctx)?;
        Ok((y.reshape(&shape)?, losses))
    }

    /// Takes the weighted router loss recorded by the last block-site forward.
    pub fn take_aux_loss(&self) -> Option<Tensor> {
        self.last_aux.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Flattens `x [.., d]` to tokens `[N, d]` and gives the sequence length (second-to-last axis with three or more
/// axes, else `N`).
fn tokens(x: &Tensor) -> Result<(Tensor, usize)> {
    let shape = x.shape();
    let d = *shape.last().unwrap_or(&0);
    let n = x.len() / d.max(1);
    let seq = if shape.len() >= 3 { shape[shape.len() - 2] } else { n };
    Ok((x.reshape(&[n, d])?, seq))
}

/// The token rows counted by a loss: those with `valid[t]`, or all.
fn valid_rows(n: usize, valid: Option<&[bool]>) -> Result<Vec<usize>> {
    let rows: Vec<usize> = match valid {
        Some(v) if v.len() != n => crate::bail!("mixlora", "{} mask entries for {n} tokens", v.len()),
        Some(v) => (0..n).filter(|&t| v[t]).collect(),
        None => (0..n).collect(),
    };
    if rows.is_empty() {
        crate::bail!("mixlora", "no valid token for the router loss");
    }
    Ok(rows)
}

impl BlockAdapter for MixLoraFfn {
    fn name(&self) -> &str {
        &self.name
    }

    /// The mixture with `base(x)` (the block as it would be without this adapter) standing for the base FFN
    /// output: top-k gives `base(x) + Σ_e w_e (out_e(x) − base(x))`. Records the weighted router loss over the
    /// tokens the context's [`peft_core::nn::TokenMask`] marks real (all when it has none or another shape).
    fn forward(&self, x: &Tensor, base: &dyn Fn(&Tensor) -> Result<Tensor>, ctx: &Ctx) -> Result<Tensor> {
        let h = base(x)?;
        let (x2, seq) = tokens(x)?;
        let n = x2.shape()[0];
        let routing = self.route_seq(&x2, seq, ctx)?;
        let valid = ctx.token_mask().and_then(|m| m.flags_for(n));
        let losses = self.router_losses(&routing, valid)?;
        *self.last_aux.lock().unwrap_or_else(|p| p.into_inner()) = Some(losses.weighted);
        let h2 = h.reshape(&[n, h.len() / n.max(1)])?;
        self.mixture(&x2, &h2, &routing, ctx)?.reshape(h.shape())
    }

    fn params(&self) -> Vec<Param> {
        let mut v = vec![self.gate.clone()];
        for ex in &self.experts {
            for x in ex {
                v.push(x.a.clone());
                v.push(x.b.clone());
            }
        }
        v
    }
}

/// Keys relative to the model root, not to the block site (the experts live under the projections' paths):
/// [`MixLoraTuner`] writes them as they are.
impl SavedTensors for MixLoraFfn {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        self.saved()
    }
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
