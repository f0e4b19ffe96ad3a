//! Indexing ops: `index_select`, `gather`, `scatter_add`, `masked_fill` and `embedding`.
//!
//! Index arguments are plain `usize` data (never tensors): they carry no gradient. `gather` and `scatter_add`
//! follow `torch.gather` / `torch.Tensor.scatter_add` exactly, including index tensors smaller than the data
//! along non-indexed axes. Every index is checked; an out-of-range one is an [`Error::Index`] that names it.

use ndarray::{ArrayD, Dimension, IxDyn, Zip};
use rayon::prelude::*;

use crate::autograd::record;
use crate::backend::PAR_ELEMWISE;
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Row-major strides (in elements) of a shape.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `(outer, dim, inner)`: the shape seen as `[outer, dim, inner]` around `axis`.
fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Walks every position of an index array of shape `ishape` in row-major order, calling
/// `f(flat, coords, a_off, b_off)` where `a_off`/`b_off` are the offsets of `coords` under strides `a`/`b`.
fn walk(ishape: &[usize], a: &[usize], b: &[usize], mut f: impl FnMut(usize, &[usize], usize, usize)) {
    let n: usize = ishape.iter().product();
    let r = ishape.len();
    let mut coords = vec![0usize; r];
    let (mut ao, mut bo) = (0usize, 0usize);
    for flat in 0..n {
        f(flat, &coords, ao, bo);
        // odometer increment
        for d in (0..r).rev() {
            coords[d] += 1;
            ao += a[d];
            bo += b[d];
            if coords[d] < ishape[d] {
                break;
            }
            ao -= a[d] * ishape[d];
            bo -= b[d] * ishape[d];
            coords[d] = 0;
        }
    }
}

/// Checks a torch-style index array against `data` (the indexed tensor) and, for `scatter_add`, `src`.
fn check_index(
    op: &'static str,
    data: &[usize],
    axis: usize,
    index: &ArrayD<usize>,
    src: Option<&[usize]>,
) -> Result<()> {
    let r = data.len();
    if axis >= r {
        return Err(Error::Axis { op, axis, rank: r });
    }
    let is = index.shape();
    let fits_data = is.len() == r && (0..r).all(|d| d == axis || is[d] <= data[d]);
    if !fits_data {
        return Err(Error::Shape { op, lhs: data.to_vec(), rhs: is.to_vec() });
    }
    if let Some(s) = src {
        if s.len() != r || (0..r).any(|d| is[d] > s[d]) {
            return Err(Error::Shape { op, lhs: s.to_vec(), rhs: is.to_vec() });
        }
    }
    let n = data[axis];
    if let Some((pos, &v)) = index.indexed_iter().find(|(_, &v)| v >= n) {
        return Err(Error::Index { op, index: v as i64, position: pos.slice().to_vec(), axis, size: n });
    }
    Ok(())
}

/// Adds `src[p]` into `dst[target(p)]` for every position `p` of `index` (the `scatter_add` kernel).
fn scatter_add_into<E: Elem>(
    dst: &mut [E],
    dst_shape: &[usize],
    axis: usize,
    index: &ArrayD<usize>,
    src: &[E],
    src_shape: &[usize],
) {
    let ds = strides(dst_shape);
    let mut dsa = ds.clone();
    dsa[axis] = 0;
    let ss = strides(src_shape);
    let idx = index.as_standard_layout();
    let idx = idx.as_slice().expect("peft-rs bug: standard layout");
    walk(index.shape(), &dsa, &ss, |flat, _, a, b| dst[a + idx[flat] * ds[axis]] += src[b]);
}

/// `out[p] = src[target(p)]` for every position `p` of `index` (the `gather` kernel); `out` has `index`'s shape.
fn gather_from<E: Elem>(src: &[E], src_shape: &[usize], axis: usize, index: &ArrayD<usize>) -> ArrayD<E> {
    let ss = strides(src_shape);
    let mut ssa = ss.clone();
    ssa[axis] = 0;
    let zeros = vec![0; index.ndim()];
    let idx = index.as_standard_layout();
    let idx = idx.as_slice().expect("peft-rs bug: standard layout");
    let mut out = vec![E::zero(); idx.len()];
    walk(index.shape(), &ssa, &zeros, |flat, _, a, _| out[flat] = src[a + idx[flat] * ss[axis]]);
    ArrayD::from_shape_vec(IxDyn(index.shape()), out).expect("peft-rs bug: gather shape")
}

