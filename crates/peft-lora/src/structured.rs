//! Shared pieces of the structured LoRA variants (Hydra, MoS, Poly/MHR, MixLoRA): site selection, per-site seeds,
//! Kaiming init, a generic "one adapter kind on many sites" container with merge/unmerge, and the adapter files.
//!
//! File layout: methods PEFT has (Poly) use PEFT's key names; methods PEFT lacks use the LoRA layout
//! (`adapter_config.json` written like `json.dumps(indent=2, sort_keys=True)` with the method's own `peft_type`,
//! `adapter_model.safetensors` with keys `base_model.model.<site>.<suffix>`, metadata `{"format": "pt"}`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ndarray::{Array2, ArrayD};
use peft_core::adapter::{ModulePattern, TargetSpec};
use peft_core::io::safetensors::{write_safetensors, SafeTensorsFile};
use peft_core::nn::{linear_sites, Linear, LinearAdapter, Module};
use peft_core::{Error, Param, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Uniform};

/// The key prefix PEFT gives every tensor of a non-prompt adapter.
pub const PREFIX: &str = "base_model.model.";

/// FNV-1a, for deterministic per-site seeds.
pub(crate) fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The RNG of adapter `name` at site `path` for model seed `seed`.
pub(crate) fn site_rng(seed: u64, name: &str, path: &str) -> StdRng {
    StdRng::seed_from_u64(seed ^ fnv(&format!("{name}/{path}")))
}

/// `kaiming_uniform_(a=√5)` for a `[rows, cols]` matrix with fan-in `fan_in`: U(−1/√fan_in, 1/√fan_in).
pub(crate) fn kaiming(fan_in: usize, rows: usize, cols: usize, rng: &mut impl rand::Rng) -> Array2<f32> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    let u = Uniform::new_inclusive(-bound, bound);
    Array2::from_shape_fn((rows, cols), |_| u.sample(rng))
}

/// The linear sites of `model` selected by `targets` (PEFT matching; the output layer is skipped by
/// `"all-linear"`), deduplicated, in visit order.
///
/// # Errors
/// [`Error::NoTargetMatched`] when nothing matches; regex errors.
pub fn select_sites(
    model: &dyn Module,
    targets: &ModulePattern,
    exclude: Option<&ModulePattern>,
) -> Result<Vec<Linear>> {
    let mut sites = linear_sites(model);
    sites.dedup_by(|a, b| a.path() == b.path());
    let spec = TargetSpec::new(targets, exclude, None, None, &[])?;
    let paths = spec.select(sites.iter().map(|s| (s.path(), s.is_output())))?;
    Ok(sites.into_iter().filter(|s| paths.iter().any(|p| p == s.path())).collect())
}

/// The tensors an adapter layer writes to the adapter file, as `(key suffix after the site path, parameter)`.
pub trait SavedTensors {
    /// Key suffixes (e.g. `"lora_A.weight"`) and their parameters, in file order.
    fn saved_tensors(&self) -> Vec<(&'static str, &Param)>;
}

impl<A: LinearAdapter + SavedTensors + 'static> Injected<A> {
    /// The tensors as saved: `base_model.model.<site>.<suffix>` -> value, for every site.
    pub fn state_dict(&self) -> BTreeMap<String, ArrayD<f32>> {
        let mut out = BTreeMap::new();
        for (site, a) in &self.layers {
            for (k, p) in a.saved_tensors() {
                out.insert(format!("{PREFIX}{}.{k}", site.path()), p.value().to_owned());
            }
        }
        out
    }

    /// Sets every saved tensor from `file`; on error, detaches the adapter from every site (nothing half-loaded
    /// stays attached).
    ///
    /// # Errors
    /// A missing or mis-shaped tensor.
    pub fn load_tensors(&mut self, file: &SafeTensorsFile) -> Result<()> {
        let res = self.layers.iter().try_for_each(|(site, a)| {
            a.saved_tensors()
                .into_iter()
                .try_for_each(|(k, p)| load_param(file, &format!("{PREFIX}{}.{k}", site.path()), p))
        });
        if res.is_err() {
            self.detach();
        }
        res
    }
}

