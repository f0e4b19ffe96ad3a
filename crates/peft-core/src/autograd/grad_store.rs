//! The gradients returned by `backward`, keyed by tensor id.

use std::collections::HashMap;

use ndarray::ArrayD;

use crate::elem::Elem;
use crate::tensor::{Tensor, TensorId};

/// Gradients of the trainable leaves reached by a backward pass.
pub struct GradStore<E: Elem = f32> {
    grads: HashMap<TensorId, ArrayD<E>>,
}

impl<E: Elem> Default for GradStore<E> {
    fn default() -> Self {
        GradStore { grads: HashMap::new() }
    }
}

impl<E: Elem> GradStore<E> {
    /// The gradient of `t`, if `t` is a trainable leaf that the loss depends on.
    pub fn get(&self, t: &Tensor<E>) -> Option<&ArrayD<E>> {
        self.grads.get(&t.id())
    }

    /// The gradient by id.
    pub fn get_id(&self, id: TensorId) -> Option<&ArrayD<E>> {
        self.grads.get(&id)
    }

    /// Removes and returns the gradient by id.
    pub fn remove(&mut self, id: TensorId) -> Option<ArrayD<E>> {
        self.grads.remove(&id)
    }

    /// Inserts or replaces a gradient.
    pub fn insert(&mut self, id: TensorId, g: ArrayD<E>) {
        self.grads.insert(id, g);
    }

    /// Adds `g` into the stored gradient for `id` (gradient accumulation).
    pub fn accumulate(&mut self, id: TensorId, g: &ArrayD<E>) {
        match self.grads.get_mut(&id) {
            Some(acc) => *acc += g,
            None => {
                self.grads.insert(id, g.clone());
            }
        }
    }

    /// Number of gradients held.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// True when no gradient is held.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Iterates over (id, gradient).
    pub fn iter(&self) -> impl Iterator<Item = (&TensorId, &ArrayD<E>)> {
        self.grads.iter()
    }
}
