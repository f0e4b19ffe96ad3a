//! SaRA (spec §3.4, masked-update semantics §1.5): progressively fine-tune the *smallest* pretrained weights,
//! with a nuclear-norm low-rank regulariser on the sparse update.
//!
//! - **Mask.** Per target tensor, `m = |θ| < threshold` (default 2e-3), read once at injection. The masked entries
//!   become a [`SparseDelta`] (`θ = W + δ` at those `k` indices, `δ = 0` at first, so the trained entries start
//!   from their pretrained values and the model from the base). A target with no entry under the threshold is
//!   skipped; none at all is a config error.
//! - **Optimizer.** AdamW (β 0.9/0.999, ε 1e-8, decoupled weight decay 1e-2) over the `k` values only, stepped by
//!   the adapter ([`crate::stepper::ValueStepper`], [`crate::adamw::SparseAdamW`]: O(k) state). The decay acts on
//!   `θ` as SaRA's AdamW does (`θ ← θ − lr·wd·θ`, i.e. `δ ← δ − lr·wd·(W + δ)`, with the `k` pretrained values
//!   kept), not on `δ`. Default rate when `lr` is `None`: `1e-3·exp(−350·threshold)` ([`default_lr`]).
//! - **Progressive step.** After step `progressive_step` (0-based, so at iteration `progressive_step + 1`,
//!   2500 in the script), `m' = (|θ| < threshold) ∧ m`: entries that grew past the threshold freeze at their
//!   trained values (their `δ` is kept; their gradient is zeroed and their value restored after every later
//!   update, the masked-AdamW semantics of §1.5). Once, as the script does.
//! - **Low-rank regulariser.** Every forward (the tuner's auxiliary loss), one random target among those that
//!   are 2-D with `min(rows, cols) > rank_min_dim` (64) and more than `rank_min_entries` (100) active entries
//!   gets `rank_lambda · ‖θ ⊙ m‖_*` (λ 5e-4) added to the loss ([`sparse_nuclear_norm`]: the dense masked matrix
//!   is built transiently for its SVD; the gradient `U Vᵀ` is gathered at the active indices). No eligible target:
//!   no term.
//!
//! Choices where the spec is silent: the regulariser's random target comes from the adapter's own generator
//! (seeded from the adapter seed); the saved file holds the indices explicitly (the spec notes they are
//! re-derivable from the pretrained θ; loading re-derives the mask and checks the file against it); the frozen
//! set of the progressive step is training state and is not saved. The "unstructured backprop" variant is what
//! the sparse delta does already (values gathered, gradient gathered).
//!
//! **File layout**: as every sparse adapter, `<param>.indices` + `<param>.values` (δ) per target.

use std::sync::{Arc, Mutex};

