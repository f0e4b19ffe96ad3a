//! R-AMT, regularized mask tuning (spec §3.7, losses §1.6): learned binary masks on frozen weights.
//!
//! - Every target weight `W` gets a real-valued mask `M_real` of its shape, initialised to `init_value` (1e-2)
//!   everywhere; the binary mask is `M = 1[M_real > threshold]` (5e-3), so `M` is all ones at init and the model is
//!   the base model. Only `M_real` trains; `W` stays frozen.
//! - Forward: `W_eff = M ⊙ W` through [`ste_mask`], a straight-through estimator: the backward treats the
//!   threshold as the identity, `∂L/∂M_real = ∂L/∂M = ∂L/∂W_eff ⊙ W` (and `∂L/∂W = ∂L/∂W_eff ⊙ M`). Evaluation
//!   uses the same hard threshold.
//! - Optional mask regulariser `mask_l2 · Σ_t ‖M_real,t‖₂` (the L2 norm of each mask tensor), returned as the
//!   tuner's auxiliary loss (λ = 1e-4 in the authors' config, off by default in their train.py: default 0 here).
//! - Gradient-dropout regularity (GDR): with `g_a` the mask gradient of the task loss and `g_b` that of the
//!   distillation loss `KL_T(student ‖ zero-shot teacher)`, per element
//!   `P = (sign(g_a)·(g_a + g_b)/(|g_a| + |g_b| + 1e-8) + 1)/2`, `U ~ U(0, 1)`, and the step uses
//!   `g = ((1 − λ) + λ·1[P > U])·g_a` ([`gradient_dropout`]). The trainer's loss is the task loss; a loop that
//!   wants GDR computes the teacher's logits with [`RamtTuner::teacher`] (the masks bypassed), the
//!   distillation loss with [`distill_kl`], and hands it to [`RamtTuner::set_distill_loss`] before the backward:
//!   the tuner's `transform_grads` backpropagates it and replaces the mask gradients by the GDR ones. Without a
//!   distillation loss a step is plain STE mask tuning. `g_a` is the gradient the trainer computed, so it includes
//!   the optional mask regulariser.
//! - Merge: `W ← M ⊙ W` (the masked-out entries set to 0 exactly); unmerge writes them back exactly.
//!
//! Choices where the spec is silent: the GDR uniform draws come from the adapter's own generator (seeded from
//! the adapter seed), one draw per mask entry per step; `gdr_lambda`, `temperature`, `teacher_fusion` (the
//! teacher-logit fusion `α·t + (1−α)·s`, `α = 1` by default) and the targets are configurable. The masks are
//! dense (one f32 per masked weight entry, as in the method); they are not O(k).
//!
//! **File layout**: `<param>.mask_real` (F32, the weight's shape) per target.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ndarray::{ArrayD, IxDyn, Zip};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::{AdapterResult, AdapterTensors, InjectCx, ModulePattern, PeftConfig, Tuner, TunerConfig};
use peft_core::autograd::{no_grad, record, GradStore};
use peft_core::nn::Module;
use peft_core::{Elem, Param, ParamDelta, Tensor};

use crate::error::{SparseError, SparseResult};
use crate::tuner::{common_config_impl, parse, select_params, to_json, unknown_keys};

/// `base ⊙ 1[m_real > threshold]` with the straight-through backward: the output gradient `g` gives
/// `g ⊙ 1[m_real > threshold]` to `base` and `g ⊙ base` to `m_real`.
///
/// # Errors
/// [`peft_core::Error::Shape`] when the shapes differ.
pub fn ste_mask<E: Elem>(base: &Tensor<E>, m_real: &Tensor<E>, threshold: E) -> peft_core::Result<Tensor<E>> {
    if base.shape() != m_real.shape() {
        return Err(peft_core::Error::Shape {
            op: "ste_mask",
            lhs: base.shape().to_vec(),
            rhs: m_real.shape().to_vec(),
        });
    }
    let hard = m_real.data().mapv(|m| if m > threshold { E::one() } else { E::zero() });
    let out = base.data() * &hard;
    let b = base.data().to_owned();
    Ok(record("ste_mask", out, &[base, m_real], move |g, needs| {
        vec![needs[0].then(|| g * &hard), needs[1].then(|| g * &b)]
    }))
}

/// GDR's keep probability of one element: `(sign(g_a)·(g_a + g_b)/(|g_a| + |g_b| + 1e-8) + 1)/2` (1 where the two
/// gradients agree in sign, `|g_a|/(|g_a| + |g_b|)` where they disagree).
pub fn gdr_keep_probability(ga: f32, gb: f32) -> f32 {
    let sign = if ga > 0.0 {
        1.0
    } else if ga < 0.0 {
        -1.0
    } else {
        0.0
    };
    (sign * (ga + gb) / (ga.abs() + gb.abs() + 1e-8) + 1.0) / 2.0
}

