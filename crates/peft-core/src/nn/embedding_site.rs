//! The embedding-output site: where a model's embedding block hands its output `[B, L, H]` to the first layer.
//! Adapters here are invertible maps of the token representations (NICE-style invertible adapters, as MAD-X and
//! "Small Models, Big Impact" use them): [`EmbeddingSite::forward`] applies the active ones in attach order after
//! the embedding block, and a model with an output head over the vocabulary applies [`EmbeddingSite::inverse`]
//! (their inverses, last attached first) to the final hidden states before the head.

use std::sync::Arc;

use crate::error::Result;
use crate::nn::slots::{Named, Slots};
use crate::nn::{Ctx, Module, Site, Visitor};
use crate::param::Param;
use crate::tensor::Tensor;

/// A method attached to the embedding-output site: an invertible map of `[..., H]` token representations.
pub trait EmbeddingAdapter: Send + Sync {
    /// The adapter's name.
    fn name(&self) -> &str;
    /// `y = f(x)`.
    ///
    /// # Errors
    /// Shape errors from the underlying ops.
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor>;
    /// `x = f⁻¹(y)`.
    ///
    /// # Errors
    /// Shape errors from the underlying ops.
    fn inverse(&self, y: &Tensor, ctx: &Ctx) -> Result<Tensor>;
    /// Its parameters.
    fn params(&self) -> Vec<Param>;
}

impl Named for dyn EmbeddingAdapter {
    fn slot_name(&self) -> &str {
        self.name()
    }
}

/// A named embedding-output site (`embeddings` on BERT).
#[derive(Clone)]
pub struct EmbeddingSite(Arc<Slots<dyn EmbeddingAdapter>>);

impl EmbeddingSite {
    /// A site with no adapters.
    pub fn new(path: impl Into<String>) -> Self {
        EmbeddingSite(Arc::new(Slots::new(path.into())))
    }

    /// The path.
    pub fn path(&self) -> &str {
        self.0.path()
    }

    /// Attaches an adapter (active).
    ///
    /// # Errors
    /// [`crate::Error::AdapterState`] when the name is taken.
    pub fn attach(&self, a: Arc<dyn EmbeddingAdapter>) -> Result<()> {
        self.0.attach(a)
    }

    /// Detaches (deletes) adapter `name`, returning it.
    ///
    /// # Errors
    /// [`crate::Error::UnknownName`] when there is no such adapter.
    pub fn detach(&self, name: &str) -> Result<Arc<dyn EmbeddingAdapter>> {
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
    pub fn forward(&self, x: Tensor, ctx: &Ctx) -> Result<Tensor> {
        let mut x = x;
        for a in self.0.active() {
            x = a.forward(&x, ctx)?;
        }
        Ok(x)
    }

    /// Applies the active adapters' inverses, last attached first; identity when there are none.
    ///
    /// # Errors
    /// Errors of the adapters.
    pub fn inverse(&self, y: Tensor, ctx: &Ctx) -> Result<Tensor> {
        let mut y = y;
        for a in self.0.active().iter().rev() {
            y = a.inverse(&y, ctx)?;
        }
        Ok(y)
    }

    /// The attached adapters.
    pub fn adapters(&self) -> Vec<Arc<dyn EmbeddingAdapter>> {
        self.0.all()
    }
}

impl Module for EmbeddingSite {
    fn visit(&self, v: &mut dyn Visitor) {
        v.site(Site::Embedding(self));
        for a in self.adapters() {
            for p in a.params() {
                v.param(&p);
            }
        }
    }
}