use ndarray::{Array2, ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::{AdapterResult, InjectCx, ModulePattern, PeftConfig, Tuner, TunerConfig};
use peft_core::autograd::{record, GradStore};
use peft_core::linalg::{svd, LinalgElem};
use peft_core::nn::Module;
use peft_core::Tensor;

use crate::adamw::SparseAdamWConfig;
use crate::delta::SparseDelta;
use crate::error::{SparseError, SparseResult};
use crate::indices::SparseIndices;
use crate::stepper::{linear_factor, ValueStepper};
use crate::tuner::{common_config_impl, parse, select_params, to_json, unknown_keys, SparseTuner, StepHooks};

/// SaRA's default learning rate for a threshold: `1e-3 · exp(−350 · threshold)` (≈ 4.966e-4 at 2e-3).
pub fn default_lr(threshold: f64) -> f64 {
    1e-3 * (-350.0 * threshold).exp()
}

/// `‖A‖_*` (sum of singular values) of the `rows × cols` matrix `A` holding `base[j] + values[j]` at flat index
/// `indices[j]` for every `j` with `active[j]`, and zero elsewhere. Differentiable in `values`: the gradient is
/// `(U Vᵀ)` gathered at the active indices (zero at inactive ones).
///
/// # Errors
/// [`peft_core::Error::Shape`] when the lengths disagree or an index is beyond `rows × cols`; SVD errors.
pub fn sparse_nuclear_norm<E: LinalgElem>(
    values: &Tensor<E>,
    indices: &Arc<SparseIndices>,
    base: &[E],
    active: &[bool],
    rows: usize,
    cols: usize,
) -> peft_core::Result<Tensor<E>> {
    let k = indices.len();
    let bad = || peft_core::Error::Shape { op: "sparse_nuclear_norm", lhs: vec![rows, cols], rhs: vec![k] };
    if values.len() != k || base.len() != k || active.len() != k {
        return Err(bad());
    }
    if k > 0 && indices.get(k - 1) >= rows * cols {
        return Err(bad());
    }
    let mut a = Array2::<E>::zeros((rows, cols));
    {
        let s = a.as_slice_mut().ok_or_else(bad)?;
        for (j, i) in indices.iter().enumerate() {
            if active[j] {
                s[i] = base[j] + values.as_slice()[j];
            }
        }
    }
    let (u, sv, vt) = svd(&a)?;
    let total: E = sv.iter().copied().sum();
    let uvt = u.dot(&vt);
    let g_at: Vec<E> = {
        let s = uvt.as_slice().ok_or_else(bad)?;
        indices.iter().enumerate().map(|(j, i)| if active[j] { s[i] } else { E::zero() }).collect()
    };
    let out = ArrayD::from_elem(IxDyn(&[]), total);
    Ok(record("sparse_nuclear_norm", out, &[values], move |g, _| {
        let g0 = g.iter().next().copied().unwrap_or_else(E::zero);
        vec![Some(ArrayD::from_shape_vec(IxDyn(&[g_at.len()]), g_at.iter().map(|&v| v * g0).collect()).expect("k"))]
    }))
}

/// SaRA's configuration (`peft_type = "SARA"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SaraConfig {
    /// Always `"SARA"`.
    pub peft_type: String,
    /// Parameter names (full match of a regex, or names / dotted suffixes).
    pub target_parameters: ModulePattern,
    /// Entries with `|θ| < threshold` train.
    pub threshold: f64,
    /// Learning rate of the values (`None`: [`default_lr`]).
    pub lr: Option<f64>,
    /// Decoupled weight decay on θ.
    pub weight_decay: f64,
    /// AdamW's ε.
    pub eps: f64,
    /// Gradient-norm clip over the values (`None`: none).
    pub max_grad_norm: Option<f64>,
    /// Planned steps: the values' rate decays linearly to 0 there (`None`: constant).
    pub total_steps: Option<usize>,
    /// The step after which the mask shrinks to the entries still under the threshold (`None`: never).
    pub progressive_step: Option<usize>,
    /// Weight of the nuclear-norm regulariser (0: off).
    pub rank_lambda: f64,
    /// Only targets with `min(rows, cols)` above this get the regulariser.
    pub rank_min_dim: usize,
    /// Only targets with more active entries than this get the regulariser.
    pub rank_min_entries: usize,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

impl SaraConfig {
    /// SaRA with §3.4's defaults on the parameters whose names fully match the regex `target`.
    pub fn new(target: &str) -> Self {
        SaraConfig {
            peft_type: Self::PEFT_TYPE.into(),
            target_parameters: ModulePattern::Regex(target.into()),
            threshold: 2e-3,
            lr: None,
            weight_decay: 1e-2,
            eps: 1e-8,
            max_grad_norm: None,
            total_steps: None,
            progressive_step: Some(2500),
            rank_lambda: 5e-4,
            rank_min_dim: 64,
            rank_min_entries: 100,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// The values' learning rate.
    pub fn effective_lr(&self) -> f64 {
        self.lr.unwrap_or_else(|| default_lr(self.threshold))
    }

    fn check(&self) -> SparseResult<()> {
        let t = Self::PEFT_TYPE;
        if !(self.threshold > 0.0 && self.threshold.is_finite()) {
            return Err(SparseError::config(t, "threshold", format!("{} must be finite and > 0", self.threshold)));
        }
        for (field, v) in [
            ("lr", self.effective_lr()),
            ("weight_decay", self.weight_decay),
            ("eps", self.eps),
            ("rank_lambda", self.rank_lambda),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(SparseError::config(t, field, format!("{v} must be finite and >= 0")));
            }
        }
        Ok(())
    }
}

struct Site {
    /// The pretrained values at the indices.
    base: Vec<f32>,
    /// Entries frozen by the progressive step.
    frozen: Vec<bool>,
    rows: usize,
    cols: usize,
}

struct SaraHooks {
    cfg: SaraConfig,
    stepper: ValueStepper,
    sites: Mutex<Vec<Site>>,
    rng: Mutex<StdRng>,
}

impl SaraHooks {
    fn deltas(tuner: &SparseTuner) -> Vec<Arc<SparseDelta>> {
        tuner.entries().iter().map(|(_, d)| d.clone()).collect()
    }
}

impl StepHooks for SaraHooks {
    fn state_bytes(&self) -> usize {
        let sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        self.stepper.state_bytes() + sites.iter().map(|s| 5 * s.base.len()).sum::<usize>()
    }

    fn aux_loss(&self, tuner: &SparseTuner) -> peft_core::Result<Option<Tensor>> {
        if self.cfg.rank_lambda == 0.0 {
            return Ok(None);
        }
        let sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let eligible: Vec<usize> = sites
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.rows.min(s.cols) > self.cfg.rank_min_dim
                    && s.frozen.iter().filter(|f| !**f).count() > self.cfg.rank_min_entries
            })
            .map(|(i, _)| i)
            .collect();
        if eligible.is_empty() {
            return Ok(None);
        }
        let pick = eligible[self.rng.lock().unwrap_or_else(|p| p.into_inner()).gen_range(0..eligible.len())];
        let (_, d) = &tuner.entries()[pick];
        let s = &sites[pick];
        let active: Vec<bool> = s.frozen.iter().map(|f| !f).collect();
        let nuc = sparse_nuclear_norm(&d.values().tensor(), &d.indices(), &s.base, &active, s.rows, s.cols)?;
        Ok(Some(nuc.mul_scalar(self.cfg.rank_lambda as f32)))
    }

    fn transform_grads(&self, tuner: &SparseTuner, mut grads: GradStore) -> peft_core::Result<GradStore> {
        let sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        for ((_, d), s) in tuner.entries().iter().zip(sites.iter()) {
            if !s.frozen.iter().any(|f| *f) {
                continue;
            }
            let id = d.values().id();
            if let Some(mut g) = grads.remove(id) {
                g.iter_mut().zip(&s.frozen).for_each(|(x, f)| {
                    if *f {
                        *x = 0.0;
                    }
                });
                grads.insert(id, g);
            }
        }
        drop(sites);
        Ok(self.stepper.take(&Self::deltas(tuner), grads, true))
    }

    fn after_step(&self, tuner: &SparseTuner, step: usize) -> peft_core::Result<()> {
        let ds = Self::deltas(tuner);
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        // Decoupled decay of θ = W + δ on the active entries, then the Adam update; frozen entries restored.
        let lr = self.cfg.effective_lr() * linear_factor(step, 0, self.cfg.total_steps);
        let decay = (lr * self.cfg.weight_decay) as f32;
        let mut before = Vec::with_capacity(ds.len());
        for (d, s) in ds.iter().zip(sites.iter()) {
            before.push(d.values().value().iter().copied().collect::<Vec<f32>>());
            if decay != 0.0 {
                d.values().update(|v| {
                    for ((x, w), f) in v.iter_mut().zip(&s.base).zip(&s.frozen) {
                        if !f {
                            *x -= decay * (w + *x);
                        }
                    }
                });
            }
        }
        self.stepper.apply(&ds, step);
        for ((d, s), old) in ds.iter().zip(sites.iter()).zip(&before) {
            if s.frozen.iter().any(|f| *f) {
                d.values().update(|v| {
                    for ((x, o), f) in v.iter_mut().zip(old).zip(&s.frozen) {
                        if *f {
                            *x = *o;
                        }
                    }
                });
            }
        }
        if self.cfg.progressive_step == Some(step) {
            let thr = self.cfg.threshold as f32;
            for (d, s) in ds.iter().zip(sites.iter_mut()) {
                let v = d.values().value();
                for ((f, w), x) in s.frozen.iter_mut().zip(&s.base).zip(v.iter()) {
                    if (w + x).abs() >= thr {
                        *f = true;
                    }
                }
            }
        }
        Ok(())
    }
}

