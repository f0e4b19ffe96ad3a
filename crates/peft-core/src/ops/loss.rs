//! Losses: a fused `cross_entropy` over class logits (PyTorch `F.cross_entropy` semantics, with `ignore_index`
//! and label smoothing) and the composite `mse_loss`.

use ndarray::{ArrayD, IxDyn};

use crate::autograd::record;
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::ops::rows::{for_each_block, map_rows};
use crate::tensor::Tensor;

impl<E: Elem> Tensor<E> {
    /// Mean cross-entropy of class logits `self` (`[.., C]`, classes on the last axis) against integer class
    /// `targets` (one per row, i.e. `len / C` of them in row-major order), as PyTorch's
    /// `F.cross_entropy(logits.reshape(-1, C), targets, ignore_index=.., label_smoothing=ε)`.
    ///
    /// Per row `i` with target `t`: `loss_i = (1 - ε)·(-log p_it) + ε·mean_c(-log p_ic)`, where `p = softmax`.
    /// The result (rank 0) is the mean of `loss_i` over the rows whose target is not `ignore_index`. When every
    /// target is ignored (or there are no rows) the loss is `0` with a zero gradient, where PyTorch returns NaN.
    /// The backward is fused: `∂/∂x_ic = (p_ic - (1 - ε)·[c = t] - ε / C) / n_valid`.
    ///
    /// Note that for rank > 2 the class axis is the last one (the Hugging Face `[batch, seq, vocab]` layout),
    /// not axis 1 as in PyTorch's `[N, C, d..]` form.
    ///
    /// ```
    /// use peft_core::Tensor;
    /// let logits = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0, 0.0, 0.0, 9.0], &[2, 3])?;
    /// let loss = logits.cross_entropy(&[2, -100], Some(-100), 0.0)?; // second row ignored
    /// assert!((loss.item()? - 0.4076059644443804).abs() < 1e-12);
    /// # Ok::<(), peft_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Rank`] for a rank-0 input, [`Error::Empty`] for zero classes, [`Error::Index`] for a target outside
    /// `0..C` that is not `ignore_index`, [`Error::Arg`] for `label_smoothing` outside `[0, 1]`; [`Error::Shape`] when `targets.len()` is not the number of rows.
    pub fn cross_entropy(&self, targets: &[i64], ignore_index: Option<i64>, label_smoothing: f64) -> Result<Tensor<E>> {
        let op = "cross_entropy";
        let Some(&c) = self.shape().last() else {
            return Err(Error::Rank { op, expected: "logits of rank >= 1 (classes on the last axis)", shape: vec![] });
        };
        if c == 0 {
            return Err(Error::Empty { op, what: "the class axis of the logits" });
        }
        let rows = self.len() / c;
        if targets.len() != rows {
            return Err(Error::Shape { op, lhs: self.shape().to_vec(), rhs: vec![targets.len()] });
        }
        if !(0.0..=1.0).contains(&label_smoothing) {
            return Err(Error::arg(op, "label_smoothing", label_smoothing, "must lie in [0, 1]"));
        }
        let mut tgt: Vec<Option<usize>> = Vec::with_capacity(rows);
        for (i, &t) in targets.iter().enumerate() {
            if Some(t) == ignore_index {
                tgt.push(None);
            } else if (0..c as i64).contains(&t) {
                tgt.push(Some(t as usize));
            } else {
                return Err(Error::Index { op, index: t, position: vec![i], axis: self.rank() - 1, size: c });
            }
        }
        let n_valid = tgt.iter().filter(|t| t.is_some()).count();
        let eps = E::of(label_smoothing);
        let (keep, inv_c) = (E::one() - eps, E::one() / E::of(c as f64));
        let x = self.as_slice();
        // per row: (max, log Σ exp(x - max), loss) for kept rows, working on `x - max` (exact for nearby values)
        // so large logits keep their precision; the loss sum is accumulated in f64
        let per_row: Vec<(E, E, f64)> = map_rows(rows, c, |r| {
            let Some(t) = tgt[r] else { return (E::zero(), E::zero(), 0.0) };
            let xr = &x[r * c..(r + 1) * c];
            let m = xr.iter().copied().fold(E::neg_infinity(), |m, v| if v > m { v } else { m });
            let ls = xr.iter().map(|&v| (v - m).exp()).sum::<E>().ln();
            let mut loss = keep * ((m - xr[t]) + ls);
            if label_smoothing > 0.0 {
                loss += eps * (ls + xr.iter().map(|&v| m - v).sum::<E>() * inv_c);
            }
            (m, ls, loss.f64())
        });
        let total: f64 = per_row.iter().map(|p| p.2).sum();
        let mean = if n_valid == 0 { 0.0 } else { total / n_valid as f64 };
        let stats: Vec<(E, E)> = per_row.into_iter().map(|p| (p.0, p.1)).collect();
        let xd = self.data().clone();
        Ok(record(op, ArrayD::from_elem(IxDyn(&[]), E::of(mean)), &[self], move |g, _| {
            let mut gx = vec![E::zero(); xd.len()];
            if n_valid > 0 {
                let scale = g.iter().next().copied().expect("peft-rs bug: scalar grad") / E::of(n_valid as f64);
                let xs = xd.as_slice().expect("peft-rs bug: tensor data is contiguous");
                let smooth = eps * inv_c;
                for_each_block(&mut gx, c, |r, gr| {
                    let Some(t) = tgt[r] else { return };
                    let (m, ls) = stats[r];
                    for (o, &v) in gr.iter_mut().zip(&xs[r * c..(r + 1) * c]) {
                        *o = scale * (((v - m) - ls).exp() - smooth);
                    }
                    gr[t] -= scale * keep;
                });
            }
            vec![Some(ArrayD::from_shape_vec(xd.raw_dim(), gx).expect("peft-rs bug: cross_entropy grad shape"))]
        }))
    }

