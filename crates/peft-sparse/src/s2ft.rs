//! S²FT, structured sparse fine-tuning (spec §3.3): a few attention heads and feed-forward channels, selected
//! globally across layers, each trained as a dense sub-block of its weight.
//!
//! - **Groups.** `value` (the value projection: a head is a block of `head_dim` *output rows*), `attn_output`
//!   (the attention output projection: a head is a block of `head_dim` *input columns*), `up` (the FFN
//!   up-projection: a channel is an output row) and `down` (the FFN down-projection: a channel is an input
//!   column). Each group has a ratio; `⌊ratio · pool⌋` units are drawn uniformly without replacement from the
//!   pool of all the group's units across layers (heads: `num_heads` per site; channels: the site's rows or
//!   columns), which is the script's random selection. A group without a pattern or with ratio 0 is unused.
//! - **Blocks** (zero at init, so the model starts as the base): on an output-row site, `s2 ∈ R^{|rows|×d_in}`
//!   and `y[:, rows] += x s2ᵀ` (`S2ColumnLinear`); on an input-column site, `s2 ∈ R^{d_out×|cols|}` and
//!   `y += x[:, cols] s2ᵀ` (`S2RowLinear`). Only `s2` gets a gradient (the partial backprop: no `dW`).
//! - **Merge** ("fuse"): `W[rows, :] += s2` / `W[:, cols] += s2`; unmerge subtracts.
//!
//! The authors co-permute heads/channels so the selected rows/columns become contiguous ranges (a kernel
//! optimisation; the permutation leaves the function unchanged). Here the blocks address the selected rows or
//! columns through index lists instead, which computes the same function without touching the base weights,
//! so no permutation is applied (and none is needed to load an adapter on an unpermuted model);
//! [`co_permutation`] gives the authors' unit order, for laying an adapter out as their code does.
//!
//! The selection is recorded in the saved `adapter_config.json` (`selected`: site path → sorted unit indices),
//! so loading rebuilds exactly the trained blocks; a config with `selected` set uses it instead of sampling.
//! Choices where the spec is silent: units are drawn from a generator seeded by the adapter seed, groups in the
//! order value, attn_output, up, down; a site matched by two groups is a config error.
//!
//! **File layout**: `<site>.s2.weight` per adapted site.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::{
    select_linear, AdapterError, AdapterResult, AdapterTensors, InjectCx, LinearTuner, ModulePattern, PeftConfig,
    SavedTensors, TargetSpec, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Elem, Param, Tensor};

use crate::error::{SparseError, SparseResult};
use crate::tuner::{common_config_impl, expect_shape, parse, to_json, unknown_keys};

/// Whether a block adds to selected output rows or reads selected input columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// `y[:, rows] += x s2ᵀ` (value and up projections).
    Rows,
    /// `y += x[:, cols] s2ᵀ` (attention output and down projections).
    Cols,
}

/// The selection matrix `[n, len(idx)]` with a 1 at `(idx[j], j)`.
fn selector<E: Elem>(n: usize, idx: &[usize]) -> Tensor<E> {
    let mut a = ArrayD::<E>::zeros(IxDyn(&[n, idx.len()]));
    for (j, &i) in idx.iter().enumerate() {
        a[[i, j]] = E::one();
    }
    Tensor::new(a)
}

/// The block's output term for input `x [.., d_in]`: `Rows`: `x s2ᵀ` scattered into the `idx` columns of a
/// `[.., d_out]` output; `Cols`: `x[:, idx] s2ᵀ`. Differentiable in `x` and `s2`.
///
/// # Errors
/// Shape errors.
pub fn block_delta<E: Elem>(
    x: &Tensor<E>,
    s2: &Tensor<E>,
    kind: BlockKind,
    idx: &[usize],
    d_in: usize,
    d_out: usize,
) -> peft_core::Result<Tensor<E>> {
    match kind {
        BlockKind::Rows => x.linear(s2, None)?.linear(&selector(d_out, idx), None),
        BlockKind::Cols => {
            let gather = selector::<E>(d_in, idx).transpose(0, 1)?;
            x.linear(&gather, None)?.linear(s2, None)
        }
    }
}

