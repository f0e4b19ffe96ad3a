use std::collections::HashMap;

use ndarray::{Array2, Ix2, Ix4};
use peft_core::adapter::{CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{Ctx, Linear, MapWeights, RandomInit, Visitor, WeightSource};
use peft_core::testing::max_abs_diff;

use super::*;
use crate::structured::fdcheck;
use crate::testutil::{input, Tiny};

fn poly<M: Module>(model: M, cfg: PolyConfig) -> PeftModel<M> {
    PeftModel::new(model, cfg, "default", 0).unwrap()
}

fn layers<M: Module>(m: &PeftModel<M>) -> Vec<(Linear, Arc<PolyLinear>)> {
    m.poly_layers("default").unwrap()
}

fn perturb<M: Module>(m: &PeftModel<M>, seed: u64) {
    for (i, (_, l)) in layers(m).iter().enumerate() {
        for (j, p) in l.params3().into_iter().enumerate() {
            p.set(RandomInit::new(seed + (10 * i + j) as u64, 0.4).get("p", &p.shape()).unwrap()).unwrap();
        }
    }
}

fn tasks(ids: &[usize]) -> Ctx {
    Ctx::eval().with_task_ids(ids.to_vec())
}

/// A single `query` site of width `i → o`.
struct One(Linear);
impl Module for One {
    fn visit(&self, v: &mut dyn Visitor) {
        self.0.visit(v);
    }
}

fn one(i: usize, o: usize) -> One {
    One(Linear::load("query", i, o, true, &RandomInit::new(1, 0.5)).unwrap())
}

#[test]
fn poly_is_identity_at_init() {
    let model = Tiny::new(6, 2, 0);
    let x = input(4, 6, 1);
    let y0 = model.forward(&x, &Ctx::eval()).unwrap().to_vec();
    let pm = poly(model, PolyConfig::new(2, 3, 4, 2, ["query", "value"]));
    let y = pm.forward(&x, &tasks(&[0, 1, 2, 1])).unwrap().to_vec();
    assert_eq!(y, y0);
    // Per site: A q·k·(in/q)·r + B q·k·r·(out/q) + logits n_tasks·q·k.
    assert_eq!(pm.trainable_params().iter().map(Param::numel).sum::<usize>(), 4 * (4 * 12 + 4 * 12 + 3 * 8));
}

/// The PEFT einsum forward written out with loops, for one row.
fn reference(l: &PolyLinear, x: &Array2<f32>, w: &ArrayD<f32>, row: usize) -> Array2<f32> {
    let a = l.a.value().to_owned().into_dimensionality::<Ix4>().unwrap();
    let b = l.b.value().to_owned().into_dimensionality::<Ix4>().unwrap();
    let (q, k, di, r) = a.dim();
    let d_o = b.dim().3;
    let mut am = Array2::<f32>::zeros((q * di, r));
    let mut bm = Array2::<f32>::zeros((r, q * d_o));
    for split in 0..q {
        for skill in 0..k {
            let ww = w[[row, split, skill]];
            for d in 0..di {
                for j in 0..r {
                    am[[split * di + d, j]] += ww * a[[split, skill, d, j]];
                }
            }
            for j in 0..r {
                for d in 0..d_o {
                    bm[[j, split * d_o + d]] += ww * b[[split, skill, j, d]];
                }
            }
        }
    }
    x.dot(&am).dot(&bm).mapv(|v| v * l.scaling as f32)
}

#[test]
fn mhr_forward_matches_the_peft_einsum_per_row() {
    let pm = poly(one(6, 4), PolyConfig::new(2, 3, 3, 2, ["query"]));
    perturb(&pm, 2);
    let (site, l) = &layers(&pm)[0];
    let x = Tensor::new(RandomInit::new(3, 1.0).get("x", &[2, 5, 6]).unwrap());
    let ids = [2, 0];
    let y = site.forward(&x, &tasks(&ids)).unwrap();
    let base = site.base().forward(&x).unwrap();
    let w = l.routing_weights(&ids, &Ctx::eval()).unwrap().data().to_owned();
    for row in 0..2 {
        let xr = x.data().index_axis(Axis(0), row).to_owned().into_dimensionality::<Ix2>().unwrap();
        let want = reference(l, &xr, &w, row);
        let got = (&y.data().index_axis(Axis(0), row) - &base.data().index_axis(Axis(0), row)).to_owned();
        assert!(max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap()) < 1e-5, "row {row}");
    }
}

