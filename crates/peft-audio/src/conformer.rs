//! The Conformer-style convolution adapter of PETL-AST (Cappellazzo et al., "Parameter-Efficient Transfer
//! Learning of Audio Spectrogram Transformers", 2024), on the residual sites:
//!
//! `A(u) = PW2(SiLU(BN(DW(GLU(PW1(LN(u)))))))`
//!
//! with `PW1: d -> 2b` and `PW2: b -> d` pointwise (per-token linear) convolutions, GLU over channels
//! (`a · σ(g)` for the two halves), `DW` a depthwise convolution along the token sequence (kernel `k`, default 31,
//! "same" zero padding), `BN` BatchNorm1d over channels and `b = round(d / reduction_factor)`. Placement as
//! PETL-AST's default: **parallel** to the feed-forward block (`h + A(x)`, `x` the residual stream entering the
//! sub-layer; `is_parallel = false` gives the sequential `h + A(h)`), on the feed-forward site (Pfeiffer) or on
//! both sites (`mh_adapter`, Houlsby). Default reduction 96 (PETL-AST's RR), dropout 0.
//!
//! Corrections of the reference code's quirks (spec §4.1): the LayerNorm output is used (the reference computes
//! and discards it); `PW2`'s weight and bias start at zero, so the adapted model **is** the base model at init
//! (PW1 Kaiming-uniform, DW U(±1/√k) as PyTorch's conv init, biases zero, BN weight 1 / bias 0).
//!
//! BatchNorm uses the batch statistics over (batch, tokens) when training (`ctx.train`), updating running mean
//! and unbiased variance with momentum 0.1, and the running statistics in evaluation, as PyTorch's
//! `BatchNorm1d`. The running statistics are buffers: saved and loaded with the adapter, never trained.
//!
//! Trainable parameters per adapted site: `d·2b + 2b + k·b + b + 2b + b·d + d + 2d` (PW1, DW, BN affine, PW2, LN),
//! the spec's formula. Files: `peft_type = "CONFORMER_ADAPTER"` (this crate's own), tensors
//! `<site>.conformer.{ln,pw1,dw,bn,pw2}.{weight,bias}` plus `<site>.conformer.bn.{running_mean,running_var}`.

