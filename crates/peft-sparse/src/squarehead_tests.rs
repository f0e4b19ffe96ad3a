use ndarray::{ArrayD, IxDyn};
use peft_core::nn::{named_params, Ctx};
use peft_core::testing::{array_strategy, assert_grads};
use peft_core::{no_grad, AdamW, Optimizer, Tensor};
use proptest::prelude::*;

use super::*;
use crate::testutil::{input, Tiny};

fn arr(shape: &[usize], seed: u64, scale: f64) -> ArrayD<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    ArrayD::from_shape_fn(IxDyn(shape), |_| rng.gen_range(-scale..scale))
}

fn t64(a: &ArrayD<f64>) -> Tensor<f64> {
    Tensor::new(a.clone())
}

#[test]
fn layer_mse_matches_a_hand_computation_over_real_tokens_only() {
    // [batch 1, seq 2, hidden 2]; the second token is padding and is ignored even though it differs.
    let s = Tensor::<f64>::from_vec(vec![1.0, 2.0, 100.0, -50.0], &[1, 2, 2]).unwrap();
    let t = Tensor::<f64>::from_vec(vec![0.0, 4.0, 0.0, 0.0], &[1, 2, 2]).unwrap();
    let mask = ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![true, false]).unwrap();
    let got = normalized_layer_mse(&s, &t, Some(&mask), 0.5).unwrap().item().unwrap();
    // mean((s - t)^2) = (1 + 4) / 2; mean(t^2) = 16 / 2 = 8.
    assert!((got - 2.5 / 8.5).abs() < 1e-12, "{got}");
    // Without a mask the padding token counts.
    let all = normalized_layer_mse(&s, &t, None, 0.5).unwrap().item().unwrap();
    let want = ((1.0 + 4.0 + 10000.0 + 2500.0) / 4.0) / (16.0 / 4.0 + 0.5);
    assert!((all - want).abs() < 1e-9, "{all} vs {want}");
}

#[test]
fn loss_is_zero_when_student_equals_teacher() {
    let hs: Vec<Tensor<f64>> = (0..4).map(|i| t64(&arr(&[2, 3, 5], i, 2.0))).collect();
    let mask = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![true, true, false, true, false, false]).unwrap();
    assert_eq!(squarehead_loss(&hs, &hs, Some(&mask), BF16_EPS).unwrap().item().unwrap(), 0.0);
    assert_eq!(squarehead_loss(&hs, &hs, None, BF16_EPS).unwrap().item().unwrap(), 0.0);
}

#[test]
fn embedding_output_is_skipped_and_layers_sum() {
    let s: Vec<Tensor<f64>> = (0..3).map(|i| t64(&arr(&[2, 4], i, 1.0))).collect();
    let mut t: Vec<Tensor<f64>> = (10..13).map(|i| t64(&arr(&[2, 4], i, 1.0))).collect();
    let total = squarehead_loss(&s, &t, None, BF16_EPS).unwrap().item().unwrap();
    let l1 = normalized_layer_mse(&s[1], &t[1], None, BF16_EPS).unwrap().item().unwrap();
    let l2 = normalized_layer_mse(&s[2], &t[2], None, BF16_EPS).unwrap().item().unwrap();
    assert!((total - (l1 + l2)).abs() < 1e-12);
    // Changing only index 0 (the embedding output) changes nothing.
    t[0] = t64(&arr(&[2, 4], 99, 5.0));
    assert_eq!(squarehead_loss(&s, &t, None, BF16_EPS).unwrap().item().unwrap(), total);
}

#[test]
fn typed_errors_for_bad_shapes_lengths_and_eps() {
    let a = t64(&arr(&[2, 3], 0, 1.0));
    let b = t64(&arr(&[3, 2], 1, 1.0));
    assert!(matches!(normalized_layer_mse(&a, &b, None, BF16_EPS), Err(SparseError::ShapeMismatch { .. })));
    let bad_mask = ArrayD::from_elem(IxDyn(&[3]), true);
    assert!(matches!(normalized_layer_mse(&a, &a, Some(&bad_mask), BF16_EPS), Err(SparseError::ShapeMismatch { .. })));
    assert!(matches!(normalized_layer_mse(&a, &a, None, -1.0), Err(SparseError::Config { field: "eps", .. })));
    assert!(matches!(normalized_layer_mse(&a, &a, None, f64::NAN), Err(SparseError::Config { field: "eps", .. })));
    assert!(matches!(
        squarehead_loss(&[a.clone(), a.clone()], std::slice::from_ref(&a), None, BF16_EPS),
        Err(SparseError::LengthMismatch { .. })
    ));
}

