//! The residual adapter site after each attention / feed-forward sub-layer: series adapters transform the
//! sub-layer output, parallel adapters add a function of the sub-layer input.

use std::sync::Arc;

use crate::error::Result;
use crate::nn::slots::{Named, Slots};
use crate::nn::{Ctx, Module, Site, Visitor};
use crate::param::Param;
use crate::tensor::Tensor;

/// A method attached to a residual site (bottleneck adapters, parallel adapters, ...).
pub trait ResidualAdapter: Send + Sync {
    /// The adapter's name.
    fn name(&self) -> &str;
    /// Returns the new sub-layer output given the sub-layer output `h` and the sub-layer input `x` (the residual
    /// stream before the sub-layer). A series adapter returns `h + f(h)`; a parallel one `h + f(x)`.
    ///
    /// # Errors
    /// Shape errors from the underlying ops.
    fn forward(&self, h: &Tensor, x: &Tensor, ctx: &Ctx) -> Result<Tensor>;
    /// Its parameters.
    fn params(&self) -> Vec<Param>;
    /// The adapter's branch on its own, for composition blocks (AdapterFusion, ScaLearn, Average) that combine
    /// several adapters' branches: `forward(h, x) == h + branch.delta`. The default derives it from
    /// [`ResidualAdapter::forward`] (`delta = forward(h, x) − h`, reading `h`); an adapter that knows its branch
    /// returns it directly, with the tensor it reads as `input`.
    ///
    /// # Errors
    /// As [`ResidualAdapter::forward`].
    fn branch(&self, h: &Tensor, x: &Tensor, ctx: &Ctx) -> Result<ResidualBranch> {
        let y = self.forward(h, x, ctx)?;
        Ok(ResidualBranch { input: h.clone(), delta: y.sub(h)? })
    }
}

/// What [`ResidualAdapter::branch`] returns.
pub struct ResidualBranch {
    /// The tensor the branch reads (the sub-layer output for a series adapter, the sub-layer input for a parallel
    /// one, `LN(h + x)` for a SeqBn adapter reading the sub-layer's LayerNorm): AdapterFusion's query.
    pub input: Tensor,
    /// What the adapter adds to the sub-layer output (AdapterHub's `up`, scaling included).
    pub delta: Tensor,
}

impl Named for dyn ResidualAdapter {
    fn slot_name(&self) -> &str {
        self.name()
    }
}

/// A named residual site (`encoder.layer.3.attention.output`, `encoder.layer.3.output`, ...). Models call
/// [`ResidualSite::forward`] on each sub-layer's output before the residual addition.
#[derive(Clone)]
pub struct ResidualSite(Arc<Slots<dyn ResidualAdapter>>);

impl ResidualSite {
    /// A site with no adapters.
    pub fn new(path: impl Into<String>) -> Self {
        ResidualSite(Arc::new(Slots::new(path.into())))
    }

    /// The path.
    pub fn path(&self) -> &str {
        self.0.path()
    }

    /// Attaches an adapter (active).
    ///
    /// # Errors
    /// [`crate::Error::AdapterState`] when the name is taken.
    pub fn attach(&self, a: Arc<dyn ResidualAdapter>) -> Result<()> {
        self.0.attach(a)
    }

    /// Detaches (deletes) adapter `name`, returning it.
    ///
    /// # Errors
    /// [`crate::Error::UnknownName`] when there is no such adapter.
    pub fn detach(&self, name: &str) -> Result<Arc<dyn ResidualAdapter>> {
        self.0.detach(name)
    }

    /// Turns adapter `name` on or off (a no-op when it is not attached here).
    pub fn activate(&self, name: &str, on: bool) {
        self.0.activate(name, on);
    }

    /// Makes exactly `names` active.
    pub fn set_active(&self, names: &[&str]) {
        self.0.set_active(names);
    }

    /// Applies the active adapters in attach order; identity when there are none.
    ///
    /// # Errors
    /// Errors of the adapters.
    pub fn forward(&self, h: Tensor, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let mut h = h;
        for a in self.0.active() {
            h = a.forward(&h, x, ctx)?;
        }
        Ok(h)
    }

    /// The attached adapters.
    pub fn adapters(&self) -> Vec<Arc<dyn ResidualAdapter>> {
        self.0.all()
    }
}

impl Module for ResidualSite {
    fn visit(&self, v: &mut dyn Visitor) {
        v.site(Site::Residual(self));
        for a in self.adapters() {
            for p in a.params() {
                v.param(&p);
            }
        }
    }
}
