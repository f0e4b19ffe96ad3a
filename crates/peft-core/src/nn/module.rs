//! Walking a model: every module reports its parameters and adapter sites to a [`Visitor`].

use crate::nn::{Linear, ResidualSite};
use crate::param::Param;

/// Receives the parameters and sites of a module tree, in a stable order.
pub trait Visitor {
    /// A parameter (named by its checkpoint path).
    fn param(&mut self, _p: &Param) {}
    /// A linear adapter site.
    fn linear(&mut self, _l: &Linear) {}
    /// A residual adapter site.
    fn residual(&mut self, _r: &ResidualSite) {}
}

/// Anything with parameters and adapter sites. Implementations visit children in a fixed order.
pub trait Module {
    /// Reports this module's parameters and sites (recursively) to `v`.
    fn visit(&self, v: &mut dyn Visitor);
}

/// Every parameter of `m`, in visit order (adapter parameters included).
pub fn named_params(m: &dyn Module) -> Vec<Param> {
    struct V(Vec<Param>);
    impl Visitor for V {
        fn param(&mut self, p: &Param) {
            self.0.push(p.clone());
        }
    }
    let mut v = V(Vec::new());
    m.visit(&mut v);
    v.0
}

/// Every linear site of `m` (handles share the site's state).
pub fn linear_sites(m: &dyn Module) -> Vec<Linear> {
    struct V(Vec<Linear>);
    impl Visitor for V {
        fn linear(&mut self, l: &Linear) {
            self.0.push(l.clone());
        }
    }
    let mut v = V(Vec::new());
    m.visit(&mut v);
    v.0
}

/// Every residual site of `m`.
pub fn residual_sites(m: &dyn Module) -> Vec<ResidualSite> {
    struct V(Vec<ResidualSite>);
    impl Visitor for V {
        fn residual(&mut self, r: &ResidualSite) {
            self.0.push(r.clone());
        }
    }
    let mut v = V(Vec::new());
    m.visit(&mut v);
    v.0
}
