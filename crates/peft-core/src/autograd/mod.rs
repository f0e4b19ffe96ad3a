//! Reverse-mode autodiff: the graph node an op records, the backward sweep and the gradient store.
//!
//! An op records a [`Node`] only when one of its inputs tracks gradients. The node holds the inputs and a
//! backward closure that maps the output gradient to one gradient per input, computing only those whose input
//! tracks (the `needs` mask). The sweep visits nodes in decreasing id order (ids are monotonic, so that is a
//! reverse topological order), never recursing, and frees each intermediate gradient as soon as it is used.

mod grad_store;
mod no_grad;

pub use grad_store::GradStore;
pub use no_grad::{is_grad_enabled, no_grad, NoGradGuard};

use std::collections::{HashMap, HashSet};

use ndarray::{ArrayD, IxDyn};

use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::tensor::{Data, Tensor, TensorId, Track};

/// The backward rule of one op: `(grad_out, needs) -> one optional gradient per input`.
///
/// `needs[i]` is true when input `i` tracks gradients; the rule may return `None` where it is false.
pub type BackwardFn<E> = Box<dyn Fn(&ArrayD<E>, &[bool]) -> Vec<Option<ArrayD<E>>> + Send + Sync>;

/// The record of one op in the graph.
pub struct Node<E: Elem> {
    pub(crate) name: &'static str,
    pub(crate) inputs: Vec<Tensor<E>>,
    pub(crate) backward: BackwardFn<E>,
}

/// Builds the output tensor of an op: records a node when any input tracks and grad mode is on.
///
/// This is the one entry point every op uses. `backward` is only called with `needs[i] == inputs[i].tracks()`.
pub fn record<E: Elem>(
    name: &'static str,
    out: ArrayD<E>,
    inputs: &[&Tensor<E>],
    backward: impl Fn(&ArrayD<E>, &[bool]) -> Vec<Option<ArrayD<E>>> + Send + Sync + 'static,
) -> Tensor<E> {
    record_data(name, crate::tensor::standard(out), inputs, backward)
}

/// Like [`record`] for an output already held as shared data (ops whose backward reuses their output).
pub fn record_data<E: Elem>(
    name: &'static str,
    data: Data<E>,
    inputs: &[&Tensor<E>],
    backward: impl Fn(&ArrayD<E>, &[bool]) -> Vec<Option<ArrayD<E>>> + Send + Sync + 'static,
) -> Tensor<E> {
    if is_grad_enabled() && inputs.iter().any(|t| t.tracks()) {
        let node = Node { name, inputs: inputs.iter().map(|t| (*t).clone()).collect(), backward: Box::new(backward) };
        Tensor::from_parts(TensorId::fresh(), data, Track::Op(node))
    } else {
        Tensor::from_parts(TensorId::fresh(), data, Track::None)
    }
}

pub(crate) fn backward<E: Elem>(root: &Tensor<E>, seed: Option<ArrayD<E>>) -> Result<GradStore<E>> {
    if !root.tracks() {
        return Err(Error::NoGraph);
    }
    // Collect every tracked tensor reachable from the root (iterative DFS).
    let mut seen: HashSet<TensorId> = HashSet::new();
    let mut order: Vec<Tensor<E>> = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(t) = stack.pop() {
        if !seen.insert(t.id()) {
            continue;
        }
        if let Track::Op(node) = &t.0.track {
            for inp in &node.inputs {
                if inp.tracks() && !seen.contains(&inp.id()) {
                    stack.push(inp.clone());
                }
            }
        }
        order.push(t);
    }
    order.sort_by_key(|t| std::cmp::Reverse(t.id()));

    let mut grads: HashMap<TensorId, ArrayD<E>> = HashMap::new();
    grads.insert(root.id(), seed.unwrap_or_else(|| ArrayD::from_elem(IxDyn(root.shape()), E::one())));
    let mut store = GradStore::default();
    for t in order {
        let Some(g) = grads.remove(&t.id()) else {
            continue;
        };
        match &t.0.track {
            Track::Leaf => store.insert(t.id(), g),
            Track::Op(node) => {
                let needs: Vec<bool> = node.inputs.iter().map(|i| i.tracks()).collect();
                let input_grads = (node.backward)(&g, &needs);
                debug_assert_eq!(input_grads.len(), node.inputs.len(), "peft-rs bug: {} backward arity", node.name);
                for ((inp, need), ig) in node.inputs.iter().zip(&needs).zip(input_grads) {
                    if !need {
                        continue;
                    }
                    let Some(ig) = ig else { continue };
                    debug_assert_eq!(ig.shape(), inp.shape(), "peft-rs bug: {} gradient shape", node.name);
                    match grads.get_mut(&inp.id()) {
                        Some(acc) => *acc += &ig,
                        None => {
                            grads.insert(inp.id(), ig);
                        }
                    }
                }
            }
            Track::None => {}
        }
    }
    Ok(store)
}
