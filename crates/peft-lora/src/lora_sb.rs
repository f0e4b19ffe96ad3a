//! LoRA-SB (Ponkshe et al., 2024), spec §2.7: the LoRA-XS architecture `ΔW = s·B R A` with frozen `A [r, in]`,
//! `B [out, r]` and a trainable `R [r, r]`, `s = 1` (α forced to r), initialised from an approximation of the first
//! full fine-tuning step.
//!
//! Init: sum the gradients `G_W` of every target weight over the calibration batches (the weights are made
//! trainable for that, then frozen again), approximate the first Adam-like update `ΔW₁ = −η·sign(G_W)` with
//! `η = lr / warmup_steps` (the first warm-up step's rate, `warmup_steps = ⌈warmup_ratio·total_steps⌉`), take
//! the rank-r SVD `ΔW₁ᵀ ≈ U S Vᵀ` and set `A = U_rᵀ`, `R = diag(S_r)`, `B = V_r`. Then `B R A` is the best
//! rank-r approximation of `ΔW₁`: the model is **not** base-equivalent at init (by design it starts one
//! approximate full-FT step ahead); `W` is not modified. The authors use a randomised SVD (10 iterations, seed 42);
//! this uses the exact SVD, which it approximates.
//!
//! PEFT has no LoRA-SB; the files use PEFT's layout with `peft_type = "LORA_SB"` and per site the tensors
//! `lora_A.weight`, `lora_B.weight` and `lora_latent_mapping.weight` (LoRA-XS's name for `R`). The init needs
//! calibration data (`PeftModel::add_adapter_calibrated`); loading needs none: the factors are read from the file.

use std::any::Any;
use std::sync::Arc;

use ndarray::{s, Array2, ArrayD, Ix2};
use peft_core::adapter::{
    select_linear, AdapterError, AdapterResult, AdapterTensors, InjectCx, LinearTuner, ModulePattern, PeftConfig,
    SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Elem, Error, Param, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::calib::accumulate_weight_grads;
use crate::structured::{config_json, describe_targets, expect_tensor, parse_config, target_spec};

/// LoRA-SB's `peft_type`.
pub const LORA_SB_TYPE: &str = "LORA_SB";

fn d_peft_type() -> String {
    "LORA_SB".into()
}

/// `adapter_config.json` of a LoRA-SB adapter (and its init hyper-parameters).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSbConfig {
    /// Always `"LORA_SB"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// Rank.
    pub r: usize,
    /// Sites to adapt (PEFT semantics).
    pub target_modules: ModulePattern,
    /// Sites never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// Training learning rate (for `η`).
    pub lr: f64,
    /// Warm-up fraction of training (for `η`).
    pub warmup_ratio: f64,
    /// Total training steps (for `η`).
    pub total_steps: usize,
    /// Calibration batches whose gradients are summed (the authors: 50 samples at batch 3, about 17 batches).
    pub num_batches: usize,
    /// Informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Modules trained and saved in full next to the adapter (PEFT's `modules_to_save`; written only when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
    /// Set by [`TunerConfig::for_loading`]: the factors come from a file, so no calibration runs.
    #[serde(skip)]
    from_file: bool,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "r",
    "target_modules",
    "exclude_modules",
    "lr",
    "warmup_ratio",
    "total_steps",
    "num_batches",
    "task_type",
    "base_model_name_or_path",
    "modules_to_save",
    "inference_mode",
];

impl LoraSbConfig {
    /// Rank `r` on list targets, `lr = 1e-4`, `warmup_ratio = 0.02`, `total_steps = 1000`, 17 batches.
    pub fn new<S: Into<String>>(r: usize, targets: impl IntoIterator<Item = S>) -> Self {
        LoraSbConfig {
            peft_type: d_peft_type(),
            r,
            target_modules: ModulePattern::list(targets),
            exclude_modules: None,
            lr: 1e-4,
            warmup_ratio: 0.02,
            total_steps: 1000,
            num_batches: 17,
            task_type: None,
            base_model_name_or_path: None,
            modules_to_save: None,
            inference_mode: false,
            from_file: false,
        }
    }

    /// `η = lr / max(1, ⌈warmup_ratio·total_steps⌉)`.
    pub fn eta(&self) -> f64 {
        self.lr / (self.warmup_ratio * self.total_steps as f64).ceil().max(1.0)
    }

    /// Checks the config.
    ///
    /// # Errors
    /// [`AdapterError::InvalidConfig`] for another `peft_type`, rank 0, or a non-positive `η`.
    pub fn validate(&self) -> AdapterResult<()> {
        let bad = |field: &str, reason: String| Err(AdapterError::config(LORA_SB_TYPE, field, reason));
        if self.peft_type != LORA_SB_TYPE {
            return bad("peft_type", format!("{:?} is not LORA_SB", self.peft_type));
        }
        if self.r == 0 {
            return bad("r", "rank 0".into());
        }
        if !(self.eta().is_finite() && self.eta() > 0.0) {
            return bad("lr", format!("lr / warm-up steps must be positive and finite, got {}", self.eta()));
        }
        Ok(())
    }

