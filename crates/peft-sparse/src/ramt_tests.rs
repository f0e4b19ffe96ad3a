use ndarray::{ArrayD, Dimension, IxDyn};
use peft_core::adapter::{AdapterError, PeftModel};
use peft_core::nn::Ctx;
use peft_core::testing::{array_strategy, max_abs_diff};
use peft_core::train::{Loss, Trainer, TrainerConfig};
use proptest::prelude::*;

use super::*;
use crate::registry;
use crate::testutil::{input, Tiny};

const TARGET: &str = r".*encoder\.layer\.\d+\..*\.weight";
const D: usize = 8;

fn model(c: RamtConfig) -> PeftModel<Tiny> {
    PeftModel::new(Tiny::new(D, 2, 1), c, "default", 3).unwrap()
}

fn ramt(m: &PeftModel<Tiny>) -> &RamtTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<RamtTuner>().unwrap()
}

fn base_bits(m: &PeftModel<Tiny>) -> Vec<Vec<u32>> {
    m.base_params().iter().map(|p| p.value().iter().map(|x| x.to_bits()).collect()).collect()
}

fn train(m: &PeftModel<Tiny>, steps: usize) {
    let x = input(6, D, 4);
    let cfg = TrainerConfig { lr: 3e-3, total_steps: steps, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), m, cfg).unwrap();
    for _ in 0..steps {
        t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap();
    }
}

#[test]
fn identity_at_init() {
    let x = input(5, D, 9);
    let y0 = Tiny::new(D, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    let m = model(RamtConfig::new(TARGET));
    assert_eq!(ramt(&m).entries().len(), 6);
    assert_eq!(ramt(&m).sparsity(), 0.0);
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y0.to_vec());
    assert_eq!(m.forward(&x, &Ctx::train(1)).unwrap().to_vec(), y0.to_vec());
}

/// `Σ tanh(y) ⊙ r` for a fixed `r`: a nonlinear scalar so every entry of the Jacobian counts.
fn scalar_of(y: &Tensor<f64>) -> Tensor<f64> {
    let r = ArrayD::from_shape_fn(IxDyn(y.shape()), |i| 0.3 + 0.1 * (i.slice().iter().sum::<usize>() % 5) as f64);
    y.tanh().mul(&Tensor::new(r)).unwrap().sum_all()
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(32))]
    /// The straight-through op's gradients equal central finite differences of its surrogate
    /// `base ⊙ (hard(m₀) + (m − m₀))` at `m = m₀` (the threshold replaced by the identity).
    #[test]
    fn ste_grads_match_finite_differences_of_the_surrogate(
        base in array_strategy(vec![3, 4], -1.5, 1.5),
        m0 in array_strategy(vec![3, 4], -0.02, 0.02),
    ) {
        let thr = 5e-3;
        let hard = m0.mapv(|m| if m > thr { 1.0 } else { 0.0 });
        let (b, m) = (Tensor::var(base.clone()), Tensor::var(m0.clone()));
        let g = scalar_of(&ste_mask(&b, &m, thr).unwrap()).backward().unwrap();
        let (gb, gm) = (g.get(&b).unwrap().clone(), g.get(&m).unwrap().clone());
        let surrogate = |bv: &ArrayD<f64>, mv: &ArrayD<f64>| -> f64 {
            let eff = bv * &(&hard + &(mv - &m0));
            no_grad(|| scalar_of(&Tensor::new(eff)).item().unwrap())
        };
        let eps = 1e-6;
        for j in 0..base.len() {
            let mut p = base.clone();
            let mut q = base.clone();
            p.as_slice_mut().unwrap()[j] += eps;
            q.as_slice_mut().unwrap()[j] -= eps;
            let num = (surrogate(&p, &m0) - surrogate(&q, &m0)) / (2.0 * eps);
            prop_assert!((num - gb.as_slice().unwrap()[j]).abs() <= 1e-6 + 1e-5 * num.abs(), "base {j}");
            let mut p = m0.clone();
            let mut q = m0.clone();
            p.as_slice_mut().unwrap()[j] += eps;
            q.as_slice_mut().unwrap()[j] -= eps;
            let num = (surrogate(&base, &p) - surrogate(&base, &q)) / (2.0 * eps);
            prop_assert!((num - gm.as_slice().unwrap()[j]).abs() <= 1e-6 + 1e-5 * num.abs(), "mask {j}");
        }
    }

    /// The STE gradient of `M_real` is the gradient of a dense mask variable at `M = hard(M_real)`.
    #[test]
    fn ste_gradient_equals_the_dense_mask_gradient(
        base in array_strategy(vec![2, 5], -1.0, 1.0),
        m0 in array_strategy(vec![2, 5], -0.02, 0.02),
    ) {
        let thr = 5e-3;
        let (b, m) = (Tensor::var(base.clone()), Tensor::var(m0.clone()));
        let gm = scalar_of(&ste_mask(&b, &m, thr).unwrap()).backward().unwrap().get(&m).unwrap().clone();
        let dense = Tensor::var(m0.mapv(|v| if v > thr { 1.0 } else { 0.0 }));
        let gd = scalar_of(&Tensor::new(base).mul(&dense).unwrap()).backward().unwrap().get(&dense).unwrap().clone();
        prop_assert_eq!(gm, gd);
    }

    #[test]
    fn gdr_keep_probability_closed_form(a in -3.0f32..3.0, b in -3.0f32..3.0) {
        let p = gdr_keep_probability(a, b);
        prop_assert!((0.0..=1.0).contains(&p));
        if a != 0.0 && (a > 0.0) == (b >= 0.0) {
            prop_assert!((p - 1.0).abs() <= 1e-5, "{p}");
        } else if a != 0.0 {
            prop_assert!((p - a.abs() / (a.abs() + b.abs())).abs() <= 1e-5, "{p}");
        }
    }
}

