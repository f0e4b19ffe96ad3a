use ndarray::ArrayD;
use peft_core::adapter::{AdapterError, PeftModel};
use peft_core::nn::{named_params, Ctx, WeightSource};
use peft_core::testing::{assert_grads, max_abs_diff};
use peft_core::train::{Loss, Trainer, TrainerConfig};
use proptest::prelude::*;

use super::*;
use crate::registry;
use crate::testutil::{input, Tiny};

const TARGET: &str = r".*encoder\.layer\.\d+\..*";
const D: usize = 8;
const BATCHES: usize = 3;

fn config(budget: usize) -> SptConfig {
    SptConfig { low_rank_dim: 2, ..SptConfig::new(TARGET, budget) }
}

fn calib_loss(m: &Tiny, i: usize) -> peft_core::Result<Option<Tensor>> {
    if i >= BATCHES {
        return Ok(None);
    }
    let ctx = peft_core::train::calibration_ctx(None);
    Ok(Some(m.forward(&input(4, D, 10 + i as u64), &ctx)?.square().mean_all()))
}

fn model(c: SptConfig) -> PeftModel<Tiny> {
    let mut pm = PeftModel::wrap(Tiny::new(D, 2, 1), 3);
    pm.add_adapter_calibrated("default", Box::new(c), &mut |m: &Tiny, i| calib_loss(m, i)).unwrap();
    pm.set_adapter("default").unwrap();
    pm
}

fn spt(m: &PeftModel<Tiny>) -> &SptTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<SptTuner>().unwrap()
}

/// Gives every trainable value of the adapter a random value so it is not an identity.
fn perturb(m: &PeftModel<Tiny>, seed: u64) {
    for (j, p) in m.trainable_params().iter().enumerate() {
        if p.name().starts_with("classifier") {
            continue;
        }
        let v = peft_core::nn::RandomInit::new(seed + j as u64, 0.2).get("v", &p.shape()).unwrap();
        p.set(v).unwrap();
    }
}

#[test]
fn allocation_rule_on_synthetic_sensitivities() {
    // r = 2: a [4, 6] matrix costs 20 structurally, so α = 10 puts the bar at c ≥ 2; a vector of 10 at c ≥ 2.
    let t = |name, shape, count| Sensitive { name, shape, count };
    let m = [4usize, 6];
    let v = [10usize];
    let cube = [2usize, 2, 2];
    let targets = [
        t("m2", &m[..], 2),
        t("m1", &m[..], 1),
        t("m0", &m[..], 0),
        t("v2", &v[..], 2),
        t("v1", &v[..], 1),
        t("c", &cube[..], 8),
    ];
    let a = allocate(&targets, 2, 10.0, 5.0, true);
    assert_eq!(a.get("m2"), Some(&Alloc::LowRank));
    assert_eq!(a.get("m1"), Some(&Alloc::Sparse { k: 1 }));
    assert_eq!(a.get("m0"), None, "no sensitive entry: not tuned");
    assert_eq!(a.get("v2"), Some(&Alloc::Full));
    assert_eq!(a.get("v1"), Some(&Alloc::Sparse { k: 1 }));
    assert_eq!(a.get("c"), Some(&Alloc::Sparse { k: 8 }), "only matrices and vectors are structural");
    // Without structured vectors, a vector is always sparse; a larger α lowers the matrix bar.
    let b = allocate(&targets, 2, 20.0, 5.0, false);
    assert_eq!(b.get("v2"), Some(&Alloc::Sparse { k: 2 }));
    assert_eq!(b.get("m1"), Some(&Alloc::LowRank));
    let shape_of = |n: &str| match n {
        "c" => cube.to_vec(),
        s if s.starts_with('m') => m.to_vec(),
        _ => v.to_vec(),
    };
    // 20 (m2) + 1 (m1) + 10 (v2) + 1 (v1) + 8 (c).
    assert_eq!(allocated_entries(&a, shape_of, 2), 40);
}