    /// The sites this config adapts in `model`, each checked for the rank.
    ///
    /// # Errors
    /// [`peft_core::Error::NoTargetMatched`]; regex errors; [`crate::LoraError::Rank`] for a rank above a site's
    /// `min(out, in)`.
    pub fn sites(&self, model: &dyn Module) -> AdapterResult<Vec<Linear>> {
        let sites = select_linear(model, &target_spec(&self.target_modules, self.exclude_modules.as_ref())?)?;
        for s in &sites {
            let k = s.in_features().min(s.out_features());
            if self.r > k {
                crate::error::fail!(crate::LoraError::Rank {
                    method: "lora_sb",
                    site: s.path().into(),
                    r: self.r,
                    max: k
                });
            }
        }
        Ok(sites)
    }
}

/// `(A [r, in], R [r, r], B [out, r])` with `B R A` the best rank-r approximation of `ΔW = −η·sign(g)`.
///
/// # Errors
/// [`crate::LoraError::Rank`] for `r = 0` or `r > min(out, in)`; [`Error::NonFinite`] for a non-finite gradient.
pub fn lora_sb_factors(g: &Array2<f64>, r: usize, eta: f64) -> Result<(Array2<f64>, Array2<f64>, Array2<f64>)> {
    let (out_f, in_f) = g.dim();
    let k = out_f.min(in_f);
    if r == 0 || r > k {
        crate::error::fail!(crate::LoraError::Rank { method: "lora_sb", site: String::new(), r, max: k });
    }
    if g.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: "LoRA-SB accumulated gradient".into() });
    }
    let dw_t = g.t().mapv(|v| -eta * sign(v)); // ΔW₁ᵀ [in, out]
    let (u, sv, vt) = peft_core::linalg::svd(&dw_t)?;
    let a = u.slice(s![.., ..r]).t().to_owned();
    let rr = Array2::from_diag(&sv.slice(s![..r]));
    let b = vt.slice(s![..r, ..]).t().to_owned();
    Ok((a, rr, b))
}

fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `((x Aᵀ) Rᵀ) Bᵀ`, the adapter's output term (generic for gradient checks).
///
/// # Errors
/// Shape errors.
pub fn lora_sb_delta<E: Elem>(x: &Tensor<E>, a: &Tensor<E>, r: &Tensor<E>, b: &Tensor<E>) -> Result<Tensor<E>> {
    x.linear(a, None)?.linear(r, None)?.linear(b, None)
}

/// A LoRA-SB (LoRA-XS) adapter on one site.
pub struct LoraSbLinear {
    name: String,
    a: Param,
    r: Param,
    b: Param,
}

impl LoraSbLinear {
    /// An adapter with the given factors (A, B frozen; R trainable).
    ///
    /// # Errors
    /// [`Error::Shape`] when the factors do not fit `(in, out)`.
    pub fn new(
        path: &str,
        name: &str,
        in_out: (usize, usize),
        a: Array2<f32>,
        r: Array2<f32>,
        b: Array2<f32>,
    ) -> Result<Self> {
        let k = r.nrows();
        if a.dim() != (k, in_out.0) || r.dim() != (k, k) || b.dim() != (in_out.1, k) {
            return Err(Error::Shape { op: "lora_sb", lhs: a.shape().to_vec(), rhs: b.shape().to_vec() });
        }
        Ok(LoraSbLinear {
            name: name.to_string(),
            a: Param::new(format!("{path}.lora_A.{name}.weight"), a.into_dyn(), false),
            r: Param::new(format!("{path}.lora_latent_mapping.{name}.weight"), r.into_dyn(), true),
            b: Param::new(format!("{path}.lora_B.{name}.weight"), b.into_dyn(), false),
        })
    }

    /// `A` `[r, in]` (frozen).
    pub fn lora_a(&self) -> &Param {
        &self.a
    }
    /// `R` `[r, r]` (trainable).
    pub fn lora_r(&self) -> &Param {
        &self.r
    }
    /// `B` `[out, r]` (frozen).
    pub fn lora_b(&self) -> &Param {
        &self.b
    }
}

fn m2(p: &Param) -> Result<Array2<f32>> {
    p.value().view().into_dimensionality::<Ix2>().map(|v| v.to_owned()).map_err(|_| {
        crate::LoraError::NotMatrix { method: "lora_sb", what: p.name().into(), expected: "a matrix", shape: p.shape() }
            .into()
    })
}

