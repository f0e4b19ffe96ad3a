//! `LoraModel`: LoRA/DoRA adapters injected into any [`Module`] by config, several named adapters, activation,
//! merge/unmerge and trainable-parameter bookkeeping (PEFT's `LoraModel` + `PeftModel` surface).

use std::sync::Arc;

use peft_core::nn::{linear_sites, named_params, Linear, LinearAdapter, Module};
use peft_core::{Error, Param, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::{Bias, LoraConfig};
use crate::layer::{LoraLinear, LoraSpec};

/// One named adapter: its config and its layers.
pub struct AdapterSet {
    /// The adapter name.
    pub name: String,
    /// Its config (as given, or as read from `adapter_config.json`).
    pub config: LoraConfig,
    /// The adapted sites and the adapter on each, in site order.
    pub layers: Vec<(Linear, Arc<LoraLinear>)>,
}

/// A model with LoRA adapters. Holds handles to the model's sites and parameters; the model itself keeps
/// working through its own forward (sites route through the attached adapters).
pub struct LoraModel {
    sites: Vec<Linear>,
    base_params: Vec<Param>,
    adapters: Vec<AdapterSet>,
    active: Vec<String>,
    disabled: bool,
    seed: u64,
}

/// FNV-1a, for deterministic per-site seeds.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// True when parameter/module `path` is module `m` or inside it (PEFT's `(^|.*\.)m($|\..*)` rule).
pub(crate) fn in_module(path: &str, m: &str) -> bool {
    path == m
        || path.starts_with(&format!("{m}."))
        || path.contains(&format!(".{m}."))
        || path.ends_with(&format!(".{m}"))
}

impl LoraModel {
    /// Injects adapter `name` configured by `config` into `model`; its initial values come from `seed`.
    ///
    /// # Errors
    /// [`crate::ConfigError`] (as [`Error::Invalid`]) for an invalid config; [`Error::NoTargetMatched`] when the
    /// targets select no site; init errors.
    pub fn new(model: &dyn Module, config: LoraConfig, name: &str, seed: u64) -> Result<Self> {
        let mut me = Self::wrap(model, seed);
        me.add_adapter(name, config)?;
        me.set_adapter(name)?;
        Ok(me)
    }

    /// Wraps `model` without adapters (then [`LoraModel::add_adapter`] or [`LoraModel::load_adapter`]). Base
    /// parameters are frozen as soon as an adapter is added.
    pub fn wrap(model: &dyn Module, seed: u64) -> Self {
        let mut sites = linear_sites(model);
        // Adapter parameters of sites already carrying adapters are not base parameters.
        let adapter_ids: Vec<_> =
            sites.iter().flat_map(|s| s.adapters()).flat_map(|a| a.params()).map(|p| p.id()).collect();
        let base_params = named_params(model).into_iter().filter(|p| !adapter_ids.contains(&p.id())).collect();
        sites.dedup_by(|a, b| a.path() == b.path());
        LoraModel { sites, base_params, adapters: Vec::new(), active: vec![], disabled: false, seed }
    }

    /// Adds adapter `name` (inactive, as in PEFT; see [`LoraModel::set_adapter`]).
    ///
    /// # Errors
    /// As [`LoraModel::new`]; [`Error::Invalid`] when `name` exists or a base-mutating init meets a merged site.
    pub fn add_adapter(&mut self, name: &str, mut config: LoraConfig) -> Result<()> {
        config.validate()?;
        // Every site is a linear layer storing [out, in]: PEFT resets the flag for such targets too.
        config.fan_in_fan_out = false;
        if self.adapters.iter().any(|a| a.name == name) {
            crate::bail!("add_adapter", "adapter `{name}` already exists");
        }
        let spec = config.target_spec()?;
        let paths = spec.select(self.sites.iter().map(|s| (s.path(), s.is_output())))?;
        let init = config.init()?;
        let mut layers = Vec::new();
        for site in self.sites.iter().filter(|s| paths.iter().any(|p| p == s.path())) {
            if init.mutates_base() {
                for a in site.adapters() {
                    if site.is_merged(a.name())? {
                        crate::bail!("add_adapter", "{init:?} rewrites `{}`, which has a merged adapter", site.path());
                    }
                }
            }
            let (r, alpha) = config.rank_alpha(site.path())?;
            let ls = LoraSpec {
                r,
                alpha,
                use_rslora: config.use_rslora,
                dropout: config.lora_dropout,
                init,
                use_dora: config.use_dora,
                lora_bias: config.lora_bias,
            };
            let mut rng = StdRng::seed_from_u64(self.seed ^ fnv(&format!("{name}/{}", site.path())));
            let ad = Arc::new(LoraLinear::new(site.path(), name, site.base().as_ref(), ls, &mut rng)?);
            site.attach(ad.clone())?;
            layers.push((site.clone(), ad));
        }
        self.adapters.push(AdapterSet { name: name.to_string(), config, layers });
        self.apply();
        Ok(())
    }

    /// The adapters, in creation order.
    pub fn adapters(&self) -> &[AdapterSet] {
        &self.adapters
    }

    /// The adapter `name`.
    ///
    /// # Errors
    /// [`Error::UnknownName`].
    pub fn adapter(&self, name: &str) -> Result<&AdapterSet> {
        self.adapters
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| Error::UnknownName { name: format!("adapter `{name}`") })
    }

    /// The active adapter names.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Makes `name` the only active adapter (and the only trainable one).
    ///
    /// # Errors
    /// [`Error::UnknownName`].
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_adapters(&[name])
    }

    /// Activates several adapters at once: their deltas add up in forward.
    ///
    /// # Errors
    /// [`Error::UnknownName`].
    pub fn set_adapters(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.adapter(n)?;
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        self.apply();
        Ok(())
    }

    /// Runs the base model only (adapters stay attached).
    pub fn disable_adapters(&mut self) {
        self.disabled = true;
        self.apply();
    }

    /// Undoes [`LoraModel::disable_adapters`].
    pub fn enable_adapters(&mut self) {
        self.disabled = false;
        self.apply();
    }

    /// Removes adapter `name` from every site (unmerging it first where merged).
    ///
    /// # Errors
    /// [`Error::UnknownName`].
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let i = self
            .adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::UnknownName { name: format!("adapter `{name}`") })?;
        let set = self.adapters.remove(i);
        for (site, _) in &set.layers {
            site.detach(name)?;
        }
        self.active.retain(|a| a != name);
        self.apply();
        Ok(())
    }

    /// Pushes the active set to every site and recomputes the trainable flags.
    fn apply(&self) {
        let act: Vec<&str> = if self.disabled { vec![] } else { self.active.iter().map(String::as_str).collect() };
        for s in &self.sites {
            s.set_active(&act);
        }
        // Base parameters: frozen unless a bias rule or modules_to_save of an active adapter unfreezes them.
        let active_sets: Vec<&AdapterSet> = self.adapters.iter().filter(|a| self.active.contains(&a.name)).collect();
        for p in &self.base_params {
            let on = active_sets.iter().any(|a| !a.config.inference_mode && base_param_saved(a, p.name()));
            p.set_trainable(on);
        }
        for a in &self.adapters {
            let on = self.active.contains(&a.name) && !a.config.inference_mode;
            for (_, l) in &a.layers {
                for p in l.params() {
                    p.set_trainable(on);
                }
            }
        }
    }

    /// Merges the active adapters into the base weights (forward then skips them).
    ///
    /// # Errors
    /// As [`Linear::merge`] (an adapter already merged is skipped, not an error).
    pub fn merge(&self) -> Result<()> {
        for a in self.adapters.iter().filter(|a| self.active.contains(&a.name)) {
            for (site, _) in &a.layers {
                if !site.is_merged(&a.name)? {
                    site.merge(&a.name)?;
                }
            }
        }
        Ok(())
    }

    /// Unmerges every merged adapter (in reverse merge order per site).
    ///
    /// # Errors
    /// As [`Linear::unmerge`].
    pub fn unmerge(&self) -> Result<()> {
        for a in self.adapters.iter().rev() {
            for (site, _) in &a.layers {
                if site.is_merged(&a.name)? {
                    site.unmerge(&a.name)?;
                }
            }
        }
        Ok(())
    }

    /// Merges the active adapters and removes all adapters: the model is a plain model again.
    ///
    /// # Errors
    /// As [`LoraModel::merge`].
    pub fn merge_and_unload(mut self) -> Result<()> {
        self.merge()?;
        for a in std::mem::take(&mut self.adapters) {
            for (site, _) in &a.layers {
                if site.is_merged(&a.name)? {
                    // Keep the merged weights: drop the adapter without unmerging.
                    site.set_active(&[]);
                }
            }
            for (site, _) in &a.layers {
                detach_keep(site, &a.name)?;
            }
        }
        for p in &self.base_params {
            p.set_trainable(false);
        }
        Ok(())
    }

    /// Parameters the optimizer should update.
    pub fn trainable_params(&self) -> Vec<Param> {
        let mut v: Vec<Param> = self.base_params.iter().filter(|p| p.trainable()).cloned().collect();
        for a in &self.adapters {
            for (_, l) in &a.layers {
                v.extend(l.params().into_iter().filter(Param::trainable));
            }
        }
        v
    }

    /// `(trainable, total)` parameter counts (PEFT's `get_nb_trainable_parameters`).
    pub fn param_counts(&self) -> (usize, usize) {
        let train = self.trainable_params().iter().map(Param::numel).sum();
        let adapters: usize =
            self.adapters.iter().flat_map(|a| &a.layers).flat_map(|(_, l)| l.params()).map(|p| p.numel()).sum();
        (train, adapters + self.base_params.iter().map(Param::numel).sum::<usize>())
    }

    /// The base (non-adapter) parameters.
    pub fn base_params(&self) -> &[Param] {
        &self.base_params
    }

    /// The adapter parameters of `name`, named `<site>.lora_A.<name>.weight`, ...
    ///
    /// # Errors
    /// [`Error::UnknownName`].
    pub fn adapter_params(&self, name: &str) -> Result<Vec<Param>> {
        Ok(self.adapter(name)?.layers.iter().flat_map(|(_, l)| l.params()).collect())
    }

    pub(crate) fn adapters_mut(&mut self) -> &mut Vec<AdapterSet> {
        &mut self.adapters
    }
}

/// True when base parameter `pname` trains and is saved with adapter `a` (bias rule or `modules_to_save`).
pub(crate) fn base_param_saved(a: &AdapterSet, pname: &str) -> bool {
    let bias = pname.ends_with(".bias")
        && match a.config.bias {
            Bias::None => false,
            Bias::All => true,
            Bias::LoraOnly => a.layers.iter().any(|(s, _)| pname == format!("{}.bias", s.path())),
        };
    let mts = a.config.modules_to_save.as_ref().is_some_and(|m| m.iter().any(|m| in_module(pname, m)));
    bias || mts
}

/// Detaches `name` from `site` without unmerging (used by `merge_and_unload`).
fn detach_keep(site: &Linear, name: &str) -> Result<()> {
    if site.is_merged(name)? {
        // Linear::detach unmerges merged adapters; re-add the delta afterwards to keep the merged weight.
        let w = site.base().dense_weight()?;
        site.detach(name)?;
        let now = site.base().dense_weight()?;
        site.base().add_to_weight(&(&w - &now))?;
    } else {
        site.detach(name)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
