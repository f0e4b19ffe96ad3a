//! CorDA (Yang et al., 2024; PEFT `init_lora_weights = "corda"`): context-oriented decomposition of each target
//! weight with the covariance `C` of its inputs on calibration data (spec §2.4).
//!
//! With the damped covariance `C' = C + δ·mean(diag C)·I` (δ from 0.01, doubled until `‖C'C'^{-1} − I‖_F < 0.05`),
//! `W C' = U Σ Vᵀ` and `V̂ᵀ = Vᵀ C'^{-1}`, so `U Σ V̂ᵀ = W`. The adapter takes `r` components, the **largest**
//! (IPM, instruction-previewed) or the **smallest** (KPM, knowledge-preserving):
//! `A = diag(√(Σ_r/s)) V̂_rᵀ`, `B = U_r diag(√(Σ_r/s))`, and the base becomes `W_res = W − s·B·A`, so the model
//! output is unchanged at init. A, B train; merging gives back a plain dense weight;
//! [`crate::LoraModelExt::save_mutated_as_lora`] turns the trained adapter into a plain LoRA delta for the original `W`.

use ndarray::{s, Array2};
use peft_core::nn::Module;
use peft_core::{Error, Result, Tensor};
use serde::{Deserialize, Serialize};

use peft_core::adapter::{AdapterError, AdapterResult, InjectCx, LinearTuner, Tuner, TunerConfig};

use crate::calib::{run_forward, Calibration, RecordMode};
use crate::config::{InitLoraWeights, LoraConfig};
use crate::layer::LoraLinear;
use crate::tuner::{lora_sites, spec_at};

/// Which end of the spectrum the adapter takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CordaMethod {
    /// Instruction-previewed: the largest `r` components (calibrate on the fine-tuning data).
    #[default]
    Ipm,
    /// Knowledge-preserving: the smallest `r` components (calibrate on knowledge prompts to protect).
    Kpm,
}

/// PEFT's `CordaConfig` (`corda_config` in `adapter_config.json`); only `corda_method` changes the result here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CordaConfig {
    /// PEFT's cache path for the decomposition (kept for the file; unused).
    #[serde(default)]
    pub cache_file: Option<String>,
    /// PEFT's cache path for the covariance (kept for the file; unused).
    #[serde(default)]
    pub covariance_file: Option<String>,
    /// IPM or KPM.
    #[serde(default)]
    pub corda_method: CordaMethod,
    /// PEFT's logging flag (unused).
    #[serde(default)]
    pub verbose: bool,
    /// PEFT's half-precision covariance option; peft-rs always accumulates in f64 (unused).
    #[serde(default)]
    pub use_float16_for_covariance: bool,
    /// PEFT's memory option (unused).
    #[serde(default = "yes")]
    pub prune_temporary_fields: bool,
}

fn yes() -> bool {
    true
}

impl Default for CordaConfig {
    fn default() -> Self {
        CordaConfig {
            cache_file: None,
            covariance_file: None,
            corda_method: CordaMethod::Ipm,
            verbose: false,
            use_float16_for_covariance: false,
            prune_temporary_fields: true,
        }
    }
}

/// The result of one CorDA decomposition.
#[derive(Clone, Debug)]
pub struct CordaFactors {
    /// `A [r, in]`.
    pub a: Array2<f32>,
    /// `B [out, r]`.
    pub b: Array2<f32>,
    /// All singular values `Σ` of `W C'`, descending.
    pub sigma: Vec<f64>,
    /// The damping δ the loop settled on.
    pub delta: f64,
}

/// `C'^{-1}` of a symmetric positive (semi-)definite matrix via its SVD, and `‖C'C'^{-1} − I‖_F`.
fn inverse(c: &Array2<f64>) -> Result<(Array2<f64>, f64)> {
    let (u, sv, vt) = peft_core::linalg::svd(c)?;
    let n = c.nrows();
    // C'^{-1} = V diag(1/σ) Uᵀ.
    let v_scaled = &vt.t() / &sv.view().insert_axis(ndarray::Axis(0));
    let inv = v_scaled.dot(&u.t());
    let err = (c.dot(&inv) - Array2::<f64>::eye(n)).iter().map(|v| v * v).sum::<f64>().sqrt();
    Ok((inv, if err.is_finite() { err } else { f64::INFINITY }))
}

