use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::{AdapterError, PeftModel};
use peft_core::nn::Ctx;
use peft_core::testing::{assert_grads, max_abs_diff};
use peft_core::train::{Loss, Trainer, TrainerConfig};
use proptest::prelude::*;

use super::*;
use crate::registry;
use crate::testutil::{input, Tiny};

const TARGET: &str = r".*encoder\.layer\.\d+\..*\.weight";
const D: usize = 8;

fn config() -> SaraConfig {
    let mut c = SaraConfig::new(TARGET);
    c.threshold = 0.1;
    c.lr = Some(1e-2);
    c
}

fn model(c: SaraConfig) -> PeftModel<Tiny> {
    PeftModel::new(Tiny::new(D, 2, 1), c, "default", 3).unwrap()
}

fn sparse(m: &PeftModel<Tiny>) -> &SparseTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<SparseTuner>().unwrap()
}

fn values(m: &PeftModel<Tiny>) -> Vec<Vec<f32>> {
    sparse(m).entries().iter().map(|(_, d)| d.values().value().iter().copied().collect()).collect()
}

#[test]
fn default_lr_matches_the_spec() {
    assert!((default_lr(2e-3) - 4.966e-4).abs() < 1e-6);
    assert_eq!(SaraConfig::new(TARGET).effective_lr(), default_lr(2e-3));
}

#[test]
fn identity_at_init_and_the_mask_is_the_small_weights() {
    let x = input(5, D, 9);
    let y0 = Tiny::new(D, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    let m = model(config());
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y0.to_vec());
    let t = sparse(&m);
    assert!(!t.entries().is_empty());
    let mut total = 0;
    for (p, d) in t.entries() {
        let want: Vec<u64> =
            p.value().iter().enumerate().filter(|(_, w)| w.abs() < 0.1).map(|(i, _)| i as u64).collect();
        assert_eq!(d.indices().to_u64(), want);
        total += want.len();
    }
    assert_eq!(t.trainable_entries(), total);
    // O(k) state: Adam (12 bytes) + pretrained value and frozen flag (5 bytes) per entry.
    assert_eq!(t.own_state_bytes(), 17 * total);
}

#[test]
fn progressive_step_freezes_entries_that_left_the_threshold() {
    let mut c = config();
    c.progressive_step = Some(2);
    c.lr = Some(3e-2);
    let m = model(c);
    let base: Vec<Vec<u32>> = m.base_params().iter().map(|p| p.value().iter().map(|x| x.to_bits()).collect()).collect();
    let x = input(6, D, 4);
    let tc = TrainerConfig { lr: 1e-2, total_steps: 8, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), &m, tc).unwrap();
    let mut snaps = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let r = t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap();
        losses.push(r.loss);
        snaps.push(values(&m));
    }
    drop(t);
    assert!(losses[7] < losses[0], "{losses:?}");
    let now: Vec<Vec<u32>> = m.base_params().iter().map(|p| p.value().iter().map(|x| x.to_bits()).collect()).collect();
    assert_eq!(now, base, "the frozen weights changed");
    // After step 2 (the third), entries with |W + δ| >= threshold are frozen: unchanged from then on.
    let (mut frozen, mut moving) = (0, 0);
    for (slot, (_, d)) in sparse(&m).entries().iter().enumerate() {
        let w = base_weights(&m, d.param_name());
        for (j, i) in d.indices().iter().enumerate() {
            let at_switch = snaps[2][slot][j];
            if (w[i] + at_switch).abs() >= 0.1 {
                frozen += 1;
                for s in &snaps[3..] {
                    assert_eq!(s[slot][j].to_bits(), at_switch.to_bits());
                }
            } else if snaps[7][slot][j] != at_switch {
                moving += 1;
            }
        }
    }
    assert!(frozen > 0 && moving > 0, "{frozen} frozen, {moving} moving");
}

fn base_weights(m: &PeftModel<Tiny>, name: &str) -> Vec<f32> {
    m.base_params().iter().find(|p| p.name() == name).unwrap().value().iter().copied().collect()
}

#[test]
fn save_load_save_is_byte_identical_and_stores_only_the_mask() {
    let m = model(config());
    let x = input(6, D, 4);
    let tc = TrainerConfig { lr: 1e-2, total_steps: 3, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), &m, tc).unwrap();
    for _ in 0..3 {
        t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap();
    }
    drop(t);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    let base = Tiny::new(D, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    assert!(max_abs_diff(y.as_slice(), base.as_slice()) > 1e-5);
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let f = peft_core::io::SafeTensorsFile::open(dir.path().join("adapter_model.safetensors")).unwrap();
    let k: usize = sparse(&m).trainable_entries();
    let stored: usize = sparse(&m)
        .entries()
        .iter()
        .map(|(p, _)| f.shape(&format!("base_model.model.{}.values", p.name())).unwrap()[0])
        .sum();
    assert_eq!(stored, k);
    let (m2, report) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), dir.path(), &registry()).unwrap();
    assert!(report.unexpected.is_empty(), "{report:?}");
    assert_eq!(m2.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
    let dir2 = tempfile::tempdir().unwrap();
    m2.save_pretrained(dir2.path()).unwrap();
    crate::testutil::assert_same_adapter_files(dir.path(), dir2.path());
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(24))]
    #[test]
    fn nuclear_norm_grads_match_finite_differences(
        (rows, cols) in (2usize..5, 2usize..5),
        seed in 0u64..1000,
        drop_every in 3usize..7,
    ) {
        // Every entry but one in `drop_every` (and never the diagonal), so the matrix is full rank.
        let n = rows * cols;
        let idx: Vec<u64> = (0..n).filter(|&i| i % drop_every != 1 || i / cols == i % cols).map(|i| i as u64).collect();
        let k = idx.len();
        let si = Arc::new(SparseIndices::new("w", idx, n).unwrap());
        let base: Vec<f64> = (0..k).map(|j| ((j as u64 * 31 + seed) % 17) as f64 * 0.1 - 0.8).collect();
        let mut active = vec![true; k];
        active[k / 2] = false;
        let vals = ArrayD::from_shape_fn(IxDyn(&[k]), |d| ((d[0] as u64 * 7 + seed) as f64 * 0.37).sin());
        assert_grads(|t| sparse_nuclear_norm(&t[0], &si, &base, &active, rows, cols), std::slice::from_ref(&vals));
        // The value is the sum of the singular values of the dense masked matrix.
        let mut a = ndarray::Array2::<f64>::zeros((rows, cols));
        for (j, i) in si.iter().enumerate() {
            if active[j] {
                a.as_slice_mut().unwrap()[i] = base[j] + vals[j];
            }
        }
        let (_, s, _) = peft_core::linalg::svd(&a).unwrap();
        let got = sparse_nuclear_norm(&Tensor::new(vals), &si, &base, &active, rows, cols).unwrap().item().unwrap();
        prop_assert!((got - s.sum()).abs() < 1e-10);
    }
}

