//! Fused scaled dot-product attention (with grouped-query heads, key padding and causal masks) and rotary
//! position embeddings.
//!
//! # Attention
//! `out[b, h] = softmax(scale · Q[b,h] · K[b,g(h)]ᵀ + mask) · V[b,g(h)]` where `g(h) = h / (H / Hkv)` maps a
//! query head onto its key/value head (grouped-query attention; `Hkv = H` is multi-head, `Hkv = 1` multi-query).
//!
//! Masking rules, all applied together (a key is attended only when every rule allows it):
//! - **key validity**: `key_valid[b * Lk + j]` false hides key `j` from every query of batch item `b` (padding;
//!   the Hugging Face `attention_mask` convention, true = real token);
//! - **causal**, aligned bottom-right as with a KV cache: query `i` sees keys `j <= i + (Lk - Lq)`, so the last
//!   query sees every key and, with `Lq = Lk`, this is the usual lower triangle. With `Lk > Lq` the first
//!   `Lk - Lq` keys (the cache, or a prefix) are visible to every query; with `Lq > Lk` the first `Lq - Lk`
//!   queries see no key at all.
//!
//! A query row that sees no key (all its keys masked) has **output 0 and zero gradients** instead of the NaN a
//! composed softmax would produce; this is what PyTorch (>= 2.5) does too, whose math SDPA backend uses
//! `_safe_softmax` (0 for rows that are entirely `-inf`). A NaN among the *visible* scores (NaN in Q or K) makes
//! the whole row and its gradients NaN, as in PyTorch: errors are never hidden as zeros.
//!
//! Probabilities use [`Elem::exp_fast`] (f32: within 2e-7 relative of `exp`) under [`wide`].
//!
//! The forward keeps only the output and one log-sum-exp per query row; the backward recomputes the
//! probabilities from them (memory `O(B·H·Lq)` beyond the output, not `O(B·H·Lq·Lk)`). Work is parallel over
//! (batch, head) in the forward and (batch, kv head) in the backward, with every product a [`gemm()`] call.
//!
//! # Rotary embeddings
//! [`Tensor::rotary_embedding`] rotates pairs of channels by `pos · θ^(-2i/D)`; [`RopeLayout`] picks which
//! channels pair up.

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use crate::autograd::{record, record_data};
use crate::backend::{gemm, wide, MatRef, PAR_ELEMWISE};
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
}

impl Dims {
    /// Query heads per kv head.
    fn group(&self) -> usize {
        self.h / self.hkv
    }
}

/// The mask of one call: key validity (flattened `[B, Lk]`) and the causal offset.
#[derive(Clone)]
struct Mask {
    valid: Option<Vec<bool>>,
    causal: bool,
}

impl Mask {
    /// For query row `i` of batch item `b`: the causal end (keys `j < end` are visible) and the validity row.
    #[inline]
    fn row<'a>(&'a self, dims: &Dims, b: usize, i: usize) -> (usize, Option<&'a [bool]>) {
        // j <= i + Lk - Lq  <=>  j < i + Lk + 1 - Lq
        let end = if self.causal { (i + dims.lk + 1).saturating_sub(dims.lq).min(dims.lk) } else { dims.lk };
        (end, self.valid.as_deref().map(|v| &v[b * dims.lk..(b + 1) * dims.lk]))
    }
}

/// `scores [lq, lk] = Q · Kᵀ` for one (batch, head).
fn scores<E: Elem>(q: &[E], k: &[E], dims: &Dims) -> Vec<E> {
    let mut s = vec![E::zero(); dims.lq * dims.lk];
    gemm(&mut s, MatRef::row_major(q, dims.lq, dims.d), MatRef::row_major(k, dims.lk, dims.d).t(), false);
    s
}

/// Sets `row[j] = f(row[j])` for visible keys (`j < end` and valid) and 0 for the others.
#[inline]
fn map_visible<E: Elem>(row: &mut [E], end: usize, valid: Option<&[bool]>, f: impl Fn(E) -> E) {
    let (vis, hidden) = row.split_at_mut(end);
    hidden.fill(E::zero());
    match valid {
        None => vis.iter_mut().for_each(|x| *x = f(*x)),
        Some(ok) => vis.iter_mut().zip(ok).for_each(|(x, &ok)| *x = if ok { f(*x) } else { E::zero() }),
    }
}

/// Turns raw scores into probabilities in place, given per-row log-sum-exps (of the scaled, masked scores).
fn probs_from_lse<E: Elem>(s: &mut [E], lse: &[E], dims: &Dims, mask: &Mask, b: usize, scale: E) {
    for (i, row) in s.chunks_mut(dims.lk.max(1)).enumerate().take(dims.lq) {
        let (l, (end, valid)) = (lse[i], mask.row(dims, b, i));
        if l.is_nan() {
            row.fill(E::nan()); // a NaN score: the whole row is NaN, as in the forward
            continue;
        }
        let end = if l.is_finite() { end } else { 0 };
        map_visible(row, end, valid, |x| (x * scale - l).exp_fast());
    }
}

