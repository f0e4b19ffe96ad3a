//! Hydra (Kim et al., 2024; extremebird/Hydra): a parallel and a sequential low-rank branch on one linear site.
//!
//! For a site `h = W₀x + b₀` the adapter gives `y = h + s·B_p A_p x + s·B_s A_s h` with `A_p [r_p, in]`,
//! `B_p [out, r_p]`, `A_s [r_s, out]`, `B_s [out, r_s]` (the NLU code: no branch biases). Init: `A_p`, `A_s`
//! Kaiming-uniform, `B_p = B_s = 0`, so the adapted site is the base site at init. The map is linear in `x`, so
//! it merges exactly: `W' = W₀ + s·B_pA_p + s·B_sA_sW₀`, `b' = b₀ + s·B_sA_s b₀`.
//!
//! Merging goes through [`HydraTuner`] (what [`peft_core::adapter::PeftModel::merge_adapter`] calls): the deltas
//! are computed without touching the base ([`HydraLinear::delta_weight`] and [`HydraLinear::delta_bias`] are
//! pure), the site writes weight and bias only once both are known to be finite, and the tuner records the
//! original bias of each merged site so an unmerge restores it exactly.
//!
//! Files: the LoRA layout with `peft_type = "HYDRA"`; the parallel branch is saved as `lora_A.weight` /
//! `lora_B.weight`, the sequential one as `hydra_seq_A.weight` / `hydra_seq_B.weight`.

use std::any::Any;
use std::sync::{Arc, Mutex};

use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};
use peft_core::adapter::{
    select_linear, site_rng, AdapterError, AdapterResult, AdapterTensors, InjectCx, LinearTuner, ModulePattern,
    PeftConfig, SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Error, Param, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::structured::{config_json, expect_tensor, kaiming, m2, parse_config, target_spec};

/// Hydra's `peft_type`.
pub const HYDRA_TYPE: &str = "HYDRA";

fn d_peft_type() -> String {
    HYDRA_TYPE.into()
}

/// Hydra's config (`adapter_config.json`, LoRA-style keys plus `sequential_r`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HydraConfig {
    /// Always `"HYDRA"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// Rank `r_p` of the parallel branch (NLU recipe: 4).
    pub r: usize,
    /// Rank `r_s` of the sequential branch (NLU recipe: 8).
    pub sequential_r: usize,
    /// Scaling `s` applied to both branches (the authors' `scale`; 1.0 in the NLU code).
    pub scale: f64,
    /// Sites to adapt (NLU recipe: the FFN output dense, `output.dense`).
    pub target_modules: ModulePattern,
    /// Sites never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// `"SEQ_CLS"`, ... (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Modules trained and saved in full next to the adapter (PEFT's `modules_to_save`; written only when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files (as PEFT writes).
    #[serde(default)]
    pub inference_mode: bool,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "r",
    "sequential_r",
    "scale",
    "target_modules",
    "exclude_modules",
    "task_type",
    "modules_to_save",
    "inference_mode",
];