#[test]
fn all_padding_gives_zero_loss() {
    let s = t64(&arr(&[1, 2, 3], 0, 1.0));
    let t = t64(&arr(&[1, 2, 3], 1, 1.0));
    let mask = ArrayD::from_elem(IxDyn(&[1, 2]), false);
    assert_eq!(normalized_layer_mse(&s, &t, Some(&mask), BF16_EPS).unwrap().item().unwrap(), 0.0);
}

#[test]
fn gradient_matches_finite_differences_with_and_without_mask() {
    let teacher = t64(&arr(&[2, 3, 4], 7, 1.5));
    let mask = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![true, false, true, true, true, false]).unwrap();
    let s = arr(&[2, 3, 4], 8, 1.5);
    assert_grads(|x| Ok(normalized_layer_mse(&x[0], &teacher, Some(&mask), BF16_EPS)?), std::slice::from_ref(&s));
    assert_grads(|x| Ok(normalized_layer_mse(&x[0], &teacher, None, BF16_EPS)?), &[s]);
    // Through the layer sum: two layers as two inputs (index 0 is a constant embedding output).
    let t: Vec<Tensor<f64>> = (0..3).map(|i| t64(&arr(&[2, 3, 4], 20 + i, 1.0))).collect();
    let emb = t64(&arr(&[2, 3, 4], 30, 1.0));
    assert_grads(
        |x| Ok(squarehead_loss(&[emb.clone(), x[0].clone(), x[1].clone()], &t, Some(&mask), BF16_EPS)?),
        &[arr(&[2, 3, 4], 40, 1.0), arr(&[2, 3, 4], 41, 1.0)],
    );
}

#[test]
fn the_teacher_gets_no_gradient() {
    let s = Tensor::<f64>::var(arr(&[2, 3], 0, 1.0));
    let t = Tensor::<f64>::var(arr(&[2, 3], 1, 1.0));
    let grads = normalized_layer_mse(&s, &t, None, BF16_EPS).unwrap().backward().unwrap();
    assert!(grads.get(&s).is_some());
    assert!(grads.get(&t).is_none());
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(24))]

    /// Multiplying every hidden state (student and teacher) by `c` changes each layer's term from
    /// `num / (den + ε)` to `num / (den + ε / c²)`: exactly invariant for ε = 0, and within the ε-shift otherwise.
    #[test]
    fn loss_is_scale_invariant(
        s in array_strategy(vec![3, 2, 4], -2.0, 2.0),
        t in array_strategy(vec![3, 2, 4], -2.0, 2.0),
        c in prop_oneof![0.01f64..0.5, 2.0f64..100.0],
    ) {
        let scaled = |a: &ArrayD<f64>| t64(&a.mapv(|v| v * c));
        let mask = ArrayD::from_shape_vec(IxDyn(&[3, 2]), vec![true, true, false, true, true, true]).unwrap();
        let (ts, tt) = (t64(&s), t64(&t));
        let base = normalized_layer_mse(&ts, &tt, Some(&mask), 0.0).unwrap().item().unwrap();
        let got = normalized_layer_mse(&scaled(&s), &scaled(&t), Some(&mask), 0.0).unwrap().item().unwrap();
        prop_assert!((got - base).abs() <= 1e-10 * base.max(1.0), "{base} vs {got}");
        // With ε: the exact closed form of the shift.
        let den: f64 = {
            let kept: Vec<usize> = mask.iter().enumerate().filter(|(_, &k)| k).map(|(i, _)| i).collect();
            let tv = t.as_slice().unwrap();
            kept.iter().flat_map(|&i| tv[i * 4..i * 4 + 4].iter()).map(|v| v * v).sum::<f64>() / (kept.len() * 4) as f64
        };
        let with_eps = normalized_layer_mse(&scaled(&s), &scaled(&t), Some(&mask), BF16_EPS).unwrap().item().unwrap();
        let want = base * den / (den + BF16_EPS / (c * c));
        prop_assert!((with_eps - want).abs() <= 1e-10 * want.max(1.0), "{with_eps} vs {want}");
    }

    /// The magnitude mask keeps exactly `n - round(s n)` entries, all at least as large as every pruned one, and
    /// never revives a pruned entry.
    #[test]
    fn magnitude_mask_prunes_the_smallest_and_only_shrinks(
        v in proptest::collection::vec(-1.0f32..1.0, 1..60),
        first in 0.0f64..1.0,
        extra in 0.0f64..1.0,
    ) {
        let n = v.len();
        let m0 = vec![true; n];
        let m1 = magnitude_masks(&[&v], &[m0], first, PruneScope::PerMatrix).unwrap().remove(0);
        prop_assert_eq!(m1.iter().filter(|&&k| !k).count(), pruned_count(n, first));
        let kept_min = v.iter().zip(&m1).filter(|(_, &k)| k).map(|(w, _)| w.abs()).fold(f32::INFINITY, f32::min);
        let pruned_max = v.iter().zip(&m1).filter(|(_, &k)| !k).map(|(w, _)| w.abs()).fold(0.0, f32::max);
        prop_assert!(pruned_max <= kept_min);
        let second = first + (1.0 - first) * extra;
        let m2 = magnitude_masks(&[&v], std::slice::from_ref(&m1), second, PruneScope::PerMatrix).unwrap().remove(0);
        prop_assert!(m1.iter().zip(&m2).all(|(a, b)| *a || !*b), "a pruned entry came back");
        prop_assert_eq!(m2.iter().filter(|&&k| !k).count(), pruned_count(n, second).max(pruned_count(n, first)));
    }

    /// The cubic schedule is non-decreasing, starts at `s_i` and hits `s_f` exactly at `T`.
    #[test]
    fn cubic_schedule_is_monotone_and_hits_the_target(
        total in 0usize..200,
        si in 0.0f64..0.5,
        sf in 0.5f64..1.0,
    ) {
        prop_assert_eq!(cubic_sparsity(total, total, si, sf), sf);
        prop_assert_eq!(cubic_sparsity(total + 5, total, si, sf), sf);
        if total > 0 {
            prop_assert_eq!(cubic_sparsity(0, total, si, sf), si);
        }
        let mut prev = -1.0;
        for t in 0..=total {
            let s = cubic_sparsity(t, total, si, sf);
            prop_assert!(s >= prev && (si..=sf).contains(&s), "t={} s={} prev={}", t, s, prev);
            prev = s;
        }
    }
}

