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
//! `lora_A.weight`, `lora_B.weight` and `lora_latent_mapping.weight` (LoRA-XS's name for `R`).

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{s, Array2, ArrayD, Ix2};
use peft_core::adapter::{ModulePattern, TargetSpec};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Elem, Error, Param, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::calib::{accumulate_weight_grads, target_sites};
use crate::sitemodel::{load_into, read_files, write_files, SiteModel, PREFIX};

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
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
}

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
            inference_mode: false,
        }
    }

    /// `η = lr / max(1, ⌈warmup_ratio·total_steps⌉)`.
    pub fn eta(&self) -> f64 {
        self.lr / (self.warmup_ratio * self.total_steps as f64).ceil().max(1.0)
    }

    /// The file text.
    pub fn to_json(&self) -> String {
        crate::pyjson::dumps(&serde_json::to_value(self).expect("peft-rs bug: LoraSbConfig serialises"))
    }

    fn spec(&self) -> Result<TargetSpec> {
        if self.peft_type != "LORA_SB" {
            crate::bail!("lora_sb", "peft_type {:?} is not LORA_SB", self.peft_type);
        }
        if self.r == 0 {
            crate::bail!("lora_sb", "rank 0");
        }
        if !(self.eta().is_finite() && self.eta() > 0.0) {
            crate::bail!("lora_sb", "lr / warm-up steps must be positive and finite, got {}", self.eta());
        }
        TargetSpec::new(&self.target_modules, self.exclude_modules.as_ref(), None, None, &[])
    }
}

/// `(A [r, in], R [r, r], B [out, r])` with `B R A` the best rank-r approximation of `ΔW = −η·sign(g)`.
///
/// # Errors
/// [`Error::Invalid`] for `r = 0` or `r > min(out, in)`; [`Error::NonFinite`] for a non-finite gradient.
pub fn lora_sb_factors(g: &Array2<f64>, r: usize, eta: f64) -> Result<(Array2<f64>, Array2<f64>, Array2<f64>)> {
    let (out_f, in_f) = g.dim();
    let k = out_f.min(in_f);
    if r == 0 || r > k {
        crate::bail!("lora_sb", "rank {r} must be in 1..=min(out, in) = {k}");
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
    p.value()
        .view()
        .into_dimensionality::<Ix2>()
        .map(|v| v.to_owned())
        .map_err(|_| Error::Invalid { op: "lora_sb", msg: format!("{} is not a matrix", p.name()) })
}

impl LinearAdapter for LoraSbLinear {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "lora-sb"
    }
    fn delta(&self, x: &Tensor, _base_out: &Tensor, _base: &dyn LinearBase, _ctx: &Ctx) -> Result<Tensor> {
        lora_sb_delta(x, &self.a.tensor(), &self.r.tensor(), &self.b.tensor())
    }
    fn params(&self) -> Vec<Param> {
        vec![self.a.clone(), self.r.clone(), self.b.clone()]
    }
    fn delta_weight(&self, _base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        Ok(Some(m2(&self.b)?.dot(&m2(&self.r)?).dot(&m2(&self.a)?).into_dyn()))
    }
}

/// A model with a LoRA-SB adapter.
pub struct LoraSbModel {
    /// The config.
    pub config: LoraSbConfig,
    /// The adapter on its sites.
    pub sites: SiteModel<LoraSbLinear>,
}

const TENSORS: [&str; 3] = ["lora_A.weight", "lora_latent_mapping.weight", "lora_B.weight"];

