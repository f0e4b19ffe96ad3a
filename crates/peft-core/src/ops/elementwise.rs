//! Elementwise ops: broadcasting binary arithmetic, scalar arithmetic and unary math.

use ndarray::{ArrayD, IxDyn, Zip};

use crate::autograd::{record, record_data};
use crate::backend::PAR_ELEMWISE;
use crate::elem::Elem;
use crate::error::Result;
use crate::ops::broadcast::{broadcast_shape, sum_to};
use crate::tensor::{Data, Tensor};

/// Applies `f` elementwise over two broadcast views into a new array of `shape`.
fn zip2<E: Elem>(shape: &[usize], a: &Data<E>, b: &Data<E>, f: impl Fn(E, E) -> E + Sync + Send) -> ArrayD<E> {
    let mut out = ArrayD::<E>::zeros(IxDyn(shape));
    let av = a.broadcast(IxDyn(shape)).expect("peft-rs bug: broadcast a");
    let bv = b.broadcast(IxDyn(shape)).expect("peft-rs bug: broadcast b");
    let z = Zip::from(&mut out).and(&av).and(&bv);
    if out_len(shape) >= PAR_ELEMWISE {
        z.par_for_each(|o, &x, &y| *o = f(x, y));
    } else {
        z.for_each(|o, &x, &y| *o = f(x, y));
    }
    out
}

fn out_len(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Maps `f` over one array (in parallel when large).
pub(crate) fn map1<E: Elem>(a: &Data<E>, f: impl Fn(E) -> E + Sync + Send) -> ArrayD<E> {
    if a.len() >= PAR_ELEMWISE {
        let mut out = ArrayD::<E>::zeros(a.raw_dim());
        Zip::from(&mut out).and(a).par_for_each(|o, &x| *o = f(x));
        out
    } else {
        a.mapv(f)
    }
}

/// `g * h(x, y)` elementwise over three same-shape arrays (the usual unary backward).
pub(crate) fn map3<E: Elem>(
    g: &ArrayD<E>,
    x: &Data<E>,
    y: &Data<E>,
    f: impl Fn(E, E, E) -> E + Sync + Send,
) -> ArrayD<E> {
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
            let pdf = (E::of(-0.5) * x * x).exp() * E::of(1.0 / (2.0 * std::f64::consts::PI).sqrt());
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
