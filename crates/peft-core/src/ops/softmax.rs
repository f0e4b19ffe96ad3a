//! Softmax and log-softmax over any axis: numerically stable (max-shifted), fused forward and backward.
//!
//! Both view the input as `[outer, n, inner]` around the reduced axis and work one lane at a time, so the last
//! axis (the attention and classifier case) runs over contiguous rows, in parallel over rows when large.

use ndarray::{ArrayD, IxDyn};

use crate::autograd::record_data;
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::ops::rows::{for_each_block, split_at_axis};
use crate::tensor::{Data, Tensor};

/// Forward of one lane of `n` elements at stride `s`: softmax (or log-softmax when `log`) of `x` into `y`.
///
/// A lane that is all `-inf` or holds a NaN gives NaN, as in PyTorch.
#[inline]
fn forward_lane<E: Elem>(x: &[E], y: &mut [E], n: usize, s: usize, log: bool) {
    let mut m = E::neg_infinity();
    for k in 0..n {
        let v = x[k * s];
        if v > m {
            m = v;
        }
    }
    let mut sum = E::zero();
    for k in 0..n {
        let e = (x[k * s] - m).exp();
        y[k * s] = e;
        sum += e;
    }
    if log {
        let ls = sum.ln();
        for k in 0..n {
            y[k * s] = (x[k * s] - m) - ls;
        }
    } else {
        let inv = E::one() / sum;
        for k in 0..n {
            y[k * s] *= inv;
        }
    }
}

/// Backward of one lane: softmax `gx = y ⊙ (g - <g, y>)`; log-softmax `gx = g - exp(y) Σg`.
#[inline]
fn backward_lane<E: Elem>(y: &[E], g: &[E], gx: &mut [E], n: usize, s: usize, log: bool) {
    if log {
        let mut sg = E::zero();
        for k in 0..n {
            sg += g[k * s];
        }
        for k in 0..n {
            gx[k * s] = g[k * s] - y[k * s].exp() * sg;
        }
    } else {
        let mut dot = E::zero();
        for k in 0..n {
            dot += g[k * s] * y[k * s];
        }
        for k in 0..n {
            gx[k * s] = y[k * s] * (g[k * s] - dot);
        }
    }
}

impl<E: Elem> Tensor<E> {
    /// Softmax along `axis`: `exp(x - max) / Σ exp(x - max)`, so every lane along `axis` sums to 1.
    ///
    /// ```
    /// use peft_core::Tensor;
    /// let x = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0], &[1, 3])?;
    /// let p = x.softmax(1)?;
    /// assert!((p.as_slice().iter().sum::<f64>() - 1.0).abs() < 1e-12);
    /// # Ok::<(), peft_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Axis`] when `axis >= rank` (so a rank-0 tensor is always an error).
    pub fn softmax(&self, axis: usize) -> Result<Tensor<E>> {
        self.softmax_impl("softmax", axis, false)
    }

    /// Log-softmax along `axis`: `x - max - log Σ exp(x - max)`, stable for large logits.
    ///
    /// # Errors
    /// [`Error::Axis`] when `axis >= rank`.
    pub fn log_softmax(&self, axis: usize) -> Result<Tensor<E>> {
        self.softmax_impl("log_softmax", axis, true)
    }