#[test]
fn gradient_dropout_keeps_or_drops_with_probability_p() {
    let mut rng = StdRng::seed_from_u64(1);
    let n = 20_000;
    let ga = ArrayD::from_elem(IxDyn(&[n]), 1.0f32);
    let gb = ArrayD::from_elem(IxDyn(&[n]), -3.0f32); // P = 1/4
    let g = gradient_dropout(&ga, &gb, 1.0, &mut rng).unwrap();
    assert!(g.iter().all(|&v| v == 0.0 || v == 1.0));
    let kept = g.iter().filter(|&&v| v == 1.0).count() as f64 / n as f64;
    assert!((kept - 0.25).abs() < 0.02, "{kept}");
    // λ = 0.5: dropped entries keep half their gradient.
    let g = gradient_dropout(&ga, &gb, 0.5, &mut rng).unwrap();
    assert!(g.iter().all(|&v| v == 0.5 || v == 1.0));
    // λ = 0: the task gradient unchanged; agreeing signs: always kept.
    assert_eq!(gradient_dropout(&ga, &gb, 0.0, &mut rng).unwrap(), ga);
    assert_eq!(gradient_dropout(&ga, &ga, 1.0, &mut rng).unwrap(), ga);
    let bad = gradient_dropout(&ga, &ArrayD::zeros(IxDyn(&[3])), 1.0, &mut rng).unwrap_err();
    assert!(matches!(bad, SparseError::ShapeMismatch { .. }));
}

