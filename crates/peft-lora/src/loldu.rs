//! LoLDU (Shi et al., 2024), spec §2.6: an LU decomposition `W = P L U` with partial pivoting, `D = diag(U)`,
//! `Û = U / D` (unit diagonal rows). The first `r` factors are kept frozen (`P` as an index vector, `L_r`, `Û_r`);
//! only `z ∈ R^r` trains (init `z = D_r`, the authors' default). With `σ = α/r` the base becomes
//! `W_res = W − σ·P L_r diag(D_r) Û_r` and the effective weight is `W_res + σ·P L_r diag(z) Û_r`, so the model is
//! unchanged at init (`z = D_r`). Trainable count: `r` per site.
//!
//! PEFT has no LoLDU; the files use PEFT's layout with `peft_type = "LOLDU"` and one tensor per site,
//! `base_model.model.<site>.loldu_z`. The frozen factors are not stored: loading recomputes them from the
//! original base weight (the LU is deterministic; the init is replayed as PiSSA's is), then sets `z`.
//! Removing the adapter ([`LolduTuner`]'s detach, `PeftModel::delete_adapter`) gives the base its original
//! weight back; `merge_and_unload` keeps the merged one.

use std::any::Any;
use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayD, Ix2};
use peft_core::adapter::{
    select_linear, AdapterError, AdapterResult, AdapterTensors, InjectCx, LinearTuner, ModulePattern, PeftConfig,
    SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Elem, Error, Param, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::structured::{config_json, describe_targets, expect_tensor, parse_config, target_spec};

/// LoLDU's `peft_type`.
pub const LOLDU_TYPE: &str = "LOLDU";

/// How `z` starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZInit {
    /// `z = D_r`: base-equivalent at init (the default).
    #[default]
    Diag,
    /// `z = 1` (not base-equivalent).
    Ones,
    /// `z = 0` (not base-equivalent: removes the top-r LU part).
    Zeros,
}

fn d_peft_type() -> String {
    "LOLDU".into()
}
fn d_alpha() -> f64 {
    1.0
}

/// `adapter_config.json` of a LoLDU adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LolduConfig {
    /// Always `"LOLDU"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// Rank `r` (number of LU factors kept).
    pub r: usize,
    /// `σ = alpha / r` (LoLDU's `from_linear` default α = 1).
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Sites to adapt (PEFT semantics).
    pub target_modules: ModulePattern,
    /// Sites never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// The initial `z`.
    #[serde(default)]
    pub init_z: ZInit,
    /// Informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Modules trained and saved in full next to the adapter (PEFT's `modules_to_save`; written only when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files (as PEFT).
    #[serde(default)]
    pub inference_mode: bool,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "r",
    "alpha",
    "target_modules",
    "exclude_modules",
    "init_z",
    "task_type",
    "base_model_name_or_path",
    "modules_to_save",
    "inference_mode",
];