/// The sensitivity as the spec defines it, computed here on a fresh model with every target trainable.
fn reference_sensitivity() -> (Vec<String>, Vec<Vec<usize>>, Vec<Vec<f32>>) {
    let m = Tiny::new(D, 2, 1);
    let re = regex::Regex::new(&format!(r"\A(?:{TARGET})\z")).unwrap();
    let ps: Vec<Param> = named_params(&m).into_iter().filter(|p| re.is_match(p.name())).collect();
    for p in &ps {
        p.set_trainable(true);
    }
    let mut acc: Vec<Vec<f32>> = ps.iter().map(|p| vec![0.0; p.numel()]).collect();
    for i in 0..BATCHES {
        let g = calib_loss(&m, i).unwrap().unwrap().backward().unwrap();
        for (a, p) in acc.iter_mut().zip(&ps) {
            for (s, x) in a.iter_mut().zip(g.get_id(p.id()).unwrap().iter()) {
                *s += x * x;
            }
        }
    }
    (ps.iter().map(|p| p.name().to_string()).collect(), ps.iter().map(Param::shape).collect(), acc)
}

#[test]
fn sensitivity_picks_the_top_squared_gradients_and_the_allocation_follows_the_rule() {
    // Large enough that some biases hold sensitive entries (their gradients are smaller than the weights').
    let budget = 150;
    // α = 2 raises the structural bar to 16 sensitive entries of 64, so some matrices stay sparse.
    let m = model(SptConfig { alpha: 2.0, ..config(budget) });
    let (names, shapes, scores) = reference_sensitivity();
    let refs: Vec<&[f32]> = scores.iter().map(Vec::as_slice).collect();
    let picked = top_k_global(&refs, budget);
    assert_eq!(picked.iter().map(Vec::len).sum::<usize>(), budget);
    let sens: Vec<Sensitive<'_>> = names
        .iter()
        .zip(&shapes)
        .zip(&picked)
        .map(|((n, s), i)| Sensitive { name: n, shape: s, count: i.len() })
        .collect();
    let want = allocate(&sens, 2, 2.0, 5.0, true);
    let t = spt(&m);
    assert_eq!(t.allocation(), &want);
    // The case exercises all three kinds.
    for kind in ["low", "full", "sparse"] {
        let hit = want.values().any(|a| match a {
            Alloc::LowRank => kind == "low",
            Alloc::Full => kind == "full",
            Alloc::Sparse { .. } => kind == "sparse",
        });
        assert!(hit, "no {kind} target in {want:?}");
    }
    // Sparse targets train exactly their sensitive entries; whole vectors every entry.
    for (p, d) in t.sparse().entries() {
        let slot = names.iter().position(|n| n == p.name()).unwrap();
        match want[p.name()] {
            Alloc::Sparse { k } => {
                assert_eq!(d.indices().to_u64(), picked[slot]);
                assert_eq!(d.k(), k);
            }
            Alloc::Full => assert_eq!(d.k(), p.numel()),
            Alloc::LowRank => panic!("{} is low-rank but has a sparse delta", p.name()),
        }
    }
    let shape_of = |n: &str| shapes[names.iter().position(|x| x == n).unwrap()].clone();
    assert_eq!(t.trainable_entries(), allocated_entries(&want, shape_of, 2));
    let adapter: usize =
        m.trainable_params().iter().filter(|p| !p.name().starts_with("classifier")).map(Param::numel).sum();
    assert_eq!(adapter, t.trainable_entries(), "trainable parameters are the allocation's");
    // Calibration left the base frozen.
    assert!(m.base_params().iter().all(|p| !p.trainable() || p.name().starts_with("classifier")));
}

