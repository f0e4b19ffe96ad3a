//! The linear adapter site: `y = base(x) + Σ active adapters' deltas`, with a swappable base (dense f32 by
//! default; quantized kernels plug in here) and merge/unmerge of adapter deltas into a dense base.

use std::sync::{Arc, RwLock};

use ndarray::ArrayD;

use crate::error::{AdapterProblem, Error, Result};
use crate::nn::{Ctx, Module, Site, Visitor, WeightSource};
use crate::param::Param;
use crate::tensor::Tensor;

/// What computes a linear site's base output `x·Wᵀ + b`.
pub trait LinearBase: Send + Sync {
    /// The base output for `x [.., in]`.
    ///
    /// # Errors
    /// Shape errors from the underlying op.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Input features.
    fn in_features(&self) -> usize;
    /// Output features.
    fn out_features(&self) -> usize;
    /// The effective weight `[out, in]` as dense f32 (dequantised where needed), for merges and inits.
    ///
    /// # Errors
    /// Implementation-specific (e.g. a corrupt quantisation state).
    fn dense_weight(&self) -> Result<ArrayD<f32>>;
    /// The bias, if any.
    fn bias(&self) -> Option<Param>;
    /// Adds `delta [out, in]` into the stored weight (merging an adapter).
    ///
    /// # Errors
    /// [`Error::AdapterState`] when the base cannot absorb a delta exactly; [`Error::NonFinite`] when the result
    /// would be non-finite (the base is left untouched).
    fn add_to_weight(&self, delta: &ArrayD<f32>) -> Result<()>;
    /// Its parameters, reported by the site's visitor.
    fn params(&self) -> Vec<Param>;
    /// Bytes held by the base weight (memory accounting).
    fn weight_bytes(&self) -> usize;
    /// For downcasting to the concrete base (a quantized base's own operations).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// The dense f32 base: a `[out, in]` weight and an optional `[out]` bias.
pub struct Dense {
    /// The weight, PyTorch layout `[out, in]`.
    pub weight: Param,
    /// The bias `[out]`.
    pub bias: Option<Param>,
}

impl LinearBase for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.bias.as_ref().map(Param::tensor);
        x.linear(&self.weight.tensor(), b.as_ref())
    }
    fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }
    fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }
    fn dense_weight(&self) -> Result<ArrayD<f32>> {
        Ok(self.weight.value().to_owned())
    }
    fn bias(&self) -> Option<Param> {
        self.bias.clone()
    }
    fn add_to_weight(&self, delta: &ArrayD<f32>) -> Result<()> {
        let w = self.weight.value();
        if w.shape() != delta.shape() {
            return Err(Error::Shape { op: "merge", lhs: w.shape().to_vec(), rhs: delta.shape().to_vec() });
        }
        let merged = &w + delta;
        if merged.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: format!("merged weight of {}", self.weight.name()) });
        }
        self.weight.set(merged)
    }
    fn params(&self) -> Vec<Param> {
        let mut v = vec![self.weight.clone()];
        v.extend(self.bias.clone());
        v
    }
    fn weight_bytes(&self) -> usize {
        self.weight.numel() * 4
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A method attached to a linear site (LoRA, DoRA, IA3, ...).
pub trait LinearAdapter: Send + Sync {
    /// The adapter's name (`"default"` unless the user names it).
    fn name(&self) -> &str;
    /// The method (`"lora"`, `"dora"`, ...), for messages.
    fn kind(&self) -> &str;
    /// The term added to the base output for input `x [.., in]` and base output `base_out [.., out]`; `None` when
    /// the adapter adds nothing (input-side adapters such as IA3 on a feed-forward layer, recorders).
    ///
    /// `x` is the input after the input hooks ([`LinearAdapter::transform_input`]) of the active adapters.
    ///
    /// # Errors
    /// Shape errors from the underlying ops.
    fn delta(&self, x: &Tensor, base_out: &Tensor, base: &dyn LinearBase, ctx: &Ctx) -> Result<Option<Tensor>>;
    /// The input hook: a replacement for the input `x [.., in]` before the base GEMM (IA3 on feed-forward layers
    /// scales the input by a learned vector here, which costs no extra GEMM). Default: none.
    ///
    /// # Errors
    /// Shape errors from the underlying ops.
    fn transform_input(&self, x: &Tensor, ctx: &Ctx) -> Result<Option<Tensor>> {
        let _ = (x, ctx);
        Ok(None)
    }
    /// Its trainable (or frozen) parameters, named `<site path>.<prefix>...`.
    fn params(&self) -> Vec<Param>;
    /// The weight change `[out, in]` this adapter is equivalent to, for merging; `Ok(None)` when it cannot be
    /// merged exactly.
    ///
    /// # Errors
    /// Implementation-specific.
    fn delta_weight(&self, base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>>;
    /// The weight change to subtract when unmerging, given the *merged* base. Defaults to
    /// [`LinearAdapter::delta_weight`]; adapters whose delta depends on the base weight (DoRA) override it.
    ///
    /// # Errors
    /// Implementation-specific.
    fn unmerge_delta_weight(&self, base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        self.delta_weight(base)
    }
    /// The bias change `[out]` merged together with the weight (LoRA with `lora_bias`); `Ok(None)` (the default)
    /// when the adapter leaves the bias alone.
    ///
    /// # Errors
    /// Implementation-specific.
    fn delta_bias(&self) -> Result<Option<ArrayD<f32>>> {
        Ok(None)
    }
}

struct Attached {
    adapter: Arc<dyn LinearAdapter>,
    active: bool,
    merged: bool,
}

struct LinearInner {
    path: String,
    is_output: bool,
    base: RwLock<Arc<dyn LinearBase>>,
    adapters: RwLock<Vec<Attached>>,
}

/// A linear layer that is also an adapter site, named by its module path (`encoder.layer.0.attention.self.query`).
///
/// Cloning gives another handle to the same site, so a method crate can collect sites from a model
/// ([`crate::nn::linear_sites`]) and attach adapters without editing model code.
///
/// ```
/// use peft_core::nn::{Ctx, Linear, RandomInit};
/// use peft_core::Tensor;
/// let lin = Linear::load("proj", 4, 3, true, &RandomInit::new(0, 0.02))?;
/// let y = lin.forward(&Tensor::ones(&[2, 4]), &Ctx::eval())?;
/// assert_eq!(y.shape(), &[2, 3]);
/// # Ok::<(), peft_core::Error>(())
/// ```
#[derive(Clone)]
pub struct Linear(Arc<LinearInner>);

impl Linear {
    /// A site over a dense base.
    pub fn new(path: impl Into<String>, weight: Param, bias: Option<Param>) -> Self {
        Self::with_base(path, Arc::new(Dense { weight, bias }))
    }

    /// A site over any base.
    pub fn with_base(path: impl Into<String>, base: Arc<dyn LinearBase>) -> Self {
        Linear(Arc::new(LinearInner {
            path: path.into(),
            is_output: false,
            base: RwLock::new(base),
            adapters: RwLock::new(Vec::new()),
        }))
    }

    /// Loads `<path>.weight [out, in]` and (if `bias`) `<path>.bias [out]` from `src`; parameters start frozen.
    /// A base that `src` builds itself ([`WeightSource::linear_base`], e.g. a quantized one) is used as is.
    ///
    /// # Errors
    /// Missing or mis-shaped tensors in `src`; [`Error::WeightShape`] when a base built by `src` has other
    /// dimensions.
    pub fn load(path: &str, in_f: usize, out_f: usize, bias: bool, src: &dyn WeightSource) -> Result<Self> {
        if let Some(base) = src.linear_base(path, in_f, out_f, bias)? {
            if (base.out_features(), base.in_features()) != (out_f, in_f) {
                return Err(Error::WeightShape {
                    origin: "WeightSource::linear_base".into(),
                    name: format!("{path}.weight"),
                    expected: vec![out_f, in_f],
                    found: vec![base.out_features(), base.in_features()],
                });
            }
            return Ok(Self::with_base(path, base));
        }
        let w = Param::new(format!("{path}.weight"), src.get(&format!("{path}.weight"), &[out_f, in_f])?, false);
        let b = if bias {
            Some(Param::new(format!("{path}.bias"), src.get_or(&format!("{path}.bias"), &[out_f], 0.0)?, false))
        } else {
            None
        };
        Ok(Self::new(path, w, b))
    }

    /// Marks this site as the model's output layer (skipped by `"all-linear"`).
    pub fn as_output(self) -> Self {
        let inner = Arc::try_unwrap(self.0).unwrap_or_else(|arc| LinearInner {
            path: arc.path.clone(),
            is_output: arc.is_output,
            base: RwLock::new(arc.base.read().unwrap_or_else(|p| p.into_inner()).clone()),
            adapters: RwLock::new(Vec::new()),
        });
        Linear(Arc::new(LinearInner { is_output: true, ..inner }))
    }

    /// The module path.
    pub fn path(&self) -> &str {
        &self.0.path
    }

    /// True for the model's output layer.
    pub fn is_output(&self) -> bool {
        self.0.is_output
    }

    /// The current base.
    pub fn base(&self) -> Arc<dyn LinearBase> {
        self.0.base.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the base (e.g. with a quantized one). Refused while an adapter is merged into the old base.
    ///
    /// # Errors
    /// [`Error::Shape`] when the new base has other dimensions; [`Error::AdapterState`] while adapters are merged.
    pub fn replace_base(&self, base: Arc<dyn LinearBase>) -> Result<()> {
        let old = self.base();
        if (old.in_features(), old.out_features()) != (base.in_features(), base.out_features()) {
            return Err(Error::Shape {
                op: "replace_base",
                lhs: vec![old.out_features(), old.in_features()],
                rhs: vec![base.out_features(), base.in_features()],
            });
        }
        if self.0.adapters.read().unwrap_or_else(|p| p.into_inner()).iter().any(|a| a.merged) {
            let merged = self
                .0
                .adapters
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|a| a.merged)
                .map(|a| a.adapter.name().to_string());
            return Err(Error::AdapterState {
                op: "replace_base",
                site: self.path().to_string(),
                adapter: merged.unwrap_or_default(),
                problem: AdapterProblem::MergedBase,
            });
        }
        *self.0.base.write().unwrap_or_else(|p| p.into_inner()) = base;
        Ok(())
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.base().in_features()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.base().out_features()
    }

    /// Attaches an adapter (active). Names must be unique per site.
    ///
    /// # Errors
    /// [`Error::AdapterState`] when an adapter of that name is already attached.
    pub fn attach(&self, adapter: Arc<dyn LinearAdapter>) -> Result<()> {
        let mut ads = self.0.adapters.write().unwrap_or_else(|p| p.into_inner());
        if ads.iter().any(|a| a.adapter.name() == adapter.name()) {
            return Err(Error::AdapterState {
                op: "attach",
                site: self.path().to_string(),
                adapter: adapter.name().to_string(),
                problem: AdapterProblem::Exists,
            });
        }
        ads.push(Attached { adapter, active: true, merged: false });
        Ok(())
    }

    /// Detaches (deletes) the adapter `name`, returning it. A merged adapter is unmerged first.
    ///
    /// # Errors
    /// [`Error::UnknownName`] when there is no such adapter.
    pub fn detach(&self, name: &str) -> Result<Arc<dyn LinearAdapter>> {
        if self.is_merged(name)? {
            self.unmerge(name)?;
        }
        let mut ads = self.0.adapters.write().unwrap_or_else(|p| p.into_inner());
        let i = ads.iter().position(|a| a.adapter.name() == name).ok_or_else(|| unknown(self.path(), name))?;
        Ok(ads.remove(i).adapter)
    }

    /// The attached adapters in attach order.
    pub fn adapters(&self) -> Vec<Arc<dyn LinearAdapter>> {
        self.0.adapters.read().unwrap_or_else(|p| p.into_inner()).iter().map(|a| a.adapter.clone()).collect()
    }

    /// The adapter named `name`.
    pub fn adapter(&self, name: &str) -> Option<Arc<dyn LinearAdapter>> {
        self.adapters().into_iter().find(|a| a.name() == name)
    }

    /// Makes exactly the adapters in `names` active (others stay attached but unused); an empty list disables all.
    pub fn set_active(&self, names: &[&str]) {
        for a in self.0.adapters.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            a.active = names.contains(&a.adapter.name());
        }
    }

    /// Turns adapter `name` on or off (a no-op when it is not attached here).
    pub fn activate(&self, name: &str, on: bool) {
        for a in self.0.adapters.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            if a.adapter.name() == name {
                a.active = on;
            }
        }
    }

    /// Removes adapter `name` without unmerging it: a merged adapter's change stays in the base weight (what
    /// `merge_and_unload` does), an unmerged one simply leaves.
    ///
    /// # Errors
    /// [`Error::UnknownName`] when there is no such adapter.
    pub fn detach_keep_merged(&self, name: &str) -> Result<Arc<dyn LinearAdapter>> {
        let mut ads = self.0.adapters.write().unwrap_or_else(|p| p.into_inner());
        let i = ads.iter().position(|a| a.adapter.name() == name).ok_or_else(|| unknown(self.path(), name))?;
        Ok(ads.remove(i).adapter)
    }

    /// Names of the active adapters.
    pub fn active(&self) -> Vec<String> {
        let ads = self.0.adapters.read().unwrap_or_else(|p| p.into_inner());
        ads.iter().filter(|a| a.active).map(|a| a.adapter.name().to_string()).collect()
    }

    /// True when `name` is merged into the base weight.
    ///
    /// # Errors
    /// [`Error::UnknownName`] when there is no such adapter.
    pub fn is_merged(&self, name: &str) -> Result<bool> {
        let ads = self.0.adapters.read().unwrap_or_else(|p| p.into_inner());
        ads.iter().find(|a| a.adapter.name() == name).map(|a| a.merged).ok_or_else(|| unknown(self.path(), name))
    }

    /// Adds the adapter's delta weight into the base (safe: checked finite before committing); forward then skips
    /// the adapter.
    ///
    /// # Errors
    /// [`Error::UnknownName`]; [`Error::AdapterState`] when already merged or not mergeable; [`Error::NonFinite`].
    pub fn merge(&self, name: &str) -> Result<()> {
        self.merge_sign(name, true)
    }

    /// Subtracts a merged adapter's delta weight from the base again.
    ///
    /// # Errors
    /// As [`Linear::merge`].
    pub fn unmerge(&self, name: &str) -> Result<()> {
        self.merge_sign(name, false)
    }

    fn merge_sign(&self, name: &str, merge: bool) -> Result<()> {
        let op = if merge { "merge" } else { "unmerge" };
        let mut ads = self.0.adapters.write().unwrap_or_else(|p| p.into_inner());
        let a = ads.iter_mut().find(|a| a.adapter.name() == name).ok_or_else(|| unknown(&self.0.path, name))?;
        if a.merged == merge {
            return Err(Error::AdapterState {
                op,
                site: self.0.path.clone(),
                adapter: name.to_string(),
                problem: if merge { AdapterProblem::Merged } else { AdapterProblem::NotMerged },
            });
        }
        let base = self.base();
        let delta = if merge {
            a.adapter.delta_weight(base.as_ref())?
        } else {
            a.adapter.unmerge_delta_weight(base.as_ref())?
        };
        let Some(delta) = delta else {
            return Err(Error::AdapterState {
                op,
                site: self.0.path.clone(),
                adapter: name.to_string(),
                problem: AdapterProblem::NotMergeable(a.adapter.kind().to_string()),
            });
        };
        let delta = if merge { delta } else { delta.mapv(|v| -v) };
        // The bias change is checked (base has a bias, shapes, finite) before anything is written.
        let new_bias = match a.adapter.delta_bias()? {
            None => None,
            Some(db) => {
                let Some(bias) = base.bias() else {
                    return Err(Error::AdapterState {
                        op,
                        site: self.0.path.clone(),
                        adapter: name.to_string(),
                        problem: AdapterProblem::BiasWithoutBaseBias,
                    });
                };
                let b = bias.value();
                if b.shape() != db.shape() {
                    return Err(Error::Shape { op: "merge", lhs: b.shape().to_vec(), rhs: db.shape().to_vec() });
                }
                let nb = if merge { &b + &db } else { &b - &db };
                if nb.iter().any(|v| !v.is_finite()) {
                    return Err(Error::NonFinite { what: format!("merged bias of {}", bias.name()) });
                }
                Some((bias.clone(), nb))
            }
        };
        base.add_to_weight(&delta)?;
        if let Some((bias, nb)) = new_bias {
            bias.set(nb)?;
        }
        a.merged = merge;
        Ok(())
    }

    /// `y = base(x) + Σ deltas of active, unmerged adapters`. With per-sample adapter names in `ctx`, each
    /// adapter's delta is applied only to the samples (rows of axis 0) routed to it.
    ///
    /// # Errors
    /// Shape errors; [`Error::Count`] for a mixed batch whose name count differs from the batch size, [`Error::AdapterState`] for one that
    /// routes to a merged adapter.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let base = self.base();
        let ads = self.0.adapters.read().unwrap_or_else(|p| p.into_inner());
        if ads.is_empty() {
            return base.forward(x);
        }
        match ctx.adapter_names() {
            None => {
                let mut xin = x.clone();
                for a in ads.iter().filter(|a| a.active && !a.merged) {
                    if let Some(t) = a.adapter.transform_input(&xin, ctx)? {
                        xin = t;
                    }
                }
                let base_out = base.forward(&xin)?;
                let mut y = base_out.clone();
                for a in ads.iter().filter(|a| a.active && !a.merged) {
                    if let Some(d) = a.adapter.delta(&xin, &base_out, base.as_ref(), ctx)? {
                        y = y.add(&d)?;
                    }
                }
                Ok(y)
            }
            Some(names) => {
                let batch = x.shape().first().copied().unwrap_or(0);
                if names.len() != batch {
                    return Err(Error::Count {
                        op: "forward",
                        what: "adapter names per batch row",
                        expected: batch,
                        got: names.len(),
                    });
                }
                // As PEFT: a merged adapter would act on every row, including rows routed elsewhere.
                if let Some(a) = ads.iter().find(|a| a.merged) {
                    return Err(Error::AdapterState {
                        op: "forward",
                        site: self.0.path.clone(),
                        adapter: a.adapter.name().to_string(),
                        problem: AdapterProblem::MergedInMixedBatch,
                    });
                }
                let base_out = base.forward(x)?;
                match mixed_delta(&ads, names, x, &base_out, base.as_ref(), ctx, &self.0.path)? {
                    Some(d) => base_out.add(&d),
                    None => Ok(base_out),
                }
            }
        }
    }
}

