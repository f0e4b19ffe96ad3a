//! IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
//! Learning"; PEFT's `IA3`): a learned vector per adapted linear layer that rescales an activation.
//!
//! As PEFT's `IA3Layer` / `ia3.Linear`: on a layer listed in `feedforward_modules` the vector `l [1, in]` scales
//! the **input** (`y = W(x ⊙ l) + b`, through the linear site's input hook, no extra GEMM); on the other targets
//! (keys and values) `l [out, 1]` scales the **output** including the bias (`y = (Wx + b) ⊙ l`). `l` starts at 1
//! (`init_ia3_weights = true`, identity) or N(0, 1) (`false`, PEFT's `torch.randn`).
//!
//! Merge is exact: output-side `W' = diag(l)·W`, `b' = l ⊙ b`; input-side `W' = W·diag(l)` with the bias left
//! alone (PEFT's current `merge`). Unmerge divides by `l` exactly (PEFT divides by `l + 1e-8`), so a zero entry
//! makes it fail with a non-finite error instead of writing garbage.
//!
//! Target selection is PEFT's: `target_modules` / `exclude_modules` by name or dotted suffix (list) or full
//! regex match; a target is feed-forward when `feedforward_modules` matches it the same way (so for BERT's
//! defaults, `["key", "value", "output.dense"]` with `["output.dense"]`, `attention.output.dense` is a
//! feed-forward target too, as in PEFT). A list `feedforward_modules` must be a subset of a list
//! `target_modules` (PEFT's check).
//!
//! Files: `adapter_config.json` with PEFT's `IA3Config` keys (`peft_type = "IA3"`, `target_modules`,
//! `exclude_modules`, `feedforward_modules`, `fan_in_fan_out`, `init_ia3_weights`, `modules_to_save`,
//! `inference_mode`, `task_type`); tensors `base_model.model.<module>.ia3_l` shaped `[1, in]` / `[out, 1]`, as
//! PEFT's `get_peft_model_state_dict` writes them (adapter name removed); PEFT's bookkeeping keys kept in `extra`.
//! Checked against PEFT 0.21.2 on all-MiniLM-L6-v2 (`tests/peft_interop.rs`): a PEFT-written file gives PEFT's
//! `last_hidden_state` within 4e-6 unmerged and merged, load -> save is byte-identical, and a file written here
//! gives the same outputs in PEFT (within 7e-6). Differences: `fan_in_fan_out = true` (GPT-2's Conv1D) is refused
//! (every backbone here stores `[out, in]`); with several IA3 adapters active on one output-side layer PEFT multiplies their vectors
//! while the linear site adds their deltas (`y ⊙ (1 + Σ(lᵢ − 1))`); one active adapter (the usual case) is
//! identical.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::{
    select_linear, site_rng, AdapterResult, AdapterTensors, InjectCx, LinearTuner, ModulePattern, PeftConfig,
    SavedTensors, TargetSpec, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Param, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::common::{config_json, expect_tensor, normal, parse_config};
use crate::error::{AdaptersError, Result};

/// IA3's `peft_type`.
pub const IA3_TYPE: &str = "IA3";

fn d_peft_type() -> String {
    IA3_TYPE.into()
}
fn d_true() -> bool {
    true
}

/// PEFT's `IA3Config` as stored in `adapter_config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    /// Always `"IA3"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// `"SEQ_CLS"`, ... (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Layers to adapt.
    pub target_modules: ModulePattern,
    /// Layers never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// Targets whose input (not output) is scaled.
    #[serde(default)]
    pub feedforward_modules: Option<ModulePattern>,
    /// Weights stored `[in, out]` (GPT-2 Conv1D); must be false here.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Start the vectors at 1 (identity) instead of N(0, 1).
    #[serde(default = "d_true")]
    pub init_ia3_weights: bool,
    /// Modules trained and saved in full next to the adapter (`null` when none, as PEFT writes).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files (as PEFT writes).
    #[serde(default)]
    pub inference_mode: bool,
    /// PEFT's bookkeeping keys (`base_model_name_or_path`, `peft_version`, `revision`, `auto_mapping`, ...) and
    /// any other key the file held, kept as read so that load -> save writes them back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "task_type",
    "target_modules",
    "exclude_modules",
    "feedforward_modules",
    "fan_in_fan_out",
    "init_ia3_weights",
    "modules_to_save",
    "inference_mode",
];

impl Ia3Config {
    /// IA3 on `targets`, of which `feedforward` are scaled on the input side.
    pub fn new<S: Into<String>, F: Into<String>>(
        targets: impl IntoIterator<Item = S>,
        feedforward: impl IntoIterator<Item = F>,
    ) -> Self {
        Ia3Config {
            peft_type: d_peft_type(),
            task_type: None,
            target_modules: ModulePattern::list(targets),
            exclude_modules: None,
            feedforward_modules: Some(ModulePattern::list(feedforward)),
            fan_in_fan_out: false,
            init_ia3_weights: true,
            modules_to_save: None,
            inference_mode: false,
            extra: Map::new(),
        }
    }

