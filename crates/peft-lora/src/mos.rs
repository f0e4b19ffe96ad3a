//! MoS, Mixture of Shards (Wang et al., 2025; Forence1999/MoS). **Partially unconfirmed**: the core module of the
//! reference code is not in the stored material; the choices marked "unconfirmed" below are configurable.
//!
//! Each adapted linear gets a rank-`r` LoRA `ΔW = s·B·A` (`s = lora_alpha / r`) whose rank vectors are assembled
//! from shards (*vector sharding*: a vector of length `d` is the concatenation of `l = num_chunk_per_vec` shards
//! of length `d/l`). Shards come from global pools shared by all layers (*inter-layer sharing*): one pool for the
//! A side and one for the B side. Each module keeps `valid_param_private_r` ranks private (*shard privatization*);
//! its other `r − private_r` ranks take `(r − private_r)·l` shards chosen from the pool by a fixed random index
//! matrix (the static "router"), independently for A and B (*pair dissociation*). The pools hold the rest of the
//! trainable budget: `valid_param_lora_r` equivalent ranks per module, so `pool + private` parameters equal those
//! of a LoRA of rank `valid_param_lora_r` on every module.
//!
//! Init: A-side shards (pool and private) Kaiming-uniform with the module's fan-in; B-side shards 0, so the model
//! is unchanged at init. Unconfirmed choices: pools are grouped by shard length (one A and one B pool when every
//! module has the same `in`/`out`, the spec's case; modules of other widths get pools of their own length);
//! indices are drawn without replacement per module ([`MosConfig::sample_with_replacement`]); the "random
//! scaling" `init_lora_A_vec_value`/`init_lora_A_vec_std` is a fixed (non-trained) scale per A rank vector drawn
//! from N(value, std) (defaults 1, 0: off). Indices and scales are regenerated from [`MosConfig::index_seed`].
//!
//! Injected as a [`MosTuner`]: a [`LinearTuner`] of [`MosLinear`] plus the pools, which it owns once (each site
//! holds handles to them).
//!
//! Files: the LoRA layout with `peft_type = "MOS"`: pools at `base_model.model.mos_pool_A.len<L>` /
//! `mos_pool_B.len<L>` `[shards, L]`, private shards at `<site>.mos_private_A.weight` / `mos_private_B.weight`
//! `[private_r·l, in/l | out/l]`.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::adapter::{
    select_linear, site_rng, AdapterError, AdapterResult, AdapterTensors, InjectCx, LinearTuner, ModulePattern,
    PeftConfig, SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Param, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::attach::fnv;

use crate::structured::{config_json, describe_targets, expect_tensor, kaiming, parse_config, target_spec};

/// MoS's `peft_type`.
pub const MOS_TYPE: &str = "MOS";

fn d_peft_type() -> String {
    "MOS".into()
}
fn d_one() -> f64 {
    1.0
}

/// MoS's config (`adapter_config.json`; the reference code's argument names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MosConfig {
    /// Always `"MOS"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// Rank `r` of every module (`lora_r`).
    pub r: usize,
    /// Scaling numerator: `s = lora_alpha / r`.
    pub lora_alpha: f64,
    /// Sites to adapt.
    pub target_modules: ModulePattern,
    /// Sites never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// Trainable budget in equivalent LoRA ranks per module (pool + private).
    pub valid_param_lora_r: usize,
    /// Ranks kept private per module.
    pub valid_param_private_r: usize,
    /// Shards per rank vector `l`; must divide every module's `in` and `out`.
    pub num_chunk_per_vec: usize,
    /// Mean of the fixed per-A-vector scale (unconfirmed reading of "random scaling").
    #[serde(default = "d_one", rename = "init_lora_A_vec_value")]
    pub init_lora_a_vec_value: f64,
    /// Std of the fixed per-A-vector scale (0: every scale equals the mean).
    #[serde(default, rename = "init_lora_A_vec_std")]
    pub init_lora_a_vec_std: f64,
    /// Draw shard indices with replacement (unconfirmed; default without, per module and side).
    #[serde(default)]
    pub sample_with_replacement: bool,
    /// Seed of the index matrices and scales (regenerated on load).
    #[serde(default)]
    pub index_seed: u64,
    /// Informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Modules trained and saved in full next to the adapter (PEFT's `modules_to_save`; written only when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "valid_param_lora_r",
    "valid_param_private_r",
    "num_chunk_per_vec",
    "init_lora_A_vec_value",
    "init_lora_A_vec_std",
    "sample_with_replacement",
    "index_seed",
    "task_type",
    "modules_to_save",
    "inference_mode",
];