#[test]
fn cubic_schedule_values() {
    // s_f + (s_i - s_f)(1 - t/T)^3 at T = 4: t = 2 gives 0.9 - 0.9 / 8.
    assert!((cubic_sparsity(2, 4, 0.0, 0.9) - (0.9 - 0.9 / 8.0)).abs() < 1e-15);
    assert_eq!(cubic_sparsity(0, 0, 0.1, 0.9), 0.9);
}

#[test]
fn ties_are_broken_by_position() {
    // Six equal magnitudes: the first three positions are pruned, in both scopes.
    let v = [0.5f32, -0.5, 0.5, 0.5, -0.5, 0.5];
    let m = magnitude_masks(&[&v], &[vec![true; 6]], 0.5, PruneScope::PerMatrix).unwrap();
    assert_eq!(m[0], vec![false, false, false, true, true, true]);
    let g = magnitude_masks(&[&v[..3], &v[3..]], &[vec![true; 3], vec![true; 3]], 0.5, PruneScope::Global).unwrap();
    assert_eq!(g, vec![vec![false; 3], vec![true; 3]]);
}

#[test]
fn global_scope_ranks_across_matrices() {
    let small = [0.01f32, 0.02, 0.03, 0.04];
    let large = [1.0f32, 2.0, 3.0, 4.0];
    let masks = [vec![true; 4], vec![true; 4]];
    let g = magnitude_masks(&[&small, &large], &masks, 0.5, PruneScope::Global).unwrap();
    assert_eq!(g, vec![vec![false; 4], vec![true; 4]]);
    let p = magnitude_masks(&[&small, &large], &masks, 0.5, PruneScope::PerMatrix).unwrap();
    assert_eq!(p, vec![vec![false, false, true, true], vec![false, false, true, true]]);
}