    fn softmax_impl(&self, op: &'static str, axis: usize, log: bool) -> Result<Tensor<E>> {
        let rank = self.rank();
        if axis >= rank {
            return Err(Error::Axis { op, axis, rank });
        }
        let (_, n, inner) = split_at_axis(self.shape(), axis);
        let block = n * inner;
        let x = self.as_slice();
        let mut y = vec![E::zero(); x.len()];
        for_each_block(&mut y, block, |b, yb| {
            let xb = &x[b * block..(b + 1) * block];
            for i in 0..inner {
                forward_lane(&xb[i..], &mut yb[i..], n, inner, log);
            }
        });
        let y: Data<E> =
            ArrayD::from_shape_vec(IxDyn(self.shape()), y).expect("peft-rs bug: softmax shape").into_shared();
        let yd = y.clone();
        Ok(record_data(op, y, &[self], move |g, _| {
            let g = g.as_standard_layout();
            let gs = g.as_slice().expect("peft-rs bug: standard layout");
            let ys = yd.as_slice().expect("peft-rs bug: tensor data is contiguous");
            let mut gx = vec![E::zero(); ys.len()];
            for_each_block(&mut gx, block, |b, gb| {
                let r = b * block..(b + 1) * block;
                let (yb, gob) = (&ys[r.clone()], &gs[r]);
                for i in 0..inner {
                    backward_lane(&yb[i..], &gob[i..], &mut gb[i..], n, inner, log);
                }
            });
            vec![Some(ArrayD::from_shape_vec(yd.raw_dim(), gx).expect("peft-rs bug: softmax grad shape"))]
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    /// A random shape of rank 1..=4 (axes of size 1..=4) and an axis of it.
    fn shape_and_axis() -> impl Strategy<Value = (Vec<usize>, usize)> {
        prop::collection::vec(1usize..5, 1..5).prop_flat_map(|s| {
            let r = s.len();
            (Just(s), 0..r)
        })
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(32))]
        #[test]
        fn softmax_grad_matches_finite_differences(
            (x, axis) in shape_and_axis().prop_flat_map(|(s, a)| (array_strategy(s, -3.0, 3.0), Just(a)))
        ) {
            assert_grads(|t| t[0].softmax(axis), std::slice::from_ref(&x));
            // under a nonlinear consumer too, so the Jacobian is exercised off the simplex
            assert_grads(|t| Ok(t[0].softmax(axis)?.square()), &[x]);
        }

        #[test]
        fn log_softmax_grad_matches_finite_differences(
            (x, axis) in shape_and_axis().prop_flat_map(|(s, a)| (array_strategy(s, -3.0, 3.0), Just(a)))
        ) {
            assert_grads(|t| t[0].log_softmax(axis), &[x]);
        }

        #[test]
        fn softmax_lanes_sum_to_one_and_match_exp_log_softmax(
            (x, axis) in shape_and_axis().prop_flat_map(|(s, a)| (array_strategy(s, -30.0, 30.0), Just(a)))
        ) {
            let t = Tensor::new(x);
            let p = t.softmax(axis).unwrap();
            let sums = p.sum(&[axis], false).unwrap();
            for &s in sums.as_slice() {
                prop_assert!((s - 1.0).abs() < 1e-12);
            }
            let lp = t.log_softmax(axis).unwrap().exp();
            for (a, b) in p.as_slice().iter().zip(lp.as_slice()) {
                prop_assert!((a - b).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn softmax_matches_hand_computed_values() {
        let x = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0], &[2, 3]).unwrap();
        let p = x.softmax(1).unwrap();
        // torch.softmax(torch.tensor([1., 2., 3.]), 0)
        let want = [0.09003057317038045, 0.2447284710547976, 0.6652409557748218];
        for (a, b) in p.as_slice()[..3].iter().zip(want) {
            assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        }
        for &a in &p.as_slice()[3..] {
            assert!((a - 1.0 / 3.0).abs() < 1e-15);
        }
        let lp = x.log_softmax(1).unwrap();
        assert!((lp.as_slice()[2] - (-0.4076059644443804)).abs() < 1e-14);
        // axis 0: columns [1, 0], [2, 0], [3, 0]
        let p0 = x.softmax(0).unwrap();
        assert!((p0.as_slice()[0] - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-15);
        assert!((p0.as_slice()[0] + p0.as_slice()[3] - 1.0).abs() < 1e-15);
    }

    #[test]
    fn softmax_is_stable_for_huge_logits() {
        let x = Tensor::<f32>::from_vec(vec![1000.0, 1001.0, -1000.0], &[3]).unwrap();
        let p = x.softmax(0).unwrap();
        assert!(p.as_slice().iter().all(|v| v.is_finite()));
        assert!((p.as_slice()[1] - 0.7310586).abs() < 1e-6);
        let lp = x.log_softmax(0).unwrap();
        assert!((lp.as_slice()[2] - (-2001.3133)).abs() < 1e-2);
        assert!(lp.as_slice().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn softmax_of_large_rows_runs_in_parallel_and_matches_serial() {
        // 64 rows x 1024 columns crosses the parallel threshold; compare with a per-row computation.
        let x = ArrayD::from_shape_fn(IxDyn(&[64, 1024]), |i| ((i[0] * 7 + i[1] * 13) % 29) as f64 * 0.1);
        let t = Tensor::var(x.clone());
        let p = t.softmax(1).unwrap();
        for r in [0usize, 31, 63] {
            let row = &x.as_slice().unwrap()[r * 1024..(r + 1) * 1024];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
            for c in [0usize, 500, 1023] {
                assert!((p.as_slice()[r * 1024 + c] - (row[c] - m).exp() / s).abs() < 1e-14);
            }
        }
        // d(sum softmax)/dx = 0
        let g = p.sum_all().backward().unwrap();
        assert!(g.get(&t).unwrap().iter().all(|v| v.abs() < 1e-12));
    }

    #[test]
    fn softmax_rejects_bad_axis() {
        let x = Tensor::<f32>::zeros(&[2, 3]);
        assert!(matches!(x.softmax(2), Err(Error::Axis { axis: 2, rank: 2, .. })));
        assert!(matches!(x.log_softmax(5), Err(Error::Axis { .. })));
        assert!(matches!(Tensor::<f32>::scalar(1.0).softmax(0), Err(Error::Axis { rank: 0, .. })));
    }
}