/// The authors' co-permutation order of one layer's units (heads or channels): `[only_a, a∩b, only_b, rest]`,
/// each part in increasing order, where `a` is the unit set of the output-row block (value / up) and `b` that of
/// the input-column block (attention output / down). Permuting the row-block weight's unit blocks of rows and the
/// column-block weight's unit blocks of columns by this order leaves the layer's function unchanged, and puts
/// `a`'s units at positions `[0, |only_a| + |a∩b|)` and `b`'s at `[|only_a|, |only_a| + |a∩b| + |only_b|)`
/// (§3.3's contiguous ranges). Not needed here (blocks address their rows and columns by index); provided to lay an
/// adapter out as the authors' code does.
pub fn co_permutation(a: &[usize], b: &[usize], n: usize) -> Vec<usize> {
    let ina = |u: &usize| a.contains(u);
    let inb = |u: &usize| b.contains(u);
    let all: Vec<usize> = (0..n).collect();
    let part = |f: &dyn Fn(&usize) -> bool| all.iter().copied().filter(|u| f(u)).collect::<Vec<_>>();
    let mut out = part(&|u| ina(u) && !inb(u));
    out.extend(part(&|u| ina(u) && inb(u)));
    out.extend(part(&|u| !ina(u) && inb(u)));
    out.extend(part(&|u| !ina(u) && !inb(u)));
    out
}

/// S²FT on one linear site.
pub struct S2Linear {
    name: String,
    kind: BlockKind,
    /// Selected units (heads or channels), sorted.
    units: Vec<usize>,
    /// The rows or columns they cover, sorted.
    idx: Vec<usize>,
    d_in: usize,
    d_out: usize,
    s2: Param,
}

impl S2Linear {
    /// The block kind.
    pub fn kind(&self) -> BlockKind {
        self.kind
    }
    /// The selected heads or channels.
    pub fn units(&self) -> &[usize] {
        &self.units
    }
    /// The rows (`Rows`) or columns (`Cols`) the block covers.
    pub fn covered(&self) -> &[usize] {
        &self.idx
    }
    /// The trainable block.
    pub fn block(&self) -> &Param {
        &self.s2
    }
}

impl LinearAdapter for S2Linear {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "s2ft"
    }
    fn delta(
        &self,
        x: &Tensor,
        _base_out: &Tensor,
        _b: &dyn LinearBase,
        _ctx: &Ctx,
    ) -> peft_core::Result<Option<Tensor>> {
        block_delta(x, &self.s2.tensor(), self.kind, &self.idx, self.d_in, self.d_out).map(Some)
    }
    fn params(&self) -> Vec<Param> {
        vec![self.s2.clone()]
    }
    fn delta_weight(&self, _base: &dyn LinearBase) -> peft_core::Result<Option<ArrayD<f32>>> {
        let s2 = self.s2.value();
        let mut dw = ArrayD::<f32>::zeros(IxDyn(&[self.d_out, self.d_in]));
        for (j, &i) in self.idx.iter().enumerate() {
            for c in 0..(if self.kind == BlockKind::Rows { self.d_in } else { self.d_out }) {
                match self.kind {
                    BlockKind::Rows => dw[[i, c]] = s2[[j, c]],
                    BlockKind::Cols => dw[[c, i]] = s2[[c, j]],
                }
            }
        }
        Ok(Some(dw))
    }
}

impl SavedTensors for S2Linear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        vec![("s2.weight".into(), self.s2.clone())]
    }
}

