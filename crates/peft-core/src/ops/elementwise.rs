//! Elementwise ops: broadcasting binary arithmetic, scalar arithmetic and unary math.

use ndarray::{ArrayD, IxDyn, Zip};

use crate::autograd::{record, record_data};
use crate::backend::{wide, PAR_ELEMWISE};
use crate::elem::Elem;
use crate::error::Result;
use crate::ops::broadcast::{broadcast_shape, sum_to};
use crate::tensor::{Data, Tensor};

/// Chunk length for parallel slice loops.
const CHUNK: usize = 1 << 13;

/// If `small` broadcasts against `shape` as a trailing block (`small` equals the last axes of `shape` after
/// dropping its leading 1s), the block length.
fn suffix_len(small: &[usize], shape: &[usize]) -> Option<usize> {
    let lead = small.iter().take_while(|&&d| d == 1).count();
    let s = &small[lead..];
    (s.len() <= shape.len() && shape[shape.len() - s.len()..] == *s).then(|| s.iter().product())
}

/// `out[i] = f(a[i], b[i % b.len()])` over contiguous slices (`b` repeats; `b.len()` divides `a.len()`).
fn zip_slices<E: Elem>(a: &[E], b: &[E], swap: bool, f: impl Fn(E, E) -> E + Sync + Send) -> Vec<E> {
    let mut out = vec![E::zero(); a.len()];
    let n = b.len().max(1);
    let chunk = if n >= CHUNK { n } else { CHUNK / n * n };
    let run = |(o, x): (&mut [E], &[E])| {
        wide(|| {
            for (o, x) in o.chunks_mut(n).zip(x.chunks(n)) {
                if swap {
                    o.iter_mut().zip(x).zip(b).for_each(|((o, &x), &y)| *o = f(y, x));
                } else {
                    o.iter_mut().zip(x).zip(b).for_each(|((o, &x), &y)| *o = f(x, y));
                }
            }
        })
    };
    if a.len() >= PAR_ELEMWISE {
        use rayon::prelude::*;
        out.par_chunks_mut(chunk).zip(a.par_chunks(chunk)).for_each(run);
    } else {
        run((&mut out[..], a));
    }
    out
}

/// Applies `f` elementwise over two broadcast views into a new array of `shape`. Same-shape operands and a
/// trailing-block broadcast (a bias `[H]` against `[B, L, H]`) take contiguous-slice loops; other broadcasts
/// go through `ndarray::Zip`.
fn zip2<E: Elem>(shape: &[usize], a: &Data<E>, b: &Data<E>, f: impl Fn(E, E) -> E + Sync + Send) -> ArrayD<E> {
    let total = out_len(shape);
    if let (Some(sa), Some(sb)) = (a.as_slice(), b.as_slice()) {
        let fast = if sa.len() == total && a.shape() == shape {
            if sb.len() == total && b.shape() == shape {
                Some(same_shape(sa, sb, &f))
            } else {
                suffix_len(b.shape(), shape).filter(|&n| n > 0).map(|_| zip_slices(sa, sb, false, &f))
            }
        } else if sb.len() == total && b.shape() == shape {
            suffix_len(a.shape(), shape).filter(|&n| n > 0).map(|_| zip_slices(sb, sa, true, &f))
        } else {
            None
        };
        if let Some(v) = fast {
            return ArrayD::from_shape_vec(IxDyn(shape), v).expect("peft-rs bug: zip2 shape");
        }
    }
    let mut out = ArrayD::<E>::zeros(IxDyn(shape));
    let av = a.broadcast(IxDyn(shape)).expect("peft-rs bug: broadcast a");
    let bv = b.broadcast(IxDyn(shape)).expect("peft-rs bug: broadcast b");
    let z = Zip::from(&mut out).and(&av).and(&bv);
    if total >= PAR_ELEMWISE {
        z.par_for_each(|o, &x, &y| *o = f(x, y));
    } else {
        z.for_each(|o, &x, &y| *o = f(x, y));
    }
    out
}