impl MosConfig {
    /// Rank `r`, alpha, budget `valid_r`, `private_r`, `l` shards per vector, on `targets`.
    pub fn new<S: Into<String>>(
        r: usize,
        lora_alpha: f64,
        valid_r: usize,
        private_r: usize,
        l: usize,
        targets: impl IntoIterator<Item = S>,
    ) -> Self {
        MosConfig {
            peft_type: d_peft_type(),
            r,
            lora_alpha,
            target_modules: ModulePattern::list(targets),
            exclude_modules: None,
            valid_param_lora_r: valid_r,
            valid_param_private_r: private_r,
            num_chunk_per_vec: l,
            init_lora_a_vec_value: 1.0,
            init_lora_a_vec_std: 0.0,
            sample_with_replacement: false,
            index_seed: 0,
            task_type: None,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// Checks the counts.
    ///
    /// # Errors
    /// [`AdapterError::InvalidConfig`] for `r = 0`, `l = 0`, `private_r > r`, `private_r > valid_r`, an empty
    /// pool, or a bad scale.
    pub fn validate(&self) -> AdapterResult<()> {
        let bad = |field: &str, reason: String| Err(AdapterError::config(MOS_TYPE, field, reason));
        let (r, p, v) = (self.r, self.valid_param_private_r, self.valid_param_lora_r);
        if r == 0 || self.num_chunk_per_vec == 0 {
            return bad(if r == 0 { "r" } else { "num_chunk_per_vec" }, "must be positive".into());
        }
        if p > r || p > v {
            return bad(
                "valid_param_private_r",
                format!("valid_param_private_r = {p} exceeds r = {r} or valid_param_lora_r = {v}"),
            );
        }
        if p == v && p < r {
            return bad(
                "valid_param_lora_r",
                format!("the shared pool is empty (valid_param_lora_r = private_r = {p} < r = {r})"),
            );
        }
        if !self.lora_alpha.is_finite()
            || !self.init_lora_a_vec_value.is_finite()
            || self.init_lora_a_vec_std.is_nan()
            || self.init_lora_a_vec_std < 0.0
        {
            return bad("lora_alpha", "lora_alpha and the A-vector scale must be finite, the std non-negative".into());
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

    /// The pool shapes for `sites`: per shard length of each side, the number of shards (and, on the A side, the
    /// fan-in of the first module of that length for the init).
    fn plan(&self, sites: &[Linear]) -> AdapterResult<PoolPlan> {
        let l = self.num_chunk_per_vec;
        let shared_per_module = (self.valid_param_lora_r - self.valid_param_private_r) * l;
        let mut plan = PoolPlan::default();
        for s in sites {
            let (la, lb) = (div(s.in_features(), l, s.path())?, div(s.out_features(), l, s.path())?);
            plan.a.entry(la).or_insert((0, s.in_features())).0 += shared_per_module;
            *plan.b.entry(lb).or_default() += shared_per_module;
        }
        Ok(plan)
    }
}

/// Pool shard counts by shard length: A side `(count, fan-in)`, B side count.
#[derive(Default)]
struct PoolPlan {
    a: BTreeMap<usize, (usize, usize)>,
    b: BTreeMap<usize, usize>,
}

/// The shared pools of one adapter, by shard length.
#[derive(Clone, Default)]
struct Pools {
    a: BTreeMap<usize, Param>,
    b: BTreeMap<usize, Param>,
}

/// MoS on one linear site: the private shards, the shared pools and this module's fixed indices.
pub struct MosLinear {
    name: String,
    r: usize,
    l: usize,
    in_f: usize,
    out_f: usize,
    scaling: f32,
    pool_a: Param,
    pool_b: Param,
    private_a: Option<Param>,
    private_b: Option<Param>,
    idx_a: Vec<usize>,
    idx_b: Vec<usize>,
    /// Per-A-vector scale `[r, 1]`, `None` when all ones.
    scale: Option<Tensor>,
}

impl MosLinear {
    /// The assembled `(A [r, in], B [r, out])` (B as rank vectors; the LoRA `lora_B` is its transpose).
    ///
    /// # Errors
    /// Never for well-formed parameters.
    pub fn assemble(&self) -> Result<(Tensor, Tensor)> {
        let side = |private: &Option<Param>, pool: &Param, idx: &[usize], d: usize| -> Result<Tensor> {
            let shared = pool.tensor().index_select(0, idx)?.reshape(&[idx.len() / self.l, d])?;
            match private {
                Some(p) => {
                    let pr = p.tensor().reshape(&[p.shape()[0] / self.l, d])?;
                    Tensor::concat(&[&pr, &shared], 0)
                }
                None => Ok(shared),
            }
        };
        let mut a = side(&self.private_a, &self.pool_a, &self.idx_a, self.in_f)?;
        if let Some(s) = &self.scale {
            a = a.mul(s)?;
        }
        let b = side(&self.private_b, &self.pool_b, &self.idx_b, self.out_f)?;
        Ok((a, b))
    }

    /// This module's pool indices `(A side, B side)`.
    pub fn indices(&self) -> (&[usize], &[usize]) {
        (&self.idx_a, &self.idx_b)
    }

    /// The private shards `(A, B)`, if any.
    pub fn private(&self) -> Option<(&Param, &Param)> {
        self.private_a.as_ref().zip(self.private_b.as_ref())
    }

    /// The rank.
    pub fn r(&self) -> usize {
        self.r
    }
}

impl LinearAdapter for MosLinear {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        "mos"
    }

    fn delta(&self, x: &Tensor, _base_out: &Tensor, _base: &dyn LinearBase, _ctx: &Ctx) -> Result<Option<Tensor>> {
        let (a, b) = self.assemble()?;
        Ok(Some(x.linear(&a, None)?.matmul(&b)?.mul_scalar(self.scaling).reshape(&out_shape(x.shape(), self.out_f))?))
    }

    /// Private shards, then the shared pools (the same parameters on every site).
    fn params(&self) -> Vec<Param> {
        let mut v: Vec<Param> = self.private_a.iter().chain(self.private_b.iter()).cloned().collect();
        v.push(self.pool_a.clone());
        v.push(self.pool_b.clone());
        v
    }

    fn delta_weight(&self, _base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        let (a, b) = peft_core::autograd::no_grad(|| self.assemble())?;
        let dw = b.transpose(0, 1)?.matmul(&a)?.mul_scalar(self.scaling);
        Ok(Some(dw.data().to_owned()))
    }
}

fn out_shape(x: &[usize], out: usize) -> Vec<usize> {
    let mut s = x.to_vec();
    if let Some(last) = s.last_mut() {
        *last = out;
    }
    s
}

/// The private shards, by key suffix (the pools are saved once by [`MosTuner`]).
impl SavedTensors for MosLinear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        match self.private() {
            Some((a, b)) => {
                vec![("mos_private_A.weight".into(), a.clone()), ("mos_private_B.weight".into(), b.clone())]
            }
            None => Vec::new(),
        }
    }
}

fn div(d: usize, l: usize, path: &str) -> AdapterResult<usize> {
    if !d.is_multiple_of(l) {
        return Err(AdapterError::config(
            MOS_TYPE,
            "num_chunk_per_vec",
            format!("{l} does not divide {d} at `{path}` (shard count mismatch)"),
        ));
    }
    Ok(d / l)
}

/// An injected MoS adapter: the sites' layers and the shared pools (each parameter once).
pub struct MosTuner {
    inner: LinearTuner<MosLinear>,
    pools: Pools,
}

impl MosTuner {
    /// The adapted sites and their layers.
    pub fn layers(&self) -> &[(Linear, Arc<MosLinear>)] {
        self.inner.layers()
    }

