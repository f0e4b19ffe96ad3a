//! SPT, sensitivity-aware parameter-efficient tuning (spec §3.6): a global budget of "sensitive" entries, found
//! from gradients on a few calibration batches, split between **structural** tuning (a low-rank update) of the
//! matrices that hold many of them and **unstructured** sparse tuning of the entries elsewhere.
//!
//! - **Sensitivity.** `s = Σ_batches (∂L/∂θ)²` over up to `sensitivity_batches` (16) calibration batches, for
//!   every target parameter. The `budget` (τ) entries of largest `s` across all targets form the sensitive set
//!   (ties: earlier tensor, then lower index). The scores are dense (one f32 per target entry) but live only
//!   during injection; what trains afterwards is O(k).
//! - **Allocation** ([`allocate`]). A matrix `[out, in]` holding `c` sensitive entries is tuned structurally when
//!   `c ≥ c_struct / α` with `c_struct = r·(in + out)` (the low-rank update's size; `r` = `low_rank_dim` = 8,
//!   `α` = `alpha` = 10); otherwise its `c` entries get a sparse delta. A vector of length `n` (bias, LayerNorm)
//!   is tuned whole when `structured_vector` is on and `c ≥ n / β` (`β` = `beta` = 5), else sparsely. Targets
//!   without a sensitive entry are not tuned.
//! - **Structural update.** `W + B·A` with `A [r, in]` Kaiming-uniform (`|A| ≤ 1/√in`) and `B [out, r]` zero,
//!   unscaled, as SPT's `StructuredTuningModule(structured_type = "lora")`. It is a parameter delta here (the
//!   forward sees `W + B·A`), which equals SPT's parallel branch `x·Wᵀ + x·Aᵀ·Bᵀ` in value. Not implemented:
//!   SPT's `adapter` structured type (a GELU bottleneck is not a weight delta) and the branch's DropPath(0.1)
//!   (as SPT with `no_structured_drop_path`). Cost of the delta form: each forward builds `W + B·A` densely per
//!   structural matrix and the backward forms that matrix's dense gradient before it reaches `A` and `B` (compute
//!   and transient memory as full fine-tuning of that matrix, which SPT's parallel branch avoids); the trained
//!   parameters and their optimizer state stay `r·(in + out)`.
//! - **Budget.** τ counts sensitive entries, as SPT's `--param_req`-producing sweep does before it searches τ for
//!   a target total; the trainable total that results is `Σ c_struct + Σ n_vector + Σ c_sparse`
//!   ([`SptTuner::trainable_entries`]), reported by the bench. The search over τ for a given total is left to the
//!   caller.
//!
//! **File layout.** Sparse targets: `<param>.indices` + `<param>.values` as every sparse adapter; whole vectors
//! the same with every index; low-rank targets `<param>.spt_lora_A` (`[r, in]`) and `<param>.spt_lora_B`
//! (`[out, r]`). The saved `adapter_config.json` records the allocation (`allocation`: per parameter
//! `{"kind": "low_rank"}`, `{"kind": "full"}` or `{"kind": "sparse", "k": c}`), so loading needs no calibration.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::{
    site_rng, AdapterResult, AdapterTensors, InjectCx, ModulePattern, PeftConfig, Tuner, TunerConfig,
};
use peft_core::nn::named_params;
use peft_core::nn::Module;
use peft_core::{Param, ParamDelta, Tensor};

use crate::delta::SparseDelta;
use crate::error::{SparseError, SparseResult};
use crate::indices::SparseIndices;
use crate::select::{top_k_global, Score, ScoreAccumulator};
use crate::tuner::{common_config_impl, expect_shape, parse, select_params, to_json, unknown_keys, SparseTuner};

/// How one target parameter is tuned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Alloc {
    /// A matrix with the low-rank update `B·A`.
    LowRank,
    /// A vector tuned whole.
    Full,
    /// `k` sensitive entries tuned as a sparse delta.
    Sparse {
        /// Number of entries.
        k: usize,
    },
}

/// What [`allocate`] needs to know of one target: its name, shape and sensitive-entry count `c`.
#[derive(Clone, Debug)]
pub struct Sensitive<'a> {
    /// Parameter name.
    pub name: &'a str,
    /// Its shape (`[out, in]` for a matrix).
    pub shape: &'a [usize],
    /// Sensitive entries in it.
    pub count: usize,
}

