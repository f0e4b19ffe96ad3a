//! EVA, Explained Variance Adaptation (Paischer et al., 2024; PEFT `init_lora_weights = "eva"`), spec §2.5.
//!
//! Calibration batches run through the model while each target site's input rows feed a PCA with
//! `max_components = round(r·rho)`. After each batch, the explained-variance ratios of all components of all
//! sites are pooled, sorted and the top `Σ r_l` kept (rank redistribution); a site has converged when each of
//! its first `k_l` components has `|cos|` ≥ `tau` with the previous batch's estimate. Calibration stops when all
//! have converged (or the data is exhausted: the last estimate is used). Then `A = ` the top `k_l` components
//! (orthonormal rows; with `whiten` divided by `√s_i`, the square root of the component's singular value
//! `s_i = √(λ_i·(n−1))` over the `n` rows seen, as PEFT divides by `singular_values_.sqrt()`), `B = 0`
//! (identity at init), and with
//! `adjust_scaling_factors` `α_l = α·k_l/r` so `α_l/k_l = α/r`. Sites with `k_l = 0` get no adapter (added to
//! `exclude_modules`); the per-site ranks and alphas are written into `rank_pattern` / `alpha_pattern` as PEFT does.
//!
//! Differences from PEFT: the PCA is exact (streaming `Σx`, `XᵀX` in f64, eigendecomposition of the centred
//! covariance after each batch) where PEFT uses sklearn-style IncrementalPCA with a randomised SVD (which
//! approximates it); sites with identical inputs are not deduplicated (this changes only cost, not the result).
//!
//! Which rows count: run the calibration batches in [`peft_core::train::calibration_ctx`] (eval mode, no
//! dropout) with the batch's [`peft_core::nn::TokenMask`] so padding is left out (PEFT's attention-mask
//! indices); with `use_label_mask`, put the batch's per-token labels in the context as
//! [`peft_core::nn::TokenLabels`] and positions labelled `label_mask_value` are left out as well (PEFT's
//! `get_indices_fn_causal_lm`). Without token labels in the context every unpadded row counts.

use ndarray::Array2;
use peft_core::nn::Module;
use peft_core::{Error, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::{AdapterError, AdapterResult, InjectCx, LinearTuner, ModulePattern, Tuner, TunerConfig};

use crate::calib::{regex_escape, run_forward, Calibration, InputStats, RecordMode};
use crate::config::{num, InitLoraWeights, LoraConfig};
use crate::layer::LoraLinear;
use crate::tuner::{attach_lora, lora_sites};

/// PEFT's `EvaConfig` (`eva_config` in `adapter_config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaConfig {
    /// Rank budget factor: each site computes `round(r·rho)` components (≥ 1).
    pub rho: f64,
    /// Cosine-similarity threshold for convergence, in `(0, 1]`.
    pub tau: f64,
    /// Leave out positions whose token label ([`peft_core::nn::TokenLabels`] in the calibration context) is
    /// `label_mask_value`.
    pub use_label_mask: bool,
    /// The masked label value.
    pub label_mask_value: i64,
    /// Divide component `i` by the square root of its singular value (PEFT's `whiten`).
    pub whiten: bool,
    /// `α_l = α·k_l/r` when a site's rank changes.
    pub adjust_scaling_factors: bool,
}

impl Default for EvaConfig {
    fn default() -> Self {
        EvaConfig {
            rho: 2.0,
            tau: 0.99,
            use_label_mask: true,
            label_mask_value: -100,
            whiten: false,
            adjust_scaling_factors: true,
        }
    }
}

/// One site's PCA estimate.
#[derive(Clone, Debug)]
pub struct Pca {
    /// Components as rows `[c, in]` (orthonormal), by decreasing variance.
    pub components: Array2<f64>,
    /// Their variances `λ_i` (sample variance, denominator `n − 1`).
    pub variance: Vec<f64>,
    /// Their singular values over the centred rows seen, `s_i = √(λ_i·(n−1))` (sklearn's `singular_values_`).
    pub singular: Vec<f64>,
    /// `λ_i / Σ_all λ` (ratios of the total variance of the site's inputs).
    pub ratio: Vec<f64>,
}

