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
    /// [`Error::Axis`] for an axis beyond the rank; [`Error::Empty`] for an empty axis.
    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Tensor<E>> {
        let rank = self.rank();
        if axis >= rank {
            return Err(Error::Axis { op: "max", axis, rank });
        }
        if self.shape()[axis] == 0 {
            return Err(Error::Empty { op: "max", what: "the reduced axis" });
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
    /// The divisor `n - correction` is clamped to at least 1, so a single-element reduction with correction 1
    /// gives 0 (PyTorch gives NaN).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    /// A shape of rank 1..=4 and a random subset of its axes (possibly empty, possibly all).
    fn shape_and_axes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        prop::collection::vec(1usize..4, 1..5).prop_flat_map(|s| {
            let r = s.len();
            (Just(s), prop::collection::vec(any::<bool>(), r))
                .prop_map(|(s, m)| (s, m.iter().enumerate().filter(|(_, &b)| b).map(|(i, _)| i).collect()))
        })
    }

    /// Distinct values (a shuffled ramp with step 0.25), so `max` has no ties within finite-difference reach.
    fn distinct(shape: Vec<usize>) -> impl Strategy<Value = ArrayD<f64>> {
        let n: usize = shape.iter().product();
        Just((0..n).collect::<Vec<usize>>()).prop_shuffle().prop_map(move |p| {
            ArrayD::from_shape_vec(IxDyn(&shape), p.iter().map(|&i| i as f64 * 0.25 - 1.0).collect())
                .expect("distinct shape")
        })
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(32))]
        #[test]
        fn sums_and_means_grad_match_finite_differences(
            (x, axes, keep) in shape_and_axes()
                .prop_flat_map(|(s, a)| (array_strategy(s, -2.0, 2.0), Just(a), any::<bool>()))
        ) {
            let x = [x];
            assert_grads(|t| t[0].sum(&axes, keep), &x);
            assert_grads(|t| t[0].mean(&axes, keep), &x);
            assert_grads(|t| Ok(t[0].sum_all()), &x);
            assert_grads(|t| Ok(t[0].mean_all()), &x);
        }

        #[test]
        fn variance_grad_matches_finite_differences(
            (x, axes, keep, corr) in shape_and_axes()
                .prop_flat_map(|(s, a)| (array_strategy(s, -2.0, 2.0), Just(a), any::<bool>(), 0usize..2))
        ) {
            assert_grads(|t| t[0].variance(&axes, corr, keep), &[x]);
        }

        #[test]
        fn max_grad_matches_finite_differences(
            (x, axis, keep) in prop::collection::vec(1usize..4, 1..5).prop_flat_map(|s| {
                let r = s.len();
                (distinct(s), 0..r, any::<bool>())
            })
        ) {
            assert_grads(|t| t[0].max(axis, keep), std::slice::from_ref(&x));
            // values match ndarray's fold along the axis
            let want = x.fold_axis(Axis(axis), f64::NEG_INFINITY, |&m, &v| m.max(v));
            let got = Tensor::new(x).max(axis, false).unwrap();
            prop_assert_eq!(got.data().view(), want.view());
        }

        #[test]
        fn sum_matches_ndarray_and_keepdim_only_changes_shape(
            (x, axes) in shape_and_axes().prop_flat_map(|(s, a)| (array_strategy(s, -2.0, 2.0), Just(a)))
        ) {
            let t = Tensor::new(x.clone());
            let (a, k) = (t.sum(&axes, false).unwrap(), t.sum(&axes, true).unwrap());
            let mut want = x.clone();
            for &ax in axes.iter().rev() {
                want = want.sum_axis(Axis(ax));
            }
            prop_assert_eq!(a.shape(), want.shape());
            prop_assert_eq!(a.as_slice(), k.as_slice());
            for (i, &d) in k.shape().iter().enumerate() {
                prop_assert_eq!(d, if axes.contains(&i) { 1 } else { x.shape()[i] });
            }
            for (p, q) in a.as_slice().iter().zip(want.iter()) {
                prop_assert!((p - q).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn reductions_match_hand_values() {
        let x = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        assert_eq!(x.sum(&[0], false).unwrap().as_slice(), &[5.0, 7.0, 9.0]);
        assert_eq!(x.sum(&[1], true).unwrap().shape(), &[2, 1]);
        assert_eq!(x.sum(&[1, 1, 0], false).unwrap().item().unwrap(), 21.0);
        assert_eq!(x.sum(&[], false).unwrap().as_slice(), x.as_slice());
        assert_eq!(x.mean(&[1], false).unwrap().as_slice(), &[2.0, 5.0]);
        assert_eq!(x.mean_all().item().unwrap(), 3.5);
        assert_eq!(x.max(1, false).unwrap().as_slice(), &[3.0, 6.0]);
        assert_eq!(x.max(0, true).unwrap().shape(), &[1, 3]);
        let v = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[4]).unwrap();
        assert!((v.variance(&[0], 0, false).unwrap().item().unwrap() - 1.25).abs() < 1e-15);
        assert!((v.variance(&[0], 1, false).unwrap().item().unwrap() - 5.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn max_sends_the_gradient_to_the_first_maximum() {
        let x = Tensor::<f32>::var(ndarray::arr2(&[[1.0f32, 3.0, 3.0], [5.0, 0.0, -1.0]]).into_dyn());
        let g = x.max(1, false).unwrap().sum_all().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[0.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn reductions_reject_bad_axes() {
        let x = Tensor::<f32>::zeros(&[2, 3]);
        assert!(matches!(x.sum(&[2], false), Err(Error::Axis { op: "sum", axis: 2, rank: 2 })));
        assert!(matches!(x.mean(&[0, 5], true), Err(Error::Axis { op: "mean", .. })));
        assert!(matches!(x.max(2, false), Err(Error::Axis { op: "max", .. })));
        assert!(matches!(x.variance(&[3], 1, false), Err(Error::Axis { op: "var", .. })));
        assert!(matches!(Tensor::<f32>::zeros(&[2, 0]).max(1, false), Err(Error::Empty { op: "max", .. })));
    }
}
