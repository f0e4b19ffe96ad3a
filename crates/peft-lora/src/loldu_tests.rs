use ndarray::{Array2, Ix2};
use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::{assert_grads, max_abs_diff};

use super::*;
use crate::structured::fdcheck;
use crate::testutil::{input, Tiny};

fn loldu(m: &PeftModel<Tiny>) -> &LolduTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<LolduTuner>().unwrap()
}

fn rand2(seed: u64, r: usize, c: usize) -> Array2<f64> {
    RandomInit::new(seed, 1.0).get("m", &[r, c]).unwrap().into_dimensionality::<Ix2>().unwrap().mapv(f64::from)
}

fn y(model: &Tiny) -> Vec<f32> {
    model.forward(&input(5, 8, 9), &Ctx::eval()).unwrap().to_vec()
}

#[test]
fn full_rank_p_l_d_u_hat_is_w() {
    for (o, i) in [(5, 4), (4, 6), (5, 5)] {
        let w = rand2(1, o, i);
        let k = o.min(i);
        let f = loldu_factors(&w, k).unwrap();
        let rec = (&f.pl * &f.d.view().insert_axis(ndarray::Axis(0))).dot(&f.u_hat);
        assert!((&rec - &w).iter().all(|v| v.abs() < 1e-10), "{o}x{i}");
        assert!((0..k).all(|j| (f.u_hat[[j, j]] - 1.0).abs() < 1e-12), "unit diagonal");
    }
}

#[test]
fn loldu_is_identity_at_init_trains_r_per_site_and_merges_exactly() {
    let model = Tiny::new(8, 2, 0);
    let y0 = y(&model);
    let w0 = model.layers[0][0].base().dense_weight().unwrap();
    let mut lm = PeftModel::new(model, LolduConfig::new(3, ["query", "value"]), "default", 0).unwrap();
    assert!(max_abs_diff(&y0, &y(&lm)) < 1e-5);
    assert!(
        max_abs_diff(w0.as_slice().unwrap(), lm.layers[0][0].base().dense_weight().unwrap().as_slice().unwrap()) > 1e-3
    );
    let tr = lm.trainable_params();
    assert_eq!(tr.len(), 4);
    assert!(tr.iter().all(|p| p.numel() == 3));
    assert!(lm.classifier.base().params().iter().all(|p| !p.trainable()));
    for (_, a) in loldu(&lm).layers() {
        a.z().update(|z| z.mapv_inplace(|v| v * 1.3 - 0.05));
    }
    let y1 = y(&lm);
    lm.merge_adapter().unwrap();
    assert!(max_abs_diff(&y1, &y(&lm)) < 1e-5);
    lm.unmerge_adapter().unwrap();
    assert!(max_abs_diff(&y1, &y(&lm)) < 1e-5);
    // Deleting the adapter gives the base its original weight back; merge_and_unload keeps the trained one.
    lm.delete_adapter("default").unwrap();
    assert!(max_abs_diff(&y0, &y(&lm)) < 1e-5);
    let w = lm.layers[0][0].base().dense_weight().unwrap();
    assert!(max_abs_diff(w.as_slice().unwrap(), w0.as_slice().unwrap()) < 1e-5);
    lm.add_adapter("again", LolduConfig::new(3, ["query", "value"])).unwrap();
    lm.set_adapter("again").unwrap();
    let l = lm.tuner("again").unwrap().as_any().downcast_ref::<LolduTuner>().unwrap();
    for (_, a) in l.layers() {
        a.z().update(|z| z.mapv_inplace(|v| v * 1.3 - 0.05));
    }
    let tiny = lm.merge_and_unload().unwrap();
    assert!(max_abs_diff(&y1, &y(&tiny)) < 1e-5);
    assert!(tiny.layers[0][0].adapters().is_empty());
}

#[test]
fn loldu_z_gradients_through_the_model_match_finite_differences() {
    let lm = PeftModel::new(Tiny::new(4, 1, 0), LolduConfig::new(2, ["query", "dense"]), "default", 0).unwrap();
    for (_, a) in loldu(&lm).layers() {
        a.z().update(|z| z.mapv_inplace(|v| v * 0.9 + 0.1));
    }
    let x = input(3, 4, 4);
    let r = input(3, 3, 5);
    let f = || lm.forward(&x, &Ctx::eval()).unwrap().mul(&r).unwrap().sum_all();
    fdcheck::check(&f, &lm.trainable_params(), 1e-2, 3e-3);
}