/// The PCA of the rows seen so far, keeping `max_c` components.
///
/// # Errors
/// [`Error::NonFinite`] for non-finite statistics; [`Error::Count`] with fewer than 2 rows.
pub fn pca(st: &InputStats, max_c: usize) -> Result<Pca> {
    if st.nonfinite || st.xtx.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite { what: "EVA input statistics".into() });
    }
    if st.rows < 2 {
        return Err(Error::Count { op: "eva PCA", what: "input rows (at least)", expected: 2, got: st.rows });
    }
    let cov = st.centered_covariance();
    let (_, sv, vt) = peft_core::linalg::svd(&cov)?;
    let total: f64 = sv.sum();
    let c = max_c.min(sv.len());
    let variance: Vec<f64> = sv.iter().take(c).copied().collect();
    let ratio = variance.iter().map(|v| if total > 0.0 { v / total } else { 0.0 }).collect();
    let singular = variance.iter().map(|v| (v.max(0.0) * (st.rows as f64 - 1.0)).sqrt()).collect();
    Ok(Pca { components: vt.slice(ndarray::s![..c, ..]).to_owned(), variance, singular, ratio })
}

/// Rank redistribution: pools `(ratio, site)` over all components, keeps the `budget` largest and returns how
/// many each site got (ties go to the earlier site and component).
pub fn redistribute(ratios: &[Vec<f64>], budget: usize) -> Vec<usize> {
    let mut all: Vec<(f64, usize, usize)> =
        ratios.iter().enumerate().flat_map(|(l, r)| r.iter().enumerate().map(move |(j, &v)| (v, l, j))).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut k = vec![0; ratios.len()];
    for &(_, l, _) in all.iter().take(budget) {
        k[l] += 1;
    }
    k
}

/// True when the first `k` components of `cur` have `|cos| ≥ tau` with those of `prev`.
fn converged(prev: &Pca, cur: &Pca, k: usize, tau: f64) -> bool {
    (0..k.min(prev.components.nrows()).min(cur.components.nrows())).all(|i| {
        let (a, b) = (prev.components.row(i), cur.components.row(i));
        let cos = a.dot(&b) / (a.dot(&a).sqrt() * b.dot(&b).sqrt()).max(f64::MIN_POSITIVE);
        cos.abs() >= tau
    }) && k <= prev.components.nrows()
}

/// What the EVA calibration found, per target site (in model order).
#[derive(Clone, Debug)]
pub struct EvaResult {
    /// Site paths.
    pub paths: Vec<String>,
    /// The configured rank `r_l` of each site.
    pub budget: Vec<usize>,
    /// The redistributed rank `k_l`.
    pub ranks: Vec<usize>,
    /// The final PCA of each site.
    pub pca: Vec<Pca>,
    /// Calibration batches used.
    pub batches: usize,
    /// True when every site converged before the data ran out.
    pub converged: bool,
}