/// One matched site of a group.
struct PlanSite {
    site: Linear,
    kind: BlockKind,
    /// Heads or channels on the site.
    units: usize,
    /// Rows or columns per unit.
    size: usize,
    ratio: f64,
    group: usize,
}

/// S²FT's configuration (`peft_type = "S2FT"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct S2ftConfig {
    /// Always `"S2FT"`.
    pub peft_type: String,
    /// Value projections (heads as output-row blocks).
    #[serde(default)]
    pub value_modules: Option<ModulePattern>,
    /// Attention output projections (heads as input-column blocks).
    #[serde(default)]
    pub attn_output_modules: Option<ModulePattern>,
    /// FFN up-projections (channels as output rows).
    #[serde(default)]
    pub up_modules: Option<ModulePattern>,
    /// FFN down-projections (channels as input columns).
    #[serde(default)]
    pub down_modules: Option<ModulePattern>,
    /// Attention heads per layer.
    pub num_heads: usize,
    /// Fraction of all value heads selected.
    pub v_ratio: f64,
    /// Fraction of all attention-output heads selected.
    pub o_ratio: f64,
    /// Fraction of all up-projection channels selected.
    pub u_ratio: f64,
    /// Fraction of all down-projection channels selected.
    pub d_ratio: f64,
    /// The selection (site path → sorted head or channel indices); filled when the adapter is created.
    #[serde(default)]
    pub selected: Option<BTreeMap<String, Vec<usize>>>,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

/// The regexes of a BERT-style encoder's four S²FT groups: value, attention output, intermediate (up) and
/// output (down) projections, under BERT's names (`attention.self.value`, `intermediate.dense`, `output.dense`)
/// and DINOv2's (`attention.attention.value`, `mlp.fc1`, `mlp.fc2`).
pub const BERT_GROUPS: [&str; 4] = [
    r".*encoder\.layer\.\d+\.attention\.(?:self|attention)\.value",
    r".*encoder\.layer\.\d+\.attention\.output\.dense",
    r".*encoder\.layer\.\d+\.(?:intermediate\.dense|mlp\.fc1)",
    r".*encoder\.layer\.\d+\.(?:output\.dense|mlp\.fc2)",
];

