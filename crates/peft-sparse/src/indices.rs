//! Sorted flat indices into a tensor, stored as `u32` when the tensor has fewer than 2³² elements and `u64`
//! otherwise, and the differentiable op that adds a sparse delta to a dense tensor.
//!
//! A flat index is row-major: entry `[i, j]` of a `[rows, cols]` tensor is `i·cols + j`.

use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use peft_core::autograd::record;
use peft_core::{Elem, Tensor};

use crate::error::{SparseError, SparseResult};

/// Strictly increasing flat indices into a tensor of `numel` elements (no repeats, all in range).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SparseIndices {
    /// Indices of a tensor with fewer than 2³² elements.
    U32(Vec<u32>),
    /// Indices of a larger tensor.
    U64(Vec<u64>),
}

impl SparseIndices {
    /// Checks `indices` (strictly increasing, each below `numel`) and stores them at the narrowest width for
    /// `numel`. `tensor` names the tensor in errors.
    ///
    /// # Errors
    /// [`SparseError::Unsorted`] for a decrease or a repeat; [`SparseError::IndexOutOfRange`].
    pub fn new(tensor: &str, indices: Vec<u64>, numel: usize) -> SparseResult<Self> {
        for (position, w) in indices.windows(2).enumerate() {
            if w[1] <= w[0] {
                return Err(SparseError::Unsorted {
                    tensor: tensor.into(),
                    position: position + 1,
                    index: w[1],
                    previous: w[0],
                });
            }
        }
        if let Some(&last) = indices.last() {
            if last >= numel as u64 {
                return Err(SparseError::IndexOutOfRange {
                    tensor: tensor.into(),
                    index: last,
                    position: indices.len() - 1,
                    numel,
                });
            }
        }
        Ok(if (numel as u64) <= u64::from(u32::MAX) {
            SparseIndices::U32(indices.into_iter().map(|i| i as u32).collect())
        } else {
            SparseIndices::U64(indices)
        })
    }

    /// Sorts and deduplicates `indices`, then checks them as [`SparseIndices::new`] does.
    ///
    /// # Errors
    /// [`SparseError::IndexOutOfRange`].
    pub fn from_unsorted(tensor: &str, mut indices: Vec<u64>, numel: usize) -> SparseResult<Self> {
        indices.sort_unstable();
        indices.dedup();
        Self::new(tensor, indices, numel)
    }

    /// Number of indices (k).
    pub fn len(&self) -> usize {
        match self {
            SparseIndices::U32(v) => v.len(),
            SparseIndices::U64(v) => v.len(),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index `i` as `usize`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            SparseIndices::U32(v) => v[i] as usize,
            SparseIndices::U64(v) => v[i] as usize,
        }
    }

    /// The indices as `usize`, in order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = usize> + '_> {
        match self {
            SparseIndices::U32(v) => Box::new(v.iter().map(|&i| i as usize)),
            SparseIndices::U64(v) => Box::new(v.iter().map(|&i| i as usize)),
        }
    }

    /// The indices as `u64`.
    pub fn to_u64(&self) -> Vec<u64> {
        self.iter().map(|i| i as u64).collect()
    }

    /// Bytes held (4 or 8 per index).
    pub fn bytes(&self) -> usize {
        match self {
            SparseIndices::U32(v) => 4 * v.len(),
            SparseIndices::U64(v) => 8 * v.len(),
        }
    }

    /// The position of flat index `flat`, if present (binary search).
    pub fn position(&self, flat: usize) -> Option<usize> {
        match self {
            SparseIndices::U32(v) => u32::try_from(flat).ok().and_then(|f| v.binary_search(&f).ok()),
            SparseIndices::U64(v) => v.binary_search(&(flat as u64)).ok(),
        }
    }
}

/// An observer of the dense gradient reaching a sparse delta's output (`∂L/∂W_eff`, the shape of the parameter),
/// called during backward: how SpIEL accumulates regrowth scores and LT-SFT's full phase sees its gradient without
/// a dense trainable tensor.
pub type GradTap<E> = Arc<dyn Fn(&ArrayD<E>) + Send + Sync>;

/// `base + scatter(indices, values)`: a copy of `base` with `values[i]` added at flat index `indices[i]`.
///
/// Differentiable in `base` (identity) and `values` (the output gradient gathered at `indices`, so a delta of k
/// entries gets a k-vector gradient). `tap`, when given, sees the dense output gradient during backward.
///
/// # Errors
/// [`SparseError::LengthMismatch`] when `values` is not a vector of `indices.len()` entries;
/// [`SparseError::IndexOutOfRange`] when an index is beyond `base`.
pub fn scatter_add_flat<E: Elem>(
    base: &Tensor<E>,
    indices: &Arc<SparseIndices>,
    values: &Tensor<E>,
    tap: Option<GradTap<E>>,
) -> SparseResult<Tensor<E>> {
    if values.rank() != 1 || values.len() != indices.len() {
        return Err(SparseError::LengthMismatch {
            tensor: "scatter_add_flat".into(),
            indices: indices.len(),
            values: values.len(),
        });
    }
    let n = base.len();
    if let Some(last) = (!indices.is_empty()).then(|| indices.get(indices.len() - 1)) {
        if last >= n {
            return Err(SparseError::IndexOutOfRange {
                tensor: "scatter_add_flat".into(),
                index: last as u64,
                position: indices.len() - 1,
                numel: n,
            });
        }
    }
    let mut out = base.data().to_owned();
    {
        let o = out.as_slice_mut().ok_or_else(|| layout_error(base.shape()))?;
        for (i, &v) in indices.iter().zip(values.as_slice()) {
            o[i] += v;
        }
    }
    let idx = Arc::clone(indices);
    let k = indices.len();
    Ok(record("sparse_scatter_add", out, &[base, values], move |g, needs| {
        if let Some(t) = &tap {
            t(g);
        }
        let gbase = needs[0].then(|| g.clone());
        let gvals = needs[1].then(|| {
            let gs = g.as_slice().expect("peft-rs bug: contiguous grad");
            let picked: Vec<E> = idx.iter().map(|i| gs[i]).collect();
            ArrayD::from_shape_vec(IxDyn(&[k]), picked).expect("peft-rs bug: k values")
        });
        vec![gbase, gvals]
    }))
}

fn layout_error(shape: &[usize]) -> SparseError {
    SparseError::ShapeMismatch { tensor: "scatter_add_flat".into(), expected: shape.to_vec(), found: vec![] }
}

/// The dense array of `shape` holding `values` at `indices` and zero elsewhere.
///
/// # Errors
/// [`SparseError::LengthMismatch`]; [`SparseError::IndexOutOfRange`].
pub fn densify<E: Elem>(shape: &[usize], indices: &SparseIndices, values: &[E]) -> SparseResult<ArrayD<E>> {
    if values.len() != indices.len() {
        return Err(SparseError::LengthMismatch {
            tensor: "densify".into(),
            indices: indices.len(),
            values: values.len(),
        });
    }
    let n: usize = shape.iter().product();
    let mut out = vec![E::zero(); n];
    for (pos, (i, &v)) in indices.iter().zip(values).enumerate() {
        let slot = out.get_mut(i).ok_or_else(|| SparseError::IndexOutOfRange {
            tensor: "densify".into(),
            index: i as u64,
            position: pos,
            numel: n,
        })?;
        *slot = v;
    }
    Ok(ArrayD::from_shape_vec(IxDyn(shape), out).expect("peft-rs bug: n elements"))
}