impl TunerConfig for SaraConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        format!("SaRA |θ| < {} (nuclear-norm λ {})", self.threshold, self.rank_lambda)
    }
    fn to_json(&self) -> AdapterResult<Value> {
        to_json(self, Self::PEFT_TYPE)
    }
    fn inject(&self, _model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.check()?;
        let targets = select_params(Self::PEFT_TYPE, &self.target_parameters, &self.modules_to_save(), cx.base_params)?;
        let thr = self.threshold as f32;
        let mut deltas = Vec::new();
        let mut sites = Vec::new();
        for p in targets {
            let v = p.value();
            let idx: Vec<u64> = v.iter().enumerate().filter(|(_, w)| w.abs() < thr).map(|(i, _)| i as u64).collect();
            if idx.is_empty() {
                continue;
            }
            let base: Vec<f32> = idx.iter().map(|&i| v.as_slice().map_or(0.0, |s| s[i as usize])).collect();
            let shape = p.shape();
            let (rows, cols) = match shape.as_slice() {
                [r, c] => (*r, *c),
                _ => (0, 0),
            };
            drop(v);
            let k = idx.len();
            let si = SparseIndices::new(p.name(), idx, p.numel())?;
            deltas.push((p.clone(), SparseDelta::zeros(cx.name, "sara", &p, si)?));
            sites.push(Site { base, frozen: vec![false; k], rows, cols });
        }
        if deltas.is_empty() {
            return Err(SparseError::config(
                Self::PEFT_TYPE,
                "threshold",
                format!("no entry of any target has |θ| < {}", self.threshold),
            )
            .into());
        }
        let ks: Vec<usize> = deltas.iter().map(|(_, d)| d.k()).collect();
        let opt = SparseAdamWConfig { lr: self.effective_lr(), eps: self.eps, weight_decay: 0.0, ..Default::default() };
        let hooks = SaraHooks {
            cfg: self.clone(),
            stepper: ValueStepper::new(opt, &ks, 0, self.total_steps, self.max_grad_norm),
            sites: Mutex::new(sites),
            rng: Mutex::new(StdRng::seed_from_u64(cx.seed ^ 0x5341_5241)),
        };
        Ok(Box::new(SparseTuner::attach(cx.name, Self::PEFT_TYPE, deltas)?.with_hooks(Box::new(hooks))))
    }
    common_config_impl!();
}

impl PeftConfig for SaraConfig {
    const PEFT_TYPE: &'static str = "SARA";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let known = [
            "peft_type",
            "target_parameters",
            "threshold",
            "lr",
            "weight_decay",
            "eps",
            "max_grad_norm",
            "total_steps",
            "progressive_step",
            "rank_lambda",
            "rank_min_dim",
            "rank_min_entries",
            "modules_to_save",
            "inference_mode",
        ];
        let ignored = unknown_keys(v, &known, Self::PEFT_TYPE);
        let c: Self = parse(v, Self::PEFT_TYPE)?;
        c.check()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "sara_tests.rs"]
mod tests;