#[test]
fn router_weights_sum_to_one_per_split_in_eval_and_training() {
    let pm = poly(one(4, 4), PolyConfig::new(2, 3, 5, 2, ["query"]));
    perturb(&pm, 7);
    let l = &layers(&pm)[0].1;
    for ctx in [Ctx::eval(), Ctx::train(3)] {
        let w = l.routing_weights(&[0, 1, 2, 2], &ctx).unwrap();
        assert_eq!(w.shape(), &[4, 2, 5]);
        for s in w.sum(&[2], false).unwrap().to_vec() {
            assert!((s - 1.0).abs() < 1e-6, "{s}");
        }
        assert!(w.to_vec().iter().all(|&v| v > 0.0));
    }
    // Eval weights are σ(z) / Σ σ(z).
    let z = l.logits.value().to_owned();
    let w = l.routing_weights(&[1], &Ctx::eval()).unwrap().to_vec();
    let sig: Vec<f32> = (0..5).map(|s| 1.0 / (1.0 + (-z[[1, s]]).exp())).collect();
    let tot: f32 = sig.iter().sum();
    for s in 0..5 {
        assert!((w[s] - sig[s] / tot).abs() < 1e-6);
    }
}

#[test]
fn poly_with_one_skill_is_plain_lora() {
    let pm = poly(one(5, 3), PolyConfig::new(2, 2, 1, 1, ["query"]));
    perturb(&pm, 4);
    let (site, l) = &layers(&pm)[0];
    let x = input(3, 5, 1);
    let y = site.forward(&x, &tasks(&[1, 0, 1])).unwrap();
    let a = l.a.value().to_owned().into_shape_with_order((5, 2)).unwrap();
    let b = l.b.value().to_owned().into_shape_with_order((2, 3)).unwrap();
    let x2 = x.data().to_owned().into_dimensionality::<Ix2>().unwrap();
    let base = site.base().forward(&x).unwrap().data().to_owned().into_dimensionality::<Ix2>().unwrap();
    let want = &base + &x2.dot(&a).dot(&b).mapv(|v| v / 2.0);
    assert!(max_abs_diff(y.as_slice(), want.as_slice().unwrap()) < 1e-5);
}

#[test]
fn mhr_mu_equals_single_lora_with_mean_factors() {
    let mut pm = poly(Tiny::new(6, 2, 0), PolyConfig::new(2, 3, 4, 3, ["query", "dense"]));
    perturb(&pm, 5);
    pm.set_poly_selector("default", PolySelector::Uniform).unwrap();
    let x = input(4, 6, 2);
    // No task ids needed under the uniform selector.
    let y_mu = pm.forward(&x, &Ctx::eval()).unwrap().to_vec();
    // Hand-built means: A_μ[q] = mean_s A[q, s], B_μ[q] = mean_s B[q, s], laid out as one LoRA.
    for (_, l) in &layers(&pm) {
        let a = l.a.value().to_owned().into_dimensionality::<Ix4>().unwrap();
        let b = l.b.value().to_owned().into_dimensionality::<Ix4>().unwrap();
        let (am, bm) = l.mean_lora().unwrap();
        let (q, _, di, r) = a.dim();
        let d_o = b.dim().3;
        let a_mean = a.mean_axis(Axis(1)).unwrap();
        let b_mean = b.mean_axis(Axis(1)).unwrap();
        for split in 0..q {
            for d in 0..di {
                for j in 0..r {
                    assert!((am[[j, split * di + d]] - a_mean[[split, d, j]]).abs() < 1e-6);
                }
            }
            for j in 0..r {
                for d in 0..d_o {
                    assert!((bm[[split * d_o + d, j]] - b_mean[[split, j, d]]).abs() < 1e-6);
                }
            }
        }
    }
    // Merging is exact under the uniform selector.
    pm.merge_adapter().unwrap();
    assert!(max_abs_diff(&pm.forward(&x, &Ctx::eval()).unwrap().to_vec(), &y_mu) < 1e-5);
    pm.unmerge_adapter().unwrap();
    pm.replace_with_mhr_mu("default", "mu").unwrap();
    assert_eq!(pm.adapter_names(), ["mu"]);
    assert_eq!(pm.lora_layers("mu").unwrap().len(), 4);
    assert!(max_abs_diff(&pm.forward(&x, &Ctx::eval()).unwrap().to_vec(), &y_mu) < 1e-5);
}