/// The delta of a mixed batch: each adapter runs on the rows routed to it only (a gather of those rows of `x`
/// and `base_out`), and the sub-batch deltas are put back in row order (a concat then one `index_select`; rows
/// routed to no attached adapter get a zero row). `None` when no row is routed to an attached adapter.
fn mixed_delta(
    ads: &[Attached],
    names: &[String],
    x: &Tensor,
    base_out: &Tensor,
    base: &dyn LinearBase,
    ctx: &Ctx,
    path: &str,
) -> Result<Option<Tensor>> {
    let batch = names.len();
    let mut parts: Vec<Tensor> = Vec::new();
    let mut pos = vec![usize::MAX; batch];
    let mut offset = 0;
    for a in ads {
        let rows: Vec<usize> = (0..batch).filter(|&i| names[i] == a.adapter.name()).collect();
        if rows.is_empty() {
            continue;
        }
        let (xs, bs) = if rows.len() == batch {
            (x.clone(), base_out.clone())
        } else {
            (x.index_select(0, &rows)?, base_out.index_select(0, &rows)?)
        };
        if a.adapter.transform_input(&xs, ctx)?.is_some() {
            return Err(Error::AdapterState {
                op: "forward",
                site: path.to_string(),
                adapter: a.adapter.name().to_string(),
                problem: AdapterProblem::ScalesInput(a.adapter.kind().to_string()),
            });
        }
        let Some(d) = a.adapter.delta(&xs, &bs, base, ctx)? else { continue };
        for (k, &r) in rows.iter().enumerate() {
            pos[r] = offset + k;
        }
        offset += rows.len();
        parts.push(d);
    }
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    if pos.contains(&usize::MAX) {
        let mut zshape = first.shape().to_vec();
        zshape[0] = 1;
        parts.push(Tensor::zeros(&zshape));
        for p in pos.iter_mut().filter(|p| **p == usize::MAX) {
            *p = offset;
        }
    }
    if parts.len() == 1 && pos.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(parts.pop());
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    Ok(Some(Tensor::concat(&refs, 0)?.index_select(0, &pos)?))
}

