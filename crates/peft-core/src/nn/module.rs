//! Walking a model: every module reports its parameters and adapter sites to a [`Visitor`] as [`Site`]s.
//!
//! There are six kinds of adapter site (the five of design notes §2 and the embedding output):
//! 1. [`Site::Linear`]: a linear layer `y = W x + b` plus adapter terms (LoRA family, IA3, quantized bases);
//! 2. [`Site::Residual`]: after each attention / feed-forward sub-layer (series and parallel bottleneck adapters);
//! 3. [`Site::Prefix`]: in each attention layer (prefix key/values, prompt tokens, VPT);
//! 4. [`Site::Block`]: around each feed-forward block, which an adapter may replace (MixLoRA's MoE);
//! 5. [`Site::Param`]: every named tensor, which a delta can be attached to (BitFit, LayerNorm tuning, sparse
//!    fine-tuning);
//! 6. [`Site::Embedding`]: the embedding block's output (invertible adapters; the inverse before a vocabulary
//!    head).
//!
//! A visitor implements one method over the [`Site`] enum, so a wrapper that forwards sites cannot drop a kind
//! without the compiler noticing a non-exhaustive match; [`site_counts`] tallies each kind (every backbone's
//! tests assert its counts).

use crate::nn::{BlockSite, EmbeddingSite, Linear, PrefixSite, ResidualSite};
use crate::param::Param;

/// One site (or parameter) reported by a module.
#[derive(Clone, Copy)]
pub enum Site<'a> {
    /// A named tensor; also the parameter-delta site ([`Param::attach_delta`]).
    Param(&'a Param),
    /// A linear site.
    Linear(&'a Linear),
    /// A residual site.
    Residual(&'a ResidualSite),
    /// An attention-prefix site.
    Prefix(&'a PrefixSite),
    /// A block-replacement site.
    Block(&'a BlockSite),
    /// An embedding-output site.
    Embedding(&'a EmbeddingSite),
}

/// Receives the parameters and sites of a module tree, in a stable order.
pub trait Visitor {
    /// One site or parameter.
    fn site(&mut self, site: Site<'_>);
}

impl dyn Visitor + '_ {
    /// Reports a parameter, then the parameters of the deltas attached to it.
    pub fn param(&mut self, p: &Param) {
        self.site(Site::Param(p));
        for d in p.deltas() {
            for q in d.params() {
                self.site(Site::Param(&q));
            }
        }
    }
}

impl<F: FnMut(Site<'_>)> Visitor for F {
    fn site(&mut self, site: Site<'_>) {
        self(site);
    }
}

/// Anything with parameters and adapter sites. Implementations visit children in a fixed order.
pub trait Module {
    /// Reports this module's parameters and sites (recursively) to `v`.
    fn visit(&self, v: &mut dyn Visitor);
}

impl<M: Module + ?Sized> Module for Box<M> {
    fn visit(&self, v: &mut dyn Visitor) {
        (**self).visit(v);
    }
}

impl<M: Module + ?Sized> Module for &M {
    fn visit(&self, v: &mut dyn Visitor) {
        (**self).visit(v);
    }
}

impl<M: Module + ?Sized> Module for std::sync::Arc<M> {
    fn visit(&self, v: &mut dyn Visitor) {
        (**self).visit(v);
    }
}

/// Every parameter of `m`, in visit order (adapter parameters included).
pub fn named_params(m: &dyn Module) -> Vec<Param> {
    let mut out = Vec::new();
    m.visit(&mut |s: Site<'_>| {
        if let Site::Param(p) = s {
            out.push(p.clone());
        }
    });
    out
}

/// Every linear site of `m` (handles share the site's state).
pub fn linear_sites(m: &dyn Module) -> Vec<Linear> {
    let mut out = Vec::new();
    m.visit(&mut |s: Site<'_>| {
        if let Site::Linear(l) = s {
            out.push(l.clone());
        }
    });
    out
}

/// Every residual site of `m`.
pub fn residual_sites(m: &dyn Module) -> Vec<ResidualSite> {
    let mut out = Vec::new();
    m.visit(&mut |s: Site<'_>| {
        if let Site::Residual(r) = s {
            out.push(r.clone());
        }
    });
    out
}

/// Every embedding-output site of `m`.
pub fn embedding_sites(m: &dyn Module) -> Vec<EmbeddingSite> {
    let mut out = Vec::new();
    m.visit(&mut |s: Site<'_>| {
        if let Site::Embedding(e) = s {
            out.push(e.clone());
        }
    });
    out
}

/// Every attention-prefix site of `m`.
pub fn prefix_sites(m: &dyn Module) -> Vec<PrefixSite> {
    let mut out = Vec::new();
    m.visit(&mut |s: Site<'_>| {
        if let Site::Prefix(p) = s {
            out.push(p.clone());
        }
    });
    out
}

/// Every block-replacement site of `m`.
pub fn block_sites(m: &dyn Module) -> Vec<BlockSite> {
    let mut out = Vec::new();
    m.visit(&mut |s: Site<'_>| {
        if let Site::Block(b) = s {
            out.push(b.clone());
        }
    });
    out
}

/// How many sites of each kind a module exposes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteCounts {
    /// Named tensors (parameter-delta sites), adapter parameters included.
    pub params: usize,
    /// Linear sites.
    pub linear: usize,
    /// Residual sites.
    pub residual: usize,
    /// Attention-prefix sites.
    pub prefix: usize,
    /// Block-replacement sites.
    pub block: usize,
    /// Embedding-output sites.
    pub embedding: usize,
}

/// Counts each kind of site of `m` (a shared site reported twice, such as a tied output layer, counts twice).
pub fn site_counts(m: &dyn Module) -> SiteCounts {
    let mut c = SiteCounts::default();
    m.visit(&mut |s: Site<'_>| match s {
        Site::Param(_) => c.params += 1,
        Site::Linear(_) => c.linear += 1,
        Site::Residual(_) => c.residual += 1,
        Site::Prefix(_) => c.prefix += 1,
        Site::Block(_) => c.block += 1,
        Site::Embedding(_) => c.embedding += 1,
    });
    c
}