#[test]
fn task_routed_poly_is_not_mergeable() {
    let mut pm = poly(one(4, 4), PolyConfig::new(2, 2, 2, 1, ["query"]));
    assert!(matches!(
        pm.merge_adapter(),
        Err(AdapterError::Core(Error::AdapterState { problem: peft_core::AdapterProblem::NotMergeable(_), .. }))
    ));
    assert!(!pm.tuner("default").unwrap().is_merged());
}

#[test]
fn mhr_z_trains_only_the_router_logits() {
    let pm = poly(Tiny::new(4, 1, 0), PolyConfig::new(2, 2, 2, 2, ["query"]));
    perturb(&pm, 3);
    pm.set_router_only("default", true).unwrap();
    let tr = pm.trainable_params();
    assert_eq!(tr.len(), 1);
    assert!(tr[0].name().ends_with("poly_router.default.module_logits"));
    let x = input(2, 4, 1);
    let g = pm.forward(&x, &tasks(&[0, 1])).unwrap().sum_all().backward().unwrap();
    assert!(g.get_id(tr[0].id()).is_some());
    pm.set_router_only("default", false).unwrap();
    assert_eq!(pm.trainable_params().len(), 3);
}

#[test]
fn poly_gradients_match_finite_differences_in_eval_and_relaxed_training() {
    let pm = poly(Tiny::new(4, 1, 0), PolyConfig::new(2, 3, 3, 2, ["query", "dense"]));
    perturb(&pm, 8);
    let x = input(3, 4, 4);
    let r = input(3, 3, 5);
    let ids = vec![2, 0, 1];
    let f = || pm.forward(&x, &Ctx::eval().with_task_ids(ids.clone())).unwrap().mul(&r).unwrap().sum_all();
    fdcheck::check(&f, &pm.trainable_params(), 1e-2, 3e-3);
    // Training: the Relaxed-Bernoulli noise is fixed by the Ctx seed, so the sample is a smooth function of z.
    let f = || pm.forward(&x, &Ctx::train(9).with_task_ids(ids.clone())).unwrap().mul(&r).unwrap().sum_all();
    fdcheck::check(&f, &pm.trainable_params(), 1e-2, 3e-3);
}

#[test]
fn poly_save_load_save_is_byte_identical() {
    let mut cfg = PolyConfig::new(2, 3, 2, 2, ["value"]);
    cfg.relaxed_bernoulli = false;
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    let pm = poly(Tiny::new(6, 2, 0), cfg);
    perturb(&pm, 4);
    pm.classifier.base().params()[1].update(|b| b.mapv_inplace(|v| v + 0.5));
    let d1 = tempfile::tempdir().unwrap();
    pm.save_pretrained(d1.path()).unwrap();
    let (pm2, report) = PeftModel::from_pretrained(Tiny::new(6, 2, 0), d1.path(), &crate::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    let cfg2 = pm2.config("default").unwrap().as_any().downcast_ref::<PolyConfig>().unwrap();
    assert!(!cfg2.relaxed_bernoulli);
    let x = input(3, 6, 1);
    let ctx = || tasks(&[0, 2, 1]);
    assert_eq!(pm.forward(&x, &ctx()).unwrap().to_vec(), pm2.forward(&x, &ctx()).unwrap().to_vec());
    let d2 = tempfile::tempdir().unwrap();
    pm2.save_pretrained(d2.path()).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
    }
}

