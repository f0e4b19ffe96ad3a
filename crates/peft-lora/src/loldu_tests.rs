use ndarray::{Array2, Ix2};
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::{assert_grads, max_abs_diff};

use super::*;
use crate::testutil::{input, Tiny};

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
    let lm = LolduModel::new(&model, LolduConfig::new(3, ["query", "value"]), "default").unwrap();
    assert!(max_abs_diff(&y0, &y(&model)) < 1e-5);
    assert!(
        max_abs_diff(w0.as_slice().unwrap(), model.layers[0][0].base().dense_weight().unwrap().as_slice().unwrap())
            > 1e-3
    );
    let tr = lm.trainable_params();
    assert_eq!(tr.len(), 4);
    assert!(tr.iter().all(|p| p.numel() == 3));
    assert!(model.classifier.base().params().iter().all(|p| !p.trainable()));
    for (_, a) in &lm.sites.layers {
        a.z().update(|z| z.mapv_inplace(|v| v * 1.3 - 0.05));
    }
    let y1 = y(&model);
    lm.sites.merge().unwrap();
    assert!(max_abs_diff(&y1, &y(&model)) < 1e-5);
    lm.sites.unmerge().unwrap();
    assert!(max_abs_diff(&y1, &y(&model)) < 1e-5);
}

#[test]
fn loldu_save_load_save_is_byte_identical() {
    let model = Tiny::new(8, 2, 0);
    let lm = LolduModel::new(&model, LolduConfig::new(2, ["query"]), "default").unwrap();
    for (_, a) in &lm.sites.layers {
        a.z().update(|z| z.mapv_inplace(|v| v + 0.25));
    }
    let y1 = y(&model);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    lm.save_pretrained(d1.path()).unwrap();
    let text = std::fs::read_to_string(d1.path().join("adapter_config.json")).unwrap();
    assert!(text.contains("\"peft_type\": \"LOLDU\""), "{text}");
    let other = Tiny::new(8, 2, 0);
    let back = LolduModel::load(&other, d1.path(), "default").unwrap();
    assert!(max_abs_diff(&y1, &y(&other)) < 1e-5);
    back.save_pretrained(d2.path()).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
    }
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
    let model = Tiny::new(8, 1, 0);
    let w0 = model.layers[0][0].base().dense_weight().unwrap();
    assert!(matches!(
        LolduModel::new(&model, LolduConfig::new(9, ["query"]), "x").err().unwrap(),
        Error::Invalid { op: "loldu", .. }
    ));
    assert!(matches!(
        LolduModel::new(&model, LolduConfig::new(0, ["query"]), "x").err().unwrap(),
        Error::Invalid { .. }
    ));
    assert!(matches!(
        LolduModel::new(&model, LolduConfig::new(1, ["nothing"]), "x").err().unwrap(),
        Error::NoTargetMatched { .. }
    ));
    assert_eq!(model.layers[0][0].base().dense_weight().unwrap(), w0);
    // A singular weight (zero first column) has a zero pivot.
    let z = Array2::from_shape_fn((3, 3), |(i, j)| if j == 0 { 0.0 } else { (i + j) as f64 });
    assert!(matches!(loldu_factors(&z, 1), Err(Error::Invalid { .. })));
    let nan = Array2::from_elem((2, 2), f64::NAN);
    assert!(matches!(loldu_factors(&nan, 1), Err(Error::NonFinite { .. })));
}

mod prop {
    use peft_core::testing::{array_strategy, assert_grads};
    use proptest::prelude::*;

    use super::super::loldu_delta;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
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