impl LoraSbModel {
    /// Runs the gradient calibration on `model` (calibration batch `i` from `calib(i)`) and injects adapter
    /// `name`.
    ///
    /// # Errors
    /// Config errors; [`Error::NoTargetMatched`]; [`crate::calib::empty_calibration`]; [`lora_sb_factors`]
    /// errors (nothing is attached on error); errors of `calib`.
    pub fn init(
        model: &dyn Module,
        config: LoraSbConfig,
        name: &str,
        calib: &mut dyn FnMut(usize) -> Result<Option<Tensor>>,
    ) -> Result<Self> {
        let sites = target_sites(model, &config.spec()?)?;
        for s in &sites {
            let k = s.in_features().min(s.out_features());
            if config.r > k {
                crate::bail!("lora_sb", "`{}`: rank {} must be in 1..=min(out, in) = {k}", s.path(), config.r);
            }
        }
        let (grads, _) = accumulate_weight_grads("lora_sb", &sites, calib, config.num_batches.max(1))?;
        let mut factors = Vec::new();
        for (s, g) in sites.iter().zip(&grads) {
            let (a, r, b) = lora_sb_factors(g, config.r, config.eta()).map_err(|e| match e {
                Error::NonFinite { what } => Error::NonFinite { what: format!("{what} of `{}`", s.path()) },
                e => e,
            })?;
            factors.push((a.mapv(|v| v as f32), r.mapv(|v| v as f32), b.mapv(|v| v as f32)));
        }
        let mut it = factors.into_iter();
        let sm = SiteModel::inject(model, &sites, name, |s: &Linear| {
            let (a, r, b) = it.next().expect("peft-rs bug: one factor set per site");
            LoraSbLinear::new(s.path(), name, (s.in_features(), s.out_features()), a, r, b)
        })?;
        Ok(LoraSbModel { config, sites: sm })
    }

    /// The trainable parameters (`R` of every site).
    pub fn trainable_params(&self) -> Vec<Param> {
        self.sites.trainable_params()
    }

    /// Saves `adapter_config.json` (`inference_mode = true`) and A, R, B of every site; returns the bytes.
    ///
    /// # Errors
    /// IO errors.
    pub fn save_pretrained(&self, dir: &Path) -> Result<u64> {
        let cfg = LoraSbConfig { inference_mode: true, ..self.config.clone() };
        let mut tensors = BTreeMap::new();
        for (s, a) in &self.sites.layers {
            for (t, p) in TENSORS.iter().zip([a.lora_a(), a.lora_r(), a.lora_b()]) {
                tensors.insert(format!("{PREFIX}{}.{t}", s.path()), p.value().to_owned());
            }
        }
        write_files(dir, &cfg.to_json(), &tensors)
    }

    /// Loads an adapter saved by [`LoraSbModel::save_pretrained`] onto `model` under `name` (no calibration).
    ///
    /// # Errors
    /// Missing files, an invalid config, missing or mis-shaped tensors (nothing stays attached on error).
    pub fn load(model: &dyn Module, dir: &Path, name: &str) -> Result<Self> {
        let (text, file) = read_files(dir)?;
        let config: LoraSbConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid { op: "lora_sb", msg: format!("adapter_config.json: {e}") })?;
        let sites = target_sites(model, &config.spec()?)?;
        let r = config.r;
        let sm = SiteModel::inject(model, &sites, name, |s: &Linear| {
            let (i, o) = (s.in_features(), s.out_features());
            LoraSbLinear::new(
                s.path(),
                name,
                (i, o),
                Array2::zeros((r, i)),
                Array2::zeros((r, r)),
                Array2::zeros((o, r)),
            )
        })?;
        let res = sm.layers.iter().try_for_each(|(s, a)| {
            for (t, p) in TENSORS.iter().zip([a.lora_a(), a.lora_r(), a.lora_b()]) {
                load_into(&file, &format!("{PREFIX}{}.{t}", s.path()), p)?;
            }
            Ok(())
        });
        if let Err(e) = res {
            sm.detach()?;
            return Err(e);
        }
        if config.inference_mode {
            for p in sm.trainable_params() {
                p.set_trainable(false);
            }
        }
        Ok(LoraSbModel { config, sites: sm })
    }
}

#[cfg(test)]
#[path = "lora_sb_tests.rs"]
mod tests;
