//! Poly / MHR (Ponti et al., 2023; Caccia et al., 2023; PEFT `tuners/poly`): an inventory of `n_skills` LoRA
//! modules per adapted linear, mixed per example by a task-level router.
//!
//! Per site: `poly_lora_A [n_splits, n_skills, in/n_splits, r]`, `poly_lora_B [n_splits, n_skills, r,
//! out/n_splits]`, router logits `module_logits [n_tasks, n_splits·n_skills]` (init U(−1e-3, 1e-3)). For the task
//! `t` of row `b`: `z = logits[t].view(n_splits, n_skills)`; in training a Relaxed-Bernoulli(T = 1) sample
//! `σ(z + log u − log(1−u))` (PEFT; [`PolyConfig::relaxed_bernoulli`] = false uses `σ(z)` as the MHR T0 configs
//! do), in eval `σ(z)`; then `w = z / (Σ_skills z + 1e-12)` per split. Mixed factors `A_b[q] = Σ_s w[b,q,s]
//! A[q,s]` (split `q` owns input rows `q·in/n_splits…`), `B_b[q] = Σ_s w[b,q,s] B[q,s]` (split `q` owns output
//! columns), and `Δy_b = x_b A_b B_b · s` with `s = 1/r` (PEFT; [`PolyConfig::lora_scaling`] sets the mttl-style
//! LoRA scaling instead).
//!
//! Variants: Poly = `n_splits = 1`; MHR = `n_splits > 1`; MHR-z = train only the router
//! ([`PolyModelExt::set_router_only`]); MHR-μ = the uniform selector `w = 1/n_skills`
//! ([`PolySelector::Uniform`]), equal to one LoRA whose factors are the per-split skill means
//! ([`PolyModelExt::replace_with_mhr_mu`] replaces the adapter by that LoRA adapter).
//!
//! Task ids come per batch row as the [`peft_core::nn::TaskIds`] extension of the [`Ctx`]
//! ([`Ctx::with_task_ids`]); with `n_tasks = 1` and no ids every row is task 0
//! (PEFT asks for the ids even then). Files use PEFT's layout
//! (`<site>.poly_lora_A`, `<site>.poly_lora_B`, `<site>.poly_router.module_logits`, `peft_type = "POLY"`).

use std::any::Any;
use std::sync::{Arc, Mutex};

use ndarray::{Array4, ArrayD, Axis, IxDyn};
use peft_core::adapter::{
    not_supported, select_linear, site_rng, AdapterError, AdapterResult, AdapterTensors, InjectCx, LinearTuner,
    ModulePattern, PeftConfig, PeftModel, SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Error, Param, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, Uniform};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::structured::{config_json, describe_targets, expect_tensor, kaiming, parse_config, target_spec};
use crate::tuner::LoraModelExt;
use crate::LoraConfig;

/// Poly's `peft_type` (PEFT's).
pub const POLY_TYPE: &str = "POLY";

/// The `EPS` of PEFT's `PolyRouter` normalisation.
pub const ROUTER_EPS: f32 = 1e-12;

fn d_true() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn d_poly() -> String {
    "poly".into()
}
fn d_peft_type() -> String {
    "POLY".into()
}
fn d_r() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_skills() -> usize {
    4
}

