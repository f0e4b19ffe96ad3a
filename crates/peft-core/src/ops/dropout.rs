//! Inverted dropout with an explicit, seedable random source.

use ndarray::ArrayD;
use rand::Rng;

use crate::autograd::record;
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Draws the keep-mask: each entry is dropped with probability `p` (to within 2⁻³²), two entries per `u64` draw.
fn keep_mask(n: usize, p: f64, rng: &mut impl Rng) -> Vec<bool> {
    // drop iff a uniform u32 falls below p·2³² (p < 1, so the threshold fits in u64 and is < 2³²)
    let thr = (p * 4_294_967_296.0).round() as u64;
    let mut keep = Vec::with_capacity(n);
    while keep.len() < n {
        let r: u64 = rng.gen();
        keep.push((r & 0xffff_ffff) >= thr);
        if keep.len() < n {
            keep.push((r >> 32) >= thr);
        }
    }
    keep
}

impl<E: Elem> Tensor<E> {
    /// Inverted dropout: in training (`train = true`) each entry is zeroed with probability `p` and the
    /// survivors are scaled by `1 / (1 - p)`, so the expectation is unchanged; the backward reuses the same mask.
    ///
    /// With `train = false` or `p = 0` this is the identity (the same tensor comes back) and `rng` is not used.
    /// Masks depend only on `rng`'s state and the element count, so a seeded rng reproduces them.
    ///
    /// # Errors
    /// [`crate::Error::Arg`] when `p` is not in `[0, 1)` (NaN included).
    pub fn dropout(&self, p: f64, train: bool, rng: &mut impl Rng) -> Result<Tensor<E>> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::arg("dropout", "p", p, "must lie in [0, 1)"));
        }
        if !train || p == 0.0 {
            return Ok(self.clone());
        }
        let keep = keep_mask(self.len(), p, rng);
        let scale = E::of(1.0 / (1.0 - p));
        let apply = move |x: &[E], keep: &[bool]| -> Vec<E> {
            x.iter().zip(keep).map(|(&v, &k)| if k { v * scale } else { E::zero() }).collect()
        };
        let out = ArrayD::from_shape_vec(self.data().raw_dim(), apply(self.as_slice(), &keep))
            .expect("peft-rs bug: dropout shape");
        Ok(record("dropout", out, &[self], move |g, _| {
            let gs = g.as_slice().expect("peft-rs bug: contiguous grad");
            vec![Some(ArrayD::from_shape_vec(g.raw_dim(), apply(gs, &keep)).expect("peft-rs bug: dropout shape"))]
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    proptest! {
        #![proptest_config(crate::testing::proptest_config(24))]
        #[test]
        fn dropout_grad_matches_finite_differences(
            (x, p, seed) in (prop::collection::vec(1usize..5, 1..4), 0.0f64..0.9, any::<u64>())
                .prop_flat_map(|(s, p, seed)| (array_strategy(s, -1.0, 1.0), Just(p), Just(seed)))
        ) {
            // a fresh rng with the same seed on every evaluation: the mask is fixed, as in one training step
            assert_grads(|t| Ok(t[0].dropout(p, true, &mut StdRng::seed_from_u64(seed))?.exp()), &[x]);
        }
    }

    #[test]
    fn zero_probability_and_eval_mode_are_identity() {
        let x = Tensor::<f32>::var(ArrayD::from_elem(ndarray::IxDyn(&[3, 4]), 2.0));
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(x.dropout(0.0, true, &mut rng).unwrap().id(), x.id());
        assert_eq!(x.dropout(0.5, false, &mut rng).unwrap().id(), x.id());
    }

    #[test]
    fn dropout_keeps_the_mean_and_drops_a_fraction_p() {
        let n = 200_000;
        let x = Tensor::<f64>::ones(&[n]);
        let p = 0.3;
        let y = x.dropout(p, true, &mut StdRng::seed_from_u64(7)).unwrap();
        let zeros = y.as_slice().iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        let mean = y.as_slice().iter().sum::<f64>() / n as f64;
        // binomial std of the drop fraction is sqrt(p(1-p)/n) ~ 0.001
        assert!((zeros - p).abs() < 0.005, "drop fraction {zeros}");
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        assert!(y.as_slice().iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-12));
    }

    #[test]
    fn backward_reuses_the_forward_mask_and_seeds_reproduce() {
        let x = Tensor::<f64>::var(ArrayD::ones(ndarray::IxDyn(&[64])));
        let y = x.dropout(0.5, true, &mut StdRng::seed_from_u64(3)).unwrap();
        let y2 = x.dropout(0.5, true, &mut StdRng::seed_from_u64(3)).unwrap();
        assert_eq!(y.to_vec(), y2.to_vec());
        let g = y.sum_all().backward().unwrap();
        // for x = 1 the gradient of sum(y) is y itself
        assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), y.as_slice());
    }

    #[test]
    fn probability_outside_unit_interval_is_an_error() {
        let x = Tensor::<f32>::ones(&[4]);
        let mut rng = StdRng::seed_from_u64(0);
        for p in [1.0, 1.5, -0.1, f64::NAN] {
            assert!(matches!(x.dropout(p, true, &mut rng), Err(Error::Arg { op: "dropout", .. })), "p = {p}");
            assert!(matches!(x.dropout(p, false, &mut rng), Err(Error::Arg { .. })), "p = {p}");
        }
    }
}
