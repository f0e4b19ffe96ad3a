//! MoSA, Mixture of Sparse Adapters (spec §3.8, bottleneck of §1.2): one bottleneck adapter split into `N`
//! sparse experts whose masks partition the adapter's weight entries; training activates one random expert per
//! projection per forward, inference uses the experts merged into one adapter.
//!
//! **Module.** On a linear site (`y = x Wᵀ + b`) the adapter adds, in parallel,
//! `scale · up(drop(act(down(x))))` with `down: d_in → m`, `up: m → d_out` (biases on both), which is §1.2's
//! "parallel" placement. The spec's reference placement is AdaptFormer on the feed-forward block with a layer norm
//! before `down`; here the placement is the targeted linear layer's input and there is no extra layer norm (the
//! bench targets the FFN output projection). Defaults follow §3.8: bottleneck 64, GELU, dropout 0.1, scale 0.1.
//!
//! **Experts.** Every expert starts from the same weights (`down` kaiming-uniform with `a = √5`, i.e.
//! `U(±1/√d_in)`, zero biases, `up = 0`, so the model is unchanged at init). A random permutation of each
//! weight matrix's entries is cut into `N` equal-quantile chunks (sizes differ by at most one): the masks
//! `m_1..m_N`, disjoint and covering. Expert `i` only ever changes its own entries, so all experts of a matrix are
//! held in one *combined* matrix `C` (expert `i`'s values on `m_i`) next to the frozen shared init `W₀`:
//! `expert_i = W₀ + (C − W₀) ⊙ m_i`. That is `N` dense experts' worth of function at the cost of two matrices
//! and an expert-id map, and the gradient reaching `C` through expert `i` is the dense gradient times `m_i`
//! (§3.8's "gradients multiplied by the chosen expert's mask"). Biases are not split (one dense bias, §3.8).
//! `share` makes the down or up projection a single dense matrix (`SHARE`).
//!
//! **Training.** Each training-mode forward draws the down expert `a` and the up expert `b` independently and
//! uniformly from the context's generator; in evaluation the merged weights are used.
//!
//! **Merge.** [`MergeMode::Mean`] (the code's `add` mode, default): the elementwise mean of the `N` experts,
//! `W₀ + (C − W₀)/N`. [`MergeMode::Joint`]: each expert's values on its own mask, summed, divided by `N`: `C/N`.
//! [`MosaTuner::merge_experts`] replaces the experts by that one dense adapter ([`MergedBottleneck`]); the
//! unmerged evaluation forward computes the same weights, so both give the same output. A MoSA adapter cannot be
//! merged into the base weight (the bottleneck is nonlinear): [`Tuner::merge`] refuses.
//!
//! **Consistency loss.** MoSA's optional regulariser (`REG_WEIGHT = 1.0`) runs a second stochastic forward and
//! adds the symmetric KL between the two outputs ([`symmetric_kl`], §1.6); it needs two forwards of the whole
//! model, so it lives in the training loop's loss closure (`loss = task + w · symmetric_kl(y1, y2)`), not in the
//! adapter. Unconfirmed in the spec and therefore configurable here: the placement (any linear site), the merge
//! mode.
//!
//! **File layout** per site `<p>`: `<p>.mosa_down.weight` (C), `<p>.mosa_down.init` (W₀),
//! `<p>.mosa_down.expert` (expert id of each entry, F32 integers), `<p>.mosa_down.bias`, the same for
//! `mosa_up`; a shared projection stores only `.weight` and `.bias`. Loading checks every expert id.

use std::any::Any;
use std::sync::{Arc, RwLock};

use ndarray::{ArrayD, IxDyn};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::{
    select_linear, site_rng, AdapterResult, AdapterTensors, InjectCx, LinearTuner, ModulePattern, PeftConfig,
    SavedTensors, TargetSpec, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Elem, Param, Tensor};

use crate::error::{SparseError, SparseResult};
use crate::tuner::{common_config_impl, expect_shape, parse, to_json, unknown_keys};

