//! [`SparseTuner`]: the injected adapter every sparse method returns (one [`SparseDelta`] per target parameter),
//! with the state dict in the file layout, exact merge / unmerge, and the method's step hooks; and
//! [`SparseFtConfig`] (`peft_type = "SPARSE_FT"`), sparse fine-tuning on a mask fixed at injection.
//!
//! **File layout.** Per target parameter `<p>`: `<p>.values` (F32 `[k]`) and `<p>.indices`, the sorted
//! row-major flat indices. The adapter file is written by peft-core's writer, which stores F32 tensors, so the
//! indices are stored as F32 holding exact integers: shape `[k]` when the parameter has at most 2²⁴ elements
//! (every integer below 2²⁴ is exact in F32), otherwise `[k, 2]` holding `(index >> 24, index & 0xFFFFFF)`.
//! Loading checks every index (integral, in range, strictly increasing) and reports a typed error otherwise.

use std::any::Any;
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use rand::seq::index::sample;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::{
    site_rng, AdapterError, AdapterResult, AdapterTensors, InjectCx, ModulePattern, PeftConfig, Tuner, TunerConfig,
};
use peft_core::autograd::GradStore;
use peft_core::nn::Module;
use peft_core::Param;

use crate::delta::SparseDelta;
use crate::error::{SparseError, SparseResult};
use crate::indices::SparseIndices;
use crate::select::top_k_indices;

/// Largest element count whose flat indices are stored as one exact F32 each.
pub const F32_EXACT: usize = 1 << 24;

/// Method-specific behaviour around training steps (SpIEL's drop/grow, LT-SFT's phases, SaRA's regulariser).
pub trait StepHooks: Send + Sync {
    /// Rewrites a micro-batch's gradients (before clipping and the optimizer).
    ///
    /// # Errors
    /// Implementation-specific.
    fn transform_grads(&self, tuner: &SparseTuner, grads: GradStore) -> peft_core::Result<GradStore> {
        let _ = tuner;
        Ok(grads)
    }
    /// After optimizer step `step`.
    ///
    /// # Errors
    /// Implementation-specific.
    fn after_step(&self, tuner: &SparseTuner, step: usize) -> peft_core::Result<()> {
        let _ = (tuner, step);
        Ok(())
    }
    /// An auxiliary loss for the trainer to add (SaRA's low-rank regulariser). Default: none.
    ///
    /// # Errors
    /// Implementation-specific.
    fn aux_loss(&self, tuner: &SparseTuner) -> peft_core::Result<Option<peft_core::Tensor>> {
        let _ = tuner;
        Ok(None)
    }
    /// Bytes of optimizer (and other training) state the hooks hold.
    fn state_bytes(&self) -> usize {
        0
    }
}

/// One sparse adapter on a model: a [`SparseDelta`] per target parameter.
pub struct SparseTuner {
    name: String,
    kind: &'static str,
    entries: Vec<(Param, Arc<SparseDelta>)>,
    hooks: Option<Box<dyn StepHooks>>,
}

impl SparseTuner {
    /// Attaches `deltas` (one per parameter, built on those parameters) as adapter `name` of method `kind`. On
    /// error nothing stays attached.
    ///
    /// # Errors
    /// Attach errors of the parameter-delta site.
    pub fn attach(name: &str, kind: &'static str, deltas: Vec<(Param, SparseDelta)>) -> SparseResult<Self> {
        let mut t = SparseTuner { name: name.into(), kind, entries: Vec::new(), hooks: None };
        for (p, d) in deltas {
            let d = Arc::new(d);
            if let Err(e) = p.attach_delta(d.clone()) {
                let _ = t.detach(false);
                return Err(e.into());
            }
            t.entries.push((p, d));
        }
        Ok(t)
    }

    /// The same tuner with step hooks.
    pub fn with_hooks(mut self, hooks: Box<dyn StepHooks>) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// `(parameter, delta)` pairs in attach order.
    pub fn entries(&self) -> &[(Param, Arc<SparseDelta>)] {
        &self.entries
    }

    /// Bytes of optimizer state the adapter holds itself (LT-SFT, SpIEL; 0 for methods the trainer's optimizer
    /// steps).
    pub fn own_state_bytes(&self) -> usize {
        self.hooks.as_ref().map_or(0, |h| h.state_bytes())
    }

    /// Total entries tuned (Σ k).
    pub fn trainable_entries(&self) -> usize {
        self.entries.iter().map(|(_, d)| d.k()).sum()
    }
}