use std::any::Any;
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use peft_adapters::bottleneck::{is_attention_site, stream_width};
use peft_adapters::common::{config_json, kaiming, parse_config, uniform, SiteLayer, SiteTuner};
use peft_core::adapter::{
    site_rng, AdapterResult, AdapterTensors, InjectCx, PeftConfig, SavedTensors, Tuner, TunerConfig,
};
use peft_core::autograd::record;
use peft_core::nn::{residual_sites, Ctx, Module, ResidualAdapter, ResidualSite};
use peft_core::{Elem, Error, Param, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{AudioDataError, Result};

/// The Conformer adapter's `peft_type`.
pub const CONFORMER_TYPE: &str = "CONFORMER_ADAPTER";

/// Depthwise 1-d convolution along the token axis of `x [B, L, C]` with `weight [C, 1, k]` (PyTorch's
/// depthwise `Conv1d(C, C, k, groups=C)` layout), `bias [C]`, zero "same" padding `k / 2` (`k` odd):
/// `y[b,t,c] = bias[c] + Σ_j w[c,0,j] · x[b, t + j - k/2, c]`.
///
/// Backward: `dx[b,s,c] = Σ_j w[c,j] · g[b, s - j + k/2, c]`, `dw[c,j] = Σ_{b,t} g[b,t,c] · x[b, t + j - k/2, c]`,
/// `db[c] = Σ_{b,t} g[b,t,c]`.
///
/// # Errors
/// [`Error::Shape`] for a non-3-d input, a kernel of another channel count, an even kernel or a wrong bias.
pub fn depthwise_conv1d<E: Elem>(
    x: &Tensor<E>,
    weight: &Tensor<E>,
    bias: Option<&Tensor<E>>,
) -> peft_core::Result<Tensor<E>> {
    let (xs, ws) = (x.shape().to_vec(), weight.shape().to_vec());
    if xs.len() != 3 || ws.len() != 3 || ws[0] != xs[2] || ws[1] != 1 || ws[2].is_multiple_of(2) {
        return Err(Error::Shape { op: "depthwise_conv1d (x [B,L,C], w [C,1,k odd])", lhs: xs, rhs: ws });
    }
    if let Some(b) = bias {
        if b.shape() != [xs[2]] {
            return Err(Error::Shape { op: "depthwise_conv1d bias", lhs: b.shape().to_vec(), rhs: vec![xs[2]] });
        }
    }
    let (nb, l, c, k) = (xs[0], xs[1], xs[2], ws[2]);
    let p = k / 2;
    let xv: Vec<E> = x.as_slice().to_vec();
    let wv: Vec<E> = weight.as_slice().to_vec();
    let mut out = vec![E::zero(); nb * l * c];
    if let Some(b) = bias {
        let bv = b.as_slice();
        for row in out.chunks_mut(c) {
            row.copy_from_slice(bv);
        }
    }
    for b in 0..nb {
        for t in 0..l {
            let o = &mut out[(b * l + t) * c..][..c];
            for j in 0..k {
                let Some(s) = (t + j).checked_sub(p).filter(|&s| s < l) else { continue };
                let xr = &xv[(b * l + s) * c..][..c];
                for ch in 0..c {
                    o[ch] += wv[ch * k + j] * xr[ch];
                }
            }
        }
    }
    let out = ArrayD::from_shape_vec(IxDyn(&[nb, l, c]), out).expect("peft-rs bug: depthwise output size");
    let inputs: Vec<&Tensor<E>> = match bias {
        Some(b) => vec![x, weight, b],
        None => vec![x, weight],
    };
    Ok(record("depthwise_conv1d", out, &inputs, move |g, needs| {
        let gv = g.as_slice().expect("peft-rs bug: contiguous grad");
        let gx = needs[0].then(|| {
            let mut dx = vec![E::zero(); nb * l * c];
            for b in 0..nb {
                for t in 0..l {
                    let gr = &gv[(b * l + t) * c..][..c];
                    for j in 0..k {
                        let Some(s) = (t + j).checked_sub(p).filter(|&s| s < l) else { continue };
                        let d = &mut dx[(b * l + s) * c..][..c];
                        for ch in 0..c {
                            d[ch] += wv[ch * k + j] * gr[ch];
                        }
                    }
                }
            }
            ArrayD::from_shape_vec(IxDyn(&[nb, l, c]), dx).expect("peft-rs bug: dx size")
        });
        let gw = needs[1].then(|| {
            let mut dw = vec![E::zero(); c * k];
            for b in 0..nb {
                for t in 0..l {
                    let gr = &gv[(b * l + t) * c..][..c];
                    for j in 0..k {
                        let Some(s) = (t + j).checked_sub(p).filter(|&s| s < l) else { continue };
                        let xr = &xv[(b * l + s) * c..][..c];
                        for ch in 0..c {
                            dw[ch * k + j] += gr[ch] * xr[ch];
                        }
                    }
                }
            }
            ArrayD::from_shape_vec(IxDyn(&[c, 1, k]), dw).expect("peft-rs bug: dw size")
        });
        let mut v = vec![gx, gw];
        if needs.len() > 2 {
            v.push(needs[2].then(|| {
                let mut db = vec![E::zero(); c];
                for row in gv.chunks(c) {
                    for (d, &x) in db.iter_mut().zip(row) {
                        *d += x;
                    }
                }
                ArrayD::from_shape_vec(IxDyn(&[c]), db).expect("peft-rs bug: db size")
            }));
        }
        v
    }))
}

/// How BatchNorm normalises.
pub enum BnStats<'a> {
    /// Training: the batch's statistics over (batch, tokens); returns them (mean, biased variance) per channel.
    Batch,
    /// Evaluation: the running mean and variance.
    Running(&'a [f32], &'a [f32]),
}

/// The tensors of one Conformer branch, in order: LN weight/bias, PW1 weight/bias, DW weight/bias, BN
/// weight/bias, PW2 weight/bias.
pub type BranchWeights<'a, E> = [&'a Tensor<E>; 10];

/// BatchNorm batch statistics (mean, biased variance) per channel.
pub type BatchStats = (Vec<f64>, Vec<f64>);

