//! Named, mutable model parameters with a stable tensor id and a trainable flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use ndarray::ArrayD;

use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::tensor::{standard, Data, Tensor, TensorId};

struct ParamInner<E: Elem> {
    name: String,
    id: TensorId,
    value: RwLock<Data<E>>,
    trainable: AtomicBool,
    deltas: RwLock<Vec<DeltaSlot<E>>>,
}

/// A change of a parameter's value attached to it (the parameter-delta site): dense deltas for BitFit or
/// LayerNorm tuning, sparse `(indices, values)` deltas for sparse fine-tuning. While active and not merged,
/// [`Param::tensor`] hands the forward pass [`ParamDelta::apply`] of the stored value instead of the value.
pub trait ParamDelta<E: Elem = f32>: Send + Sync {
    /// The adapter's name.
    fn name(&self) -> &str;
    /// The method, for messages (`"dense-delta"`, `"sparse-delta"`, ...).
    fn kind(&self) -> &str;
    /// The effective value given the stored value `base` (a constant or a trainable leaf): e.g. `base + Δ`.
    /// Must keep `base`'s shape (checked once when attached).
    ///
    /// # Errors
    /// Shape errors from the underlying ops.
    fn apply(&self, base: &Tensor<E>) -> Result<Tensor<E>>;
    /// The dense change `Δ` (shape of the parameter) that merging adds to the stored value.
    ///
    /// # Errors
    /// Implementation-specific.
    fn delta_value(&self) -> Result<ArrayD<E>>;
    /// Its own parameters (e.g. the delta values), named `<param name>.<method>...`.
    fn params(&self) -> Vec<Param<E>>;
}

struct DeltaSlot<E: Elem> {
    delta: Arc<dyn ParamDelta<E>>,
    active: bool,
    merged: bool,
}

/// A model parameter: a checkpoint name (`encoder.layer.0.attention.self.query.weight`), a value that
/// optimizers replace in place, and a trainable flag.
///
/// [`Param::tensor`] hands the current value to the forward pass as a tensor with the parameter's fixed id:
/// a trainable leaf when the flag is set, a constant otherwise, so a frozen parameter builds no graph and
/// gets no gradient. Clones share the same parameter.
///
/// ```
/// use peft_core::Param;
/// let p = Param::new("head.weight", ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 3])), true);
/// let loss = p.tensor().sum_all();
/// let grads = loss.backward()?;
/// assert!(grads.get_id(p.id()).is_some());
/// p.set_trainable(false);
/// assert!(p.tensor().sum_all().backward().is_err());
/// # Ok::<(), peft_core::Error>(())
/// ```
pub struct Param<E: Elem = f32>(Arc<ParamInner<E>>);

impl<E: Elem> Clone for Param<E> {
    fn clone(&self) -> Self {
        Param(Arc::clone(&self.0))
    }
}

impl<E: Elem> std::fmt::Debug for Param<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Param({}, {:?}, trainable={})", self.name(), self.shape(), self.trainable())
    }
}

impl<E: Elem> Param<E> {
    /// A new parameter.
    pub fn new(name: impl Into<String>, value: ArrayD<E>, trainable: bool) -> Self {
        Param(Arc::new(ParamInner {
            name: name.into(),
            id: TensorId::fresh(),
            value: RwLock::new(standard(value)),
            trainable: AtomicBool::new(trainable),
            deltas: RwLock::new(Vec::new()),
        }))
    }

    /// The checkpoint name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The id its tensors (and gradients) carry.
    pub fn id(&self) -> TensorId {
        self.0.id
    }

    /// The current value as a tensor for the forward pass (trainable leaf or constant), with the active,
    /// unmerged deltas applied in attach order.
    pub fn tensor(&self) -> Tensor<E> {
        let base = Tensor::with_id(self.0.id, self.value(), self.trainable());
        let ds = self.0.deltas.read().unwrap_or_else(|p| p.into_inner());
        let mut t = base;
        for d in ds.iter().filter(|d| d.active && !d.merged) {
            // Shapes were checked by `attach_delta`; an error here is a bug of the delta implementation.
            t = d.delta.apply(&t).expect("peft-rs bug: a parameter delta failed after its attach-time check");
        }
        t
    }

    /// Attaches `delta` (active). The delta is applied once to the current value to check that it keeps the
    /// parameter's shape.
    ///
    /// # Errors
    /// [`Error::AdapterState`] when a delta of that name is attached already; [`Error::Shape`] when `apply` changes
    /// the shape; errors of `apply`.
    pub fn attach_delta(&self, delta: Arc<dyn ParamDelta<E>>) -> Result<()> {
        if self.deltas().iter().any(|d| d.name() == delta.name()) {
            return Err(Error::AdapterState {
                op: "attach_delta",
                site: self.name().to_string(),
                adapter: delta.name().to_string(),
                problem: crate::AdapterProblem::Exists,
            });
        }
        let probe = crate::autograd::no_grad(|| delta.apply(&Tensor::new(self.value().to_owned())))?;
        if probe.shape() != self.shape().as_slice() {
            return Err(Error::Shape { op: "attach_delta", lhs: self.shape(), rhs: probe.shape().to_vec() });
        }
        let mut ds = self.0.deltas.write().unwrap_or_else(|p| p.into_inner());
        ds.push(DeltaSlot { delta, active: true, merged: false });
        Ok(())
    }