impl LolduConfig {
    /// Rank `r`, α = 1, on list targets.
    pub fn new<S: Into<String>>(r: usize, targets: impl IntoIterator<Item = S>) -> Self {
        LolduConfig {
            peft_type: d_peft_type(),
            r,
            alpha: 1.0,
            target_modules: ModulePattern::list(targets),
            exclude_modules: None,
            init_z: ZInit::Diag,
            task_type: None,
            base_model_name_or_path: None,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// Checks the config.
    ///
    /// # Errors
    /// [`AdapterError::InvalidConfig`] for another `peft_type`, rank 0 or a non-finite alpha.
    pub fn validate(&self) -> AdapterResult<()> {
        if self.peft_type != LOLDU_TYPE {
            return Err(AdapterError::config(LOLDU_TYPE, "peft_type", format!("{:?} is not LOLDU", self.peft_type)));
        }
        if self.r == 0 {
            return Err(AdapterError::config(LOLDU_TYPE, "r", "rank 0"));
        }
        if !self.alpha.is_finite() {
            return Err(AdapterError::config(LOLDU_TYPE, "alpha", format!("must be finite, got {}", self.alpha)));
        }
        Ok(())
    }

    /// The sites this config adapts in `model`.
    ///
    /// # Errors
    /// [`peft_core::Error::NoTargetMatched`]; regex errors.
    pub fn sites(&self, model: &dyn Module) -> AdapterResult<Vec<Linear>> {
        select_linear(model, &target_spec(&self.target_modules, self.exclude_modules.as_ref())?)
    }
}

/// The frozen LoLDU factors of one weight.
#[derive(Clone, Debug)]
pub struct LolduFactors {
    /// `P·L_r` `[out, r]` (rows permuted back to `W`'s order).
    pub pl: Array2<f64>,
    /// `D_r`.
    pub d: Array1<f64>,
    /// `Û_r` `[r, in]`.
    pub u_hat: Array2<f64>,
}

/// The LU factors of `w [out, in]` kept at rank `r`.
///
/// # Errors
/// [`crate::LoraError::Rank`] for `r = 0` or `r > min(out, in)`, [`crate::LoraError::ZeroPivot`] for a zero pivot
/// among the first `r` (LoLDU divides by
/// `D`); [`Error::NonFinite`] for a non-finite weight.
pub fn loldu_factors(w: &Array2<f64>, r: usize) -> Result<LolduFactors> {
    let (out_f, in_f) = w.dim();
    let k = out_f.min(in_f);
    if r == 0 || r > k {
        crate::error::fail!(crate::LoraError::Rank { method: "loldu", site: String::new(), r, max: k });
    }
    let (perm, l, u) = peft_core::linalg::lu(w)?;
    let d = Array1::from_shape_fn(r, |i| u[[i, i]]);
    if let Some(i) = d.iter().position(|&v| v == 0.0 || !v.is_finite()) {
        crate::error::fail!(crate::LoraError::ZeroPivot { site: String::new(), pivot: i });
    }
    let mut pl = Array2::zeros((out_f, r));
    for (i, &pi) in perm.iter().enumerate() {
        for j in 0..r {
            pl[[pi, j]] = l[[i, j]];
        }
    }
    let u_hat = Array2::from_shape_fn((r, in_f), |(i, j)| u[[i, j]] / d[i]);
    Ok(LolduFactors { pl, d, u_hat })
}

/// `σ · ((x Û_rᵀ) ⊙ z) (P L_r)ᵀ`, the adapter's output term (generic for gradient checks).
///
/// # Errors
/// Shape errors.
pub fn loldu_delta<E: Elem>(
    x: &Tensor<E>,
    u_hat: &Tensor<E>,
    pl: &Tensor<E>,
    z: &Tensor<E>,
    sigma: f64,
) -> Result<Tensor<E>> {
    let s = E::from_f64(sigma).expect("peft-rs bug: f64 to Elem");
    Ok(x.linear(u_hat, None)?.mul(z)?.linear(pl, None)?.mul_scalar(s))
}

/// A LoLDU adapter on one site.
pub struct LolduLinear {
    name: String,
    sigma: f64,
    z: Param,
    d: Array1<f32>,
    u_hat: Tensor,
    pl: Tensor,
}

impl LolduLinear {
    /// Decomposes `base`'s weight, rewrites it to `W_res` and returns the adapter (`z` from `init`).
    ///
    /// # Errors
    /// [`loldu_factors`] errors; base errors.
    pub fn new(path: &str, name: &str, base: &dyn LinearBase, r: usize, alpha: f64, init: ZInit) -> Result<Self> {
        let w = base.dense_weight()?;
        let w = w.view().into_dimensionality::<Ix2>().map_err(|_| crate::LoraError::NotMatrix {
            method: "loldu",
            what: format!("base weight of `{path}`"),
            expected: "a matrix",
            shape: w.shape().to_vec(),
        })?;
        let f = loldu_factors(&w.mapv(f64::from), r).map_err(|e| crate::error::at_site(e, path))?;
        let sigma = alpha / r as f64;
        let d = f.d.mapv(|v| v as f32);
        let u_hat = f.u_hat.mapv(|v| v as f32);
        let pl = f.pl.mapv(|v| v as f32);
        // Residual from the f32 factors, so that W_res + σ·PL·diag(D)·Û (as the adapter computes it) is W.
        let part = (&pl * &(d.view().insert_axis(ndarray::Axis(0)))).dot(&u_hat).mapv(|v| -(sigma as f32) * v);
        base.add_to_weight(&part.into_dyn())?;
        let z0 = match init {
            ZInit::Diag => d.clone(),
            ZInit::Ones => Array1::ones(r),
            ZInit::Zeros => Array1::zeros(r),
        };
        Ok(LolduLinear {
            name: name.to_string(),
            sigma,
            z: Param::new(format!("{path}.loldu_z.{name}"), z0.into_dyn(), true),
            d,
            u_hat: Tensor::new(u_hat.into_dyn()),
            pl: Tensor::new(pl.into_dyn()),
        })
    }

    /// The trainable diagonal `z` `[r]`.
    pub fn z(&self) -> &Param {
        &self.z
    }

    /// The pivots `D_r` (the init of `z`).
    pub fn pivots(&self) -> &Array1<f32> {
        &self.d
    }

    /// `σ = α/r`.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// `σ·P L_r diag(z) Û_r` `[out, in]`.
    fn weight(&self) -> Result<Array2<f32>> {
        let z = self.z.value();
        let pl = self.pl.data().view().into_dimensionality::<Ix2>().map_err(|_| shape(self.pl.shape()))?.to_owned();
        let uh =
            self.u_hat.data().view().into_dimensionality::<Ix2>().map_err(|_| shape(self.u_hat.shape()))?.to_owned();
        let zr = Array1::from_iter(z.iter().copied());
        Ok((&pl * &zr.view().insert_axis(ndarray::Axis(0))).dot(&uh).mapv(|v| v * self.sigma as f32))
    }
}

fn shape(s: &[usize]) -> Error {
    crate::LoraError::NotMatrix { method: "loldu", what: "factor".into(), expected: "a matrix", shape: s.to_vec() }
        .into()
}

impl LinearAdapter for LolduLinear {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "loldu"
    }
    fn delta(&self, x: &Tensor, _base_out: &Tensor, _base: &dyn LinearBase, _ctx: &Ctx) -> Result<Option<Tensor>> {
        Ok(Some(loldu_delta(x, &self.u_hat, &self.pl, &self.z.tensor(), self.sigma)?))
    }
    fn params(&self) -> Vec<Param> {
        vec![self.z.clone()]
    }
    fn delta_weight(&self, _base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        Ok(Some(self.weight()?.into_dyn()))
    }
}

impl SavedTensors for LolduLinear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        vec![("loldu_z".into(), self.z.clone())]
    }
}