/// SPT's allocation rule: per target, structural when it holds enough sensitive entries (matrix:
/// `c ≥ r·(in + out)/alpha`; vector with `structured_vector`: `c ≥ n/beta`), else sparse with `k = c`; targets
/// with `c = 0` are absent from the result. Tensors of other ranks are always sparse.
pub fn allocate(
    targets: &[Sensitive<'_>],
    r: usize,
    alpha: f64,
    beta: f64,
    structured_vector: bool,
) -> BTreeMap<String, Alloc> {
    let mut out = BTreeMap::new();
    for t in targets {
        if t.count == 0 {
            continue;
        }
        let c = t.count as f64;
        let a = match *t.shape {
            [o, i] if c >= (r * (i + o)) as f64 / alpha => Alloc::LowRank,
            [n] if structured_vector && c >= n as f64 / beta => Alloc::Full,
            _ => Alloc::Sparse { k: t.count },
        };
        out.insert(t.name.to_string(), a);
    }
    out
}

/// Trainable entries of an allocation over parameters of the given shapes (`r·(in + out)` per low-rank matrix,
/// `n` per whole vector, `k` per sparse target).
pub fn allocated_entries(alloc: &BTreeMap<String, Alloc>, shape_of: impl Fn(&str) -> Vec<usize>, r: usize) -> usize {
    alloc
        .iter()
        .map(|(name, a)| match a {
            Alloc::LowRank => shape_of(name).iter().sum::<usize>() * r,
            Alloc::Full => shape_of(name).iter().product(),
            Alloc::Sparse { k } => *k,
        })
        .sum()
}

/// `W + B·A` on one matrix parameter: SPT's structural (LoRA-type) update as a parameter delta.
pub struct LowRankDelta {
    name: String,
    param_name: String,
    a: Param,
    b: Param,
}

impl LowRankDelta {
    /// The update on `param` (`[out, in]`) of adapter `name`, rank `r`: `A` Kaiming-uniform from `rng`
    /// (`|A| ≤ 1/√in`), `B` zero. Parameters are named `<param>.spt_lora_{A,B}.<name>`.
    ///
    /// # Errors
    /// [`SparseError::ShapeMismatch`] when `param` is not a matrix.
    pub fn new(name: &str, param: &Param, r: usize, rng: &mut impl Rng) -> SparseResult<Self> {
        let shape = param.shape();
        let [o, i] = shape[..] else {
            return Err(SparseError::ShapeMismatch { tensor: param.name().into(), expected: vec![0, 0], found: shape });
        };
        let bound = 1.0 / (i.max(1) as f32).sqrt();
        let a = ArrayD::from_shape_fn(IxDyn(&[r, i]), |_| rng.gen_range(-bound..=bound));
        Ok(LowRankDelta {
            name: name.into(),
            param_name: param.name().into(),
            a: Param::new(format!("{}.spt_lora_A.{name}", param.name()), a, true),
            b: Param::new(format!("{}.spt_lora_B.{name}", param.name()), ArrayD::zeros(IxDyn(&[o, r])), true),
        })
    }

    /// `A` (`[r, in]`).
    pub fn lora_a(&self) -> &Param {
        &self.a
    }

    /// `B` (`[out, r]`).
    pub fn lora_b(&self) -> &Param {
        &self.b
    }

    /// The parameter this update adds to.
    pub fn param_name(&self) -> &str {
        &self.param_name
    }
}

/// `base + B·A`, differentiable in all three (the forward of [`LowRankDelta`]).
///
/// # Errors
/// Shape errors of the matmul or the sum.
pub fn low_rank_apply<E: peft_core::Elem>(
    base: &Tensor<E>,
    a: &Tensor<E>,
    b: &Tensor<E>,
) -> peft_core::Result<Tensor<E>> {
    base.add(&b.matmul(a)?)
}

impl ParamDelta for LowRankDelta {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "spt-low-rank"
    }
    fn apply(&self, base: &Tensor) -> peft_core::Result<Tensor> {
        low_rank_apply(base, &self.a.tensor(), &self.b.tensor())
    }
    fn delta_value(&self) -> peft_core::Result<ArrayD<f32>> {
        Ok(self.b.tensor().matmul(&self.a.tensor())?.data().to_owned())
    }
    fn params(&self) -> Vec<Param> {
        vec![self.a.clone(), self.b.clone()]
    }
}