/// Copies rows `indices` of a `[outer, dim, inner]` array into `[outer, indices.len(), inner]`.
fn select_rows<E: Elem>(x: &[E], (outer, dim, inner): (usize, usize, usize), indices: &[usize], out: &mut [E]) {
    let k = indices.len();
    let copy = |(o, dst): (usize, &mut [E])| {
        for (i, &ix) in indices.iter().enumerate() {
            let s = (o * dim + ix) * inner;
            dst[i * inner..(i + 1) * inner].copy_from_slice(&x[s..s + inner]);
        }
    };
    if k * inner == 0 {
        return;
    }
    if out.len() >= PAR_ELEMWISE && outer > 1 {
        out.par_chunks_mut(k * inner).enumerate().for_each(copy);
    } else {
        out.chunks_mut(k * inner).enumerate().for_each(copy);
    }
}

/// Adds the rows of a `[outer, indices.len(), inner]` gradient into row `indices[i]` of a `[outer, dim, inner]` one.
fn scatter_rows<E: Elem>(g: &[E], (outer, dim, inner): (usize, usize, usize), indices: &[usize], dst: &mut [E]) {
    let k = indices.len();
    for o in 0..outer {
        for (i, &ix) in indices.iter().enumerate() {
            let s = (o * k + i) * inner;
            let d = (o * dim + ix) * inner;
            for (a, &b) in dst[d..d + inner].iter_mut().zip(&g[s..s + inner]) {
                *a += b;
            }
        }
    }
}

impl<E: Elem> Tensor<E> {
    /// Selects entries `indices` along `axis` (repeats allowed): the output has `indices.len()` there.
    /// The backward scatter-adds the gradient back, so repeated indices accumulate.
    ///
    /// # Errors
    /// [`Error::Axis`] for an axis beyond the rank; [`Error::Index`] naming the first out-of-range index.
    pub fn index_select(&self, axis: usize, indices: &[usize]) -> Result<Tensor<E>> {
        let rank = self.rank();
        if axis >= rank {
            return Err(Error::Axis { op: "index_select", axis, rank });
        }
        let dims = split_at_axis(self.shape(), axis);
        if let Some((pos, &ix)) = indices.iter().enumerate().find(|(_, &ix)| ix >= dims.1) {
            return Err(Error::Index { op: "index_select", index: ix as i64, position: vec![pos], axis, size: dims.1 });
        }
        let mut out_shape = self.shape().to_vec();
        out_shape[axis] = indices.len();
        let mut out = ArrayD::<E>::zeros(IxDyn(&out_shape));
        select_rows(self.as_slice(), dims, indices, out.as_slice_mut().expect("peft-rs bug: contiguous"));
        let indices = indices.to_vec();
        let in_dim = self.data().raw_dim();
        Ok(record("index_select", out, &[self], move |g, _| {
            let mut gx = ArrayD::<E>::zeros(in_dim.clone());
            let gs = g.as_slice().expect("peft-rs bug: contiguous grad");
            scatter_rows(gs, dims, &indices, gx.as_slice_mut().expect("peft-rs bug: contiguous"));
            vec![Some(gx)]
        }))
    }

