//! Matrix products: batched `matmul` with broadcast batch axes, and the fused `linear` (x·Wᵀ + b) that every
//! adapter site is built on.

use ndarray::{ArrayD, Axis, IxDyn};
use rayon::prelude::*;

use crate::autograd::record;
use crate::backend::{gemm, MatRef};
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::ops::broadcast::{broadcast_shape, sum_to};
use crate::tensor::Tensor;

/// Batched product of row-major operands: `a` is `[batch_a.., m, k]` (or `[.., k, m]` when `ta`), `b` is
/// `[batch_b.., k, n]` (or `[.., n, k]` when `tb`); batch axes broadcast. Returns `[batch.., m, n]`.
pub(crate) fn bmm<E: Elem>(
    a: &[E],
    a_shape: &[usize],
    ta: bool,
    b: &[E],
    b_shape: &[usize],
    tb: bool,
) -> Result<ArrayD<E>> {
    let (ra, rb) = (a_shape.len(), b_shape.len());
    if ra < 2 || rb < 2 {
        return Err(Error::Shape { op: "matmul", lhs: a_shape.to_vec(), rhs: b_shape.to_vec() });
    }
    let (a0, a1) = (a_shape[ra - 2], a_shape[ra - 1]);
    let (b0, b1) = (b_shape[rb - 2], b_shape[rb - 1]);
    let (m, k) = if ta { (a1, a0) } else { (a0, a1) };
    let (k2, n) = if tb { (b1, b0) } else { (b0, b1) };
    if k != k2 {
        return Err(Error::Shape { op: "matmul", lhs: a_shape.to_vec(), rhs: b_shape.to_vec() });
    }
    let batch = broadcast_shape("matmul", &a_shape[..ra - 2], &b_shape[..rb - 2])?;
    let nb: usize = batch.iter().product();
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    let mut out = ArrayD::<E>::zeros(IxDyn(&out_shape));
    let a_off = batch_offsets(&batch, &a_shape[..ra - 2], a0 * a1);
    let b_off = batch_offsets(&batch, &b_shape[..rb - 2], b0 * b1);
    let out_slice = out.as_slice_mut().expect("peft-rs bug: fresh array is contiguous");
    if m * n == 0 {
        return Ok(out);
    }
    let run = |(i, dst): (usize, &mut [E])| {
        gemm(dst, view(a, a_off[i], a0, a1, ta), view(b, b_off[i], b0, b1, tb), false);
    };
    if nb > 1 && m * n * k < 64 * 64 * 64 {
        out_slice.par_chunks_mut(m * n).enumerate().for_each(run);
    } else {
        out_slice.chunks_mut(m * n).enumerate().for_each(run);
    }
    Ok(out)
}

fn view<E>(data: &[E], off: usize, r: usize, c: usize, t: bool) -> MatRef<'_, E> {
    let v = MatRef::row_major(&data[off..off + r * c], r, c);
    if t {
        v.t()
    } else {
        v
    }
}

/// Offsets (in elements) of each broadcast batch matrix inside an operand with batch shape `src`.
fn batch_offsets(batch: &[usize], src: &[usize], mat: usize) -> Vec<usize> {
    let nb: usize = batch.iter().product();
    let lead = batch.len() - src.len();
    // Strides of the operand's batch axes in units of matrices; 0 where broadcast.
    let mut strides = vec![0usize; batch.len()];
    let mut s = 1;
    for i in (0..src.len()).rev() {
        strides[lead + i] = if src[i] == 1 { 0 } else { s };
        s *= src[i];
    }
    (0..nb)
        .map(|mut flat| {
            let mut off = 0;
            for ax in (0..batch.len()).rev() {
                off += (flat % batch[ax]) * strides[ax];
                flat /= batch[ax];
            }
            off * mat
        })
        .collect()
}