/// The bottleneck's nonlinearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (AdaptFormer, MoSA's default).
    Gelu,
    /// ReLU.
    Relu,
    /// tanh.
    Tanh,
}

impl Activation {
    fn apply<E: Elem>(self, x: &Tensor<E>) -> Tensor<E> {
        match self {
            Activation::Gelu => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// Which projection, if any, is one dense matrix shared by all experts (MoSA's `SHARE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Share {
    /// Both projections are split into experts.
    None,
    /// The down projection is shared.
    Down,
    /// The up projection is shared.
    Up,
}

/// How the experts become one adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// The elementwise mean of the experts (MoSA's `add`).
    Mean,
    /// Each expert's values on its own mask, summed, over `N` (MoSA's `joint`).
    Joint,
}

/// MoSA's configuration (`peft_type = "MOSA"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MosaConfig {
    /// Always `"MOSA"`.
    pub peft_type: String,
    /// The linear sites adapted (PEFT's `target_modules` rules).
    pub target_modules: ModulePattern,
    /// Sites excluded.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// Bottleneck width `m`.
    pub bottleneck: usize,
    /// Number of experts `N` (1..=255).
    pub num_experts: usize,
    /// Output scale of the adapter.
    pub scaling: f64,
    /// Dropout after the activation.
    pub dropout: f64,
    /// The nonlinearity.
    pub activation: Activation,
    /// A projection shared by all experts.
    pub share: Share,
    /// How the experts are merged for inference.
    pub merge_mode: MergeMode,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

impl MosaConfig {
    /// MoSA with `num_experts` experts of bottleneck `bottleneck` on the linear sites matching `target` (a
    /// full-match regex), with §3.8's defaults otherwise.
    pub fn new(target: &str, bottleneck: usize, num_experts: usize) -> Self {
        MosaConfig {
            peft_type: Self::PEFT_TYPE.into(),
            target_modules: ModulePattern::Regex(target.into()),
            exclude_modules: None,
            bottleneck,
            num_experts,
            scaling: 0.1,
            dropout: 0.1,
            activation: Activation::Gelu,
            share: Share::None,
            merge_mode: MergeMode::Mean,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    fn check(&self) -> SparseResult<()> {
        let t = Self::PEFT_TYPE;
        if self.bottleneck == 0 {
            return Err(SparseError::config(t, "bottleneck", "must be at least 1"));
        }
        if !(1..=255).contains(&self.num_experts) {
            return Err(SparseError::config(t, "num_experts", format!("{} must lie in 1..=255", self.num_experts)));
        }
        if !self.scaling.is_finite() {
            return Err(SparseError::config(t, "scaling", format!("{} must be finite", self.scaling)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(SparseError::config(t, "dropout", format!("{} must lie in [0, 1)", self.dropout)));
        }
        Ok(())
    }

    fn sites(&self, model: &dyn Module) -> AdapterResult<Vec<Linear>> {
        let spec = TargetSpec::new(&self.target_modules, self.exclude_modules.as_ref(), None, None, &[])?;
        let sites = select_linear(model, &spec)?;
        if sites.is_empty() {
            let patterns = match &self.target_modules {
                ModulePattern::Regex(s) => vec![s.clone()],
                ModulePattern::List(v) => v.clone(),
            };
            return Err(peft_core::Error::NoTargetMatched { patterns }.into());
        }
        Ok(sites)
    }
}

/// Expert `i`'s weight: `init + (comb − init) ⊙ mask_i` (differentiable in `comb`).
///
/// # Errors
/// Shape errors.
pub fn expert_weight<E: Elem>(comb: &Tensor<E>, init: &Tensor<E>, mask: &Tensor<E>) -> peft_core::Result<Tensor<E>> {
    init.add(&comb.sub(init)?.mul(mask)?)
}

/// The merged weight of `n` experts held as `(comb, init)`: `init + (comb − init)/n` ([`MergeMode::Mean`]) or
/// `comb/n` ([`MergeMode::Joint`]).
///
/// # Errors
/// Shape errors.
pub fn merged_weight<E: Elem>(
    comb: &Tensor<E>,
    init: &Tensor<E>,
    n: usize,
    mode: MergeMode,
) -> peft_core::Result<Tensor<E>> {
    let inv = E::of(1.0 / n as f64);
    match mode {
        MergeMode::Mean => init.add(&comb.sub(init)?.mul_scalar(inv)),
        MergeMode::Joint => Ok(comb.mul_scalar(inv)),
    }
}

/// The bottleneck `scale · up(drop(act(x downᵀ + db)))ᵀ + ub` with dropout `p` (active when `train`).
///
/// # Errors
/// Shape errors.
#[allow(clippy::too_many_arguments)]
pub fn bottleneck<E: Elem>(
    x: &Tensor<E>,
    down: &Tensor<E>,
    down_b: &Tensor<E>,
    up: &Tensor<E>,
    up_b: &Tensor<E>,
    act: Activation,
    scale: f64,
    drop: Option<(f64, &Ctx)>,
) -> peft_core::Result<Tensor<E>> {
    let mut h = act.apply(&x.linear(down, Some(down_b))?);
    if let Some((p, ctx)) = drop {
        if ctx.train && p > 0.0 {
            h = ctx.with_rng(|r| h.dropout(p, true, r))?;
        }
    }
    Ok(h.linear(up, Some(up_b))?.mul_scalar(E::of(scale)))
}

/// MoSA's consistency loss between two logit tensors `[.., classes]` (§1.6): `½[KL(p‖q) + KL(q‖p)]` with
/// `p = softmax(a)`, `q = softmax(b)`, the *target* side of each term detached, summed over classes and averaged
/// over rows ("batchmean"). Its gradient is `½(p − q)/rows` for `a` and `½(q − p)/rows` for `b`.
///
/// # Errors
/// [`SparseError::ShapeMismatch`] for different shapes or scalars; shape errors.
pub fn symmetric_kl(a: &Tensor, b: &Tensor) -> SparseResult<Tensor> {
    if a.shape() != b.shape() || a.rank() == 0 {
        return Err(SparseError::ShapeMismatch {
            tensor: "symmetric_kl".into(),
            expected: a.shape().to_vec(),
            found: b.shape().to_vec(),
        });
    }
    let axis = a.rank() - 1;
    let rows = (a.len() / a.shape()[axis].max(1)).max(1);
    let (la, lb) = (a.log_softmax(axis)?, b.log_softmax(axis)?);
    // KL(target ‖ other) = Σ target · (log target − log other), the target a constant.
    let kl = |target: &Tensor, other: &Tensor| -> SparseResult<Tensor> {
        let lt = Tensor::new(target.data().to_owned());
        let pt = Tensor::new(lt.data().mapv(f32::exp));
        Ok(pt.mul(&lt.sub(other)?)?.sum_all())
    };
    let total = kl(&la, &lb)?.add(&kl(&lb, &la)?)?;
    Ok(total.mul_scalar(0.5 / rows as f32))
}

/// One projection: the combined matrix and, when split, the shared init and the expert id of every entry.
struct Proj {
    comb: Param,
    split: Option<(Param, Param)>,
}

impl Proj {
    fn mask(&self, expert: usize) -> Option<Tensor> {
        let (_, ids) = self.split.as_ref()?;
        let e = expert as f32;
        Some(Tensor::new(ids.value().mapv(|v| if v == e { 1.0 } else { 0.0 })))
    }

    fn weight(&self, n: usize, expert: Option<usize>, mode: MergeMode) -> peft_core::Result<Tensor> {
        let Some((init, _)) = &self.split else { return Ok(self.comb.tensor()) };
        let init = Tensor::new(init.value().to_owned());
        match expert.and_then(|e| self.mask(e)) {
            Some(m) => expert_weight(&self.comb.tensor(), &init, &m),
            None => merged_weight(&self.comb.tensor(), &init, n, mode),
        }
    }

    fn expert(&self, expert: usize) -> peft_core::Result<ArrayD<f32>> {
        let comb = Tensor::new(self.comb.value().to_owned());
        Ok(match (&self.split, self.mask(expert)) {
            (Some((init, _)), Some(m)) => {
                expert_weight(&comb, &Tensor::new(init.value().to_owned()), &m)?.data().to_owned()
            }
            _ => comb.data().to_owned(),
        })
    }
}

/// The experts of one site merged into one ordinary bottleneck adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct MergedBottleneck {
    /// `[m, d_in]`.
    pub down: ArrayD<f32>,
    /// `[m]`.
    pub down_bias: ArrayD<f32>,
    /// `[d_out, m]`.
    pub up: ArrayD<f32>,
    /// `[d_out]`.
    pub up_bias: ArrayD<f32>,
}

/// MoSA on one linear site.
pub struct MosaLinear {
    name: String,
    n: usize,
    scale: f64,
    dropout: f64,
    act: Activation,
    mode: MergeMode,
    down: Proj,
    up: Proj,
    down_b: Param,
    up_b: Param,
    merged: RwLock<Option<Arc<MergedBottleneck>>>,
}

/// Expert ids of a `rows × cols` matrix: a random permutation of the entries cut into `n` equal-quantile chunks.
fn partition(numel: usize, n: usize, rng: &mut impl Rng) -> Vec<f32> {
    let mut perm: Vec<usize> = (0..numel).collect();
    perm.shuffle(rng);
    let mut ids = vec![0.0f32; numel];
    for (p, &entry) in perm.iter().enumerate() {
        ids[entry] = (p * n / numel) as f32;
    }
    ids
}

fn arr(shape: &[usize], v: Vec<f32>) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(shape), v).expect("peft-rs bug: shape and length agree")
}

impl MosaLinear {
    fn new(path: &str, site: &Linear, name: &str, cfg: &MosaConfig, seed: u64) -> SparseResult<Self> {
        let (din, dout, m, n) = (site.in_features(), site.out_features(), cfg.bottleneck, cfg.num_experts);
        for (what, numel) in [("down", m * din), ("up", dout * m)] {
            if numel < n {
                return Err(SparseError::config(
                    MosaConfig::PEFT_TYPE,
                    "num_experts",
                    format!("{n} experts cannot partition the {numel} entries of `{path}`'s {what} projection"),
                ));
            }
        }
        let mut rng = site_rng(seed, name, path);
        let bound = 1.0 / (din as f32).sqrt();
        let down0: Vec<f32> = (0..m * din).map(|_| rng.gen_range(-bound..=bound)).collect();
        let pname = |s: &str| format!("{path}.mosa_{s}.{name}");
        let proj = |which: &str, shape: [usize; 2], init: Vec<f32>, shared: bool, rng: &mut rand::rngs::StdRng| {
            let comb = Param::new(pname(&format!("{which}.weight")), arr(&shape, init.clone()), true);
            let split = (!shared && n > 1).then(|| {
                let ids = partition(shape[0] * shape[1], n, rng);
                (
                    Param::new(pname(&format!("{which}.init")), arr(&shape, init), false),
                    Param::new(pname(&format!("{which}.expert")), arr(&shape, ids), false),
                )
            });
            Proj { comb, split }
        };
        let down = proj("down", [m, din], down0, cfg.share == Share::Down, &mut rng);
        let up = proj("up", [dout, m], vec![0.0; dout * m], cfg.share == Share::Up, &mut rng);
        Ok(MosaLinear {
            name: name.into(),
            n,
            scale: cfg.scaling,
            dropout: cfg.dropout,
            act: cfg.activation,
            mode: cfg.merge_mode,
            down,
            up,
            down_b: Param::new(pname("down.bias"), ArrayD::zeros(IxDyn(&[m])), true),
            up_b: Param::new(pname("up.bias"), ArrayD::zeros(IxDyn(&[dout])), true),
            merged: RwLock::new(None),
        })
    }

