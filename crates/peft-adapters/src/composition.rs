//! Composition blocks over frozen source adapters on the residual sites: **AdapterFusion** (`Fuse`), output
//! **Average** and **ScaLearn** (learned scaling of the sources' outputs, four variants). A composition is an
//! adapter of its own (a [`TunerConfig`] with `peft_type = "COMPOSITION"`) that names its sources: adapters
//! already on the model (bottleneck adapters, or any [`ResidualAdapter`]). On each residual site that carries the
//! sources it attaches one block which runs every source's branch `u_i` (AdapterHub's `up`, the adapter output
//! before the residual addition, scaling included; [`ResidualAdapter::branch`]) and returns the new sub-layer
//! output:
//!
//! | composition | returns | trainable |
//! |---|---|---|
//! | `average` | `h + Σ_i w_i·u_i`, fixed `w` (normalised to sum 1 unless `normalize_weights = false`) | nothing |
//! | `fuse` | `h + Σ_i p_i·V u_i`, `p = softmax_i(⟨Q q, K u_i⟩ / T)`, `q` the last source's input | `Q`, `K` (+bias), `V` |
//! | `scalearn` | `h + Σ_i ω_i ⊙ u_i`, `ω ∈ R^{N×d}` (`omega = "vector"`) or `R^{N×1}` (`"scalar"`) | `ω` |
//! | `batch_split` | rows `[o_i, o_i + batch_sizes[i])` of the batch: source `i`'s own output | nothing |
//! | `parallel` | row block `i` of N equal blocks: source `i`'s own output | nothing |
//!
//! Use: add the sources (trained, or loaded), add the composition, make the composition the **only** active
//! adapter (`set_adapter`): the sources then stay frozen and the block calls them itself. With the sources active
//! too, a site would apply them and then the block (a `Stack`); that is allowed but rarely meant.
//!
//! **AdapterFusion** (Pfeiffer et al., 2021; AdapterHub `BertFusion`, field names of its `AdapterFusionConfig`;
//! `fuse()` is its default `"dynamic"` config, `fuse_static()` its `"static"` one): query, key and value are
//! `d×d` linear maps; query and key start N(0, 0.02) with zero bias, the value (no bias) starts as the identity
//! with 1e-6 off the diagonal (`value_initialized`); dropout on the scores before the softmax (`dropout_prob`,
//! BERT's 0.1); the query reads the last source's input (`LN(h + x)` for SeqBn sources, AdapterHub's
//! `query_before_ln = false`); the residual is `h` (AdapterHub's `residual_before_ln = true`, what its SeqBn and
//! Houlsby configs set). `residual_before = true` adds `h` to every value instead and returns the context alone.
//! `regularization` adds `0.01·Σ_sites ‖I − V‖²_F` to the training loss (AdapterHub's
//! `get_fusion_regularization_loss`, weight `regularization_weight`), through [`Tuner::aux_loss`].
//! `value_before_softmax` is accepted and has no effect: `V` has no bias, so `Σ p_i V u_i = V Σ p_i u_i`.
//! **Differences**: `temperature = true` anneals `T` from 50 to 1 by 0.05 per *optimizer step* (AdapterHub lowers
//! it on every forward of every fusion layer, evaluation forwards included, so its schedule depends on how often
//! it is called); a fusion over adapters on some sites only is refused rather than skipped site by site.
//!
//! **Average** (AdapterHub's `Average` block on bottleneck outputs): AdapterHub computes
//! `torch.mean(stack(h + u_i) · w_i)`, which also divides by the number of adapters (with uniform weights the
//! output is `(h + mean u)/N`); this block returns the weighted average `Σ w_i (h + u_i) = h + Σ w_i u_i` that the
//! block's documentation describes. Weight-space averaging of LoRA adapters is peft-lora's
//! `add_weighted_adapter`.
//!
//! **BatchSplit** and **Parallel** (AdapterHub's blocks of those names): every row goes through one source alone
//! (its full `forward`, so a SeqBn source's LayerNorm is applied as it would be on its own); a batch size that does
//! not match `batch_sizes` is a typed error at forward time. **Difference**: AdapterHub's `Parallel` repeats the
//! batch inside the model at the first adapter layer (the model then returns N·B rows); here the caller passes the
//! batch already repeated N times (source `i` gets rows `[i·B, (i+1)·B)`), which is the same computation with the
//! repetition made explicit. Neither block trains anything of its own (the sources stay frozen unless made
//! trainable).
//!
//! **ScaLearn** (Frohmann et al., 2023): `ω` starts N(`omega_init_scale`/N, `omega_init_std`²) (2.0 and 0.001, the
//! paper's `scalearn_2_avg_d03` runs) with dropout `omega_dropout` (0.3) on `ω` in training. `shared_omega = true`
//! gives the "++" variants: one `ω` for every site (`ScaLearn++`: N·d parameters; `ScaLearnUniform++`: N).
//! Presets: [`CompositionConfig::scalearn`], [`CompositionConfig::scalearn_uniform`],
//! [`CompositionConfig::scalearn_pp`], [`CompositionConfig::scalearn_uniform_pp`].
//!
//! Files: `peft_type = "COMPOSITION"` (neither PEFT nor AdapterHub has this file); tensors
//! `<site>.adapter_fusion_layer.{query,key}.{weight,bias}`, `<site>.adapter_fusion_layer.value.weight`,
//! `<site>.adapter_scalearn.omega`, or `scalearn.omega` for a shared `ω`. The sources are saved as the adapters
//! they are; loading a composition needs its sources loaded first (a missing one is a typed error).
//!
//! ```
//! use peft_core::adapter::PeftModel;
//! use peft_core::io::BertConfig;
//! use peft_core::nn::{Ctx, RandomInit};
//! use peft_adapters::bottleneck::BottleneckConfig;
//! use peft_adapters::composition::CompositionConfig;
//! use peft_models::bert::BertModel;
//! use peft_models::tokenizer::Batch;
//!
//! let cfg = BertConfig { vocab_size: 10, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2,
//!     intermediate_size: 16, max_position_embeddings: 8, ..BertConfig::default() };
//! let bert = BertModel::from_source(&cfg, &RandomInit::new(0, 0.1))?;
//! let batch = Batch::from_rows(&[vec![1, 4, 2]])?;
//! let mut model = PeftModel::wrap(bert, 0);
//! model.add_adapter("sst2", BottleneckConfig::seq_bn())?; // source adapters (trained elsewhere)
//! model.add_adapter("qnli", BottleneckConfig::seq_bn())?;
//! model.add_adapter("fusion", CompositionConfig::fuse(&["sst2", "qnli"]))?;
//! model.set_adapter("fusion")?; // trains Q, K, V only; the sources stay frozen
//! assert_eq!(model.trainable_params().len(), 5); // one site: query (w, b), key (w, b), value
//! let y = model.forward(&batch, &Ctx::eval())?;
//! assert_eq!(y.shape(), &[1, 3, 8]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::any::Any;
use std::sync::{Arc, Mutex};