/// Forward for one (batch, head): returns `(out [lq, dv], lse [lq])`.
fn head_forward<E: Elem>(q: &[E], k: &[E], v: &[E], dims: &Dims, mask: &Mask, b: usize, scale: E) -> (Vec<E>, Vec<E>) {
    let mut s = scores(q, k, dims);
    let mut lse = vec![E::neg_infinity(); dims.lq];
    for (i, row) in s.chunks_mut(dims.lk.max(1)).enumerate().take(dims.lq) {
        let (end, valid) = mask.row(dims, b, i);
        let mut m = E::neg_infinity();
        let mut nan = false;
        for (j, &x) in row[..end].iter().enumerate() {
            if valid.is_none_or(|v| v[j]) {
                // `max` skips NaN, so a NaN-only row would look fully masked: track NaN on its own.
                nan |= x.is_nan();
                m = m.max(x * scale);
            }
        }
        if nan {
            row.fill(E::nan()); // a visible NaN score makes the whole row NaN, as PyTorch's softmax does
            lse[i] = E::nan();
            continue;
        }
        if !m.is_finite() {
            row.fill(E::zero()); // no visible key: output 0 (see the module docs)
            continue;
        }
        map_visible(row, end, valid, |x| (x * scale - m).exp_fast());
        let sum: E = row[..end].iter().copied().sum();
        let inv = E::one() / sum;
        row[..end].iter_mut().for_each(|x| *x *= inv);
        lse[i] = m + sum.ln();
    }
    let mut out = vec![E::zero(); dims.lq * dims.dv];
    gemm(&mut out, MatRef::row_major(&s, dims.lq, dims.lk), MatRef::row_major(v, dims.lk, dims.dv), false);
    (out, lse)
}

/// Everything the backward needs.
struct Saved<E: Elem> {
    q: crate::tensor::Data<E>,
    k: crate::tensor::Data<E>,
    v: crate::tensor::Data<E>,
    out: crate::tensor::Data<E>,
    lse: Vec<E>,
    dims: Dims,
    mask: Mask,
    scale: E,
}

fn sl<E: Elem>(a: &crate::tensor::Data<E>) -> &[E] {
    a.as_slice().expect("peft-rs bug: contiguous")
}

/// Backward for one (batch, kv head) and its group of query heads: returns `(dq [group, lq, d], dk [lk, d],
/// dv [lk, dv])`, each empty when not needed.
fn group_backward<E: Elem>(s: &Saved<E>, g: &[E], b: usize, kvh: usize, need: [bool; 3]) -> [Vec<E>; 3] {
    let dims = &s.dims;
    let (lq, lk, d, dv) = (dims.lq, dims.lk, dims.d, dims.dv);
    let k = &sl(&s.k)[(b * dims.hkv + kvh) * lk * d..][..lk * d];
    let v = &sl(&s.v)[(b * dims.hkv + kvh) * lk * dv..][..lk * dv];
    let mut dq = vec![E::zero(); if need[0] { dims.group() * lq * d } else { 0 }];
    let mut dk = vec![E::zero(); if need[1] { lk * d } else { 0 }];
    let mut dvv = vec![E::zero(); if need[2] { lk * dv } else { 0 }];
    for gi in 0..dims.group() {
        let h = kvh * dims.group() + gi;
        let bh = b * dims.h + h;
        let q = &sl(&s.q)[bh * lq * d..][..lq * d];
        let o = &sl(&s.out)[bh * lq * dv..][..lq * dv];
        let go = &g[bh * lq * dv..][..lq * dv];
        let mut p = scores(q, k, dims);
        probs_from_lse(&mut p, &s.lse[bh * lq..][..lq], dims, &s.mask, b, s.scale);
        let (pm, gom) = (MatRef::row_major(&p, lq, lk), MatRef::row_major(go, lq, dv));
        if need[2] {
            gemm(&mut dvv, pm.t(), gom, gi > 0);
        }
        if !(need[0] || need[1]) {
            continue;
        }
        // dP = dO · Vᵀ; dS = P ⊙ (dP - rowsum(dO ⊙ O)) · scale
        let mut ds = vec![E::zero(); lq * lk];
        gemm(&mut ds, gom, MatRef::row_major(v, lk, dv).t(), false);
        for i in 0..lq {
            let di: E = go[i * dv..(i + 1) * dv].iter().zip(&o[i * dv..(i + 1) * dv]).map(|(&a, &b)| a * b).sum();
            for (x, &pij) in ds[i * lk..(i + 1) * lk].iter_mut().zip(&p[i * lk..(i + 1) * lk]) {
                *x = pij * (*x - di) * s.scale;
            }
        }
        let dsm = MatRef::row_major(&ds, lq, lk);
        if need[0] {
            gemm(&mut dq[gi * lq * d..][..lq * d], dsm, MatRef::row_major(k, lk, d), false);
        }
        if need[1] {
            gemm(&mut dk, dsm.t(), MatRef::row_major(q, lq, d), gi > 0);
        }
    }
    [dq, dk, dvv]
}