/// The F32 encoding of `idx` for a tensor of `numel` elements (see the module docs).
pub fn encode_indices(idx: &SparseIndices, numel: usize) -> ArrayD<f32> {
    let k = idx.len();
    if numel <= F32_EXACT {
        ArrayD::from_shape_vec(IxDyn(&[k]), idx.iter().map(|i| i as f32).collect()).expect("peft-rs bug: k")
    } else {
        let v: Vec<f32> = idx.iter().flat_map(|i| [(i >> 24) as f32, (i & 0xFF_FFFF) as f32]).collect();
        ArrayD::from_shape_vec(IxDyn(&[k, 2]), v).expect("peft-rs bug: k x 2")
    }
}

/// Decodes and checks the F32 index encoding of a tensor named `tensor` with `numel` elements.
///
/// # Errors
/// [`SparseError::BadIndexValue`] for a negative, fractional or non-finite value; [`SparseError::Unsorted`];
/// [`SparseError::IndexOutOfRange`]; [`SparseError::ShapeMismatch`] for the wrong encoding shape.
pub fn decode_indices(tensor: &str, enc: &ArrayD<f32>, numel: usize) -> SparseResult<SparseIndices> {
    let wide = numel > F32_EXACT;
    let s = enc.as_standard_layout();
    let vals = s.as_slice().unwrap_or(&[]);
    let bad = |value: f32, position: usize| SparseError::BadIndexValue {
        tensor: tensor.into(),
        value: f64::from(value),
        position,
    };
    let check = |v: f32, pos: usize, max: f32| -> SparseResult<u64> {
        if !v.is_finite() || v < 0.0 || v.fract() != 0.0 || v >= max {
            return Err(bad(v, pos));
        }
        Ok(v as u64)
    };
    let idx: Vec<u64> = if wide {
        if enc.ndim() != 2 || enc.shape()[1] != 2 {
            return Err(SparseError::ShapeMismatch {
                tensor: tensor.into(),
                expected: vec![enc.len() / 2, 2],
                found: enc.shape().to_vec(),
            });
        }
        vals.chunks_exact(2)
            .enumerate()
            .map(|(p, c)| Ok((check(c[0], p, F32_EXACT as f32)? << 24) | check(c[1], p, F32_EXACT as f32)?))
            .collect::<SparseResult<_>>()?
    } else {
        if enc.ndim() != 1 {
            return Err(SparseError::ShapeMismatch {
                tensor: tensor.into(),
                expected: vec![enc.len()],
                found: enc.shape().to_vec(),
            });
        }
        vals.iter().enumerate().map(|(p, &v)| check(v, p, f32::INFINITY)).collect::<SparseResult<_>>()?
    };
    SparseIndices::new(tensor, idx, numel)
}

