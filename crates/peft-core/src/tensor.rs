//! The tensor handle: shared, immutable f32/f64 storage plus an optional autodiff node.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ndarray::{ArcArray, ArrayD, ArrayViewD, Axis, IxDyn};

use crate::autograd::{self, Node};
use crate::elem::Elem;
use crate::error::{Error, Result};

/// Storage of a tensor: a reference-counted, copy-on-write, always C-contiguous n-d array.
pub type Data<E> = ArcArray<E, IxDyn>;

/// Unique id of a tensor (monotonic: an op's output always has a larger id than its inputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub(crate) u64);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl TensorId {
    /// A fresh id, larger than every id handed out before.
    pub fn fresh() -> Self {
        TensorId(NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }
}

/// How a tensor takes part in autodiff.
pub(crate) enum Track<E: Elem> {
    /// A constant: no gradient flows to or through it (frozen weights, inputs, results under `no_grad`).
    None,
    /// A trainable leaf: gradients are collected for it.
    Leaf,
    /// The output of an op whose inputs include tracked tensors.
    Op(Node<E>),
}

pub(crate) struct Inner<E: Elem> {
    pub(crate) id: TensorId,
    pub(crate) data: Data<E>,
    pub(crate) track: Track<E>,
}

/// An n-dimensional array of `E` (default `f32`) that may take part in reverse-mode autodiff.
///
/// Cloning is cheap (an `Arc` bump). The data is immutable; ops return new tensors. A tensor records the op that
/// produced it only when one of that op's inputs *tracks* gradients (is a [`Tensor::var`] or was computed from
/// one), so work on frozen weights builds no graph and costs nothing in backward.
///
/// ```
/// use peft_core::Tensor;
/// let w = Tensor::var(ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0]]).into_dyn());
/// let x = Tensor::new(ndarray::arr2(&[[1.0f32], [1.0]]).into_dyn());
/// let loss = w.matmul(&x)?.sum_all();
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&w).unwrap().as_slice().unwrap(), &[1.0, 1.0, 1.0, 1.0]);
/// # Ok::<(), peft_core::Error>(())
/// ```
pub struct Tensor<E: Elem = f32>(pub(crate) Arc<Inner<E>>);

impl<E: Elem> Clone for Tensor<E> {
    fn clone(&self) -> Self {
        Tensor(Arc::clone(&self.0))
    }
}

impl<E: Elem> fmt::Debug for Tensor<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0.track {
            Track::None => "const",
            Track::Leaf => "var",
            Track::Op(ref n) => n.name,
        };
        write!(f, "Tensor<{}>({:?}, {kind}, id {})", E::DTYPE, self.shape(), self.0.id.0)
    }
}

pub(crate) fn standard<E: Elem>(a: ArrayD<E>) -> Data<E> {
    if a.is_standard_layout() {
        a.into_shared()
    } else {
        standard_copy(a.view()).into_shared()
    }
}

/// Innermost run length from which [`standard_copy`] copies whole rows instead of single elements.
const MIN_RUN: usize = 8;

/// `v` copied into a new standard-layout array. When the last axis is contiguous and at least [`MIN_RUN`] long
/// (the attention head split `[B, L, H, D] -> [B, H, L, D]` and its inverse in `permute`, any transposed op
/// output given to [`standard`]), each row is one slice copy; otherwise ndarray's element-by-element copy.
pub(crate) fn standard_copy<E: Elem>(v: ArrayViewD<'_, E>) -> ArrayD<E> {
    let rank = v.ndim();
    if v.is_standard_layout() || rank < 2 || v.strides()[rank - 1] != 1 || v.shape()[rank - 1] < MIN_RUN {
        return v.as_standard_layout().into_owned();
    }
    let mut out = Vec::with_capacity(v.len());
    for row in v.lanes(Axis(rank - 1)) {
        out.extend_from_slice(row.to_slice().expect("peft-rs bug: unit-stride lane"));
    }
    ArrayD::from_shape_vec(v.raw_dim(), out).expect("peft-rs bug: standard_copy shape")
}

impl<E: Elem> Tensor<E> {
    /// A constant tensor (no gradient flows to it).
    pub fn new(data: ArrayD<E>) -> Self {
        Self::from_parts(TensorId::fresh(), standard(data), Track::None)
    }

    /// A trainable leaf tensor: `backward` returns a gradient for it.
    pub fn var(data: ArrayD<E>) -> Self {
        Self::from_parts(TensorId::fresh(), standard(data), Track::Leaf)
    }

