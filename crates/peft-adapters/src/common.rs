//! Pieces every method of this crate shares: config-file helpers (unknown keys reported, fields named in
//! errors), initialisers, the activation functions adapters use, and [`SiteTuner`], the [`Tuner`] for layers on
//! residual or prefix sites (peft-core ships the linear and block ones).

use std::any::Any;
use std::sync::Arc;

use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::adapter::{AdapterResult, SavedTensors, Tuner, TunerConfig};
use peft_core::nn::{EmbeddingSite, PrefixSite, ResidualSite};
use peft_core::{Param, Tensor};
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{AdaptersError, Result};

/// Keys every PEFT config writes that describe the file rather than the method (kept for round trips, never
/// reported as ignored).
pub const PEFT_BOOKKEEPING: &[&str] =
    &["auto_mapping", "base_model_name_or_path", "peft_version", "revision", "init_weights", "tokenizer_kwargs"];

/// Parses a method's config from its JSON object and lists the keys it does not know (as load-report lines).
///
/// # Errors
/// [`AdaptersError::InvalidConfig`] naming the method for wrongly typed fields.
pub fn parse_config<C: serde::de::DeserializeOwned>(
    v: &Value,
    method: &'static str,
    known: &[&str],
) -> Result<(C, Vec<String>)> {
    let c = serde_json::from_value(v.clone()).map_err(|e| AdaptersError::config(method, "<config>", e.to_string()))?;
    let ignored = v
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !known.contains(&k.as_str()) && !PEFT_BOOKKEEPING.contains(&k.as_str()))
                .map(|k| format!("`{k}` is not a {method} option and was ignored"))
                .collect()
        })
        .unwrap_or_default();
    Ok((c, ignored))
}

/// A config as its JSON value.
///
/// # Errors
/// Serialisation errors as [`AdaptersError::InvalidConfig`].
pub fn config_json(c: &impl Serialize, method: &'static str) -> Result<Value> {
    serde_json::to_value(c).map_err(|e| AdaptersError::config(method, "<config>", e.to_string()))
}

/// `kaiming_uniform_(a=√5)` for a `[rows, cols]` weight with fan-in `cols`: U(−1/√cols, 1/√cols), PyTorch's
/// `nn.Linear` default (also its bias bound).
pub fn kaiming(rows: usize, cols: usize, rng: &mut impl rand::Rng) -> ArrayD<f32> {
    uniform(&[rows, cols], 1.0 / (cols.max(1) as f32).sqrt(), rng)
}

/// U(−bound, bound) entries of shape `shape`.
pub fn uniform(shape: &[usize], bound: f32, rng: &mut impl rand::Rng) -> ArrayD<f32> {
    let u = Uniform::new_inclusive(-bound, bound);
    ArrayD::from_shape_fn(IxDyn(shape), |_| u.sample(rng))
}

/// N(0, std²) entries of shape `shape`.
pub fn normal(shape: &[usize], std: f32, rng: &mut impl rand::Rng) -> ArrayD<f32> {
    match Normal::new(0.0f32, std.max(0.0)) {
        Ok(n) => ArrayD::from_shape_fn(IxDyn(shape), |_| n.sample(rng)),
        Err(_) => ArrayD::zeros(IxDyn(shape)),
    }
}

/// A parameter's value as a matrix.
///
/// # Errors
/// [`peft_core::Error::Shape`] when it is not 2-D.
pub fn m2(p: &Param) -> peft_core::Result<Array2<f32>> {
    let v = p.value().to_owned();
    let s = v.shape().to_vec();
    v.into_dimensionality().map_err(|_| peft_core::Error::Shape { op: "as matrix", lhs: s, rhs: vec![0, 0] })
}

/// The non-linearity of a bottleneck (AdapterHub's `non_linearity` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// `x·σ(x)` (AdapterHub's `"swish"`, PyTorch's SiLU).
    #[serde(alias = "silu")]
    Swish,
    /// Exact (erf) GELU.
    Gelu,
    /// `tanh(x)`.
    Tanh,
    /// Identity (a linear bottleneck).
    Identity,
}

impl Activation {
    /// Applies it.
    pub fn apply<E: peft_core::elem::Elem>(self, x: &Tensor<E>) -> Tensor<E> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Swish => x.silu(),
            Activation::Gelu => x.gelu(),
            Activation::Tanh => x.tanh(),
            Activation::Identity => x.clone(),
        }
    }
}

/// A site kind adapters of this crate attach to ([`ResidualSite`], [`PrefixSite`], [`EmbeddingSite`]).
pub trait AdapterSite: Clone + Send + Sync + 'static {
    /// The site's module path.
    fn site_path(&self) -> &str;
    /// Detaches adapter `name`.
    ///
    /// # Errors
    /// [`peft_core::Error::UnknownName`].
    fn detach_adapter(&self, name: &str) -> peft_core::Result<()>;
    /// Turns adapter `name` on or off.
    fn activate_adapter(&self, name: &str, on: bool);
}

