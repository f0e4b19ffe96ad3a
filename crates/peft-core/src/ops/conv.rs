//! Convolutions (PyTorch `conv1d` / `conv2d` semantics, no groups or dilation) via im2col + [`gemm()`].
//!
//! For each batch item the input patches are unrolled into a `[Cin·Kh·Kw, Hout·Wout]` column matrix, so the
//! output is one GEMM `W [Cout, Cin·Kh·Kw] · cols`. The backward recomputes the columns (nothing but the
//! input is kept): `dW = Σₙ gₙ · colsₙᵀ`, `dcols = Wᵀ · gₙ` folded back onto the input (col2im), `db = Σ g`.
//! `conv1d` is `conv2d` with a height-1 kernel over a height-1 input, sharing the kernels.

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use crate::autograd::record;
use crate::backend::{gemm, MatRef};
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The geometry of one 2-d convolution.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
}

impl Geom {
    fn ckk(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    fn opix(&self) -> usize {
        self.oh * self.ow
    }
    fn ipix(&self) -> usize {
        self.h * self.w
    }
}

/// The output positions `o` in `0..out` whose input index `o·s + k - p` lies in `0..len`, as a range.
fn valid_range(out: usize, len: usize, s: usize, k: usize, p: usize) -> (usize, usize) {
    // o·s + k >= p  <=>  o >= ceil((p - k) / s)
    let lo = if p > k { (p - k).div_ceil(s) } else { 0 };
    // o·s + k - p <= len - 1  <=>  o <= (len - 1 + p - k) / s
    let hi = if len + p > k { ((len - 1 + p - k) / s + 1).min(out) } else { 0 };
    (lo.min(hi), hi)
}

/// Unrolls one input image `[cin, h, w]` into `cols [cin·kh·kw, oh·ow]` (zero padding).
fn im2col<E: Elem>(x: &[E], g: &Geom, cols: &mut [E]) {
    let opix = g.opix();
    for c in 0..g.cin {
        let xc = &x[c * g.ipix()..(c + 1) * g.ipix()];
        for i in 0..g.kh {
            let (ylo, yhi) = valid_range(g.oh, g.h, g.sh, i, g.ph);
            for j in 0..g.kw {
                let (xlo, xhi) = valid_range(g.ow, g.w, g.sw, j, g.pw);
                let row = &mut cols[((c * g.kh + i) * g.kw + j) * opix..][..opix];
                row.fill(E::zero());
                for oy in ylo..yhi {
                    let iy = oy * g.sh + i - g.ph;
                    let dst = &mut row[oy * g.ow..(oy + 1) * g.ow];
                    let src = &xc[iy * g.w..(iy + 1) * g.w];
                    for ox in xlo..xhi {
                        dst[ox] = src[ox * g.sw + j - g.pw];
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds `cols` back onto one image gradient `[cin, h, w]`.
fn col2im<E: Elem>(cols: &[E], g: &Geom, dx: &mut [E]) {
    let opix = g.opix();
    for c in 0..g.cin {
        let dc = &mut dx[c * g.ipix()..(c + 1) * g.ipix()];
        for i in 0..g.kh {
            let (ylo, yhi) = valid_range(g.oh, g.h, g.sh, i, g.ph);
            for j in 0..g.kw {
                let (xlo, xhi) = valid_range(g.ow, g.w, g.sw, j, g.pw);
                let row = &cols[((c * g.kh + i) * g.kw + j) * opix..][..opix];
                for oy in ylo..yhi {
                    let iy = oy * g.sh + i - g.ph;
                    let src = &row[oy * g.ow..(oy + 1) * g.ow];
                    let dst = &mut dc[iy * g.w..(iy + 1) * g.w];
                    for ox in xlo..xhi {
                        dst[ox * g.sw + j - g.pw] += src[ox];
                    }
                }
            }
        }
    }
}

/// Forward: `out [n, cout, oh·ow]`.
fn conv_forward<E: Elem>(x: &[E], w: &[E], bias: Option<&[E]>, g: &Geom) -> Vec<E> {
    let (ckk, opix) = (g.ckk(), g.opix());
    let mut out = vec![E::zero(); g.n * g.cout * opix];
    if out.is_empty() {
        return out;
    }
    let wm = MatRef::row_major(w, g.cout, ckk);
    let run = |(b, dst): (usize, &mut [E])| {
        let mut cols = vec![E::zero(); ckk * opix];
        im2col(&x[b * g.cin * g.ipix()..(b + 1) * g.cin * g.ipix()], g, &mut cols);
        if let Some(bias) = bias {
            for (row, &bv) in dst.chunks_mut(opix).zip(bias) {
                row.fill(bv);
            }
        }
        gemm(dst, wm, MatRef::row_major(&cols, ckk, opix), bias.is_some());
    };
    if g.n > 1 {
        out.par_chunks_mut(g.cout * opix).enumerate().for_each(run);
    } else {
        out.chunks_mut(g.cout * opix).enumerate().for_each(run);
    }
    out
}

/// Gradients `(dx, dw, db)`, each computed only when asked for.
#[allow(clippy::type_complexity)]
fn conv_backward<E: Elem>(
    gout: &[E],
    x: &[E],
    w: &[E],
    g: &Geom,
    need: (bool, bool, bool),
) -> (Option<Vec<E>>, Option<Vec<E>>, Option<Vec<E>>) {
    let (ckk, opix, img) = (g.ckk(), g.opix(), g.cin * g.ipix());
    let dx = need.0.then(|| {
        let mut dx = vec![E::zero(); g.n * img];
        if img == 0 || opix == 0 {
            return dx;
        }
        let wt = MatRef::row_major(w, g.cout, ckk).t();
        dx.par_chunks_mut(img).enumerate().for_each(|(b, dxb)| {
            let mut dcols = vec![E::zero(); ckk * opix];
            gemm(&mut dcols, wt, MatRef::row_major(&gout[b * g.cout * opix..][..g.cout * opix], g.cout, opix), false);
            col2im(&dcols, g, dxb);
        });
        dx
    });
    let dw = need.1.then(|| {
        let mut dw = vec![E::zero(); g.cout * ckk];
        let mut cols = vec![E::zero(); ckk * opix];
        for b in 0..g.n {
            im2col(&x[b * img..(b + 1) * img], g, &mut cols);
            let gb = MatRef::row_major(&gout[b * g.cout * opix..][..g.cout * opix], g.cout, opix);
            gemm(&mut dw, gb, MatRef::row_major(&cols, ckk, opix).t(), b > 0);
        }
        dw
    });
    let db = need.2.then(|| {
        let mut db = vec![E::zero(); g.cout];
        for b in 0..g.n {
            for (co, acc) in db.iter_mut().enumerate() {
                *acc += gout[(b * g.cout + co) * opix..][..opix].iter().copied().sum::<E>();
            }
        }
        db
    });
    (dx, dw, db)
}

/// Output length of one spatial axis, or an error when the (padded) input is shorter than the kernel.
fn out_len(op: &'static str, len: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    if s == 0 {
        return Err(Error::arg(op, "stride", s, "must be positive"));
    }
    if k == 0 {
        return Err(Error::arg(op, "kernel size", k, "must be positive"));
    }
    if len + 2 * p < k {
        return Err(Error::arg(op, "padded input length", len + 2 * p, "must be at least the kernel size"));
    }
    Ok((len + 2 * p - k) / s + 1)
}

/// Runs a convolution described by `g` on flat data and records it; `out_shape` is the caller's layout.
fn conv<E: Elem>(
    name: &'static str,
    x: &Tensor<E>,
    weight: &Tensor<E>,
    bias: Option<&Tensor<E>>,
    g: Geom,
    out_shape: Vec<usize>,
) -> Result<Tensor<E>> {
    if let Some(b) = bias {
        if b.shape() != [g.cout] {
            return Err(Error::Shape { op: name, lhs: weight.shape().to_vec(), rhs: b.shape().to_vec() });
        }
    }
    let out = conv_forward(x.as_slice(), weight.as_slice(), bias.map(|b| b.as_slice()), &g);
    let out = ArrayD::from_shape_vec(IxDyn(&out_shape), out).expect("peft-rs bug: conv output shape");
    let (xd, wd) = (x.data().clone(), weight.data().clone());
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    Ok(record(name, out, &inputs, move |gout, needs| {
        let gs = gout.as_slice().expect("peft-rs bug: contiguous grad");
        let need_b = needs.get(2).copied().unwrap_or(false);
        let xs = xd.as_slice().expect("peft-rs bug: contiguous");
        let ws = wd.as_slice().expect("peft-rs bug: contiguous");
        let (dx, dw, db) = conv_backward(gs, xs, ws, &g, (needs[0], needs[1], need_b));
        let shaped = |v: Vec<E>, d: IxDyn| ArrayD::from_shape_vec(d, v).expect("peft-rs bug: conv grad shape");
        let mut r = vec![dx.map(|v| shaped(v, xd.raw_dim())), dw.map(|v| shaped(v, wd.raw_dim()))];
        if needs.len() == 3 {
            r.push(db.map(|v| shaped(v, IxDyn(&[g.cout]))));
        }
        r
    }))
}

impl<E: Elem> Tensor<E> {
    /// 1-d convolution (`torch.nn.functional.conv1d`, no groups/dilation): input `[N, Cin, L]`, `weight
    /// [Cout, Cin, K]`, `bias [Cout]`, zero `padding` on both ends; output `[N, Cout, (L + 2p - K) / stride + 1]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for wrong ranks, mismatched `Cin` or a bias that is not `[Cout]`; [`Error::Arg`] for
    /// a zero stride or kernel, or a padded input shorter than the kernel.
    pub fn conv1d(
        &self,
        weight: &Tensor<E>,
        bias: Option<&Tensor<E>>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor<E>> {
        let (xs, ws) = (self.shape(), weight.shape());
        if xs.len() != 3 || ws.len() != 3 || xs[1] != ws[1] {
            return Err(Error::Shape { op: "conv1d", lhs: xs.to_vec(), rhs: ws.to_vec() });
        }
        let ow = out_len("conv1d", xs[2], ws[2], stride, padding)?;
        let g = Geom {
            n: xs[0],
            cin: xs[1],
            h: 1,
            w: xs[2],
            cout: ws[0],
            kh: 1,
            kw: ws[2],
            sh: 1,
            sw: stride,
            ph: 0,
            pw: padding,
            oh: 1,
            ow,
        };
        conv("conv1d", self, weight, bias, g, vec![xs[0], ws[0], ow])
    }

    /// 2-d convolution (`torch.nn.functional.conv2d`, no groups/dilation): input `[N, Cin, H, W]`, `weight
    /// [Cout, Cin, Kh, Kw]`, `bias [Cout]`, `stride = (sh, sw)`, zero `padding = (ph, pw)` on both sides; output
    /// `[N, Cout, (H + 2ph - Kh) / sh + 1, (W + 2pw - Kw) / sw + 1]`.
    ///
    /// # Errors
    /// As [`Tensor::conv1d`].
    pub fn conv2d(
        &self,
        weight: &Tensor<E>,
        bias: Option<&Tensor<E>>,
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Tensor<E>> {
        let (xs, ws) = (self.shape(), weight.shape());
        if xs.len() != 4 || ws.len() != 4 || xs[1] != ws[1] {
            return Err(Error::Shape { op: "conv2d", lhs: xs.to_vec(), rhs: ws.to_vec() });
        }
        let oh = out_len("conv2d", xs[2], ws[2], stride.0, padding.0)?;
        let ow = out_len("conv2d", xs[3], ws[3], stride.1, padding.1)?;
        let g = Geom {
            n: xs[0],
            cin: xs[1],
            h: xs[2],
            w: xs[3],
            cout: ws[0],
            kh: ws[2],
            kw: ws[3],
            sh: stride.0,
            sw: stride.1,
            ph: padding.0,
            pw: padding.1,
            oh,
            ow,
        };
        conv("conv2d", self, weight, bias, g, vec![xs[0], ws[0], oh, ow])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    /// Direct 2-d convolution by definition, in f64.
    fn naive_conv2d(
        x: &ArrayD<f64>,
        w: &ArrayD<f64>,
        b: Option<&[f64]>,
        s: (usize, usize),
        p: (usize, usize),
    ) -> ArrayD<f64> {
        let (n, cin, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let (cout, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
        let oh = (h + 2 * p.0 - kh) / s.0 + 1;
        let ow = (wd + 2 * p.1 - kw) / s.1 + 1;
        ArrayD::from_shape_fn(IxDyn(&[n, cout, oh, ow]), |ix| {
            let (b_, co, oy, ox) = (ix[0], ix[1], ix[2], ix[3]);
            let mut acc = b.map_or(0.0, |b| b[co]);
            for c in 0..cin {
                for i in 0..kh {
                    for j in 0..kw {
                        let iy = (oy * s.0 + i) as isize - p.0 as isize;
                        let ix_ = (ox * s.1 + j) as isize - p.1 as isize;
                        if iy >= 0 && ix_ >= 0 && (iy as usize) < h && (ix_ as usize) < wd {
                            acc += x[[b_, c, iy as usize, ix_ as usize]] * w[[co, c, i, j]];
                        }
                    }
                }
            }
            acc
        })
    }

    /// (n, cin, cout, h, w, kh, kw, stride, padding) with the padded input at least the kernel.
    #[allow(clippy::type_complexity)]
    fn geom2d() -> impl Strategy<Value = (Vec<usize>, Vec<usize>, (usize, usize), (usize, usize))> {
        (
            1usize..3,
            1usize..3,
            1usize..3,
            1usize..6,
            1usize..6,
            1usize..4,
            1usize..4,
            1usize..4,
            1usize..4,
            0usize..3,
            0usize..3,
        )
            .prop_filter("padded input shorter than kernel", |t| t.3 + 2 * t.9 >= t.5 && t.4 + 2 * t.10 >= t.6)
            .prop_map(|(n, ci, co, h, w, kh, kw, sh, sw, ph, pw)| {
                (vec![n, ci, h, w], vec![co, ci, kh, kw], (sh, sw), (ph, pw))
            })
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(24))]
        #[test]
        fn conv2d_grad_matches_finite_differences(
            (x, w, b, s, p) in geom2d().prop_flat_map(|(xs, ws, s, p)| {
                let co = ws[0];
                (array_strategy(xs, -1.0, 1.0), array_strategy(ws, -1.0, 1.0), array_strategy(vec![co], -1.0, 1.0), Just(s), Just(p))
            })
        ) {
            assert_grads(|t| Ok(t[0].conv2d(&t[1], Some(&t[2]), s, p)?.tanh()), &[x.clone(), w.clone(), b.clone()]);
            let want = naive_conv2d(&x, &w, b.as_slice(), s, p);
            let got = Tensor::new(x).conv2d(&Tensor::new(w), Some(&Tensor::new(b)), s, p).unwrap();
            prop_assert_eq!(got.shape(), want.shape());
            for (a, e) in got.as_slice().iter().zip(want.iter()) {
                prop_assert!((a - e).abs() < 1e-12);
            }
        }

        #[test]
        fn conv1d_grad_matches_finite_differences(
            (x, w, b, s, p) in (1usize..3, 1usize..3, 1usize..3, 1usize..7, 1usize..4, 1usize..4, 0usize..3)
                .prop_filter("padded input shorter than kernel", |t| t.3 + 2 * t.6 >= t.4)
                .prop_flat_map(|(n, ci, co, l, k, s, p)| (
                    array_strategy(vec![n, ci, l], -1.0, 1.0), array_strategy(vec![co, ci, k], -1.0, 1.0),
                    array_strategy(vec![co], -1.0, 1.0), Just(s), Just(p)))
        ) {
            assert_grads(|t| Ok(t[0].conv1d(&t[1], Some(&t[2]), s, p)?.tanh()), &[x.clone(), w.clone(), b.clone()]);
            assert_grads(|t| Ok(t[0].conv1d(&t[1], None, s, p)?.tanh()), &[x.clone(), w.clone()]);
            // conv1d is conv2d over a height-1 image
            let x4 = x.clone().insert_axis(ndarray::Axis(2));
            let w4 = w.clone().insert_axis(ndarray::Axis(2));
            let want = naive_conv2d(&x4, &w4, b.as_slice(), (1, s), (0, p));
            let got = Tensor::new(x).conv1d(&Tensor::new(w), Some(&Tensor::new(b)), s, p).unwrap();
            for (a, e) in got.as_slice().iter().zip(want.iter()) {
                prop_assert!((a - e).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn conv1d_matches_hand_computed_values() {
        // x = [1, 2, 3], w = [1, 0, -1], padding 1: [0-2, 1-3, 2-0] = [-2, -2, 2]; + bias 0.5
        let x = Tensor::<f64>::from_vec(vec![1.0, 2.0, 3.0], &[1, 1, 3]).unwrap();
        let w = Tensor::<f64>::from_vec(vec![1.0, 0.0, -1.0], &[1, 1, 3]).unwrap();
        let b = Tensor::<f64>::from_vec(vec![0.5], &[1]).unwrap();
        assert_eq!(x.conv1d(&w, Some(&b), 1, 1).unwrap().to_vec(), vec![-1.5, -1.5, 2.5]);
        // stride 2: positions 0 and 2
        assert_eq!(x.conv1d(&w, None, 2, 1).unwrap().to_vec(), vec![-2.0, 2.0]);
    }

    #[test]
    fn frozen_weight_gets_no_gradient() {
        let x = Tensor::<f32>::var(ArrayD::ones(IxDyn(&[1, 2, 4, 4])));
        let w = Tensor::<f32>::ones(&[3, 2, 2, 2]);
        let g = x.conv2d(&w, None, (2, 2), (0, 0)).unwrap().sum_all().backward().unwrap();
        assert!(g.get(&w).is_none());
        assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[3.0; 32]);
    }

    #[test]
    fn bad_conv_arguments_are_typed_errors() {
        let x = Tensor::<f32>::zeros(&[1, 2, 5]);
        let w = Tensor::<f32>::zeros(&[4, 2, 3]);
        assert!(matches!(x.conv1d(&Tensor::zeros(&[4, 3, 3]), None, 1, 0), Err(Error::Shape { .. })));
        assert!(matches!(x.conv1d(&w, Some(&Tensor::zeros(&[3])), 1, 0), Err(Error::Shape { .. })));
        assert!(matches!(x.conv1d(&w, None, 0, 0), Err(Error::Arg { .. })));
        assert!(matches!(x.conv1d(&Tensor::zeros(&[4, 2, 8]), None, 1, 1), Err(Error::Arg { .. })));
        assert!(matches!(x.conv2d(&w, None, (1, 1), (0, 0)), Err(Error::Shape { .. })));
        let x4 = Tensor::<f32>::zeros(&[1, 2, 5, 5]);
        assert!(matches!(x4.conv2d(&Tensor::zeros(&[4, 2, 3, 0]), None, (1, 1), (0, 0)), Err(Error::Arg { .. })));
    }
}
