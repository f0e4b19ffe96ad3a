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

    /// The current value as a tensor for the forward pass (trainable leaf or constant).
    pub fn tensor(&self) -> Tensor<E> {
        Tensor::with_id(self.0.id, self.value(), self.trainable())
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