/// SPT (`peft_type = "SPT"`): see the module docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SptConfig {
    /// Always `"SPT"`.
    pub peft_type: String,
    /// Parameter names scored for sensitivity (full match of a regex, or names / dotted suffixes). SPT scores
    /// every parameter except the head and the patch/position embeddings.
    pub target_parameters: ModulePattern,
    /// τ: the number of sensitive entries chosen globally.
    pub budget: usize,
    /// Rank `r` of the structural update (8).
    pub low_rank_dim: usize,
    /// α: a matrix is tuned structurally when it holds at least `r·(in + out)/α` sensitive entries (10).
    pub alpha: f64,
    /// β: a vector is tuned whole when it holds at least `n/β` sensitive entries (5).
    pub beta: f64,
    /// Whether vectors may be tuned whole (SPT's `structured_vector`, on).
    pub structured_vector: bool,
    /// Calibration batches whose squared gradients are summed (16).
    pub sensitivity_batches: usize,
    /// The allocation found at injection (recorded in the saved config; loading builds it without calibration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<BTreeMap<String, Alloc>>,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

impl SptConfig {
    /// SPT's defaults (r 8, α 10, β 5, structured vectors, 16 sensitivity batches) with `budget` sensitive entries
    /// among the parameters whose names fully match the regex `target`.
    pub fn new(target: &str, budget: usize) -> Self {
        SptConfig {
            peft_type: Self::PEFT_TYPE.into(),
            target_parameters: ModulePattern::Regex(target.into()),
            budget,
            low_rank_dim: 8,
            alpha: 10.0,
            beta: 5.0,
            structured_vector: true,
            sensitivity_batches: 16,
            allocation: None,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    fn check(&self) -> SparseResult<()> {
        let t = Self::PEFT_TYPE;
        let bad = |field: &'static str, why: String| Err(SparseError::config(t, field, why));
        if self.budget == 0 {
            return bad("budget", "must be at least 1".into());
        }
        if self.low_rank_dim == 0 {
            return bad("low_rank_dim", "must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("alpha", format!("{} must be finite and > 0", self.alpha));
        }
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad("beta", format!("{} must be finite and > 0", self.beta));
        }
        if self.sensitivity_batches == 0 {
            return bad("sensitivity_batches", "must be at least 1".into());
        }
        Ok(())
    }

    /// `Σ (∂L/∂θ)²` per target over up to `sensitivity_batches` calibration batches; the targets are made
    /// trainable for the duration and their flags restored (also on error).
    fn sensitivity(&self, targets: &[Param], cx: &mut InjectCx<'_>) -> SparseResult<Vec<ScoreAccumulator>> {
        let t = Self::PEFT_TYPE;
        let Some(calib) = cx.calib.as_deref_mut() else {
            return Err(SparseError::config(
                t,
                "allocation",
                "SPT scores sensitivity on calibration batches: add it with calibration data \
                 (`add_adapter_calibrated`), or load a saved SPT adapter (its config records the allocation)",
            ));
        };
        let flags: Vec<bool> = targets.iter().map(Param::trainable).collect();
        for p in targets {
            p.set_trainable(true);
        }
        let result = (|| {
            let mut acc: Vec<ScoreAccumulator> =
                targets.iter().map(|p| ScoreAccumulator::new(Score::Fisher, p.numel())).collect();
            let mut n = 0;
            while n < self.sensitivity_batches {
                let Some(loss) = calib(n)? else { break };
                let grads = loss.backward()?;
                drop(loss);
                for (a, p) in acc.iter_mut().zip(targets) {
                    if let Some(g) = grads.get_id(p.id()) {
                        a.add(g.as_standard_layout().as_slice().unwrap_or(&[]));
                    }
                }
                n += 1;
            }
            if n == 0 {
                return Err(SparseError::config(t, "calibration", "the calibration source yielded no batch"));
            }
            Ok(acc)
        })();
        for (p, f) in targets.iter().zip(flags) {
            p.set_trainable(f);
        }
        result
    }
}

/// An injected SPT adapter: sparse deltas (sparse targets and whole vectors) and low-rank updates.
pub struct SptTuner {
    sparse: SparseTuner,
    low_rank: Vec<(Param, Arc<LowRankDelta>)>,
    alloc: BTreeMap<String, Alloc>,
    saved: SptConfig,
}

impl SptTuner {
    /// The sparse part (sparse targets and whole vectors).
    pub fn sparse(&self) -> &SparseTuner {
        &self.sparse
    }

    /// The low-rank updates, per matrix.
    pub fn low_rank(&self) -> &[(Param, Arc<LowRankDelta>)] {
        &self.low_rank
    }

    /// The allocation.
    pub fn allocation(&self) -> &BTreeMap<String, Alloc> {
        &self.alloc
    }

    /// Trainable entries: `r·(in + out)` per low-rank matrix plus every sparse entry.
    pub fn trainable_entries(&self) -> usize {
        self.sparse.trainable_entries()
            + self.low_rank.iter().map(|(_, d)| d.lora_a().numel() + d.lora_b().numel()).sum::<usize>()
    }

    fn low_rank_keys(&self) -> impl Iterator<Item = (String, String, &Arc<LowRankDelta>)> {
        self.low_rank.iter().map(|(p, d)| (format!("{}.spt_lora_A", p.name()), format!("{}.spt_lora_B", p.name()), d))
    }
}

impl Tuner for SptTuner {
    fn name(&self) -> &str {
        self.sparse.name()
    }
    fn params(&self) -> Vec<Param> {
        let mut out = self.sparse.params();
        for (_, d) in &self.low_rank {
            out.extend(d.params());
        }
        out
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        let mut out = self.sparse.state_dict();
        for (ka, kb, d) in self.low_rank_keys() {
            out.push((ka, d.lora_a().clone()));
            out.push((kb, d.lora_b().clone()));
        }
        out
    }
    fn saved_config(&self) -> Option<Box<dyn TunerConfig>> {
        Some(Box::new(self.saved.clone()))
    }
    fn load_state_dict(&self, src: &AdapterTensors) -> AdapterResult<()> {
        // Read and check every low-rank tensor before anything is written.
        let mut staged = Vec::new();
        for (ka, kb, d) in self.low_rank_keys() {
            for (key, p) in [(ka, d.lora_a()), (kb, d.lora_b())] {
                let want = p.shape();
                expect_shape(src, &key, &want)?;
                staged.push((p.clone(), src.get(&key, &want)?));
            }
        }
        self.sparse.load_state_dict(src)?;
        for (p, v) in staged {
            p.set(v)?;
        }
        Ok(())
    }
    fn set_active(&self, on: bool) {
        self.sparse.set_active(on);
        for (p, _) in &self.low_rank {
            p.activate_delta(self.sparse.name(), on);
        }
    }
    fn merge(&self) -> AdapterResult<()> {
        self.sparse.merge()?;
        for (i, (p, _)) in self.low_rank.iter().enumerate() {
            if let Err(e) = p.merge_delta(self.sparse.name()) {
                for (q, _) in &self.low_rank[..i] {
                    let _ = q.unmerge_delta(self.sparse.name());
                }
                let _ = self.sparse.unmerge();
                return Err(e.into());
            }
        }
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        self.sparse.unmerge()?;
        for (p, _) in &self.low_rank {
            if p.is_delta_merged(self.sparse.name())? {
                p.unmerge_delta(self.sparse.name())?;
            }
        }
        Ok(())
    }
    fn is_merged(&self) -> bool {
        match self.low_rank.first() {
            Some((p, _)) => p.is_delta_merged(self.sparse.name()).unwrap_or(false),
            None => self.sparse.is_merged(),
        }
    }
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        self.sparse.detach(keep_merged)?;
        for (p, _) in &self.low_rank {
            if keep_merged {
                p.detach_delta_keep_merged(self.sparse.name())?;
            } else {
                if p.is_delta_merged(self.sparse.name())? {
                    p.unmerge_delta(self.sparse.name())?;
                }
                p.detach_delta(self.sparse.name())?;
            }
        }
        Ok(())
    }
    fn state_bytes(&self) -> usize {
        self.sparse.own_state_bytes()
    }
    fn kind(&self) -> &str {
        SptConfig::PEFT_TYPE
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl TunerConfig for SptConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        format!("SPT τ={} (r={}, α={}, β={})", self.budget, self.low_rank_dim, self.alpha, self.beta)
    }
    fn to_json(&self) -> AdapterResult<Value> {
        to_json(self, Self::PEFT_TYPE)
    }
    fn needs_calibration(&self) -> bool {
        self.allocation.is_none()
    }
    fn inject(&self, _model: &dyn Module, mut cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.check()?;
        let t = Self::PEFT_TYPE;
        let targets = select_params(t, &self.target_parameters, &self.modules_to_save(), cx.base_params)?;
        // The allocation, and for a fresh adapter the sensitive indices of every sparse target.
        let (alloc, mut chosen): (BTreeMap<String, Alloc>, BTreeMap<String, Vec<u64>>) = match &self.allocation {
            Some(a) => {
                for name in a.keys() {
                    if !targets.iter().any(|p| p.name() == name) {
                        return Err(SparseError::config(
                            t,
                            "allocation",
                            format!("`{name}` is not a target parameter of this model"),
                        )
                        .into());
                    }
                }
                (a.clone(), BTreeMap::new())
            }
            None => {
                let scores = self.sensitivity(&targets, &mut cx)?;
                let refs: Vec<&[f32]> = scores.iter().map(ScoreAccumulator::scores).collect();
                let picked = top_k_global(&refs, self.budget);
                let shapes: Vec<Vec<usize>> = targets.iter().map(Param::shape).collect();
                let sens: Vec<Sensitive<'_>> = targets
                    .iter()
                    .zip(&shapes)
                    .zip(&picked)
                    .map(|((p, s), idx)| Sensitive { name: p.name(), shape: s, count: idx.len() })
                    .collect();
                let alloc = allocate(&sens, self.low_rank_dim, self.alpha, self.beta, self.structured_vector);
                let chosen = targets.iter().zip(picked).map(|(p, idx)| (p.name().to_string(), idx)).collect();
                (alloc, chosen)
            }
        };
        let mut deltas = Vec::new();
        let mut low = Vec::new();
        for p in &targets {
            let Some(a) = alloc.get(p.name()) else { continue };
            match *a {
                Alloc::LowRank => {
                    let mut rng = site_rng(cx.seed, cx.name, p.name());
                    low.push((p.clone(), LowRankDelta::new(cx.name, p, self.low_rank_dim, &mut rng)?));
                }
                Alloc::Full => {
                    if p.shape().len() != 1 {
                        return Err(
                            SparseError::config(t, "allocation", format!("`{}` is not a vector", p.name())).into()
                        );
                    }
                    let idx = SparseIndices::new(p.name(), (0..p.numel() as u64).collect(), p.numel())?;
                    deltas.push((p.clone(), SparseDelta::zeros(cx.name, "spt-full", p, idx)?));
                }
                Alloc::Sparse { k } => {
                    if k == 0 || k > p.numel() {
                        return Err(SparseError::config(
                            t,
                            "allocation",
                            format!("`{}`: k = {k} for {} entries", p.name(), p.numel()),
                        )
                        .into());
                    }
                    // A fresh adapter uses the sensitive entries; a loaded one gets the file's indices.
                    let idx = chosen.remove(p.name()).unwrap_or_else(|| (0..k as u64).collect());
                    let idx = SparseIndices::new(p.name(), idx, p.numel())?;
                    deltas.push((p.clone(), SparseDelta::zeros(cx.name, "spt-sparse", p, idx)?));
                }
            }
        }
        if deltas.is_empty() && low.is_empty() {
            return Err(SparseError::config(t, "budget", "no target holds a sensitive entry").into());
        }
        let sparse = SparseTuner::attach(cx.name, t, deltas)?;
        let mut low_rank = Vec::new();
        for (p, d) in low {
            let d = Arc::new(d);
            if let Err(e) = p.attach_delta(d.clone()) {
                let _ = sparse.detach(false);
                for (q, _) in &low_rank {
                    let _ = Param::detach_delta(q, cx.name);
                }
                return Err(SparseError::from(e).into());
            }
            low_rank.push((p, d));
        }
        let mut saved = self.clone();
        saved.allocation = Some(alloc.clone());
        Ok(Box::new(SptTuner { sparse, low_rank, alloc, saved }))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.check()?;
        let t = Self::PEFT_TYPE;
        let Some(alloc) = &self.allocation else {
            return Err(SparseError::config(t, "allocation", "a saved SPT adapter records its allocation").into());
        };
        let params = named_params(model);
        for (name, a) in alloc {
            let Some(p) = params.iter().find(|p| p.name() == name) else {
                return Err(SparseError::config(t, "allocation", format!("the model has no parameter `{name}`")).into());
            };
            let shape = p.shape();
            let r = self.low_rank_dim;
            let want: Vec<(String, Vec<usize>)> = match (a, shape.as_slice()) {
                (Alloc::LowRank, [o, i]) => {
                    vec![(format!("{name}.spt_lora_A"), vec![r, *i]), (format!("{name}.spt_lora_B"), vec![*o, r])]
                }
                (Alloc::LowRank, _) => {
                    return Err(SparseError::config(t, "allocation", format!("`{name}` is not a matrix")).into())
                }
                (Alloc::Full, _) => vec![(format!("{name}.values"), vec![p.numel()])],
                (Alloc::Sparse { k }, _) => vec![(format!("{name}.values"), vec![*k])],
            };
            for (key, expected) in want {
                expect_shape(file, &key, &expected)?;
            }
        }
        Ok(())
    }
    common_config_impl!();
}

impl PeftConfig for SptConfig {
    const PEFT_TYPE: &'static str = "SPT";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let known = [
            "peft_type",
            "target_parameters",
            "budget",
            "low_rank_dim",
            "alpha",
            "beta",
            "structured_vector",
            "sensitivity_batches",
            "allocation",
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
#[path = "spt_tests.rs"]
mod tests;