impl HydraConfig {
    /// Ranks `r_p`, `r_s`, scale 1 on `targets`.
    pub fn new<S: Into<String>>(r: usize, sequential_r: usize, targets: impl IntoIterator<Item = S>) -> Self {
        HydraConfig {
            peft_type: d_peft_type(),
            r,
            sequential_r,
            scale: 1.0,
            target_modules: ModulePattern::list(targets),
            exclude_modules: None,
            task_type: None,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// Checks ranks and scale.
    ///
    /// # Errors
    /// [`AdapterError::InvalidConfig`] for a zero rank or a non-finite scale.
    pub fn validate(&self) -> AdapterResult<()> {
        if self.r == 0 || self.sequential_r == 0 {
            return Err(AdapterError::config(
                HYDRA_TYPE,
                if self.r == 0 { "r" } else { "sequential_r" },
                format!("ranks must be positive (r = {}, sequential_r = {})", self.r, self.sequential_r),
            ));
        }
        if !self.scale.is_finite() {
            return Err(AdapterError::config(HYDRA_TYPE, "scale", format!("{} is not finite", self.scale)));
        }
        Ok(())
    }

    /// The sites this config adapts in `model`.
    ///
    /// # Errors
    /// [`peft_core::Error::NoTargetMatched`]; regex errors.
    pub fn sites(&self, model: &dyn Module) -> AdapterResult<Vec<Linear>> {
        select_linear(model, &target_spec(&self.target_modules, self.exclude_modules.as_ref())?)
    }
}

/// The weight delta a merge added and the bias it replaced.
type MergeRecord = (ArrayD<f32>, Option<ArrayD<f32>>);

/// Hydra on one linear site.
pub struct HydraLinear {
    name: String,
    scale: f32,
    ap: Param,
    bp: Param,
    a_s: Param,
    b_s: Param,
    /// The base bias (a handle shared with the site), read by the pure [`LinearAdapter::delta_bias`].
    bias: Option<Param>,
    /// Set by [`HydraTuner`] after a successful merge: the weight delta added and the bias it replaced.
    merged: Mutex<Option<MergeRecord>>,
}

impl HydraLinear {
    /// Creates adapter `name` for the site at `path` over `base`, initialised from `rng`.
    ///
    /// # Errors
    /// [`AdapterError::InvalidConfig`] for zero ranks.
    pub fn new(
        path: &str,
        name: &str,
        base: &dyn LinearBase,
        cfg: &HydraConfig,
        rng: &mut impl rand::Rng,
    ) -> AdapterResult<Self> {
        cfg.validate()?;
        let (i, o) = (base.in_features(), base.out_features());
        let p = |k: &str, v: Array2<f32>| Param::new(format!("{path}.{k}.{name}.weight"), v.into_dyn(), true);
        Ok(HydraLinear {
            name: name.to_string(),
            scale: cfg.scale as f32,
            ap: p("lora_A", kaiming(i, cfg.r, i, rng)),
            bp: p("lora_B", Array2::zeros((o, cfg.r))),
            a_s: p("hydra_seq_A", kaiming(o, cfg.sequential_r, o, rng)),
            b_s: p("hydra_seq_B", Array2::zeros((o, cfg.sequential_r))),
            bias: base.bias(),
            merged: Mutex::new(None),
        })
    }

    /// `(A_p, B_p, A_s, B_s)`.
    pub fn factors(&self) -> [&Param; 4] {
        [&self.ap, &self.bp, &self.a_s, &self.b_s]
    }

    /// `s·B_sA_s` `[out, out]`.
    fn seq_map(&self) -> Result<Array2<f32>> {
        Ok(m2(&self.b_s)?.dot(&m2(&self.a_s)?).mapv(|v| v * self.scale))
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Option<MergeRecord>> {
        self.merged.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LinearAdapter for HydraLinear {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        "hydra"
    }

    fn delta(&self, x: &Tensor, base_out: &Tensor, _base: &dyn LinearBase, _ctx: &Ctx) -> Result<Option<Tensor>> {
        let par = x.linear(&self.ap.tensor(), None)?.linear(&self.bp.tensor(), None)?;
        let seq = base_out.linear(&self.a_s.tensor(), None)?.linear(&self.b_s.tensor(), None)?;
        Ok(Some(par.add(&seq)?.mul_scalar(self.scale)))
    }

    fn params(&self) -> Vec<Param> {
        vec![self.ap.clone(), self.bp.clone(), self.a_s.clone(), self.b_s.clone()]
    }

    /// `s·B_pA_p + s·B_sA_sW₀`, computed from the base without changing it.
    fn delta_weight(&self, base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        let w = base.dense_weight()?;
        let w = w.view().into_dimensionality::<Ix2>().map_err(|_| crate::LoraError::NotMatrix {
            method: "hydra",
            what: "the base weight".into(),
            expected: "a matrix",
            shape: w.shape().to_vec(),
        })?;
        let dw = (m2(&self.bp)?.dot(&m2(&self.ap)?).mapv(|v| v * self.scale) + self.seq_map()?.dot(&w)).into_dyn();
        if dw.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: format!("hydra merge delta of `{}`", self.name) });
        }
        Ok(Some(dw))
    }

    /// The weight delta recorded by the merge being taken back.
    fn unmerge_delta_weight(&self, _base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        match &*self.record() {
            Some((dw, _)) => Ok(Some(dw.clone())),
            None => Err(Error::AdapterState {
                op: "unmerge",
                site: String::new(),
                adapter: self.name.clone(),
                problem: peft_core::AdapterProblem::NoMergeCache,
            }),
        }
    }

    /// Unmerged: `s·B_sA_s b₀` from the current bias. Merged (the unmerge asks): the merged bias minus the recorded
    /// original (the tuner then writes the original back exactly). Nothing is written.
    fn delta_bias(&self) -> Result<Option<ArrayD<f32>>> {
        let Some(b) = &self.bias else { return Ok(None) };
        let cur = b.value().to_owned();
        if let Some((_, Some(b0))) = &*self.record() {
            return Ok(Some(&cur - b0));
        }
        let b1 = cur.into_dimensionality::<Ix1>().map_err(|_| crate::LoraError::NotMatrix {
            method: "hydra",
            what: "the base bias".into(),
            expected: "a vector",
            shape: b.shape(),
        })?;
        let db: Array1<f32> = self.seq_map()?.dot(&b1);
        if db.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: format!("hydra merge bias delta of `{}`", self.name) });
        }
        Ok(Some(db.into_dyn()))
    }
}