fn same_shape<E: Elem>(a: &[E], b: &[E], f: &(impl Fn(E, E) -> E + Sync + Send)) -> Vec<E> {
    let mut out = vec![E::zero(); a.len()];
    let run = |((o, x), y): ((&mut [E], &[E]), &[E])| {
        wide(|| o.iter_mut().zip(x).zip(y).for_each(|((o, &x), &y)| *o = f(x, y)));
    };
    if a.len() >= PAR_ELEMWISE {
        use rayon::prelude::*;
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(run);
    } else {
        run(((&mut out[..], a), b));
    }
    out
}

fn out_len(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Maps `f` over one array (in parallel when large).
pub(crate) fn map1<E: Elem>(a: &Data<E>, f: impl Fn(E) -> E + Sync + Send) -> ArrayD<E> {
    let Some(sa) = a.as_slice() else {
        return a.mapv(f);
    };
    let mut out = vec![E::zero(); sa.len()];
    let run = |(o, x): (&mut [E], &[E])| wide(|| o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x)));
    if sa.len() >= PAR_ELEMWISE {
        use rayon::prelude::*;
        out.par_chunks_mut(CHUNK).zip(sa.par_chunks(CHUNK)).for_each(run);
    } else {
        run((&mut out[..], sa));
    }
    ArrayD::from_shape_vec(a.raw_dim(), out).expect("peft-rs bug: map1 shape")
}

/// `g * h(x, y)` elementwise over three same-shape arrays (the usual unary backward).
pub(crate) fn map3<E: Elem>(
    g: &ArrayD<E>,
    x: &Data<E>,
    y: &Data<E>,
    f: impl Fn(E, E, E) -> E + Sync + Send,
) -> ArrayD<E> {
    if let (Some(sg), Some(sx), Some(sy)) = (g.as_slice(), x.as_slice(), y.as_slice()) {
        if g.shape() == x.shape() && g.shape() == y.shape() {
            let mut out = vec![E::zero(); sg.len()];
            type Chunks<'a, E> = (((&'a mut [E], &'a [E]), &'a [E]), &'a [E]);
            let run = |(((o, g), x), y): Chunks<'_, E>| {
                wide(|| {
                    for i in 0..o.len() {
                        o[i] = f(g[i], x[i], y[i]);
                    }
                })
            };
            if sg.len() >= PAR_ELEMWISE {
                use rayon::prelude::*;
                out.par_chunks_mut(CHUNK)
                    .zip(sg.par_chunks(CHUNK))
                    .zip(sx.par_chunks(CHUNK))
                    .zip(sy.par_chunks(CHUNK))
                    .for_each(run);
            } else {
                run((((&mut out[..], sg), sx), sy));
            }
            return ArrayD::from_shape_vec(g.raw_dim(), out).expect("peft-rs bug: map3 shape");
        }
    }
    let mut out = ArrayD::<E>::zeros(g.raw_dim());
    let z = Zip::from(&mut out).and(g).and(x).and(y);
    if g.len() >= PAR_ELEMWISE {
        z.par_for_each(|o, &g, &x, &y| *o = f(g, x, y));
    } else {
        z.for_each(|o, &g, &x, &y| *o = f(g, x, y));
    }
    out
}

/// A unary op with derivative `df(x, y)` where `y = f(x)`.
fn unary<E: Elem>(
    name: &'static str,
    x: &Tensor<E>,
    f: impl Fn(E) -> E + Sync + Send,
    df: impl Fn(E, E) -> E + Sync + Send + 'static,
) -> Tensor<E> {
    let y: Data<E> = map1(x.data(), f).into_shared();
    let xd = x.data().clone();
    let yd = y.clone();
    record_data(name, y, &[x], move |g, _| vec![Some(map3(g, &xd, &yd, |g, x, y| g * df(x, y)))])
}