use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::{
    site_rng, AdapterResult, AdapterTensors, InjectCx, PeftConfig, SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{residual_sites, Ctx, Module, ResidualAdapter, ResidualBranch, ResidualSite};
use peft_core::{Elem, Param, Tensor};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bottleneck::stream_width;
use crate::common::{config_json, normal, parse_config};
use crate::error::{AdaptersError, Result};

/// The composition blocks' `peft_type` (this crate's own).
pub const COMPOSITION_TYPE: &str = "COMPOSITION";

/// Which block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompositionKind {
    /// Fixed weighted average of the sources' outputs.
    Average,
    /// AdapterFusion: attention over the sources' outputs.
    Fuse,
    /// ScaLearn: learned scaling of the sources' outputs.
    Scalearn,
    /// AdapterHub's `BatchSplit`: rows `[o_i, o_i + batch_sizes[i])` of the batch go through source `i` alone.
    BatchSplit,
    /// AdapterHub's `Parallel` over a batch the caller repeated N times: block `i` of N equal row blocks goes
    /// through source `i` alone.
    Parallel,
}

/// The shape of ScaLearn's `ω` per source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OmegaShape {
    /// One scale per source and channel (`ω ∈ R^{N×d}`, ScaLearn).
    Vector,
    /// One scale per source (`ω ∈ R^{N×1}`, ScaLearnUniform).
    Scalar,
}

fn d_peft_type() -> String {
    COMPOSITION_TYPE.into()
}
fn d_true() -> bool {
    true
}
fn d_dropout() -> f64 {
    0.1
}
fn d_reg() -> f64 {
    0.01
}
fn d_omega() -> OmegaShape {
    OmegaShape::Vector
}
fn d_init_scale() -> f64 {
    2.0
}
fn d_init_std() -> f64 {
    1e-3
}
fn d_omega_dropout() -> f64 {
    0.3
}

