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
//! `router_aux_loss_coef` together with Switch's z-loss) and, for FFNs driven through a model's residual site,
//! [`MixLoraModel::take_aux_loss`] collects the weighted sum so a trainer can add it to its loss.
//!
//! Wiring: [`MixLoraFfn`] wraps an existing FFN's [`Linear`] sites (their frozen bases are used; adapters attached
//! to those sites are not part of the experts). In a post-norm (BERT) encoder layer the FFN residual site
//! (`encoder.layer.<i>.output`) sees exactly the FFN input, so [`MixLoraModel`] attaches the wrapper there as a
//! [`ResidualAdapter`] returning `h + Σ_e w_e (out_e(x) − base(x))` (with `h` the block's base FFN output after its
//! dropout). Pre-norm blocks (LLaMA) feed the residual site the stream *before* the norm, so there call
//! [`MixLoraFfn::forward`] on the normed input from the block. Experts are not mergeable (input-dependent
//! routing); the attention LoRAs are.
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
//! `<ffn prefix>.mixlora_router.weight` `[E, d]`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::adapter::ModulePattern;
use peft_core::nn::{linear_sites, residual_sites, Activation, Ctx, Linear, Module, ResidualAdapter};
use peft_core::{Error, Param, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::structured::{kaiming, load_param, read_adapter, site_rng, write_adapter, PREFIX};
use crate::{LoraConfig, LoraModel};

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
    /// Suffix of the FFN residual site (BERT: `"output"`, giving prefix `encoder.layer.<i>`).
    pub ffn_residual: String,
    /// FFN up projection below the prefix (BERT: `"intermediate.dense"`).
    pub ffn_up: String,
    /// FFN down projection below the prefix (BERT: `"output.dense"`).
    pub ffn_down: String,
    /// FFN activation (`hidden_act` name, e.g. `"gelu"`).
    pub hidden_act: String,
    /// Informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
}