impl<E: Elem> Tensor<E> {
    /// `self + rhs` with broadcasting.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when the shapes do not broadcast.
    pub fn add(&self, rhs: &Tensor<E>) -> Result<Tensor<E>> {
        let shape = broadcast_shape("add", self.shape(), rhs.shape())?;
        let out = zip2(&shape, self.data(), rhs.data(), |a, b| a + b);
        let (sa, sb) = (self.shape().to_vec(), rhs.shape().to_vec());
        Ok(record("add", out, &[self, rhs], move |g, needs| {
            vec![needs[0].then(|| sum_to(g, &sa)), needs[1].then(|| sum_to(g, &sb))]
        }))
    }

    /// `self - rhs` with broadcasting.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when the shapes do not broadcast.
    pub fn sub(&self, rhs: &Tensor<E>) -> Result<Tensor<E>> {
        let shape = broadcast_shape("sub", self.shape(), rhs.shape())?;
        let out = zip2(&shape, self.data(), rhs.data(), |a, b| a - b);
        let (sa, sb) = (self.shape().to_vec(), rhs.shape().to_vec());
        Ok(record("sub", out, &[self, rhs], move |g, needs| {
            vec![needs[0].then(|| sum_to(g, &sa)), needs[1].then(|| sum_to(&g.mapv(|v| -v), &sb))]
        }))
    }

    /// `self * rhs` elementwise with broadcasting.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when the shapes do not broadcast.
    pub fn mul(&self, rhs: &Tensor<E>) -> Result<Tensor<E>> {
        let shape = broadcast_shape("mul", self.shape(), rhs.shape())?;
        let out = zip2(&shape, self.data(), rhs.data(), |a, b| a * b);
        let (a, b) = (self.data().clone(), rhs.data().clone());
        Ok(record("mul", out, &[self, rhs], move |g, needs| {
            let gs: Data<E> = g.clone().into_shared();
            vec![
                needs[0].then(|| sum_to(&zip2(g.shape(), &gs, &b, |g, b| g * b), a.shape())),
                needs[1].then(|| sum_to(&zip2(g.shape(), &gs, &a, |g, a| g * a), b.shape())),
            ]
        }))
    }

    /// `self / rhs` elementwise with broadcasting.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when the shapes do not broadcast.
    pub fn div(&self, rhs: &Tensor<E>) -> Result<Tensor<E>> {
        let shape = broadcast_shape("div", self.shape(), rhs.shape())?;
        let out: Data<E> = zip2(&shape, self.data(), rhs.data(), |a, b| a / b).into_shared();
        let (a, b, y) = (self.data().clone(), rhs.data().clone(), out.clone());
        Ok(record_data("div", out, &[self, rhs], move |g, needs| {
            let gs: Data<E> = g.clone().into_shared();
            let ga = needs[0].then(|| sum_to(&zip2(g.shape(), &gs, &b, |g, b| g / b), a.shape()));
            let gb = needs[1].then(|| {
                // d(a/b)/db = -y / b
                let gy = zip2(g.shape(), &gs, &y, |g, y| g * y).into_shared();
                sum_to(&zip2(g.shape(), &gy, &b, |gy, b| -gy / b), b.shape())
            });
            vec![ga, gb]
        }))
    }

    /// `self + c` for a scalar `c`.
    pub fn add_scalar(&self, c: E) -> Tensor<E> {
        let out = map1(self.data(), |v| v + c);
        record("add_scalar", out, &[self], |g, _| vec![Some(g.clone())])
    }

    /// `self * c` for a scalar `c`.
    pub fn mul_scalar(&self, c: E) -> Tensor<E> {
        let out = map1(self.data(), |v| v * c);
        record("mul_scalar", out, &[self], move |g, _| vec![Some(g.mapv(|v| v * c))])
    }

    /// `-self`.
    pub fn neg(&self) -> Tensor<E> {
        let out = map1(self.data(), |v| -v);
        record("neg", out, &[self], |g, _| vec![Some(g.mapv(|v| -v))])
    }