    /// Number of experts.
    pub fn num_experts(&self) -> usize {
        self.n
    }

    /// The expert-id maps of the split projections (`[m, d_in]` down, `[d_out, m]` up); `None` for a shared one.
    pub fn expert_ids(&self) -> (Option<ArrayD<f32>>, Option<ArrayD<f32>>) {
        let ids = |p: &Proj| p.split.as_ref().map(|(_, i)| i.value().to_owned());
        (ids(&self.down), ids(&self.up))
    }

    /// Expert `i`'s full `(down, up)` weights (a shared projection's matrix for a shared projection).
    ///
    /// # Errors
    /// Shape errors.
    pub fn expert(&self, i: usize) -> peft_core::Result<(ArrayD<f32>, ArrayD<f32>)> {
        Ok((self.down.expert(i)?, self.up.expert(i)?))
    }

    /// The experts merged into one adapter (by the config's [`MergeMode`]).
    ///
    /// # Errors
    /// Shape errors.
    pub fn merged_weights(&self) -> peft_core::Result<MergedBottleneck> {
        let w = |p: &Proj| -> peft_core::Result<ArrayD<f32>> {
            peft_core::autograd::no_grad(|| Ok(p.weight(self.n, None, self.mode)?.data().to_owned()))
        };
        Ok(MergedBottleneck {
            down: w(&self.down)?,
            down_bias: self.down_b.value().to_owned(),
            up: w(&self.up)?,
            up_bias: self.up_b.value().to_owned(),
        })
    }