/// PEFT's `PolyConfig` (same keys and defaults: `r = 8`, `n_tasks = 1`, `n_skills = 4`, `n_splits = 1`,
/// `init_weights = true`, `poly_type = "poly"`), plus two peft-rs keys written only when not at their default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolyConfig {
    /// Always `"POLY"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// LoRA rank of every skill.
    #[serde(default = "d_r")]
    pub r: usize,
    /// Sites to adapt.
    pub target_modules: ModulePattern,
    /// Sites never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// Modules trained and saved in full next to the adapter (PEFT's `modules_to_save`).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `B = 0` at init (base-equivalent); false: Kaiming-uniform `B`.
    #[serde(default = "d_true")]
    pub init_weights: bool,
    /// Only `"poly"`.
    #[serde(default = "d_poly")]
    pub poly_type: String,
    /// Number of tasks (rows of the router logits).
    #[serde(default = "d_one")]
    pub n_tasks: usize,
    /// Skills (LoRA modules) per site.
    #[serde(default = "d_skills")]
    pub n_skills: usize,
    /// Splits per LoRA (MHR when > 1); must divide `in` and `out` of every site.
    #[serde(default = "d_one")]
    pub n_splits: usize,
    /// Informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Informational.
    #[serde(default)]
    pub revision: Option<String>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
    /// peft-rs: sample Relaxed-Bernoulli(T = 1) router weights in training (PEFT, default) or use `σ(z)` as in
    /// training as well (the MHR T0 configs). Written only when false.
    #[serde(default = "d_true", skip_serializing_if = "is_true")]
    pub relaxed_bernoulli: bool,
    /// peft-rs: the scaling `s` of `x·A·B·s`; `None` is PEFT's `1/r` (mttl uses its LoRA config's scaling).
    /// Written only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_scaling: Option<f64>,
    /// Other keys (`auto_mapping`, `peft_version`, ...), kept for round trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl PolyConfig {
    /// Rank `r`, `n_tasks`, `n_skills`, `n_splits` on `targets`, other keys at PEFT's defaults.
    pub fn new<S: Into<String>>(
        r: usize,
        n_tasks: usize,
        n_skills: usize,
        n_splits: usize,
        targets: impl IntoIterator<Item = S>,
    ) -> Self {
        PolyConfig {
            peft_type: d_peft_type(),
            r,
            target_modules: ModulePattern::list(targets),
            exclude_modules: None,
            modules_to_save: None,
            init_weights: true,
            poly_type: d_poly(),
            n_tasks,
            n_skills,
            n_splits,
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            relaxed_bernoulli: true,
            lora_scaling: None,
            extra: Map::new(),
        }
    }

    /// The scaling `s`.
    pub fn scaling(&self) -> f64 {
        self.lora_scaling.unwrap_or(1.0 / self.r as f64)
    }

    /// Checks the counts and the type.
    ///
    /// # Errors
    /// [`AdapterError::InvalidConfig`] for a zero count; [`AdapterError::Unsupported`] for a `poly_type` other
    /// than `"poly"`.
    pub fn validate(&self) -> AdapterResult<()> {
        for (field, v) in
            [("r", self.r), ("n_tasks", self.n_tasks), ("n_skills", self.n_skills), ("n_splits", self.n_splits)]
        {
            if v == 0 {
                return Err(AdapterError::config(POLY_TYPE, field, "must be positive"));
            }
        }
        if self.poly_type != "poly" {
            return Err(AdapterError::Unsupported {
                method: POLY_TYPE.into(),
                what: format!("poly_type = {:?}", self.poly_type),
                reason: "only \"poly\" is implemented".into(),
            });
        }
        if let Some(s) = self.lora_scaling.filter(|s| !s.is_finite()) {
            return Err(AdapterError::config(POLY_TYPE, "lora_scaling", format!("{s} is not finite")));
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

    /// `n_splits` must divide both widths of `site`.
    fn check_site(&self, site: &Linear) -> AdapterResult<()> {
        let (i, o, q) = (site.in_features(), site.out_features(), self.n_splits);
        if i % q != 0 || o % q != 0 {
            return Err(AdapterError::config(
                POLY_TYPE,
                "n_splits",
                format!("{q} does not divide in = {i} and out = {o} at `{}`", site.path()),
            ));
        }
        Ok(())
    }
}

/// How a [`PolyLinear`] weighs its skills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolySelector {
    /// The task router (Poly, MHR, MHR-z).
    Learned,
    /// `w = 1/n_skills` for every split and task (MHR-μ); task ids are not needed.
    Uniform,
}

/// Poly/MHR on one linear site.
pub struct PolyLinear {
    name: String,
    r: usize,
    n_tasks: usize,
    n_skills: usize,
    n_splits: usize,
    in_f: usize,
    out_f: usize,
    scaling: f64,
    relaxed: bool,
    a: Param,
    b: Param,
    logits: Param,
    selector: Mutex<PolySelector>,
}