    /// Detaches the delta `name` (unmerging it first when merged), returning it.
    ///
    /// # Errors
    /// [`Error::UnknownName`]; errors of the unmerge.
    pub fn detach_delta(&self, name: &str) -> Result<Arc<dyn ParamDelta<E>>> {
        if self.is_delta_merged(name)? {
            self.merge_delta_sign(name, false)?;
        }
        let mut ds = self.0.deltas.write().unwrap_or_else(|p| p.into_inner());
        let i = ds.iter().position(|d| d.delta.name() == name).ok_or_else(|| self.unknown_delta(name))?;
        Ok(ds.remove(i).delta)
    }

    /// The attached deltas in attach order.
    pub fn deltas(&self) -> Vec<Arc<dyn ParamDelta<E>>> {
        self.0.deltas.read().unwrap_or_else(|p| p.into_inner()).iter().map(|d| d.delta.clone()).collect()
    }

    /// Makes exactly the deltas named in `names` active.
    pub fn set_active_deltas(&self, names: &[&str]) {
        for d in self.0.deltas.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            d.active = names.contains(&d.delta.name());
        }
    }

    /// Turns delta `name` on or off (a no-op when it is not attached).
    pub fn activate_delta(&self, name: &str, on: bool) {
        for d in self.0.deltas.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            if d.delta.name() == name {
                d.active = on;
            }
        }
    }

    /// Removes delta `name` without unmerging it (a merged change stays in the value).
    ///
    /// # Errors
    /// [`Error::UnknownName`].
    pub fn detach_delta_keep_merged(&self, name: &str) -> Result<Arc<dyn ParamDelta<E>>> {
        let mut ds = self.0.deltas.write().unwrap_or_else(|p| p.into_inner());
        let i = ds.iter().position(|d| d.delta.name() == name).ok_or_else(|| self.unknown_delta(name))?;
        Ok(ds.remove(i).delta)
    }

    /// True when delta `name` is merged into the stored value.
    ///
    /// # Errors
    /// [`Error::UnknownName`].
    pub fn is_delta_merged(&self, name: &str) -> Result<bool> {
        let ds = self.0.deltas.read().unwrap_or_else(|p| p.into_inner());
        ds.iter().find(|d| d.delta.name() == name).map(|d| d.merged).ok_or_else(|| self.unknown_delta(name))
    }

    /// Adds delta `name` into the stored value (checked finite before anything is written); forward then skips it.
    ///
    /// # Errors
    /// [`Error::UnknownName`]; [`Error::AdapterState`] when merged already; [`Error::NonFinite`]; shape errors.
    pub fn merge_delta(&self, name: &str) -> Result<()> {
        self.merge_delta_sign(name, true)
    }

    /// Subtracts a merged delta from the stored value again.
    ///
    /// # Errors
    /// As [`Param::merge_delta`].
    pub fn unmerge_delta(&self, name: &str) -> Result<()> {
        self.merge_delta_sign(name, false)
    }

    fn merge_delta_sign(&self, name: &str, merge: bool) -> Result<()> {
        let mut ds = self.0.deltas.write().unwrap_or_else(|p| p.into_inner());
        let slot = ds.iter_mut().find(|d| d.delta.name() == name).ok_or_else(|| self.unknown_delta(name))?;
        if slot.merged == merge {
            return Err(Error::AdapterState {
                op: "merge_delta",
                site: self.name().to_string(),
                adapter: name.to_string(),
                problem: if merge { crate::AdapterProblem::Merged } else { crate::AdapterProblem::NotMerged },
            });
        }
        let d = slot.delta.delta_value()?;
        let v = self.value();
        if v.shape() != d.shape() {
            return Err(Error::Shape { op: "merge_delta", lhs: v.shape().to_vec(), rhs: d.shape().to_vec() });
        }
        let new = if merge { &v + &d } else { &v - &d };
        if new.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite { what: format!("merged value of {}", self.name()) });
        }
        self.set(new)?;
        slot.merged = merge;
        Ok(())
    }

    fn unknown_delta(&self, name: &str) -> Error {
        Error::UnknownName { name: format!("{}: delta `{name}`", self.name()) }
    }

    /// The current value (a cheap shared handle).
    pub fn value(&self) -> Data<E> {
        self.0.value.read().expect("peft-rs bug: poisoned param lock").clone()
    }

    /// The shape.
    pub fn shape(&self) -> Vec<usize> {
        self.0.value.read().expect("peft-rs bug: poisoned param lock").shape().to_vec()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.value.read().expect("peft-rs bug: poisoned param lock").len()
    }

    /// Replaces the value.
    ///
    /// # Errors
    /// [`Error::Shape`] when the new value has another shape.
    pub fn set(&self, value: ArrayD<E>) -> Result<()> {
        let mut v = self.0.value.write().expect("peft-rs bug: poisoned param lock");
        if v.shape() != value.shape() {
            return Err(Error::Shape { op: "Param::set", lhs: v.shape().to_vec(), rhs: value.shape().to_vec() });
        }
        *v = standard(value);
        Ok(())
    }

    /// Updates the value in place (copy-on-write if a tensor still shares it).
    pub fn update(&self, f: impl FnOnce(&mut ArrayD<E>)) {
        let mut v = self.0.value.write().expect("peft-rs bug: poisoned param lock");
        let mut owned = std::mem::replace(&mut *v, ArrayD::zeros(ndarray::IxDyn(&[0])).into_shared()).into_owned();
        f(&mut owned);
        *v = standard(owned);
    }

    /// Whether the optimizer trains it.
    pub fn trainable(&self) -> bool {
        self.0.trainable.load(Ordering::Relaxed)
    }

    /// Freezes or unfreezes it.
    pub fn set_trainable(&self, on: bool) {
        self.0.trainable.store(on, Ordering::Relaxed);
    }
}