    /// True after [`MosaTuner::merge_experts`].
    pub fn is_experts_merged(&self) -> bool {
        self.merged.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn set_merged(&self, m: Option<MergedBottleneck>) {
        *self.merged.write().unwrap_or_else(|p| p.into_inner()) = m.map(Arc::new);
    }
}

impl LinearAdapter for MosaLinear {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "mosa"
    }
    fn delta(
        &self,
        x: &Tensor,
        _base_out: &Tensor,
        _base: &dyn LinearBase,
        ctx: &Ctx,
    ) -> peft_core::Result<Option<Tensor>> {
        let merged = self.merged.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(mb) = merged {
            let t = |a: &ArrayD<f32>| Tensor::new(a.clone());
            let y = bottleneck(
                x,
                &t(&mb.down),
                &t(&mb.down_bias),
                &t(&mb.up),
                &t(&mb.up_bias),
                self.act,
                self.scale,
                Some((self.dropout, ctx)),
            )?;
            return Ok(Some(y));
        }
        let (a, b) = if ctx.train && self.n > 1 {
            ctx.with_rng(|r| (Some(r.gen_range(0..self.n)), Some(r.gen_range(0..self.n))))
        } else {
            (None, None)
        };
        let down = self.down.weight(self.n, a, self.mode)?;
        let up = self.up.weight(self.n, b, self.mode)?;
        let y = bottleneck(
            x,
            &down,
            &self.down_b.tensor(),
            &up,
            &self.up_b.tensor(),
            self.act,
            self.scale,
            Some((self.dropout, ctx)),
        )?;
        Ok(Some(y))
    }
    fn params(&self) -> Vec<Param> {
        vec![self.down.comb.clone(), self.down_b.clone(), self.up.comb.clone(), self.up_b.clone()]
    }
    fn delta_weight(&self, _base: &dyn LinearBase) -> peft_core::Result<Option<ArrayD<f32>>> {
        Ok(None)
    }
}

impl SavedTensors for MosaLinear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        let mut v = Vec::new();
        for (which, p, b) in [("down", &self.down, &self.down_b), ("up", &self.up, &self.up_b)] {
            v.push((format!("mosa_{which}.weight"), p.comb.clone()));
            if let Some((init, ids)) = &p.split {
                v.push((format!("mosa_{which}.init"), init.clone()));
                v.push((format!("mosa_{which}.expert"), ids.clone()));
            }
            v.push((format!("mosa_{which}.bias"), b.clone()));
        }
        v
    }
}