/// Gradient-dropout regularity: `((1 − λ) + λ·1[P > U])·g_a` per element, with `U` drawn from `rng`.
///
/// # Errors
/// [`SparseError::ShapeMismatch`] when `ga` and `gb` differ in shape.
pub fn gradient_dropout(
    ga: &ArrayD<f32>,
    gb: &ArrayD<f32>,
    lambda: f32,
    rng: &mut impl Rng,
) -> SparseResult<ArrayD<f32>> {
    if ga.shape() != gb.shape() {
        return Err(SparseError::ShapeMismatch {
            tensor: "gradient_dropout".into(),
            expected: ga.shape().to_vec(),
            found: gb.shape().to_vec(),
        });
    }
    let mut out = ga.clone();
    Zip::from(&mut out).and(gb).for_each(|a, &b| {
        let p = gdr_keep_probability(*a, b);
        let u: f32 = rng.gen();
        let keep = if p > u { 1.0 } else { 0.0 };
        *a *= (1.0 - lambda) + lambda * keep;
    });
    Ok(out)
}

/// `T² · KL(softmax(t/T) ‖ softmax(s/T))` summed over the last axis and averaged over rows, with the teacher
/// logits `t` fused as `α·t + (1 − α)·s` (the student side detached there) and treated as constants.
///
/// # Errors
/// Shape errors; [`SparseError::Config`] for a temperature that is not positive.
pub fn distill_kl(student: &Tensor, teacher: &Tensor, temperature: f64, alpha: f64) -> SparseResult<Tensor> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(SparseError::config(RamtConfig::PEFT_TYPE, "temperature", format!("{temperature} must be > 0")));
    }
    if student.shape() != teacher.shape() || student.rank() == 0 {
        return Err(SparseError::ShapeMismatch {
            tensor: "distill_kl".into(),
            expected: student.shape().to_vec(),
            found: teacher.shape().to_vec(),
        });
    }
    let axis = student.rank() - 1;
    let fused = no_grad(|| -> peft_core::Result<Tensor> {
        let t = Tensor::new(teacher.data().to_owned());
        let s = Tensor::new(student.data().to_owned());
        t.mul_scalar(alpha as f32).add(&s.mul_scalar((1.0 - alpha) as f32))
    })?;
    let inv_t = (1.0 / temperature) as f32;
    let log_pt = no_grad(|| fused.mul_scalar(inv_t).log_softmax(axis))?;
    let pt = Tensor::new(log_pt.data().mapv(f32::exp));
    let log_ps = student.mul_scalar(inv_t).log_softmax(axis)?;
    let kl = pt.mul(&Tensor::new(log_pt.data().to_owned()).sub(&log_ps)?)?.sum_all();
    let rows = (student.len() / student.shape()[axis].max(1)).max(1);
    Ok(kl.mul_scalar((temperature * temperature) as f32 / rows as f32))
}

/// R-AMT's configuration (`peft_type = "R_AMT"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RamtConfig {
    /// Always `"R_AMT"`.
    pub peft_type: String,
    /// Parameter names (full match of a regex, or names / dotted suffixes).
    pub target_parameters: ModulePattern,
    /// Initial value of every `M_real` entry (must exceed `threshold`, so the model starts as the base).
    pub init_value: f64,
    /// Binarisation threshold.
    pub threshold: f64,
    /// GDR's λ in `[0, 1]` (0: no gradient dropout).
    pub gdr_lambda: f64,
    /// Distillation temperature.
    pub temperature: f64,
    /// Teacher-logit fusion α in `[0, 1]`.
    pub teacher_fusion: f64,
    /// Weight of the mask regulariser `Σ‖M_real‖₂` (0: off).
    pub mask_l2: f64,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

impl RamtConfig {
    /// R-AMT on the parameters whose names fully match the regex `target`, with §3.7's defaults (init 1e-2,
    /// threshold 5e-3, λ = 1, T = 1, α = 1, no mask regulariser).
    pub fn new(target: &str) -> Self {
        RamtConfig {
            peft_type: Self::PEFT_TYPE.into(),
            target_parameters: ModulePattern::Regex(target.into()),
            init_value: 1e-2,
            threshold: 5e-3,
            gdr_lambda: 1.0,
            temperature: 1.0,
            teacher_fusion: 1.0,
            mask_l2: 0.0,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    fn check(&self) -> SparseResult<()> {
        let t = Self::PEFT_TYPE;
        if !(self.threshold.is_finite() && self.init_value.is_finite() && self.init_value > self.threshold) {
            return Err(SparseError::config(
                t,
                "init_value",
                format!("{} must be finite and above the threshold {}", self.init_value, self.threshold),
            ));
        }
        for (field, v) in [("gdr_lambda", self.gdr_lambda), ("teacher_fusion", self.teacher_fusion)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(SparseError::config(t, field, format!("{v} must lie in [0, 1]")));
            }
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(SparseError::config(t, "temperature", format!("{} must be > 0", self.temperature)));
        }
        if !(self.mask_l2 >= 0.0 && self.mask_l2.is_finite()) {
            return Err(SparseError::config(t, "mask_l2", format!("{} must be finite and >= 0", self.mask_l2)));
        }
        Ok(())
    }
}

/// The learned mask of one weight, on its parameter-delta site.
pub struct MaskDelta {
    name: String,
    m_real: Param,
    threshold: f32,
    /// The change a merge added (`−W ⊙ (1 − M)`), set by the tuner while merged.
    merged: Mutex<Option<ArrayD<f32>>>,
    /// Set while [`RamtTuner::teacher`] runs: the forward sees the unmasked weight.
    bypass: AtomicBool,
}

impl MaskDelta {
    /// The trainable real-valued mask.
    pub fn m_real(&self) -> &Param {
        &self.m_real
    }