/// One adapter (one name) of one kind `A` attached to several sites.
pub struct Injected<A: LinearAdapter + 'static> {
    /// The adapter name.
    pub name: String,
    /// The sites and the adapter on each, in site order.
    pub layers: Vec<(Linear, Arc<A>)>,
}

impl<A: LinearAdapter + 'static> Injected<A> {
    /// Attaches `make(site)` to every site under `name`; on error, detaches what was attached.
    ///
    /// # Errors
    /// Errors of `make`; [`Error::Invalid`] when a site already has an adapter called `name`.
    pub fn attach(name: &str, sites: &[Linear], mut make: impl FnMut(&Linear) -> Result<A>) -> Result<Self> {
        let mut me = Injected { name: name.to_string(), layers: Vec::new() };
        for site in sites {
            let made = make(site).and_then(|a| {
                let a = Arc::new(a);
                site.attach(a.clone())?;
                Ok(a)
            });
            match made {
                Ok(a) => me.layers.push((site.clone(), a)),
                Err(e) => {
                    me.detach();
                    return Err(e);
                }
            }
        }
        Ok(me)
    }

    /// Selects `model`'s sites by `targets`/`exclude` ([`select_sites`]), freezes their base weights and attaches
    /// `make(site, rng)` to each under `name`, with a per-site generator seeded from `(seed, name, site path)`.
    ///
    /// # Errors
    /// As [`select_sites`] and [`Injected::attach`].
    pub fn inject(
        model: &dyn Module,
        targets: &ModulePattern,
        exclude: Option<&ModulePattern>,
        name: &str,
        seed: u64,
        mut make: impl FnMut(&Linear, &mut StdRng) -> Result<A>,
    ) -> Result<Self> {
        let sites = select_sites(model, targets, exclude)?;
        for s in &sites {
            for p in s.base().params() {
                p.set_trainable(false);
            }
        }
        Self::attach(name, &sites, |s| make(s, &mut site_rng(seed, name, s.path())))
    }

    /// Every adapter parameter, in site order.
    pub fn params(&self) -> Vec<Param> {
        self.layers.iter().flat_map(|(_, a)| a.params()).collect()
    }

    /// The trainable adapter parameters.
    pub fn trainable_params(&self) -> Vec<Param> {
        self.params().into_iter().filter(Param::trainable).collect()
    }

    /// Merges the adapter into every site's base weight.
    ///
    /// # Errors
    /// As [`Linear::merge`]; sites merged before the failure stay merged.
    pub fn merge(&self) -> Result<()> {
        self.layers.iter().try_for_each(|(s, _)| s.merge(&self.name))
    }

    /// Unmerges the adapter from every site.
    ///
    /// # Errors
    /// As [`Linear::unmerge`].
    pub fn unmerge(&self) -> Result<()> {
        self.layers.iter().try_for_each(|(s, _)| s.unmerge(&self.name))
    }

    /// Detaches the adapter from every site (unmerging first where merged).
    pub fn detach(&mut self) {
        for (s, _) in self.layers.drain(..) {
            // The adapter was attached by us; a failure here means it was removed already.
            let _ = s.detach(&self.name);
        }
    }
}

/// Writes `adapter_config.json` (`config` as Python's `json.dumps(indent=2, sort_keys=True)`) and
/// `adapter_model.safetensors` (`tensors`, metadata `{"format": "pt"}`) into `dir`; returns the bytes written.
///
/// # Errors
/// IO errors as [`Error::Invalid`].
pub fn write_adapter(
    dir: &Path,
    config: &impl serde::Serialize,
    tensors: &BTreeMap<String, ArrayD<f32>>,
) -> Result<u64> {
    let io = |e: &dyn std::fmt::Display| Error::Invalid { op: "adapter io", msg: format!("{}: {e}", dir.display()) };
    std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let wpath = dir.join(crate::io::WEIGHTS_NAME);
    write_safetensors(&wpath, tensors.iter(), Some(&meta)).map_err(|e| io(&e))?;
    let v = serde_json::to_value(config).map_err(|e| io(&e))?;
    let text = crate::pyjson::dumps(&v);
    let cpath = dir.join(crate::io::CONFIG_NAME);
    peft_core::io::atomic::atomic_write(&cpath, |w| w.write_all(text.as_bytes())).map_err(|e| io(&e))?;
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(len(&wpath) + len(&cpath))
}