/// A composition block's config (see the module docs for each field's effect).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompositionConfig {
    /// Always `"COMPOSITION"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// Which block.
    pub composition: CompositionKind,
    /// The source adapters' names, in order (at least one; no repeats).
    pub sources: Vec<String>,
    /// `average`: one weight per source (default uniform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
    /// `average`: divide the weights by their sum.
    #[serde(default = "d_true")]
    pub normalize_weights: bool,
    /// `fuse`: a learned query map.
    #[serde(default = "d_true")]
    pub query: bool,
    /// `fuse`: a learned key map.
    #[serde(default = "d_true")]
    pub key: bool,
    /// `fuse`: a learned value map.
    #[serde(default = "d_true")]
    pub value: bool,
    /// `fuse`: the value map starts as the identity (1e-6 off the diagonal) rather than N(0, 0.02).
    #[serde(default = "d_true")]
    pub value_initialized: bool,
    /// `fuse`: accepted for AdapterHub configs; no effect (see the module docs).
    #[serde(default = "d_true")]
    pub value_before_softmax: bool,
    /// `fuse`: add `h` to every value and return the context alone.
    #[serde(default)]
    pub residual_before: bool,
    /// `fuse`: anneal the softmax temperature from 50 to 1.
    #[serde(default)]
    pub temperature: bool,
    /// `fuse`: the `‖I − V‖²` penalty.
    #[serde(default = "d_true")]
    pub regularization: bool,
    /// `fuse`: weight of that penalty.
    #[serde(default = "d_reg")]
    pub regularization_weight: f64,
    /// `fuse`: dropout on the attention scores (training only).
    #[serde(default = "d_dropout")]
    pub dropout_prob: f64,
    /// `scalearn`: vector or scalar `ω`.
    #[serde(default = "d_omega")]
    pub omega: OmegaShape,
    /// `scalearn`: one `ω` for every site (the "++" variants).
    #[serde(default)]
    pub shared_omega: bool,
    /// `scalearn`: `ω` starts around `omega_init_scale / N`.
    #[serde(default = "d_init_scale")]
    pub omega_init_scale: f64,
    /// `scalearn`: standard deviation of `ω`'s start.
    #[serde(default = "d_init_std")]
    pub omega_init_std: f64,
    /// `scalearn`: dropout on `ω` (training only).
    #[serde(default = "d_omega_dropout")]
    pub omega_dropout: f64,
    /// `batch_split`: rows per source, in source order (they must add up to the batch size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_sizes: Option<Vec<usize>>,
    /// Modules trained and saved in full next to the block (the task head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "composition",
    "sources",
    "weights",
    "normalize_weights",
    "query",
    "key",
    "value",
    "value_initialized",
    "value_before_softmax",
    "residual_before",
    "temperature",
    "regularization",
    "regularization_weight",
    "dropout_prob",
    "omega",
    "shared_omega",
    "omega_init_scale",
    "omega_init_std",
    "omega_dropout",
    "batch_sizes",
    "modules_to_save",
    "inference_mode",
];