    /// `e^self`.
    pub fn exp(&self) -> Tensor<E> {
        unary("exp", self, |x| x.exp(), |_, y| y)
    }

    /// Natural logarithm.
    pub fn log(&self) -> Tensor<E> {
        unary("log", self, |x| x.ln(), |x, _| E::one() / x)
    }

    /// Square root.
    pub fn sqrt(&self) -> Tensor<E> {
        unary("sqrt", self, |x| x.sqrt(), |_, y| E::of(0.5) / y)
    }

    /// `self^p` for a scalar exponent `p`.
    pub fn powf(&self, p: E) -> Tensor<E> {
        unary("powf", self, move |x| x.powf(p), move |x, _| p * x.powf(p - E::one()))
    }

    /// `self^2`.
    pub fn square(&self) -> Tensor<E> {
        unary("square", self, |x| x * x, |x, _| E::of(2.0) * x)
    }

    /// `|self|` (gradient `sign(x)`, 0 at 0).
    pub fn abs(&self) -> Tensor<E> {
        unary("abs", self, |x| x.abs(), |x, _| sign(x))
    }

    /// `sign(self)` in {-1, 0, 1}; its gradient is zero everywhere.
    pub fn sign(&self) -> Tensor<E> {
        unary("sign", self, sign, |_, _| E::zero())
    }

    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Tensor<E> {
        unary("tanh", self, |x| x.tanh(), |_, y| E::one() - y * y)
    }

    /// Logistic sigmoid.
    pub fn sigmoid(&self) -> Tensor<E> {
        unary("sigmoid", self, sigmoid, |_, y| y * (E::one() - y))
    }

    /// `max(self, 0)` (gradient 0 at 0).
    pub fn relu(&self) -> Tensor<E> {
        unary("relu", self, |x| x.max(E::zero()), |x, _| if x > E::zero() { E::one() } else { E::zero() })
    }

    /// SiLU / swish: `x * sigmoid(x)`.
    pub fn silu(&self) -> Tensor<E> {
        unary(
            "silu",
            self,
            |x| x * sigmoid(x),
            |x, _| {
                let s = sigmoid(x);
                s * (E::one() + x * (E::one() - s))
            },
        )
    }