/// CorDA's decomposition of `w [out, in]` with input covariance `cov [in, in]` at rank `r` and LoRA scaling `s`.
///
/// # Errors
/// [`crate::LoraError::Rank`] for `r = 0` or `r > min(out, in)`, [`crate::LoraError::Degenerate`] for a zero
/// covariance or a damping loop that does not
/// reach an invertible matrix; [`Error::NonFinite`] for a covariance with NaN/infinity; shape errors.
pub fn corda_factors(
    w: &Array2<f64>,
    cov: &Array2<f64>,
    r: usize,
    s: f64,
    method: CordaMethod,
) -> Result<CordaFactors> {
    let (out_f, in_f) = w.dim();
    let k = out_f.min(in_f);
    if r == 0 || r > k {
        crate::error::fail!(crate::LoraError::Rank { method: "corda", site: String::new(), r, max: k });
    }
    if cov.dim() != (in_f, in_f) {
        return Err(Error::Shape { op: "corda", lhs: w.shape().to_vec(), rhs: cov.shape().to_vec() });
    }
    if cov.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: "CorDA input covariance".into() });
    }
    let mean_diag = cov.diag().sum() / in_f as f64;
    if mean_diag <= 0.0 {
        crate::error::fail!(crate::LoraError::Degenerate {
            method: "corda",
            site: String::new(),
            reason: "the input covariance is zero (no signal reached the layer)",
        });
    }
    let mut delta = 0.01;
    let (damped, inv) = loop {
        let mut c = cov.clone();
        c.diag_mut().mapv_inplace(|v| v + delta * mean_diag);
        let (inv, err) = inverse(&c)?;
        if err < 0.05 {
            break (c, inv);
        }
        delta *= 2.0;
        if delta > 1e6 {
            crate::error::fail!(crate::LoraError::Degenerate {
                method: "corda",
                site: String::new(),
                reason: "damping did not make the covariance invertible (δ > 1e6)",
            });
        }
    };
    let (u, sv, vt) = peft_core::linalg::svd(&w.dot(&damped))?;
    let vhat_t = vt.dot(&inv); // [k, in]
    let range = match method {
        CordaMethod::Ipm => 0..r,
        CordaMethod::Kpm => k - r..k,
    };
    let sq: Vec<f64> = range.clone().map(|i| (sv[i] / s).sqrt()).collect();
    let a = Array2::from_shape_fn((r, in_f), |(i, j)| (sq[i] * vhat_t[[range.start + i, j]]) as f32);
    let us = u.slice(s![.., range.clone()]);
    let b = Array2::from_shape_fn((out_f, r), |(i, j)| (us[[i, j]] * sq[j]) as f32);
    Ok(CordaFactors { a, b, sigma: sv.to_vec(), delta })
}

/// CorDA as a tuner: LoRA whose `A`, `B` come from the decomposition above, computed from calibration data read
/// through the inject context (see [`peft_core::adapter::PeftModel::add_adapter_calibrated`]). The stored config
/// is the LoRA config with `init_lora_weights = "corda"` and `corda_config`; such an adapter expects the residual
/// base, so it cannot be reloaded onto the original model without the data (save it with
/// [`crate::LoraModelExt::save_mutated_as_lora`]).
#[derive(Clone, Debug)]
pub struct CordaLoraConfig {
    /// The LoRA part (targets, rank, alpha; `init_lora_weights` is set by CorDA).
    pub lora: LoraConfig,
    /// CorDA's options.
    pub corda: CordaConfig,
    /// At most this many calibration batches (`None`: all).
    pub max_batches: Option<usize>,
}

impl CordaLoraConfig {
    /// CorDA (IPM) on `lora`'s targets, 32 calibration batches at most.
    pub fn new(lora: LoraConfig) -> Self {
        CordaLoraConfig { lora, corda: CordaConfig::default(), max_batches: Some(32) }
    }
}