    /// Mean squared error `mean((self - target)²)` over all elements (rank-0 result); composite, so both sides
    /// get gradients when they track.
    ///
    /// # Errors
    /// [`Error::Shape`] when the shapes differ (no broadcasting, unlike PyTorch's warning-only behaviour).
    pub fn mse_loss(&self, target: &Tensor<E>) -> Result<Tensor<E>> {
        if self.shape() != target.shape() {
            return Err(Error::Shape { op: "mse_loss", lhs: self.shape().to_vec(), rhs: target.shape().to_vec() });
        }
        Ok(self.sub(target)?.square().mean_all())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    /// Logits `[rows, c]` (rows, c in 1..=5) with targets in `0..c`, about a quarter of them ignored (-100).
    fn logits_and_targets() -> impl Strategy<Value = (ArrayD<f64>, Vec<i64>)> {
        (1usize..6, 1usize..6).prop_flat_map(|(rows, c)| {
            let t = prop::collection::vec(prop_oneof![3 => 0..c as i64, 1 => Just(-100i64)], rows);
            (array_strategy(vec![rows, c], -3.0, 3.0), t)
        })
    }

    /// The same loss from primitives: `-(1-ε)·logp[t] - ε·mean_c logp`, averaged over kept rows.
    fn composite(x: &Tensor<f64>, targets: &[i64], ls: f64) -> f64 {
        let lp = x.log_softmax(1).unwrap();
        let c = x.shape()[1];
        let (mut sum, mut n) = (0.0, 0);
        for (r, &t) in targets.iter().enumerate() {
            if t < 0 {
                continue;
            }
            let row = &lp.as_slice()[r * c..(r + 1) * c];
            sum += -(1.0 - ls) * row[t as usize] - ls * row.iter().sum::<f64>() / c as f64;
            n += 1;
        }
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(32))]
        #[test]
        fn cross_entropy_grad_matches_finite_differences(
            (x, t) in logits_and_targets(),
            ls in prop_oneof![Just(0.0), Just(1.0), 0.0..1.0f64],
        ) {
            assert_grads(|v| v[0].cross_entropy(&t, Some(-100), ls), std::slice::from_ref(&x));
            // under a nonlinear consumer, so the scaling by the incoming gradient is exercised
            assert_grads(|v| Ok(v[0].cross_entropy(&t, Some(-100), ls)?.square()), &[x]);
        }

