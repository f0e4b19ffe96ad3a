use ndarray::{Array2, ArrayD, Ix2};
use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::{assert_grads, max_abs_diff};

use super::*;
use crate::corda::tests::calib_batches;
use crate::structured::fdcheck;
use crate::testutil::{input, Tiny};

/// Adds LoRA-SB adapter `"default"` calibrated on `n` batches of width `d`, active.
fn init(model: Tiny, cfg: LoraSbConfig, n: usize) -> AdapterResult<PeftModel<Tiny>> {
    let mut m = PeftModel::wrap(model, 0);
    m.add_adapter_calibrated("default", Box::new(cfg), &mut |t: &Tiny, i| calib_batches(t, 8, n)(i))?;
    m.set_adapter("default")?;
    Ok(m)
}

fn sb(m: &PeftModel<Tiny>) -> &LoraSbTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<LoraSbTuner>().unwrap()
}

fn rand2(seed: u64, r: usize, c: usize) -> Array2<f64> {
    RandomInit::new(seed, 1.0).get("m", &[r, c]).unwrap().into_dimensionality::<Ix2>().unwrap().mapv(f64::from)
}

fn y(model: &Tiny) -> Vec<f32> {
    model.forward(&input(5, 8, 9), &Ctx::eval()).unwrap().to_vec()
}

fn close(a: &Array2<f64>, b: &Array2<f64>, tol: f64) -> bool {
    a.dim() == b.dim() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < tol)
}

#[test]
fn factors_are_orthonormal_and_the_best_rank_r_approximation() {
    let g = rand2(1, 6, 5);
    let (eta, r) = (0.1, 2);
    let (a, rr, b) = lora_sb_factors(&g, r, eta).unwrap();
    assert!(close(&a.dot(&a.t()), &Array2::eye(r), 1e-10), "A Aᵀ = I");
    assert!(close(&b.t().dot(&b), &Array2::eye(r), 1e-10), "Bᵀ B = I");
    assert!(rr[[0, 1]] == 0.0 && rr[[1, 0]] == 0.0 && rr[[0, 0]] >= rr[[1, 1]] && rr[[1, 1]] >= 0.0);
    let dw = g.mapv(|v| -eta * v.signum());
    let (_, sv, _) = peft_core::linalg::svd(&dw).unwrap();
    let err = (&b.dot(&rr).dot(&a) - &dw).iter().map(|v| v * v).sum::<f64>().sqrt();
    let want = sv.iter().skip(r).map(|s| s * s).sum::<f64>().sqrt();
    assert!((err - want).abs() < 1e-10, "{err} vs {want}");
}

#[test]
fn r_gradient_matches_finite_differences_and_the_full_space_identity() {
    let x = rand2(2, 3, 5).into_dyn();
    let (a, r, b) = (rand2(3, 2, 5).into_dyn(), rand2(4, 2, 2).into_dyn(), rand2(5, 4, 2).into_dyn());
    assert_grads(|t| lora_sb_delta(&t[0], &t[1], &t[2], &t[3]), &[x.clone(), a.clone(), r.clone(), b.clone()]);
    // ∂L/∂R = Bᵀ (∂L/∂W) Aᵀ (s = 1) with ∂L/∂W = gᵀ x.
    let rt = Tensor::<f64>::var(r);
    let g = rand2(6, 3, 4);
    let out = lora_sb_delta(&Tensor::new(x.clone()), &Tensor::new(a.clone()), &rt, &Tensor::new(b.clone())).unwrap();
    let grads = out.mul(&Tensor::new(g.clone().into_dyn())).unwrap().sum_all().backward().unwrap();
    let gr = grads.get(&rt).unwrap().clone().into_dimensionality::<Ix2>().unwrap();
    let gw = g.t().dot(&x.into_dimensionality::<Ix2>().unwrap());
    let (a2, b2) = (a.into_dimensionality::<Ix2>().unwrap(), b.into_dimensionality::<Ix2>().unwrap());
    assert!(close(&gr, &b2.t().dot(&gw).dot(&a2.t()), 1e-10));
}

