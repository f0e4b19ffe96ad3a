//! Shape ops: reshape, transpose/permute, narrow, concat, stack, squeeze/unsqueeze, broadcast_to.

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use crate::autograd::{record, record_data};
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::ops::broadcast::{broadcast_shape, sum_to};
use crate::tensor::{standard_copy, Tensor};

impl<E: Elem> Tensor<E> {
    /// The same elements in a new shape (row-major order).
    ///
    /// # Errors
    /// [`Error::Shape`] when the element counts differ.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor<E>> {
        // checked: a product that overflows is a mismatch, not a panic
        if shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) != Some(self.len()) {
            return Err(Error::Shape { op: "reshape", lhs: self.shape().to_vec(), rhs: shape.to_vec() });
        }
        // Data is always standard layout, so the new shape shares the buffer (copy-on-write) instead of copying it.
        let out = self.data().clone().into_shape_with_order(IxDyn(shape)).expect("peft-rs bug: reshape");
        let in_shape = self.shape().to_vec();
        Ok(record_data("reshape", out, &[self], move |g, _| {
            vec![Some(g.clone().into_shape_with_order(IxDyn(&in_shape)).expect("peft-rs bug: reshape grad"))]
        }))
    }

    /// Reorders axes: output axis `i` is input axis `perm[i]`.
    ///
    /// # Errors
    /// [`Error::NotPermutation`] when `perm` is not a permutation of `0..rank`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor<E>> {
        let r = self.rank();
        let mut seen = vec![false; r];
        if perm.len() != r || perm.iter().any(|&p| p >= r || std::mem::replace(&mut seen[p], true)) {
            return Err(Error::NotPermutation { op: "permute", perm: perm.to_vec(), len: r });
        }
        let out = standard_copy(self.data().view().permuted_axes(IxDyn(perm)));
        let mut inv = vec![0; r];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        Ok(record("permute", out, &[self], move |g, _| vec![Some(standard_copy(g.view().permuted_axes(IxDyn(&inv))))]))
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
    /// [`Error::Axis`] or [`Error::Arg`] when the range does not fit.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Tensor<E>> {
        let r = self.rank();
        if axis >= r {
            return Err(Error::Axis { op: "narrow", axis, rank: r });
        }
        let dim = self.shape()[axis];
        if start.checked_add(len).is_none_or(|end| end > dim) {
            return Err(Error::arg(
                "narrow",
                format!("range on axis {axis} of size {dim}"),
                format!("{len} from {start}"),
                "must lie within the axis",
            ));
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
    /// [`Error::Empty`] for an empty list; [`Error::Shape`] when other axes differ.
    pub fn concat(tensors: &[&Tensor<E>], axis: usize) -> Result<Tensor<E>> {
        let Some(first) = tensors.first() else { return Err(Error::Empty { op: "concat", what: "the tensor list" }) };
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
    /// [`Error::Empty`] for an empty list; [`Error::Shape`] when shapes differ.
    pub fn stack(tensors: &[&Tensor<E>], axis: usize) -> Result<Tensor<E>> {
        let Some(first) = tensors.first() else { return Err(Error::Empty { op: "stack", what: "the tensor list" }) };
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
    /// [`Error::Axis`] or [`Error::Arg`] when the axis is out of range or not of size 1.
    pub fn squeeze(&self, axis: usize) -> Result<Tensor<E>> {
        if axis >= self.rank() {
            return Err(Error::Axis { op: "squeeze", axis, rank: self.rank() });
        }
        if self.shape()[axis] != 1 {
            return Err(Error::arg("squeeze", format!("size of axis {axis}"), self.shape()[axis], "must be 1"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    fn shape() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(1usize..4, 1..5)
    }

    fn input() -> impl Strategy<Value = ArrayD<f64>> {
        shape().prop_flat_map(|s| array_strategy(s, -2.0, 2.0))
    }

    proptest! {
        /// The row-copy path equals ndarray's element copy for every permutation of shapes whose axes are long
        /// enough to take it (and short ones that do not).
        #[test]
        fn standard_copy_equals_ndarray_for_any_permutation(
            (dims, perm) in prop::collection::vec(1usize..12, 2..5)
                .prop_flat_map(|d| { let n = d.len(); (Just(d), Just((0..n).collect::<Vec<_>>()).prop_shuffle()) })
        ) {
            let n: usize = dims.iter().product();
            let a = ArrayD::from_shape_vec(IxDyn(&dims), (0..n).map(|i| i as f32).collect()).unwrap();
            let v = a.view().permuted_axes(IxDyn(&perm));
            let got = standard_copy(v.clone());
            prop_assert_eq!(got.shape(), v.shape());
            prop_assert!(got.is_standard_layout());
            let want = v.as_standard_layout();
            prop_assert_eq!(got.as_slice().unwrap(), want.as_slice().unwrap());
        }
    }

    #[test]
    fn reshape_shares_the_buffer_and_permute_rows_match() {
        let t = Tensor::<f32>::new(ArrayD::from_shape_fn(IxDyn(&[2, 5, 3, 16]), |ix| {
            (ix[0] * 1000 + ix[1] * 100 + ix[2] * 16 + ix[3]) as f32
        }));
        let r = t.reshape(&[2, 5, 48]).unwrap();
        assert_eq!(r.as_slice().as_ptr(), t.as_slice().as_ptr(), "reshape must not copy");
        // The attention head split: [B, L, H, D] -> [B, H, L, D], rows of D = 16 copied whole.
        let p = t.permute(&[0, 2, 1, 3]).unwrap();
        assert_eq!(p.shape(), &[2, 3, 5, 16]);
        let d = p.data();
        for (b, h, l, k) in [(0, 0, 0, 0), (1, 2, 4, 15), (0, 1, 3, 7), (1, 0, 2, 9)] {
            assert_eq!(d[[b, h, l, k]], (b * 1000 + l * 100 + h * 16 + k) as f32);
        }
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(32))]
        #[test]
        fn reshape_grad_matches_finite_differences(x in input()) {
            let rev: Vec<usize> = x.shape().iter().rev().copied().collect();
            let n = x.len();
            assert_grads(|t| t[0].reshape(&rev), std::slice::from_ref(&x));
            assert_grads(|t| t[0].reshape(&[n]), std::slice::from_ref(&x));
            assert_grads(|t| t[0].reshape(&[1, n, 1]), &[x]);
        }

        #[test]
        fn permute_and_transpose_grad_match_finite_differences(
            (x, perm, a, b) in shape().prop_flat_map(|s| {
                let r = s.len();
                (array_strategy(s, -2.0, 2.0), Just((0..r).collect::<Vec<_>>()).prop_shuffle(), 0..r, 0..r)
            })
        ) {
            assert_grads(|t| t[0].permute(&perm), std::slice::from_ref(&x));
            assert_grads(|t| t[0].transpose(a, b), std::slice::from_ref(&x));
            // values: output index i maps to input index permuted by perm
            let y = Tensor::new(x.clone()).permute(&perm).unwrap();
            let want = x.view().permuted_axes(IxDyn(&perm)).to_owned();
            prop_assert_eq!(y.data().view(), want.view());
        }

        #[test]
        fn narrow_grad_matches_finite_differences(
            (x, axis, start, len) in shape().prop_flat_map(|s| {
                let r = s.len();
                (Just(s), 0..r)
            }).prop_flat_map(|(s, axis)| {
                let d = s[axis];
                (array_strategy(s, -2.0, 2.0), Just(axis), 0..=d)
            }).prop_flat_map(|(x, axis, start)| {
                let d = x.shape()[axis];
                (Just(x), Just(axis), Just(start), 0..=d - start)
            })
        ) {
            assert_grads(|t| t[0].narrow(axis, start, len), std::slice::from_ref(&x));
            let y = Tensor::new(x.clone()).narrow(axis, start, len).unwrap();
            let want = x.slice_axis(Axis(axis), Slice::from(start..start + len)).to_owned();
            prop_assert_eq!(y.data().view(), want.view());
        }

        #[test]
        fn concat_grad_matches_finite_differences(
            (xs, axis) in shape().prop_flat_map(|s| {
                let r = s.len();
                (Just(s), 0..r, prop::collection::vec(1usize..4, 1..4))
            }).prop_flat_map(|(s, axis, sizes)| {
                let parts: Vec<_> = sizes.iter().map(|&k| {
                    let mut si = s.clone();
                    si[axis] = k;
                    array_strategy(si, -2.0, 2.0)
                }).collect();
                (parts, Just(axis))
            })
        ) {
            assert_grads(|t| Tensor::concat(&t.iter().collect::<Vec<_>>(), axis), &xs);
        }

        #[test]
        fn stack_grad_matches_finite_differences(
            (xs, axis) in shape().prop_flat_map(|s| {
                let r = s.len();
                (prop::collection::vec(array_strategy(s, -2.0, 2.0), 1..4), 0..=r)
            })
        ) {
            assert_grads(|t| Tensor::stack(&t.iter().collect::<Vec<_>>(), axis), &xs);
            let y = Tensor::stack(&xs.iter().map(|a| Tensor::new(a.clone())).collect::<Vec<_>>().iter().collect::<Vec<_>>(), axis).unwrap();
            let views: Vec<_> = xs.iter().map(|a| a.view()).collect();
            let want = ndarray::stack(Axis(axis), &views).unwrap();
            prop_assert_eq!(y.data().view(), want.view());
        }

        #[test]
        fn unsqueeze_and_squeeze_grad_match_finite_differences(
            (x, axis) in shape().prop_flat_map(|s| {
                let r = s.len();
                (array_strategy(s, -2.0, 2.0), 0..=r)
            })
        ) {
            assert_grads(|t| t[0].unsqueeze(axis), std::slice::from_ref(&x));
            assert_grads(|t| t[0].unsqueeze(axis)?.squeeze(axis), std::slice::from_ref(&x));
            let mut s = x.shape().to_vec();
            s.insert(axis, 1);
            let x1 = x.into_shape_with_order(IxDyn(&s)).unwrap();
            assert_grads(|t| t[0].squeeze(axis), &[x1]);
        }

        #[test]
        fn broadcast_to_grad_matches_finite_differences(
            (x, target) in (prop::collection::vec(1usize..4, 0..4), 0usize..4, any::<u8>()).prop_flat_map(|(base, drop, mask)| {
                let drop = drop.min(base.len());
                let s: Vec<usize> =
                    base[drop..].iter().enumerate().map(|(i, &d)| if (mask >> i) & 1 == 1 { 1 } else { d }).collect();
                (array_strategy(s, -2.0, 2.0), Just(base))
            })
        ) {
            assert_grads(|t| t[0].broadcast_to(&target), std::slice::from_ref(&x));
            let y = Tensor::new(x.clone()).broadcast_to(&target).unwrap();
            prop_assert_eq!(y.data().view(), x.broadcast(IxDyn(&target)).unwrap());
        }
    }

    #[test]
    fn shape_ops_match_hand_values() {
        let x = Tensor::<f32>::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        let t = x.transpose(0, 1).unwrap();
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(t.as_slice(), &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(x.narrow(1, 1, 2).unwrap().as_slice(), &[2.0, 3.0, 5.0, 6.0]);
        let c = Tensor::concat(&[&x, &x.narrow(0, 0, 1).unwrap()], 0).unwrap();
        assert_eq!(c.shape(), &[3, 3]);
        assert_eq!(&c.as_slice()[6..], &[1.0, 2.0, 3.0]);
        let s = Tensor::stack(&[&x, &x], 2).unwrap();
        assert_eq!(s.shape(), &[2, 3, 2]);
        assert_eq!(&s.as_slice()[..4], &[1.0, 1.0, 2.0, 2.0]);
        assert_eq!(x.reshape(&[3, 2]).unwrap().as_slice(), x.as_slice());
        assert_eq!(x.unsqueeze(0).unwrap().shape(), &[1, 2, 3]);
        let b = Tensor::<f32>::from_vec(vec![1.0, 2.0], &[2, 1]).unwrap().broadcast_to(&[2, 2, 3]).unwrap();
        assert_eq!(b.shape(), &[2, 2, 3]);
        assert_eq!(&b.as_slice()[..6], &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn shape_ops_reject_bad_arguments() {
        let x = Tensor::<f32>::zeros(&[2, 3]);
        assert!(matches!(x.reshape(&[4, 2]), Err(Error::Shape { op: "reshape", .. })));
        assert!(matches!(x.permute(&[0, 0]), Err(Error::NotPermutation { op: "permute", .. })));
        assert!(matches!(x.permute(&[0]), Err(Error::NotPermutation { .. })));
        assert!(matches!(x.permute(&[0, 2]), Err(Error::NotPermutation { .. })));
        assert!(matches!(x.transpose(0, 2), Err(Error::Axis { op: "transpose", .. })));
        assert!(matches!(x.narrow(2, 0, 1), Err(Error::Axis { op: "narrow", .. })));
        assert!(matches!(x.narrow(1, 2, 2), Err(Error::Arg { op: "narrow", .. })));
        let y = Tensor::<f32>::zeros(&[3, 3]);
        assert!(matches!(Tensor::concat(&[&x, &y], 1), Err(Error::Shape { op: "concat", .. })));
        assert!(matches!(Tensor::concat(&[&x, &y], 2), Err(Error::Axis { op: "concat", .. })));
        assert!(matches!(Tensor::<f32>::concat(&[], 0), Err(Error::Empty { op: "concat", .. })));
        assert!(matches!(Tensor::stack(&[&x, &y], 0), Err(Error::Shape { .. })));
        assert!(matches!(Tensor::stack(&[&x], 3), Err(Error::Axis { op: "stack", .. })));
        assert!(matches!(Tensor::<f32>::stack(&[], 0), Err(Error::Empty { op: "stack", .. })));
        assert!(matches!(x.unsqueeze(3), Err(Error::Axis { op: "unsqueeze", .. })));
        assert!(matches!(x.squeeze(0), Err(Error::Arg { op: "squeeze", .. })));
        assert!(matches!(x.squeeze(2), Err(Error::Axis { op: "squeeze", .. })));
        assert!(matches!(x.broadcast_to(&[3, 3]), Err(Error::Shape { op: "broadcast_to", .. })));
        assert!(matches!(x.broadcast_to(&[3]), Err(Error::Shape { op: "broadcast_to", .. })));
        assert!(matches!(x.broadcast_to(&[2, 1]), Err(Error::Shape { op: "broadcast_to", .. })));
    }

    #[test]
    fn concat_of_var_and_constant_gives_only_the_var_a_gradient() {
        let v = Tensor::<f32>::var(ArrayD::ones(IxDyn(&[2, 2])));
        let c = Tensor::<f32>::new(ArrayD::ones(IxDyn(&[2, 1])));
        let y = Tensor::concat(&[&c, &v], 1).unwrap();
        let r = Tensor::<f32>::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        let g = y.mul(&r).unwrap().sum_all().backward().unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g.get(&v).unwrap().as_slice().unwrap(), &[2.0, 3.0, 5.0, 6.0]);
    }

    #[test]
    fn narrow_and_reshape_reject_overflowing_arguments() {
        let x = Tensor::<f32>::zeros(&[2, 3]);
        assert!(matches!(x.narrow(1, usize::MAX, 2), Err(Error::Arg { op: "narrow", .. })));
        assert!(matches!(x.narrow(1, 1, usize::MAX), Err(Error::Arg { op: "narrow", .. })));
        assert!(matches!(x.reshape(&[usize::MAX, 2, 3]), Err(Error::Shape { op: "reshape", .. })));
        assert!(matches!(x.reshape(&[usize::MAX / 2 + 1, 2, 0]), Err(Error::Shape { op: "reshape", .. })));
    }
}