/// Which channels a rotary embedding pairs up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Channel `i` pairs with `i + D/2` (`rotate_half`): Hugging Face LLaMA / Mistral / Qwen / GPT-NeoX, and
    /// llama.cpp's NEOX rope mode.
    RotateHalf,
    /// Channel `2i` pairs with `2i + 1`: GPT-J, Meta's original LLaMA checkpoints and llama.cpp's normal rope
    /// mode (GGUF LLaMA weights, whose q/k rows are stored in this order).
    Interleaved,
}

/// The positions a rotary embedding rotates by.
#[derive(Clone, Copy, Debug)]
pub enum RopePositions<'a> {
    /// Positions `offset, offset + 1, ..` along the sequence axis, the same for every batch item (the cache
    /// length during incremental decoding).
    Offset(usize),
    /// Explicit positions: `L` of them shared by every batch item, or `B·L` (row-major `[B, L]`) per item, e.g.
    /// for left-padded batches.
    Explicit(&'a [usize]),
}

/// Rotates every pair of a `[rows, l, d]` block in place-free fashion: `out = R(±angle) x`.
fn rotate<E: Elem>(
    x: &[E],
    cos: &[E],
    sin: &[E],
    shape: [usize; 4],
    per_batch: bool,
    layout: RopeLayout,
    inv: bool,
) -> Vec<E> {
    let [_, h, l, d] = shape;
    let half = d / 2;
    let mut out = vec![E::zero(); x.len()];
    let run = |(row, dst): (usize, &mut [E])| {
        // row = (b·h + head)·l + pos
        let (bh, p) = (row / l, row % l);
        let t = if per_batch { (bh / h) * l + p } else { p } * half;
        let src = &x[row * d..(row + 1) * d];
        for i in 0..half {
            let (c, s) = (cos[t + i], if inv { -sin[t + i] } else { sin[t + i] });
            let (a, b) = match layout {
                RopeLayout::RotateHalf => (i, i + half),
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
            };
            dst[a] = src[a] * c - src[b] * s;
            dst[b] = src[b] * c + src[a] * s;
        }
    };
    if d == 0 {
        return out;
    }
    if x.len() >= PAR_ELEMWISE {
        out.par_chunks_mut(d).enumerate().for_each(run);
    } else {
        out.chunks_mut(d).enumerate().for_each(run);
    }
    out
}