/// The Conformer branch `A(u)` for `u [B, L, d]`; also returns the batch statistics (mean, biased variance) when
/// BatchNorm used them. Generic over the element type so its gradients can be checked in f64.
///
/// # Errors
/// Shape errors.
pub fn conformer_branch<E: Elem>(
    u: &Tensor<E>,
    w: BranchWeights<'_, E>,
    bn: BnStats<'_>,
    eps: (f64, f64),
) -> peft_core::Result<(Tensor<E>, Option<BatchStats>)> {
    let [ln_w, ln_b, pw1_w, pw1_b, dw_w, dw_b, bn_w, bn_b, pw2_w, pw2_b] = w;
    let z = u.layer_norm(Some(ln_w), Some(ln_b), eps.0)?.linear(pw1_w, Some(pw1_b))?;
    let two_b = z.shape()[2];
    let half = two_b / 2;
    let z = z.narrow(2, 0, half)?.mul(&z.narrow(2, half, half)?.sigmoid())?;
    let z = depthwise_conv1d(&z, dw_w, Some(dw_b))?;
    let (zn, stats) = match bn {
        BnStats::Batch => {
            let mean = z.mean(&[0, 1], true)?;
            let zc = z.sub(&mean)?;
            let var = zc.square().mean(&[0, 1], true)?;
            let zn = zc.div(&var.add_scalar(E::of(eps.1)).sqrt())?;
            let f = |t: &Tensor<E>| t.as_slice().iter().map(|v| v.f64()).collect::<Vec<f64>>();
            (zn, Some((f(&mean), f(&var))))
        }
        BnStats::Running(m, v) => {
            let c = m.len();
            let mean = Tensor::from_vec(m.iter().map(|&x| E::of(f64::from(x))).collect(), &[c])?;
            let inv = Tensor::from_vec(v.iter().map(|&x| E::of(1.0 / (f64::from(x) + eps.1).sqrt())).collect(), &[c])?;
            (z.sub(&mean)?.mul(&inv)?, None)
        }
    };
    let y = zn.mul(bn_w)?.add(bn_b)?.silu().linear(pw2_w, Some(pw2_b))?;
    Ok((y, stats))
}

fn d_type() -> String {
    CONFORMER_TYPE.into()
}
fn d_rr() -> f64 {
    96.0
}
fn d_k() -> usize {
    31
}
fn d_true() -> bool {
    true
}
fn d_mom() -> f64 {
    0.1
}
fn d_eps() -> f64 {
    1e-5
}

/// The Conformer adapter's config (`adapter_config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConformerConfig {
    /// Always `"CONFORMER_ADAPTER"`.
    #[serde(default = "d_type")]
    pub peft_type: String,
    /// `d / b`: the branch is `b = round(d / reduction_factor)` channels wide (at least 1).
    #[serde(default = "d_rr")]
    pub reduction_factor: f64,
    /// Depthwise kernel size (odd).
    #[serde(default = "d_k")]
    pub kernel_size: usize,
    /// Adapters on the residual sites after attention.
    #[serde(default)]
    pub mh_adapter: bool,
    /// Adapters on the residual sites after the feed-forward block.
    #[serde(default = "d_true")]
    pub output_adapter: bool,
    /// Parallel (`h + A(x)`) instead of sequential (`h + A(h)`).
    #[serde(default = "d_true")]
    pub is_parallel: bool,
    /// Dropout on the branch output (training only).
    #[serde(default)]
    pub dropout: f64,
    /// BatchNorm running-statistics momentum.
    #[serde(default = "d_mom")]
    pub bn_momentum: f64,
    /// BatchNorm and LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Modules trained and saved in full (the task head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "reduction_factor",
    "kernel_size",
    "mh_adapter",
    "output_adapter",
    "is_parallel",
    "dropout",
    "bn_momentum",
    "eps",
    "modules_to_save",
    "inference_mode",
];

impl Default for ConformerConfig {
    fn default() -> Self {
        Self::new(d_rr())
    }
}