#[test]
fn lora_sb_starts_one_approximate_step_ahead_trains_only_r_and_round_trips() {
    let model = Tiny::new(8, 2, 0);
    let head = model.classifier.base().params();
    for h in &head {
        h.set_trainable(true);
    }
    let y0 = y(&model);
    let w0 = model.layers[0][0].base().dense_weight().unwrap();
    let cfg = LoraSbConfig::new(2, ["query", "value"]);
    let mut m = init(model, cfg.clone(), 3).unwrap();
    assert_eq!(m.layers[0][0].base().dense_weight().unwrap(), w0, "W0 unchanged");
    assert!(!m.layers[0][0].base().params()[0].trainable(), "flags restored");
    assert!(!head[0].trainable(), "inject freezes the model's own parameters");
    assert!(max_abs_diff(&y0, &y(&m)) > 1e-7, "not base-equivalent by design");
    let tr = m.trainable_params();
    assert_eq!(tr.len(), 4);
    assert!(tr.iter().all(|p| p.shape() == [2, 2] && p.name().contains("lora_latent_mapping")));
    // ΔW at init is the rank-2 approximation of −η·sign(G): every entry is bounded by η·√(out·in).
    for (s, a) in sb(&m).layers() {
        let dw = a.delta_weight(s.base().as_ref()).unwrap().unwrap();
        assert!(dw.iter().all(|v| f64::from(v.abs()) <= cfg.eta() * 8.0 + 1e-9));
        assert!(dw.iter().any(|&v| v != 0.0));
    }
    sb(&m).layers()[0].1.lora_r().update(|r| r.mapv_inplace(|v| v * 3.0 + 0.1));
    let y1 = y(&m);
    m.merge_adapter().unwrap();
    assert!(max_abs_diff(&y1, &y(&m)) < 1e-5);
    m.unmerge_adapter().unwrap();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    m.save_pretrained(d1.path()).unwrap();
    // Loading needs no calibration data: the factors come from the file.
    let (back, report) = PeftModel::from_pretrained(Tiny::new(8, 2, 0), d1.path(), &crate::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(max_abs_diff(&y1, &y(&back)) < 1e-6);
    assert!(back.config("default").unwrap().needs_calibration(), "the stored config is the file's");
    back.save_pretrained(d2.path()).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
    }
    // A file whose rank contradicts the config is refused before anything is attached.
    let path = d1.path().join(CONFIG_NAME);
    let text = std::fs::read_to_string(&path).unwrap().replace("\"r\": 2", "\"r\": 1");
    std::fs::write(&path, text).unwrap();
    let mut other = PeftModel::wrap(Tiny::new(8, 2, 0), 0);
    let err = other.load_adapter(d1.path(), "x", &crate::registry()).unwrap_err();
    assert!(matches!(err, AdapterError::TensorShape { .. }), "{err}");
    assert!(other.layers[0][0].adapters().is_empty());
}

#[test]
fn lora_sb_r_gradients_through_the_model_match_finite_differences() {
    let m = init(Tiny::new(8, 1, 0), LoraSbConfig::new(2, ["query", "dense"]), 2).unwrap();
    for (_, a) in sb(&m).layers() {
        a.lora_r().update(|r| r.mapv_inplace(|v| v * 2.0 + 0.3));
    }
    let x = input(3, 8, 4);
    let r = input(3, 3, 5);
    let f = || m.forward(&x, &Ctx::eval()).unwrap().mul(&r).unwrap().sum_all();
    fdcheck::check(&f, &m.trainable_params(), 1e-2, 3e-3);
}

#[test]
fn lora_sb_reports_typed_errors() {
    let run = |cfg: LoraSbConfig, n: usize| init(Tiny::new(8, 1, 0), cfg, n).err().unwrap();
    assert!(matches!(
        crate::LoraError::of_adapter(&run(LoraSbConfig::new(9, ["query"]), 2)),
        Some(crate::LoraError::Rank { method: "lora_sb", r: 9, .. })
    ));
    assert!(run(LoraSbConfig::new(2, ["query"]), 0).to_string().contains("empty"));
    let mut bad = LoraSbConfig::new(2, ["query"]);
    bad.lr = f64::NAN;
    assert!(matches!(run(bad, 2), AdapterError::InvalidConfig { .. }));
    // Without calibration data the init is refused.
    let e = PeftModel::new(Tiny::new(8, 1, 0), LoraSbConfig::new(2, ["query"]), "default", 0).err().unwrap();
    assert!(matches!(e, AdapterError::Unsupported { .. }), "{e}");
    let mut m = PeftModel::wrap(Tiny::new(8, 1, 0), 0);
    let mut nan = |t: &Tiny, i: usize| -> Result<Option<Tensor>> {
        if i > 0 {
            return Ok(None);
        }
        let x = Tensor::new(ArrayD::from_elem(ndarray::IxDyn(&[2, 8]), f32::NAN));
        Ok(Some(t.forward(&x, &Ctx::eval())?.sum_all()))
    };
    let e = m.add_adapter_calibrated("default", Box::new(LoraSbConfig::new(2, ["query"])), &mut nan).err().unwrap();
    assert!(matches!(e, AdapterError::Core(Error::NonFinite { .. })), "{e}");
    assert!(m.layers[0][0].adapters().is_empty());
    assert!(!m.layers[0][0].base().params()[0].trainable());
}

mod prop {
    use peft_core::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    use super::super::lora_sb_delta;

    proptest! {
        #![proptest_config(peft_core::testing::proptest_config(16))]
        /// Gradients of x, A, R and B on random shapes (size-1 axes included).
        #[test]
        fn lora_sb_delta_gradients_match_finite_differences(
            (x, a, r, b) in (1usize..4, 1usize..5, 1usize..5, 1usize..4).prop_flat_map(|(n, i, o, k)| (
                array_strategy(vec![n, i], -1.0, 1.0),
                array_strategy(vec![k, i], -1.0, 1.0),
                array_strategy(vec![k, k], -1.0, 1.0),
                array_strategy(vec![o, k], -1.0, 1.0),
            ))
        ) {
            assert_grads(|t| lora_sb_delta(&t[0], &t[1], &t[2], &t[3]), &[x, a, r, b]);
        }
    }
}