#[test]
fn identity_at_init_and_the_sparse_path_equals_the_dense_delta_path() {
    let x = input(5, D, 9);
    let base = Tiny::new(D, 2, 1);
    let y0 = base.forward(&x, &Ctx::eval()).unwrap();
    let m = model(config(40));
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y0.to_vec());
    perturb(&m, 5);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    assert!(max_abs_diff(y.as_slice(), y0.as_slice()) > 1e-3, "the perturbed adapter changes the output");
    // The same change written into a plain model's weights: W + scatter(values) and W + B·A, densely.
    let t = spt(&m);
    for p in named_params(&base) {
        let mut w = p.value().to_owned();
        if let Some((_, d)) = t.sparse().entries().iter().find(|(q, _)| q.name() == p.name()) {
            let vals = d.values().value();
            let ws = w.as_slice_mut().unwrap();
            for (i, v) in d.indices().iter().zip(vals.iter()) {
                ws[i] += v;
            }
        }
        if let Some((_, d)) = t.low_rank().iter().find(|(q, _)| q.name() == p.name()) {
            let (a, b) = (d.lora_a().value(), d.lora_b().value());
            let (o, i) = (p.shape()[0], p.shape()[1]);
            let r = a.shape()[0];
            let ws = w.as_slice_mut().unwrap();
            for oo in 0..o {
                for ii in 0..i {
                    ws[oo * i + ii] += (0..r).map(|k| b[[oo, k]] * a[[k, ii]]).sum::<f32>();
                }
            }
        }
        p.set(w).unwrap();
    }
    let dense = base.forward(&x, &Ctx::eval()).unwrap();
    assert!(max_abs_diff(y.as_slice(), dense.as_slice()) < 1e-5);
}

#[test]
fn merge_equals_the_unmerged_forward_and_unmerge_restores_the_weights() {
    let mut m = model(config(40));
    perturb(&m, 7);
    let x = input(5, D, 9);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    let w0: Vec<ArrayD<f32>> = m.base_params().iter().map(|p| p.value().to_owned()).collect();
    m.merge_adapter().unwrap();
    assert!(m.tuner("default").unwrap().is_merged());
    assert!(max_abs_diff(m.forward(&x, &Ctx::eval()).unwrap().as_slice(), y.as_slice()) < 1e-5);
    m.unmerge_adapter().unwrap();
    for (p, w) in m.base_params().iter().zip(&w0) {
        assert!(max_abs_diff(p.value().as_slice().unwrap(), w.as_slice().unwrap()) < 1e-6, "{}", p.name());
    }
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
}

#[test]
fn trains_only_the_adapter_and_reduces_the_loss() {
    let m = model(config(40));
    let before: Vec<Vec<u32>> =
        m.base_params().iter().map(|p| p.value().iter().map(|x| x.to_bits()).collect()).collect();
    let x = input(6, D, 4);
    let tc = TrainerConfig { lr: 1e-2, total_steps: 10, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), &m, tc).unwrap();
    let mut losses = Vec::new();
    for _ in 0..10 {
        losses.push(t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap().loss);
    }
    drop(t);
    assert!(losses[9] < 0.9 * losses[0], "{losses:?}");
    for (p, b) in m.base_params().iter().zip(&before) {
        if p.name().starts_with("classifier") {
            continue;
        }
        assert!(p.value().iter().map(|x| x.to_bits()).eq(b.iter().copied()), "{} changed", p.name());
    }
    // Every structural B left zero (the low-rank path trains).
    assert!(spt(&m).low_rank().iter().all(|(_, d)| d.lora_b().value().iter().any(|v| *v != 0.0)));
}

#[test]
fn save_load_save_is_byte_identical_and_loading_needs_no_calibration() {
    let m = model(config(40));
    perturb(&m, 11);
    let x = input(6, D, 4);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let json: Value = serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert!(json["allocation"].is_object(), "the saved config records the allocation: {json}");
    let (m2, report) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), dir.path(), &registry()).unwrap();
    assert!(report.unexpected.is_empty(), "{report:?}");
    assert_eq!(m2.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
    assert_eq!(spt(&m2).allocation(), spt(&m).allocation());
    let dir2 = tempfile::tempdir().unwrap();
    m2.save_pretrained(dir2.path()).unwrap();
    crate::testutil::assert_same_adapter_files(dir.path(), dir2.path());
}