    /// `torch.gather`: `out[i][j][k] = self[index[i][j][k]][j][k]` for `axis = 0` (likewise for other axes).
    ///
    /// `index` has the rank of `self` and, off `axis`, sizes no larger than `self`'s; the output has `index`'s
    /// shape. The backward scatter-adds into a zero gradient of `self`'s shape.
    ///
    /// # Errors
    /// [`Error::Axis`] for an axis beyond the rank; [`Error::Shape`] when `index` does not fit; [`Error::Index`]
    /// naming the first out-of-range index.
    pub fn gather(&self, axis: usize, index: &ArrayD<usize>) -> Result<Tensor<E>> {
        check_index("gather", self.shape(), axis, index, None)?;
        let out = gather_from(self.as_slice(), self.shape(), axis, index);
        let index = index.clone();
        let in_shape = self.shape().to_vec();
        Ok(record("gather", out, &[self], move |g, _| {
            let mut gx = ArrayD::<E>::zeros(IxDyn(&in_shape));
            let gs = g.as_slice().expect("peft-rs bug: contiguous grad");
            let dst = gx.as_slice_mut().expect("peft-rs bug: contiguous");
            scatter_add_into(dst, &in_shape, axis, &index, gs, index.shape());
            vec![Some(gx)]
        }))
    }

    /// `torch.Tensor.scatter_add` (out of place): a copy of `self` where, for `axis = 0`,
    /// `out[index[i][j][k]][j][k] += src[i][j][k]` for every position of `index`.
    ///
    /// `index` has the rank of `self` and `src`, sizes no larger than `src`'s, and off `axis` no larger than
    /// `self`'s; `src` entries outside `index`'s extent are ignored. Differentiable in `self` (identity) and
    /// `src` (a gather of the output gradient; zero where `src` is ignored).
    ///
    /// # Errors
    /// [`Error::Axis`] for an axis beyond the rank; [`Error::Shape`] when `index` does not fit; [`Error::Index`]
    /// naming the first out-of-range index.
    pub fn scatter_add(&self, axis: usize, index: &ArrayD<usize>, src: &Tensor<E>) -> Result<Tensor<E>> {
        check_index("scatter_add", self.shape(), axis, index, Some(src.shape()))?;
        let mut out = self.data().to_owned();
        let dst = out.as_slice_mut().expect("peft-rs bug: contiguous");
        scatter_add_into(dst, self.shape(), axis, index, src.as_slice(), src.shape());
        let index = index.clone();
        let (self_shape, src_shape) = (self.shape().to_vec(), src.shape().to_vec());
        Ok(record("scatter_add", out, &[self, src], move |g, needs| {
            let gself = needs[0].then(|| g.clone());
            let gsrc = needs[1].then(|| {
                let gs = g.as_slice().expect("peft-rs bug: contiguous grad");
                let picked = gather_from(gs, &self_shape, axis, &index);
                if picked.shape() == src_shape.as_slice() {
                    return picked;
                }
                // index smaller than src: the rest of src got no gradient
                let mut full = ArrayD::<E>::zeros(IxDyn(&src_shape));
                let mut view = full.view_mut();
                for (d, &n) in index.shape().iter().enumerate() {
                    view.slice_axis_inplace(ndarray::Axis(d), ndarray::Slice::from(0..n));
                }
                view.assign(&picked);
                full
            });
            vec![gself, gsrc]
        }))
    }

    /// Replaces the entries where `mask` is true by `value`; `mask` broadcasts to `self`'s shape (NumPy rules).
    /// The gradient is zero at filled entries and passes through elsewhere.
    ///
    /// # Errors
    /// [`Error::Shape`] when `mask` does not broadcast to `self`'s shape.
    pub fn masked_fill(&self, mask: &ArrayD<bool>, value: E) -> Result<Tensor<E>> {
        let Some(m) = mask.broadcast(IxDyn(self.shape())) else {
            return Err(Error::Shape { op: "masked_fill", lhs: self.shape().to_vec(), rhs: mask.shape().to_vec() });
        };
        let mut out = self.data().to_owned();
        Zip::from(&mut out).and(&m).for_each(|o, &f| {
            if f {
                *o = value;
            }
        });
        let mask = mask.clone();
        Ok(record("masked_fill", out, &[self], move |g, _| {
            let m = mask.broadcast(g.raw_dim()).expect("peft-rs bug: mask broadcast checked in forward");
            let mut gx = g.clone();
            Zip::from(&mut gx).and(&m).for_each(|o, &f| {
                if f {
                    *o = E::zero();
                }
            });
            vec![Some(gx)]
        }))
    }