impl PolyLinear {
    /// Creates adapter `name` for the site at `path` over `base`.
    ///
    /// # Errors
    /// [`AdapterError::InvalidConfig`] for an invalid config or `n_splits` not dividing `in` and `out`.
    pub fn new(
        path: &str,
        name: &str,
        base: &dyn LinearBase,
        cfg: &PolyConfig,
        rng: &mut impl Rng,
    ) -> AdapterResult<Self> {
        cfg.validate()?;
        let (in_f, out_f) = (base.in_features(), base.out_features());
        let (q, k, r) = (cfg.n_splits, cfg.n_skills, cfg.r);
        if in_f % q != 0 || out_f % q != 0 {
            return Err(AdapterError::config(
                POLY_TYPE,
                "n_splits",
                format!("{q} does not divide in = {in_f} and out = {out_f} at `{path}`"),
            ));
        }
        let (di, d_o) = (in_f / q, out_f / q);
        let mut a = Array4::zeros((q, k, di, r));
        let mut b = Array4::zeros((q, k, r, d_o));
        for skill in 0..k {
            for split in 0..q {
                // PEFT: kaiming_uniform_ on [r, d], stored transposed.
                let m = kaiming(di, r, di, rng);
                a.index_axis_mut(Axis(0), split).index_axis_mut(Axis(0), skill).assign(&m.t());
            }
        }
        if !cfg.init_weights {
            for skill in 0..k {
                for split in 0..q {
                    let m = kaiming(r, d_o, r, rng);
                    b.index_axis_mut(Axis(0), split).index_axis_mut(Axis(0), skill).assign(&m.t());
                }
            }
        }
        let u = Uniform::new_inclusive(-1e-3f32, 1e-3);
        let logits = ArrayD::from_shape_fn(IxDyn(&[cfg.n_tasks, q * k]), |_| u.sample(rng));
        Ok(PolyLinear {
            name: name.to_string(),
            r,
            n_tasks: cfg.n_tasks,
            n_skills: k,
            n_splits: q,
            in_f,
            out_f,
            scaling: cfg.scaling(),
            relaxed: cfg.relaxed_bernoulli,
            a: Param::new(format!("{path}.poly_lora_A.{name}"), a.into_dyn(), true),
            b: Param::new(format!("{path}.poly_lora_B.{name}"), b.into_dyn(), true),
            logits: Param::new(format!("{path}.poly_router.{name}.module_logits"), logits, true),
            selector: Mutex::new(PolySelector::Learned),
        })
    }

    /// `poly_lora_A`, `poly_lora_B`, the router's `module_logits`.
    pub fn params3(&self) -> [&Param; 3] {
        [&self.a, &self.b, &self.logits]
    }

    /// Sets how skills are weighed.
    pub fn set_selector(&self, s: PolySelector) {
        *self.selector.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// The current selector.
    pub fn selector(&self) -> PolySelector {
        *self.selector.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The routing weights `[batch, n_splits, n_skills]` for `task_ids` (each split sums to 1 up to the EPS).
    ///
    /// # Errors
    /// [`Error::UnknownName`] for a task id `≥ n_tasks`.
    pub fn routing_weights(&self, task_ids: &[usize], ctx: &Ctx) -> Result<Tensor> {
        let (q, k) = (self.n_splits, self.n_skills);
        if let Some(&t) = task_ids.iter().find(|&&t| t >= self.n_tasks) {
            return Err(Error::UnknownName { name: format!("poly task id {t} (n_tasks = {})", self.n_tasks) });
        }
        let z = self.logits.tensor().index_select(0, task_ids)?.reshape(&[task_ids.len(), q, k])?;
        let z = if ctx.train && self.relaxed {
            // RelaxedBernoulli(T=1, logits).rsample() = σ(z + log u − log(1−u)).
            let noise = ctx.with_rng(|rng| {
                ArrayD::from_shape_fn(IxDyn(z.shape()), |_| {
                    let u: f32 = rng.gen_range(f32::EPSILON..1.0 - f32::EPSILON);
                    u.ln() - (1.0 - u).ln()
                })
            });
            z.add(&Tensor::new(noise))?.sigmoid()
        } else {
            z.sigmoid()
        };
        let sum = z.sum(&[2], true)?.add_scalar(ROUTER_EPS);
        z.div(&sum)
    }

    /// The mixed factors for weights `w [bs, q, k]`: `A_b [bs, in, r]`, `B_b [bs, r, out]`.
    fn mixed(&self, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let (q, k, r, bs) = (self.n_splits, self.n_skills, self.r, w.shape()[0]);
        let (di, d_o) = (self.in_f / q, self.out_f / q);
        let wq = w.permute(&[1, 0, 2])?; // [q, bs, k]
        let a = wq.matmul(&self.a.tensor().reshape(&[q, k, di * r])?)?; // [q, bs, di·r]
        let a = a.reshape(&[q, bs, di, r])?.permute(&[1, 0, 2, 3])?.reshape(&[bs, self.in_f, r])?;
        let b = wq.matmul(&self.b.tensor().reshape(&[q, k, r * d_o])?)?; // [q, bs, r·do]
        let b = b.reshape(&[q, bs, r, d_o])?.permute(&[1, 2, 0, 3])?.reshape(&[bs, r, self.out_f])?;
        Ok((a, b))
    }

    fn uniform(&self, bs: usize) -> Tensor {
        Tensor::new(ArrayD::from_elem(IxDyn(&[bs, self.n_splits, self.n_skills]), 1.0 / self.n_skills as f32))
    }

    /// The MHR-μ factors as a plain LoRA: `(lora_A [r, in], lora_B [out, r])` with the same scaling, from the
    /// per-split skill means.
    ///
    /// # Errors
    /// Never for well-formed parameters.
    pub fn mean_lora(&self) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
        let (a, b) = peft_core::autograd::no_grad(|| self.mixed(&self.uniform(1)))?;
        let a = a.reshape(&[self.in_f, self.r])?.transpose(0, 1)?.data().to_owned();
        let b = b.reshape(&[self.r, self.out_f])?.transpose(0, 1)?.data().to_owned();
        Ok((a, b))
    }
}

impl LinearAdapter for PolyLinear {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        "poly"
    }