    /// A tensor with a given id; used by [`crate::Param`] so a parameter keeps one id across steps.
    pub(crate) fn with_id(id: TensorId, data: Data<E>, trainable: bool) -> Self {
        let track = if trainable { Track::Leaf } else { Track::None };
        Self::from_parts(id, data, track)
    }

    pub(crate) fn from_parts(id: TensorId, data: Data<E>, track: Track<E>) -> Self {
        debug_assert!(data.is_standard_layout(), "peft-rs bug: non-contiguous tensor data");
        Tensor(Arc::new(Inner { id, data, track }))
    }

    /// A constant tensor from a flat vector and a shape.
    ///
    /// # Errors
    /// [`Error::Shape`] when `values.len()` is not the product of `shape`.
    pub fn from_vec(values: Vec<E>, shape: &[usize]) -> Result<Self> {
        let n = values.len();
        let a = ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|_| Error::Shape {
            op: "from_vec",
            lhs: vec![n],
            rhs: shape.to_vec(),
        })?;
        Ok(Self::new(a))
    }

    /// A constant tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self::new(ArrayD::zeros(IxDyn(shape)))
    }

    /// A constant tensor of ones.
    pub fn ones(shape: &[usize]) -> Self {
        Self::new(ArrayD::ones(IxDyn(shape)))
    }

    /// A constant rank-0 tensor.
    pub fn scalar(v: E) -> Self {
        Self::new(ArrayD::from_elem(IxDyn(&[]), v))
    }

    /// The tensor's id.
    pub fn id(&self) -> TensorId {
        self.0.id
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        self.0.data.shape()
    }

    /// The number of axes.
    pub fn rank(&self) -> usize {
        self.0.data.ndim()
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.0.data.len()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.0.data.is_empty()
    }

    /// The data (a cheap shared handle; always C-contiguous).
    pub fn data(&self) -> &Data<E> {
        &self.0.data
    }

    /// The data as a flat slice in row-major order.
    pub fn as_slice(&self) -> &[E] {
        self.0.data.as_slice().expect("peft-rs bug: tensor data is always contiguous")
    }

    /// Copies the data out as a flat vector.
    pub fn to_vec(&self) -> Vec<E> {
        self.as_slice().to_vec()
    }

    /// The single value of a one-element tensor.
    ///
    /// # Errors
    /// [`Error::Count`] when the tensor has more or fewer than one element.
    pub fn item(&self) -> Result<E> {
        if self.len() != 1 {
            return Err(crate::Error::Count { op: "item", what: "elements", expected: 1, got: self.len() });
        }
        Ok(self.as_slice()[0])
    }

    /// True when gradients flow through this tensor (it is a var or depends on one).
    pub fn tracks(&self) -> bool {
        !matches!(self.0.track, Track::None)
    }

    /// True for a trainable leaf.
    pub fn is_var(&self) -> bool {
        matches!(self.0.track, Track::Leaf)
    }

    /// The same data as a constant: gradients stop here.
    pub fn detach(&self) -> Self {
        if self.tracks() {
            Self::from_parts(TensorId::fresh(), self.0.data.clone(), Track::None)
        } else {
            self.clone()
        }
    }

    /// Runs reverse-mode autodiff from this tensor (seeded with ones) and returns the gradients of every
    /// trainable leaf it depends on.
    ///
    /// # Errors
    /// [`Error::NoGraph`] when nothing trainable reaches this tensor.
    pub fn backward(&self) -> Result<autograd::GradStore<E>> {
        autograd::backward(self, None)
    }

    /// Reverse-mode autodiff seeded with `grad` (same shape as `self`).
    ///
    /// # Errors
    /// [`Error::NoGraph`] when nothing trainable reaches this tensor; [`Error::Shape`] for a seed of another shape.
    pub fn backward_with(&self, grad: ArrayD<E>) -> Result<autograd::GradStore<E>> {
        if grad.shape() != self.shape() {
            return Err(Error::Shape { op: "backward_with", lhs: self.shape().to_vec(), rhs: grad.shape().to_vec() });
        }
        autograd::backward(self, Some(grad))
    }
}

impl Tensor<f32> {
    /// Converts to an f64 tensor (a constant).
    pub fn to_f64(&self) -> Tensor<f64> {
        Tensor::new(self.0.data.mapv(|v| v as f64))
    }
}

impl Tensor<f64> {
    /// Converts to an f32 tensor (a constant).
    pub fn to_f32(&self) -> Tensor<f32> {
        Tensor::new(self.0.data.mapv(|v| v as f32))
    }
}