/// Checks an expert-id map: every entry an integer in `0..n`.
///
/// # Errors
/// [`SparseError::BadExpertId`] for the first entry that is not.
pub fn check_expert_ids(tensor: &str, ids: &ArrayD<f32>, n: usize) -> SparseResult<()> {
    for (position, &v) in ids.iter().enumerate() {
        if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0 && (v as usize) < n) {
            return Err(SparseError::BadExpertId { tensor: tensor.into(), value: f64::from(v), position, experts: n });
        }
    }
    Ok(())
}

/// An injected MoSA adapter.
pub struct MosaTuner {
    inner: LinearTuner<MosaLinear>,
}

impl MosaTuner {
    /// The adapted sites and their layers.
    pub fn layers(&self) -> &[(Linear, Arc<MosaLinear>)] {
        self.inner.layers()
    }

    /// Replaces every site's experts by their merge (one dense bottleneck adapter per site, frozen): the
    /// inference form. The expert tensors stay (saving still writes them); [`MosaTuner::unmerge_experts`] goes
    /// back to the experts.
    ///
    /// # Errors
    /// Shape errors.
    pub fn merge_experts(&self) -> peft_core::Result<Vec<(String, MergedBottleneck)>> {
        let mut out = Vec::new();
        for (s, l) in self.layers() {
            out.push((s.path().to_string(), l.merged_weights()?));
        }
        for ((_, l), (_, m)) in self.layers().iter().zip(&out) {
            l.set_merged(Some(m.clone()));
        }
        Ok(out)
    }