#[test]
fn loldu_save_load_save_is_byte_identical() {
    let lm = PeftModel::new(Tiny::new(8, 2, 0), LolduConfig::new(2, ["query"]), "default", 0).unwrap();
    for (_, a) in loldu(&lm).layers() {
        a.z().update(|z| z.mapv_inplace(|v| v + 0.25));
    }
    let y1 = y(&lm);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    lm.save_pretrained(d1.path()).unwrap();
    let text = std::fs::read_to_string(d1.path().join(CONFIG_NAME)).unwrap();
    assert!(text.contains("\"peft_type\": \"LOLDU\""), "{text}");
    let f = peft_core::io::safetensors::SafeTensorsFile::open(d1.path().join(WEIGHTS_NAME)).unwrap();
    assert!(f.contains("base_model.model.encoder.layer.1.attention.self.query.loldu_z"));
    assert_eq!(f.len(), 2);
    let (back, report) = PeftModel::from_pretrained(Tiny::new(8, 2, 0), d1.path(), &crate::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(max_abs_diff(&y1, &y(&back)) < 1e-5);
    back.save_pretrained(d2.path()).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
    }
    // A rank the file contradicts is refused before any weight is rewritten.
    let path = d1.path().join(CONFIG_NAME);
    std::fs::write(&path, text.replace("\"r\": 2", "\"r\": 3")).unwrap();
    let mut m = PeftModel::wrap(Tiny::new(8, 2, 0), 0);
    let w0 = m.layers[0][0].base().dense_weight().unwrap();
    let err = m.load_adapter(d1.path(), "x", &crate::registry()).unwrap_err();
    assert!(matches!(err, AdapterError::TensorShape { .. }), "{err}");
    assert_eq!(m.layers[0][0].base().dense_weight().unwrap(), w0);
    assert!(m.layers[0][0].adapters().is_empty());
}

#[test]
fn z_gradients_match_finite_differences_and_the_frobenius_identity() {
    let x = rand2(2, 3, 5).into_dyn();
    let w = rand2(3, 4, 5);
    let f = loldu_factors(&w, 3).unwrap();
    let (uh, pl) = (f.u_hat.clone().into_dyn(), f.pl.clone().into_dyn());
    let z = f.d.clone().into_dyn();
    let sigma = 0.7;
    assert_grads(|t| loldu_delta(&t[0], &t[1], &t[2], &t[3], sigma), &[x.clone(), uh.clone(), pl.clone(), z.clone()]);
    // ∂L/∂z_i = σ·⟨G, P L_{:,i} Û_{i,:}⟩_F with G = ∂L/∂W_eff = gᵀx for L = Σ g ⊙ y.
    let zt = Tensor::<f64>::var(z);
    let g = rand2(4, 3, 4);
    let out = loldu_delta(&Tensor::new(x.clone()), &Tensor::new(uh), &Tensor::new(pl), &zt, sigma).unwrap();
    let grads = out.mul(&Tensor::new(g.clone().into_dyn())).unwrap().sum_all().backward().unwrap();
    let gz = grads.get(&zt).unwrap();
    let gw = g.t().dot(&x.into_dimensionality::<Ix2>().unwrap()); // [out, in]
    for i in 0..3 {
        let want: f64 = (0..4)
            .flat_map(|o| (0..5).map(move |c| (o, c)))
            .map(|(o, c)| gw[[o, c]] * f.pl[[o, i]] * f.u_hat[[i, c]])
            .sum::<f64>()
            * sigma;
        assert!((gz[[i]] - want).abs() < 1e-10, "{i}: {} vs {want}", gz[[i]]);
    }
}

#[test]
fn loldu_reports_typed_errors() {
    let w0 = Tiny::new(8, 1, 0).layers[0][0].base().dense_weight().unwrap();
    let fail = |c: LolduConfig| {
        let mut m = PeftModel::wrap(Tiny::new(8, 1, 0), 0);
        let e = m.add_adapter("x", c).err().unwrap();
        assert_eq!(m.layers[0][0].base().dense_weight().unwrap(), w0, "nothing rewritten");
        assert!(m.layers[0][0].adapters().is_empty());
        e
    };
    let e = fail(LolduConfig::new(9, ["query"]));
    assert!(
        matches!(crate::LoraError::of_adapter(&e), Some(crate::LoraError::Rank { method: "loldu", r: 9, .. })),
        "{e}"
    );
    assert!(matches!(fail(LolduConfig::new(0, ["query"])), AdapterError::InvalidConfig { .. }));
    assert!(matches!(fail(LolduConfig::new(1, ["nothing"])), AdapterError::Core(Error::NoTargetMatched { .. })));
    // A singular weight (zero first column) has a zero pivot.
    let z = Array2::from_shape_fn((3, 3), |(i, j)| if j == 0 { 0.0 } else { (i + j) as f64 });
    let e = loldu_factors(&z, 1).err().unwrap();
    assert!(matches!(crate::LoraError::of(&e), Some(crate::LoraError::ZeroPivot { pivot: 0, .. })), "{e}");
    let nan = Array2::from_elem((2, 2), f64::NAN);
    assert!(matches!(loldu_factors(&nan, 1), Err(Error::NonFinite { .. })));
}

mod prop {
    use peft_core::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    use super::super::loldu_delta;

    proptest! {
        #![proptest_config(peft_core::testing::proptest_config(16))]
        /// Gradients of x, Û, PL and z on random shapes (size-1 axes included).
        #[test]
        fn loldu_delta_gradients_match_finite_differences(
            (x, u, pl, z) in (1usize..4, 1usize..5, 1usize..5, 1usize..4).prop_flat_map(|(n, i, o, r)| (
                array_strategy(vec![n, i], -1.0, 1.0),
                array_strategy(vec![r, i], -1.0, 1.0),
                array_strategy(vec![o, r], -1.0, 1.0),
                array_strategy(vec![r], -1.0, 1.0),
            ))
        ) {
            assert_grads(|t| loldu_delta(&t[0], &t[1], &t[2], &t[3], 0.5), &[x, u, pl, z]);
        }
    }
}