/// Runs EVA's calibration on `model` for the targets of `config` (at most `max_batches` batches).
///
/// # Errors
/// [`crate::LoraError::Field`] for `rho < 1` or `tau ∉ (0, 1]`, [`crate::LoraError::Rank`] for a rank above a
/// site's `min(in, out)`, [`crate::LoraError::EmptyCalibration`] for empty calibration data; [`Error::NonFinite`] for NaN/infinite activations; errors of `calib`.
pub fn eva_calibrate(
    model: &dyn Module,
    config: &LoraConfig,
    eva: &EvaConfig,
    calib: &mut dyn FnMut(usize) -> Result<Option<Tensor>>,
    max_batches: Option<usize>,
) -> AdapterResult<EvaResult> {
    if !(eva.rho >= 1.0 && eva.rho.is_finite()) {
        crate::error::fail!(crate::LoraError::Field {
            method: "eva",
            field: "rho",
            value: eva.rho.to_string(),
            rule: "must be >= 1"
        });
    }
    if !(eva.tau > 0.0 && eva.tau <= 1.0) {
        crate::error::fail!(crate::LoraError::Field {
            method: "eva",
            field: "tau",
            value: eva.tau.to_string(),
            rule: "must be in (0, 1]",
        });
    }
    let sites = lora_sites(model, config)?;
    let mut budget = Vec::new();
    let mut max_c = Vec::new();
    for s in &sites {
        let (r, _) = config.rank_alpha(s.path())?;
        if r == 0 || r > s.in_features().min(s.out_features()) {
            crate::error::fail!(crate::LoraError::Rank {
                method: "eva",
                site: s.path().into(),
                r,
                max: s.in_features().min(s.out_features()),
            });
        }
        budget.push(r);
        max_c.push(((r as f64 * eva.rho).round() as usize).clamp(r, s.in_features()));
    }
    let total: usize = budget.iter().sum();
    let cal =
        Calibration::attach_masked(&sites, RecordMode::Moments, eva.use_label_mask.then_some(eva.label_mask_value))?;
    let mut prev: Option<Vec<Pca>> = None;
    let mut done = false;
    let batches = run_forward("eva", calib, max_batches, |_| {
        let stats = cal.stats();
        if stats.iter().any(|s| s.nonfinite) {
            return Err(Error::NonFinite { what: "EVA input activations".into() });
        }
        if stats.iter().any(|s| s.rows < 2) {
            return Ok(false);
        }
        let cur: Vec<Pca> = stats.iter().zip(&max_c).map(|(s, &c)| pca(s, c)).collect::<Result<_>>()?;
        let ks = redistribute(&cur.iter().map(|p| p.ratio.clone()).collect::<Vec<_>>(), total);
        if let Some(p) = &prev {
            done = p.iter().zip(&cur).zip(&ks).all(|((a, b), &k)| converged(a, b, k, eva.tau));
        }
        prev = Some(cur);
        Ok(done)
    })?;
    let stats = cal.finish()?;
    let pcas: Vec<Pca> = stats.iter().zip(&max_c).map(|(s, &c)| pca(s, c)).collect::<Result<_>>()?;
    let ranks = redistribute(&pcas.iter().map(|p| p.ratio.clone()).collect::<Vec<_>>(), total);
    Ok(EvaResult {
        paths: sites.iter().map(|s| s.path().to_string()).collect(),
        budget,
        ranks,
        pca: pcas,
        batches,
        converged: done,
    })
}

/// EVA as a tuner: LoRA whose `A` rows are the leading principal components of each site's inputs on
/// calibration data (read through the inject context), with the ranks redistributed. Stored as the LoRA config
/// EVA produced (`init_lora_weights = "eva"`, `eva_config`, per-site ranks in `rank_pattern`), which loads back as
/// plain LoRA (the base is untouched).
#[derive(Clone, Debug)]
pub struct EvaLoraConfig {
    /// The LoRA part (targets, rank budget, alpha).
    pub lora: LoraConfig,
    /// EVA's options.
    pub eva: EvaConfig,
    /// At most this many calibration batches (`None`: until converged or exhausted).
    pub max_batches: Option<usize>,
}

impl EvaLoraConfig {
    /// EVA (rho 2) on `lora`'s targets, 32 calibration batches at most.
    pub fn new(lora: LoraConfig) -> Self {
        EvaLoraConfig { lora, eva: EvaConfig::default(), max_batches: Some(32) }
    }
}