impl<E: Elem> Tensor<E> {
    /// Fused scaled dot-product attention; `self` is the query. See the [module docs](self) for the masking
    /// rules (bottom-right causal alignment, fully masked rows give 0).
    ///
    /// Shapes: `self [B, H, Lq, D]`, `k [B, Hkv, Lk, D]`, `v [B, Hkv, Lk, Dv]` with `H` a multiple of `Hkv`;
    /// `key_valid` is `[B, Lk]` flattened (true = attend); `scale` defaults to `1 / √D`. Returns `[B, H, Lq, Dv]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for ranks other than 4, mismatched batch/head/length/depth sizes, `H` not a positive
    /// multiple of `Hkv`, or a `key_valid` of a length other than `B·Lk`; [`Error::Arg`] for a non-finite scale.
    pub fn scaled_dot_product_attention(
        &self,
        k: &Tensor<E>,
        v: &Tensor<E>,
        key_valid: Option<&[bool]>,
        causal: bool,
        scale: Option<f64>,
    ) -> Result<Tensor<E>> {
        const OP: &str = "scaled_dot_product_attention";
        let (qs, ks, vs) = (self.shape(), k.shape(), v.shape());
        if qs.len() != 4 || ks.len() != 4 || ks[0] != qs[0] || ks[3] != qs[3] {
            return Err(Error::Shape { op: OP, lhs: qs.to_vec(), rhs: ks.to_vec() });
        }
        if vs.len() != 4 || vs[..3] != ks[..3] {
            return Err(Error::Shape { op: OP, lhs: ks.to_vec(), rhs: vs.to_vec() });
        }
        let dims = Dims { b: qs[0], h: qs[1], hkv: ks[1], lq: qs[2], lk: ks[2], d: qs[3], dv: vs[3] };
        if dims.hkv == 0 || !dims.h.is_multiple_of(dims.hkv) {
            return Err(Error::Shape { op: OP, lhs: qs.to_vec(), rhs: ks.to_vec() });
        }
        if let Some(m) = key_valid {
            if m.len() != dims.b * dims.lk {
                return Err(Error::Shape { op: OP, lhs: vec![dims.b, dims.lk], rhs: vec![m.len()] });
            }
        }
        let scale = scale.unwrap_or(1.0 / (dims.d.max(1) as f64).sqrt());
        if !scale.is_finite() {
            return Err(Error::arg(OP, "scale", scale, "must be finite"));
        }
        let scale = E::of(scale);
        let mask = Mask { valid: key_valid.map(<[bool]>::to_vec), causal };
        let (qd, kd, vd) = (self.as_slice(), k.as_slice(), v.as_slice());
        let heads: Vec<(Vec<E>, Vec<E>)> = (0..dims.b * dims.h)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / dims.h, bh % dims.h);
                let kvh = b * dims.hkv + h / dims.group();
                let q = &qd[bh * dims.lq * dims.d..][..dims.lq * dims.d];
                let k = &kd[kvh * dims.lk * dims.d..][..dims.lk * dims.d];
                let v = &vd[kvh * dims.lk * dims.dv..][..dims.lk * dims.dv];
                wide(|| head_forward(q, k, v, &dims, &mask, b, scale))
            })
            .collect();
        let mut out = Vec::with_capacity(dims.b * dims.h * dims.lq * dims.dv);
        let mut lse = Vec::with_capacity(dims.b * dims.h * dims.lq);
        for (o, l) in heads {
            out.extend(o);
            lse.extend(l);
        }
        let out = ArrayD::from_shape_vec(IxDyn(&[dims.b, dims.h, dims.lq, dims.dv]), out)
            .expect("peft-rs bug: attention output shape")
            .into_shared();
        let saved = Saved {
            q: self.data().clone(),
            k: k.data().clone(),
            v: v.data().clone(),
            out: out.clone(),
            lse,
            dims,
            mask,
            scale,
        };
        Ok(record_data("scaled_dot_product_attention", out, &[self, k, v], move |g, needs| {
            let gs = g.as_slice().expect("peft-rs bug: contiguous grad");
            let need = [needs[0], needs[1], needs[2]];
            let groups: Vec<[Vec<E>; 3]> = (0..dims.b * dims.hkv)
                .into_par_iter()
                .map(|bk| wide(|| group_backward(&saved, gs, bk / dims.hkv, bk % dims.hkv, need)))
                .collect();
            let mut r: Vec<Option<ArrayD<E>>> = Vec::with_capacity(3);
            for (i, data) in [&saved.q, &saved.k, &saved.v].into_iter().enumerate() {
                r.push(need[i].then(|| {
                    let flat: Vec<E> = groups.iter().flat_map(|gr| gr[i].iter().copied()).collect();
                    ArrayD::from_shape_vec(data.raw_dim(), flat).expect("peft-rs bug: attention grad shape")
                }));
            }
            r
        }))
    }

    /// Rotary position embedding on `[B, H, L, D]` (D even): each channel pair `(a, b)` (chosen by `layout`) at
    /// sequence position `pos` is rotated by the angle `pos · θ^(-2i/D)`, `i` the pair's index:
    /// `(x_a, x_b) -> (x_a cos - x_b sin, x_b cos + x_a sin)`. The backward is the inverse rotation. Angles are
    /// computed in f64.
    ///
    /// # Errors
    /// [`Error::Shape`] when `self` is not rank 4, `D` is odd, or explicit positions number neither `L` nor `B·L`;
    /// [`Error::Arg`] for a `theta` that is not finite and positive.
    pub fn rotary_embedding(&self, positions: RopePositions<'_>, theta: f64, layout: RopeLayout) -> Result<Tensor<E>> {
        const OP: &str = "rotary_embedding";
        let s = self.shape();
        if s.len() != 4 || !s[3].is_multiple_of(2) {
            return Err(Error::Shape { op: OP, lhs: s.to_vec(), rhs: vec![] });
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(Error::arg(OP, "theta", theta, "must be finite and positive"));
        }
        let shape = [s[0], s[1], s[2], s[3]];
        let (l, d) = (s[2], s[3]);
        let (pos, per_batch): (Vec<usize>, bool) = match positions {
            RopePositions::Offset(o) => ((o..o + l).collect(), false),
            RopePositions::Explicit(p) if p.len() == l => (p.to_vec(), false),
            RopePositions::Explicit(p) if p.len() == s[0] * l => (p.to_vec(), true),
            RopePositions::Explicit(p) => {
                return Err(Error::Shape { op: OP, lhs: s.to_vec(), rhs: vec![p.len()] });
            }
        };
        let half = d / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| theta.powf(-((2 * i) as f64) / d as f64)).collect();
        let mut cos = Vec::with_capacity(pos.len() * half);
        let mut sin = Vec::with_capacity(pos.len() * half);
        for &p in &pos {
            for &f in &inv_freq {
                let (sn, cs) = (p as f64 * f).sin_cos();
                cos.push(E::of(cs));
                sin.push(E::of(sn));
            }
        }
        let out = rotate(self.as_slice(), &cos, &sin, shape, per_batch, layout, false);
        let out = ArrayD::from_shape_vec(IxDyn(s), out).expect("peft-rs bug: rotary shape");
        Ok(record(OP, out, &[self], move |g, _| {
            let gs = g.as_slice().expect("peft-rs bug: contiguous grad");
            let gx = rotate(gs, &cos, &sin, shape, per_batch, layout, true);
            vec![Some(ArrayD::from_shape_vec(g.raw_dim(), gx).expect("peft-rs bug: rotary grad shape"))]
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    /// Attention composed from primitive ops: `softmax(QKᵀ·scale + bias)·V` with kv heads repeated by
    /// `index_select` and fully masked rows zeroed (the fused op's documented convention).
    fn reference<E: Elem>(
        q: &Tensor<E>,
        k: &Tensor<E>,
        v: &Tensor<E>,
        valid: Option<&[bool]>,
        causal: bool,
        scale: f64,
    ) -> Result<Tensor<E>> {
        let (b, h, lq) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let (hkv, lk) = (k.shape()[1], k.shape()[2]);
        let map: Vec<usize> = (0..h).map(|x| x / (h / hkv)).collect();
        let (kr, vr) = (k.index_select(1, &map)?, v.index_select(1, &map)?);
        let ok = |bi: usize, i: usize, j: usize| {
            (!causal || j as isize <= i as isize + lk as isize - lq as isize) && valid.is_none_or(|m| m[bi * lk + j])
        };
        let bias = ArrayD::from_shape_fn(IxDyn(&[b, 1, lq, lk]), |ix| {
            E::of(if ok(ix[0], ix[2], ix[3]) { 0.0 } else { -1e30 })
        });
        let any = ArrayD::from_shape_fn(IxDyn(&[b, 1, lq, 1]), |ix| {
            if (0..lk).any(|j| ok(ix[0], ix[2], j)) {
                E::one()
            } else {
                E::zero()
            }
        });
        let s = q.matmul_nt(&kr)?.mul_scalar(E::of(scale)).add(&Tensor::new(bias))?;
        let e = s.sub(&s.max(3, true)?.detach())?.exp();
        let p = e.div(&e.sum(&[3], true)?)?.mul(&Tensor::new(any))?;
        p.matmul(&vr)
    }

    #[derive(Clone, Debug)]
    struct Case {
        q: ArrayD<f64>,
        k: ArrayD<f64>,
        v: ArrayD<f64>,
        valid: Option<Vec<bool>>,
        causal: bool,
        scale: Option<f64>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (1usize..3, 1usize..3, 1usize..3, 1usize..4, 1usize..5, 1usize..4, 1usize..4)
            .prop_flat_map(|(b, hkv, group, lq, lk, d, dv)| {
                let h = hkv * group;
                (
                    array_strategy(vec![b, h, lq, d], -1.5, 1.5),
                    array_strategy(vec![b, hkv, lk, d], -1.5, 1.5),
                    array_strategy(vec![b, hkv, lk, dv], -1.5, 1.5),
                    prop::option::of(prop::collection::vec(prop::bool::weighted(0.7), b * lk)),
                    any::<bool>(),
                    prop::option::of(0.1f64..2.0),
                )
            })
            .prop_map(|(q, k, v, valid, causal, scale)| Case { q, k, v, valid, causal, scale })
    }

    fn run(c: &Case, t: &[Tensor<f64>]) -> Result<Tensor<f64>> {
        t[0].scaled_dot_product_attention(&t[1], &t[2], c.valid.as_deref(), c.causal, c.scale)
    }

    fn rope_input() -> impl Strategy<Value = (ArrayD<f64>, Vec<usize>, bool)> {
        (1usize..3, 1usize..3, 1usize..4, 0usize..4, any::<bool>()).prop_flat_map(|(b, h, l, half, per_batch)| {
            let n = if per_batch { b * l } else { l };
            (array_strategy(vec![b, h, l, 2 * half], -1.0, 1.0), prop::collection::vec(0usize..50, n), Just(per_batch))
        })
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(32))]
        #[test]
        fn sdpa_grad_matches_finite_differences(c in case()) {
            assert_grads(|t| run(&c, t), &[c.q.clone(), c.k.clone(), c.v.clone()]);
        }

        #[test]
        fn sdpa_matches_composed_reference_in_value_and_gradient(c in case()) {
            let vars = |c: &Case| [Tensor::var(c.q.clone()), Tensor::var(c.k.clone()), Tensor::var(c.v.clone())];
            let (a, b) = (vars(&c), vars(&c));
            let scale = c.scale.unwrap_or(1.0 / (c.q.shape()[3] as f64).sqrt());
            let fused = run(&c, &a).unwrap();
            let composed = reference(&b[0], &b[1], &b[2], c.valid.as_deref(), c.causal, scale).unwrap();
            prop_assert_eq!(fused.shape(), composed.shape());
            for (x, y) in fused.as_slice().iter().zip(composed.as_slice()) {
                prop_assert!((x - y).abs() < 1e-12, "forward {} vs {}", x, y);
            }
            let seed = fused.data().mapv(|x| x.sin() + 0.5);
            let ga = fused.backward_with(seed.clone()).unwrap();
            let gb = composed.backward_with(seed).unwrap();
            for (ta, tb) in a.iter().zip(&b) {
                let (x, y) = (ga.get(ta).unwrap(), gb.get(tb).unwrap());
                for (x, y) in x.iter().zip(y.iter()) {
                    prop_assert!((x - y).abs() < 1e-10, "grad {} vs {}", x, y);
                }
            }
        }

        #[test]
        fn rotary_grad_matches_finite_differences((x, pos, per_batch) in rope_input(), interleaved in any::<bool>()) {
            let layout = if interleaved { RopeLayout::Interleaved } else { RopeLayout::RotateHalf };
            assert_grads(|t| Ok(t[0].rotary_embedding(RopePositions::Explicit(&pos), 100.0, layout)?.exp()), std::slice::from_ref(&x));
            if !per_batch {
                assert_grads(|t| Ok(t[0].rotary_embedding(RopePositions::Offset(pos.len()), 10.0, layout)?.tanh()), &[x]);
            }
        }

        #[test]
        fn rotary_preserves_norms_and_relative_angles((x, pos, _) in rope_input(), interleaved in any::<bool>()) {
            let layout = if interleaved { RopeLayout::Interleaved } else { RopeLayout::RotateHalf };
            let xt = Tensor::new(x.clone());
            let y = xt.rotary_embedding(RopePositions::Explicit(&pos), 10_000.0, layout).unwrap();
            let d = x.shape()[3].max(1);
            for (a, b) in x.as_slice().unwrap().chunks(d).zip(y.as_slice().chunks(d)) {
                let (na, nb): (f64, f64) = (a.iter().map(|v| v * v).sum(), b.iter().map(|v| v * v).sum());
                prop_assert!((na - nb).abs() < 1e-12);
            }
            // <R(m) q, R(n) k> depends only on m - n: shifting every position by 7 keeps all scores
            let shifted: Vec<usize> = pos.iter().map(|p| p + 7).collect();
            let y2 = xt.rotary_embedding(RopePositions::Explicit(&shifted), 10_000.0, layout).unwrap();
            let (s1, s2) = (y.matmul_nt(&y).unwrap(), y2.matmul_nt(&y2).unwrap());
            for (a, b) in s1.as_slice().iter().zip(s2.as_slice()) {
                prop_assert!((a - b).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn fully_masked_rows_give_zero_output_and_zero_grads() {
        let q = Tensor::<f64>::var(ArrayD::from_elem(IxDyn(&[1, 1, 2, 2]), 0.3));
        let k = Tensor::<f64>::var(ArrayD::from_elem(IxDyn(&[1, 1, 3, 2]), 0.2));
        let v = Tensor::<f64>::var(ArrayD::from_elem(IxDyn(&[1, 1, 3, 2]), 1.0));
        let y = q.scaled_dot_product_attention(&k, &v, Some(&[false, false, false]), false, None).unwrap();
        assert!(y.as_slice().iter().all(|&x| x == 0.0));
        let g = y.sum_all().backward().unwrap();
        for t in [&q, &k, &v] {
            assert!(g.get(t).unwrap().iter().all(|&x| x == 0.0));
        }
    }

    /// Issue 14 item 7: a NaN score makes the whole row NaN (PyTorch's softmax and SDPA), also when every score of
    /// the row is NaN (the max over a NaN-only row used to be `-inf`, which took the fully-masked path and gave 0);
    /// rows fully masked by padding keep output 0 (PyTorch >= 2.5 `_safe_softmax` in the math SDPA backend).
    #[test]
    fn nan_scores_propagate_but_fully_masked_rows_stay_zero() {
        for nan_keys in [vec![0usize, 1, 2], vec![1]] {
            let mut kd = ArrayD::from_elem(IxDyn(&[1, 1, 3, 2]), 0.2f32);
            for &j in &nan_keys {
                kd[[0, 0, j, 0]] = f32::NAN;
            }
            let q = Tensor::<f32>::var(ArrayD::from_elem(IxDyn(&[1, 1, 2, 2]), 0.3));
            let k = Tensor::<f32>::var(kd);
            let v = Tensor::<f32>::var(ArrayD::from_elem(IxDyn(&[1, 1, 3, 2]), 1.0));
            let y = q.scaled_dot_product_attention(&k, &v, None, false, None).unwrap();
            assert!(y.as_slice().iter().all(|x| x.is_nan()), "NaN keys {nan_keys:?}: {:?}", y.as_slice());
            let g = y.sum_all().backward().unwrap();
            assert!(g.get(&q).unwrap().iter().all(|x| x.is_nan()), "NaN reaches the query grads");
        }
        // a NaN key that padding hides does not reach the output
        let mut kd = ArrayD::from_elem(IxDyn(&[1, 1, 3, 2]), 0.2f32);
        kd[[0, 0, 2, 0]] = f32::NAN;
        let (q, k) = (Tensor::<f32>::new(ArrayD::from_elem(IxDyn(&[1, 1, 2, 2]), 0.3)), Tensor::<f32>::new(kd));
        let v = Tensor::<f32>::new(ArrayD::from_elem(IxDyn(&[1, 1, 3, 2]), 1.0));
        let y = q.scaled_dot_product_attention(&k, &v, Some(&[true, true, false]), false, None).unwrap();
        assert!(y.as_slice().iter().all(|&x| (x - 1.0).abs() < 1e-6), "{:?}", y.as_slice());
    }

    #[test]
    fn causal_mask_is_aligned_bottom_right() {
        // v rows are one-hot in key index, so the output row is the attention distribution itself.
        let eye = |n: usize| ArrayD::from_shape_fn(IxDyn(&[1, 1, n, n]), |ix| if ix[2] == ix[3] { 1.0 } else { 0.0 });
        let zeros = |l: usize, d: usize| Tensor::<f64>::zeros(&[1, 1, l, d]);
        // Lq = 2, Lk = 4: query 0 sees keys 0..=2, query 1 sees all four (uniform since all scores are 0)
        let p = zeros(2, 3).scaled_dot_product_attention(&zeros(4, 3), &Tensor::new(eye(4)), None, true, None).unwrap();
        let third = 1.0 / 3.0;
        assert_eq!(p.to_vec(), vec![third, third, third, 0.0, 0.25, 0.25, 0.25, 0.25]);
        // Lq = 3, Lk = 1: only the last query sees the key; the others are fully masked (output 0)
        let p = zeros(3, 3).scaled_dot_product_attention(&zeros(1, 3), &Tensor::new(eye(1)), None, true, None).unwrap();
        assert_eq!(p.to_vec(), vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn kv_cache_decoding_matches_full_causal_attention() {
        let mk = |s: &[usize], seed: f64| {
            Tensor::<f64>::new(ArrayD::from_shape_fn(IxDyn(s), |ix| {
                ((ix[2] * 7 + ix[3] * 3 + ix[1]) as f64 * seed).sin()
            }))
        };
        let (q, k, v) = (mk(&[1, 4, 5, 8], 0.37), mk(&[1, 2, 5, 8], 0.53), mk(&[1, 2, 5, 6], 0.71));
        let full = q.scaled_dot_product_attention(&k, &v, None, true, None).unwrap();
        // the last two queries against all five cached keys
        let tail = q.narrow(2, 3, 2).unwrap().scaled_dot_product_attention(&k, &v, None, true, None).unwrap();
        let want = full.narrow(2, 3, 2).unwrap();
        assert!(tail.as_slice().iter().zip(want.as_slice()).all(|(a, b)| (a - b).abs() < 1e-14));
    }

    #[test]
    fn grouped_query_attention_equals_mha_with_repeated_kv() {
        let mk = |s: &[usize], seed: f64| {
            Tensor::<f64>::new(ArrayD::from_shape_fn(IxDyn(s), |ix| {
                ((ix[1] * 5 + ix[2] * 7 + ix[3]) as f64 * seed).cos()
            }))
        };
        let (q, k, v) = (mk(&[2, 6, 3, 4], 0.31), mk(&[2, 2, 3, 4], 0.47), mk(&[2, 2, 3, 4], 0.59));
        let gqa = q.scaled_dot_product_attention(&k, &v, None, false, None).unwrap();
        let map = [0, 0, 0, 1, 1, 1];
        let (kr, vr) = (k.index_select(1, &map).unwrap(), v.index_select(1, &map).unwrap());
        let mha = q.scaled_dot_product_attention(&kr, &vr, None, false, None).unwrap();
        assert!(gqa.as_slice().iter().zip(mha.as_slice()).all(|(a, b)| (a - b).abs() < 1e-14));
    }

    #[test]
    fn sdpa_rejects_bad_shapes() {
        let z = |s: &[usize]| Tensor::<f32>::zeros(s);
        let (q, k, v) = (z(&[1, 4, 2, 8]), z(&[1, 2, 3, 8]), z(&[1, 2, 3, 5]));
        assert!(q.scaled_dot_product_attention(&k, &v, None, true, None).is_ok());
        let bad = |q: &Tensor<f32>, k: &Tensor<f32>, v: &Tensor<f32>, m: Option<&[bool]>| {
            matches!(q.scaled_dot_product_attention(k, v, m, false, None), Err(Error::Shape { .. }))
        };
        assert!(bad(&z(&[4, 2, 8]), &k, &v, None)); // rank
        assert!(bad(&z(&[1, 3, 2, 8]), &k, &v, None)); // H not a multiple of Hkv
        assert!(bad(&z(&[1, 4, 2, 7]), &k, &v, None)); // depth
        assert!(bad(&z(&[2, 4, 2, 8]), &k, &v, None)); // batch
        assert!(bad(&q, &k, &z(&[1, 2, 4, 5]), None)); // Lk of v
        assert!(bad(&q, &k, &z(&[1, 1, 3, 5]), None)); // Hkv of v
        assert!(bad(&q, &z(&[1, 0, 3, 8]), &z(&[1, 0, 3, 5]), None)); // no kv heads
        assert!(bad(&q, &k, &v, Some(&[true; 2]))); // mask length
        let nan = q.scaled_dot_product_attention(&k, &v, None, false, Some(f64::NAN));
        assert!(matches!(nan, Err(Error::Arg { .. })));
    }

    #[test]
    fn rotary_position_zero_is_identity_and_one_rotates_by_inverse_frequencies() {
        let x = Tensor::<f64>::new(ArrayD::from_shape_fn(IxDyn(&[1, 1, 2, 4]), |ix| (ix[3] + 1) as f64));
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let y = x.rotary_embedding(RopePositions::Explicit(&[0, 0]), 10_000.0, layout).unwrap();
            assert_eq!(y.to_vec(), x.to_vec());
        }
        // D = 4, theta = 100: pair 0 turns by 1 rad, pair 1 by 100^(-1/2) = 0.1 rad at position 1
        let one = x.narrow(2, 0, 1).unwrap();
        let y = one.rotary_embedding(RopePositions::Offset(1), 100.0, RopeLayout::RotateHalf).unwrap().to_vec();
        let (c0, s0, c1, s1) = (1f64.cos(), 1f64.sin(), 0.1f64.cos(), 0.1f64.sin());
        // rotate_half pairs (x0, x2) and (x1, x3) = (1, 3) and (2, 4)
        let want = [1.0 * c0 - 3.0 * s0, 2.0 * c1 - 4.0 * s1, 3.0 * c0 + 1.0 * s0, 4.0 * c1 + 2.0 * s1];
        assert!(y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-14), "{y:?}");
        let y = one.rotary_embedding(RopePositions::Offset(1), 100.0, RopeLayout::Interleaved).unwrap().to_vec();
        // interleaved pairs (x0, x1) and (x2, x3) = (1, 2) and (3, 4)
        let want = [1.0 * c0 - 2.0 * s0, 2.0 * c0 + 1.0 * s0, 3.0 * c1 - 4.0 * s1, 4.0 * c1 + 3.0 * s1];
        assert!(y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-14), "{y:?}");
    }

    #[test]
    fn interleaved_layout_is_rotate_half_on_permuted_channels() {
        // HF's permute of GGUF/Meta q,k rows: interleaved channel 2i <-> half channel i, 2i+1 <-> i + D/2
        let (d, half) = (8, 4);
        let perm: Vec<usize> = (0..half).map(|i| 2 * i).chain((0..half).map(|i| 2 * i + 1)).collect();
        let x = Tensor::<f64>::new(ArrayD::from_shape_fn(IxDyn(&[2, 3, 5, d]), |ix| {
            ((ix[0] * 31 + ix[1] * 17 + ix[2] * 5 + ix[3]) as f64 * 0.13).sin()
        }));
        let pos = RopePositions::Offset(3);
        let a = x.rotary_embedding(pos, 500.0, RopeLayout::Interleaved).unwrap().index_select(3, &perm).unwrap();
        let b = x.index_select(3, &perm).unwrap().rotary_embedding(pos, 500.0, RopeLayout::RotateHalf).unwrap();
        assert!(a.as_slice().iter().zip(b.as_slice()).all(|(p, q)| (p - q).abs() < 1e-14));
    }

    #[test]
    fn per_batch_positions_rotate_each_item_separately() {
        let x = Tensor::<f64>::new(ArrayD::from_shape_fn(IxDyn(&[2, 1, 2, 2]), |ix| (ix[3] + 1) as f64));
        let y = x.rotary_embedding(RopePositions::Explicit(&[0, 0, 0, 5]), 10.0, RopeLayout::RotateHalf).unwrap();
        // item 0 sits at positions [0, 0] (unchanged), item 1 at [0, 5]
        assert_eq!(&y.as_slice()[..6], &[1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
        let x1 = x.narrow(0, 1, 1).unwrap().narrow(2, 1, 1).unwrap();
        let y1 = x1.rotary_embedding(RopePositions::Offset(5), 10.0, RopeLayout::RotateHalf).unwrap();
        assert_eq!(&y.as_slice()[6..8], y1.as_slice());
        assert_ne!(&y.as_slice()[6..8], &[1.0, 2.0]);
    }

    #[test]
    fn rotary_rejects_bad_input() {
        let x = Tensor::<f32>::zeros(&[1, 2, 3, 4]);
        let p = RopePositions::Offset(0);
        assert!(matches!(
            Tensor::<f32>::zeros(&[2, 3, 4]).rotary_embedding(p, 1e4, RopeLayout::RotateHalf),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            Tensor::<f32>::zeros(&[1, 2, 3, 5]).rotary_embedding(p, 1e4, RopeLayout::RotateHalf),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            x.rotary_embedding(RopePositions::Explicit(&[0, 1]), 1e4, RopeLayout::RotateHalf),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(x.rotary_embedding(p, 0.0, RopeLayout::RotateHalf), Err(Error::Arg { .. })));
        assert!(matches!(x.rotary_embedding(p, f64::INFINITY, RopeLayout::Interleaved), Err(Error::Arg { .. })));
    }
}