/// Reads `dir`'s config (parsed as `C`, checking `peft_type == expect`) and opens its weights.
///
/// # Errors
/// Missing files, malformed JSON, another `peft_type`.
pub fn read_adapter<C: serde::de::DeserializeOwned>(dir: &Path, expect: &str) -> Result<(C, SafeTensorsFile)> {
    let io = |e: &dyn std::fmt::Display| Error::Invalid { op: "adapter io", msg: format!("{}: {e}", dir.display()) };
    let text = std::fs::read_to_string(dir.join(crate::io::CONFIG_NAME)).map_err(|e| io(&e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| io(&e))?;
    let found = v.get("peft_type").and_then(serde_json::Value::as_str).unwrap_or("");
    if found != expect {
        crate::bail!("adapter io", "{}: peft_type {found:?}, expected {expect:?}", dir.display());
    }
    let cfg = serde_json::from_value(v).map_err(|e| io(&e))?;
    let file = SafeTensorsFile::open(dir.join(crate::io::WEIGHTS_NAME)).map_err(|e| io(&e))?;
    Ok((cfg, file))
}

/// Sets `param` from tensor `key` of `file`, checking the shape.
///
/// # Errors
/// A missing or mis-shaped tensor.
pub fn load_param(file: &SafeTensorsFile, key: &str, param: &Param) -> Result<()> {
    let v = file
        .get_checked(key, &param.shape())
        .map_err(|e| Error::Invalid { op: "adapter io", msg: format!("{key}: {e}") })?;
    param.set(v)
}

#[cfg(test)]
pub(crate) mod fdcheck {
    //! Finite-difference checks of adapter parameters through a model forward (f32 forwards, f64 sums).

    use peft_core::{Param, Tensor};

    /// Central differences of `loss()` w.r.t. every entry of `p`.
    pub fn fd(loss: &dyn Fn() -> f64, p: &Param, eps: f32) -> Vec<f64> {
        (0..p.numel())
            .map(|i| {
                let v0 = p.value().to_owned();
                let mut vp = v0.clone();
                vp.as_slice_mut().expect("contiguous")[i] += eps;
                p.set(vp).expect("set");
                let lp = loss();
                let mut vm = v0.clone();
                vm.as_slice_mut().expect("contiguous")[i] -= eps;
                p.set(vm).expect("set");
                let lm = loss();
                p.set(v0).expect("set");
                (lp - lm) / (2.0 * f64::from(eps))
            })
            .collect()
    }

    /// Checks the gradient of the scalar `f()` w.r.t. each of `params` against central differences.
    pub fn check(f: &dyn Fn() -> Tensor, params: &[Param], eps: f32, tol: f64) {
        let g = f().backward().expect("backward");
        let scalar = || f64::from(peft_core::autograd::no_grad(f).item().expect("scalar"));
        for p in params {
            let zeros = ndarray::ArrayD::zeros(ndarray::IxDyn(&p.shape()));
            let an = g.get_id(p.id()).map_or(zeros, |a| a.to_owned());
            let num = fd(&scalar, p, eps);
            let scale = num.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (i, (a, n)) in an.iter().zip(&num).enumerate() {
                assert!(
                    (f64::from(*a) - n).abs() <= tol * scale,
                    "{}[{i}]: analytic {a} vs numeric {n} (scale {scale})",
                    p.name()
                );
            }
        }
    }
}