impl LinearAdapter for LoraSbLinear {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "lora-sb"
    }
    fn delta(&self, x: &Tensor, _base_out: &Tensor, _base: &dyn LinearBase, _ctx: &Ctx) -> Result<Option<Tensor>> {
        Ok(Some(lora_sb_delta(x, &self.a.tensor(), &self.r.tensor(), &self.b.tensor())?))
    }
    fn params(&self) -> Vec<Param> {
        vec![self.a.clone(), self.r.clone(), self.b.clone()]
    }
    fn delta_weight(&self, _base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        Ok(Some(m2(&self.b)?.dot(&m2(&self.r)?).dot(&m2(&self.a)?).into_dyn()))
    }
}

impl SavedTensors for LoraSbLinear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        vec![
            ("lora_A.weight".into(), self.a.clone()),
            ("lora_latent_mapping.weight".into(), self.r.clone()),
            ("lora_B.weight".into(), self.b.clone()),
        ]
    }
}

/// An injected LoRA-SB adapter: [`LinearTuner`] whose trainable parameters are the `R` matrices only (`A`, `B`
/// stay frozen and are saved).
pub struct LoraSbTuner {
    inner: LinearTuner<LoraSbLinear>,
}

impl LoraSbTuner {
    /// The adapted sites and their layers.
    pub fn layers(&self) -> &[(Linear, Arc<LoraSbLinear>)] {
        self.inner.layers()
    }
}

impl Tuner for LoraSbTuner {
    peft_core::forward_tuner!(inner => name, state_dict, wrapped_modules, set_active, merge, unmerge, is_merged, detach);
    /// `R` of every site.
    fn params(&self) -> Vec<Param> {
        self.layers().iter().map(|(_, a)| a.lora_r().clone()).collect()
    }
    fn kind(&self) -> &str {
        LORA_SB_TYPE
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl TunerConfig for LoraSbConfig {
    fn peft_type(&self) -> &str {
        LORA_SB_TYPE
    }
    fn describe(&self) -> String {
        format!(
            "LoRA-SB r={} ({} calibration batches) on {}",
            self.r,
            self.num_batches,
            describe_targets(&self.target_modules)
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        config_json(self, LORA_SB_TYPE)
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
    fn needs_calibration(&self) -> bool {
        !self.from_file
    }
    /// Sums the target weights' gradients over the calibration batches and attaches the factors of the first
    /// approximate full fine-tuning step (or, for a config from [`TunerConfig::for_loading`], zeros that the file
    /// overwrites). Nothing is attached on error, and the base weights are never written.
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.validate()?;
        let sites = self.sites(model)?;
        let (name, r) = (cx.name, self.r);
        let mut factors: Vec<(Array2<f32>, Array2<f32>, Array2<f32>)> = if self.from_file {
            sites
                .iter()
                .map(|s| {
                    (Array2::zeros((r, s.in_features())), Array2::zeros((r, r)), Array2::zeros((s.out_features(), r)))
                })
                .collect()
        } else {
            let Some(calib) = cx.calib else {
                return Err(AdapterError::Unsupported {
                    method: LORA_SB_TYPE.into(),
                    what: "an init without calibration data".into(),
                    reason: "LoRA-SB initialises from gradients: use PeftModel::add_adapter_calibrated".into(),
                });
            };
            let (grads, _) = accumulate_weight_grads("lora_sb", &sites, calib, self.num_batches.max(1))?;
            let mut out = Vec::new();
            for (s, g) in sites.iter().zip(&grads) {
                let (a, rr, b) = lora_sb_factors(g, r, self.eta()).map_err(|e| match e {
                    Error::NonFinite { what } => Error::NonFinite { what: format!("{what} of `{}`", s.path()) },
                    e => e,
                })?;
                out.push((a.mapv(|v| v as f32), rr.mapv(|v| v as f32), b.mapv(|v| v as f32)));
            }
            out
        };
        factors.reverse();
        let inner = LinearTuner::attach(name, LORA_SB_TYPE, &sites, |s: &Linear| {
            let (a, rr, b) = factors.pop().ok_or(Error::Count {
                op: "lora_sb",
                what: "factor sets per site",
                expected: 1,
                got: 0,
            })?;
            Ok(LoraSbLinear::new(s.path(), name, (s.in_features(), s.out_features()), a, rr, b)?)
        })?;
        Ok(Box::new(LoraSbTuner { inner }))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        let r = self.r;
        for s in self.sites(model)? {
            let p = s.path();
            expect_tensor(file, &format!("{p}.lora_A.weight"), &[r, s.in_features()])?;
            expect_tensor(file, &format!("{p}.lora_latent_mapping.weight"), &[r, r])?;
            expect_tensor(file, &format!("{p}.lora_B.weight"), &[s.out_features(), r])?;
        }
        Ok(())
    }
    fn for_loading(&self) -> AdapterResult<Box<dyn TunerConfig>> {
        Ok(Box::new(LoraSbConfig { from_file: true, ..self.clone() }))
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl PeftConfig for LoraSbConfig {
    const PEFT_TYPE: &'static str = LORA_SB_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (LoraSbConfig, _) = parse_config(v, LORA_SB_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "lora_sb_tests.rs"]
mod tests;
