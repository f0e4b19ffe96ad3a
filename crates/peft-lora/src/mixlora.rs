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
//! gives exactly `top_k`. It is returned by [`MixLoraFfn::forward`] and, for FFNs driven through a model's
//! residual site, collected by [`MixLoraModel::take_aux_loss`] (already multiplied by `router_aux_loss_coef`) so a
//! trainer can add it to its loss.
//!
//! Wiring: [`MixLoraFfn`] wraps an existing FFN's [`Linear`] sites (their frozen bases are used; adapters attached
//! to those sites are not part of the experts). In a post-norm (BERT) encoder layer the FFN residual site
//! (`encoder.layer.<i>.output`) sees exactly the FFN input, so [`MixLoraModel`] attaches the wrapper there as a
//! [`ResidualAdapter`] returning `h + Σ_e w_e (out_e(x) − base(x))` (with `h` the block's base FFN output after its
//! dropout). Pre-norm blocks (LLaMA) feed the residual site the stream *before* the norm, so there call
//! [`MixLoraFfn::forward`] on the normed input from the block. Experts are not mergeable (input-dependent
//! routing); the attention LoRAs are.
//!
//! Not implemented: expert dropout, capacity limits, the Switch/dynamic top-p router variants. Router jitter
//! multiplies only the router input.
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
        Ok(())
    }

    fn scaling(&self) -> f32 {
        (self.lora_alpha / self.r as f64) as f32
    }
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
    /// Router probabilities `[N, E]`.
    pub probs: Tensor,
    /// Top-k weights renormalised to sum 1 per token, zero off the top-k `[N, E]`.
    pub weights: Tensor,
    /// The chosen experts per token, best first `[N][k]`.
    pub choices: Vec<Vec<usize>>,
}

/// A MixLoRA mixture around one FFN.
pub struct MixLoraFfn {
    name: String,
    prefix: String,
    kind: FfnKind,
    top_k: usize,
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
            top_k: cfg.top_k,
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

    /// Routes tokens `x [N, d]`.
    ///
    /// # Errors
    /// Shape errors.
    pub fn route(&self, x: &Tensor, ctx: &Ctx) -> Result<Routing> {
        let xr = if ctx.train && self.jitter > 0.0 {
            let j = self.jitter as f32;
            let noise =
                ctx.with_rng(|rng| ArrayD::from_shape_fn(IxDyn(x.shape()), |_| rng.gen_range(1.0 - j..=1.0 + j)));
            x.mul(&Tensor::new(noise))?
        } else {
            x.clone()
        };
        let probs = xr.linear(&self.gate.tensor(), None)?.softmax(1)?;
        let e = self.experts.len();
        let pv = probs.data();
        let mut mask = ArrayD::<f32>::zeros(IxDyn(probs.shape()));
        let choices: Vec<Vec<usize>> = (0..probs.shape()[0])
            .map(|t| {
                let mut order: Vec<usize> = (0..e).collect();
                // Stable sort: equal probabilities keep the lower expert first.
                order.sort_by(|&a, &b| pv[[t, b]].total_cmp(&pv[[t, a]]));
                order.truncate(self.top_k);
                for &c in &order {
                    mask[[t, c]] = 1.0;
                }
                order
            })
            .collect();
        let pm = probs.mul(&Tensor::new(mask))?;
        let weights = pm.div(&pm.sum(&[1], true)?)?;
        Ok(Routing { probs, weights, choices })
    }

    /// The Mixtral load-balancing loss `E · Σ_{k,e} f[k,e]·P[e]` over the tokens with `valid[t]` (all when `None`),
    /// not multiplied by the coefficient.
    ///
    /// # Errors
    /// Shape errors; [`Error::Invalid`] when no token is valid or the mask length differs.
    pub fn aux_loss(&self, routing: &Routing, valid: Option<&[bool]>) -> Result<Tensor> {
        let n = routing.choices.len();
        let rows: Vec<usize> = match valid {
            Some(v) if v.len() != n => crate::bail!("mixlora", "{} mask entries for {n} tokens", v.len()),
            Some(v) => (0..n).filter(|&t| v[t]).collect(),
            None => (0..n).collect(),
        };
        if rows.is_empty() {
            crate::bail!("mixlora", "no valid token for the load-balancing loss");
        }
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

    /// `Σ_e w_e (out_e(x) − base(x))` for tokens `x [N, d]`.
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
            let rows: Vec<usize> = (0..n).filter(|&t| routing.choices[t].contains(&e)).collect();
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

    /// The MoE FFN output for `x [.., d]` and the load-balancing loss (unweighted) over the tokens marked in
    /// `valid` (one flag per token of `x`'s leading axes; `None`: all).
    ///
    /// # Errors
    /// Shape errors; a mask of the wrong length.
    pub fn forward(&self, x: &Tensor, valid: Option<&[bool]>, ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        let shape = x.shape().to_vec();
        let d = *shape.last().unwrap_or(&0);
        let x2 = x.reshape(&[x.len() / d.max(1), d])?;
        let base = match &self.kind {
            FfnKind::Mlp { fc1, fc2, act } => fc2.base().forward(&act.apply(&fc1.base().forward(&x2)?))?,
            FfnKind::SwiGlu { gate, up, down } => {
                down.base().forward(&gate.base().forward(&x2)?.silu().mul(&up.base().forward(&x2)?)?)?
            }
        };
        let routing = self.route(&x2, ctx)?;
        let aux = self.aux_loss(&routing, valid)?;
        let y = base.add(&self.moe_delta(&x2, &routing)?)?;
        Ok((y.reshape(&shape)?, aux))
    }

    /// Takes the weighted aux loss recorded by the last residual-site forward.
    pub fn take_aux_loss(&self) -> Option<Tensor> {
        self.last_aux.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl ResidualAdapter for MixLoraFfn {
    fn name(&self) -> &str {
        &self.name
    }

    /// `h + Σ_e w_e (out_e(x) − base(x))`; records `coef · L_aux` over all tokens.
    fn forward(&self, h: &Tensor, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let d = *x.shape().last().unwrap_or(&0);
        let x2 = x.reshape(&[x.len() / d.max(1), d])?;
        let routing = self.route(&x2, ctx)?;
        let aux = self.aux_loss(&routing, None)?.mul_scalar(self.aux_coef as f32);
        *self.last_aux.lock().unwrap_or_else(|p| p.into_inner()) = Some(aux);
        h.add(&self.moe_delta(&x2, &routing)?.reshape(h.shape())?)
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

    /// The sum over FFNs of `router_aux_loss_coef · L_aux` recorded by the last forward (cleared), for the trainer
    /// to add to its loss; `None` when no forward ran since the last call.
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