    /// The binary mask `1[M_real > threshold]`.
    pub fn binary(&self) -> ArrayD<f32> {
        let t = self.threshold;
        self.m_real.value().mapv(|m| if m > t { 1.0 } else { 0.0 })
    }
}

impl ParamDelta for MaskDelta {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "r-amt"
    }
    fn apply(&self, base: &Tensor) -> peft_core::Result<Tensor> {
        if self.bypass.load(Ordering::Relaxed) {
            return Ok(base.clone());
        }
        ste_mask(base, &self.m_real.tensor(), self.threshold)
    }
    fn delta_value(&self) -> peft_core::Result<ArrayD<f32>> {
        self.merged.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
            SparseError::State {
                tensor: self.m_real.name().into(),
                reason: "a mask merges through its tuner (the delta depends on the weight)".into(),
            }
            .into()
        })
    }
    fn params(&self) -> Vec<Param> {
        vec![self.m_real.clone()]
    }
}

/// An injected R-AMT adapter: one [`MaskDelta`] per target weight.
pub struct RamtTuner {
    name: String,
    cfg: RamtConfig,
    entries: Vec<(Param, Arc<MaskDelta>)>,
    distill: Mutex<Option<Tensor>>,
    rng: Mutex<StdRng>,
}

impl RamtTuner {
    /// `(weight, mask)` pairs.
    pub fn entries(&self) -> &[(Param, Arc<MaskDelta>)] {
        &self.entries
    }

    /// Runs `f` (a forward of the model) with the masks bypassed and no graph: the zero-shot teacher. The
    /// adapter's activation state is left as it is.
    ///
    /// # Errors
    /// [`SparseError::State`] while merged (the merged weights are masked); errors of `f`.
    pub fn teacher<T>(&self, f: impl FnOnce() -> peft_core::Result<T>) -> peft_core::Result<T> {
        if let Some((p, _)) = self.entries.first().filter(|_| self.is_merged()) {
            return Err(SparseError::State {
                tensor: p.name().into(),
                reason: "the zero-shot teacher needs the masks unmerged".into(),
            }
            .into());
        }
        self.entries.iter().for_each(|(_, d)| d.bypass.store(true, Ordering::Relaxed));
        let out = no_grad(f);
        self.entries.iter().for_each(|(_, d)| d.bypass.store(false, Ordering::Relaxed));
        out
    }

    /// Hands this micro-batch's distillation loss (e.g. [`distill_kl`] of the student's and the teacher's
    /// logits) to the next `transform_grads`, which applies GDR with it.
    pub fn set_distill_loss(&self, loss: Tensor) {
        *self.distill.lock().unwrap_or_else(|p| p.into_inner()) = Some(loss);
    }

    /// Fraction of masked-out entries (0 at init).
    pub fn sparsity(&self) -> f64 {
        let (mut off, mut n) = (0usize, 0usize);
        for (_, d) in &self.entries {
            let b = d.binary();
            off += b.iter().filter(|&&v| v == 0.0).count();
            n += b.len();
        }
        off as f64 / n.max(1) as f64
    }
}