impl AdapterSite for ResidualSite {
    fn site_path(&self) -> &str {
        self.path()
    }
    fn detach_adapter(&self, name: &str) -> peft_core::Result<()> {
        self.detach(name).map(|_| ())
    }
    fn activate_adapter(&self, name: &str, on: bool) {
        self.activate(name, on);
    }
}

impl AdapterSite for EmbeddingSite {
    fn site_path(&self) -> &str {
        self.path()
    }
    fn detach_adapter(&self, name: &str) -> peft_core::Result<()> {
        self.detach(name).map(|_| ())
    }
    fn activate_adapter(&self, name: &str, on: bool) {
        self.activate(name, on);
    }
}

impl AdapterSite for PrefixSite {
    fn site_path(&self) -> &str {
        self.path()
    }
    fn detach_adapter(&self, name: &str) -> peft_core::Result<()> {
        self.detach(name).map(|_| ())
    }
    fn activate_adapter(&self, name: &str, on: bool) {
        self.activate(name, on);
    }
}

/// A layer that attaches itself to a site of kind `S`.
pub trait SiteLayer<S: AdapterSite>: SavedTensors + Send + Sync + 'static {
    /// Attaches this layer (active) to `site`.
    ///
    /// # Errors
    /// A name already taken on the site.
    fn attach_to(self: Arc<Self>, site: &S) -> peft_core::Result<()>;
    /// Its parameters.
    fn layer_params(&self) -> Vec<Param>;
}

/// One layer of type `L` on each selected site of kind `S`, all under one adapter name; not mergeable. The state
/// dict is `<site path>.<suffix>` for each layer's [`SavedTensors`] (AdapterHub-style per-site keys).
pub struct SiteTuner<S: AdapterSite, L: SiteLayer<S>> {
    name: String,
    kind: String,
    layers: Vec<(S, Arc<L>)>,
    saved_config: Option<Box<dyn TunerConfig>>,
}

impl<S: AdapterSite, L: SiteLayer<S>> SiteTuner<S, L> {
    /// Attaches `make(site)` to each of `sites`; on error, detaches what was attached.
    ///
    /// # Errors
    /// Errors of `make`; a name taken on a site.
    pub fn attach(name: &str, kind: &str, sites: &[S], mut make: impl FnMut(usize, &S) -> Result<L>) -> Result<Self> {
        let mut me = SiteTuner { name: name.into(), kind: kind.into(), layers: Vec::new(), saved_config: None };
        for (i, site) in sites.iter().enumerate() {
            let made = make(i, site).and_then(|l| {
                let l = Arc::new(l);
                l.clone().attach_to(site)?;
                Ok(l)
            });
            match made {
                Ok(l) => me.layers.push((site.clone(), l)),
                Err(e) => {
                    // Attached by us just now: removal cannot fail.
                    let _ = me.detach(false);
                    return Err(e);
                }
            }
        }
        Ok(me)
    }

    /// The sites and the layer on each, in site order.
    pub fn layers(&self) -> &[(S, Arc<L>)] {
        &self.layers
    }

    /// Records the config to save instead of the injecting one (see [`Tuner::saved_config`]).
    pub fn with_saved_config(mut self, config: Box<dyn TunerConfig>) -> Self {
        self.saved_config = Some(config);
        self
    }
}

impl<S: AdapterSite, L: SiteLayer<S>> Tuner for SiteTuner<S, L> {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        &self.kind
    }
    fn params(&self) -> Vec<Param> {
        self.layers.iter().flat_map(|(_, l)| l.layer_params()).collect()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        let mut v = Vec::new();
        for (site, l) in &self.layers {
            for (k, p) in l.saved_tensors() {
                v.push((format!("{}.{k}", site.site_path()), p));
            }
        }
        v
    }
    fn saved_config(&self) -> Option<Box<dyn TunerConfig>> {
        self.saved_config.as_ref().map(|c| c.clone_box())
    }
    fn set_active(&self, on: bool) {
        for (s, _) in &self.layers {
            s.activate_adapter(&self.name, on);
        }
    }
    fn detach(&self, _keep_merged: bool) -> AdapterResult<()> {
        for (s, _) in &self.layers {
            s.detach_adapter(&self.name)?;
        }
        Ok(())
    }
}

/// Checks, before anything is allocated, that tensor `key` (relative to the file's key prefix) is in `file` with
/// shape `want`.
///
/// # Errors
/// [`peft_core::adapter::AdapterError::MissingTensor`] / [`peft_core::adapter::AdapterError::TensorShape`].
pub fn expect_tensor(file: &peft_core::adapter::AdapterTensors, key: &str, want: &[usize]) -> AdapterResult<()> {
    use peft_core::adapter::AdapterError;
    match file.shape(key) {
        None => Err(AdapterError::MissingTensor { file: file.path().to_path_buf(), key: key.to_string() }),
        Some(s) if s != want => Err(AdapterError::TensorShape {
            file: file.path().to_path_buf(),
            key: key.to_string(),
            expected: want.to_vec(),
            found: s,
        }),
        Some(_) => Ok(()),
    }
}