impl<E: Elem> Tensor<E> {
    /// Matrix product over the last two axes, batch axes broadcast (`[.., m, k] x [.., k, n] -> [.., m, n]`).
    ///
    /// # Errors
    /// [`Error::Shape`] when either operand has rank < 2, the inner sizes differ, or batch axes don't broadcast.
    pub fn matmul(&self, rhs: &Tensor<E>) -> Result<Tensor<E>> {
        self.matmul_t(rhs, false, false)
    }

    /// `self · rhsᵀ` over the last two axes without copying the transpose (`[.., m, k] x [.., n, k]`).
    ///
    /// # Errors
    /// As [`Tensor::matmul`].
    pub fn matmul_nt(&self, rhs: &Tensor<E>) -> Result<Tensor<E>> {
        self.matmul_t(rhs, false, true)
    }

    fn matmul_t(&self, rhs: &Tensor<E>, ta: bool, tb: bool) -> Result<Tensor<E>> {
        let out = bmm(self.as_slice(), self.shape(), ta, rhs.as_slice(), rhs.shape(), tb)?;
        let (a, b) = (self.data().clone(), rhs.data().clone());
        Ok(record("matmul", out, &[self, rhs], move |g, needs| {
            let gs = g.as_slice().expect("peft-rs bug: contiguous grad");
            let (a_s, b_s) = (a.as_slice().expect("contiguous"), b.as_slice().expect("contiguous"));
            // C = op(A) op(B). dop(A) = G op(B)ᵀ, dop(B) = op(A)ᵀ G; transposed operands get transposed grads.
            let ga = needs[0].then(|| {
                let full = if ta {
                    bmm(b_s, b.shape(), tb, gs, g.shape(), true)
                } else {
                    bmm(gs, g.shape(), false, b_s, b.shape(), !tb)
                }
                .expect("peft-rs bug: matmul backward shapes");
                sum_to(&full, a.shape())
            });
            let gb = needs[1].then(|| {
                let full = if tb {
                    bmm(gs, g.shape(), true, a_s, a.shape(), ta)
                } else {
                    bmm(a_s, a.shape(), !ta, gs, g.shape(), false)
                }
                .expect("peft-rs bug: matmul backward shapes");
                sum_to(&full, b.shape())
            });
            vec![ga, gb]
        }))
    }

