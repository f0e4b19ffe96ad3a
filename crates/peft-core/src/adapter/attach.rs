//! Ready-made [`Tuner`]s for the common shapes of a method, so a method crate writes only its layer:
//! - [`LinearTuner`]: one adapter of type `A` on each selected linear site (LoRA, DoRA, Hydra, MoS, Poly,
//!   LoLDU, LoRA-SB, IA3, ...), merge/unmerge through the sites;
//! - [`BlockTuner`]: one replacement on each selected block site (MixLoRA's experts);
//! - [`CompositeTuner`]: several tuners under one adapter name (MixLoRA = block tuner + LoRA on attention).
//!
//! Plus the site selection by PEFT's rules ([`select_linear`]) and the per-site seeding every method shares.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::adapter::error::{AdapterError, AdapterResult};
use crate::adapter::target::TargetSpec;
use crate::adapter::tuner::{AdapterTensors, Tuner, TunerConfig};
use crate::autograd::GradStore;
use crate::nn::{linear_sites, BlockAdapter, BlockSite, Linear, LinearAdapter, Module};
use crate::param::Param;
use crate::tensor::Tensor;

/// FNV-1a, for deterministic per-site seeds.
pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The random generator of adapter `name` at site `path` for seed `seed`: independent of the order sites are
/// visited in, so adding a target does not change the other sites' init.
pub fn site_rng(seed: u64, name: &str, path: &str) -> StdRng {
    StdRng::seed_from_u64(seed ^ fnv(&format!("{name}/{path}")))
}

/// The linear sites of `model` selected by `spec` (the output layer is skipped by `"all-linear"`), deduplicated
/// (a tied site reported twice counts once), in visit order.
///
/// # Errors
/// [`crate::Error::NoTargetMatched`] when nothing matches.
pub fn select_linear(model: &dyn Module, spec: &TargetSpec) -> AdapterResult<Vec<Linear>> {
    let mut sites = linear_sites(model);
    let mut seen = std::collections::HashSet::new();
    sites.retain(|s| seen.insert(s.path().to_string()));
    let paths = spec.select(sites.iter().map(|s| (s.path(), s.is_output())))?;
    Ok(sites.into_iter().filter(|s| paths.iter().any(|p| p == s.path())).collect())
}

/// The tensors an adapter layer saves, as `(key suffix after the site path, parameter)`, in file order.
pub trait SavedTensors {
    /// Key suffixes (e.g. `"lora_A.weight"`) and their parameters.
    fn saved_tensors(&self) -> Vec<(String, Param)>;
}

/// Adapters of type `A` on linear sites, all under one name.
pub struct LinearTuner<A: LinearAdapter + SavedTensors + 'static> {
    name: String,
    kind: String,
    layers: Vec<(Linear, Arc<A>)>,
    saved_config: Option<Box<dyn TunerConfig>>,
}

impl<A: LinearAdapter + SavedTensors + 'static> LinearTuner<A> {
    /// Attaches `make(site)` to every site in `sites` under `name`; on error, detaches what was attached.
    ///
    /// # Errors
    /// Errors of `make`; [`crate::Error::AdapterState`] when a site already has an adapter called `name`.
    pub fn attach(
        name: &str,
        kind: &str,
        sites: &[Linear],
        mut make: impl FnMut(&Linear) -> AdapterResult<A>,
    ) -> AdapterResult<Self> {
        let mut me = LinearTuner { name: name.into(), kind: kind.into(), layers: Vec::new(), saved_config: None };
        for site in sites {
            let made = make(site).and_then(|a| {
                let a = Arc::new(a);
                site.attach(a.clone())?;
                Ok(a)
            });
            match made {
                Ok(a) => me.layers.push((site.clone(), a)),
                Err(e) => {
                    // Attached by us just now: removal cannot fail.
                    let _ = me.detach(false);
                    return Err(e);
                }
            }
        }
        Ok(me)
    }

    /// The adapted sites and the adapter on each, in site order.
    pub fn layers(&self) -> &[(Linear, Arc<A>)] {
        &self.layers
    }

    /// Records the config to save instead of the injecting one (see [`Tuner::saved_config`]).
    pub fn with_saved_config(mut self, config: Box<dyn TunerConfig>) -> Self {
        self.saved_config = Some(config);
        self
    }
}

impl<A: LinearAdapter + SavedTensors + 'static> Tuner for LinearTuner<A> {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        &self.kind
    }
    fn params(&self) -> Vec<Param> {
        self.layers.iter().flat_map(|(_, a)| a.params()).collect()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        let mut v = Vec::new();
        for (site, a) in &self.layers {
            for (k, p) in a.saved_tensors() {
                v.push((format!("{}.{k}", site.path()), p));
            }
        }
        v
    }
    fn wrapped_modules(&self) -> Vec<String> {
        self.layers.iter().map(|(s, _)| s.path().to_string()).collect()
    }
    fn saved_config(&self) -> Option<Box<dyn TunerConfig>> {
        self.saved_config.as_ref().map(|c| c.clone_box())
    }
    fn set_active(&self, on: bool) {
        for (s, _) in &self.layers {
            s.activate(&self.name, on);
        }
    }
    fn merge(&self) -> AdapterResult<()> {
        for (i, (s, _)) in self.layers.iter().enumerate() {
            if let Err(e) = s.merge(&self.name) {
                // Take back the sites merged so far: all or nothing.
                for (t, _) in &self.layers[..i] {
                    let _ = t.unmerge(&self.name);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        for (s, _) in &self.layers {
            if s.is_merged(&self.name)? {
                s.unmerge(&self.name)?;
            }
        }
        Ok(())
    }
    fn is_merged(&self) -> bool {
        self.layers.first().is_some_and(|(s, _)| s.is_merged(&self.name).unwrap_or(false))
    }
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        for (s, _) in &self.layers {
            if keep_merged {
                s.detach_keep_merged(&self.name)?;
            } else {
                s.detach(&self.name)?;
            }
        }
        Ok(())
    }
}

/// One replacement of type `A` on block sites, all under one name. Not mergeable.
pub struct BlockTuner<A: BlockAdapter + SavedTensors + 'static> {
    name: String,
    kind: String,
    blocks: Vec<(BlockSite, Arc<A>)>,
}