    /// Goes back from [`MosaTuner::merge_experts`] to the experts.
    pub fn unmerge_experts(&self) {
        for (_, l) in self.layers() {
            l.set_merged(None);
        }
    }
}

impl Tuner for MosaTuner {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn params(&self) -> Vec<Param> {
        self.inner.params()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        self.inner.state_dict()
    }
    fn wrapped_modules(&self) -> Vec<String> {
        self.inner.wrapped_modules()
    }
    fn load_state_dict(&self, src: &AdapterTensors) -> AdapterResult<()> {
        // Check every expert map before writing anything.
        for (s, l) in self.layers() {
            for (which, p) in [("down", &l.down), ("up", &l.up)] {
                if let Some((_, ids)) = &p.split {
                    let key = format!("{}.mosa_{which}.expert", s.path());
                    let v = src.get(&key, &ids.shape())?;
                    check_expert_ids(&key, &v, l.n)?;
                }
            }
        }
        self.inner.load_state_dict(src)
    }
    fn set_active(&self, on: bool) {
        self.inner.set_active(on);
    }
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        self.inner.detach(keep_merged)
    }
    fn kind(&self) -> &str {
        self.inner.kind()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl TunerConfig for MosaConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        format!(
            "MoSA {} experts, bottleneck {} ({:?} merge, share {:?})",
            self.num_experts, self.bottleneck, self.merge_mode, self.share
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        to_json(self, Self::PEFT_TYPE)
    }
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.check()?;
        let sites = self.sites(model)?;
        let inner = LinearTuner::attach(cx.name, Self::PEFT_TYPE, &sites, |s| {
            Ok(MosaLinear::new(s.path(), s, cx.name, self, cx.seed)?)
        })?;
        Ok(Box::new(MosaTuner { inner }))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.check()?;
        let m = self.bottleneck;
        for s in self.sites(model)? {
            let (p, din, dout) = (s.path(), s.in_features(), s.out_features());
            for (which, shape, shared) in
                [("down", [m, din], self.share == Share::Down), ("up", [dout, m], self.share == Share::Up)]
            {
                expect_shape(file, &format!("{p}.mosa_{which}.weight"), &shape)?;
                expect_shape(file, &format!("{p}.mosa_{which}.bias"), &shape[..1])?;
                if !shared && self.num_experts > 1 {
                    expect_shape(file, &format!("{p}.mosa_{which}.init"), &shape)?;
                    expect_shape(file, &format!("{p}.mosa_{which}.expert"), &shape)?;
                }
            }
        }
        Ok(())
    }
    common_config_impl!();
}

impl PeftConfig for MosaConfig {
    const PEFT_TYPE: &'static str = "MOSA";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let known = [
            "peft_type",
            "target_modules",
            "exclude_modules",
            "bottleneck",
            "num_experts",
            "scaling",
            "dropout",
            "activation",
            "share",
            "merge_mode",
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
#[path = "mosa_tests.rs"]
mod tests;