        #[test]
        fn cross_entropy_matches_composite_of_log_softmax(
            (x, t) in logits_and_targets(),
            ls in 0.0..1.0f64,
        ) {
            let xt = Tensor::new(x);
            let got = xt.cross_entropy(&t, Some(-100), ls).unwrap().item().unwrap();
            prop_assert!((got - composite(&xt, &t, ls)).abs() < 1e-12);
        }

        #[test]
        fn mse_loss_grad_matches_finite_differences(
            (a, b) in prop::collection::vec(1usize..4, 0..4)
                .prop_flat_map(|s| (array_strategy(s.clone(), -2.0, 2.0), array_strategy(s, -2.0, 2.0)))
        ) {
            assert_grads(|v| v[0].mse_loss(&v[1]), &[a, b]);
        }
    }

    #[test]
    fn cross_entropy_matches_pytorch_values() {
        let x = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0], &[1, 3]).unwrap();
        // F.cross_entropy(x, [2]) = log(e + e² + e³) - 3
        assert!((x.cross_entropy(&[2], None, 0.0).unwrap().item().unwrap() - 0.4076059644443804).abs() < 1e-14);
        // label smoothing 0.1, target 0: 0.9·(lse - 1) + 0.1·(lse - 2)
        let ls = x.cross_entropy(&[0], None, 0.1).unwrap().item().unwrap();
        assert!((ls - 2.3076059644443805).abs() < 1e-14, "{ls}");
    }

    #[test]
    fn cross_entropy_with_ignore_and_smoothing_matches_pytorch_loss_and_grad() {
        let x = Tensor::<f64>::var(
            ArrayD::from_shape_vec(IxDyn(&[3, 3]), vec![1.0, 2.0, 3.0, 0.5, -1.0, 2.0, 3.0, 0.0, 0.0]).unwrap(),
        );
        // l = F.cross_entropy(x, [1, -100, 0], label_smoothing=0.2); l.backward()
        let l = x.cross_entropy(&[1, -100, 0], Some(-100), 0.2).unwrap();
        assert!((l.item().unwrap() - 0.9512644604326705).abs() < 1e-14);
        let want = [
            0.011681953251856884,
            -0.3109690978059345,
            0.29928714455407757,
            0.0,
            0.0,
            0.0,
            0.02138816592303766,
            -0.010694082961518792,
            -0.010694082961518792,
        ];
        let g = l.backward().unwrap();
        for (a, e) in g.get(&x).unwrap().iter().zip(want) {
            assert!((a - e).abs() < 1e-14, "{a} vs {e}");
        }
    }

    #[test]
    fn cross_entropy_over_batch_seq_vocab_uses_last_axis() {
        let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |i| (i[0] * 12 + i[1] * 4 + i[2]) as f64 * 0.37 % 1.3);
        let t = [0i64, 3, -100, 1, 2, 2];
        let a = Tensor::new(x.clone()).cross_entropy(&t, Some(-100), 0.1).unwrap();
        let b =
            Tensor::new(x.into_shape_with_order(IxDyn(&[6, 4])).unwrap()).cross_entropy(&t, Some(-100), 0.1).unwrap();
        assert_eq!(a.item().unwrap(), b.item().unwrap());
    }

    #[test]
    fn cross_entropy_with_all_targets_ignored_is_zero_without_nan() {
        let x = Tensor::<f32>::var(ArrayD::from_elem(IxDyn(&[2, 3]), 1.0));
        let l = x.cross_entropy(&[-100, -100], Some(-100), 0.1).unwrap();
        assert_eq!(l.item().unwrap(), 0.0);
        let g = l.backward().unwrap();
        assert!(g.get(&x).unwrap().iter().all(|&v| v == 0.0));
        // an empty batch too
        let e = Tensor::<f32>::zeros(&[0, 3]).cross_entropy(&[], None, 0.0).unwrap();
        assert_eq!(e.item().unwrap(), 0.0);
    }

    #[test]
    fn cross_entropy_is_stable_for_large_f32_logits_over_a_big_vocab() {
        // 16 rows x 4096 classes crosses the parallel threshold; logits around 1e4 must not overflow.
        let x = ArrayD::from_shape_fn(IxDyn(&[16, 4096]), |i| 1.0e4 + ((i[0] * 31 + i[1] * 17) % 101) as f32 * 0.05);
        let t: Vec<i64> = (0..16).map(|r| (r * 255) as i64).collect();
        let xt = Tensor::var(x.clone());
        let l = xt.cross_entropy(&t, None, 0.0).unwrap();
        assert!(l.item().unwrap().is_finite());
        let want = composite(&Tensor::new(x.mapv(f64::from)), &t, 0.0);
        assert!((l.item().unwrap() as f64 - want).abs() < 1e-3, "{} vs {want}", l.item().unwrap());
        let g = l.backward().unwrap();
        // each row's gradient sums to 0 (softmax minus one-hot)
        let gx = g.get(&xt).unwrap();
        for r in 0..16 {
            let s: f32 = gx.as_slice().unwrap()[r * 4096..(r + 1) * 4096].iter().sum();
            assert!(s.abs() < 1e-6);
        }
    }

    #[test]
    fn cross_entropy_rejects_bad_targets_and_arguments() {
        let x = Tensor::<f32>::zeros(&[2, 3]);
        assert!(matches!(x.cross_entropy(&[0, 3], None, 0.0), Err(Error::Index { op: "cross_entropy", index: 3, .. })));
        assert!(matches!(x.cross_entropy(&[0, -1], None, 0.0), Err(Error::Index { index: -1, .. })));
        assert!(matches!(x.cross_entropy(&[0, -100], Some(-1), 0.0), Err(Error::Index { index: -100, .. })));
        assert!(matches!(x.cross_entropy(&[0], None, 0.0), Err(Error::Shape { .. })));
        assert!(matches!(x.cross_entropy(&[0, 1], None, 1.5), Err(Error::Arg { .. })));
        assert!(matches!(x.cross_entropy(&[0, 1], None, f64::NAN), Err(Error::Arg { .. })));
        assert!(matches!(Tensor::<f32>::zeros(&[2, 0]).cross_entropy(&[], None, 0.0), Err(Error::Empty { .. })));
        assert!(matches!(Tensor::<f32>::scalar(0.0).cross_entropy(&[0], None, 0.0), Err(Error::Rank { .. })));
        // ignore_index may name a valid class: those rows are skipped
        let y = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0, 0.0, 0.0, 9.0], &[2, 3]).unwrap();
        let l = y.cross_entropy(&[2, 0], Some(0), 0.0).unwrap().item().unwrap();
        assert!((l - 0.4076059644443804).abs() < 1e-14);
    }

    #[test]
    fn mse_loss_matches_hand_value_and_rejects_shape_mismatch() {
        let a = Tensor::<f32>::from_vec(vec![1.0, 2.0, 3.0], &[3]).unwrap();
        let b = Tensor::<f32>::from_vec(vec![0.0, 2.0, 5.0], &[3]).unwrap();
        assert!((a.mse_loss(&b).unwrap().item().unwrap() - 5.0 / 3.0).abs() < 1e-6);
        let c = Tensor::<f32>::zeros(&[1, 3]);
        assert!(matches!(a.mse_loss(&c), Err(Error::Shape { op: "mse_loss", .. })));
    }
}