    /// Embedding lookup on a `[vocab, dim]` table (`self`): `ids` (row-major, of shape `ids_shape`) pick rows,
    /// giving `[ids_shape.., dim]`.
    ///
    /// The backward writes straight into one zero `[vocab, dim]` gradient, adding each looked-up row's
    /// gradient (repeated ids accumulate); no other buffer is allocated. A frozen table records no backward at
    /// all. (Gradients are dense arrays in this engine; a sparse row gradient is not offered.)
    ///
    /// # Errors
    /// [`Error::Shape`] when `self` is not rank 2 or `ids.len()` is not the product of `ids_shape`;
    /// [`Error::Index`] naming the first id that is not below `vocab`, and its position.
    pub fn embedding(&self, ids: &[usize], ids_shape: &[usize]) -> Result<Tensor<E>> {
        if self.rank() != 2 {
            return Err(Error::Shape { op: "embedding", lhs: self.shape().to_vec(), rhs: ids_shape.to_vec() });
        }
        if ids_shape.iter().product::<usize>() != ids.len() {
            return Err(Error::Shape { op: "embedding(ids)", lhs: vec![ids.len()], rhs: ids_shape.to_vec() });
        }
        let (vocab, dim) = (self.shape()[0], self.shape()[1]);
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id >= vocab) {
            return Err(Error::Index { op: "embedding", index: id as i64, position: vec![pos], axis: 0, size: vocab });
        }
        let mut out_shape = ids_shape.to_vec();
        out_shape.push(dim);
        let mut out = ArrayD::<E>::zeros(IxDyn(&out_shape));
        let dims = (1, vocab, dim);
        select_rows(self.as_slice(), dims, ids, out.as_slice_mut().expect("peft-rs bug: contiguous"));
        let ids = ids.to_vec();
        Ok(record("embedding", out, &[self], move |g, _| {
            let mut gw = ArrayD::<E>::zeros(IxDyn(&[vocab, dim]));
            let gs = g.as_slice().expect("peft-rs bug: contiguous grad");
            scatter_rows(gs, dims, &ids, gw.as_slice_mut().expect("peft-rs bug: contiguous"));
            vec![Some(gw)]
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{array_strategy, assert_grads};
    use ndarray::arr2;
    use proptest::prelude::*;

    /// A shape of rank 1..=3 with sizes 1..=3, an axis of it, and a seed for indices.
    fn shape_axis() -> impl Strategy<Value = (Vec<usize>, usize)> {
        prop::collection::vec(1usize..4, 1..4).prop_flat_map(|s| {
            let r = s.len();
            (Just(s), 0..r)
        })
    }

    /// A torch-style index for `shape`/`axis`: off-axis sizes <= shape's, values < shape[axis].
    fn index_for(shape: Vec<usize>, axis: usize) -> impl Strategy<Value = ArrayD<usize>> {
        let n = shape[axis];
        let dims: Vec<BoxedStrategy<usize>> = shape
            .iter()
            .enumerate()
            .map(|(d, &s)| if d == axis { (1usize..5).boxed() } else { (1..=s).boxed() })
            .collect();
        dims.prop_flat_map(move |ishape| {
            let len: usize = ishape.iter().product();
            prop::collection::vec(0..n, len)
                .prop_map(move |v| ArrayD::from_shape_vec(IxDyn(&ishape), v).expect("index shape"))
        })
    }

    fn x_and_index() -> impl Strategy<Value = (ArrayD<f64>, usize, ArrayD<usize>)> {
        shape_axis().prop_flat_map(|(s, axis)| (array_strategy(s.clone(), -1.0, 1.0), Just(axis), index_for(s, axis)))
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config(24))]
        #[test]
        fn index_select_grad_matches_finite_differences(
            (x, axis, idx) in shape_axis().prop_flat_map(|(s, axis)| {
                let n = s[axis];
                (array_strategy(s, -1.0, 1.0), Just(axis), prop::collection::vec(0..n, 0..5))
            })
        ) {
            assert_grads(|t| Ok(t[0].index_select(axis, &idx)?.exp()), &[x]);
        }

        #[test]
        fn gather_grad_matches_finite_differences((x, axis, idx) in x_and_index()) {
            assert_grads(|t| Ok(t[0].gather(axis, &idx)?.exp()), &[x]);
        }

        #[test]
        fn scatter_add_grad_matches_finite_differences(
            ((x, axis, idx), src) in (x_and_index(), 0usize..2).prop_flat_map(|((x, axis, idx), extra)| {
                // src may be larger than index on every axis
                let s: Vec<usize> = idx.shape().iter().map(|&d| d + extra).collect();
                (Just((x, axis, idx)), array_strategy(s, -1.0, 1.0))
            })
        ) {
            assert_grads(|t| Ok(t[0].scatter_add(axis, &idx, &t[1])?.exp()), &[x, src]);
        }

        #[test]
        fn masked_fill_grad_matches_finite_differences(
            (x, mask) in prop::collection::vec(1usize..4, 1..4).prop_flat_map(|s| {
                // mask of the same rank with some axes collapsed to 1 (broadcast)
                let ms: Vec<BoxedStrategy<usize>> = s.iter().map(|&d| prop_oneof![Just(1usize), Just(d)].boxed()).collect();
                (array_strategy(s, -1.0, 1.0), ms.prop_flat_map(|ms| {
                    let n: usize = ms.iter().product();
                    prop::collection::vec(any::<bool>(), n)
                        .prop_map(move |v| ArrayD::from_shape_vec(IxDyn(&ms), v).expect("mask"))
                }))
            })
        ) {
            assert_grads(|t| Ok(t[0].masked_fill(&mask, 0.5)?.exp()), &[x]);
        }

        #[test]
        fn embedding_grad_matches_finite_differences(
            (w, ids, b) in (1usize..5, 1usize..4, 1usize..3).prop_flat_map(|(v, d, b)| {
                (array_strategy(vec![v, d], -1.0, 1.0), prop::collection::vec(0..v, b * 3), Just(b))
            })
        ) {
            assert_grads(|t| Ok(t[0].embedding(&ids, &[b, 3])?.exp()), &[w]);
        }
    }

    #[test]
    fn index_select_picks_and_accumulates_repeats() {
        let x = Tensor::<f64>::var(arr2(&[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).into_dyn());
        let y = x.index_select(1, &[2, 0, 2]).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.to_vec(), vec![3.0, 1.0, 3.0, 6.0, 4.0, 6.0]);
        let g = y.sum_all().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[1.0, 0.0, 2.0, 1.0, 0.0, 2.0]);
    }