impl<A: BlockAdapter + SavedTensors + 'static> BlockTuner<A> {
    /// Attaches `make(site)` to every site in `sites`; on error, detaches what was attached.
    ///
    /// # Errors
    /// Errors of `make`; a name taken on a site.
    pub fn attach(
        name: &str,
        kind: &str,
        sites: &[BlockSite],
        mut make: impl FnMut(&BlockSite) -> AdapterResult<A>,
    ) -> AdapterResult<Self> {
        let mut me = BlockTuner { name: name.into(), kind: kind.into(), blocks: Vec::new() };
        for site in sites {
            let made = make(site).and_then(|a| {
                let a = Arc::new(a);
                site.attach(a.clone())?;
                Ok(a)
            });
            match made {
                Ok(a) => me.blocks.push((site.clone(), a)),
                Err(e) => {
                    let _ = me.detach(false);
                    return Err(e);
                }
            }
        }
        Ok(me)
    }

    /// The sites and their adapters.
    pub fn blocks(&self) -> &[(BlockSite, Arc<A>)] {
        &self.blocks
    }
}

impl<A: BlockAdapter + SavedTensors + 'static> Tuner for BlockTuner<A> {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        &self.kind
    }
    fn params(&self) -> Vec<Param> {
        self.blocks.iter().flat_map(|(_, a)| a.params()).collect()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        let mut v = Vec::new();
        for (site, a) in &self.blocks {
            for (k, p) in a.saved_tensors() {
                v.push((format!("{}.{k}", site.path()), p));
            }
        }
        v
    }
    fn set_active(&self, on: bool) {
        for (s, _) in &self.blocks {
            s.activate(&self.name, on);
        }
    }
    fn detach(&self, _keep_merged: bool) -> AdapterResult<()> {
        for (s, _) in &self.blocks {
            s.detach(&self.name)?;
        }
        Ok(())
    }
}

/// Several tuners acting as one adapter (same name): state dicts concatenated, merge only when every part can.
pub struct CompositeTuner {
    name: String,
    kind: String,
    parts: Vec<Box<dyn Tuner>>,
}

impl CompositeTuner {
    /// Joins `parts` under `name`.
    pub fn new(name: &str, kind: &str, parts: Vec<Box<dyn Tuner>>) -> Self {
        CompositeTuner { name: name.into(), kind: kind.into(), parts }
    }

    /// The parts.
    pub fn parts(&self) -> &[Box<dyn Tuner>] {
        &self.parts
    }
}

impl Tuner for CompositeTuner {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        &self.kind
    }
    fn params(&self) -> Vec<Param> {
        self.parts.iter().flat_map(|p| p.params()).collect()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        self.parts.iter().flat_map(|p| p.state_dict()).collect()
    }
    fn wrapped_modules(&self) -> Vec<String> {
        self.parts.iter().flat_map(|p| p.wrapped_modules()).collect()
    }
    fn load_state_dict(&self, src: &AdapterTensors) -> AdapterResult<()> {
        self.parts.iter().try_for_each(|p| p.load_state_dict(src))
    }
    fn set_active(&self, on: bool) {
        for p in &self.parts {
            p.set_active(on);
        }
    }
    fn merge(&self) -> AdapterResult<()> {
        for (i, p) in self.parts.iter().enumerate() {
            if let Err(e) = p.merge() {
                for q in &self.parts[..i] {
                    let _ = q.unmerge();
                }
                return Err(e);
            }
        }
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        self.parts.iter().try_for_each(|p| p.unmerge())
    }
    fn is_merged(&self) -> bool {
        !self.parts.is_empty() && self.parts.iter().all(|p| p.is_merged())
    }
    fn detach(&self, keep_merged: bool) -> AdapterResult<()> {
        self.parts.iter().try_for_each(|p| p.detach(keep_merged))
    }
    fn aux_loss(&self) -> crate::Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for p in &self.parts {
            if let Some(a) = p.aux_loss()? {
                total = Some(match total {
                    Some(t) => t.add(&a)?,
                    None => a,
                });
            }
        }
        Ok(total)
    }
    fn transform_grads(&self, grads: GradStore) -> crate::Result<GradStore> {
        self.parts.iter().try_fold(grads, |g, p| p.transform_grads(g))
    }
    fn after_step(&self, step: usize) -> crate::Result<()> {
        self.parts.iter().try_for_each(|p| p.after_step(step))
    }
    fn state_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.state_bytes()).sum()
    }
}

/// An [`AdapterError::NotSupportedBy`] for `op` on adapter `name`.
pub fn not_supported(name: &str, method: &str, op: &'static str, reason: impl Into<String>) -> AdapterError {
    AdapterError::NotSupportedBy { name: name.into(), method: method.into(), op, reason: reason.into() }
}
