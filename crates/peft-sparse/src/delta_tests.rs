use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::PeftModel;
use peft_core::nn::Ctx;
use peft_core::testing::{array_strategy, assert_grads, max_abs_diff};
use peft_core::{Param, Tensor};
use proptest::prelude::*;

use crate::indices::{scatter_add_flat, SparseIndices};
use crate::testutil::{input, Tiny};
use crate::tuner::{decode_indices, encode_indices, F32_EXACT};
use crate::{SparseError, SparseFtConfig, SparseTuner};

/// A shape of rank 1..=3, and a sorted subset of its flat indices.
fn shape_and_subset() -> impl Strategy<Value = (Vec<usize>, Vec<u64>)> {
    prop::collection::vec(1usize..5, 1..4)
        .prop_flat_map(|s| {
            let n: usize = s.iter().product();
            (Just(s), prop::collection::btree_set(0..n as u64, 0..=n))
        })
        .prop_map(|(s, set)| (s, set.into_iter().collect()))
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(32))]
    #[test]
    fn scatter_add_flat_grads_match_finite_differences(
        ((shape, idx), seed) in (shape_and_subset(), 0u64..1000)
    ) {
        let n: usize = shape.iter().product();
        let k = idx.len();
        let si = Arc::new(SparseIndices::new("w", idx, n).unwrap());
        let base = ArrayD::from_shape_vec(IxDyn(&shape), (0..n).map(|i| ((i as u64 + seed) % 7) as f64 * 0.1 - 0.3).collect()).unwrap();
        let vals = ArrayD::from_shape_fn(IxDyn(&[k]), |d| (d[0] as f64 * 0.37 + seed as f64 * 0.01).sin());
        // Nonlinear in the output so every entry of the Jacobian is exercised.
        assert_grads(|t| Ok(scatter_add_flat(&t[0], &si, &t[1], None).map_err(|e| match e {
            SparseError::Core(c) => c,
            other => panic!("{other}"),
        })?.tanh()), &[base, vals]);
    }

    #[test]
    fn scatter_add_flat_equals_dense_sum((shape, idx) in shape_and_subset(), v in array_strategy(vec![32], -1.0, 1.0)) {
        let n: usize = shape.iter().product();
        let k = idx.len();
        let si = Arc::new(SparseIndices::new("w", idx.clone(), n).unwrap());
        let base = Tensor::<f64>::ones(&shape);
        let vals = Tensor::new(ArrayD::from_shape_vec(IxDyn(&[k]), v.iter().take(k).copied().chain(std::iter::repeat(0.5)).take(k).collect()).unwrap());
        let out = scatter_add_flat(&base, &si, &vals, None).unwrap().to_vec();
        let mut want = vec![1.0; n];
        for (j, &i) in idx.iter().enumerate() {
            want[i as usize] += vals.as_slice()[j];
        }
        prop_assert_eq!(out, want);
    }
}

#[test]
fn indices_reject_unsorted_duplicate_and_out_of_range() {
    assert!(matches!(SparseIndices::new("w", vec![3, 1], 10), Err(SparseError::Unsorted { position: 1, .. })));
    assert!(matches!(
        SparseIndices::new("w", vec![1, 1], 10),
        Err(SparseError::Unsorted { index: 1, previous: 1, .. })
    ));
    assert!(matches!(
        SparseIndices::new("w", vec![1, 10], 10),
        Err(SparseError::IndexOutOfRange { index: 10, numel: 10, .. })
    ));
    let ok = SparseIndices::new("w", vec![0, 4, 9], 10).unwrap();
    assert!(matches!(ok, SparseIndices::U32(_)));
    assert_eq!(ok.bytes(), 12);
    assert_eq!(ok.position(4), Some(1));
    assert_eq!(ok.position(5), None);
    let wide = SparseIndices::new("w", vec![0, 1 << 33], (1usize << 33) + 1).unwrap();
    assert!(matches!(wide, SparseIndices::U64(_)));
    assert_eq!(wide.bytes(), 16);
}

#[test]
fn delta_rejects_length_mismatch() {
    let p = Param::new("w", ArrayD::<f32>::zeros(IxDyn(&[2, 3])), false);
    let idx = SparseIndices::new("w", vec![0, 5], 6).unwrap();
    let e = crate::SparseDelta::new("a", "sparse-ft", &p, idx, vec![1.0]).unwrap_err();
    assert!(matches!(e, SparseError::LengthMismatch { indices: 2, values: 1, .. }));
}

#[test]
fn index_encoding_round_trips_narrow_and_wide() {
    let narrow = SparseIndices::new("w", vec![0, 7, F32_EXACT as u64 - 1], F32_EXACT).unwrap();
    let enc = encode_indices(&narrow, F32_EXACT);
    assert_eq!(enc.shape(), &[3]);
    assert_eq!(decode_indices("w", &enc, F32_EXACT).unwrap(), narrow);
    let big = (1usize << 34) + 5;
    let wide = SparseIndices::new("w", vec![3, (1 << 34) + 4], big).unwrap();
    let enc = encode_indices(&wide, big);
    assert_eq!(enc.shape(), &[2, 2]);
    assert_eq!(decode_indices("w", &enc, big).unwrap(), wide);
}