    /// The shared pools `(A side, B side)`, by shard length.
    pub fn pools(&self) -> (Vec<&Param>, Vec<&Param>) {
        (self.pools.a.values().collect(), self.pools.b.values().collect())
    }
}

impl Tuner for MosTuner {
    peft_core::forward_tuner!(inner => name, wrapped_modules, set_active, merge, unmerge, is_merged, detach);
    /// The pools, then every site's private shards.
    fn params(&self) -> Vec<Param> {
        let mut v: Vec<Param> = self.pools.a.values().chain(self.pools.b.values()).cloned().collect();
        for (_, m) in self.layers() {
            if let Some((a, b)) = m.private() {
                v.push(a.clone());
                v.push(b.clone());
            }
        }
        v
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        let mut v = Vec::new();
        for (len, p) in &self.pools.a {
            v.push((format!("mos_pool_A.len{len}"), p.clone()));
        }
        for (len, p) in &self.pools.b {
            v.push((format!("mos_pool_B.len{len}"), p.clone()));
        }
        v.extend(self.inner.state_dict());
        v
    }
    fn kind(&self) -> &str {
        MOS_TYPE
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl TunerConfig for MosConfig {
    fn peft_type(&self) -> &str {
        MOS_TYPE
    }
    fn describe(&self) -> String {
        format!(
            "MoS r={} alpha={} budget={} private={} shards/vec={} on {}",
            self.r,
            self.lora_alpha,
            self.valid_param_lora_r,
            self.valid_param_private_r,
            self.num_chunk_per_vec,
            describe_targets(&self.target_modules)
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        config_json(self, MOS_TYPE)
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
    /// Builds the pools and attaches a [`MosLinear`] to every selected site; pool values from the adapter seed,
    /// the index matrices and scales from `index_seed`.
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.validate()?;
        let name = cx.name;
        let sites = self.sites(model)?;
        let plan = self.plan(&sites)?;
        let (l, r, p) = (self.num_chunk_per_vec, self.r, self.valid_param_private_r);
        let mut rng = StdRng::seed_from_u64(cx.seed ^ fnv(&format!("{name}/mos_pool")));
        let mut pools = Pools::default();
        for (&len, &(n, fan_in)) in &plan.a {
            let v = kaiming(fan_in, n, len, &mut rng).into_dyn();
            pools.a.insert(len, Param::new(format!("mos_pool_A.{name}.len{len}"), v, true));
        }
        for (&len, &n) in &plan.b {
            pools
                .b
                .insert(len, Param::new(format!("mos_pool_B.{name}.len{len}"), ArrayD::zeros(IxDyn(&[n, len])), true));
        }
        let scale_dist = Normal::new(self.init_lora_a_vec_value as f32, self.init_lora_a_vec_std as f32)
            .map_err(|e| AdapterError::config(MOS_TYPE, "init_lora_A_vec_std", e.to_string()))?;
        let inner = LinearTuner::attach(name, MOS_TYPE, &sites, |s: &Linear| {
            let path = s.path();
            let (in_f, out_f) = (s.in_features(), s.out_features());
            let (la, lb) = (in_f / l, out_f / l);
            let missing = || AdapterError::config(MOS_TYPE, "num_chunk_per_vec", format!("no pool for `{path}`"));
            let pool_a = pools.a.get(&la).ok_or_else(missing)?.clone();
            let pool_b = pools.b.get(&lb).ok_or_else(missing)?.clone();
            let mut irng = StdRng::seed_from_u64(self.index_seed ^ fnv(&format!("{name}/{path}/index")));
            let need = (r - p) * l;
            let draw = |n: usize, rng: &mut StdRng| -> AdapterResult<Vec<usize>> {
                if self.sample_with_replacement {
                    return Ok((0..need).map(|_| rng.gen_range(0..n)).collect());
                }
                if need > n {
                    return Err(AdapterError::config(
                        MOS_TYPE,
                        "valid_param_lora_r",
                        format!("pool of {n} shards cannot supply {need} distinct shards at `{path}`"),
                    ));
                }
                Ok(rand::seq::index::sample(rng, n, need).into_vec())
            };
            let idx_a = draw(pool_a.shape()[0], &mut irng)?;
            let idx_b = draw(pool_b.shape()[0], &mut irng)?;
            let scale = (self.init_lora_a_vec_std > 0.0 || self.init_lora_a_vec_value != 1.0)
                .then(|| Tensor::new(ArrayD::from_shape_fn(IxDyn(&[r, 1]), |_| scale_dist.sample(&mut irng))));
            let mut prng = site_rng(cx.seed, name, path);
            let (private_a, private_b) = if p > 0 {
                let a = Param::new(
                    format!("{path}.mos_private_A.{name}.weight"),
                    kaiming(in_f, p * l, la, &mut prng).into_dyn(),
                    true,
                );
                let b = Param::new(
                    format!("{path}.mos_private_B.{name}.weight"),
                    Array2::<f32>::zeros((p * l, lb)).into_dyn(),
                    true,
                );
                (Some(a), Some(b))
            } else {
                (None, None)
            };
            Ok(MosLinear {
                name: name.to_string(),
                r,
                l,
                in_f,
                out_f,
                scaling: (self.lora_alpha / r as f64) as f32,
                pool_a,
                pool_b,
                private_a,
                private_b,
                idx_a,
                idx_b,
                scale,
            })
        })?;
        Ok(Box::new(MosTuner { inner, pools }))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        let sites = self.sites(model)?;
        let plan = self.plan(&sites)?;
        for (len, (n, _)) in &plan.a {
            expect_tensor(file, &format!("mos_pool_A.len{len}"), &[*n, *len])?;
        }
        for (len, n) in &plan.b {
            expect_tensor(file, &format!("mos_pool_B.len{len}"), &[*n, *len])?;
        }
        let (l, p) = (self.num_chunk_per_vec, self.valid_param_private_r);
        if p > 0 {
            for s in &sites {
                let path = s.path();
                expect_tensor(file, &format!("{path}.mos_private_A.weight"), &[p * l, s.in_features() / l])?;
                expect_tensor(file, &format!("{path}.mos_private_B.weight"), &[p * l, s.out_features() / l])?;
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

impl PeftConfig for MosConfig {
    const PEFT_TYPE: &'static str = MOS_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (MosConfig, _) = parse_config(v, MOS_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "mos_tests.rs"]
mod tests;