#[test]
fn training_flips_masks_leaves_weights_frozen_and_merges_exactly() {
    let mut m = model(RamtConfig::new(TARGET));
    let before = base_bits(&m);
    train(&m, 8);
    assert_eq!(base_bits(&m), before);
    let s = ramt(&m).sparsity();
    assert!(s > 0.0 && s < 1.0, "{s}");
    let x = input(5, D, 2);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    // The forward is W ⊙ M exactly.
    for (p, d) in ramt(&m).entries() {
        let b = d.binary();
        let eff = ste_mask(&p.tensor(), &Tensor::new(d.m_real().value().to_owned()), 5e-3).unwrap();
        assert_eq!(eff.data().to_owned(), &p.value() * &b);
    }
    m.merge_adapter().unwrap();
    for (p, d) in ramt(&m).entries() {
        let b = d.binary();
        assert!(p.value().iter().zip(b.iter()).all(|(w, m)| *m == 1.0 || *w == 0.0));
    }
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
    let e = ramt(&m).teacher(|| Ok(())).unwrap_err();
    assert!(matches!(SparseError::of(&e), Some(SparseError::State { .. })), "{e:?}");
    m.unmerge_adapter().unwrap();
    assert_eq!(base_bits(&m), before);
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
}

#[test]
fn gdr_through_transform_grads_keeps_or_drops_each_mask_gradient() {
    let m = model(RamtConfig::new(TARGET));
    let t = ramt(&m);
    let x = input(6, D, 5);
    // Move the masks a little so the student differs from the zero-shot teacher.
    for (_, d) in t.entries() {
        let shape = d.m_real().shape();
        d.m_real()
            .set(ArrayD::from_shape_fn(IxDyn(&shape), |i| if (i[0] + i[1]) % 5 == 0 { 0.0 } else { 1e-2 }))
            .unwrap();
    }
    let teacher = t.teacher(|| m.forward(&x, &Ctx::eval())).unwrap();
    assert_eq!(teacher.to_vec(), Tiny::new(D, 2, 1).forward(&x, &Ctx::eval()).unwrap().to_vec());
    let student = m.forward(&x, &Ctx::eval()).unwrap();
    assert!(max_abs_diff(teacher.as_slice(), student.as_slice()) > 0.0);
    let kl = distill_kl(&student, &teacher, 1.0, 1.0).unwrap();
    assert!(kl.item().unwrap() > 0.0);
    let task = student.square().mean_all();
    let ga = task.backward().unwrap();
    let gb = kl.backward().unwrap();
    t.set_distill_loss(kl);
    let g = t.transform_grads(task.backward().unwrap()).unwrap();
    let (mut kept, mut dropped) = (0, 0);
    for (_, d) in t.entries() {
        let id = d.m_real().id();
        let (a, b, out) = (ga.get_id(id).unwrap(), gb.get_id(id).unwrap(), g.get_id(id).unwrap());
        for ((&a, &b), &o) in a.iter().zip(b.iter()).zip(out.iter()) {
            if gdr_keep_probability(a, b) >= 1.0 {
                assert_eq!(o, a);
            }
            if o == a && a != 0.0 {
                kept += 1;
            } else if o == 0.0 && a != 0.0 {
                dropped += 1;
            } else {
                assert_eq!(o, a);
            }
        }
    }
    assert!(kept > 0 && dropped > 0, "{kept} kept, {dropped} dropped");
    // Taken: the next transform_grads is plain STE.
    let g2 = t.transform_grads(task.backward().unwrap()).unwrap();
    let id = t.entries()[0].1.m_real().id();
    assert_eq!(g2.get_id(id), ga.get_id(id));
}