    /// PEFT's defaults for BERT (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["bert"]`): keys, values and
    /// `output.dense`, the latter feed-forward.
    pub fn bert() -> Self {
        Self::new(["key", "value", "output.dense"], ["output.dense"])
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`AdaptersError::Unsupported`] for `fan_in_fan_out`; [`AdaptersError::InvalidConfig`] for feed-forward
    /// modules outside the targets.
    pub fn validate(&self) -> Result<()> {
        if self.fan_in_fan_out {
            return Err(AdaptersError::Unsupported {
                method: IA3_TYPE,
                what: "fan_in_fan_out = true".into(),
                reason: "every backbone here stores linear weights as [out, in]".into(),
            });
        }
        if let (ModulePattern::List(t), Some(ModulePattern::List(f))) =
            (&self.target_modules, &self.feedforward_modules)
        {
            if let Some(x) = f.iter().find(|x| !t.contains(x)) {
                return Err(AdaptersError::config(
                    IA3_TYPE,
                    "feedforward_modules",
                    format!("`{x}` is not in target_modules (feedforward_modules must be a subset)"),
                ));
            }
        }
        Ok(())
    }

    /// The adapted sites of `model`, each with whether it is feed-forward.
    ///
    /// # Errors
    /// [`peft_core::Error::NoTargetMatched`]; invalid regexes.
    pub fn sites(&self, model: &dyn Module) -> Result<Vec<(Linear, bool)>> {
        let spec = TargetSpec::new(&self.target_modules, self.exclude_modules.as_ref(), None, None, &[])?;
        let sites = select_linear(model, &spec)?;
        let ff = self.feedforward_modules.as_ref().map(|f| TargetSpec::new(f, None, None, None, &[])).transpose()?;
        Ok(sites
            .into_iter()
            .map(|s| {
                let is_ff = ff.as_ref().is_some_and(|f| f.matches(s.path(), false));
                (s, is_ff)
            })
            .collect())
    }
}

/// IA3 on one linear site.
pub struct Ia3Linear {
    name: String,
    l: Param,
    feedforward: bool,
    /// The base bias (a handle shared with the site), rescaled by output-side merges.
    bias: Option<Param>,
    /// Set by [`Ia3Tuner`] while merged, so [`LinearAdapter::delta_bias`] knows which way it is asked.
    merged: AtomicBool,
}

impl Ia3Linear {
    /// Adapter `name` for the site at `path` over `base`.
    pub fn new(
        path: &str,
        name: &str,
        base: &dyn LinearBase,
        feedforward: bool,
        init_ones: bool,
        rng: &mut impl rand::Rng,
    ) -> Self {
        let shape = if feedforward { [1, base.in_features()] } else { [base.out_features(), 1] };
        let v = if init_ones { ArrayD::ones(IxDyn(&shape)) } else { normal(&shape, 1.0, rng) };
        Ia3Linear {
            name: name.into(),
            l: Param::new(format!("{path}.ia3_l.{name}"), v, true),
            feedforward,
            bias: base.bias(),
            merged: AtomicBool::new(false),
        }
    }

    /// The learned vector (`[1, in]` feed-forward, `[out, 1]` otherwise).
    pub fn vector(&self) -> &Param {
        &self.l
    }

    /// Whether the input (not the output) is scaled.
    pub fn is_feedforward(&self) -> bool {
        self.feedforward
    }

    fn flat(&self) -> Vec<f32> {
        self.l.value().iter().copied().collect()
    }

    /// `W ⊙ f(l)` along the scaled axis (rows: output side, columns: input side).
    fn scaled(&self, w: &ArrayD<f32>, f: impl Fn(f32) -> f32) -> ArrayD<f32> {
        let l = self.flat();
        let axis = usize::from(self.feedforward);
        ArrayD::from_shape_fn(w.raw_dim(), |ix| w[&ix] * f(l[ix[axis]]))
    }

    fn checked(&self, a: ArrayD<f32>, what: &str) -> peft_core::Result<ArrayD<f32>> {
        if a.iter().any(|v| !v.is_finite()) {
            return Err(peft_core::Error::NonFinite {
                what: format!("IA3 {what} of `{}` (a zero in ia3_l?)", self.name),
            });
        }
        Ok(a)
    }
}

