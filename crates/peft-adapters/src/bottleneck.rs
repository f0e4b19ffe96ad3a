//! Bottleneck adapters on the residual sites (one config, four presets):
//!
//! - **Houlsby** (Houlsby et al., 2019; AdapterHub `DoubleSeqBnConfig`): a series adapter after the attention and
//!   after the feed-forward sub-layer, reduction 16, swish;
//! - **Pfeiffer / SeqBn** (Pfeiffer et al., 2021; AdapterHub `SeqBnConfig`): one series adapter after the
//!   feed-forward sub-layer, reduction 16, ReLU, reading `LN_orig(h + x)` (`original_ln_before`, spec §1.2-4);
//! - **parallel** (He et al., 2022; AdapterHub `ParBnConfig`): `h + s·f(x)` on the feed-forward sub-layer,
//!   reduction 2, ReLU, scaling 4;
//! - **AdaptFormer** (Chen et al., 2022): parallel to the feed-forward sub-layer with a fixed scale 0.1, ReLU,
//!   bottleneck `d/12` (64 for ViT-B), no adapter LayerNorm (the AdaptFormer code's default `none`).
//!
//! The bottleneck is `f(u) = up(act(down(drop(u))))·s` with `down: d → m`, `up: m → d`, `m = ⌊d / r⌋`
//! (`reduction_factor` r). The residual site gives the sub-layer output `h` (before the residual addition) and its
//! input `x` (the residual stream); the adapter returns the new sub-layer output:
//!
//! | placement | returns | config |
//! |---|---|---|
//! | series | `h + f(h)` | `is_parallel = false`, `original_ln_before = false` |
//! | series, LN before | `h + f(LN_orig(h + x))` | `original_ln_before = true` (the model then computes `LN_orig(x + h + f(..))`, AdapterHub's `residual_before_ln = true` form) |
//! | parallel | `h + f(x)` | `is_parallel = true` |
//!
//! `mh_adapter` / `output_adapter` (AdapterHub's names) pick the residual sites after attention / after the
//! feed-forward block; a residual site is an attention one when a segment of its path contains `attention` or
//! `attn` (BERT `attention.output`, DINOv2 `attention.output`, Whisper and LLaMA `self_attn`).
//!
//! Init (`init_weights`): `"mam_adapter"` (default here): down Kaiming-uniform, up and both biases zero, so the
//! adapted model **is** the base model at init; `"bert"` (AdapterHub's default for Houlsby/SeqBn): every weight
//! N(0, 0.02), biases zero (near-identity, not exact). Not mergeable (the non-linearity is between the
//! projections).
//!
//! Files: `peft_type = "BOTTLENECK"` (PEFT has no bottleneck adapter); tensors `<site>.adapter_down.0.weight`,
//! `<site>.adapter_down.0.bias`, `<site>.adapter_up.weight`, `<site>.adapter_up.bias`, AdapterHub's suffixes with
//! the `adapters.<name>.` level dropped; the config keys follow AdapterHub's `BnConfig` field names where they
//! exist. AdapterHub's own folders (`adapter_config.json` + `adapter.safetensors`) are read and written by
//! [`crate::adapterhub`], checked against adapters 1.3.0 (its outputs within 4e-6 on MiniLM, files written back
//! byte for byte). Width: `⌊d / reduction_factor⌋` as AdapterHub computes it. Dropout: on the adapter input by
//! default (LLM-Adapters' placement), on its output with `dropout_on_output` (AdapterHub's).

use std::any::Any;
use std::sync::Arc;