    /// GELU, exact form `x * Φ(x) = 0.5 x (1 + erf(x / √2))` (BERT, ViT, Whisper).
    pub fn gelu(&self) -> Tensor<E> {
        unary("gelu", self, gelu_erf, |x, _| {
            let cdf = E::of(0.5) * (E::one() + (x * E::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
            let pdf = (E::of(-0.5) * x * x).exp_fast() * E::of(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            cdf + x * pdf
        })
    }

    /// GELU, tanh approximation `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (GPT-2, "gelu_new").
    pub fn gelu_tanh(&self) -> Tensor<E> {
        unary("gelu_tanh", self, gelu_tanh, |x, _| {
            let c = E::of((2.0 / std::f64::consts::PI).sqrt());
            let k = E::of(0.044715);
            let u = c * (x + k * x * x * x);
            let t = u.tanh();
            let du = c * (E::one() + E::of(3.0) * k * x * x);
            E::of(0.5) * (E::one() + t) + E::of(0.5) * x * (E::one() - t * t) * du
        })
    }
}

#[inline]
fn sign<E: Elem>(x: E) -> E {
    if x > E::zero() {
        E::one()
    } else if x < E::zero() {
        -E::one()
    } else {
        E::zero()
    }
}

#[inline]
pub(crate) fn sigmoid<E: Elem>(x: E) -> E {
    if x >= E::zero() {
        E::one() / (E::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (E::one() + e)
    }
}

#[inline]
fn gelu_erf<E: Elem>(x: E) -> E {
    E::of(0.5) * x * (E::one() + (x * E::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

#[inline]
fn gelu_tanh<E: Elem>(x: E) -> E {
    let c = E::of((2.0 / std::f64::consts::PI).sqrt());
    E::of(0.5) * x * (E::one() + (c * (x + E::of(0.044715) * x * x * x)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::testing::{array_strategy, assert_grads};
    use ndarray::Axis;
    use proptest::prelude::*;

    /// Two broadcast-compatible shapes: suffixes of one base shape (so ranks may differ, down to rank 0) with
    /// random axes set to 1.
    fn broadcast_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        (prop::collection::vec(1usize..4, 0..4), 0usize..4, 0usize..4, any::<u8>(), any::<u8>()).prop_map(
            |(base, da, db, ma, mb)| {
                let pick = |drop: usize, mask: u8| -> Vec<usize> {
                    let drop = drop.min(base.len());
                    base[drop..].iter().enumerate().map(|(i, &d)| if (mask >> i) & 1 == 1 { 1 } else { d }).collect()
                };
                (pick(da, ma), pick(db, mb))
            },
        )
    }

    fn any_shape() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(1usize..4, 0..4)
    }

    /// Values with magnitude in `lo..hi` and random signs (keeps away from 0, a kink or pole of some ops).
    fn away_from_zero(shape: Vec<usize>, lo: f64, hi: f64) -> impl Strategy<Value = ArrayD<f64>> {
        let n: usize = shape.iter().product();
        (array_strategy(shape, lo, hi), prop::collection::vec(any::<bool>(), n)).prop_map(|(mut a, signs)| {
            a.iter_mut().zip(signs).for_each(|(v, neg)| {
                if neg {
                    *v = -*v
                }
            });
            a
        })
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(32))]
        #[test]
        fn binary_ops_grad_match_finite_differences_with_broadcasting(
            (a, b) in broadcast_pair()
                .prop_flat_map(|(sa, sb)| (array_strategy(sa, -2.0, 2.0), away_from_zero(sb, 0.5, 2.0)))
        ) {
            let ab = [a.clone(), b.clone()];
            assert_grads(|t| t[0].add(&t[1]), &ab);
            assert_grads(|t| t[0].sub(&t[1]), &ab);
            assert_grads(|t| t[0].mul(&t[1]), &ab);
            assert_grads(|t| t[0].div(&t[1]), &ab);
            // operands swapped, so each side is the broadcast one
            let ba = [b, a];
            assert_grads(|t| t[0].sub(&t[1]), &ba);
            assert_grads(|t| t[1].div(&t[0]), &ba);
        }

        #[test]
        fn binary_ops_match_ndarray_broadcasting(
            (a, b) in broadcast_pair()
                .prop_flat_map(|(sa, sb)| (array_strategy(sa, -2.0, 2.0), away_from_zero(sb, 0.5, 2.0)))
        ) {
            let (ta, tb) = (Tensor::new(a.clone()), Tensor::new(b.clone()));
            let cases = [
                (ta.add(&tb).unwrap(), &a + &b),
                (ta.sub(&tb).unwrap(), &a - &b),
                (ta.mul(&tb).unwrap(), &a * &b),
                (ta.div(&tb).unwrap(), &a / &b),
            ];
            for (got, want) in cases {
                prop_assert_eq!(got.shape(), want.shape());
                prop_assert_eq!(got.data().view(), want.view());
            }
        }

        #[test]
        fn smooth_unary_ops_grad_match_finite_differences(x in any_shape().prop_flat_map(|s| array_strategy(s, -3.0, 3.0))) {
            let x = [x];
            assert_grads(|t| Ok(t[0].add_scalar(0.7)), &x);
            assert_grads(|t| Ok(t[0].mul_scalar(-1.3)), &x);
            assert_grads(|t| Ok(t[0].neg()), &x);
            assert_grads(|t| Ok(t[0].exp()), &x);
            assert_grads(|t| Ok(t[0].square()), &x);
            assert_grads(|t| Ok(t[0].tanh()), &x);
            assert_grads(|t| Ok(t[0].sigmoid()), &x);
            assert_grads(|t| Ok(t[0].silu()), &x);
            assert_grads(|t| Ok(t[0].gelu()), &x);
            assert_grads(|t| Ok(t[0].gelu_tanh()), &x);
        }

        #[test]
        fn positive_domain_ops_grad_match_finite_differences(
            x in any_shape().prop_flat_map(|s| array_strategy(s, 0.3, 3.0)),
            p in -2.0..3.0f64,
        ) {
            let x = [x];
            assert_grads(|t| Ok(t[0].log()), &x);
            assert_grads(|t| Ok(t[0].sqrt()), &x);
            assert_grads(|t| Ok(t[0].powf(p)), &x);
        }

        #[test]
        fn kinked_ops_grad_match_finite_differences_away_from_zero(
            x in any_shape().prop_flat_map(|s| away_from_zero(s, 0.1, 3.0))
        ) {
            let x = [x];
            assert_grads(|t| Ok(t[0].abs()), &x);
            assert_grads(|t| Ok(t[0].sign()), &x);
            assert_grads(|t| Ok(t[0].relu()), &x);
        }
    }

    #[test]
    fn activations_match_pytorch_values() {
        let x = Tensor::<f64>::from_vec(vec![1.0, -1.0, 2.5], &[3]).unwrap();
        let close = |t: Tensor<f64>, want: [f64; 3]| {
            for (a, e) in t.as_slice().iter().zip(want) {
                assert!((a - e).abs() < 1e-14, "{a} vs {e}");
            }
        };
        close(x.gelu(), [0.841344746068543, -0.15865525393145702, 2.4844758366855597]);
        close(x.gelu_tanh(), [0.8411919906082768, -0.15880800939172324, 2.484915733910001]);
        close(x.silu(), [0.7310585786300049, -0.2689414213699951, 2.3103545499468914]);
        close(x.sigmoid(), [0.7310585786300049, 0.2689414213699951, 0.9241418199787566]);
        let g = Tensor::<f32>::scalar(1.0).gelu().item().unwrap();
        assert!((g - 0.8413447).abs() < 1e-6);
        // sigmoid is stable at both ends
        let s = Tensor::<f32>::from_vec(vec![-100.0, 100.0], &[2]).unwrap().sigmoid();
        assert!(s.as_slice()[0] >= 0.0 && s.as_slice()[0] < 1e-40 && s.as_slice()[1] == 1.0);
    }

    #[test]
    fn broadcast_add_matches_hand_values() {
        let a = Tensor::<f32>::from_vec(vec![1.0, 2.0], &[2, 1]).unwrap();
        let b = Tensor::<f32>::from_vec(vec![10.0, 20.0, 30.0], &[3]).unwrap();
        let c = a.add(&b).unwrap();
        assert_eq!(c.shape(), &[2, 3]);
        assert_eq!(c.as_slice(), &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
        let s = a.mul(&Tensor::scalar(3.0)).unwrap();
        assert_eq!(s.as_slice(), &[3.0, 6.0]);
    }

    #[test]
    fn large_inputs_take_the_parallel_path_and_agree_with_ndarray() {
        // 256 x 160 elements crosses PAR_ELEMWISE for the broadcast binary ops, map1 and map3.
        let a = ArrayD::from_shape_fn(IxDyn(&[256, 160]), |i| ((i[0] * 7 + i[1] * 3) % 17) as f64 * 0.1 - 0.8);
        let b = ArrayD::from_shape_fn(IxDyn(&[160]), |i| 0.5 + i[0] as f64 * 0.01);
        let (ta, tb) = (Tensor::var(a.clone()), Tensor::var(b.clone()));
        assert_eq!(ta.mul(&tb).unwrap().data().view(), (&a * &b).view());
        let y = ta.div(&tb).unwrap().tanh();
        assert_eq!(y.data().view(), (&a / &b).mapv(f64::tanh).view());
        let g = y.sum_all().backward().unwrap();
        // d/da tanh(a / b) = (1 - tanh²) / b; d/db = -(1 - tanh²) a / b², summed over rows
        let dy = (&a / &b).mapv(|v| 1.0 - v.tanh().powi(2));
        let want_a = &dy / &b;
        let want_b = (-(&dy * &a) / (&b * &b)).sum_axis(Axis(0));
        let ga = g.get(&ta).unwrap();
        let gb = g.get(&tb).unwrap();
        assert!(ga.iter().zip(want_a.iter()).all(|(p, q)| (p - q).abs() < 1e-12));
        assert!(gb.iter().zip(want_b.iter()).all(|(p, q)| (p - q).abs() < 1e-9));
    }

    #[test]
    fn kinks_have_zero_gradient_at_zero() {
        let x = Tensor::<f32>::var(ndarray::arr1(&[0.0f32, 2.0, -2.0]).into_dyn());
        for (op, want) in [(x.relu(), [0.0f32, 1.0, 0.0]), (x.abs(), [0.0, 1.0, -1.0]), (x.sign(), [0.0, 0.0, 0.0])] {
            let g = op.sum_all().backward().unwrap();
            assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &want);
        }
    }

    #[test]
    fn binary_ops_reject_shapes_that_do_not_broadcast() {
        let a = Tensor::<f32>::zeros(&[2, 3]);
        let b = Tensor::<f32>::zeros(&[4]);
        assert!(matches!(a.add(&b), Err(Error::Shape { op: "add", .. })));
        assert!(matches!(a.sub(&b), Err(Error::Shape { op: "sub", .. })));
        assert!(matches!(a.mul(&b), Err(Error::Shape { op: "mul", .. })));
        assert!(matches!(a.div(&Tensor::zeros(&[3, 3])), Err(Error::Shape { op: "div", .. })));
    }

    /// `backend::wide` must not change a single bit: the map kernels (serial and parallel sizes) against the
    /// same closures evaluated one element at a time outside it, for GELU's forward and derivative (erf, exp_fast,
    /// divisions, clamps) and a broadcast division.
    #[test]
    fn wide_kernels_are_bit_identical_to_scalar_evaluation() {
        let gelu_d = |g: f32, x: f32, _y: f32| {
            let cdf = 0.5 * (1.0 + Elem::erf(x * std::f32::consts::FRAC_1_SQRT_2));
            g * (cdf + x * (-0.5 * x * x).exp_fast() * 0.398_942_3)
        };
        for n in [1000usize, PAR_ELEMWISE + 4099] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 4001) as f32 * 3e-3 - 6.0).collect();
            let g: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 * 1e-3 - 0.5).collect();
            let xd: Data<f32> = ArrayD::from_shape_vec(IxDyn(&[n]), x.clone()).unwrap().into_shared();
            let ga = ArrayD::from_shape_vec(IxDyn(&[n]), g.clone()).unwrap();
            let fwd = map1(&xd, gelu_erf);
            let bwd = map3(&ga, &xd, &xd, gelu_d);
            for i in 0..n {
                assert_eq!(fwd[i].to_bits(), gelu_erf(x[i]).to_bits(), "gelu({})", x[i]);
                assert_eq!(bwd[i].to_bits(), gelu_d(g[i], x[i], x[i]).to_bits(), "gelu'({})", x[i]);
            }
            let rows = Tensor::<f32>::new(ArrayD::from_shape_vec(IxDyn(&[n / 8, 8]), x[..n / 8 * 8].to_vec()).unwrap());
            let cols = Tensor::<f32>::new(ndarray::arr1(&[0.3f32, -1.7, 2.9, 1e-3, 7.0, -0.1, 0.77, 5.5]).into_dyn());
            let q = rows.div(&cols).unwrap();
            for (i, v) in q.as_slice().iter().enumerate() {
                assert_eq!(v.to_bits(), (x[i] / cols.as_slice()[i % 8]).to_bits());
            }
        }
    }
}