#[test]
fn distill_kl_matches_a_hand_computation_and_is_zero_for_equal_logits() {
    let s = Tensor::new(ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.1, 0.5, -0.2, 1.0, 0.0, 0.3]).unwrap());
    assert!(distill_kl(&s, &s, 2.0, 1.0).unwrap().item().unwrap().abs() < 1e-7);
    let t = Tensor::new(ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.4, -0.5, 0.2, 0.0, 1.0, 0.3]).unwrap());
    let kl = distill_kl(&s, &t, 1.0, 1.0).unwrap().item().unwrap();
    // Hand computation, row by row.
    let mut want = 0.0f64;
    for r in 0..2 {
        let sv: Vec<f64> = (0..3).map(|c| f64::from(s.as_slice()[r * 3 + c])).collect();
        let tv: Vec<f64> = (0..3).map(|c| f64::from(t.as_slice()[r * 3 + c])).collect();
        let lse = |v: &[f64]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let (ls, lt) = (lse(&sv), lse(&tv));
        want += (0..3).map(|c| (tv[c] - lt).exp() * ((tv[c] - lt) - (sv[c] - ls))).sum::<f64>();
    }
    assert!((f64::from(kl) - want / 2.0).abs() < 1e-6, "{kl} vs {}", want / 2.0);
    // α = 0: the teacher is the student itself.
    assert!(distill_kl(&s, &t, 1.0, 0.0).unwrap().item().unwrap().abs() < 1e-7);
    assert!(matches!(distill_kl(&s, &t, 0.0, 1.0), Err(SparseError::Config { field: "temperature", .. })));
}

#[test]
fn mask_l2_is_the_auxiliary_loss() {
    let mut c = RamtConfig::new(TARGET);
    c.mask_l2 = 1e-2;
    let m = model(c);
    let aux = ramt(&m).aux_loss().unwrap().unwrap().item().unwrap();
    // Six 8 x 8 masks of 1e-2: ‖M‖₂ = 8e-2 each.
    assert!((aux - 1e-2 * 6.0 * 8e-2).abs() < 1e-7, "{aux}");
    assert!(model(RamtConfig::new(TARGET)).tuner("default").unwrap().aux_loss().unwrap().is_none());
}

#[test]
fn save_load_save_is_byte_identical() {
    let m = model(RamtConfig::new(TARGET));
    train(&m, 5);
    let x = input(3, D, 8);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let (m2, report) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), dir.path(), &registry()).unwrap();
    assert!(report.unexpected.is_empty(), "{report:?}");
    assert_eq!(m2.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
    let dir2 = tempfile::tempdir().unwrap();
    m2.save_pretrained(dir2.path()).unwrap();
    crate::testutil::assert_same_adapter_files(dir.path(), dir2.path());
    // A non-finite mask in the file is refused.
    let path = dir.path().join("adapter_model.safetensors");
    let mut tensors = peft_core::io::read_safetensors(&path).unwrap();
    let key = "base_model.model.encoder.layer.0.output.dense.weight.mask_real";
    tensors.get_mut(key).unwrap().as_slice_mut().unwrap()[3] = f32::NAN;
    peft_core::io::write_safetensors(&path, tensors.iter(), None).unwrap();
    let Err(e) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), dir.path(), &registry()) else { panic!("loaded NaN") };
    assert!(e.to_string().contains("mask_real"), "{e}");
}

#[test]
fn bad_configs_are_typed_errors() {
    let base = RamtConfig::new(TARGET);
    for (c, field) in [
        (RamtConfig { init_value: 1e-3, ..base.clone() }, "init_value"),
        (RamtConfig { threshold: f64::NAN, ..base.clone() }, "init_value"),
        (RamtConfig { gdr_lambda: 1.5, ..base.clone() }, "gdr_lambda"),
        (RamtConfig { teacher_fusion: -0.1, ..base.clone() }, "teacher_fusion"),
        (RamtConfig { temperature: 0.0, ..base.clone() }, "temperature"),
        (RamtConfig { mask_l2: -1.0, ..base.clone() }, "mask_l2"),
    ] {
        let Err(e) = PeftModel::new(Tiny::new(D, 2, 1), c, "default", 0) else { panic!("accepted {field}") };
        assert!(matches!(&e, AdapterError::InvalidConfig { field: f, .. } if f == field), "{field}: {e:?}");
    }
    let (back, ignored) = RamtConfig::from_json(&base.to_json().unwrap()).unwrap();
    assert_eq!(back, base);
    assert!(ignored.is_empty());
}