/// `tests/fixtures/poly_mhr` (PEFT 0.21.2, `gen.py`): MHR with 3 tasks, 3 skills, 2 splits, random B and logits.
#[test]
fn peft_poly_fixture_loads_matches_output_and_saves_back_identically() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/poly_mhr");
    let base = peft_core::io::safetensors::SafeTensorsFile::open(dir.join("base.safetensors")).unwrap();
    let w: HashMap<String, ArrayD<f32>> = base.names().map(|n| (n.to_string(), base.get(n).unwrap())).collect();
    let model = One(Linear::load("query", 4, 6, true, &MapWeights(w)).unwrap());
    let (pm, report) = PeftModel::from_pretrained(model, &dir, &crate::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    let cfg = pm.config("default").unwrap().as_any().downcast_ref::<PolyConfig>().unwrap();
    assert_eq!((cfg.n_tasks, cfg.n_skills, cfg.n_splits), (3, 3, 2));
    let io: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("io.json")).unwrap()).unwrap();
    let v = |k: &str| -> Vec<f32> { io[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    let shape: Vec<usize> = io["x_shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let ids: Vec<usize> = io["task_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let x = Tensor::from_vec(v("x"), &shape).unwrap();
    let y = pm.0.forward(&x, &Ctx::eval().with_task_ids(ids)).unwrap();
    assert!(max_abs_diff(y.as_slice(), &v("y")) < 1e-5);
    let out = tempfile::tempdir().unwrap();
    pm.save_pretrained(out.path()).unwrap();
    assert_eq!(std::fs::read(dir.join(WEIGHTS_NAME)).unwrap(), std::fs::read(out.path().join(WEIGHTS_NAME)).unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join(CONFIG_NAME)).unwrap(),
        std::fs::read_to_string(out.path().join(CONFIG_NAME)).unwrap()
    );
}

#[test]
fn poly_bad_configs_and_task_ids_are_typed_errors() {
    let bad = |c: PolyConfig| PeftModel::new(one(6, 4), c, "a", 0).err().unwrap();
    assert!(matches!(bad(PolyConfig::new(2, 2, 0, 1, ["query"])), AdapterError::InvalidConfig { .. }));
    assert!(matches!(bad(PolyConfig::new(2, 2, 2, 4, ["query"])), AdapterError::InvalidConfig { .. }), "4 of 6");
    let mut c = PolyConfig::new(2, 2, 2, 1, ["query"]);
    c.poly_type = "moe".into();
    assert!(matches!(bad(c), AdapterError::Unsupported { .. }));
    let pm = PeftModel::new(one(6, 4), PolyConfig::new(2, 2, 2, 2, ["query"]), "a", 0).unwrap();
    let x = input(2, 6, 1);
    assert!(matches!(pm.0.forward(&x, &tasks(&[0, 2])), Err(Error::UnknownName { .. })));
    let e = pm.0.forward(&x, &Ctx::eval()).err().unwrap();
    assert!(matches!(crate::LoraError::of(&e), Some(crate::LoraError::NoTaskIds { .. })), "{e}");
    assert!(matches!(pm.0.forward(&x, &tasks(&[0])), Err(Error::Count { expected: 2, got: 1, .. })));
}

/// With one task, a batch without task ids is routed as task 0 (the registry's single-task use); with more
/// tasks the ids stay required (tested above).
#[test]
fn single_task_poly_needs_no_task_ids() {
    let pm = PeftModel::new(one(6, 4), PolyConfig::new(2, 1, 3, 1, ["query"]), "default", 0).unwrap();
    perturb(&pm, 4);
    let x = input(3, 6, 2);
    let without = pm.0.forward(&x, &Ctx::eval()).unwrap().to_vec();
    let with = pm.0.forward(&x, &tasks(&[0, 0, 0])).unwrap().to_vec();
    assert_eq!(without, with);
    let base = one(6, 4).0.forward(&x, &Ctx::eval()).unwrap().to_vec();
    assert!(max_abs_diff(&without, &base) > 1e-3, "the perturbed adapter contributes");
}

#[test]
fn poly_load_checks_shapes_before_allocating() {
    let pm = poly(Tiny::new(6, 2, 0), PolyConfig::new(2, 3, 2, 2, ["value"]));
    let d = tempfile::tempdir().unwrap();
    pm.save_pretrained(d.path()).unwrap();
    let path = d.path().join(CONFIG_NAME);
    let text = std::fs::read_to_string(&path).unwrap().replace("\"n_skills\": 2", "\"n_skills\": 3");
    std::fs::write(&path, text).unwrap();
    let mut m = PeftModel::wrap(Tiny::new(6, 2, 0), 0);
    let err = m.load_adapter(d.path(), "x", &crate::registry()).unwrap_err();
    assert!(matches!(err, AdapterError::TensorShape { .. }), "{err}");
    assert!(m.adapter_names().is_empty() && m.layers[0][1].adapters().is_empty());
}