impl Tuner for SparseTuner {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        self.kind
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn params(&self) -> Vec<Param> {
        self.entries.iter().map(|(_, d)| d.values().clone()).collect()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        let mut out = Vec::new();
        for (p, d) in &self.entries {
            out.push((format!("{}.values", p.name()), d.values().clone()));
            let enc = encode_indices(&d.indices(), p.numel());
            out.push((format!("{}.indices", p.name()), Param::new(format!("{}.indices", p.name()), enc, false)));
        }
        out
    }
    fn load_state_dict(&self, src: &AdapterTensors) -> AdapterResult<()> {
        // Decode and check everything before writing anything.
        let mut staged = Vec::new();
        for (p, d) in &self.entries {
            let ikey = format!("{}.indices", p.name());
            let vkey = format!("{}.values", p.name());
            let ishape = src
                .shape(&ikey)
                .ok_or_else(|| AdapterError::MissingTensor { file: src.path().to_path_buf(), key: ikey.clone() })?;
            let vshape = src
                .shape(&vkey)
                .ok_or_else(|| AdapterError::MissingTensor { file: src.path().to_path_buf(), key: vkey.clone() })?;
            let enc = src.get(&ikey, &ishape)?;
            let vals = src.get(&vkey, &vshape)?;
            let idx = decode_indices(p.name(), &enc, p.numel())?;
            if vals.ndim() != 1 || vals.len() != idx.len() {
                return Err(SparseError::LengthMismatch {
                    tensor: p.name().into(),
                    indices: idx.len(),
                    values: vals.len(),
                }
                .into());
            }
            if idx.len() != d.k() {
                return Err(AdapterError::TensorShape {
                    file: src.path().to_path_buf(),
                    key: vkey,
                    expected: vec![d.k()],
                    found: vshape,
                });
            }
            staged.push((d.clone(), idx, vals.iter().copied().collect::<Vec<f32>>()));
        }
        for (d, idx, vals) in staged {
            d.set(idx, vals)?;
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
            if let Err(e) = d.merge_into(p) {
                for (q, e2) in &self.entries[..i] {
                    let _ = e2.unmerge_from(q);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        for (p, d) in &self.entries {
            if d.is_merged() {
                d.unmerge_from(p)?;
            }
        }
        Ok(())
    }
    fn is_merged(&self) -> bool {
        self.entries.first().is_some_and(|(_, d)| d.is_merged())
    }
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        for (p, d) in &self.entries {
            if keep_merged {
                p.detach_delta_keep_merged(&self.name)?;
            } else {
                if d.is_merged() {
                    d.unmerge_from(p)?;
                }
                p.detach_delta(&self.name)?;
            }
        }
        Ok(())
    }
    fn transform_grads(&self, grads: GradStore) -> peft_core::Result<GradStore> {
        match &self.hooks {
            Some(h) => h.transform_grads(self, grads),
            None => Ok(grads),
        }
    }
    fn after_step(&self, step: usize) -> peft_core::Result<()> {
        match &self.hooks {
            Some(h) => h.after_step(self, step),
            None => Ok(()),
        }
    }
    fn state_bytes(&self) -> usize {
        self.own_state_bytes()
    }
    fn aux_loss(&self) -> peft_core::Result<Option<peft_core::Tensor>> {
        match &self.hooks {
            Some(h) => h.aux_loss(self),
            None => Ok(None),
        }
    }
}

// ---- shared config helpers ----------------------------------------------------------------------------------

fn module_of(pname: &str) -> &str {
    pname.rsplit_once('.').map_or("", |(m, _)| m)
}

pub(crate) fn in_modules(pname: &str, modules: &[String]) -> bool {
    let m = module_of(pname);
    modules.iter().any(|t| m == t || m.ends_with(&format!(".{t}")) || m.starts_with(&format!("{t}.")))
}

/// The base parameters matching `pattern` (full-match regex, or names / dotted suffixes), outside
/// `modules_to_save`.
///
/// # Errors
/// [`AdapterError::InvalidConfig`] for a bad regex; [`peft_core::Error::NoTargetMatched`] when none matches.
pub(crate) fn select_params(
    method: &'static str,
    pattern: &ModulePattern,
    modules_to_save: &[String],
    params: &[Param],
) -> AdapterResult<Vec<Param>> {
    let re = match pattern {
        ModulePattern::Regex(s) => Some(
            Regex::new(&format!(r"\A(?:{s})\z"))
                .map_err(|e| AdapterError::config(method, "target_parameters", e.to_string()))?,
        ),
        ModulePattern::List(_) => None,
    };
    let hit = |name: &str| match pattern {
        ModulePattern::Regex(_) => re.as_ref().is_some_and(|r| r.is_match(name)),
        ModulePattern::List(v) => v.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
    };
    let out: Vec<Param> =
        params.iter().filter(|p| !in_modules(p.name(), modules_to_save) && hit(p.name())).cloned().collect();
    if out.is_empty() {
        let patterns = match pattern {
            ModulePattern::Regex(s) => vec![s.clone()],
            ModulePattern::List(v) => v.clone(),
        };
        return Err(peft_core::Error::NoTargetMatched { patterns }.into());
    }
    Ok(out)
}

/// `⌊density · numel⌋`, at least 1.
///
/// # Errors
/// [`SparseError::Config`] for a density outside `(0, 1]`.
pub fn budget(method: &'static str, density: f64, numel: usize) -> SparseResult<usize> {
    if !(density > 0.0 && density <= 1.0) {
        return Err(SparseError::config(method, "density", format!("{density} must lie in (0, 1]")));
    }
    Ok(((density * numel as f64).floor() as usize).clamp(1, numel.max(1)))
}

/// A random k-subset of `0..numel`, sorted, from the adapter's per-site generator (O(k) memory for small k).
pub(crate) fn random_indices(seed: u64, name: &str, p: &Param, k: usize) -> SparseResult<SparseIndices> {
    let mut rng = site_rng(seed, name, p.name());
    let v: Vec<u64> = sample(&mut rng, p.numel(), k).into_iter().map(|i| i as u64).collect();
    SparseIndices::from_unsorted(p.name(), v, p.numel())
}

/// Checks that `file` holds `key` with shape `want` (preflight before anything is allocated).
///
/// # Errors
/// [`AdapterError::MissingTensor`] or [`AdapterError::TensorShape`].
pub(crate) fn expect_shape(file: &AdapterTensors, key: &str, want: &[usize]) -> AdapterResult<()> {
    match file.shape(key) {
        None => Err(AdapterError::MissingTensor { file: file.path().to_path_buf(), key: key.into() }),
        Some(s) if s != want => Err(AdapterError::TensorShape {
            file: file.path().to_path_buf(),
            key: key.into(),
            expected: want.to_vec(),
            found: s,
        }),
        Some(_) => Ok(()),
    }
}

/// Unknown keys of a config object, as load-report lines.
pub(crate) fn unknown_keys(v: &Value, known: &[&str], method: &str) -> Vec<String> {
    v.as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !known.contains(&k.as_str()))
                .map(|k| format!("`{k}` is not a {method} option and was ignored"))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses a config object.
pub(crate) fn parse<C: serde::de::DeserializeOwned>(v: &Value, method: &str) -> AdapterResult<C> {
    serde_json::from_value(v.clone()).map_err(|e| AdapterError::config(method, "<config>", e.to_string()))
}

/// Serialises a config.
pub(crate) fn to_json<C: Serialize>(c: &C, method: &str) -> AdapterResult<Value> {
    serde_json::to_value(c).map_err(|e| AdapterError::config(method, "<config>", e.to_string()))
}

// ---- SPARSE_FT ----------------------------------------------------------------------------------------------

/// How [`SparseFtConfig`] picks its fixed mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskInit {
    /// A uniformly random k-subset per tensor (seeded by the adapter seed and the parameter name).
    Random,
    /// The k entries of largest |W| per tensor.
    Magnitude,
}

/// Sparse fine-tuning on a mask fixed at injection: `⌊density·numel⌋` entries of every parameter matching
/// `target_parameters`, values zero at first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseFtConfig {
    /// Always `"SPARSE_FT"`.
    pub peft_type: String,
    /// Parameter names (full match of a regex, or names / dotted suffixes).
    pub target_parameters: ModulePattern,
    /// Fraction of each target's entries tuned, in `(0, 1]`.
    pub density: f64,
    /// How the mask is chosen.
    pub mask_init: MaskInit,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

impl SparseFtConfig {
    /// A random mask of `density` on the parameters whose names fully match the regex `target`.
    pub fn new(target: &str, density: f64) -> Self {
        SparseFtConfig {
            peft_type: Self::PEFT_TYPE.into(),
            target_parameters: ModulePattern::Regex(target.into()),
            density,
            mask_init: MaskInit::Random,
            modules_to_save: None,
            inference_mode: false,
        }
    }
}

/// The per-parameter zero deltas of a fixed-mask config.
pub(crate) fn fixed_deltas(
    method: &'static str,
    kind: &'static str,
    targets: Vec<Param>,
    density: f64,
    init: MaskInit,
    cx: &InjectCx<'_>,
) -> SparseResult<Vec<(Param, SparseDelta)>> {
    let mut out = Vec::new();
    for p in targets {
        let k = budget(method, density, p.numel())?;
        let idx = match init {
            MaskInit::Random => random_indices(cx.seed, cx.name, &p, k)?,
            MaskInit::Magnitude => {
                let v = p.value();
                let scores: Vec<f32> = v.iter().map(|x| x.abs()).collect();
                SparseIndices::new(p.name(), top_k_indices(&scores, k), p.numel())?
            }
        };
        let d = SparseDelta::zeros(cx.name, kind, &p, idx)?;
        out.push((p, d));
    }
    Ok(out)
}

macro_rules! common_config_impl {
    () => {
        fn modules_to_save(&self) -> Vec<String> {
            self.modules_to_save.clone().unwrap_or_default()
        }
        fn set_modules_to_save(&mut self, modules: Vec<String>) -> peft_core::adapter::AdapterResult<()> {
            self.modules_to_save = (!modules.is_empty()).then_some(modules);
            Ok(())
        }
        fn inference_mode(&self) -> bool {
            self.inference_mode
        }
        fn set_inference_mode(&mut self, on: bool) {
            self.inference_mode = on;
        }
        fn clone_box(&self) -> Box<dyn peft_core::adapter::TunerConfig> {
            Box::new(self.clone())
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    };
}
pub(crate) use common_config_impl;

impl TunerConfig for SparseFtConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        format!("sparse fine-tuning, density {} ({:?} mask)", self.density, self.mask_init)
    }
    fn to_json(&self) -> AdapterResult<Value> {
        to_json(self, Self::PEFT_TYPE)
    }
    fn inject(&self, _model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        let targets = select_params(Self::PEFT_TYPE, &self.target_parameters, &self.modules_to_save(), cx.base_params)?;
        let deltas = fixed_deltas(Self::PEFT_TYPE, "sparse-ft", targets, self.density, self.mask_init, &cx)?;
        Ok(Box::new(SparseTuner::attach(cx.name, Self::PEFT_TYPE, deltas)?))
    }
    common_config_impl!();
}

impl PeftConfig for SparseFtConfig {
    const PEFT_TYPE: &'static str = "SPARSE_FT";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let known = ["peft_type", "target_parameters", "density", "mask_init", "modules_to_save", "inference_mode"];
        let ignored = unknown_keys(v, &known, Self::PEFT_TYPE);
        let c: Self = parse(v, Self::PEFT_TYPE)?;
        budget(Self::PEFT_TYPE, c.density, 1)?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "tuner_tests.rs"]
mod tests;
