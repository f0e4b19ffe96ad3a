//! Reductions over axes: sum, mean, max and variance.

use ndarray::{ArrayD, Axis, IxDyn, Zip};

use crate::autograd::record;
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Checks axes, sorts and dedups them.
fn norm_axes(op: &'static str, axes: &[usize], rank: usize) -> Result<Vec<usize>> {
    let mut v = axes.to_vec();
    for &a in &v {
        if a >= rank {
            return Err(Error::Axis { op, axis: a, rank });
        }
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// The shape with `axes` set to 1.
fn kept_shape(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect()
}

/// The shape with `axes` removed.
fn dropped_shape(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    shape.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect()
}

impl<E: Elem> Tensor<E> {
    /// Sum over `axes`; `keepdim` keeps them as size-1 axes.
    ///
    /// # Errors
    /// [`Error::Axis`] for an axis beyond the rank.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Tensor<E>> {
        let axes = norm_axes("sum", axes, self.rank())?;
        let mut r: ArrayD<E> = self.data().to_owned();
        for &a in axes.iter().rev() {
            r = r.sum_axis(Axis(a));
        }
        let kept = kept_shape(self.shape(), &axes);
        let out_shape = if keepdim { kept.clone() } else { dropped_shape(self.shape(), &axes) };
        let out = r.into_shape_with_order(IxDyn(&out_shape)).expect("peft-rs bug: sum shape");
        let in_shape = self.shape().to_vec();
        Ok(record("sum", out, &[self], move |g, _| {
            let g = g.view().into_shape_with_order(IxDyn(&kept)).expect("peft-rs bug: sum grad shape");
            vec![Some(g.broadcast(IxDyn(&in_shape)).expect("peft-rs bug: sum grad").to_owned())]
        }))
    }

    /// Sum of all elements (rank-0 result).
    pub fn sum_all(&self) -> Tensor<E> {
        let s: E = self.as_slice().iter().copied().sum();
        let shape = self.shape().to_vec();
        record("sum_all", ArrayD::from_elem(IxDyn(&[]), s), &[self], move |g, _| {
            vec![Some(ArrayD::from_elem(IxDyn(&shape), g.as_slice().expect("contiguous")[0]))]
        })
    }

    /// Mean over `axes`.
    ///
    /// # Errors
    /// [`Error::Axis`] for an axis beyond the rank.
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Tensor<E>> {
        let axes = norm_axes("mean", axes, self.rank())?;
        let n: usize = axes.iter().map(|&a| self.shape()[a]).product();
        Ok(self.sum(&axes, keepdim)?.mul_scalar(E::one() / E::of(n.max(1) as f64)))
    }

    /// Mean of all elements (rank-0 result).
    pub fn mean_all(&self) -> Tensor<E> {
        self.sum_all().mul_scalar(E::one() / E::of(self.len().max(1) as f64))
    }

    /// Maximum over one axis. The gradient goes to the first maximal element of each slice.
    ///
    /// # Errors
    /// [`Error::Axis`] for an axis beyond the rank; [`Error::Invalid`] for an empty axis.
    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Tensor<E>> {
        let rank = self.rank();
        if axis >= rank {
            return Err(Error::Axis { op: "max", axis, rank });
        }
        if self.shape()[axis] == 0 {
            crate::error::bail!("max", "axis {axis} is empty");
        }
        let x = self.data();
        let kept = kept_shape(self.shape(), &[axis]);
        let mut vals = ArrayD::<E>::zeros(IxDyn(&dropped_shape(self.shape(), &[axis])));
        let mut arg = ArrayD::<usize>::zeros(vals.raw_dim());
        Zip::from(&mut vals).and(&mut arg).and(x.lanes(Axis(axis))).for_each(|v, a, lane| {
            let mut best = 0;
            for (i, &e) in lane.iter().enumerate() {
                if e > lane[best] || (lane[best].is_nan() && !e.is_nan()) {
                    best = i;
                }
            }
            *v = lane[best];
            *a = best;
        });
        let out_shape = if keepdim { kept } else { vals.shape().to_vec() };
        let out = vals.into_shape_with_order(IxDyn(&out_shape)).expect("peft-rs bug: max shape");
        let in_dim = x.raw_dim();
        Ok(record("max", out, &[self], move |g, _| {
            let mut gx = ArrayD::<E>::zeros(in_dim.clone());
            let g = g.view().into_shape_with_order(arg.raw_dim()).expect("peft-rs bug: max grad shape");
            Zip::from(gx.lanes_mut(Axis(axis))).and(&arg).and(&g).for_each(|mut lane, &a, &gv| lane[a] = gv);
            vec![Some(gx)]
        }))
    }

    /// Variance over `axes` with `correction` (0: population, 1: unbiased/Bessel).
    ///
    /// # Errors
    /// [`Error::Axis`] for an axis beyond the rank.
    pub fn variance(&self, axes: &[usize], correction: usize, keepdim: bool) -> Result<Tensor<E>> {
        let axes = norm_axes("var", axes, self.rank())?;
        let n: usize = axes.iter().map(|&a| self.shape()[a]).product();
        let mean = self.mean(&axes, true)?;
        let dev = self.sub(&mean)?.square();
        let denom = (n as f64 - correction as f64).max(1.0);
        Ok(dev.sum(&axes, keepdim)?.mul_scalar(E::of(1.0 / denom)))
    }
}