    #[test]
    fn gather_matches_torch_example() {
        // torch.gather(torch.tensor([[1, 2], [3, 4]]), 1, torch.tensor([[0, 0], [1, 0]])) == [[1, 1], [4, 3]]
        let x = Tensor::<f64>::new(arr2(&[[1.0, 2.0], [3.0, 4.0]]).into_dyn());
        let idx = arr2(&[[0usize, 0], [1, 0]]).into_dyn();
        assert_eq!(x.gather(1, &idx).unwrap().to_vec(), vec![1.0, 1.0, 4.0, 3.0]);
        // a smaller index along the non-gathered axis
        let idx = arr2(&[[1usize], [0]]).into_dyn();
        assert_eq!(x.gather(1, &idx).unwrap().to_vec(), vec![2.0, 3.0]);
    }

    #[test]
    fn scatter_add_matches_torch_example() {
        // torch.zeros(3, 5).scatter_add(0, idx, torch.ones(2, 5))
        let x = Tensor::<f64>::zeros(&[3, 5]);
        let src = Tensor::<f64>::ones(&[2, 5]);
        let idx = arr2(&[[0usize, 1, 2, 0, 0], [2, 0, 0, 1, 2]]).into_dyn();
        let y = x.scatter_add(0, &idx, &src).unwrap();
        let want = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        assert_eq!(y.to_vec(), want);
        // repeated targets accumulate
        let idx = arr2(&[[1usize, 1]]).into_dyn();
        let y = Tensor::<f64>::zeros(&[1, 3]).scatter_add(1, &idx, &Tensor::ones(&[1, 2])).unwrap();
        assert_eq!(y.to_vec(), vec![0.0, 2.0, 0.0]);
    }