    /// The fused linear map `y = x · Wᵀ + b` over the last axis: `x [.., in]`, `weight [out, in]` (PyTorch
    /// layout), `bias [out]`. A frozen weight costs no dW work in backward.
    ///
    /// # Errors
    /// [`Error::Shape`] when `in` differs between `x` and `weight`, or the bias is not `[out]`.
    pub fn linear(&self, weight: &Tensor<E>, bias: Option<&Tensor<E>>) -> Result<Tensor<E>> {
        let xs = self.shape();
        let ws = weight.shape();
        if xs.is_empty() || ws.len() != 2 || xs[xs.len() - 1] != ws[1] {
            return Err(Error::Shape { op: "linear", lhs: xs.to_vec(), rhs: ws.to_vec() });
        }
        let (out_f, in_f) = (ws[0], ws[1]);
        if let Some(b) = bias {
            if b.shape() != [out_f] {
                return Err(Error::Shape { op: "linear(bias)", lhs: ws.to_vec(), rhs: b.shape().to_vec() });
            }
        }
        let rows = self.len() / in_f.max(1);
        let mut out_shape = xs.to_vec();
        *out_shape.last_mut().expect("rank >= 1") = out_f;
        let mut out = ArrayD::<E>::zeros(IxDyn(&out_shape));
        {
            let dst = out.as_slice_mut().expect("contiguous");
            if let Some(b) = bias {
                for row in dst.chunks_mut(out_f.max(1)) {
                    row.copy_from_slice(b.as_slice());
                }
            }
            let x = MatRef::row_major(self.as_slice(), rows, in_f);
            let w = MatRef::row_major(weight.as_slice(), out_f, in_f).t();
            gemm(dst, x, w, bias.is_some());
        }
        let (xd, wd) = (self.data().clone(), weight.data().clone());
        let mut inputs = vec![self, weight];
        if let Some(b) = bias {
            inputs.push(b);
        }
        Ok(record("linear", out, &inputs, move |g, needs| {
            let gs = MatRef::row_major(g.as_slice().expect("contiguous"), rows, out_f);
            let gx = needs[0].then(|| {
                let mut gx = ArrayD::<E>::zeros(xd.raw_dim());
                let w = MatRef::row_major(wd.as_slice().expect("contiguous"), out_f, in_f);
                gemm(gx.as_slice_mut().expect("contiguous"), gs, w, false);
                gx
            });
            let gw = needs[1].then(|| {
                let mut gw = ArrayD::<E>::zeros(wd.raw_dim());
                let x = MatRef::row_major(xd.as_slice().expect("contiguous"), rows, in_f);
                gemm(gw.as_slice_mut().expect("contiguous"), gs.t(), x, false);
                gw
            });
            let mut v = vec![gx, gw];
            if needs.len() == 3 {
                v.push(needs[2].then(|| {
                    let g2 = g.view().into_shape_with_order((rows, out_f)).expect("peft-rs bug: linear grad shape");
                    g2.sum_axis(Axis(0)).into_dyn()
                }));
            }
            v
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    fn shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        // batch axes that broadcast (including size-1 axes), inner sizes 1..5
        (0usize..3, 1usize..5, 1usize..5, 1usize..5, prop::bool::ANY, prop::bool::ANY).prop_map(
            |(nb, m, k, n, ba, bb)| {
                let batch_a: Vec<usize> = (0..nb).map(|i| if ba && i == 0 { 1 } else { 2 }).collect();
                let batch_b: Vec<usize> = (0..nb).map(|i| if bb && i == 0 { 1 } else { 2 }).collect();
                let mut a = batch_a;
                a.extend([m, k]);
                let mut b = batch_b;
                b.extend([k, n]);
                (a, b)
            },
        )
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(24))]
        #[test]
        fn matmul_grad_matches_finite_differences(
            (a, b) in shapes().prop_flat_map(|(sa, sb)| (array_strategy(sa, -1.0, 1.0), array_strategy(sb, -1.0, 1.0)))
        ) {
            assert_grads(|x| x[0].matmul(&x[1]), &[a.clone(), b.clone()]);
            let r = b.ndim();
            let mut bv = b.view();
            bv.swap_axes(r - 1, r - 2);
            let bt = bv.as_standard_layout().into_owned();
            assert_grads(|x| x[0].matmul_nt(&x[1]), &[a, bt]);
        }

        #[test]
        fn linear_grad_matches_finite_differences(
            x in array_strategy(vec![2, 3, 4], -1.0, 1.0),
            w in array_strategy(vec![5, 4], -1.0, 1.0),
            b in array_strategy(vec![5], -1.0, 1.0),
        ) {
            assert_grads(|t| t[0].linear(&t[1], Some(&t[2])), &[x.clone(), w.clone(), b]);
            assert_grads(|t| t[0].linear(&t[1], None), &[x, w]);
        }
    }

    #[test]
    fn frozen_weight_gets_no_gradient() {
        let x = Tensor::<f32>::var(ArrayD::ones(IxDyn(&[2, 3])));
        let w = Tensor::<f32>::new(ArrayD::ones(IxDyn(&[4, 3])));
        let g = x.linear(&w, None).unwrap().sum_all().backward().unwrap();
        assert!(g.get(&w).is_none());
        assert_eq!(g.len(), 1);
        assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[4.0; 6]);
    }

    #[test]
    fn matmul_rejects_mismatched_inner_dims() {
        let a = Tensor::<f32>::zeros(&[2, 3]);
        let b = Tensor::<f32>::zeros(&[4, 2]);
        assert!(matches!(a.matmul(&b), Err(Error::Shape { .. })));
    }
}
