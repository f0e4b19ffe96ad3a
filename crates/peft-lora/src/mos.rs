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
//! Files: the LoRA layout with `peft_type = "MOS"`: pools at `base_model.model.mos_pool_A.len<L>` /
//! `mos_pool_B.len<L>` `[shards, L]`, private shards at `<site>.mos_private_A.weight` / `mos_private_B.weight`
//! `[private_r·l, in/l | out/l]`.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::adapter::ModulePattern;
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Error, Param, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::structured::{fnv, kaiming, load_param, read_adapter, select_sites, write_adapter, Injected, PREFIX};

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
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
}

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
            inference_mode: false,
        }
    }

    /// Checks the counts.
    ///
    /// # Errors
    /// [`Error::Invalid`] for `r = 0`, `l = 0`, `private_r > r`, `private_r > valid_r`, or a bad scale.
    pub fn validate(&self) -> Result<()> {
        let (r, p, v) = (self.r, self.valid_param_private_r, self.valid_param_lora_r);
        if r == 0 || self.num_chunk_per_vec == 0 {
            crate::bail!("MosConfig", "r and num_chunk_per_vec must be positive");
        }
        if p > r || p > v {
            crate::bail!("MosConfig", "valid_param_private_r = {p} exceeds r = {r} or valid_param_lora_r = {v}");
        }
        if p == v && p < r {
            crate::bail!("MosConfig", "the shared pool is empty (valid_param_lora_r = private_r = {p} < r = {r})");
        }
        if !self.lora_alpha.is_finite()
            || !self.init_lora_a_vec_value.is_finite()
            || self.init_lora_a_vec_std.is_nan()
            || self.init_lora_a_vec_std < 0.0
        {
            crate::bail!("MosConfig", "lora_alpha and the A-vector scale must be finite, the std non-negative");
        }
        Ok(())
    }
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

    fn delta(&self, x: &Tensor, _base_out: &Tensor, _base: &dyn LinearBase, _ctx: &Ctx) -> Result<Tensor> {
        let (a, b) = self.assemble()?;
        x.linear(&a, None)?.matmul(&b)?.mul_scalar(self.scaling).reshape(&out_shape(x.shape(), self.out_f))
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

/// A model with one MoS adapter.
pub struct MosModel {
    /// The config.
    pub config: MosConfig,
    /// The adapted sites.
    pub adapter: Injected<MosLinear>,
    pools: Pools,
}

fn div(d: usize, l: usize, path: &str) -> Result<usize> {
    if !d.is_multiple_of(l) {
        crate::bail!("mos", "num_chunk_per_vec = {l} does not divide {d} at `{path}` (shard count mismatch)");
    }
    Ok(d / l)
}

impl MosModel {
    /// Builds the pools and injects adapter `name` into `model`'s sites selected by `config`; values from `seed`
    /// (the index matrices and scales from `config.index_seed`).
    ///
    /// # Errors
    /// Invalid config; [`Error::NoTargetMatched`]; a shard count that does not divide a site; a pool too small to
    /// supply distinct shards.
    pub fn new(model: &dyn Module, config: MosConfig, name: &str, seed: u64) -> Result<Self> {
        config.validate()?;
        let sites = select_sites(model, &config.target_modules, config.exclude_modules.as_ref())?;
        let (l, r, p) = (config.num_chunk_per_vec, config.r, config.valid_param_private_r);
        let shared_per_module = (config.valid_param_lora_r - p) * l;
        // Shard counts and fan-ins per shard length.
        let mut counts_a: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        let mut counts_b: BTreeMap<usize, usize> = BTreeMap::new();
        for s in &sites {
            let (la, lb) = (div(s.in_features(), l, s.path())?, div(s.out_features(), l, s.path())?);
            counts_a.entry(la).or_insert((0, s.in_features())).0 += shared_per_module;
            *counts_b.entry(lb).or_default() += shared_per_module;
            for bp in s.base().params() {
                bp.set_trainable(false);
            }
        }
        let mut rng = StdRng::seed_from_u64(seed ^ fnv(&format!("{name}/mos_pool")));
        let mut pools = Pools::default();
        for (&len, &(n, fan_in)) in &counts_a {
            let v = kaiming(fan_in, n, len, &mut rng).into_dyn();
            pools.a.insert(len, Param::new(format!("mos_pool_A.{name}.len{len}"), v, true));
        }
        for (&len, &n) in &counts_b {
            pools
                .b
                .insert(len, Param::new(format!("mos_pool_B.{name}.len{len}"), ArrayD::zeros(IxDyn(&[n, len])), true));
        }
        let scale_dist = Normal::new(config.init_lora_a_vec_value as f32, config.init_lora_a_vec_std as f32)
            .map_err(|e| Error::Invalid { op: "mos", msg: e.to_string() })?;
        let adapter = Injected::attach(name, &sites, |s: &Linear| {
            let path = s.path();
            let (in_f, out_f) = (s.in_features(), s.out_features());
            let (la, lb) = (in_f / l, out_f / l);
            let pool_a = pools.a[&la].clone();
            let pool_b = pools.b[&lb].clone();
            let mut irng = StdRng::seed_from_u64(config.index_seed ^ fnv(&format!("{name}/{path}/index")));
            let need = (r - p) * l;
            let draw = |n: usize, rng: &mut StdRng| -> Result<Vec<usize>> {
                if config.sample_with_replacement {
                    return Ok((0..need).map(|_| rng.gen_range(0..n)).collect());
                }
                if need > n {
                    crate::bail!("mos", "pool of {n} shards cannot supply {need} distinct shards at `{path}`");
                }
                Ok(rand::seq::index::sample(rng, n, need).into_vec())
            };
            let idx_a = draw(pool_a.shape()[0], &mut irng)?;
            let idx_b = draw(pool_b.shape()[0], &mut irng)?;
            let scale = (config.init_lora_a_vec_std > 0.0 || config.init_lora_a_vec_value != 1.0)
                .then(|| Tensor::new(ArrayD::from_shape_fn(IxDyn(&[r, 1]), |_| scale_dist.sample(&mut irng))));
            let mut prng = crate::structured::site_rng(seed, name, path);
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
                scaling: (config.lora_alpha / r as f64) as f32,
                pool_a,
                pool_b,
                private_a,
                private_b,
                idx_a,
                idx_b,
                scale,
            })
        })?;
        Ok(MosModel { config, adapter, pools })
    }

    /// The trainable parameters, each once: the pools, then every site's private shards.
    pub fn trainable_params(&self) -> Vec<Param> {
        let mut v: Vec<Param> = self.pools.a.values().chain(self.pools.b.values()).cloned().collect();
        for (_, m) in &self.adapter.layers {
            if let Some((a, b)) = m.private() {
                v.push(a.clone());
                v.push(b.clone());
            }
        }
        v.retain(Param::trainable);
        v
    }

    /// The shared pools `(A side, B side)`, by shard length.
    pub fn pools(&self) -> (Vec<&Param>, Vec<&Param>) {
        (self.pools.a.values().collect(), self.pools.b.values().collect())
    }

    fn saved(&self) -> Vec<(String, Param)> {
        let mut v = Vec::new();
        for (len, p) in &self.pools.a {
            v.push((format!("{PREFIX}mos_pool_A.len{len}"), p.clone()));
        }
        for (len, p) in &self.pools.b {
            v.push((format!("{PREFIX}mos_pool_B.len{len}"), p.clone()));
        }
        for (site, m) in &self.adapter.layers {
            if let Some((a, b)) = m.private() {
                v.push((format!("{PREFIX}{}.mos_private_A.weight", site.path()), a.clone()));
                v.push((format!("{PREFIX}{}.mos_private_B.weight", site.path()), b.clone()));
            }
        }
        v
    }

    /// The tensors as saved, by file key.
    pub fn state_dict(&self) -> BTreeMap<String, ArrayD<f32>> {
        self.saved().into_iter().map(|(k, p)| (k, p.value().to_owned())).collect()
    }

    /// Writes the adapter files into `dir`.
    ///
    /// # Errors
    /// IO errors.
    pub fn save_pretrained(&self, dir: &Path) -> Result<u64> {
        let cfg = MosConfig { inference_mode: true, ..self.config.clone() };
        write_adapter(dir, &cfg, &self.state_dict())
    }

    /// Injects the MoS adapter saved in `dir` into `model` under `name` (indices regenerated from the config).
    ///
    /// # Errors
    /// IO errors; another `peft_type`; missing tensors; a pool or private tensor of another shard count.
    pub fn load(model: &dyn Module, dir: &Path, name: &str) -> Result<Self> {
        let (config, file) = read_adapter::<MosConfig>(dir, "MOS")?;
        let mut me = Self::new(model, config, name, 0)?;
        if let Err(e) = me.saved().iter().try_for_each(|(k, p)| load_param(&file, k, p)) {
            me.adapter.detach();
            return Err(e);
        }
        Ok(me)
    }
}

#[cfg(test)]
#[path = "mos_tests.rs"]
mod tests;