    fn delta(&self, x: &Tensor, _base_out: &Tensor, _base: &dyn LinearBase, ctx: &Ctx) -> Result<Option<Tensor>> {
        let shape = x.shape().to_vec();
        let (Some(&bs), true) = (shape.first(), shape.len() >= 2) else {
            return Err(Error::Rank { op: "poly", expected: "an input of rank >= 2 (a batch axis first)", shape });
        };
        let w = match self.selector() {
            PolySelector::Uniform => self.uniform(bs),
            PolySelector::Learned => {
                let single;
                let ids: &[usize] = match ctx.task_ids() {
                    Some(ids) => ids,
                    // One task: every row is task 0 (PEFT requires the ids even then).
                    None if self.n_tasks == 1 => {
                        single = vec![0; bs];
                        &single
                    }
                    None => {
                        crate::error::fail!(crate::LoraError::NoTaskIds { method: "poly", adapter: self.name.clone() })
                    }
                };
                if ids.len() != bs {
                    return Err(Error::Count {
                        op: "poly",
                        what: "task ids per batch row",
                        expected: bs,
                        got: ids.len(),
                    });
                }
                self.routing_weights(ids, ctx)?
            }
        };
        let (a, b) = self.mixed(&w)?;
        let x3 = x.reshape(&[bs, x.len() / bs.max(1) / self.in_f, self.in_f])?;
        let y = x3.matmul(&a)?.matmul(&b)?.mul_scalar(self.scaling as f32);
        let mut out_shape = shape;
        if let Some(last) = out_shape.last_mut() {
            *last = self.out_f;
        }
        Ok(Some(y.reshape(&out_shape)?))
    }

    fn params(&self) -> Vec<Param> {
        vec![self.a.clone(), self.b.clone(), self.logits.clone()]
    }

    /// Mergeable only under the uniform selector (MHR-μ): `s·(A_μ B_μ)ᵀ`; task-routed Poly is input-dependent.
    fn delta_weight(&self, _base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        if self.selector() != PolySelector::Uniform {
            return Ok(None);
        }
        let (a, b) = self.mean_lora()?;
        let dw = Tensor::new(b).matmul(&Tensor::new(a))?.mul_scalar(self.scaling as f32);
        Ok(Some(dw.data().to_owned()))
    }
}

/// The saved tensors by key suffix (PEFT's names).
impl SavedTensors for PolyLinear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        vec![
            ("poly_lora_A".into(), self.a.clone()),
            ("poly_lora_B".into(), self.b.clone()),
            ("poly_router.module_logits".into(), self.logits.clone()),
        ]
    }
}

/// The keys of PEFT's `PolyConfig` (and peft-rs's two) this crate reads; others are reported.
const KNOWN: &[&str] = &[
    "peft_type",
    "r",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "init_weights",
    "poly_type",
    "n_tasks",
    "n_skills",
    "n_splits",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "relaxed_bernoulli",
    "lora_scaling",
    "auto_mapping",
    "peft_version",
];