impl ConformerConfig {
    /// PETL-AST's default placement (parallel, feed-forward site only, kernel 31) with reduction `rr`.
    pub fn new(reduction_factor: f64) -> Self {
        ConformerConfig {
            peft_type: d_type(),
            reduction_factor,
            kernel_size: d_k(),
            mh_adapter: false,
            output_adapter: true,
            is_parallel: true,
            dropout: 0.0,
            bn_momentum: d_mom(),
            eps: d_eps(),
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`AudioDataError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f, r: String| Err(AudioDataError::config(CONFORMER_TYPE, f, r));
        if !(self.reduction_factor.is_finite() && self.reduction_factor > 0.0) {
            return bad("reduction_factor", format!("must be a positive number, got {}", self.reduction_factor));
        }
        if self.kernel_size.is_multiple_of(2) || self.kernel_size > 1023 {
            return bad("kernel_size", format!("must be odd and at most 1023, got {}", self.kernel_size));
        }
        if !self.mh_adapter && !self.output_adapter {
            return bad("output_adapter", "neither mh_adapter nor output_adapter is set: no site to adapt".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("must be in [0, 1), got {}", self.dropout));
        }
        if !(0.0..=1.0).contains(&self.bn_momentum) {
            return bad("bn_momentum", format!("must be in [0, 1], got {}", self.bn_momentum));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", format!("must be positive, got {}", self.eps));
        }
        Ok(())
    }

    /// The branch width on a `d`-wide stream.
    pub fn width(&self, d: usize) -> usize {
        ((d as f64 / self.reduction_factor).round() as usize).max(1)
    }

    /// Trainable parameters per adapted site on a `d`-wide stream (the spec's formula, LayerNorm included).
    pub fn params_per_site(&self, d: usize) -> usize {
        let b = self.width(d);
        d * 2 * b + 2 * b + self.kernel_size * b + b + 2 * b + b * d + d + 2 * d
    }

    /// The residual sites this config adapts, in visit order.
    pub fn sites(&self, model: &dyn Module) -> Vec<ResidualSite> {
        let mut seen = std::collections::HashSet::new();
        residual_sites(model)
            .into_iter()
            .filter(|s| seen.insert(s.path().to_string()))
            .filter(|s| if is_attention_site(s.path()) { self.mh_adapter } else { self.output_adapter })
            .collect()
    }
}

/// One Conformer adapter on one residual site.
pub struct ConformerLayer {
    name: String,
    /// Trainable tensors in [`BranchWeights`] order.
    weights: [Param; 10],
    running_mean: Param,
    running_var: Param,
    parallel: bool,
    dropout: f64,
    momentum: f64,
    eps: f64,
}

const SUFFIXES: [&str; 10] = [
    "conformer.ln.weight",
    "conformer.ln.bias",
    "conformer.pw1.weight",
    "conformer.pw1.bias",
    "conformer.dw.weight",
    "conformer.dw.bias",
    "conformer.bn.weight",
    "conformer.bn.bias",
    "conformer.pw2.weight",
    "conformer.pw2.bias",
];

impl ConformerLayer {
    /// Adapter `name` on the site at `path` of a `d`-wide stream, initialised from `rng`.
    ///
    /// # Errors
    /// Invalid config values.
    pub fn new(path: &str, name: &str, d: usize, cfg: &ConformerConfig, rng: &mut impl rand::Rng) -> Result<Self> {
        cfg.validate()?;
        let (b, k) = (cfg.width(d), cfg.kernel_size);
        let shapes: [Vec<usize>; 10] = [
            vec![d],
            vec![d],
            vec![2 * b, d],
            vec![2 * b],
            vec![b, 1, k],
            vec![b],
            vec![b],
            vec![b],
            vec![d, b],
            vec![d],
        ];
        let key = |s: &str| format!("{path}.adapters.{name}.{s}");
        let weights: [Param; 10] = std::array::from_fn(|i| {
            let v = match i {
                0 | 6 => ArrayD::ones(IxDyn(&shapes[i])),
                2 => kaiming(2 * b, d, rng),
                4 => uniform(&[b, 1, k], 1.0 / (k as f32).sqrt(), rng),
                _ => ArrayD::zeros(IxDyn(&shapes[i])),
            };
            Param::new(key(SUFFIXES[i]), v, true)
        });
        Ok(ConformerLayer {
            name: name.into(),
            weights,
            running_mean: Param::new(key("conformer.bn.running_mean"), ArrayD::zeros(IxDyn(&[b])), false),
            running_var: Param::new(key("conformer.bn.running_var"), ArrayD::ones(IxDyn(&[b])), false),
            parallel: cfg.is_parallel,
            dropout: cfg.dropout,
            momentum: cfg.bn_momentum,
            eps: cfg.eps,
        })
    }

    /// The BatchNorm running (mean, variance).
    pub fn running_stats(&self) -> (Vec<f32>, Vec<f32>) {
        (self.running_mean.value().iter().copied().collect(), self.running_var.value().iter().copied().collect())
    }
}

impl ResidualAdapter for ConformerLayer {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&self, h: &Tensor, x: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
        let u = if self.parallel { x } else { h };
        let ts: Vec<Tensor> = self.weights.iter().map(Param::tensor).collect();
        let w: BranchWeights<'_, f32> = std::array::from_fn(|i| &ts[i]);
        let (rm, rv) = self.running_stats();
        let bn = if ctx.train { BnStats::Batch } else { BnStats::Running(&rm, &rv) };
        let (mut a, stats) = conformer_branch(u, w, bn, (self.eps, self.eps))?;
        if let Some((mean, var)) = stats {
            // PyTorch: running = (1 - m)·running + m·batch, with the unbiased batch variance.
            let n = (u.shape()[0] * u.shape()[1]) as f64;
            let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
            let m = self.momentum;
            self.running_mean.update(|r| {
                r.iter_mut().zip(&mean).for_each(|(r, &b)| *r = ((1.0 - m) * f64::from(*r) + m * b) as f32)
            });
            self.running_var.update(|r| {
                r.iter_mut().zip(&var).for_each(|(r, &b)| *r = ((1.0 - m) * f64::from(*r) + m * b * unbias) as f32)
            });
        }
        if ctx.train && self.dropout > 0.0 {
            a = ctx.with_rng(|rng| a.dropout(self.dropout, true, rng))?;
        }
        h.add(&a)
    }
    fn params(&self) -> Vec<Param> {
        self.weights.to_vec()
    }
}

impl SavedTensors for ConformerLayer {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        let mut v: Vec<(String, Param)> =
            SUFFIXES.iter().zip(&self.weights).map(|(s, p)| (s.to_string(), p.clone())).collect();
        v.push(("conformer.bn.running_mean".into(), self.running_mean.clone()));
        v.push(("conformer.bn.running_var".into(), self.running_var.clone()));
        v
    }
}

impl SiteLayer<ResidualSite> for ConformerLayer {
    fn attach_to(self: Arc<Self>, site: &ResidualSite) -> peft_core::Result<()> {
        site.attach(self)
    }
    fn layer_params(&self) -> Vec<Param> {
        self.weights.to_vec()
    }
}

/// An injected Conformer adapter.
pub type ConformerTuner = SiteTuner<ResidualSite, ConformerLayer>;

impl ConformerConfig {
    fn inject_sites(&self, model: &dyn Module, cx: &InjectCx<'_>) -> Result<ConformerTuner> {
        self.validate()?;
        let sites = self.sites(model);
        if sites.is_empty() {
            return Err(AudioDataError::config(
                CONFORMER_TYPE,
                "output_adapter",
                "the model has none of the residual sites asked for",
            ));
        }
        let d = stream_width(model, CONFORMER_TYPE)?;
        Ok(SiteTuner::attach(cx.name, CONFORMER_TYPE, &sites, |_, s| {
            ConformerLayer::new(s.path(), cx.name, d, self, &mut site_rng(cx.seed, cx.name, s.path()))
                .map_err(peft_adapters::AdaptersError::from)
        })?)
    }
}

impl TunerConfig for ConformerConfig {
    fn peft_type(&self) -> &str {
        CONFORMER_TYPE
    }
    fn describe(&self) -> String {
        let at = match (self.mh_adapter, self.output_adapter) {
            (true, true) => "attention+ffn",
            (true, false) => "attention",
            _ => "ffn",
        };
        format!(
            "Conformer conv adapter ({}) reduction={} kernel={} on {at}",
            if self.is_parallel { "parallel" } else { "sequential" },
            self.reduction_factor,
            self.kernel_size
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        Ok(config_json(self, CONFORMER_TYPE)?)
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
        let d = stream_width(model, CONFORMER_TYPE)?;
        let (b, k) = (self.width(d), self.kernel_size);
        let shapes: [Vec<usize>; 10] = [
            vec![d],
            vec![d],
            vec![2 * b, d],
            vec![2 * b],
            vec![b, 1, k],
            vec![b],
            vec![b],
            vec![b],
            vec![d, b],
            vec![d],
        ];
        for s in self.sites(model) {
            for (suffix, shape) in SUFFIXES.iter().zip(&shapes) {
                peft_adapters::common::expect_tensor(file, &format!("{}.{suffix}", s.path()), shape)?;
            }
            for buf in ["running_mean", "running_var"] {
                peft_adapters::common::expect_tensor(file, &format!("{}.conformer.bn.{buf}", s.path()), &[b])?;
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

impl PeftConfig for ConformerConfig {
    const PEFT_TYPE: &'static str = CONFORMER_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (Self, _) = parse_config(v, CONFORMER_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "conformer_tests.rs"]
mod tests;