impl TunerConfig for EvaLoraConfig {
    fn peft_type(&self) -> &str {
        "LORA"
    }
    fn describe(&self) -> String {
        format!("EVA rho={} r={} alpha={}", self.eva.rho, self.lora.r, self.lora.alpha())
    }
    fn to_json(&self) -> AdapterResult<Value> {
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
                what: "EVA without calibration data".into(),
                reason: "use PeftModel::add_adapter_calibrated".into(),
            });
        };
        let (tuner, saved) = eva_init(model, &self.lora, &self.eva, cx.name, cx.seed, calib, self.max_batches)?;
        Ok(Box::new(tuner.with_saved_config(Box::new(saved))))
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Builds an EVA adapter `name` on `model` from calibration data (see the module doc). Returns the attached
/// adapters and the config to store: `init_lora_weights = "eva"`, `eva_config`, and the redistributed
/// ranks/alphas in `rank_pattern`/`alpha_pattern`.
///
/// # Errors
/// As [`eva_calibrate`]; config errors; [`AdapterError::InvalidConfig`] when every site got rank 0.
pub fn eva_init(
    model: &dyn Module,
    config: &LoraConfig,
    eva: &EvaConfig,
    name: &str,
    seed: u64,
    calib: &mut dyn FnMut(usize) -> Result<Option<Tensor>>,
    max_batches: Option<usize>,
) -> AdapterResult<(LinearTuner<LoraLinear>, LoraConfig)> {
    let mut build = LoraConfig { init_lora_weights: InitLoraWeights::Bool(true), ..config.clone() };
    build.validate()?;
    let res = eva_calibrate(model, &build, eva, calib, max_batches)?;
    let (mut ranks, mut alphas) = (serde_json::Map::new(), serde_json::Map::new());
    let mut dropped = Vec::new();
    for ((path, &r), &k) in res.paths.iter().zip(&res.budget).zip(&res.ranks) {
        if k == 0 {
            dropped.push(path.clone());
            continue;
        }
        let key = regex_escape(path);
        ranks.insert(key.clone(), k.into());
        let (_, alpha) = build.rank_alpha(path)?;
        let a = if eva.adjust_scaling_factors { alpha * k as f64 / r as f64 } else { alpha };
        alphas.insert(key, Value::Number(num(a)));
    }
    if ranks.is_empty() {
        return Err(AdapterError::config("LORA", "eva_config", "rank redistribution left no site with an adapter"));
    }
    // Our keys first: PEFT's pattern lookup takes the first hit.
    ranks.extend(std::mem::take(&mut build.rank_pattern));
    alphas.extend(std::mem::take(&mut build.alpha_pattern));
    build.rank_pattern = ranks;
    build.alpha_pattern = alphas;
    if !dropped.is_empty() {
        build.exclude_modules = Some(match build.exclude_modules.take() {
            None => ModulePattern::List(dropped),
            Some(ModulePattern::List(mut v)) => {
                v.extend(dropped);
                ModulePattern::List(v)
            }
            Some(ModulePattern::Regex(re)) => ModulePattern::Regex(format!(
                "(?:{re})|{}",
                dropped.iter().map(|p| regex_escape(p)).collect::<Vec<_>>().join("|")
            )),
        });
    }
    build.extra.insert(
        "eva_config".into(),
        serde_json::to_value(eva).map_err(|e| AdapterError::config("LORA", "eva_config", e.to_string()))?,
    );
    let sites = lora_sites(model, &build)?;
    let tuner = attach_lora(&build, &sites, name, seed, |site, spec, rng| {
        let l = LoraLinear::new(site.path(), name, site.base().as_ref(), spec, rng)?;
        let i = res.paths.iter().position(|p| p == site.path()).expect("peft-rs bug: EVA site list");
        let (k, p) = (res.ranks[i], &res.pca[i]);
        let a = Array2::from_shape_fn((k, site.in_features()), |(r, c)| {
            let v = p.components[[r, c]];
            (if eva.whiten { v / p.singular[r].sqrt().max(f64::MIN_POSITIVE) } else { v }) as f32
        });
        l.lora_a().set(a.into_dyn())?;
        Ok(l)
    })?;
    build.init_lora_weights = InitLoraWeights::Named("eva".into());
    Ok((tuner, build))
}

#[cfg(test)]
#[path = "eva_tests.rs"]
mod tests;
