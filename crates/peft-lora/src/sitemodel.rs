//! A small model wrapper shared by the adapters that are not `LoraLinear` (LoLDU, LoRA-SB): one named adapter per
//! target site, base parameters frozen, merge/unmerge, and the PEFT file layout (`adapter_config.json` +
//! `adapter_model.safetensors` with `base_model.model.<site>.<tensor>` keys and `{"format": "pt"}` metadata).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ndarray::ArrayD;
use peft_core::io::safetensors::{write_safetensors, SafeTensorsFile};
use peft_core::nn::{named_params, Linear, LinearAdapter, Module};
use peft_core::{Error, Param, Result};

/// The key prefix PEFT writes.
pub const PREFIX: &str = "base_model.model.";

/// One adapter kind `A` on a set of sites.
pub struct SiteModel<A: LinearAdapter + 'static> {
    /// The adapter name.
    pub name: String,
    /// The adapted sites and their adapters.
    pub layers: Vec<(Linear, Arc<A>)>,
    base_params: Vec<Param>,
}

impl<A: LinearAdapter + 'static> SiteModel<A> {
    /// Freezes every parameter of `model`, then attaches one adapter per site (built by `build`, in order).
    ///
    /// # Errors
    /// Errors of `build`; [`Error::Invalid`] when a site already has an adapter named `name` (nothing attached).
    pub fn inject(
        model: &dyn Module,
        sites: &[Linear],
        name: &str,
        mut build: impl FnMut(&Linear) -> Result<A>,
    ) -> Result<Self> {
        for s in sites {
            if s.adapter(name).is_some() {
                crate::bail!("inject", "`{}` already has an adapter named `{name}`", s.path());
            }
        }
        let adapters: Vec<Arc<A>> = sites.iter().map(|s| build(s).map(Arc::new)).collect::<Result<_>>()?;
        let base_params = named_params(model);
        for p in &base_params {
            p.set_trainable(false);
        }
        let mut layers = Vec::new();
        for (s, a) in sites.iter().zip(adapters) {
            s.attach(a.clone())?;
            layers.push((s.clone(), a));
        }
        Ok(SiteModel { name: name.to_string(), layers, base_params })
    }

    /// The trainable adapter parameters.
    pub fn trainable_params(&self) -> Vec<Param> {
        self.layers.iter().flat_map(|(_, a)| a.params()).filter(Param::trainable).collect()
    }

    /// The model's own parameters (frozen at inject).
    pub fn base_params(&self) -> &[Param] {
        &self.base_params
    }

    /// Merges the adapter into every base weight.
    ///
    /// # Errors
    /// As [`Linear::merge`].
    pub fn merge(&self) -> Result<()> {
        self.layers.iter().try_for_each(|(s, _)| s.merge(&self.name))
    }

    /// Unmerges it again.
    ///
    /// # Errors
    /// As [`Linear::unmerge`].
    pub fn unmerge(&self) -> Result<()> {
        self.layers.iter().try_for_each(|(s, _)| s.unmerge(&self.name))
    }

    /// Detaches the adapter from every site (unmerging where merged).
    ///
    /// # Errors
    /// As [`Linear::detach`].
    pub fn detach(self) -> Result<()> {
        self.layers.iter().try_for_each(|(s, _)| s.detach(&self.name).map(|_| ()))
    }
}

fn io_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid { op: "adapter io", msg: e.to_string() }
}

/// Writes `adapter_config.json` (`config_json` as given) and `adapter_model.safetensors`; returns the bytes.
///
/// # Errors
/// IO errors as [`Error::Invalid`].
pub fn write_files(dir: &Path, config_json: &str, tensors: &BTreeMap<String, ArrayD<f32>>) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(format!("{}: {e}", dir.display())))?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let wpath = dir.join(crate::io::WEIGHTS_NAME);
    write_safetensors(&wpath, tensors.iter(), Some(&meta)).map_err(io_err)?;
    let cpath = dir.join(crate::io::CONFIG_NAME);
    peft_core::io::atomic::atomic_write(&cpath, |w| w.write_all(config_json.as_bytes())).map_err(io_err)?;
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(len(&wpath) + len(&cpath))
}

/// Reads `adapter_config.json` and opens `adapter_model.safetensors` in `dir`.
///
/// # Errors
/// Missing or unreadable files.
pub fn read_files(dir: &Path) -> Result<(String, SafeTensorsFile)> {
    let text = std::fs::read_to_string(dir.join(crate::io::CONFIG_NAME))
        .map_err(|e| io_err(format!("{}: {e}", dir.display())))?;
    let file = SafeTensorsFile::open(dir.join(crate::io::WEIGHTS_NAME)).map_err(io_err)?;
    Ok((text, file))
}

/// Sets `param` from tensor `key` of `file` (shape checked).
///
/// # Errors
/// Missing or mis-shaped tensor.
pub fn load_into(file: &SafeTensorsFile, key: &str, param: &Param) -> Result<()> {
    param.set(file.get_checked(key, &param.shape()).map_err(io_err)?)
}