    #[test]
    fn masked_fill_fills_broadcast_mask_and_zeroes_grad() {
        let x = Tensor::<f64>::var(arr2(&[[1.0, 2.0], [3.0, 4.0]]).into_dyn());
        let mask = ndarray::arr1(&[false, true]).into_dyn();
        let y = x.masked_fill(&mask, -9.0).unwrap();
        assert_eq!(y.to_vec(), vec![1.0, -9.0, 3.0, -9.0]);
        let g = y.sum_all().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn embedding_looks_up_rows_and_scatters_grads() {
        let w = Tensor::<f64>::var(arr2(&[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]).into_dyn());
        let y = w.embedding(&[2, 0, 2, 1], &[2, 2]).unwrap();
        assert_eq!(y.shape(), &[2, 2, 2]);
        assert_eq!(y.to_vec(), vec![4.0, 5.0, 0.0, 1.0, 4.0, 5.0, 2.0, 3.0]);
        let g = y.sum_all().backward().unwrap();
        assert_eq!(g.get(&w).unwrap().as_slice().unwrap(), &[1.0, 1.0, 1.0, 1.0, 2.0, 2.0]);
    }

    #[test]
    fn frozen_embedding_records_no_node() {
        let w = Tensor::<f32>::ones(&[4, 3]);
        assert!(!w.embedding(&[1, 2], &[2]).unwrap().tracks());
    }

    #[test]
    fn out_of_range_indices_are_typed_errors_naming_them() {
        let w = Tensor::<f32>::zeros(&[4, 3]);
        match w.embedding(&[1, 7, 2], &[3]) {
            Err(Error::Index { op: "embedding", index: 7, position, axis: 0, size: 4 }) => assert_eq!(position, [1]),
            other => panic!("expected Index, got {other:?}"),
        }
        assert!(matches!(w.index_select(0, &[0, 4]), Err(Error::Index { op: "index_select", index: 4, .. })));
        assert!(matches!(w.index_select(2, &[0]), Err(Error::Axis { .. })));
        let idx = arr2(&[[0usize, 3]]).into_dyn();
        match w.gather(1, &idx) {
            Err(Error::Index { op: "gather", index: 3, position, axis: 1, .. }) => assert_eq!(position, [0, 1]),
            other => panic!("expected Index, got {other:?}"),
        }
        let src = Tensor::<f32>::ones(&[1, 2]);
        assert!(matches!(w.scatter_add(1, &idx, &src), Err(Error::Index { op: "scatter_add", .. })));
    }

    #[test]
    fn misshapen_arguments_are_shape_errors() {
        let w = Tensor::<f32>::zeros(&[4, 3]);
        assert!(matches!(w.embedding(&[1, 2, 3], &[2, 2]), Err(Error::Shape { .. })));
        assert!(matches!(Tensor::<f32>::zeros(&[4]).embedding(&[1], &[1]), Err(Error::Shape { .. })));
        // index larger than data along a non-gathered axis
        let idx = ArrayD::<usize>::zeros(IxDyn(&[5, 1]));
        assert!(matches!(w.gather(1, &idx), Err(Error::Shape { .. })));
        // index of the wrong rank
        assert!(matches!(w.gather(0, &ArrayD::zeros(IxDyn(&[2]))), Err(Error::Shape { .. })));
        // src smaller than index
        let idx = ArrayD::<usize>::zeros(IxDyn(&[2, 2]));
        assert!(matches!(w.scatter_add(0, &idx, &Tensor::ones(&[1, 2])), Err(Error::Shape { .. })));
        let mask = ArrayD::from_elem(IxDyn(&[2]), true);
        assert!(matches!(w.masked_fill(&mask, 0.0), Err(Error::Shape { .. })));
    }
}