impl TunerConfig for CordaLoraConfig {
    fn peft_type(&self) -> &str {
        "LORA"
    }
    fn describe(&self) -> String {
        let m = match self.corda.corda_method {
            CordaMethod::Ipm => "IPM",
            CordaMethod::Kpm => "KPM",
        };
        format!("CorDA-{m} r={} alpha={}", self.lora.r, self.lora.alpha())
    }
    fn to_json(&self) -> AdapterResult<serde_json::Value> {
        TunerConfig::to_json(&self.lora)
    }
    fn modules_to_save(&self) -> Vec<String> {
        self.lora.modules_to_save()
    }
    fn set_modules_to_save(&mut self, modules: Vec<String>) -> AdapterResult<()> {
        self.lora.set_modules_to_save(modules)
    }
    fn inference_mode(&self) -> bool {
        self.lora.inference_mode
    }
    fn set_inference_mode(&mut self, on: bool) {
        self.lora.inference_mode = on;
    }
    fn trains_base_param(&self, name: &str, wrapped: &[String]) -> bool {
        self.lora.trains_base_param(name, wrapped)
    }
    fn needs_calibration(&self) -> bool {
        true
    }
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        let Some(calib) = cx.calib else {
            return Err(AdapterError::Unsupported {
                method: "LORA".into(),
                what: "CorDA without calibration data".into(),
                reason: "use PeftModel::add_adapter_calibrated".into(),
            });
        };
        let (tuner, saved) = corda_init(model, &self.lora, &self.corda, cx.name, calib, self.max_batches)?;
        Ok(Box::new(tuner.with_saved_config(Box::new(saved))))
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Builds a CorDA adapter `name` on `model`: runs the calibration batches (all of them, or the first
/// `max_batches`) to collect each target's input covariance, decomposes, rewrites the bases and attaches the
/// adapters. Returns them with the config to store (`init_lora_weights = "corda"`, `corda_config`).
///
/// # Errors
/// Config errors (DoRA is rejected); [`crate::calib::empty_calibration`]; [`corda_factors`] errors (a NaN
/// covariance as [`Error::NonFinite`] naming the site); errors of `calib`.
pub fn corda_init(
    model: &dyn Module,
    config: &LoraConfig,
    corda: &CordaConfig,
    name: &str,
    calib: &mut dyn FnMut(usize) -> Result<Option<Tensor>>,
    max_batches: Option<usize>,
) -> AdapterResult<(LinearTuner<LoraLinear>, LoraConfig)> {
    let mut build = LoraConfig { init_lora_weights: InitLoraWeights::Bool(true), ..config.clone() };
    build.validate()?;
    if build.use_dora {
        return Err(AdapterError::config("LORA", "use_dora", "CorDA cannot be combined with DoRA"));
    }
    let sites = lora_sites(model, &build)?;
    for s in &sites {
        for a in s.adapters() {
            if s.is_merged(a.name())? {
                return Err(AdapterError::config(
                    "LORA",
                    "init_lora_weights",
                    format!("CorDA rewrites `{}`, which has a merged adapter", s.path()),
                ));
            }
        }
    }
    let cal = Calibration::attach(&sites, RecordMode::CordaCovariance)?;
    run_forward("corda", calib, max_batches, |_| Ok(false))?;
    let stats = cal.finish()?;
    // Decompose every site before touching anything, so an error leaves the model as it was.
    let mut factors = Vec::new();
    for (site, st) in sites.iter().zip(&stats) {
        if st.nonfinite {
            return Err(Error::NonFinite { what: format!("CorDA input statistics of `{}`", site.path()) }.into());
        }
        let cov = &st.xtx / st.samples as f64;
        let (r, alpha) = build.rank_alpha(site.path())?;
        let w = site.base().dense_weight()?;
        let w = w.view().into_dimensionality::<ndarray::Ix2>().map_err(|_| crate::LoraError::NotMatrix {
            method: "corda",
            what: format!("base weight of `{}`", site.path()),
            expected: "a matrix",
            shape: w.shape().to_vec(),
        })?;
        let f = corda_factors(&w.mapv(f64::from), &cov, r, build.scaling(r, alpha), corda.corda_method)
            .map_err(|e| crate::error::at_site(e, site.path()))?;
        factors.push(f);
    }
    let mut k = 0;
    let tuner = LinearTuner::attach(name, "LORA", &sites, |site| {
        let f = factors[k].clone();
        k += 1;
        let spec = spec_at(&build, site)?;
        Ok(LoraLinear::from_mutating_init(site.path(), name, site.base().as_ref(), spec, f.a, f.b)?)
    })?;
    build.extra.insert(
        "corda_config".into(),
        serde_json::to_value(corda).map_err(|e| AdapterError::config("LORA", "corda_config", e.to_string()))?,
    );
    build.init_lora_weights = InitLoraWeights::Named("corda".into());
    Ok((tuner, build))
}

#[cfg(test)]
#[path = "corda_tests.rs"]
pub(crate) mod tests;
