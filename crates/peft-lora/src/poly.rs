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
//! ([`PolyModel::set_router_only`]); MHR-μ = the uniform selector `w = 1/n_skills`
//! ([`PolySelector::Uniform`]), equal to one LoRA whose factors are the per-split skill means
//! ([`PolyModel::into_mhr_mu`] turns the adapter into that [`LoraModel`]).
//!
//! Task ids come per batch row through [`Ctx::with_task_ids`]; with `n_tasks = 1` and no ids every row is task 0
//! (PEFT asks for the ids even then). Files use PEFT's layout
//! (`<site>.poly_lora_A`, `<site>.poly_lora_B`, `<site>.poly_router.module_logits`, `peft_type = "POLY"`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use ndarray::{Array4, ArrayD, Axis, IxDyn};
use peft_core::adapter::ModulePattern;
use peft_core::nn::{Ctx, LinearAdapter, LinearBase, Module};
use peft_core::{Error, Param, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, Uniform};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::structured::{kaiming, read_adapter, write_adapter, Injected, SavedTensors};
use crate::{LoraConfig, LoraModel};

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
    /// Modules trained in full (kept for round trips; peft-rs trainers handle heads themselves).
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
    /// [`Error::Invalid`] for a zero count or an unknown `poly_type`.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || self.n_tasks == 0 || self.n_skills == 0 || self.n_splits == 0 {
            crate::bail!(
                "PolyConfig",
                "r, n_tasks, n_skills, n_splits must be positive (got {}, {}, {}, {})",
                self.r,
                self.n_tasks,
                self.n_skills,
                self.n_splits
            );
        }
        if self.poly_type != "poly" {
            crate::bail!("PolyConfig", "unsupported poly_type {:?} (only \"poly\")", self.poly_type);
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
    /// [`Error::Invalid`] for an invalid config or `n_splits` not dividing `in` and `out`.
    pub fn new(path: &str, name: &str, base: &dyn LinearBase, cfg: &PolyConfig, rng: &mut impl Rng) -> Result<Self> {
        cfg.validate()?;
        let (in_f, out_f) = (base.in_features(), base.out_features());
        let (q, k, r) = (cfg.n_splits, cfg.n_skills, cfg.r);
        if in_f % q != 0 || out_f % q != 0 {
            crate::bail!("poly", "n_splits = {q} does not divide in = {in_f} and out = {out_f} at `{path}`");
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

    fn delta(&self, x: &Tensor, _base_out: &Tensor, _base: &dyn LinearBase, ctx: &Ctx) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        let Some((&bs, _)) = shape.split_first() else { crate::bail!("poly", "input has rank 0") };
        if shape.len() < 2 {
            crate::bail!("poly", "input {shape:?} has no batch axis");
        }
        let w = match self.selector() {
            PolySelector::Uniform => self.uniform(bs),
            PolySelector::Learned => {
                let single;
                let ids: &[usize] = match &ctx.task_ids {
                    Some(ids) => ids,
                    // One task: every row is task 0 (PEFT requires the ids even then).
                    None if self.n_tasks == 1 => {
                        single = vec![0; bs];
                        &single
                    }
                    None => crate::bail!("poly", "adapter `{}` needs task ids (Ctx::with_task_ids)", self.name),
                };
                if ids.len() != bs {
                    crate::bail!("poly", "{} task ids for a batch of {bs}", ids.len());
                }
                self.routing_weights(ids, ctx)?
            }
        };
        let (a, b) = self.mixed(&w)?;
        let x3 = x.reshape(&[bs, x.len() / bs.max(1) / self.in_f, self.in_f])?;
        let y = x3.matmul(&a)?.matmul(&b)?.mul_scalar(self.scaling as f32);
        let mut out_shape = shape;
        *out_shape.last_mut().expect("peft-rs bug: rank checked") = self.out_f;
        y.reshape(&out_shape)
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

/// `(lora_A, lora_B)`.
type LoraFactors = (ArrayD<f32>, ArrayD<f32>);

/// The saved tensors by key suffix (PEFT's names).
impl SavedTensors for PolyLinear {
    fn saved_tensors(&self) -> Vec<(&'static str, &Param)> {
        vec![("poly_lora_A", &self.a), ("poly_lora_B", &self.b), ("poly_router.module_logits", &self.logits)]
    }
}

/// A model with one Poly/MHR adapter.
pub struct PolyModel {
    /// The config.
    pub config: PolyConfig,
    /// The adapted sites.
    pub adapter: Injected<PolyLinear>,
}

impl PolyModel {
    /// Injects adapter `name` into `model`'s sites selected by `config`, initialised from `seed`.
    ///
    /// # Errors
    /// Invalid config; [`Error::NoTargetMatched`]; a split count that does not divide a site.
    pub fn new(model: &dyn Module, config: PolyConfig, name: &str, seed: u64) -> Result<Self> {
        config.validate()?;
        let (targets, exclude) = (&config.target_modules, config.exclude_modules.as_ref());
        let adapter = Injected::inject(model, targets, exclude, name, seed, |s, rng| {
            PolyLinear::new(s.path(), name, s.base().as_ref(), &config, rng)
        })?;
        Ok(PolyModel { config, adapter })
    }

    /// The trainable parameters (all three tensors per site, or only the router logits under MHR-z).
    pub fn trainable_params(&self) -> Vec<Param> {
        self.adapter.trainable_params()
    }

    /// MHR-z: `true` freezes the skill inventories and trains only the router logits; `false` trains all.
    pub fn set_router_only(&self, on: bool) {
        for (_, l) in &self.adapter.layers {
            l.a.set_trainable(!on);
            l.b.set_trainable(!on);
            l.logits.set_trainable(true);
        }
    }

    /// Sets every site's selector.
    pub fn set_selector(&self, s: PolySelector) {
        for (_, l) in &self.adapter.layers {
            l.set_selector(s);
        }
    }

    /// MHR-μ: replaces the Poly adapter by a plain LoRA adapter `name` (rank `r`, same scaling) whose factors are
    /// the per-split skill means, and returns it as a [`LoraModel`] to fine-tune (and save in PEFT's LoRA format).
    ///
    /// # Errors
    /// LoRA injection errors.
    pub fn into_mhr_mu(mut self, model: &dyn Module, name: &str) -> Result<LoraModel> {
        let means: Vec<(String, LoraFactors)> = self
            .adapter
            .layers
            .iter()
            .map(|(s, l)| Ok((s.path().to_string(), l.mean_lora()?)))
            .collect::<Result<_>>()?;
        self.adapter.detach();
        let paths: Vec<String> = means.iter().map(|(p, _)| p.clone()).collect();
        let r = self.config.r;
        let cfg = LoraConfig::new(r, self.config.scaling() * r as f64, paths);
        let lm = LoraModel::new(model, cfg, name, 0)?;
        for (site, l) in &lm.adapter(name)?.layers {
            if let Some((_, (a, b))) = means.iter().find(|(p, _)| p == site.path()) {
                l.lora_a().set(a.clone())?;
                l.lora_b().set(b.clone())?;
            }
        }
        Ok(lm)
    }

    /// The tensors as saved (PEFT keys), by file key.
    pub fn state_dict(&self) -> BTreeMap<String, ArrayD<f32>> {
        self.adapter.state_dict()
    }

    /// Writes PEFT's files into `dir`.
    ///
    /// # Errors
    /// IO errors.
    pub fn save_pretrained(&self, dir: &Path) -> Result<u64> {
        let cfg = PolyConfig { inference_mode: true, ..self.config.clone() };
        write_adapter(dir, &cfg, &self.state_dict())
    }

    /// Injects the Poly adapter saved in `dir` (by PEFT or peft-rs) into `model` under `name`.
    ///
    /// # Errors
    /// IO errors; another `peft_type`; missing or mis-shaped tensors.
    pub fn load(model: &dyn Module, dir: &Path, name: &str) -> Result<Self> {
        let (config, file) = read_adapter::<PolyConfig>(dir, "POLY")?;
        let mut me = Self::new(model, config, name, 0)?;
        me.adapter.load_tensors(&file)?;
        Ok(me)
    }
}

#[cfg(test)]
#[path = "poly_tests.rs"]
mod tests;