impl MixLoraConfig {
    /// The README example (`E = 8`, `k = 2`, r = 8, α = 16, router std 0.02, aux coef 0.01) on a BERT layer:
    /// experts on `intermediate.dense`/`output.dense`, LoRA on `attention` (e.g. `["query", "value"]`).
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
            ffn_residual: "output".into(),
            ffn_up: "intermediate.dense".into(),
            ffn_down: "output.dense".into(),
            hidden_act: "gelu".into(),
            task_type: None,
            inference_mode: false,
        }
    }

    /// Checks the counts.
    ///
    /// # Errors
    /// [`Error::Invalid`] for `r = 0`, no experts, `top_k` of 0 or above `num_experts`, bad numbers or an unknown
    /// activation.
    pub fn validate(&self) -> Result<()> {
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
        Activation::from_hf(&self.hidden_act)?;
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

/// The FFN a [`MixLoraFfn`] wraps (handles to the model's sites).
#[derive(Clone)]
pub enum FfnKind {
    /// `fc2(act(fc1(x)))` (BERT, ViT, Whisper).
    Mlp {
        /// Up projection.
        fc1: Linear,
        /// Down projection.
        fc2: Linear,
        /// Activation.
        act: Activation,
    },
    /// `down(silu(gate(x)) ⊙ up(x))` (LLaMA).
    SwiGlu {
        /// Gate projection.
        gate: Linear,
        /// Up projection.
        up: Linear,
        /// Down projection.
        down: Linear,
    },
}

impl FfnKind {
    fn sites(&self) -> Vec<&Linear> {
        match self {
            FfnKind::Mlp { fc1, fc2, .. } => vec![fc1, fc2],
            FfnKind::SwiGlu { gate, up, down } => vec![gate, up, down],
        }
    }
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
    kind: FfnKind,
    router: Router,
    scaling: f32,
    jitter: f64,
    aux_coef: f64,
    gate: Param,
    /// `experts[e][projection]`, projections in [`FfnKind`] order.
    experts: Vec<Vec<ExpertLora>>,
    last_aux: Mutex<Option<Tensor>>,
}

impl MixLoraFfn {
    /// Builds adapter `name` around `kind` (the FFN at module path `prefix`), initialised from `rng`.
    ///
    /// # Errors
    /// Invalid config; projections whose widths do not chain.
    pub fn new(prefix: &str, name: &str, kind: FfnKind, cfg: &MixLoraConfig, rng: &mut impl Rng) -> Result<Self> {
        cfg.validate()?;
        let sites = kind.sites();
        let d = sites[0].in_features();
        let down = sites[sites.len() - 1];
        if down.out_features() != d
            || sites[..sites.len() - 1].iter().any(|s| s.in_features() != d || s.out_features() != down.in_features())
        {
            crate::bail!("mixlora", "the projections of `{prefix}` do not form an FFN of width {d}");
        }
        let n = Normal::new(0.0f32, cfg.router_init_range as f32)
            .map_err(|e| Error::Invalid { op: "mixlora", msg: e.to_string() })?;
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
            prefix: prefix.to_string(),
            kind,
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

    /// The saved tensors by file key.
    fn saved(&self) -> Vec<(String, Param)> {
        let mut v = vec![(format!("{PREFIX}{}.mixlora_router.weight", self.prefix), self.gate.clone())];
        for (e, projs) in self.experts.iter().enumerate() {
            for (s, x) in self.kind.sites().iter().zip(projs) {
                v.push((format!("{PREFIX}{}.experts.{e}.lora_A.weight", s.path()), x.a.clone()));
                v.push((format!("{PREFIX}{}.experts.{e}.lora_B.weight", s.path()), x.b.clone()));
            }
        }
        v
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
        let d_out = self.kind.sites().last().expect("peft-rs bug: FFN has sites").out_features();
        let mut acc = Tensor::zeros(&[n, d_out]);
        // Base projections once for all experts.
        let pre: Vec<Tensor> = match &self.kind {
            FfnKind::Mlp { fc1, .. } => vec![fc1.base().forward(x)?],
            FfnKind::SwiGlu { gate, up, .. } => vec![gate.base().forward(x)?, up.base().forward(x)?],
        };
        let down = self.kind.sites().last().expect("peft-rs bug: FFN has sites").base();
        let w_down = Tensor::new(down.dense_weight()?);
        for (e, ex) in self.experts.iter().enumerate() {
            let rows: Vec<usize> = (0..n).filter(|&t| !routing.dropped[t] && routing.choices[t].contains(&e)).collect();
            if rows.is_empty() {
                continue;
            }
            let xe = x.index_select(0, &rows)?;
            let (h, h0) = match &self.kind {
                FfnKind::Mlp { act, .. } => {
                    let i0 = pre[0].index_select(0, &rows)?;
                    let i = i0.add(&ex[0].apply(&xe, s)?)?;
                    (act.apply(&i), act.apply(&i0))
                }
                FfnKind::SwiGlu { .. } => {
                    let (g0, u0) = (pre[0].index_select(0, &rows)?, pre[1].index_select(0, &rows)?);
                    let g = g0.add(&ex[0].apply(&xe, s)?)?;
                    let u = u0.add(&ex[1].apply(&xe, s)?)?;
                    (g.silu().mul(&u)?, g0.silu().mul(&u0)?)
                }
            };
            let last = ex.last().expect("peft-rs bug: expert has projections");
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
            FfnKind::Mlp { fc1, fc2, act } => fc2.base().forward(&act.apply(&fc1.base().forward(&x2)?))?,
            FfnKind::SwiGlu { gate, up, down } => {
                down.base().forward(&gate.base().forward(&x2)?.silu().mul(&up.base().forward(&x2)?)?)?
            }
        };
        let routing = self.route_seq(&x2, seq, ctx)?;
        let losses = self.router_losses(&routing, valid)?;
        let y = self.mixture(&x2, &base, &routing, ctx)?;
        Ok((y.reshape(&shape)?, losses))
    }

    /// Takes the weighted router loss recorded by the last residual-site forward.
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

impl ResidualAdapter for MixLoraFfn {
    fn name(&self) -> &str {
        &self.name
    }

    /// The mixture with `h` (the block's base FFN output after its dropout) standing for the base FFN output:
    /// top-k gives `h + Σ_e w_e (out_e(x) − base(x))`. Records the weighted router loss over all tokens.
    fn forward(&self, h: &Tensor, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (x2, seq) = tokens(x)?;
        let routing = self.route_seq(&x2, seq, ctx)?;
        let losses = self.router_losses(&routing, None)?;
        *self.last_aux.lock().unwrap_or_else(|p| p.into_inner()) = Some(losses.weighted);
        let h2 = h.reshape(&[x2.shape()[0], h.len() / x2.shape()[0].max(1)])?;
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

/// A model with MixLoRA on its post-norm FFNs (through their residual sites) and LoRA on attention.
pub struct MixLoraModel {
    /// The config.
    pub config: MixLoraConfig,
    /// The adapter name.
    pub name: String,
    /// The FFN mixtures, one per layer.
    pub ffns: Vec<Arc<MixLoraFfn>>,
    /// The attention LoRA, when `target_modules` is set.
    pub attention: Option<LoraModel>,
}

impl MixLoraModel {
    /// Finds every FFN residual site `<prefix>.<ffn_residual>` with linear sites `<prefix>.<ffn_up>` and
    /// `<prefix>.<ffn_down>`, attaches a [`MixLoraFfn`] there, and plain LoRA on `target_modules`.
    ///
    /// # Errors
    /// Invalid config; [`Error::NoTargetMatched`] when no FFN (or no attention target) is found.
    pub fn new(model: &dyn Module, config: MixLoraConfig, name: &str, seed: u64) -> Result<Self> {
        config.validate()?;
        let act = Activation::from_hf(&config.hidden_act)?;
        let lins = linear_sites(model);
        let find = |p: String| lins.iter().find(|l| l.path() == p).cloned();
        let suffix = format!(".{}", config.ffn_residual);
        // Build every mixture before touching the model (residual sites cannot detach).
        let mut built = Vec::new();
        for site in residual_sites(model) {
            let Some(prefix) = site.path().strip_suffix(&suffix) else { continue };
            let (Some(fc1), Some(fc2)) =
                (find(format!("{prefix}.{}", config.ffn_up)), find(format!("{prefix}.{}", config.ffn_down)))
            else {
                continue;
            };
            if site.adapters().iter().any(|a| a.name() == name) {
                crate::bail!("mixlora", "adapter `{name}` already exists on `{}`", site.path());
            }
            let kind = FfnKind::Mlp { fc1, fc2, act };
            let ffn = Arc::new(MixLoraFfn::new(prefix, name, kind, &config, &mut site_rng(seed, name, prefix))?);
            built.push((site, ffn));
        }
        if built.is_empty() {
            return Err(Error::NoTargetMatched {
                patterns: vec![format!(
                    "FFN `<prefix>.{}` with `{}`/`{}`",
                    config.ffn_residual, config.ffn_up, config.ffn_down
                )],
            });
        }
        // Attention LoRA before attaching the mixtures: LoraModel freezes every parameter it sees as a base
        // parameter, which would include the routers and experts.
        let attention = match &config.target_modules {
            Some(t) => {
                let mut lc = LoraConfig::new(config.r, config.lora_alpha, Vec::<String>::new());
                lc.target_modules = Some(t.clone());
                Some(LoraModel::new(model, lc, name, seed)?)
            }
            None => None,
        };
        let mut ffns = Vec::new();
        for (site, ffn) in built {
            for p in ffn.kind.sites().iter().flat_map(|l| l.base().params()) {
                p.set_trainable(false);
            }
            site.attach(ffn.clone())?;
            ffns.push(ffn);
        }
        Ok(MixLoraModel { config, name: name.to_string(), ffns, attention })
    }

    /// The trainable parameters: routers and experts, then the attention LoRA.
    pub fn trainable_params(&self) -> Vec<Param> {
        let mut v: Vec<Param> = self.ffns.iter().flat_map(|f| f.params()).collect();
        if let Some(a) = &self.attention {
            v.extend(a.trainable_params());
        }
        v
    }

    /// The sum over FFNs of the weighted router loss ([`RouterLosses::weighted`]) recorded by the last forward
    /// (cleared), for the trainer to add to its loss; `None` when no forward ran since the last call.
    ///
    /// # Errors
    /// Shape errors (never for scalars).
    pub fn take_aux_loss(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for f in &self.ffns {
            if let Some(a) = f.take_aux_loss() {
                total = Some(match total {
                    Some(t) => t.add(&a)?,
                    None => a,
                });
            }
        }
        Ok(total)
    }

    fn saved(&self) -> Vec<(String, Param)> {
        let mut v: Vec<(String, Param)> = self.ffns.iter().flat_map(|f| f.saved()).collect();
        if let Some(a) = &self.attention {
            if let Ok(set) = a.adapter(&self.name) {
                for (site, l) in &set.layers {
                    v.push((format!("{PREFIX}{}.lora_A.weight", site.path()), l.lora_a().clone()));
                    v.push((format!("{PREFIX}{}.lora_B.weight", site.path()), l.lora_b().clone()));
                }
            }
        }
        v
    }

    /// The tensors as saved, by file key.
    pub fn state_dict(&self) -> BTreeMap<String, ArrayD<f32>> {
        self.saved().into_iter().map(|(k, p)| (k, p.value().to_owned())).collect()
    }

    /// Writes the adapter files into `dir`.
    ///
    /// # Errors
    /// IO errors.
    pub fn save_pretrained(&self, dir: &Path) -> Result<u64> {
        let cfg = MixLoraConfig { inference_mode: true, ..self.config.clone() };
        write_adapter(dir, &cfg, &self.state_dict())
    }

    /// Attaches the MixLoRA adapter saved in `dir` to `model` under `name`.
    ///
    /// # Errors
    /// IO errors; another `peft_type`; missing or mis-shaped tensors (the mixtures are then left inactive, see
    /// [`MixLoraModel::deactivate`]).
    pub fn load(model: &dyn Module, dir: &Path, name: &str) -> Result<Self> {
        let (config, file) = read_adapter::<MixLoraConfig>(dir, "MIXLORA")?;
        let me = Self::new(model, config, name, 0)?;
        if let Err(e) = me.saved().iter().try_for_each(|(k, p)| load_param(&file, k, p)) {
            me.deactivate(model);
            return Err(e);
        }
        Ok(me)
    }

    /// Turns the mixtures off on their residual sites (other adapters there stay active) and detaches the
    /// attention LoRA. Residual sites cannot detach adapters, so the mixtures stay attached, inactive.
    pub fn deactivate(mut self, model: &dyn Module) {
        for site in residual_sites(model) {
            if site.adapters().iter().any(|a| a.name() == self.name) {
                let others: Vec<String> =
                    site.adapters().iter().map(|a| a.name().to_string()).filter(|n| *n != self.name).collect();
                site.set_active(&others.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
        if let Some(a) = &mut self.attention {
            // The adapter was created by us; a failure means it is gone already.
            let _ = a.delete_adapter(&self.name);
        }
    }
}

#[cfg(test)]
#[path = "mixlora_tests.rs"]
mod tests;
