//! Fused normalizations over the last axis: `layer_norm` (BERT, ViT, Whisper) and `rms_norm` (LLaMA), each with
//! a hand-written backward for the input, weight and bias.
//!
//! Both keep only per-row statistics (mean and 1/σ, or 1/rms) for the backward, which recomputes the normalized
//! rows from the input. Rows run in parallel (rayon) once the tensor is large; the weight and bias gradients are
//! summed per task and the few partial sums added at the end.

use ndarray::{ArrayD, IxDyn};

use crate::autograd::record;
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::ops::rows::{for_each_block_with, row_tasks};
use crate::tensor::Tensor;

/// Validates the input and the per-feature parameters; returns `(rows, d)` where `d` is the last axis.
fn check_args<E: Elem>(
    op: &'static str,
    x: &Tensor<E>,
    params: &[Option<&Tensor<E>>],
    eps: f64,
) -> Result<(usize, usize)> {
    let Some(&d) = x.shape().last() else {
        return Err(crate::Error::Rank { op, expected: "rank >= 1", shape: vec![] });
    };
    for p in params.iter().flatten() {
        if p.shape() != [d] {
            return Err(Error::Shape { op, lhs: x.shape().to_vec(), rhs: p.shape().to_vec() });
        }
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(crate::Error::arg(op, "eps", eps, "must be finite and >= 0"));
    }
    Ok((x.len().checked_div(d).unwrap_or(0), d))
}