/// The LoLDU factors of `site`'s weight at rank `r`, with the site named in errors.
fn site_factors(site: &Linear, r: usize) -> Result<LolduFactors> {
    let w = site.base().dense_weight()?;
    let w = w.view().into_dimensionality::<Ix2>().map_err(|_| shape(w.shape()))?;
    loldu_factors(&w.mapv(f64::from), r).map_err(|e| crate::error::at_site(e, site.path()))
}

/// An injected LoLDU adapter: its sites' layers; removing it gives each base its original weight back.
pub struct LolduTuner {
    inner: LinearTuner<LolduLinear>,
}

impl LolduTuner {
    /// The adapted sites and their layers.
    pub fn layers(&self) -> &[(Linear, Arc<LolduLinear>)] {
        self.inner.layers()
    }
}

/// Adds each removed part `σ·P L_r diag(D_r) Û_r` back into its base (undoing the init's rewrite).
fn restore(removed: &[(Linear, Array2<f32>)]) -> AdapterResult<()> {
    for (s, part) in removed {
        s.base().add_to_weight(&part.clone().into_dyn())?;
    }
    Ok(())
}

impl Tuner for LolduTuner {
    peft_core::forward_tuner!(inner => name, params, state_dict, wrapped_modules, set_active, merge, unmerge, is_merged);
    /// Unmerges and removes the adapter, then restores the original weights; with `keep_merged` the (merged)
    /// effective weights stay.
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        let merged = self.inner.is_merged();
        self.inner.detach(keep_merged)?;
        if keep_merged && merged {
            return Ok(());
        }
        let removed: Vec<(Linear, Array2<f32>)> =
            self.layers().iter().map(|(s, a)| Ok((s.clone(), a.pivot_part()?))).collect::<AdapterResult<_>>()?;
        restore(&removed)
    }
    fn kind(&self) -> &str {
        LOLDU_TYPE
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl TunerConfig for LolduConfig {
    fn peft_type(&self) -> &str {
        LOLDU_TYPE
    }
    fn describe(&self) -> String {
        format!("LoLDU r={} alpha={} on {}", self.r, self.alpha, describe_targets(&self.target_modules))
    }
    fn to_json(&self) -> AdapterResult<Value> {
        config_json(self, LOLDU_TYPE)
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
    /// Decomposes every target weight (all checked before any is rewritten), rewrites each to its residual and
    /// attaches the adapters; on error every weight is as before.
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.validate()?;
        let sites = self.sites(model)?;
        for s in &sites {
            site_factors(s, self.r)?;
            if s.adapter(cx.name).is_some() {
                return Err(Error::AdapterState {
                    op: "attach",
                    site: s.path().to_string(),
                    adapter: cx.name.to_string(),
                    problem: peft_core::AdapterProblem::Exists,
                }
                .into());
            }
            for a in s.adapters() {
                if s.is_merged(a.name())? {
                    return Err(Error::AdapterState {
                        op: "loldu",
                        site: s.path().to_string(),
                        adapter: a.name().to_string(),
                        problem: peft_core::AdapterProblem::MergedBase,
                    }
                    .into());
                }
            }
        }
        // Each layer rewrites its base as it is built; `removed` records what to add back on error.
        let mut built: Vec<LolduLinear> = Vec::new();
        let mut removed: Vec<(Linear, Array2<f32>)> = Vec::new();
        for s in &sites {
            let made = LolduLinear::new(s.path(), cx.name, s.base().as_ref(), self.r, self.alpha, self.init_z)
                .and_then(|a| Ok((a.pivot_part()?, a)));
            match made {
                Ok((part, a)) => {
                    removed.push((s.clone(), part));
                    built.push(a);
                }
                Err(e) => {
                    restore(&removed)?;
                    return Err(e.into());
                }
            }
        }
        let mut it = built.into_iter();
        let attached = LinearTuner::attach(cx.name, LOLDU_TYPE, &sites, |_| {
            it.next()
                .ok_or_else(|| Error::Count { op: "loldu", what: "factor sets per site", expected: 1, got: 0 }.into())
        });
        match attached {
            Ok(inner) => Ok(Box::new(LolduTuner { inner })),
            Err(e) => {
                restore(&removed)?;
                Err(e)
            }
        }
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        for s in self.sites(model)? {
            expect_tensor(file, &format!("{}.loldu_z", s.path()), &[self.r])?;
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

impl PeftConfig for LolduConfig {
    const PEFT_TYPE: &'static str = LOLDU_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (LolduConfig, _) = parse_config(v, LOLDU_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

impl LolduLinear {
    /// `σ·P L_r diag(D_r) Û_r`, the part removed from the base at init.
    fn pivot_part(&self) -> Result<Array2<f32>> {
        let pl = self.pl.data().view().into_dimensionality::<Ix2>().map_err(|_| shape(self.pl.shape()))?.to_owned();
        let uh =
            self.u_hat.data().view().into_dimensionality::<Ix2>().map_err(|_| shape(self.u_hat.shape()))?.to_owned();
        Ok((&pl * &self.d.view().insert_axis(ndarray::Axis(0))).dot(&uh).mapv(|v| v * self.sigma as f32))
    }
}

#[cfg(test)]
#[path = "loldu_tests.rs"]
mod tests;