#[test]
fn a_file_that_contradicts_the_allocation_is_refused_before_loading() {
    let m = model(config(40));
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let path = dir.path().join("adapter_config.json");
    let mut json: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let (name, _) = spt(&m).allocation().iter().find(|(_, a)| **a == Alloc::LowRank).unwrap();
    json["low_rank_dim"] = Value::from(3);
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    let Err(e) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), dir.path(), &registry()) else {
        panic!("a rank-3 config loaded a rank-2 file")
    };
    assert!(matches!(&e, AdapterError::TensorShape { key, .. } if key == &format!("{name}.spt_lora_A")), "{e:?}");
}

#[test]
fn missing_calibration_and_bad_configs_are_typed_errors() {
    let Err(e) = PeftModel::new(Tiny::new(D, 2, 1), config(40), "default", 0) else {
        panic!("SPT injected without calibration data")
    };
    assert!(matches!(&e, AdapterError::InvalidConfig { field, .. } if field == "allocation"), "{e:?}");
    for (c, field) in [
        (SptConfig { budget: 0, ..config(40) }, "budget"),
        (SptConfig { low_rank_dim: 0, ..config(40) }, "low_rank_dim"),
        (SptConfig { alpha: f64::NAN, ..config(40) }, "alpha"),
        (SptConfig { beta: 0.0, ..config(40) }, "beta"),
        (SptConfig { sensitivity_batches: 0, ..config(40) }, "sensitivity_batches"),
    ] {
        let mut pm = PeftModel::wrap(Tiny::new(D, 2, 1), 0);
        let Err(e) = pm.add_adapter_calibrated("default", Box::new(c), &mut |m: &Tiny, i| calib_loss(m, i)) else {
            panic!("accepted {field}")
        };
        assert!(matches!(&e, AdapterError::InvalidConfig { field: f, .. } if f == field), "{field}: {e:?}");
    }
    let mut empty = PeftModel::wrap(Tiny::new(D, 2, 1), 0);
    let e = empty.add_adapter_calibrated("default", Box::new(config(4)), &mut |_: &Tiny, _| Ok(None)).unwrap_err();
    assert!(matches!(&e, AdapterError::InvalidConfig { field, .. } if field == "calibration"), "{e:?}");
    let mut unknown = config(4);
    unknown.allocation = Some([("nope.weight".to_string(), Alloc::Full)].into_iter().collect());
    let Err(e) = PeftModel::new(Tiny::new(D, 2, 1), unknown, "default", 0) else {
        panic!("an allocation naming no parameter was accepted")
    };
    assert!(matches!(&e, AdapterError::InvalidConfig { field, .. } if field == "allocation"), "{e:?}");
    let (back, ignored) = SptConfig::from_json(&config(40).to_json().unwrap()).unwrap();
    assert_eq!(back, config(40));
    assert!(ignored.is_empty());
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(24))]

    /// `base + B·A`: gradients of all three match central differences in f64 on random shapes.
    #[test]
    fn low_rank_apply_grads_match_finite_differences(o in 1usize..5, i in 1usize..5, r in 1usize..4, seed in 0u64..1000) {
        let g = |shape: &[usize], s: u64| {
            peft_core::nn::RandomInit::new(seed * 3 + s, 0.7).get("t", shape).unwrap().mapv(f64::from)
        };
        let inputs = [g(&[o, i], 0), g(&[r, i], 1), g(&[o, r], 2)];
        assert_grads(|t| low_rank_apply(&t[0], &t[1], &t[2]), &inputs);
    }
}