impl TunerConfig for PolyConfig {
    fn peft_type(&self) -> &str {
        POLY_TYPE
    }
    fn describe(&self) -> String {
        format!(
            "Poly r={} skills={} splits={} tasks={} on {}",
            self.r,
            self.n_skills,
            self.n_splits,
            self.n_tasks,
            describe_targets(&self.target_modules)
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        config_json(self, POLY_TYPE)
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
        for s in &sites {
            self.check_site(s)?;
        }
        let t = LinearTuner::attach(cx.name, POLY_TYPE, &sites, |s| {
            PolyLinear::new(s.path(), cx.name, s.base().as_ref(), self, &mut site_rng(cx.seed, cx.name, s.path()))
        })?;
        Ok(Box::new(t))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        let (q, k, r) = (self.n_splits, self.n_skills, self.r);
        for s in self.sites(model)? {
            self.check_site(&s)?;
            let (i, o, p) = (s.in_features(), s.out_features(), s.path());
            expect_tensor(file, &format!("{p}.poly_lora_A"), &[q, k, i / q, r])?;
            expect_tensor(file, &format!("{p}.poly_lora_B"), &[q, k, r, o / q])?;
            expect_tensor(file, &format!("{p}.poly_router.module_logits"), &[self.n_tasks, q * k])?;
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

impl PeftConfig for PolyConfig {
    const PEFT_TYPE: &'static str = POLY_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (PolyConfig, _) = parse_config(v, POLY_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

/// `(lora_A, lora_B)`.
type LoraFactors = (ArrayD<f32>, ArrayD<f32>);

/// Poly's operations on a [`PeftModel`]: its layers, the selector, MHR-z and MHR-μ.
pub trait PolyModelExt {
    /// The Poly layers of adapter `name` (site and adapter), in site order.
    ///
    /// # Errors
    /// [`AdapterError::UnknownAdapter`]; [`AdapterError::NotSupportedBy`] when `name` is not a Poly adapter.
    fn poly_layers(&self, name: &str) -> AdapterResult<Vec<(Linear, Arc<PolyLinear>)>>;

    /// Sets how every site of adapter `name` weighs its skills.
    ///
    /// # Errors
    /// As [`PolyModelExt::poly_layers`].
    fn set_poly_selector(&self, name: &str, s: PolySelector) -> AdapterResult<()> {
        for (_, l) in self.poly_layers(name)? {
            l.set_selector(s);
        }
        Ok(())
    }

    /// MHR-z: `true` freezes the skill inventories of adapter `name` and trains only the router logits; `false`
    /// trains all. (Activating adapters again recomputes the trainable flags: call this after `set_adapter`.)
    ///
    /// # Errors
    /// As [`PolyModelExt::poly_layers`].
    fn set_router_only(&self, name: &str, on: bool) -> AdapterResult<()> {
        for (_, l) in self.poly_layers(name)? {
            l.a.set_trainable(!on);
            l.b.set_trainable(!on);
            l.logits.set_trainable(true);
        }
        Ok(())
    }

    /// MHR-μ: replaces Poly adapter `name` by a plain LoRA adapter `lora_name` (rank `r`, same scaling) on the same
    /// sites whose factors are the per-split skill means, active, to fine-tune and save in PEFT's LoRA format.
    ///
    /// # Errors
    /// As [`PolyModelExt::poly_layers`]; LoRA injection errors (the Poly adapter is then kept).
    fn replace_with_mhr_mu(&mut self, name: &str, lora_name: &str) -> AdapterResult<()>;
}

impl<M: Module> PolyModelExt for PeftModel<M> {
    fn poly_layers(&self, name: &str) -> AdapterResult<Vec<(Linear, Arc<PolyLinear>)>> {
        let t = self.tuner(name)?;
        match t.as_any().downcast_ref::<LinearTuner<PolyLinear>>() {
            Some(lt) => Ok(lt.layers().to_vec()),
            None => Err(not_supported(name, t.kind(), "poly_layers", "not a Poly adapter")),
        }
    }

    fn replace_with_mhr_mu(&mut self, name: &str, lora_name: &str) -> AdapterResult<()> {
        let layers = self.poly_layers(name)?;
        let Some(cfg) = self.config(name)?.as_any().downcast_ref::<PolyConfig>().cloned() else {
            return Err(not_supported(name, POLY_TYPE, "replace_with_mhr_mu", "not a Poly adapter"));
        };
        let means: Vec<(String, LoraFactors)> =
            layers.iter().map(|(s, l)| Ok((s.path().to_string(), l.mean_lora()?))).collect::<AdapterResult<_>>()?;
        let paths: Vec<String> = means.iter().map(|(p, _)| p.clone()).collect();
        // Full module paths: a list entry matches its own path only.
        let mut lc = LoraConfig::new(cfg.r, cfg.scaling() * cfg.r as f64, paths);
        lc.modules_to_save = cfg.modules_to_save.clone();
        self.add_adapter(lora_name, lc)?;
        let set = (|| -> AdapterResult<()> {
            for (site, l) in self.lora_layers(lora_name)? {
                if let Some((_, (a, b))) = means.iter().find(|(p, _)| p == site.path()) {
                    l.lora_a().set(a.clone())?;
                    l.lora_b().set(b.clone())?;
                }
            }
            Ok(())
        })();
        if let Err(e) = set {
            self.delete_adapter(lora_name)?;
            return Err(e);
        }
        self.delete_adapter(name)?;
        self.set_adapter(lora_name)
    }
}

#[cfg(test)]
#[path = "poly_tests.rs"]
mod tests;