#[test]
fn magnitude_mask_errors_are_typed() {
    let v = [1.0f32, 2.0];
    assert!(matches!(
        magnitude_masks(&[&v], &[vec![true]], 0.5, PruneScope::Global),
        Err(SparseError::LengthMismatch { .. })
    ));
    assert!(matches!(magnitude_masks(&[&v], &[], 0.5, PruneScope::Global), Err(SparseError::LengthMismatch { .. })));
    assert!(matches!(
        magnitude_masks(&[&v], &[vec![true; 2]], 1.5, PruneScope::Global),
        Err(SparseError::Config { .. })
    ));
}

#[test]
fn schedule_pruning_steps_and_validation() {
    let s = GmpSchedule::new(0.0, 0.9, 10, 20, 3).unwrap();
    let steps: Vec<usize> = (0..30).filter(|&t| s.target_at(t).is_some()).collect();
    assert_eq!(steps, vec![10, 13, 16, 19, 20]);
    assert_eq!(s.target_at(10), Some(0.0));
    assert_eq!(s.target_at(20), Some(0.9));
    assert!(matches!(GmpSchedule::new(0.5, 0.4, 0, 1, 1), Err(SparseError::Config { field: "final_sparsity", .. })));
    assert!(matches!(GmpSchedule::new(-0.1, 0.4, 0, 1, 1), Err(SparseError::Config { field: "initial_sparsity", .. })));
    assert!(matches!(GmpSchedule::new(0.0, 0.4, 5, 1, 1), Err(SparseError::Config { field: "end_step", .. })));
    assert!(matches!(GmpSchedule::new(0.0, 0.4, 0, 1, 0), Err(SparseError::Config { field: "every", .. })));
}

/// Trains the tiny model with AdamW (which moves every entry) under GMP; after each step the zero pattern is
/// exactly the mask, masks only shrink, and after the schedule ends the pattern is frozen for k more steps.
fn train_and_check(final_sparsity: f64, scope: PruneScope) {
    let model = Tiny::new(8, 2, 3);
    let params = select_params(&model, r"encoder\.layer\.\d+\..*\.weight").unwrap();
    assert_eq!(params.len(), 6);
    for p in named_params(&model) {
        p.set_trainable(true);
    }
    let schedule = GmpSchedule::new(0.0, final_sparsity, 0, 6, 2).unwrap();
    let mut pruner = GmpPruner::new(params.clone(), schedule, scope).unwrap();
    assert_eq!(pruner.sparsity(), 0.0);
    let mut opt = AdamW::with_lr(named_params(&model), 5e-2, 0.01).unwrap();
    let x = input(4, 8, 9);
    let mut prev = pruner.masks().to_vec();
    let mut frozen: Option<Vec<Vec<bool>>> = None;
    let (mut revived, mut kept_moved, mut last) = (0usize, false, None::<Vec<Vec<f32>>>);
    for step in 0..12 {
        let loss = model.forward(&x, &Ctx::train(0)).unwrap().square().mean_all();
        opt.step(&loss.backward().unwrap()).unwrap();
        // The optimizer moves masked-out entries off zero; the hook must put them back.
        for (p, m) in params.iter().zip(pruner.masks()) {
            revived += p.value().iter().zip(m).filter(|(w, keep)| !**keep && **w != 0.0).count();
        }
        let before: Vec<Vec<f32>> = params.iter().map(|p| p.value().iter().copied().collect()).collect();
        if let Some(l) = &last {
            kept_moved |= before.iter().zip(l).any(|(a, b)| a.iter().zip(b).any(|(x, y)| *x != 0.0 && x != y));
        }
        pruner.after_step(step).unwrap();
        // Kept entries are left as the optimizer set them; pruned ones are zero.
        for ((p, b), m) in params.iter().zip(&before).zip(pruner.masks()) {
            for ((w, wb), keep) in p.value().iter().zip(b).zip(m) {
                assert!(if *keep { w == wb } else { *w == 0.0 });
            }
        }
        last = Some(params.iter().map(|p| p.value().iter().copied().collect::<Vec<f32>>()).collect::<Vec<_>>());
        let masks = pruner.masks().to_vec();
        for (p, m) in params.iter().zip(&masks) {
            let zeros: Vec<bool> = p.value().iter().map(|&w| w != 0.0).collect();
            assert_eq!(&zeros, m, "step {step}: the zero pattern of {} is not the mask", p.name());
        }
        for (a, b) in prev.iter().zip(&masks) {
            assert!(a.iter().zip(b).all(|(x, y)| *x || !*y), "step {step}: a mask grew");
        }
        if step >= 6 {
            match &frozen {
                None => frozen = Some(masks.clone()),
                Some(f) => assert_eq!(f, &masks, "step {step}: the pattern changed after the schedule ended"),
            }
        }
        prev = masks;
    }
    let n: usize = params.iter().map(|p| p.numel()).sum();
    let zeros: usize = params.iter().map(|p| p.value().iter().filter(|&&w| w == 0.0).count()).sum();
    match scope {
        PruneScope::Global => assert_eq!(zeros, pruned_count(n, final_sparsity)),
        PruneScope::PerMatrix => {
            for p in &params {
                let z = p.value().iter().filter(|&&w| w == 0.0).count();
                assert_eq!(z, pruned_count(p.numel(), final_sparsity), "{}", p.name());
            }
        }
    }
    assert!(revived > 0, "the optimizer never touched a pruned entry: a missing re-mask would go unseen");
    assert!(kept_moved, "kept weights never trained");
}