impl Tuner for RamtTuner {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        RamtConfig::PEFT_TYPE
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn params(&self) -> Vec<Param> {
        self.entries.iter().map(|(_, d)| d.m_real.clone()).collect()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        self.entries.iter().map(|(p, d)| (format!("{}.mask_real", p.name()), d.m_real.clone())).collect()
    }
    fn load_state_dict(&self, src: &AdapterTensors) -> AdapterResult<()> {
        let mut staged = Vec::new();
        for (k, p) in self.state_dict() {
            let v = src.get(&k, &p.shape())?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(peft_core::Error::NonFinite { what: format!("`{k}` in {}", src.path().display()) }.into());
            }
            staged.push((p, v));
        }
        for (p, v) in staged {
            p.set(v)?;
        }
        Ok(())
    }
    fn set_active(&self, on: bool) {
        for (p, _) in &self.entries {
            p.activate_delta(&self.name, on);
        }
    }
    fn merge(&self) -> AdapterResult<()> {
        for (i, (p, d)) in self.entries.iter().enumerate() {
            let delta = {
                let w = p.value();
                &w * &d.binary().mapv(|m| m - 1.0)
            };
            *d.merged.lock().unwrap_or_else(|e| e.into_inner()) = Some(delta);
            if let Err(e) = p.merge_delta(&self.name) {
                *d.merged.lock().unwrap_or_else(|e| e.into_inner()) = None;
                for (q, e2) in &self.entries[..i] {
                    let _ = q.unmerge_delta(&self.name);
                    *e2.merged.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                return Err(e.into());
            }
        }
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        for (p, d) in &self.entries {
            let merged = d.merged.lock().unwrap_or_else(|e| e.into_inner()).is_some();
            if merged {
                p.unmerge_delta(&self.name)?;
                *d.merged.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        Ok(())
    }
    fn is_merged(&self) -> bool {
        self.entries.first().is_some_and(|(_, d)| d.merged.lock().unwrap_or_else(|e| e.into_inner()).is_some())
    }
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        for (p, d) in &self.entries {
            if keep_merged {
                p.detach_delta_keep_merged(&self.name)?;
            } else {
                if d.merged.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                    p.unmerge_delta(&self.name)?;
                    *d.merged.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                p.detach_delta(&self.name)?;
            }
        }
        Ok(())
    }
    fn aux_loss(&self) -> peft_core::Result<Option<Tensor>> {
        if self.cfg.mask_l2 == 0.0 {
            return Ok(None);
        }
        let mut total: Option<Tensor> = None;
        for (_, d) in &self.entries {
            let n = d.m_real.tensor().square().sum_all().sqrt();
            total = Some(match total {
                Some(t) => t.add(&n)?,
                None => n,
            });
        }
        Ok(total.map(|t| t.mul_scalar(self.cfg.mask_l2 as f32)))
    }
    fn transform_grads(&self, mut grads: GradStore) -> peft_core::Result<GradStore> {
        let Some(kl) = self.distill.lock().unwrap_or_else(|p| p.into_inner()).take() else { return Ok(grads) };
        if self.cfg.gdr_lambda == 0.0 {
            return Ok(grads);
        }
        let gb = kl.backward()?;
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        for (_, d) in &self.entries {
            let id = d.m_real.id();
            let Some(ga) = grads.remove(id) else { continue };
            let zeros;
            let gbv = match gb.get_id(id) {
                Some(g) => g,
                None => {
                    zeros = ArrayD::zeros(ga.raw_dim());
                    &zeros
                }
            };
            grads.insert(id, gradient_dropout(&ga, gbv, self.cfg.gdr_lambda as f32, &mut *rng)?);
        }
        Ok(grads)
    }
}

impl TunerConfig for RamtConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        format!("R-AMT mask tuning (threshold {}, GDR λ {})", self.threshold, self.gdr_lambda)
    }
    fn to_json(&self) -> AdapterResult<Value> {
        to_json(self, Self::PEFT_TYPE)
    }
    fn inject(&self, _model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.check()?;
        let targets = select_params(Self::PEFT_TYPE, &self.target_parameters, &self.modules_to_save(), cx.base_params)?;
        let mut entries: Vec<(Param, Arc<MaskDelta>)> = Vec::new();
        for p in targets {
            let d = Arc::new(MaskDelta {
                name: cx.name.into(),
                m_real: Param::new(
                    format!("{}.mask_real.{}", p.name(), cx.name),
                    ArrayD::from_elem(IxDyn(&p.shape()), self.init_value as f32),
                    true,
                ),
                threshold: self.threshold as f32,
                merged: Mutex::new(None),
                bypass: AtomicBool::new(false),
            });
            if let Err(e) = p.attach_delta(d.clone()) {
                for (q, _) in &entries {
                    let _ = q.detach_delta(cx.name);
                }
                return Err(e.into());
            }
            entries.push((p, d));
        }
        Ok(Box::new(RamtTuner {
            name: cx.name.into(),
            cfg: self.clone(),
            entries,
            distill: Mutex::new(None),
            rng: Mutex::new(StdRng::seed_from_u64(cx.seed ^ 0x5241_4d54)),
        }))
    }
    common_config_impl!();
}

impl PeftConfig for RamtConfig {
    const PEFT_TYPE: &'static str = "R_AMT";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let known = [
            "peft_type",
            "target_parameters",
            "init_value",
            "threshold",
            "gdr_lambda",
            "temperature",
            "teacher_fusion",
            "mask_l2",
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
#[path = "ramt_tests.rs"]
mod tests;
