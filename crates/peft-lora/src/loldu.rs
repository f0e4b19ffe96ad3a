//! LoLDU (Shi et al., 2024), spec §2.6: an LU decomposition `W = P L U` with partial pivoting, `D = diag(U)`,
//! `Û = U / D` (unit diagonal rows). The first `r` factors are kept frozen (`P` as an index vector, `L_r`, `Û_r`);
//! only `z ∈ R^r` trains (init `z = D_r`, the authors' default). With `σ = α/r` the base becomes
//! `W_res = W − σ·P L_r diag(D_r) Û_r` and the effective weight is `W_res + σ·P L_r diag(z) Û_r`, so the model is
//! unchanged at init (`z = D_r`). Trainable count: `r` per site.
//!
//! PEFT has no LoLDU; the files use PEFT's layout with `peft_type = "LOLDU"` and one tensor per site,
//! `base_model.model.<site>.loldu_z`. The frozen factors are not stored: loading recomputes them from the
//! original base weight (the LU is deterministic), then sets `z`.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{Array1, Array2, ArrayD, Ix2};
use peft_core::adapter::{ModulePattern, TargetSpec};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Elem, Error, Param, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::calib::target_sites;
use crate::sitemodel::{load_into, read_files, write_files, SiteModel, PREFIX};

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
    /// True in saved files (as PEFT).
    #[serde(default)]
    pub inference_mode: bool,
}

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
            inference_mode: false,
        }
    }

    /// The file text (`json.dumps(indent=2, sort_keys=True)` style).
    pub fn to_json(&self) -> String {
        crate::pyjson::dumps(&serde_json::to_value(self).expect("peft-rs bug: LolduConfig serialises"))
    }

    fn spec(&self) -> Result<TargetSpec> {
        if self.peft_type != "LOLDU" {
            crate::bail!("loldu", "peft_type {:?} is not LOLDU", self.peft_type);
        }
        if self.r == 0 {
            crate::bail!("loldu", "rank 0");
        }
        if !self.alpha.is_finite() {
            crate::bail!("loldu", "alpha must be finite, got {}", self.alpha);
        }
        TargetSpec::new(&self.target_modules, self.exclude_modules.as_ref(), None, None, &[])
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
/// [`Error::Invalid`] for `r = 0`, `r > min(out, in)` or a zero pivot among the first `r` (LoLDU divides by
/// `D`); [`Error::NonFinite`] for a non-finite weight.
pub fn loldu_factors(w: &Array2<f64>, r: usize) -> Result<LolduFactors> {
    let (out_f, in_f) = w.dim();
    let k = out_f.min(in_f);
    if r == 0 || r > k {
        crate::bail!("loldu", "rank {r} must be in 1..=min(out, in) = {k}");
    }
    let (perm, l, u) = peft_core::linalg::lu(w)?;
    let d = Array1::from_shape_fn(r, |i| u[[i, i]]);
    if let Some(i) = d.iter().position(|&v| v == 0.0 || !v.is_finite()) {
        crate::bail!("loldu", "pivot {i} of the LU decomposition is zero (singular weight)");
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
        let w = w
            .view()
            .into_dimensionality::<Ix2>()
            .map_err(|_| Error::Invalid { op: "loldu", msg: format!("`{path}`: base weight is not a matrix") })?;
        let f = loldu_factors(&w.mapv(f64::from), r).map_err(|e| match e {
            Error::Invalid { op, msg } => Error::Invalid { op, msg: format!("`{path}`: {msg}") },
            e => e,
        })?;
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
    Error::Invalid { op: "loldu", msg: format!("factor is not a matrix: {s:?}") }
}

impl LinearAdapter for LolduLinear {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "loldu"
    }
    fn delta(&self, x: &Tensor, _base_out: &Tensor, _base: &dyn LinearBase, _ctx: &Ctx) -> Result<Tensor> {
        loldu_delta(x, &self.u_hat, &self.pl, &self.z.tensor(), self.sigma)
    }
    fn params(&self) -> Vec<Param> {
        vec![self.z.clone()]
    }
    fn delta_weight(&self, _base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        Ok(Some(self.weight()?.into_dyn()))
    }
}

/// A model with a LoLDU adapter.
pub struct LolduModel {
    /// The config (as given or loaded).
    pub config: LolduConfig,
    /// The adapter on its sites.
    pub sites: SiteModel<LolduLinear>,
}

impl LolduModel {
    /// Injects LoLDU adapter `name` into `model` (rewriting the target weights to their residuals).
    ///
    /// # Errors
    /// Config errors, [`Error::NoTargetMatched`], [`loldu_factors`] errors (nothing is changed on error).
    pub fn new(model: &dyn Module, config: LolduConfig, name: &str) -> Result<Self> {
        let sites = target_sites(model, &config.spec()?)?;
        // Check every site before rewriting any base.
        for s in &sites {
            let w = s.base().dense_weight()?;
            let w = w.view().into_dimensionality::<Ix2>().map_err(|_| shape(w.shape()))?;
            loldu_factors(&w.mapv(f64::from), config.r).map_err(|e| match e {
                Error::Invalid { op, msg } => Error::Invalid { op, msg: format!("`{}`: {msg}", s.path()) },
                e => e,
            })?;
        }
        let sm = SiteModel::inject(model, &sites, name, |s: &Linear| {
            LolduLinear::new(s.path(), name, s.base().as_ref(), config.r, config.alpha, config.init_z)
        })?;
        Ok(LolduModel { config, sites: sm })
    }

    /// The trainable parameters (`z` of every site).
    pub fn trainable_params(&self) -> Vec<Param> {
        self.sites.trainable_params()
    }

    /// Saves `adapter_config.json` (with `inference_mode = true`) and the `z` tensors; returns the bytes.
    ///
    /// # Errors
    /// IO errors.
    pub fn save_pretrained(&self, dir: &Path) -> Result<u64> {
        let cfg = LolduConfig { inference_mode: true, ..self.config.clone() };
        let tensors: BTreeMap<String, ArrayD<f32>> = self
            .sites
            .layers
            .iter()
            .map(|(s, a)| (format!("{PREFIX}{}.loldu_z", s.path()), a.z().value().to_owned()))
            .collect();
        write_files(dir, &cfg.to_json(), &tensors)
    }

    /// Loads a LoLDU adapter saved by [`LolduModel::save_pretrained`] onto the *original* `model` under `name`.
    ///
    /// # Errors
    /// Missing files, an invalid config, missing or mis-shaped tensors.
    pub fn load(model: &dyn Module, dir: &Path, name: &str) -> Result<Self> {
        let (text, file) = read_files(dir)?;
        let config: LolduConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid { op: "loldu", msg: format!("adapter_config.json: {e}") })?;
        let me = Self::new(model, config, name)?;
        let res = me
            .sites
            .layers
            .iter()
            .try_for_each(|(s, a)| load_into(&file, &format!("{PREFIX}{}.loldu_z", s.path()), a.z()));
        if let Err(e) = res {
            // Restore the original weights.
            for (s, a) in &me.sites.layers {
                s.base().add_to_weight(&a.pivot_part()?.into_dyn())?;
            }
            me.sites.detach()?;
            return Err(e);
        }
        if me.config.inference_mode {
            for p in me.trainable_params() {
                p.set_trainable(false);
            }
        }
        Ok(me)
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