use ndarray::ArrayD;
use peft_core::adapter::{
    site_rng, AdapterResult, AdapterTensors, InjectCx, PeftConfig, SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{prefix_sites, residual_sites, Ctx, Module, ResidualAdapter, ResidualBranch, ResidualSite};
use peft_core::{Elem, Param, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::common::{config_json, kaiming, normal, parse_config, Activation, SiteLayer, SiteTuner};
use crate::error::{AdaptersError, Result};

/// The bottleneck adapters' `peft_type` (this crate's own: PEFT has none).
pub const BOTTLENECK_TYPE: &str = "BOTTLENECK";

/// How the bottleneck weights start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterInit {
    /// Down Kaiming-uniform (a = √5), up and biases zero: exact identity at init.
    MamAdapter,
    /// Every weight N(0, 0.02), biases zero (AdapterHub's default): near identity.
    Bert,
}

fn d_peft_type() -> String {
    BOTTLENECK_TYPE.into()
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_eps() -> f64 {
    1e-12
}
fn d_init() -> AdapterInit {
    AdapterInit::MamAdapter
}

/// A bottleneck adapter config (`adapter_config.json` with AdapterHub's `BnConfig` field names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    /// Always `"BOTTLENECK"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// Adapters on the residual sites after attention.
    #[serde(default)]
    pub mh_adapter: bool,
    /// Adapters on the residual sites after the feed-forward block.
    #[serde(default = "d_true")]
    pub output_adapter: bool,
    /// `d / m`: the bottleneck is `m = round(d / reduction_factor)` wide (at least 1).
    pub reduction_factor: f64,
    /// The non-linearity between the projections.
    pub non_linearity: Activation,
    /// Parallel (`h + s·f(x)`) instead of series.
    #[serde(default)]
    pub is_parallel: bool,
    /// The scale `s` of the adapter output.
    #[serde(default = "d_one")]
    pub scaling: f64,
    /// Series only: the adapter reads `LN_orig(h + x)`, reusing the model's post-sub-layer LayerNorm
    /// (`<site>.LayerNorm`, BERT's post-norm layout).
    #[serde(default)]
    pub original_ln_before: bool,
    /// Epsilon of that LayerNorm (BERT's 1e-12).
    #[serde(default = "d_eps")]
    pub original_ln_eps: f64,
    /// Biases in the down and up projections.
    #[serde(default = "d_true")]
    pub bias: bool,
    /// Initialisation.
    #[serde(default = "d_init")]
    pub init_weights: AdapterInit,
    /// Dropout (training only), on the adapter input (`up(act(down(drop(u))))`, LLM-Adapters and the spec).
    #[serde(default)]
    pub dropout: f64,
    /// Apply `dropout` to the adapter output instead (`drop(up(act(down(u)))·s)`, AdapterHub's placement; set
    /// when an AdapterHub folder is imported). Written only when set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dropout_on_output: bool,
    /// Modules trained and saved in full next to the adapter (PEFT's `modules_to_save`; written only when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files (as PEFT writes).
    #[serde(default)]
    pub inference_mode: bool,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "mh_adapter",
    "output_adapter",
    "reduction_factor",
    "non_linearity",
    "is_parallel",
    "scaling",
    "original_ln_before",
    "original_ln_eps",
    "bias",
    "init_weights",
    "dropout",
    "dropout_on_output",
    "modules_to_save",
    "inference_mode",
];

impl BottleneckConfig {
    /// A series adapter after the feed-forward block with reduction `r` and `act`, exact-identity init.
    pub fn new(reduction_factor: f64, act: Activation) -> Self {
        BottleneckConfig {
            peft_type: d_peft_type(),
            mh_adapter: false,
            output_adapter: true,
            reduction_factor,
            non_linearity: act,
            is_parallel: false,
            scaling: 1.0,
            original_ln_before: false,
            original_ln_eps: d_eps(),
            bias: true,
            init_weights: AdapterInit::MamAdapter,
            dropout: 0.0,
            dropout_on_output: false,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// Houlsby: series after attention and after the feed-forward block, reduction 16, swish.
    pub fn houlsby() -> Self {
        BottleneckConfig { mh_adapter: true, ..Self::new(16.0, Activation::Swish) }
    }

    /// Pfeiffer / SeqBn: series after the feed-forward block reading `LN_orig(h + x)`, reduction 16, ReLU.
    pub fn seq_bn() -> Self {
        BottleneckConfig { original_ln_before: true, ..Self::new(16.0, Activation::Relu) }
    }

    /// Parallel (He et al.; AdapterHub `ParBnConfig`): `h + 4·f(x)` on the feed-forward block, reduction 2, ReLU.
    pub fn parallel() -> Self {
        BottleneckConfig { is_parallel: true, scaling: 4.0, ..Self::new(2.0, Activation::Relu) }
    }

    /// AdaptFormer: `h + 0.1·f(x)` on the feed-forward block, reduction 12 (64 wide on a 768-wide model), ReLU.
    pub fn adaptformer() -> Self {
        BottleneckConfig { is_parallel: true, scaling: 0.1, ..Self::new(12.0, Activation::Relu) }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`AdaptersError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f, r: String| Err(AdaptersError::config(BOTTLENECK_TYPE, f, r));
        if !(self.reduction_factor.is_finite() && self.reduction_factor > 0.0) {
            return bad("reduction_factor", format!("must be a positive number, got {}", self.reduction_factor));
        }
        if !self.scaling.is_finite() {
            return bad("scaling", format!("{} is not finite", self.scaling));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("must be in [0, 1), got {}", self.dropout));
        }
        if !self.mh_adapter && !self.output_adapter {
            return bad("output_adapter", "neither mh_adapter nor output_adapter is set: no site to adapt".into());
        }
        if self.is_parallel && self.original_ln_before {
            return bad("original_ln_before", "applies to series adapters only (is_parallel is set)".into());
        }
        if !(self.original_ln_eps.is_finite() && self.original_ln_eps > 0.0) {
            return bad("original_ln_eps", format!("must be positive, got {}", self.original_ln_eps));
        }
        Ok(())
    }

    /// The bottleneck width on a `d`-wide stream: `⌊d / reduction_factor⌋` (AdapterHub's `int(d // r)`), at
    /// least 1.
    pub fn bottleneck(&self, d: usize) -> usize {
        ((d as f64 / self.reduction_factor).floor() as usize).max(1)
    }

    /// The residual sites this config adapts in `model`, in visit order (duplicates removed).
    pub fn sites(&self, model: &dyn Module) -> Vec<ResidualSite> {
        let mut seen = std::collections::HashSet::new();
        residual_sites(model)
            .into_iter()
            .filter(|s| seen.insert(s.path().to_string()))
            .filter(|s| if is_attention_site(s.path()) { self.mh_adapter } else { self.output_adapter })
            .collect()
    }
}

/// Whether a residual site follows an attention sub-layer (a path segment contains `attention` or `attn`).
pub fn is_attention_site(path: &str) -> bool {
    path.split('.').any(|s| s.contains("attention") || s.contains("attn"))
}

/// The width of the residual stream: the hidden width of the model's attention-prefix sites.
///
/// # Errors
/// [`AdaptersError::NoSites`] when the model has no attention layer to read it from.
pub fn stream_width(model: &dyn Module, method: &'static str) -> Result<usize> {
    prefix_sites(model).first().map(|p| p.hidden()).ok_or_else(|| AdaptersError::NoSites {
        method,
        what: "attention-prefix site (to read the hidden width)".into(),
    })
}

/// `up(act(down(u)))·s`: the bottleneck map, generic over the element type (so gradients can be checked in f64).
///
/// # Errors
/// Shape errors.
pub fn bottleneck_map<E: Elem>(
    u: &Tensor<E>,
    down: (&Tensor<E>, Option<&Tensor<E>>),
    up: (&Tensor<E>, Option<&Tensor<E>>),
    act: Activation,
    scale: f64,
) -> peft_core::Result<Tensor<E>> {
    let z = act.apply(&u.linear(down.0, down.1)?);
    Ok(z.linear(up.0, up.1)?.mul_scalar(E::of(scale)))
}

/// A bottleneck adapter on one residual site.
pub struct BottleneckLayer {
    name: String,
    down: Param,
    down_b: Option<Param>,
    up: Param,
    up_b: Option<Param>,
    act: Activation,
    scale: f64,
    dropout: f64,
    dropout_on_output: bool,
    parallel: bool,
    /// The reused post-sub-layer LayerNorm (weight, bias, eps) when `original_ln_before`.
    ln: Option<(Param, Param, f64)>,
}

impl BottleneckLayer {
    /// Adapter `name` on the site at `path` of a `d`-wide stream.
    ///
    /// # Errors
    /// Invalid config values.
    pub fn new(
        path: &str,
        name: &str,
        d: usize,
        cfg: &BottleneckConfig,
        ln: Option<(Param, Param)>,
        rng: &mut impl rand::Rng,
    ) -> Result<Self> {
        cfg.validate()?;
        let m = cfg.bottleneck(d);
        let key = |k: &str| format!("{path}.adapters.{name}.{k}");
        let (dw, uw) = match cfg.init_weights {
            AdapterInit::MamAdapter => (kaiming(m, d, rng), ArrayD::zeros(vec![d, m])),
            AdapterInit::Bert => (normal(&[m, d], 0.02, rng), normal(&[d, m], 0.02, rng)),
        };
        let bias = |k: &str, n: usize| cfg.bias.then(|| Param::new(key(k), ArrayD::zeros(vec![n]), true));
        Ok(BottleneckLayer {
            name: name.into(),
            down: Param::new(key("adapter_down.0.weight"), dw, true),
            down_b: bias("adapter_down.0.bias", m),
            up: Param::new(key("adapter_up.weight"), uw, true),
            up_b: bias("adapter_up.bias", d),
            act: cfg.non_linearity,
            scale: cfg.scaling,
            dropout: cfg.dropout,
            dropout_on_output: cfg.dropout_on_output,
            parallel: cfg.is_parallel,
            ln: ln.map(|(w, b)| (w, b, cfg.original_ln_eps)),
        })
    }

    /// `(down, up)` weights.
    pub fn weights(&self) -> (&Param, &Param) {
        (&self.down, &self.up)
    }

    /// The adapter input for sub-layer output `h` and input `x`.
    fn input(&self, h: &Tensor, x: &Tensor) -> peft_core::Result<Tensor> {
        if self.parallel {
            return Ok(x.clone());
        }
        match &self.ln {
            Some((w, b, eps)) => h.add(x)?.layer_norm(Some(&w.tensor()), Some(&b.tensor()), *eps),
            None => Ok(h.clone()),
        }
    }
}

impl ResidualAdapter for BottleneckLayer {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&self, h: &Tensor, x: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
        h.add(&self.branch(h, x, ctx)?.delta)
    }
    fn branch(&self, h: &Tensor, x: &Tensor, ctx: &Ctx) -> peft_core::Result<ResidualBranch> {
        let input = self.input(h, x)?;
        let drop = ctx.train && self.dropout > 0.0;
        let u = if drop && !self.dropout_on_output {
            ctx.with_rng(|rng| input.dropout(self.dropout, true, rng))?
        } else {
            input.clone()
        };
        let (db, ub) = (self.down_b.as_ref().map(Param::tensor), self.up_b.as_ref().map(Param::tensor));
        let delta = bottleneck_map(
            &u,
            (&self.down.tensor(), db.as_ref()),
            (&self.up.tensor(), ub.as_ref()),
            self.act,
            self.scale,
        )?;
        let delta = if drop && self.dropout_on_output {
            ctx.with_rng(|rng| delta.dropout(self.dropout, true, rng))?
        } else {
            delta
        };
        Ok(ResidualBranch { input, delta })
    }
    fn params(&self) -> Vec<Param> {
        self.layer_params()
    }
}

impl SavedTensors for BottleneckLayer {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        let mut v = vec![("adapter_down.0.weight".to_string(), self.down.clone())];
        v.extend(self.down_b.clone().map(|b| ("adapter_down.0.bias".to_string(), b)));
        v.push(("adapter_up.weight".into(), self.up.clone()));
        v.extend(self.up_b.clone().map(|b| ("adapter_up.bias".to_string(), b)));
        v
    }
}

impl SiteLayer<ResidualSite> for BottleneckLayer {
    fn attach_to(self: Arc<Self>, site: &ResidualSite) -> peft_core::Result<()> {
        site.attach(self)
    }
    fn layer_params(&self) -> Vec<Param> {
        self.saved_tensors().into_iter().map(|(_, p)| p).collect()
    }
}

/// An injected bottleneck adapter.
pub type BottleneckTuner = SiteTuner<ResidualSite, BottleneckLayer>;

fn find_ln(base: &[Param], path: &str) -> Result<(Param, Param)> {
    let get = |leaf: &str| {
        let n = format!("{path}.LayerNorm.{leaf}");
        base.iter().find(|p| p.name() == n).cloned().ok_or(AdaptersError::MissingBaseParam {
            method: BOTTLENECK_TYPE,
            name: n,
            why: "original_ln_before reuses the sub-layer's LayerNorm; set it to false on pre-norm models",
        })
    };
    Ok((get("weight")?, get("bias")?))
}

impl BottleneckConfig {
    fn inject_sites(&self, model: &dyn Module, cx: &InjectCx<'_>) -> Result<BottleneckTuner> {
        self.validate()?;
        let sites = self.sites(model);
        if sites.is_empty() {
            let what = match (self.mh_adapter, self.output_adapter) {
                (true, true) => "residual site",
                (true, false) => "residual site after attention",
                _ => "residual site after a feed-forward block",
            };
            return Err(AdaptersError::NoSites { method: BOTTLENECK_TYPE, what: what.into() });
        }
        let d = stream_width(model, BOTTLENECK_TYPE)?;
        SiteTuner::attach(cx.name, BOTTLENECK_TYPE, &sites, |_, s| {
            let ln = if self.original_ln_before { Some(find_ln(cx.base_params, s.path())?) } else { None };
            BottleneckLayer::new(s.path(), cx.name, d, self, ln, &mut site_rng(cx.seed, cx.name, s.path()))
        })
    }
}

impl TunerConfig for BottleneckConfig {
    fn peft_type(&self) -> &str {
        BOTTLENECK_TYPE
    }
    fn describe(&self) -> String {
        let at = match (self.mh_adapter, self.output_adapter) {
            (true, true) => "attention+ffn",
            (true, false) => "attention",
            _ => "ffn",
        };
        format!(
            "bottleneck adapter ({}) reduction={} act={:?} scale={} on {at}{}",
            if self.is_parallel { "parallel" } else { "series" },
            self.reduction_factor,
            self.non_linearity,
            self.scaling,
            if self.original_ln_before { " (LN before)" } else { "" }
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        Ok(config_json(self, BOTTLENECK_TYPE)?)
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
        Ok(Box::new(self.inject_sites(model, &cx)?))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        let d = stream_width(model, BOTTLENECK_TYPE)?;
        let m = self.bottleneck(d);
        for s in self.sites(model) {
            let p = s.path();
            let mut want = vec![
                (format!("{p}.adapter_down.0.weight"), vec![m, d]),
                (format!("{p}.adapter_up.weight"), vec![d, m]),
            ];
            if self.bias {
                want.push((format!("{p}.adapter_down.0.bias"), vec![m]));
                want.push((format!("{p}.adapter_up.bias"), vec![d]));
            }
            for (k, shape) in want {
                crate::common::expect_tensor(file, &k, &shape)?;
            }
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

impl PeftConfig for BottleneckConfig {
    const PEFT_TYPE: &'static str = BOTTLENECK_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (Self, _) = parse_config(v, BOTTLENECK_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "bottleneck_tests.rs"]
mod tests;
