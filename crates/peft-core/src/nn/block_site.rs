//! The block-replacement site around each feed-forward block: an adapter attached here computes the block's
//! output itself, with the original block at hand (MixLoRA's mixture of LoRA experts over the frozen FFN).
//!
//! The site sees the block's *input* (after the pre-norm in pre-norm layers), so a replacement works the same in
//! post-norm encoders (BERT) and pre-norm decoders (LLaMA). The FFN's linear layers stay ordinary linear sites:
//! other adapters on them keep working inside the original block.

use std::sync::{Arc, RwLock};

use crate::error::{AdapterProblem, Error, Result};
use crate::nn::{Ctx, Linear, Mlp, Module, Site, SwiGlu, Visitor};
use crate::param::Param;
use crate::tensor::Tensor;

/// The feed-forward block a [`BlockSite`] wraps (handles shared with the model).
#[derive(Clone)]
pub enum Ffn {
    /// `fc2(act(fc1(x)))` (BERT, ViT, Whisper).
    Mlp(Mlp),
    /// `down(silu(gate(x)) * up(x))` (LLaMA).
    SwiGlu(SwiGlu),
}

impl Ffn {
    /// Applies the block (through its linear sites, so adapters attached to them apply).
    ///
    /// # Errors
    /// Shape errors.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match self {
            Ffn::Mlp(m) => m.forward(x, ctx),
            Ffn::SwiGlu(s) => s.forward(x, ctx),
        }
    }

    /// The projections in data-flow order (`fc1, fc2` or `gate, up, down`).
    pub fn linears(&self) -> Vec<Linear> {
        match self {
            Ffn::Mlp(m) => vec![m.fc1.clone(), m.fc2.clone()],
            Ffn::SwiGlu(s) => vec![s.gate.clone(), s.up.clone(), s.down.clone()],
        }
    }
}

/// A method attached to a block-replacement site.
pub trait BlockAdapter: Send + Sync {
    /// The adapter's name.
    fn name(&self) -> &str;
    /// The block's output for input `x [.., d]`; `base` computes the block as it would be without this adapter.
    ///
    /// # Errors
    /// Shape errors from the underlying ops.
    fn forward(&self, x: &Tensor, base: &dyn Fn(&Tensor) -> Result<Tensor>, ctx: &Ctx) -> Result<Tensor>;
    /// Its parameters.
    fn params(&self) -> Vec<Param>;
}

struct Inner {
    path: String,
    ffn: Ffn,
    adapters: RwLock<Vec<(Arc<dyn BlockAdapter>, bool)>>,
}

/// A named block-replacement site (`encoder.layer.3.output`, `model.layers.3.mlp`, ...).
#[derive(Clone)]
pub struct BlockSite(Arc<Inner>);

impl BlockSite {
    /// A site around `ffn` with no adapters.
    pub fn new(path: impl Into<String>, ffn: Ffn) -> Self {
        BlockSite(Arc::new(Inner { path: path.into(), ffn, adapters: RwLock::new(Vec::new()) }))
    }

    /// The path.
    pub fn path(&self) -> &str {
        &self.0.path
    }

    /// The wrapped block.
    pub fn ffn(&self) -> &Ffn {
        &self.0.ffn
    }

    /// Attaches an adapter (active).
    ///
    /// # Errors
    /// [`Error::AdapterState`] when the name is taken.
    pub fn attach(&self, a: Arc<dyn BlockAdapter>) -> Result<()> {
        let mut ads = self.0.adapters.write().unwrap_or_else(|p| p.into_inner());
        if ads.iter().any(|(b, _)| b.name() == a.name()) {
            return Err(Error::AdapterState {
                op: "attach",
                site: self.path().to_string(),
                adapter: a.name().to_string(),
                problem: AdapterProblem::Exists,
            });
        }
        ads.push((a, true));
        Ok(())
    }

    /// Detaches adapter `name`, returning it.
    ///
    /// # Errors
    /// [`Error::UnknownName`].
    pub fn detach(&self, name: &str) -> Result<Arc<dyn BlockAdapter>> {
        let mut ads = self.0.adapters.write().unwrap_or_else(|p| p.into_inner());
        let i = ads
            .iter()
            .position(|(a, _)| a.name() == name)
            .ok_or_else(|| Error::UnknownName { name: format!("{}: adapter `{name}`", self.0.path) })?;
        Ok(ads.remove(i).0)
    }

    /// Turns adapter `name` on or off (a no-op when it is not attached here).
    pub fn activate(&self, name: &str, on: bool) {
        for (a, active) in self.0.adapters.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            if a.name() == name {
                *active = on;
            }
        }
    }

    /// Makes exactly `names` active.
    pub fn set_active(&self, names: &[&str]) {
        for (a, on) in self.0.adapters.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            *on = names.contains(&a.name());
        }
    }

    /// The attached adapters.
    pub fn adapters(&self) -> Vec<Arc<dyn BlockAdapter>> {
        self.0.adapters.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(a, _)| a.clone()).collect()
    }

    /// The block's output: the original block, wrapped by each active adapter in attach order (the last attached
    /// sees the others' result as its `base`).
    ///
    /// # Errors
    /// Errors of the block or the adapters.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let active: Vec<Arc<dyn BlockAdapter>> = {
            let ads = self.0.adapters.read().unwrap_or_else(|p| p.into_inner());
            ads.iter().filter(|(_, on)| *on).map(|(a, _)| a.clone()).collect()
        };
        self.run(&active, x, ctx)
    }

    fn run(&self, active: &[Arc<dyn BlockAdapter>], x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match active.split_last() {
            None => self.0.ffn.forward(x, ctx),
            Some((last, rest)) => last.forward(x, &|t: &Tensor| self.run(rest, t, ctx), ctx),
        }
    }
}

impl Module for BlockSite {
    fn visit(&self, v: &mut dyn Visitor) {
        v.site(Site::Block(self));
        for a in self.adapters() {
            for p in a.params() {
                v.param(&p);
            }
        }
    }
}