impl S2ftConfig {
    /// The recipe of §3.3 (`o_ratio = 0.052`, `d_ratio = 0.02`, `v = u = 0`) on a BERT-style encoder (BERT or
    /// DINOv2 names, [`BERT_GROUPS`]) with `num_heads` heads per layer.
    pub fn bert(num_heads: usize) -> Self {
        let p = |s: &str| Some(ModulePattern::Regex(s.into()));
        S2ftConfig {
            peft_type: Self::PEFT_TYPE.into(),
            value_modules: p(BERT_GROUPS[0]),
            attn_output_modules: p(BERT_GROUPS[1]),
            up_modules: p(BERT_GROUPS[2]),
            down_modules: p(BERT_GROUPS[3]),
            num_heads,
            v_ratio: 0.0,
            o_ratio: 0.052,
            u_ratio: 0.0,
            d_ratio: 0.02,
            selected: None,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    fn check(&self) -> SparseResult<()> {
        let t = Self::PEFT_TYPE;
        if self.num_heads == 0 {
            return Err(SparseError::config(t, "num_heads", "must be at least 1"));
        }
        for (f, r) in
            [("v_ratio", self.v_ratio), ("o_ratio", self.o_ratio), ("u_ratio", self.u_ratio), ("d_ratio", self.d_ratio)]
        {
            if !(0.0..=1.0).contains(&r) {
                return Err(SparseError::config(t, f, format!("{r} must lie in [0, 1]")));
            }
        }
        Ok(())
    }

    /// The groups: `(field, pattern, kind, heads?, ratio)`.
    fn groups(&self) -> [(&'static str, Option<&ModulePattern>, BlockKind, bool, f64); 4] {
        [
            ("value_modules", self.value_modules.as_ref(), BlockKind::Rows, true, self.v_ratio),
            ("attn_output_modules", self.attn_output_modules.as_ref(), BlockKind::Cols, true, self.o_ratio),
            ("up_modules", self.up_modules.as_ref(), BlockKind::Rows, false, self.u_ratio),
            ("down_modules", self.down_modules.as_ref(), BlockKind::Cols, false, self.d_ratio),
        ]
    }

    /// Every matched site with its group's kind and unit size, checked for overlaps and head divisibility.
    fn plan(&self, model: &dyn Module) -> AdapterResult<Vec<PlanSite>> {
        let t = Self::PEFT_TYPE;
        let mut out: Vec<PlanSite> = Vec::new();
        for (g, (field, pat, kind, heads, ratio)) in self.groups().into_iter().enumerate() {
            // A group with ratio 0 selects nothing: its pattern need not match (a model without that layer).
            let Some(pat) = pat.filter(|_| ratio > 0.0) else { continue };
            let spec = TargetSpec::new(pat, None, None, None, &self.modules_to_save())?;
            for s in select_linear(model, &spec)? {
                if out.iter().any(|o| o.site.path() == s.path()) {
                    return Err(SparseError::config(t, field, format!("`{}` is in two groups", s.path())).into());
                }
                let dim = if kind == BlockKind::Rows { s.out_features() } else { s.in_features() };
                let (units, size) = if heads {
                    if dim % self.num_heads != 0 {
                        return Err(SparseError::config(
                            t,
                            "num_heads",
                            format!("{} heads do not divide `{}`'s {dim} features", self.num_heads, s.path()),
                        )
                        .into());
                    }
                    (self.num_heads, dim / self.num_heads)
                } else {
                    (dim, 1)
                };
                out.push(PlanSite { site: s, kind, units, size, ratio, group: g });
            }
        }
        Ok(out)
    }

    /// The selected units per site: the recorded `selected`, or a global random draw per group.
    fn select(&self, plan: &[PlanSite], seed: u64) -> SparseResult<BTreeMap<String, Vec<usize>>> {
        let t = Self::PEFT_TYPE;
        if let Some(sel) = &self.selected {
            for (path, units) in sel {
                let Some(n) = plan.iter().find(|p| p.site.path() == path).map(|p| &p.units) else {
                    return Err(SparseError::config(t, "selected", format!("`{path}` is in no group")));
                };
                if units.windows(2).any(|w| w[1] <= w[0]) || units.last().is_some_and(|&u| u >= *n) {
                    return Err(SparseError::config(
                        t,
                        "selected",
                        format!("`{path}`: units must be strictly increasing and below {n}"),
                    ));
                }
            }
            return Ok(sel.clone());
        }
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5332_4654);
        let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for g in 0..4 {
            let sites: Vec<&PlanSite> = plan.iter().filter(|p| p.group == g).collect();
            let Some(ratio) = sites.first().map(|p| p.ratio) else { continue };
            let pool: usize = sites.iter().map(|p| p.units).sum();
            let count = (ratio * pool as f64).floor() as usize;
            if count == 0 {
                continue;
            }
            let mut offsets = Vec::new();
            let mut o = 0usize;
            for p in &sites {
                offsets.push(o);
                o += p.units;
            }
            for flat in rand::seq::index::sample(&mut rng, pool, count).into_iter() {
                let s = offsets.partition_point(|&off| off <= flat) - 1;
                out.entry(sites[s].site.path().to_string()).or_default().push(flat - offsets[s]);
            }
        }
        for v in out.values_mut() {
            v.sort_unstable();
        }
        if out.is_empty() {
            return Err(SparseError::config(t, "ratios", "the ratios select no head and no channel"));
        }
        Ok(out)
    }
}

/// An injected S²FT adapter.
pub struct S2ftTuner {
    inner: LinearTuner<S2Linear>,
}

impl S2ftTuner {
    /// The adapted sites and their blocks.
    pub fn layers(&self) -> &[(Linear, Arc<S2Linear>)] {
        self.inner.layers()
    }
}

impl Tuner for S2ftTuner {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn params(&self) -> Vec<Param> {
        self.inner.params()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        self.inner.state_dict()
    }
    fn saved_config(&self) -> Option<Box<dyn TunerConfig>> {
        self.inner.saved_config()
    }
    fn wrapped_modules(&self) -> Vec<String> {
        self.inner.wrapped_modules()
    }
    fn load_state_dict(&self, src: &AdapterTensors) -> AdapterResult<()> {
        self.inner.load_state_dict(src)
    }
    fn set_active(&self, on: bool) {
        self.inner.set_active(on);
    }
    fn merge(&self) -> AdapterResult<()> {
        self.inner.merge()
    }
    fn unmerge(&self) -> AdapterResult<()> {
        self.inner.unmerge()
    }
    fn is_merged(&self) -> bool {
        self.inner.is_merged()
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

impl TunerConfig for S2ftConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        format!("S2FT heads v {} o {}, channels u {} d {}", self.v_ratio, self.o_ratio, self.u_ratio, self.d_ratio)
    }
    fn to_json(&self) -> AdapterResult<Value> {
        to_json(self, Self::PEFT_TYPE)
    }
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.check()?;
        let plan = self.plan(model)?;
        let selected = self.select(&plan, cx.seed)?;
        let sites: Vec<Linear> =
            plan.iter().filter(|p| selected.contains_key(p.site.path())).map(|p| p.site.clone()).collect();
        let inner = LinearTuner::attach(cx.name, Self::PEFT_TYPE, &sites, |s| {
            let PlanSite { kind, size, .. } = plan.iter().find(|p| p.site.path() == s.path()).ok_or_else(|| {
                AdapterError::config(Self::PEFT_TYPE, "selected", format!("`{}` is in no group", s.path()))
            })?;
            let units = selected.get(s.path()).cloned().unwrap_or_default();
            let idx: Vec<usize> = units.iter().flat_map(|&u| u * size..(u + 1) * size).collect();
            let (d_in, d_out) = (s.in_features(), s.out_features());
            let shape = if *kind == BlockKind::Rows { [idx.len(), d_in] } else { [d_out, idx.len()] };
            Ok(S2Linear {
                name: cx.name.into(),
                kind: *kind,
                units,
                idx,
                d_in,
                d_out,
                s2: Param::new(format!("{}.s2.{}", s.path(), cx.name), ArrayD::zeros(IxDyn(&shape)), true),
            })
        })?;
        let mut saved = self.clone();
        saved.selected = Some(selected);
        Ok(Box::new(S2ftTuner { inner: inner.with_saved_config(Box::new(saved)) }))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.check()?;
        let Some(sel) = &self.selected else {
            return Err(
                SparseError::config(Self::PEFT_TYPE, "selected", "a saved S2FT adapter records its selection").into()
            );
        };
        let plan = self.plan(model)?;
        self.select(&plan, 0)?;
        for PlanSite { site: s, kind, size, .. } in &plan {
            let Some(units) = sel.get(s.path()) else { continue };
            let n = units.len() * size;
            let want = if *kind == BlockKind::Rows { vec![n, s.in_features()] } else { vec![s.out_features(), n] };
            expect_shape(file, &format!("{}.s2.weight", s.path()), &want)?;
        }
        Ok(())
    }
    common_config_impl!();
}

impl PeftConfig for S2ftConfig {
    const PEFT_TYPE: &'static str = "S2FT";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let known = [
            "peft_type",
            "value_modules",
            "attn_output_modules",
            "up_modules",
            "down_modules",
            "num_heads",
            "v_ratio",
            "o_ratio",
            "u_ratio",
            "d_ratio",
            "selected",
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
#[path = "s2ft_tests.rs"]
mod tests;