#[test]
fn the_regulariser_is_the_auxiliary_loss_on_eligible_targets_only() {
    // Defaults: no 8 x 8 target has min(dim) > 64.
    assert!(model(config()).tuner("default").unwrap().aux_loss().unwrap().is_none());
    let mut c = config();
    (c.rank_min_dim, c.rank_min_entries, c.rank_lambda) = (4, 3, 0.5);
    let m = model(c);
    let t = sparse(&m);
    // At init θ ⊙ m is the pretrained small weights: the term is 0.5 · ‖W ⊙ m‖_* of one target.
    let norms: Vec<f32> = t
        .entries()
        .iter()
        .map(|(p, d)| {
            let mut a = ndarray::Array2::<f32>::zeros((D, D));
            let w = p.value();
            for i in d.indices().iter() {
                a.as_slice_mut().unwrap()[i] = w.as_slice().unwrap()[i];
            }
            0.5 * peft_core::linalg::svd(&a).unwrap().1.sum()
        })
        .collect();
    for _ in 0..4 {
        let aux = m.tuner("default").unwrap().aux_loss().unwrap().unwrap().item().unwrap();
        assert!(norms.iter().any(|n| (n - aux).abs() < 1e-5), "{aux} not in {norms:?}");
    }
    // It reaches the values' gradient.
    let aux = m.tuner("default").unwrap().aux_loss().unwrap().unwrap();
    let g = aux.backward().unwrap();
    assert!(t.entries().iter().any(|(_, d)| g.get_id(d.values().id()).is_some_and(|g| g.iter().any(|v| *v != 0.0))));
}

#[test]
fn bad_configs_are_typed_errors() {
    for (c, field) in [
        (SaraConfig { threshold: 0.0, ..config() }, "threshold"),
        (SaraConfig { threshold: 1e-12, ..config() }, "threshold"),
        (SaraConfig { lr: Some(-1.0), ..config() }, "lr"),
        (SaraConfig { rank_lambda: f64::NAN, ..config() }, "rank_lambda"),
    ] {
        let Err(e) = PeftModel::new(Tiny::new(D, 2, 1), c, "default", 0) else { panic!("accepted {field}") };
        assert!(matches!(&e, AdapterError::InvalidConfig { field: f, .. } if f == field), "{field}: {e:?}");
    }
    let bad = sparse_nuclear_norm(
        &Tensor::new(ArrayD::zeros(IxDyn(&[2]))),
        &Arc::new(SparseIndices::new("w", vec![0, 5], 6).unwrap()),
        &[0.0f32, 0.0],
        &[true],
        2,
        3,
    );
    assert!(matches!(bad, Err(peft_core::Error::Shape { .. })));
    let (back, ignored) = SaraConfig::from_json(&config().to_json().unwrap()).unwrap();
    assert_eq!(back, config());
    assert!(ignored.is_empty());
}

#[test]
fn weight_decay_acts_on_theta_not_on_the_delta() {
    // A zero loss: Adam's update is 0, so one step is the decay alone, δ = −lr·wd·W.
    let mut c = config();
    (c.weight_decay, c.lr) = (0.5, Some(1e-2));
    let m = model(c);
    let x = input(4, D, 1);
    let tc = TrainerConfig { lr: 1e-2, total_steps: 1, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), &m, tc).unwrap();
    t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.sum_all().mul_scalar(0.0)))).unwrap();
    drop(t);
    for (p, d) in sparse(&m).entries() {
        let w = base_weights(&m, p.name());
        for (i, v) in d.indices().iter().zip(d.values().value().iter()) {
            assert!((v + 5e-3 * w[i]).abs() <= 1e-9, "{v} vs {}", -5e-3 * w[i]);
        }
    }
}

#[test]
fn loading_onto_another_base_is_refused() {
    let m = model(config());
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    // Another base has another set of small weights: the re-derived mask disagrees with the file.
    let Err(e) = PeftModel::from_pretrained(Tiny::new(D, 2, 2), dir.path(), &registry()) else {
        panic!("loaded onto another base")
    };
    assert!(matches!(e, AdapterError::TensorShape { .. }), "{e:?}");
}