impl SavedTensors for HydraLinear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        vec![
            ("lora_A.weight".into(), self.ap.clone()),
            ("lora_B.weight".into(), self.bp.clone()),
            ("hydra_seq_A.weight".into(), self.a_s.clone()),
            ("hydra_seq_B.weight".into(), self.b_s.clone()),
        ]
    }
}

/// An injected Hydra adapter: [`LinearTuner`] plus the merge records that make an unmerge exact.
pub struct HydraTuner {
    inner: LinearTuner<HydraLinear>,
}

impl HydraTuner {
    /// The adapted sites and their layers.
    pub fn layers(&self) -> &[(Linear, Arc<HydraLinear>)] {
        self.inner.layers()
    }

    fn merge_site(&self, site: &Linear, a: &HydraLinear) -> AdapterResult<()> {
        let name = self.inner.name();
        let dw = a.delta_weight(site.base().as_ref())?.unwrap_or_default();
        let b0 = a.bias.as_ref().map(|b| b.value().to_owned());
        site.merge(name)?;
        *a.record() = Some((dw, b0));
        Ok(())
    }

    fn unmerge_site(&self, site: &Linear, a: &HydraLinear) -> AdapterResult<()> {
        site.unmerge(self.inner.name())?;
        if let Some((_, Some(b0))) = a.record().take() {
            if let Some(b) = &a.bias {
                b.set(b0)?;
            }
        }
        Ok(())
    }
}

impl Tuner for HydraTuner {
    peft_core::forward_tuner!(inner => name, params, state_dict, wrapped_modules, set_active, is_merged, kind);
    fn merge(&self) -> AdapterResult<()> {
        for (i, (s, a)) in self.layers().iter().enumerate() {
            if let Err(e) = self.merge_site(s, a) {
                // All or nothing: take back the sites merged so far.
                for (t, b) in &self.layers()[..i] {
                    let _ = self.unmerge_site(t, b);
                }
                return Err(e);
            }
        }
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        for (s, a) in self.layers() {
            if s.is_merged(self.name())? {
                self.unmerge_site(s, a)?;
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

impl TunerConfig for HydraConfig {
    fn peft_type(&self) -> &str {
        HYDRA_TYPE
    }
    fn describe(&self) -> String {
        format!(
            "Hydra r_p={} r_s={} scale={} on {}",
            self.r,
            self.sequential_r,
            self.scale,
            crate::structured::describe_targets(&self.target_modules)
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        config_json(self, HYDRA_TYPE)
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
        let inner = LinearTuner::attach(cx.name, HYDRA_TYPE, &sites, |s| {
            HydraLinear::new(s.path(), cx.name, s.base().as_ref(), self, &mut site_rng(cx.seed, cx.name, s.path()))
        })?;
        Ok(Box::new(HydraTuner { inner }))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        for s in self.sites(model)? {
            let (i, o, p) = (s.in_features(), s.out_features(), s.path());
            expect_tensor(file, &format!("{p}.lora_A.weight"), &[self.r, i])?;
            expect_tensor(file, &format!("{p}.lora_B.weight"), &[o, self.r])?;
            expect_tensor(file, &format!("{p}.hydra_seq_A.weight"), &[self.sequential_r, o])?;
            expect_tensor(file, &format!("{p}.hydra_seq_B.weight"), &[o, self.sequential_r])?;
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

impl PeftConfig for HydraConfig {
    const PEFT_TYPE: &'static str = HYDRA_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (HydraConfig, _) = parse_config(v, HYDRA_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "hydra_tests.rs"]
mod tests;