#[test]
fn decoding_rejects_corrupt_indices_with_typed_errors() {
    let arr = |v: Vec<f32>| ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).unwrap();
    assert!(matches!(decode_indices("w", &arr(vec![1.5]), 10), Err(SparseError::BadIndexValue { position: 0, .. })));
    assert!(matches!(decode_indices("w", &arr(vec![-1.0]), 10), Err(SparseError::BadIndexValue { .. })));
    assert!(matches!(decode_indices("w", &arr(vec![f32::NAN]), 10), Err(SparseError::BadIndexValue { .. })));
    assert!(matches!(decode_indices("w", &arr(vec![2.0, 2.0]), 10), Err(SparseError::Unsorted { .. })));
    assert!(matches!(decode_indices("w", &arr(vec![4.0, 2.0]), 10), Err(SparseError::Unsorted { .. })));
    assert!(matches!(decode_indices("w", &arr(vec![2.0, 10.0]), 10), Err(SparseError::IndexOutOfRange { .. })));
}

fn tiny_model(density: f64) -> PeftModel<Tiny> {
    PeftModel::new(Tiny::new(8, 2, 1), SparseFtConfig::new(r".*encoder\.layer\.\d+\..*\.weight", density), "default", 3)
        .unwrap()
}

fn tuner(m: &PeftModel<Tiny>) -> &SparseTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<SparseTuner>().unwrap()
}

/// Gives every delta deterministic non-zero values.
fn fill_values(m: &PeftModel<Tiny>) {
    for (j, (_, d)) in tuner(m).entries().iter().enumerate() {
        let k = d.k();
        let v = ArrayD::from_shape_fn(IxDyn(&[k]), |i| ((i[0] + 3 * j) as f32 * 0.71).sin() * 0.2);
        d.values().set(v).unwrap();
    }
}

#[test]
fn zero_delta_is_identity() {
    let x = input(5, 8, 9);
    let y0 = Tiny::new(8, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    let m = tiny_model(0.25);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    assert!(max_abs_diff(y.as_slice(), y0.as_slice()) <= 1e-6);
    // 6 targets of 64 entries at 25%: k = 16 each.
    assert_eq!(tuner(&m).trainable_entries(), 96);
}

#[test]
fn merge_equals_unmerged_forward_and_unmerge_restores_exact_bits() {
    let mut m = tiny_model(0.25);
    fill_values(&m);
    let x = input(5, 8, 9);
    let before: Vec<Vec<f32>> = m.base_params().iter().map(|p| p.value().iter().copied().collect()).collect();
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    m.merge_adapter().unwrap();
    let ym = m.forward(&x, &Ctx::eval()).unwrap();
    assert!(max_abs_diff(y.as_slice(), ym.as_slice()) <= 1e-5);
    // Merged weights differ from the base exactly at the indices.
    for (p, d) in tuner(&m).entries() {
        let orig = &before[m.base_params().iter().position(|q| q.name() == p.name()).unwrap()];
        let idx = d.indices();
        for (i, (a, b)) in p.value().iter().zip(orig).enumerate() {
            if idx.position(i).is_none() {
                assert_eq!(a.to_bits(), b.to_bits());
            }
        }
    }
    m.unmerge_adapter().unwrap();
    let after: Vec<Vec<f32>> = m.base_params().iter().map(|p| p.value().iter().copied().collect()).collect();
    for (a, b) in after.iter().zip(&before) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    let yu = m.forward(&x, &Ctx::eval()).unwrap();
    assert_eq!(yu.to_vec(), y.to_vec());
}

#[test]
fn values_gradient_is_the_dense_gradient_gathered() {
    let m = tiny_model(0.25);
    fill_values(&m);
    let x = input(4, 8, 2);
    let loss = m.forward(&x, &Ctx::eval()).unwrap().square().sum_all();
    let g = loss.backward().unwrap();
    // The same loss with the dense effective weight as the variable.
    let t = tuner(&m);
    let (p, d) = &t.entries()[0];
    let w_eff = ndarray::ArrayD::from_shape_vec(IxDyn(&p.shape()), {
        let mut w: Vec<f32> = p.value().iter().copied().collect();
        for (i, v) in d.indices().iter().zip(d.values().value().iter()) {
            w[i] += v;
        }
        w
    })
    .unwrap();
    let dense = Param::new("probe", w_eff, true);
    // Swap the first target's delta out and feed the dense weight in its place.
    p.activate_delta("default", false);
    let saved = p.value().to_owned();
    p.set(dense.value().to_owned()).unwrap();
    p.set_trainable(true);
    let loss2 = m.forward(&x, &Ctx::eval()).unwrap().square().sum_all();
    let g2 = loss2.backward().unwrap();
    let gd = g2.get_id(p.id()).unwrap();
    let gv = g.get_id(d.values().id()).unwrap();
    let want: Vec<f32> = d.indices().iter().map(|i| gd.as_slice().unwrap()[i]).collect();
    assert!(max_abs_diff(gv.as_slice().unwrap(), &want) <= 1e-5);
    p.set_trainable(false);
    p.set(saved).unwrap();
}