impl LinearAdapter for Ia3Linear {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        "ia3"
    }
    fn delta(
        &self,
        _x: &Tensor,
        base_out: &Tensor,
        _base: &dyn LinearBase,
        _ctx: &Ctx,
    ) -> peft_core::Result<Option<Tensor>> {
        if self.feedforward {
            return Ok(None);
        }
        // y ⊙ l = y + y ⊙ (l − 1): exactly y at l = 1.
        let l = self.l.tensor().reshape(&[self.l.numel()])?.add_scalar(-1.0);
        base_out.mul(&l).map(Some)
    }
    fn transform_input(&self, x: &Tensor, _ctx: &Ctx) -> peft_core::Result<Option<Tensor>> {
        if !self.feedforward {
            return Ok(None);
        }
        x.mul(&self.l.tensor().reshape(&[self.l.numel()])?).map(Some)
    }
    fn params(&self) -> Vec<Param> {
        vec![self.l.clone()]
    }
    fn delta_weight(&self, base: &dyn LinearBase) -> peft_core::Result<Option<ArrayD<f32>>> {
        let w = base.dense_weight()?;
        Ok(Some(self.checked(self.scaled(&w, |l| l - 1.0), "merge delta")?))
    }
    fn unmerge_delta_weight(&self, base: &dyn LinearBase) -> peft_core::Result<Option<ArrayD<f32>>> {
        // W' = W ⊙ l -> the change to take back is W' − W'/l.
        let w = base.dense_weight()?;
        Ok(Some(self.checked(self.scaled(&w, |l| 1.0 - 1.0 / l), "unmerge delta")?))
    }
    /// Output side only. Merging (not merged yet): `b ⊙ (l − 1)`; unmerging (merged): `b' ⊙ (1 − 1/l)`.
    fn delta_bias(&self) -> peft_core::Result<Option<ArrayD<f32>>> {
        let (Some(b), false) = (&self.bias, self.feedforward) else { return Ok(None) };
        let l = self.flat();
        let b = b.value().to_owned();
        let merged = self.merged.load(Ordering::SeqCst);
        let d = ArrayD::from_shape_fn(b.raw_dim(), |ix| {
            let li = l[ix[0]];
            b[&ix] * if merged { 1.0 - 1.0 / li } else { li - 1.0 }
        });
        Ok(Some(self.checked(d, "bias delta")?))
    }
}

impl SavedTensors for Ia3Linear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        vec![("ia3_l".into(), self.l.clone())]
    }
}

/// An injected IA3 adapter: [`LinearTuner`] plus the merged flags the bias rescaling reads.
pub struct Ia3Tuner {
    inner: LinearTuner<Ia3Linear>,
}

impl Ia3Tuner {
    /// The adapted sites and their IA3 layers.
    pub fn layers(&self) -> &[(Linear, Arc<Ia3Linear>)] {
        self.inner.layers()
    }

    fn set_site(&self, site: &Linear, a: &Ia3Linear, merge: bool) -> AdapterResult<()> {
        if merge {
            site.merge(self.inner.name())?;
        } else {
            site.unmerge(self.inner.name())?;
        }
        a.merged.store(merge, Ordering::SeqCst);
        Ok(())
    }
}

impl Tuner for Ia3Tuner {
    peft_core::forward_tuner!(inner => name, params, state_dict, wrapped_modules, set_active, is_merged, kind);
    fn merge(&self) -> AdapterResult<()> {
        let layers = self.inner.layers();
        for (i, (s, a)) in layers.iter().enumerate() {
            if let Err(e) = self.set_site(s, a, true) {
                // All or nothing.
                for (t, b) in &layers[..i] {
                    let _ = self.set_site(t, b, false);
                }
                return Err(e);
            }
        }
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        for (s, a) in self.inner.layers() {
            if s.is_merged(self.inner.name())? {
                self.set_site(s, a, false)?;
            }
        }
        Ok(())
    }
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        if !keep_merged {
            self.unmerge()?;
        }
        self.inner.detach(keep_merged)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl TunerConfig for Ia3Config {
    fn peft_type(&self) -> &str {
        IA3_TYPE
    }
    fn describe(&self) -> String {
        let list = |p: &ModulePattern| match p {
            ModulePattern::List(v) => v.join(","),
            ModulePattern::Regex(s) => s.clone(),
        };
        format!(
            "IA3 on {} (feed-forward: {})",
            list(&self.target_modules),
            self.feedforward_modules.as_ref().map_or("none".into(), list)
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        Ok(config_json(self, IA3_TYPE)?)
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
        self.validate()?;
        let sites = self.sites(model)?;
        let linears: Vec<Linear> = sites.iter().map(|(s, _)| s.clone()).collect();
        let inner = LinearTuner::attach(cx.name, IA3_TYPE, &linears, |s| {
            let ff = sites.iter().any(|(t, f)| *f && t.path() == s.path());
            let mut rng = site_rng(cx.seed, cx.name, s.path());
            Ok(Ia3Linear::new(s.path(), cx.name, s.base().as_ref(), ff, self.init_ia3_weights, &mut rng))
        })?;
        Ok(Box::new(Ia3Tuner { inner }))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        for (s, ff) in self.sites(model)? {
            let shape = if ff { [1, s.in_features()] } else { [s.out_features(), 1] };
            expect_tensor(file, &format!("{}.ia3_l", s.path()), &shape)?;
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

impl PeftConfig for Ia3Config {
    const PEFT_TYPE: &'static str = IA3_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (Self, _) = parse_config(v, IA3_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "ia3_tests.rs"]
mod tests;