/// Adds `b` into `a` elementwise (partial sums of per-task weight gradients).
fn add_into<E: Elem>(a: &mut [E], b: &[E]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// Sums the per-task partials in `parts[..][k]` into one gradient of length `d` (None when not needed).
fn reduce_partials<E: Elem>(parts: &[Vec<Vec<E>>], k: usize, d: usize, need: bool) -> Option<ArrayD<E>> {
    need.then(|| {
        let mut acc = vec![E::zero(); d];
        for p in parts {
            add_into(&mut acc, &p[k]);
        }
        ArrayD::from_shape_vec(IxDyn(&[d]), acc).expect("peft-rs bug: norm param grad shape")
    })
}

/// The input list of a norm op (`x`, then the parameters that are present) and each parameter's position in it.
fn inputs_of<'a, E: Elem>(
    x: &'a Tensor<E>,
    params: [Option<&'a Tensor<E>>; 2],
) -> (Vec<&'a Tensor<E>>, [Option<usize>; 2]) {
    let mut inputs = vec![x];
    let mut idx = [None; 2];
    for (slot, p) in idx.iter_mut().zip(params) {
        if let Some(p) = p {
            inputs.push(p);
            *slot = Some(inputs.len() - 1);
        }
    }
    (inputs, idx)
}

impl<E: Elem> Tensor<E> {
    /// Layer normalization over the last axis, as PyTorch's `F.layer_norm(x, (d,), weight, bias, eps)`:
    /// `y = (x - mean) / sqrt(var + eps) * weight + bias`, with the biased (population) variance.
    ///
    /// `weight` and `bias` have shape `[d]` (d = last axis); `None` means 1 and 0. A last axis of size 1
    /// normalizes to 0 (so `y = bias`).
    ///
    /// ```
    /// use peft_core::Tensor;
    /// let x = Tensor::<f64>::from_vec(vec![1.0, 3.0], &[1, 2])?;
    /// let y = x.layer_norm(None, None, 0.0)?;
    /// assert_eq!(y.as_slice(), &[-1.0, 1.0]);
    /// # Ok::<(), peft_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Rank`] for a rank-0 input, [`Error::Arg`] for a negative/non-finite `eps`; [`Error::Shape`] when `weight` or
    /// `bias` is not of shape `[d]`.
    pub fn layer_norm(&self, weight: Option<&Tensor<E>>, bias: Option<&Tensor<E>>, eps: f64) -> Result<Tensor<E>> {
        let (rows, d) = check_args("layer_norm", self, &[weight, bias], eps)?;
        let x = self.as_slice();
        let w: Vec<E> = weight.map_or_else(|| vec![E::one(); d], |w| w.to_vec());
        let bias_s: Option<&[E]> = bias.map(|b| b.as_slice());
        let (inv_d, eps_e) = (E::one() / E::of(d.max(1) as f64), E::of(eps));
        // per row: (mean, 1 / sqrt(var + eps))
        let mut stats = vec![(E::zero(), E::zero()); rows];
        let mut y = vec![E::zero(); x.len()];
        for_each_block_with(&mut y, d, &mut stats, |r, yr, st| {
            let xr = &x[r * d..(r + 1) * d];
            let mean = xr.iter().copied().sum::<E>() * inv_d;
            let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<E>() * inv_d;
            let rstd = E::one() / (var + eps_e).sqrt();
            *st = (mean, rstd);
            for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(&w) {
                *o = (xv - mean) * rstd * wv;
            }
            if let Some(b) = bias_s {
                add_into(yr, b);
            }
        });
        let out = ArrayD::from_shape_vec(IxDyn(self.shape()), y).expect("peft-rs bug: layer_norm shape");
        let (inputs, [iw, ib]) = inputs_of(self, [weight, bias]);
        let xd = self.data().clone();
        Ok(record("layer_norm", out, &inputs, move |g, needs| {
            let (nx, nw, nb) = (needs[0], iw.is_some_and(|i| needs[i]), ib.is_some_and(|i| needs[i]));
            let g = g.as_standard_layout();
            let gs = g.as_slice().expect("peft-rs bug: standard layout");
            let xs = xd.as_slice().expect("peft-rs bug: tensor data is contiguous");
            let mut gx = if nx { vec![E::zero(); xs.len()] } else { Vec::new() };
            let parts = row_tasks(nx.then_some(gx.as_mut_slice()), rows, d, |range, mut out| {
                let mut pw = if nw { vec![E::zero(); d] } else { Vec::new() };
                let mut pb = if nb { vec![E::zero(); d] } else { Vec::new() };
                let start = range.start;
                for r in range {
                    let (xr, gr) = (&xs[r * d..(r + 1) * d], &gs[r * d..(r + 1) * d]);
                    let (mean, rstd) = stats[r];
                    if nw {
                        for ((p, &gv), &xv) in pw.iter_mut().zip(gr).zip(xr) {
                            *p += gv * (xv - mean) * rstd;
                        }
                    }
                    if nb {
                        add_into(&mut pb, gr);
                    }
                    if let Some(o) = out.as_deref_mut() {
                        // gx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)), gh = g * w
                        let (mut a, mut c) = (E::zero(), E::zero());
                        for ((&gv, &xv), &wv) in gr.iter().zip(xr).zip(&w) {
                            let gh = gv * wv;
                            a += gh;
                            c += gh * (xv - mean) * rstd;
                        }
                        let (a, c) = (a * inv_d, c * inv_d);
                        let o = &mut o[(r - start) * d..(r - start + 1) * d];
                        for (((ov, &gv), &xv), &wv) in o.iter_mut().zip(gr).zip(xr).zip(&w) {
                            *ov = rstd * (gv * wv - a - (xv - mean) * rstd * c);
                        }
                    }
                }
                vec![pw, pb]
            });
            let mut grads = vec![nx.then(|| ArrayD::from_shape_vec(xd.raw_dim(), gx).expect("peft-rs bug: ln grad"))];
            if iw.is_some() {
                grads.push(reduce_partials(&parts, 0, d, nw));
            }
            if ib.is_some() {
                grads.push(reduce_partials(&parts, 1, d, nb));
            }
            grads
        }))
    }

    /// RMS normalization over the last axis, as LLaMA's `LlamaRMSNorm`: `y = x / sqrt(mean(x²) + eps) * weight`.
    ///
    /// `weight` has shape `[d]` (d = last axis); `None` means 1.
    ///
    /// ```
    /// use peft_core::Tensor;
    /// let x = Tensor::<f64>::from_vec(vec![3.0, -4.0], &[2])?;
    /// let y = x.rms_norm(None, 0.0)?; // rms = sqrt(12.5)
    /// assert!((y.as_slice()[0] - 3.0 / 12.5f64.sqrt()).abs() < 1e-15);
    /// # Ok::<(), peft_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Rank`] for a rank-0 input, [`Error::Arg`] for a negative/non-finite `eps`; [`Error::Shape`] when `weight` is not
    /// of shape `[d]`.
    pub fn rms_norm(&self, weight: Option<&Tensor<E>>, eps: f64) -> Result<Tensor<E>> {
        let (rows, d) = check_args("rms_norm", self, &[weight], eps)?;
        let x = self.as_slice();
        let w: Vec<E> = weight.map_or_else(|| vec![E::one(); d], |w| w.to_vec());
        let (inv_d, eps_e) = (E::one() / E::of(d.max(1) as f64), E::of(eps));
        // per row: 1 / sqrt(mean(x²) + eps)
        let mut rinv = vec![E::zero(); rows];
        let mut y = vec![E::zero(); x.len()];
        for_each_block_with(&mut y, d, &mut rinv, |r, yr, ri| {
            let xr = &x[r * d..(r + 1) * d];
            let ms = xr.iter().map(|&v| v * v).sum::<E>() * inv_d;
            let rs = E::one() / (ms + eps_e).sqrt();
            *ri = rs;
            for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(&w) {
                *o = xv * rs * wv;
            }
        });
        let out = ArrayD::from_shape_vec(IxDyn(self.shape()), y).expect("peft-rs bug: rms_norm shape");
        let (inputs, [iw, _]) = inputs_of(self, [weight, None]);
        let xd = self.data().clone();
        Ok(record("rms_norm", out, &inputs, move |g, needs| {
            let (nx, nw) = (needs[0], iw.is_some_and(|i| needs[i]));
            let g = g.as_standard_layout();
            let gs = g.as_slice().expect("peft-rs bug: standard layout");
            let xs = xd.as_slice().expect("peft-rs bug: tensor data is contiguous");
            let mut gx = if nx { vec![E::zero(); xs.len()] } else { Vec::new() };
            let parts = row_tasks(nx.then_some(gx.as_mut_slice()), rows, d, |range, mut out| {
                let mut pw = if nw { vec![E::zero(); d] } else { Vec::new() };
                let start = range.start;
                for r in range {
                    let (xr, gr, rs) = (&xs[r * d..(r + 1) * d], &gs[r * d..(r + 1) * d], rinv[r]);
                    if nw {
                        for ((p, &gv), &xv) in pw.iter_mut().zip(gr).zip(xr) {
                            *p += gv * xv * rs;
                        }
                    }
                    if let Some(o) = out.as_deref_mut() {
                        // gx = r * (gh - x * r² * mean(gh * x)), gh = g * w
                        let c = gr.iter().zip(xr).zip(&w).map(|((&gv, &xv), &wv)| gv * wv * xv).sum::<E>() * inv_d;
                        let k = rs * rs * c;
                        let o = &mut o[(r - start) * d..(r - start + 1) * d];
                        for (((ov, &gv), &xv), &wv) in o.iter_mut().zip(gr).zip(xr).zip(&w) {
                            *ov = rs * (gv * wv - xv * k);
                        }
                    }
                }
                vec![pw]
            });
            let mut grads = vec![nx.then(|| ArrayD::from_shape_vec(xd.raw_dim(), gx).expect("peft-rs bug: rms grad"))];
            if iw.is_some() {
                grads.push(reduce_partials(&parts, 0, d, nw));
            }
            grads
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    /// Random `[lead.., d]` inputs whose rows are spread out (a ramp of 3 per feature keeps the variance away from
    /// 0, where layer norm's curvature would swamp finite differences), with `d` in 1..=6.
    fn ln_input() -> impl Strategy<Value = ArrayD<f64>> {
        (prop::collection::vec(1usize..4, 0..3), 1usize..7).prop_flat_map(|(mut s, d)| {
            s.push(d);
            array_strategy(s, -1.0, 1.0).prop_map(move |mut a| {
                a.iter_mut().enumerate().for_each(|(i, v)| *v += 3.0 * (i % d) as f64);
                a
            })
        })
    }

    /// Random `[lead.., d]` inputs with |x| in 0.3..2 and random signs (rms stays away from 0).
    fn rms_input() -> impl Strategy<Value = ArrayD<f64>> {
        (prop::collection::vec(1usize..4, 0..3), 1usize..7).prop_flat_map(|(mut s, d)| {
            s.push(d);
            let n: usize = s.iter().product();
            (array_strategy(s, 0.3, 2.0), prop::collection::vec(any::<bool>(), n)).prop_map(|(mut a, signs)| {
                a.iter_mut().zip(signs).for_each(|(v, neg)| {
                    if neg {
                        *v = -*v
                    }
                });
                a
            })
        })
    }

    fn with_params(x: ArrayD<f64>) -> impl Strategy<Value = (ArrayD<f64>, ArrayD<f64>, ArrayD<f64>)> {
        let d = *x.shape().last().expect("rank >= 1");
        (Just(x), array_strategy(vec![d], -2.0, 2.0), array_strategy(vec![d], -1.0, 1.0))
    }

    fn layer_norm_composite(
        x: &Tensor<f64>,
        w: Option<&Tensor<f64>>,
        b: Option<&Tensor<f64>>,
        eps: f64,
    ) -> Tensor<f64> {
        let last = x.rank() - 1;
        let c = x.sub(&x.mean(&[last], true).unwrap()).unwrap();
        let var = c.square().mean(&[last], true).unwrap();
        let mut y = c.div(&var.add_scalar(eps).sqrt()).unwrap();
        if let Some(w) = w {
            y = y.mul(w).unwrap();
        }
        if let Some(b) = b {
            y = y.add(b).unwrap();
        }
        y
    }

    fn rms_norm_composite(x: &Tensor<f64>, w: Option<&Tensor<f64>>, eps: f64) -> Tensor<f64> {
        let last = x.rank() - 1;
        let y = x.div(&x.square().mean(&[last], true).unwrap().add_scalar(eps).sqrt()).unwrap();
        w.map_or(y.clone(), |w| y.mul(w).unwrap())
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(24))]
        #[test]
        fn layer_norm_grad_matches_finite_differences((x, w, b) in ln_input().prop_flat_map(with_params)) {
            assert_grads(|t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-5), &[x.clone(), w.clone(), b.clone()]);
            assert_grads(|t| t[0].layer_norm(Some(&t[1]), None, 1e-5), &[x.clone(), w]);
            assert_grads(|t| t[0].layer_norm(None, Some(&t[1]), 1e-5), &[x.clone(), b]);
            assert_grads(|t| t[0].layer_norm(None, None, 1e-5), &[x]);
        }

        #[test]
        fn rms_norm_grad_matches_finite_differences((x, w, _b) in rms_input().prop_flat_map(with_params)) {
            assert_grads(|t| t[0].rms_norm(Some(&t[1]), 1e-6), &[x.clone(), w]);
            assert_grads(|t| t[0].rms_norm(None, 1e-6), &[x]);
        }

        #[test]
        fn fused_norms_match_composites((x, w, b) in ln_input().prop_flat_map(with_params)) {
            let (x, w, b) = (Tensor::new(x), Tensor::new(w), Tensor::new(b));
            let pairs = [
                (x.layer_norm(Some(&w), Some(&b), 1e-5).unwrap(), layer_norm_composite(&x, Some(&w), Some(&b), 1e-5)),
                (x.rms_norm(Some(&w), 1e-6).unwrap(), rms_norm_composite(&x, Some(&w), 1e-6)),
            ];
            for (f, c) in pairs {
                for (a, e) in f.as_slice().iter().zip(c.as_slice()) {
                    prop_assert!((a - e).abs() < 1e-12, "{a} vs {e}");
                }
            }
        }
    }

    #[test]
    fn layer_norm_matches_pytorch_values() {
        let x = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0, 5.0, -1.0, 0.5, 0.0, 2.0], &[2, 4]).unwrap();
        let w = Tensor::<f64>::from_vec(vec![1.0, 2.0, -1.0, 0.5], &[4]).unwrap();
        let b = Tensor::<f64>::from_vec(vec![0.0, 1.0, 2.0, 3.0], &[4]).unwrap();
        // F.layer_norm(x, (4,), w, b, 1e-5) and without affine, in float64
        let want = [
            -1.1832132521355805,
            -0.014182787544783304,
            1.8309695354092028,
            3.7606370906585873,
            -1.2701651728573338,
            1.230939122337697,
            2.3464086835065454,
            3.7505521475975154,
        ];
        let plain = [
            -1.1832132521355805,
            -0.5070913937723917,
            0.1690304645907972,
            1.5212741813171748,
            -1.2701651728573338,
            0.11546956116884859,
            -0.3464086835065455,
            1.5011042951950309,
        ];
        let y = x.layer_norm(Some(&w), Some(&b), 1e-5).unwrap();
        let y0 = x.layer_norm(None, None, 1e-5).unwrap();
        for i in 0..8 {
            assert!((y.as_slice()[i] - want[i]).abs() < 1e-13, "{i}: {} vs {}", y.as_slice()[i], want[i]);
            assert!((y0.as_slice()[i] - plain[i]).abs() < 1e-13);
        }
    }

    #[test]
    fn rms_norm_matches_llama_values() {
        let x = Tensor::<f32>::from_vec(vec![1.0, 2.0, 3.0, 5.0, -1.0, 0.5, 0.0, 2.0], &[2, 4]).unwrap();
        let w = Tensor::<f32>::from_vec(vec![1.0, 2.0, -1.0, 0.5], &[4]).unwrap();
        // x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        let want = [0.3202563, 1.2810252, -0.9607689, 0.8006407, -0.8728712, 0.8728712, 0.0, 0.8728712];
        let y = x.rms_norm(Some(&w), 1e-6).unwrap();
        assert!(crate::testing::max_abs_diff(y.as_slice(), &want) < 1e-6);
    }

    #[test]
    fn fused_norms_match_composites_on_large_parallel_input() {
        // 96 x 768 (BERT-base width) crosses the parallel threshold in forward and backward.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut rand_arr = |s: &[usize]| ArrayD::from_shape_fn(IxDyn(s), |_| rng.gen_range(-2.0..2.0));
        let (x, w, b, r) = (rand_arr(&[2, 48, 768]), rand_arr(&[768]), rand_arr(&[768]), rand_arr(&[2, 48, 768]));
        let r = Tensor::new(r);
        let check = |fused: &dyn Fn(&[Tensor<f64>]) -> Tensor<f64>, comp: &dyn Fn(&[Tensor<f64>]) -> Tensor<f64>| {
            let vars: Vec<Tensor<f64>> = [&x, &w, &b].iter().map(|a| Tensor::var((*a).clone())).collect();
            let (yf, yc) = (fused(&vars), comp(&vars));
            assert!(yf.as_slice().iter().zip(yc.as_slice()).all(|(a, e)| (a - e).abs() < 1e-11));
            let gf = yf.mul(&r).unwrap().sum_all().backward().unwrap();
            let gc = yc.mul(&r).unwrap().sum_all().backward().unwrap();
            for v in &vars {
                let (a, e) = (gf.get(v), gc.get(v));
                assert_eq!(a.is_some(), e.is_some());
                if let (Some(a), Some(e)) = (a, e) {
                    let err = a.iter().zip(e.iter()).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
                    assert!(err < 1e-9, "gradient differs by {err}");
                }
            }
        };
        check(&|t| t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-12).unwrap(), &|t| {
            layer_norm_composite(&t[0], Some(&t[1]), Some(&t[2]), 1e-12)
        });
        check(&|t| t[0].rms_norm(Some(&t[1]), 1e-6).unwrap(), &|t| rms_norm_composite(&t[0], Some(&t[1]), 1e-6));
    }

    #[test]
    fn constant_input_or_frozen_params_get_only_the_gradients_asked_for() {
        let x = ArrayD::from_shape_fn(IxDyn(&[3, 4]), |i| (i[0] * 4 + i[1]) as f64 * 0.3 - 1.0);
        let w = ArrayD::from_elem(IxDyn(&[4]), 1.5);
        let b = ArrayD::from_elem(IxDyn(&[4]), 0.5);
        // constant input (a frozen embedding under LN tuning): only weight and bias get gradients
        let (xc, wv, bv) = (Tensor::new(x.clone()), Tensor::var(w.clone()), Tensor::var(b.clone()));
        let g = xc.layer_norm(Some(&wv), Some(&bv), 1e-5).unwrap().square().sum_all().backward().unwrap();
        assert_eq!(g.len(), 2);
        assert!(g.get(&wv).is_some() && g.get(&bv).is_some());
        // frozen weight and bias: only the input gets a gradient
        let (xv, wc, bc) = (Tensor::var(x), Tensor::new(w), Tensor::new(b));
        let g = xv.layer_norm(Some(&wc), Some(&bc), 1e-5).unwrap().square().sum_all().backward().unwrap();
        assert_eq!(g.len(), 1);
        let g = xv.rms_norm(Some(&wc), 1e-5).unwrap().square().sum_all().backward().unwrap();
        assert_eq!(g.len(), 1);
        assert!(g.get(&xv).is_some());
    }

    #[test]
    fn norms_reject_bad_shapes_and_eps() {
        let x = Tensor::<f32>::zeros(&[2, 4]);
        let w3 = Tensor::<f32>::ones(&[3]);
        let w4 = Tensor::<f32>::ones(&[4]);
        assert!(matches!(x.layer_norm(Some(&w3), None, 1e-5), Err(Error::Shape { op: "layer_norm", .. })));
        assert!(matches!(x.layer_norm(Some(&w4), Some(&w3), 1e-5), Err(Error::Shape { .. })));
        assert!(matches!(x.rms_norm(Some(&w3), 1e-5), Err(Error::Shape { op: "rms_norm", .. })));
        assert!(matches!(x.layer_norm(None, None, -1.0), Err(Error::Arg { .. })));
        assert!(matches!(x.rms_norm(None, f64::NAN), Err(Error::Arg { .. })));
        assert!(matches!(Tensor::<f32>::scalar(1.0).layer_norm(None, None, 1e-5), Err(Error::Rank { .. })));
        // an all-equal row normalizes to 0 (no NaN) and an empty batch is fine
        let y = x.layer_norm(Some(&w4), None, 1e-5).unwrap();
        assert!(y.as_slice().iter().all(|&v| v == 0.0));
        assert_eq!(Tensor::<f32>::zeros(&[0, 4]).layer_norm(Some(&w4), None, 1e-5).unwrap().shape(), &[0, 4]);
    }
}