#[test]
fn sparsity_pattern_is_preserved_through_training_at_50_75_90() {
    for s in [0.5, 0.75, 0.9] {
        train_and_check(s, PruneScope::PerMatrix);
        train_and_check(s, PruneScope::Global);
    }
}

#[test]
fn pruner_records_existing_zeros_as_pruned() {
    let model = Tiny::new(4, 1, 0);
    let params = select_params(&model, r".*query\.weight").unwrap();
    params[0].update(|w| w.as_slice_mut().unwrap()[..4].fill(0.0));
    let pruner =
        GmpPruner::new(params.clone(), GmpSchedule::new(0.0, 0.5, 0, 0, 1).unwrap(), PruneScope::PerMatrix).unwrap();
    assert_eq!(pruner.sparsity(), 0.25);
    assert_eq!(&pruner.masks()[0][..5], &[false, false, false, false, true]);
    // A dense update to the zeros is undone by the mask.
    params[0].update(|w| w.fill(1.0));
    pruner.apply_masks();
    assert_eq!(params[0].value().iter().filter(|&&w| w == 0.0).count(), 4);
}

#[test]
fn select_params_errors() {
    let model = Tiny::new(4, 1, 0);
    assert!(matches!(select_params(&model, r"nothing"), Err(SparseError::Config { .. })));
    assert!(matches!(select_params(&model, r"("), Err(SparseError::Config { .. })));
    assert!(matches!(
        GmpPruner::new(vec![], GmpSchedule::new(0.0, 0.5, 0, 1, 1).unwrap(), PruneScope::Global),
        Err(SparseError::Config { .. })
    ));
}

#[test]
fn total_loss_weights_its_terms() {
    let ce = Tensor::scalar(0.7f32);
    let logits = Tensor::new(arr(&[2, 3], 0, 1.0).mapv(|v| v as f32));
    let other = Tensor::new(arr(&[2, 3], 1, 1.0).mapv(|v| v as f32));
    let hs: Vec<Tensor> = (0..3).map(|i| Tensor::new(arr(&[2, 4], i, 1.0).mapv(|v| v as f32))).collect();
    let ht: Vec<Tensor> = (5..8).map(|i| Tensor::new(arr(&[2, 4], i, 1.0).mapv(|v| v as f32))).collect();
    // Student == teacher: only the CE term remains.
    let d = SquareheadLoss { h_kl: 1.0, ..SquareheadLoss::default() };
    let same = d.total(&ce, &logits, &logits, &hs, &hs, None).unwrap().item().unwrap();
    assert!((same - 0.7).abs() < 1e-6, "{same}");
    let w = SquareheadLoss { h_ce: 2.0, h_kl: 0.5, h_sq: 3.0, temperature: 2.0, eps: BF16_EPS };
    let got = w.total(&ce, &logits, &other, &hs, &ht, None).unwrap().item().unwrap();
    let kl = distill_kl(&logits, &other, 2.0, 1.0).unwrap().item().unwrap();
    let sq = no_grad(|| squarehead_loss(&hs, &ht, None, BF16_EPS)).unwrap().item().unwrap();
    assert!((got - (1.4 + 0.5 * kl + 3.0 * sq)).abs() < 1e-5, "{got}");
    let bad = SquareheadLoss { h_sq: f64::INFINITY, ..SquareheadLoss::default() };
    assert!(matches!(bad.total(&ce, &logits, &other, &hs, &ht, None), Err(SparseError::Config { field: "h_sq", .. })));
}
