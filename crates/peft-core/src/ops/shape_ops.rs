//! Shape ops: reshape, transpose/permute, narrow, concat, stack, squeeze/unsqueeze, broadcast_to.

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use crate::autograd::record;
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::ops::broadcast::{broadcast_shape, sum_to};
use crate::tensor::Tensor;

impl<E: Elem> Tensor<E> {
    /// The same elements in a new shape (row-major order).
    ///
    /// # Errors
    /// [`Error::Shape`] when the element counts differ.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor<E>> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(Error::Shape { op: "reshape", lhs: self.shape().to_vec(), rhs: shape.to_vec() });
        }
        let out = self.data().to_owned().into_shape_with_order(IxDyn(shape)).expect("peft-rs bug: reshape");
        let in_shape = self.shape().to_vec();
        Ok(record("reshape", out, &[self], move |g, _| {
            vec![Some(g.clone().into_shape_with_order(IxDyn(&in_shape)).expect("peft-rs bug: reshape grad"))]
        }))
    }

    /// Reorders axes: output axis `i` is input axis `perm[i]`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `perm` is not a permutation of `0..rank`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor<E>> {
        let r = self.rank();
        let mut seen = vec![false; r];
        if perm.len() != r || perm.iter().any(|&p| p >= r || std::mem::replace(&mut seen[p], true)) {
            crate::error::bail!("permute", "{perm:?} is not a permutation of 0..{r}");
        }
        let out = self.data().view().permuted_axes(IxDyn(perm)).as_standard_layout().into_owned();
        let mut inv = vec![0; r];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        Ok(record("permute", out, &[self], move |g, _| {
            vec![Some(g.view().permuted_axes(IxDyn(&inv)).as_standard_layout().into_owned())]
        }))
    }

    /// Swaps two axes.
    ///
    /// # Errors
    /// [`Error::Axis`] for an axis beyond the rank.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor<E>> {
        let r = self.rank();
        for ax in [a, b] {
            if ax >= r {
                return Err(Error::Axis { op: "transpose", axis: ax, rank: r });
            }
        }
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// The sub-tensor `start..start + len` along `axis`.
    ///
    /// # Errors
    /// [`Error::Axis`] or [`Error::Invalid`] when the range does not fit.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Tensor<E>> {
        let r = self.rank();
        if axis >= r {
            return Err(Error::Axis { op: "narrow", axis, rank: r });
        }
        let dim = self.shape()[axis];
        if start + len > dim {
            crate::error::bail!("narrow", "range {start}..{} exceeds axis {axis} of size {dim}", start + len);
        }
        let out = self.data().slice_axis(Axis(axis), Slice::from(start..start + len)).to_owned();
        let in_dim = self.data().raw_dim();
        Ok(record("narrow", out, &[self], move |g, _| {
            let mut gx = ArrayD::<E>::zeros(in_dim.clone());
            gx.slice_axis_mut(Axis(axis), Slice::from(start..start + len)).assign(g);
            vec![Some(gx)]
        }))
    }

    /// Joins tensors along an existing axis.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty list; [`Error::Shape`] when other axes differ.
    pub fn concat(tensors: &[&Tensor<E>], axis: usize) -> Result<Tensor<E>> {
        let Some(first) = tensors.first() else { crate::error::bail!("concat", "no tensors") };
        let r = first.rank();
        if axis >= r {
            return Err(Error::Axis { op: "concat", axis, rank: r });
        }
        for t in tensors {
            let ok = t.rank() == r && (0..r).all(|i| i == axis || t.shape()[i] == first.shape()[i]);
            if !ok {
                return Err(Error::Shape { op: "concat", lhs: first.shape().to_vec(), rhs: t.shape().to_vec() });
            }
        }
        let views: Vec<_> = tensors.iter().map(|t| t.data().view()).collect();
        let out = ndarray::concatenate(Axis(axis), &views).map_err(|_| Error::Shape {
            op: "concat",
            lhs: first.shape().to_vec(),
            rhs: vec![],
        })?;
        let sizes: Vec<usize> = tensors.iter().map(|t| t.shape()[axis]).collect();
        Ok(record("concat", out, tensors, move |g, needs| {
            let mut start = 0;
            sizes
                .iter()
                .zip(needs)
                .map(|(&len, &need)| {
                    let s = start;
                    start += len;
                    need.then(|| g.slice_axis(Axis(axis), Slice::from(s..s + len)).to_owned())
                })
                .collect()
        }))
    }

    /// Stacks same-shape tensors along a new axis.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty list; [`Error::Shape`] when shapes differ.
    pub fn stack(tensors: &[&Tensor<E>], axis: usize) -> Result<Tensor<E>> {
        let Some(first) = tensors.first() else { crate::error::bail!("stack", "no tensors") };
        if axis > first.rank() {
            return Err(Error::Axis { op: "stack", axis, rank: first.rank() + 1 });
        }
        let ups = tensors.iter().map(|t| t.unsqueeze(axis)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor<E>> = ups.iter().collect();
        Self::concat(&refs, axis)
    }

    /// Inserts a size-1 axis at `axis`.
    ///
    /// # Errors
    /// [`Error::Axis`] when `axis > rank`.
    pub fn unsqueeze(&self, axis: usize) -> Result<Tensor<E>> {
        if axis > self.rank() {
            return Err(Error::Axis { op: "unsqueeze", axis, rank: self.rank() });
        }
        let mut s = self.shape().to_vec();
        s.insert(axis, 1);
        self.reshape(&s)
    }

    /// Removes a size-1 axis.
    ///
    /// # Errors
    /// [`Error::Axis`] or [`Error::Invalid`] when the axis is out of range or not of size 1.
    pub fn squeeze(&self, axis: usize) -> Result<Tensor<E>> {
        if axis >= self.rank() {
            return Err(Error::Axis { op: "squeeze", axis, rank: self.rank() });
        }
        if self.shape()[axis] != 1 {
            crate::error::bail!("squeeze", "axis {axis} has size {}, not 1", self.shape()[axis]);
        }
        let mut s = self.shape().to_vec();
        s.remove(axis);
        self.reshape(&s)
    }

    /// Broadcasts to `shape` (NumPy rules), copying.
    ///
    /// # Errors
    /// [`Error::Shape`] when the shape is not a broadcast of `self`.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor<E>> {
        let b = broadcast_shape("broadcast_to", self.shape(), shape)?;
        if b != shape {
            return Err(Error::Shape { op: "broadcast_to", lhs: self.shape().to_vec(), rhs: shape.to_vec() });
        }
        let out = self.data().broadcast(IxDyn(shape)).expect("checked").to_owned();
        let in_shape = self.shape().to_vec();
        Ok(record("broadcast_to", out, &[self], move |g, _| vec![Some(sum_to(g, &in_shape))]))
    }
}