fn unknown(path: &str, name: &str) -> Error {
    Error::UnknownName { name: format!("{path}: adapter `{name}`") }
}

impl Module for Linear {
    fn visit(&self, v: &mut dyn Visitor) {
        v.site(Site::Linear(self));
        for p in self.base().params() {
            v.param(&p);
        }
        for a in self.adapters() {
            for p in a.params() {
                v.param(&p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::IxDyn;

    use super::*;
    use crate::nn::RandomInit;

    /// A toy adapter: delta = x · Dᵀ for a trainable D [out, in].
    struct Toy {
        d: Param,
    }
    impl LinearAdapter for Toy {
        fn name(&self) -> &str {
            "toy"
        }
        fn kind(&self) -> &str {
            "toy"
        }
        fn delta(&self, x: &Tensor, _y: &Tensor, _b: &dyn LinearBase, _c: &Ctx) -> Result<Option<Tensor>> {
            x.linear(&self.d.tensor(), None).map(Some)
        }
        fn params(&self) -> Vec<Param> {
            vec![self.d.clone()]
        }
        fn delta_weight(&self, _b: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
            Ok(Some(self.d.value().to_owned()))
        }
    }

    /// An IA3-style input scaling: the input hook multiplies `x` by a learned `l [in]` before the base GEMM; its
    /// merge is the column scaling `W·diag(l)`, as an additive delta `W·diag(l − 1)`.
    struct InScale {
        l: Param,
    }
    impl LinearAdapter for InScale {
        fn name(&self) -> &str {
            "ia3"
        }
        fn kind(&self) -> &str {
            "input-scale"
        }
        fn delta(&self, _x: &Tensor, _y: &Tensor, _b: &dyn LinearBase, _c: &Ctx) -> Result<Option<Tensor>> {
            Ok(None)
        }
        fn transform_input(&self, x: &Tensor, _ctx: &Ctx) -> Result<Option<Tensor>> {
            x.mul(&self.l.tensor()).map(Some)
        }
        fn params(&self) -> Vec<Param> {
            vec![self.l.clone()]
        }
        fn delta_weight(&self, b: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
            let w = b.dense_weight()?;
            let l = self.l.value();
            Ok(Some(ArrayD::from_shape_fn(w.raw_dim(), |ix| w[&ix] * (l[[ix[1]]] - 1.0))))
        }
        fn unmerge_delta_weight(&self, b: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
            // W' = W·diag(l) -> W = W'·diag(1/l); the change to subtract is W' − W.
            let w = b.dense_weight()?;
            let l = self.l.value();
            Ok(Some(ArrayD::from_shape_fn(w.raw_dim(), |ix| w[&ix] * (1.0 - 1.0 / l[[ix[1]]]))))
        }
    }

    #[test]
    fn input_hook_scales_before_the_gemm_merges_and_has_exact_gradients() {
        let lin = Linear::load("l", 3, 2, true, &RandomInit::new(1, 0.5)).unwrap();
        let x = Tensor::new(RandomInit::new(3, 1.0).get("x", &[4, 3]).unwrap());
        let l = Param::new("l.ia3", ndarray::arr1(&[0.5f32, 2.0, 1.5]).into_dyn(), true);
        let y0 = lin.forward(&x.mul(&l.tensor()).unwrap(), &Ctx::eval()).unwrap();
        lin.attach(Arc::new(InScale { l: l.clone() })).unwrap();
        let y1 = lin.forward(&x, &Ctx::eval()).unwrap();
        assert!(crate::testing::max_abs_diff(y0.as_slice(), y1.as_slice()) < 1e-6, "y = W (l ⊙ x) + b");
        // The gradient w.r.t. l by finite differences.
        let r = Tensor::new(RandomInit::new(4, 1.0).get("r", &[4, 2]).unwrap());
        let loss = || lin.forward(&x, &Ctx::eval()).unwrap().mul(&r).unwrap().sum_all();
        let g = loss().backward().unwrap().get_id(l.id()).unwrap().to_owned();
        for i in 0..3 {
            let v0 = l.value().to_owned();
            let mut vp = v0.clone();
            vp[[i]] += 1e-2;
            l.set(vp).unwrap();
            let lp = crate::no_grad(loss).item().unwrap();
            let mut vm = v0.clone();
            vm[[i]] -= 1e-2;
            l.set(vm).unwrap();
            let lm = crate::no_grad(loss).item().unwrap();
            l.set(v0).unwrap();
            let num = (lp - lm) / 2e-2;
            assert!((g[[i]] - num).abs() < 2e-3 * (1.0 + num.abs()), "{i}: {} vs {num}", g[[i]]);
        }
        let w0 = lin.base().dense_weight().unwrap();
        lin.merge("ia3").unwrap();
        let ym = lin.forward(&x, &Ctx::eval()).unwrap();
        assert!(crate::testing::max_abs_diff(ym.as_slice(), y1.as_slice()) < 1e-5, "merged = W·diag(l)");
        lin.unmerge("ia3").unwrap();
        let w1 = lin.base().dense_weight().unwrap();
        assert!(crate::testing::max_abs_diff(w0.as_slice().unwrap(), w1.as_slice().unwrap()) < 1e-6);
        // Input-side adapters cannot serve a mixed batch (their scaling would need per-row bases).
        let ctx = Ctx::eval().with_adapter_names(vec!["ia3".into(); 4]);
        assert!(lin.forward(&x, &ctx).is_err());
    }

    fn site() -> (Linear, Param) {
        let lin = Linear::load("l", 3, 2, true, &RandomInit::new(1, 0.5)).unwrap();
        let d = Param::new("l.toy", RandomInit::new(2, 0.5).get("d", &[2, 3]).unwrap(), true);
        lin.attach(Arc::new(Toy { d: d.clone() })).unwrap();
        (lin, d)
    }

    #[test]
    fn merge_then_forward_equals_unmerged_and_unmerge_restores_base() {
        let (lin, _) = site();
        let x = Tensor::new(RandomInit::new(3, 1.0).get("x", &[4, 3]).unwrap());
        let w0 = lin.base().dense_weight().unwrap();
        let y0 = lin.forward(&x, &Ctx::eval()).unwrap();
        lin.merge("toy").unwrap();
        let y1 = lin.forward(&x, &Ctx::eval()).unwrap();
        assert!(crate::testing::max_abs_diff(y0.as_slice(), y1.as_slice()) < 1e-6);
        lin.unmerge("toy").unwrap();
        let w2 = lin.base().dense_weight().unwrap();
        assert!(crate::testing::max_abs_diff(w0.as_slice().unwrap(), w2.as_slice().unwrap()) < 1e-6);
        assert!(lin.unmerge("toy").is_err());
    }

    #[test]
    fn frozen_base_gets_no_gradient_adapter_does() {
        let (lin, d) = site();
        let x = Tensor::new(ArrayD::ones(IxDyn(&[2, 3])));
        let g = lin.forward(&x, &Ctx::eval()).unwrap().sum_all().backward().unwrap();
        assert!(g.get_id(d.id()).is_some());
        for p in lin.base().params() {
            assert!(g.get_id(p.id()).is_none(), "{} got a gradient", p.name());
        }
    }

    #[test]
    fn inactive_adapter_is_skipped_and_mixed_batch_routes_rows() {
        let (lin, _) = site();
        let x = Tensor::new(RandomInit::new(3, 1.0).get("x", &[2, 3]).unwrap());
        let with = lin.forward(&x, &Ctx::eval()).unwrap();
        lin.set_active(&[]);
        let base = lin.forward(&x, &Ctx::eval()).unwrap();
        assert!(crate::testing::max_abs_diff(with.as_slice(), base.as_slice()) > 1e-4);
        let ctx = Ctx::eval().with_adapter_names(vec!["toy".into(), "__base__".into()]);
        let mixed = lin.forward(&x, &ctx).unwrap();
        assert_eq!(&mixed.as_slice()[..2], &with.as_slice()[..2]);
        assert_eq!(&mixed.as_slice()[2..], &base.as_slice()[2..]);
    }

    #[test]
    fn unsafe_merge_with_non_finite_delta_leaves_base_untouched() {
        let lin = Linear::load("l", 3, 2, false, &RandomInit::new(1, 0.5)).unwrap();
        let d = Param::new("l.toy", ArrayD::from_elem(IxDyn(&[2, 3]), f32::NAN), true);
        lin.attach(Arc::new(Toy { d })).unwrap();
        let w0 = lin.base().dense_weight().unwrap();
        assert!(matches!(lin.merge("toy"), Err(Error::NonFinite { .. })));
        assert_eq!(lin.base().dense_weight().unwrap(), w0);
        assert!(!lin.is_merged("toy").unwrap());
    }

    #[test]
    fn duplicate_and_unknown_adapter_names_are_errors() {
        let (lin, d) = site();
        assert!(lin.attach(Arc::new(Toy { d })).is_err());
        assert!(matches!(lin.merge("nope"), Err(Error::UnknownName { .. })));
        assert!(lin.detach("toy").is_ok());
        assert!(lin.adapters().is_empty());
    }

    /// A toy adapter with a name: delta = x · Dᵀ.
    struct Named {
        name: String,
        d: Param,
    }
    impl LinearAdapter for Named {
        fn name(&self) -> &str {
            &self.name
        }
        fn kind(&self) -> &str {
            "toy"
        }
        fn delta(&self, x: &Tensor, _y: &Tensor, _b: &dyn LinearBase, _c: &Ctx) -> Result<Option<Tensor>> {
            x.linear(&self.d.tensor(), None).map(Some)
        }
        fn params(&self) -> Vec<Param> {
            vec![self.d.clone()]
        }
        fn delta_weight(&self, _b: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
            Ok(Some(self.d.value().to_owned()))
        }
    }

    #[test]
    fn mixed_batch_rows_equal_single_adapter_runs_and_gradients_stay_per_adapter() {
        let lin = Linear::load("l", 4, 3, true, &RandomInit::new(1, 0.5)).unwrap();
        let ds: Vec<Param> = (0..3)
            .map(|i| Param::new(format!("l.a{i}"), RandomInit::new(10 + i, 0.5).get("d", &[3, 4]).unwrap(), true))
            .collect();
        for (i, d) in ds.iter().enumerate() {
            lin.attach(Arc::new(Named { name: format!("a{i}"), d: d.clone() })).unwrap();
        }
        // [batch 7, seq 2, in 4]: rows for a2, base, a0, a2, unknown, a0, a2 (a1 unused).
        let x = Tensor::new(RandomInit::new(3, 1.0).get("x", &[7, 2, 4]).unwrap());
        let names: Vec<String> =
            ["a2", "__base__", "a0", "a2", "zzz", "a0", "a2"].iter().map(|s| s.to_string()).collect();
        let mixed = lin.forward(&x, &Ctx::eval().with_adapter_names(names.clone())).unwrap();
        let single = |n: &str| {
            lin.set_active(if n == "__base__" || n == "zzz" { &[] } else { std::slice::from_ref(&n) });
            lin.forward(&x, &Ctx::eval()).unwrap()
        };
        let row = 2 * 3;
        for (i, n) in names.iter().enumerate() {
            let want = single(n);
            let err = crate::testing::max_abs_diff(
                &mixed.as_slice()[i * row..(i + 1) * row],
                &want.as_slice()[i * row..(i + 1) * row],
            );
            assert!(err < 1e-6, "row {i} ({n}): {err}");
        }
        // One adapter on every row: the plain single-adapter forward.
        let all = lin.forward(&x, &Ctx::eval().with_adapter_names(vec!["a1".into(); 7])).unwrap();
        assert!(crate::testing::max_abs_diff(all.as_slice(), single("a1").as_slice()) < 1e-6);
        // Gradients: a0 gets dL/dD0 = Σ over its rows only; a1 (no rows) gets none.
        let g = lin.forward(&x, &Ctx::eval().with_adapter_names(names)).unwrap().sum_all().backward().unwrap();
        assert!(g.get_id(ds[1].id()).is_none());
        let g0 = g.get_id(ds[0].id()).unwrap();
        // d/dD0 Σ x_r·D0ᵀ over rows r ∈ {2, 5}: each output unit gets Σ x_r over those rows and positions.
        let xs = x.data();
        let mut want = [0f32; 4];
        for r in [2, 5] {
            for t in 0..2 {
                for (k, w) in want.iter_mut().enumerate() {
                    *w += xs[[r, t, k]];
                }
            }
        }
        for o in 0..3 {
            for (k, w) in want.iter().enumerate() {
                assert!((g0[[o, k]] - w).abs() < 1e-5);
            }
        }
    }

    /// A source that builds its own base for `"own"` (a dense base of the given dims, or a wrong-sized one) and
    /// leaves every other path to the dense default.
    struct OwnBase {
        wrong: bool,
        inner: RandomInit,
    }

    impl WeightSource for OwnBase {
        fn get(&self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
            self.inner.get(name, shape)
        }
        fn contains(&self, _name: &str) -> bool {
            true
        }
        fn linear_base(
            &self,
            path: &str,
            in_f: usize,
            out_f: usize,
            _bias: bool,
        ) -> Result<Option<Arc<dyn LinearBase>>> {
            if path != "own" {
                return Ok(None);
            }
            let out_f = if self.wrong { out_f + 1 } else { out_f };
            let weight = Param::new("own.weight", ArrayD::from_elem(IxDyn(&[out_f, in_f]), 0.5), false);
            Ok(Some(Arc::new(Dense { weight, bias: None })))
        }
    }

    #[test]
    fn load_uses_a_base_the_source_builds_and_checks_its_dims() {
        let src = OwnBase { wrong: false, inner: RandomInit::new(1, 0.5) };
        let own = Linear::load("own", 3, 2, true, &src).unwrap();
        assert_eq!(own.base().dense_weight().unwrap(), ArrayD::from_elem(IxDyn(&[2, 3]), 0.5));
        assert!(own.base().bias().is_none(), "the source's base is used as built");
        let other = Linear::load("other", 3, 2, true, &src).unwrap();
        assert!(other.base().bias().is_some());
        let bad = OwnBase { wrong: true, inner: RandomInit::new(1, 0.5) };
        assert!(matches!(Linear::load("own", 3, 2, false, &bad), Err(Error::WeightShape { .. })));
    }
}