impl CompositionConfig {
    fn with(kind: CompositionKind, sources: &[&str]) -> Self {
        CompositionConfig {
            peft_type: d_peft_type(),
            composition: kind,
            sources: sources.iter().map(|s| s.to_string()).collect(),
            weights: None,
            normalize_weights: true,
            query: true,
            key: true,
            value: true,
            value_initialized: true,
            value_before_softmax: true,
            residual_before: false,
            temperature: false,
            regularization: true,
            regularization_weight: d_reg(),
            dropout_prob: d_dropout(),
            omega: OmegaShape::Vector,
            shared_omega: false,
            omega_init_scale: d_init_scale(),
            omega_init_std: d_init_std(),
            omega_dropout: d_omega_dropout(),
            batch_sizes: None,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// Output average with `weights` (uniform when `None`), normalised to sum 1.
    pub fn average(sources: &[&str], weights: Option<Vec<f64>>) -> Self {
        CompositionConfig { weights, ..Self::with(CompositionKind::Average, sources) }
    }

    /// AdapterFusion, AdapterHub's default `"dynamic"` config (query, key, value, identity-initialised value,
    /// `‖I − V‖²` regularisation).
    pub fn fuse(sources: &[&str]) -> Self {
        Self::with(CompositionKind::Fuse, sources)
    }

    /// AdapterFusion, AdapterHub's `"static"` config (no value map, no regularisation).
    pub fn fuse_static(sources: &[&str]) -> Self {
        CompositionConfig {
            value: false,
            value_initialized: false,
            regularization: false,
            ..Self::with(CompositionKind::Fuse, sources)
        }
    }

    /// ScaLearn: a vector `ω` per site.
    pub fn scalearn(sources: &[&str]) -> Self {
        Self::with(CompositionKind::Scalearn, sources)
    }

    /// ScaLearnUniform: a scalar `ω` per source and site.
    pub fn scalearn_uniform(sources: &[&str]) -> Self {
        CompositionConfig { omega: OmegaShape::Scalar, ..Self::scalearn(sources) }
    }

    /// ScaLearn++: one vector `ω` shared by every site.
    pub fn scalearn_pp(sources: &[&str]) -> Self {
        CompositionConfig { shared_omega: true, ..Self::scalearn(sources) }
    }

    /// AdapterHub's `BatchSplit`: the first `batch_sizes[0]` rows through the first source, the next
    /// `batch_sizes[1]` through the second, ...
    pub fn batch_split(sources: &[&str], batch_sizes: Vec<usize>) -> Self {
        CompositionConfig { batch_sizes: Some(batch_sizes), ..Self::with(CompositionKind::BatchSplit, sources) }
    }

    /// AdapterHub's `Parallel`, for a batch repeated once per source (see the module docs).
    pub fn parallel(sources: &[&str]) -> Self {
        Self::with(CompositionKind::Parallel, sources)
    }

    /// ScaLearnUniform++: one scalar per source for the whole model (N parameters).
    pub fn scalearn_uniform_pp(sources: &[&str]) -> Self {
        CompositionConfig { shared_omega: true, ..Self::scalearn_uniform(sources) }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`AdaptersError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f, r: String| Err(AdaptersError::config(COMPOSITION_TYPE, f, r));
        if self.sources.is_empty() {
            return bad("sources", "names no adapter".into());
        }
        for (i, s) in self.sources.iter().enumerate() {
            if self.sources[..i].contains(s) {
                return bad("sources", format!("`{s}` is listed twice"));
            }
        }
        if let Some(w) = &self.weights {
            if w.len() != self.sources.len() {
                return bad("weights", format!("{} weights for {} sources", w.len(), self.sources.len()));
            }
            if w.iter().any(|v| !v.is_finite()) {
                return bad("weights", format!("{w:?} are not all finite"));
            }
            if self.normalize_weights && w.iter().sum::<f64>().abs() < 1e-12 {
                return bad("weights", format!("{w:?} sum to zero and cannot be normalised"));
            }
        }
        for (f, p) in [("dropout_prob", self.dropout_prob), ("omega_dropout", self.omega_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return bad(f, format!("must be in [0, 1), got {p}"));
            }
        }
        if !(self.regularization_weight.is_finite() && self.regularization_weight >= 0.0) {
            return bad("regularization_weight", format!("must be finite and ≥ 0, got {}", self.regularization_weight));
        }
        if !self.omega_init_scale.is_finite() {
            return bad("omega_init_scale", format!("{} is not finite", self.omega_init_scale));
        }
        if !(self.omega_init_std.is_finite() && self.omega_init_std >= 0.0) {
            return bad("omega_init_std", format!("must be finite and ≥ 0, got {}", self.omega_init_std));
        }
        if self.composition == CompositionKind::Fuse && self.regularization && !self.value {
            return bad("regularization", "regularises the value map, and `value` is off".into());
        }
        match (&self.batch_sizes, self.composition) {
            (None, CompositionKind::BatchSplit) => return bad("batch_sizes", "batch_split needs them".into()),
            (Some(b), CompositionKind::BatchSplit) if b.len() != self.sources.len() || b.contains(&0) => {
                return bad(
                    "batch_sizes",
                    format!("{b:?}: one positive size per source ({} sources) is needed", self.sources.len()),
                )
            }
            (Some(_), k) if k != CompositionKind::BatchSplit => {
                return bad("batch_sizes", format!("apply to batch_split only, not {k:?}"))
            }
            _ => {}
        }
        Ok(())
    }

    /// The average's weights after normalisation.
    pub fn average_weights(&self) -> Vec<f64> {
        let n = self.sources.len();
        match &self.weights {
            None => vec![1.0 / n as f64; n],
            Some(w) if self.normalize_weights => {
                let s: f64 = w.iter().sum();
                w.iter().map(|v| v / s).collect()
            }
            Some(w) => w.clone(),
        }
    }
}

/// The sources' branch outputs stacked on a new second-to-last axis: `[..., N, d]`.
///
/// # Errors
/// Shape errors (sources of different shapes).
pub fn stack_branches<E: Elem>(deltas: &[&Tensor<E>]) -> peft_core::Result<Tensor<E>> {
    let axis = deltas.first().map_or(0, |t| t.rank().saturating_sub(1));
    Tensor::stack(deltas, axis)
}

/// `Σ_i ω_i ⊙ u_i` over the source axis of `u: [..., N, d]` with `omega: [N, d]` or `[N, 1]` (also the average,
/// with fixed weights), generic over the element type so gradients can be checked in f64.
///
/// # Errors
/// Shape errors.
pub fn scale_map<E: Elem>(u: &Tensor<E>, omega: &Tensor<E>) -> peft_core::Result<Tensor<E>> {
    let axis = u.rank().saturating_sub(2);
    u.mul(omega)?.sum(&[axis], false)
}

/// AdapterFusion's attention scores `⟨Q q, K u_i⟩`: `query: [..., d]`, `u: [..., N, d]` → `[..., N]`. A `None` map
/// is the identity.
///
/// # Errors
/// Shape errors.
pub fn fusion_scores<E: Elem>(
    query: &Tensor<E>,
    u: &Tensor<E>,
    q: Option<(&Tensor<E>, &Tensor<E>)>,
    k: Option<(&Tensor<E>, &Tensor<E>)>,
) -> peft_core::Result<Tensor<E>> {
    let ql = match q {
        Some((w, b)) => query.linear(w, Some(b))?,
        None => query.clone(),
    };
    let kl = match k {
        Some((w, b)) => u.linear(w, Some(b))?,
        None => u.clone(),
    };
    let axis = ql.rank();
    kl.mul(&ql.unsqueeze(axis - 1)?)?.sum(&[axis], false)
}

/// AdapterFusion's context `Σ_i p_i · V v_i` for probabilities `p: [..., N]` over values `v: [..., N, d]`.
///
/// # Errors
/// Shape errors.
pub fn fusion_context<E: Elem>(
    p: &Tensor<E>,
    v: &Tensor<E>,
    value: Option<&Tensor<E>>,
) -> peft_core::Result<Tensor<E>> {
    let vl = match value {
        Some(w) => v.linear(w, None)?,
        None => v.clone(),
    };
    let axis = p.rank();
    vl.mul(&p.unsqueeze(axis)?)?.sum(&[axis - 1], false)
}

/// The whole fusion without dropout: `h + Σ_i p_i V u_i` (or `Σ_i p_i V (u_i + h)` with `residual_before`), with
/// `p = softmax(scores / t)`; for gradient checks and the layer's evaluation path.
///
/// # Errors
/// Shape errors.
#[allow(clippy::too_many_arguments)]
pub fn fuse_map<E: Elem>(
    h: &Tensor<E>,
    query: &Tensor<E>,
    u: &Tensor<E>,
    q: Option<(&Tensor<E>, &Tensor<E>)>,
    k: Option<(&Tensor<E>, &Tensor<E>)>,
    value: Option<&Tensor<E>>,
    t: f64,
    residual_before: bool,
) -> peft_core::Result<Tensor<E>> {
    let s = fusion_scores(query, u, q, k)?;
    let p = s.mul_scalar(E::of(1.0 / t)).softmax(s.rank() - 1)?;
    fuse_tail(h, u, &p, value, residual_before)
}

fn fuse_tail<E: Elem>(
    h: &Tensor<E>,
    u: &Tensor<E>,
    p: &Tensor<E>,
    value: Option<&Tensor<E>>,
    residual_before: bool,
) -> peft_core::Result<Tensor<E>> {
    if residual_before {
        let hv = h.unsqueeze(h.rank() - 1)?;
        fusion_context(p, &u.add(&hv)?, value)
    } else {
        h.add(&fusion_context(p, u, value)?)
    }
}

/// AdapterFusion's parameters on one site.
struct FuseParams {
    q: Option<(Param, Param)>,
    k: Option<(Param, Param)>,
    v: Option<Param>,
    residual_before: bool,
    dropout: f64,
    temperature: Arc<Mutex<f64>>,
}

enum Mix {
    /// The fixed weights as an `[N, 1]` tensor, built once.
    Average(Tensor),
    Fuse(FuseParams),
    Scale {
        omega: Param,
        dropout: f64,
        owns: bool,
    },
    /// Rows per source (`BatchSplit`), or `None`: N equal blocks (`Parallel`).
    Split(Option<Vec<usize>>),
}

/// A composition block on one residual site.
pub struct CompositionLayer {
    name: String,
    sources: Vec<Arc<dyn ResidualAdapter>>,
    mix: Mix,
}

impl CompositionLayer {
    /// The source adapters, in config order.
    pub fn sources(&self) -> &[Arc<dyn ResidualAdapter>] {
        &self.sources
    }

    /// ScaLearn's `ω` on this site, if this is a ScaLearn block.
    pub fn omega(&self) -> Option<&Param> {
        match &self.mix {
            Mix::Scale { omega, .. } => Some(omega),
            _ => None,
        }
    }

    /// AdapterFusion's value map on this site, if any.
    pub fn value(&self) -> Option<&Param> {
        match &self.mix {
            Mix::Fuse(f) => f.v.as_ref(),
            _ => None,
        }
    }

    fn own_params(&self) -> Vec<(String, Param)> {
        match &self.mix {
            Mix::Average(_) => Vec::new(),
            Mix::Fuse(f) => {
                let mut v = Vec::new();
                for (k, wb) in [("query", &f.q), ("key", &f.k)] {
                    if let Some((w, b)) = wb {
                        v.push((format!("adapter_fusion_layer.{k}.weight"), w.clone()));
                        v.push((format!("adapter_fusion_layer.{k}.bias"), b.clone()));
                    }
                }
                v.extend(f.v.clone().map(|w| ("adapter_fusion_layer.value.weight".to_string(), w)));
                v
            }
            Mix::Scale { omega, owns: true, .. } => vec![("adapter_scalearn.omega".into(), omega.clone())],
            Mix::Scale { .. } | Mix::Split(_) => Vec::new(),
        }
    }

    /// `BatchSplit` / `Parallel`: each source's own forward on its rows, the rows put back in order.
    fn split(&self, h: &Tensor, x: &Tensor, sizes: Option<&[usize]>, ctx: &Ctx) -> peft_core::Result<Tensor> {
        let b = h.shape().first().copied().unwrap_or(0);
        let n = self.sources.len();
        let sizes: Vec<usize> = match sizes {
            Some(s) => s.to_vec(),
            None if b % n == 0 => vec![b / n; n],
            None => {
                return Err(peft_core::Error::arg(
                    "Parallel composition",
                    "batch size",
                    format!("{b} over {n} sources"),
                    "must be a multiple of the number of sources (repeat the batch once per source)",
                ))
            }
        };
        if sizes.iter().sum::<usize>() != b {
            return Err(peft_core::Error::Count {
                op: "BatchSplit composition",
                what: "rows (the batch size) for batch_sizes",
                expected: sizes.iter().sum::<usize>(),
                got: b,
            });
        }
        let mut parts = Vec::with_capacity(n);
        let mut at = 0;
        for (src, &k) in self.sources.iter().zip(&sizes) {
            parts.push(src.forward(&h.narrow(0, at, k)?, &x.narrow(0, at, k)?, ctx)?);
            at += k;
        }
        Tensor::concat(&parts.iter().collect::<Vec<_>>(), 0)
    }

    fn mixed(&self, h: &Tensor, branches: &[ResidualBranch], ctx: &Ctx) -> peft_core::Result<Tensor> {
        let deltas: Vec<&Tensor> = branches.iter().map(|b| &b.delta).collect();
        let u = stack_branches(&deltas)?;
        match &self.mix {
            Mix::Average(w) => h.add(&scale_map(&u, w)?),
            Mix::Scale { omega, dropout, .. } => {
                let mut om = omega.tensor();
                if ctx.train && *dropout > 0.0 {
                    om = ctx.with_rng(|rng| om.dropout(*dropout, true, rng))?;
                }
                h.add(&scale_map(&u, &om)?)
            }
            Mix::Split(_) => Err(peft_core::Error::arg(
                "composition",
                "block",
                "batch split",
                "does not mix branches (xtask bug: split blocks run through `split`)",
            )),
            Mix::Fuse(f) => {
                let query = branches.last().map_or_else(|| h.clone(), |b| b.input.clone());
                let pair = |p: &Option<(Param, Param)>| p.as_ref().map(|(w, b)| (w.tensor(), b.tensor()));
                let (q, k, v) = (pair(&f.q), pair(&f.k), f.v.as_ref().map(Param::tensor));
                let mut s =
                    fusion_scores(&query, &u, q.as_ref().map(|(w, b)| (w, b)), k.as_ref().map(|(w, b)| (w, b)))?;
                if ctx.train && f.dropout > 0.0 {
                    s = ctx.with_rng(|rng| s.dropout(f.dropout, true, rng))?;
                }
                let t = *f.temperature.lock().unwrap_or_else(|p| p.into_inner());
                let p = s.mul_scalar(1.0 / t as f32).softmax(s.rank() - 1)?;
                fuse_tail(h, &u, &p, v.as_ref(), f.residual_before)
            }
        }
    }
}

impl ResidualAdapter for CompositionLayer {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&self, h: &Tensor, x: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
        if let Mix::Split(sizes) = &self.mix {
            return self.split(h, x, sizes.as_deref(), ctx);
        }
        let branches: Vec<ResidualBranch> =
            self.sources.iter().map(|s| s.branch(h, x, ctx)).collect::<peft_core::Result<_>>()?;
        self.mixed(h, &branches, ctx)
    }
    fn params(&self) -> Vec<Param> {
        self.own_params().into_iter().map(|(_, p)| p).collect()
    }
}

impl SavedTensors for CompositionLayer {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        self.own_params()
    }
}

/// The key of a shared ScaLearn `ω` (relative to the model root).
pub const SHARED_OMEGA_KEY: &str = "scalearn.omega";

/// An injected composition block.
pub struct CompositionTuner {
    name: String,
    layers: Vec<(ResidualSite, Arc<CompositionLayer>)>,
    shared: Option<Param>,
    temperature: Option<Arc<Mutex<f64>>>,
    regularization: Option<f64>,
}

impl CompositionTuner {
    /// The sites and the block on each.
    pub fn layers(&self) -> &[(ResidualSite, Arc<CompositionLayer>)] {
        &self.layers
    }

    /// The shared `ω` of a "++" ScaLearn block.
    pub fn shared_omega(&self) -> Option<&Param> {
        self.shared.as_ref()
    }

    /// The current softmax temperature of a fusion block (1 unless `temperature` anneals it).
    pub fn temperature(&self) -> Option<f64> {
        self.temperature.as_ref().map(|t| *t.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// AdapterHub's fusion penalty `w·Σ_sites ‖I − V‖²_F` (`None` without value maps or regularisation).
    ///
    /// # Errors
    /// Shape errors.
    pub fn regularization_loss(&self) -> peft_core::Result<Option<Tensor>> {
        let Some(w) = self.regularization else { return Ok(None) };
        let mut total: Option<Tensor> = None;
        for (_, l) in &self.layers {
            if let Some(v) = l.value() {
                let d = v.shape()[0];
                let eye = Tensor::new(ArrayD::from_shape_fn(IxDyn(&[d, d]), |i| if i[0] == i[1] { 1.0 } else { 0.0 }));
                let term = eye.sub(&v.tensor())?.square().sum_all().mul_scalar(w as f32);
                total = Some(match total {
                    Some(t) => t.add(&term)?,
                    None => term,
                });
            }
        }
        Ok(total)
    }
}

impl Tuner for CompositionTuner {
    fn name(&self) -> &str {
        &self.name
    }
    fn params(&self) -> Vec<Param> {
        let mut v: Vec<Param> = self.layers.iter().flat_map(|(_, l)| l.params()).collect();
        v.extend(self.shared.clone());
        v
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        let mut v = Vec::new();
        for (site, l) in &self.layers {
            for (k, p) in l.saved_tensors() {
                v.push((format!("{}.{k}", site.path()), p));
            }
        }
        v.extend(self.shared.clone().map(|p| (SHARED_OMEGA_KEY.to_string(), p)));
        v
    }
    fn set_active(&self, on: bool) {
        for (s, _) in &self.layers {
            s.activate(&self.name, on);
        }
    }
    fn detach(&self, _keep_merged: bool) -> AdapterResult<()> {
        for (s, _) in &self.layers {
            s.detach(&self.name)?;
        }
        Ok(())
    }
    fn kind(&self) -> &str {
        COMPOSITION_TYPE
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn aux_loss(&self) -> peft_core::Result<Option<Tensor>> {
        self.regularization_loss()
    }
    fn after_step(&self, _step: usize) -> peft_core::Result<()> {
        if let Some(t) = &self.temperature {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            if *t > 1.0 {
                *t = (*t - TEMPERATURE_START / 1000.0).max(1.0);
            }
        }
        Ok(())
    }
}

/// The annealed fusion temperature's start (AdapterHub's 50; lowered by 1/1000 of it per step to 1).
pub const TEMPERATURE_START: f64 = 50.0;

fn omega_init(shape: &[usize], mean: f64, std: f64, rng: &mut impl rand::Rng) -> ArrayD<f32> {
    match Normal::new(mean, std) {
        Ok(n) if std > 0.0 => ArrayD::from_shape_fn(IxDyn(shape), |_| n.sample(rng) as f32),
        _ => ArrayD::from_elem(IxDyn(shape), mean as f32),
    }
}

/// Residual sites with the source adapters on each.
type SourceSites = Vec<(ResidualSite, Vec<Arc<dyn ResidualAdapter>>)>;

impl CompositionConfig {
    /// The residual sites carrying the sources, with the source adapters on each, in config order.
    fn source_sites(&self, model: &dyn Module) -> Result<SourceSites> {
        let mut seen = std::collections::HashSet::new();
        let mut per_site = Vec::new();
        for site in residual_sites(model).into_iter().filter(|s| seen.insert(s.path().to_string())) {
            let attached = site.adapters();
            let found: Vec<Option<Arc<dyn ResidualAdapter>>> =
                self.sources.iter().map(|n| attached.iter().find(|a| a.name() == n).cloned()).collect();
            per_site.push((site, found));
        }
        let nowhere: Vec<&str> = (0..self.sources.len())
            .filter(|&i| per_site.iter().all(|(_, f)| f[i].is_none()))
            .map(|i| self.sources[i].as_str())
            .collect();
        if !nowhere.is_empty() {
            return Err(AdaptersError::NoSites {
                method: COMPOSITION_TYPE,
                what: format!(
                    "residual site carrying the source adapters {nowhere:?} (add them before the composition; they \
                     must be residual adapters such as bottleneck adapters)"
                ),
            });
        }
        let mut out = Vec::new();
        for (site, found) in per_site {
            if found.iter().all(Option::is_none) {
                continue;
            }
            if let Some(i) = found.iter().position(Option::is_none) {
                let have: Vec<&str> =
                    self.sources.iter().zip(&found).filter(|(_, f)| f.is_some()).map(|(n, _)| n.as_str()).collect();
                return Err(AdaptersError::config(
                    COMPOSITION_TYPE,
                    "sources",
                    format!(
                        "`{}` is not on residual site `{}`, where {have:?} are: the sources must adapt the same sites",
                        self.sources[i],
                        site.path()
                    ),
                ));
            }
            out.push((site, found.into_iter().flatten().collect()));
        }
        Ok(out)
    }

    fn inject_blocks(&self, model: &dyn Module, cx: &InjectCx<'_>) -> Result<CompositionTuner> {
        self.validate()?;
        if self.sources.iter().any(|s| s == cx.name) {
            return Err(AdaptersError::config(
                COMPOSITION_TYPE,
                "sources",
                format!("the composition `{}` cannot be one of its own sources", cx.name),
            ));
        }
        let sites = self.source_sites(model)?;
        let n = self.sources.len();
        let d = stream_width(model, COMPOSITION_TYPE)?;
        let omega_shape = match self.omega {
            OmegaShape::Vector => vec![n, d],
            OmegaShape::Scalar => vec![n, 1],
        };
        let mean = self.omega_init_scale / n as f64;
        let shared = (self.composition == CompositionKind::Scalearn && self.shared_omega).then(|| {
            let mut rng = site_rng(cx.seed, cx.name, SHARED_OMEGA_KEY);
            let v = omega_init(&omega_shape, mean, self.omega_init_std, &mut rng);
            Param::new(format!("{SHARED_OMEGA_KEY}.{}", cx.name), v, true)
        });
        let temperature = (self.composition == CompositionKind::Fuse)
            .then(|| Arc::new(Mutex::new(if self.temperature { TEMPERATURE_START } else { 1.0 })));
        let mut tuner = CompositionTuner {
            name: cx.name.into(),
            layers: Vec::new(),
            shared: shared.clone(),
            temperature: temperature.clone(),
            regularization: (self.composition == CompositionKind::Fuse && self.value && self.regularization)
                .then_some(self.regularization_weight),
        };
        for (site, sources) in sites {
            let path = site.path().to_string();
            let key = |k: &str| format!("{path}.adapters.{}.{k}", cx.name);
            let mut rng = site_rng(cx.seed, cx.name, &path);
            let mix = match self.composition {
                CompositionKind::BatchSplit => Mix::Split(self.batch_sizes.clone()),
                CompositionKind::Parallel => Mix::Split(None),
                CompositionKind::Average => {
                    let w: Vec<f32> = self.average_weights().iter().map(|&v| v as f32).collect();
                    Mix::Average(Tensor::new(ArrayD::from_shape_fn(IxDyn(&[n, 1]), |i| w[i[0]])))
                }
                CompositionKind::Scalearn => match &shared {
                    Some(p) => Mix::Scale { omega: p.clone(), dropout: self.omega_dropout, owns: false },
                    None => Mix::Scale {
                        omega: Param::new(
                            key("adapter_scalearn.omega"),
                            omega_init(&omega_shape, mean, self.omega_init_std, &mut rng),
                            true,
                        ),
                        dropout: self.omega_dropout,
                        owns: true,
                    },
                },
                CompositionKind::Fuse => {
                    let mut lin = |k: &str| {
                        (
                            Param::new(
                                key(&format!("adapter_fusion_layer.{k}.weight")),
                                normal(&[d, d], 0.02, &mut rng),
                                true,
                            ),
                            Param::new(
                                key(&format!("adapter_fusion_layer.{k}.bias")),
                                ArrayD::zeros(IxDyn(&[d])),
                                true,
                            ),
                        )
                    };
                    let q = self.query.then(|| lin("query"));
                    let k = self.key.then(|| lin("key"));
                    let v = self.value.then(|| {
                        let w = if self.value_initialized {
                            ArrayD::from_shape_fn(IxDyn(&[d, d]), |i| if i[0] == i[1] { 1.0 } else { 1e-6 })
                        } else {
                            normal(&[d, d], 0.02, &mut rng)
                        };
                        Param::new(key("adapter_fusion_layer.value.weight"), w, true)
                    });
                    Mix::Fuse(FuseParams {
                        q,
                        k,
                        v,
                        residual_before: self.residual_before,
                        dropout: self.dropout_prob,
                        temperature: temperature.clone().unwrap_or_else(|| Arc::new(Mutex::new(1.0))),
                    })
                }
            };
            let layer = Arc::new(CompositionLayer { name: cx.name.into(), sources, mix });
            if let Err(e) = site.attach(layer.clone()) {
                let _ = tuner.detach(false);
                return Err(e.into());
            }
            tuner.layers.push((site, layer));
        }
        Ok(tuner)
    }
}

impl TunerConfig for CompositionConfig {
    fn peft_type(&self) -> &str {
        COMPOSITION_TYPE
    }
    fn describe(&self) -> String {
        let what = match self.composition {
            CompositionKind::Average => format!("Average w={:?}", self.average_weights()),
            CompositionKind::Fuse => format!(
                "AdapterFusion ({})",
                if self.value { "dynamic: query, key, value" } else { "static: query, key" }
            ),
            CompositionKind::Scalearn => format!(
                "ScaLearn{}{}",
                if self.omega == OmegaShape::Scalar { "Uniform" } else { "" },
                if self.shared_omega { "++" } else { "" }
            ),
            CompositionKind::BatchSplit => format!("BatchSplit {:?}", self.batch_sizes.as_deref().unwrap_or(&[])),
            CompositionKind::Parallel => "Parallel".to_string(),
        };
        format!("{what} over {}", self.sources.join(", "))
    }
    fn to_json(&self) -> AdapterResult<Value> {
        Ok(config_json(self, COMPOSITION_TYPE)?)
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
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        Ok(Box::new(self.inject_blocks(model, &cx)?))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        let sites = self.source_sites(model)?;
        let d = stream_width(model, COMPOSITION_TYPE)?;
        let n = self.sources.len();
        let omega = match self.omega {
            OmegaShape::Vector => vec![n, d],
            OmegaShape::Scalar => vec![n, 1],
        };
        if self.composition == CompositionKind::Scalearn && self.shared_omega {
            return crate::common::expect_tensor(file, SHARED_OMEGA_KEY, &omega);
        }
        for (site, _) in sites {
            let p = site.path();
            let mut want = Vec::new();
            match self.composition {
                CompositionKind::Average | CompositionKind::BatchSplit | CompositionKind::Parallel => {}
                CompositionKind::Scalearn => want.push((format!("{p}.adapter_scalearn.omega"), omega.clone())),
                CompositionKind::Fuse => {
                    for (on, k) in [(self.query, "query"), (self.key, "key")] {
                        if on {
                            want.push((format!("{p}.adapter_fusion_layer.{k}.weight"), vec![d, d]));
                            want.push((format!("{p}.adapter_fusion_layer.{k}.bias"), vec![d]));
                        }
                    }
                    if self.value {
                        want.push((format!("{p}.adapter_fusion_layer.value.weight"), vec![d, d]));
                    }
                }
            }
            for (k, shape) in want {
                crate::common::expect_tensor(file, &k, &shape)?;
            }
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

impl PeftConfig for CompositionConfig {
    const PEFT_TYPE: &'static str = COMPOSITION_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (Self, _) = parse_config(v, COMPOSITION_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "composition_tests.rs"]
mod tests;
