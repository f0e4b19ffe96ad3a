use ndarray::{Array2, ArrayD, Ix2};
use peft_core::nn::{Ctx, Linear, Module, RandomInit, Visitor, WeightSource};
use peft_core::testing::max_abs_diff;

use peft_core::adapter::{AdapterError, PeftModel};

use super::*;
use crate::corda::tests::{calib_batches, calibrated};
use crate::testutil::{input, Tiny};
use crate::LoraModelExt;

fn y(model: &Tiny) -> Vec<f32> {
    model.forward(&input(5, 8, 9), &Ctx::eval()).unwrap().to_vec()
}

/// Two independent 6→6 sites `a`, `b`.
struct Two(Linear, Linear);
impl Module for Two {
    fn visit(&self, v: &mut dyn Visitor) {
        self.0.visit(v);
        self.1.visit(v);
    }
}

fn two() -> Two {
    let init = RandomInit::new(0, 0.3);
    Two(Linear::load("a", 6, 6, false, &init).unwrap(), Linear::load("b", 6, 6, false, &init).unwrap())
}

/// Rows `z · diag(√λ) · Qᵀ` with a random orthonormal `Q` (returned).
fn data(seed: u64, rows: usize, lambda: &[f64]) -> (Array2<f32>, Array2<f64>) {
    let d = lambda.len();
    let m = RandomInit::new(99, 1.0).get("q", &[d, d]).unwrap().into_dimensionality::<Ix2>().unwrap().mapv(f64::from);
    let (q, _) = peft_core::linalg::qr(&m).unwrap();
    let z = RandomInit::new(seed, 1.0).get("z", &[rows, d]).unwrap().into_dimensionality::<Ix2>().unwrap();
    let x = Array2::from_shape_fn((rows, d), |(i, j)| {
        (0..d).map(|k| f64::from(z[[i, k]]) * lambda[k].sqrt() * q[[j, k]]).sum::<f64>()
    });
    (x.mapv(|v| v as f32), q)
}

#[test]
fn redistribution_keeps_the_largest_ratios_within_budget() {
    let r = vec![vec![0.5, 0.3], vec![0.4, 0.01]];
    assert_eq!(redistribute(&r, 2), vec![1, 1]);
    assert_eq!(redistribute(&r, 3), vec![2, 1]);
    assert_eq!(redistribute(&r, 0), vec![0, 0]);
}

#[test]
fn leading_components_match_the_true_eigenvectors_and_ranks_move_to_the_informative_site() {
    let m = two();
    let lam_a = [10.0, 5.0, 0.01, 0.01, 0.01, 0.01];
    let lam_b = [1.0; 6];
    let mut calib = |i: usize| -> Result<Option<Tensor>> {
        if i >= 6 {
            return Ok(None);
        }
        let (xa, _) = data(10 + i as u64, 400, &lam_a);
        let (xb, _) = data(20 + i as u64, 400, &lam_b);
        let ya = m.0.forward(&Tensor::new(xa.into_dyn()), &Ctx::eval())?;
        let yb = m.1.forward(&Tensor::new(xb.into_dyn()), &Ctx::eval())?;
        Ok(Some(ya.sum_all().add(&yb.sum_all())?))
    };
    let cfg = LoraConfig::new(1, 4.0, ["a", "b"]);
    let eva = EvaConfig::default();
    let res = eva_calibrate(&m, &cfg, &eva, &mut calib, None).unwrap();
    let (_, q) = data(0, 1, &lam_a);
    for i in 0..2 {
        let c = res.pca[0].components.row(i);
        let cos: f64 = (0..6).map(|j| c[j] * q[[j, i]]).sum();
        assert!(cos.abs() > 0.99, "component {i}: |cos| = {}", cos.abs());
    }
    // Budget 2 = Σ r_l; max components round(1·2) = 2; the informative site takes both.
    assert_eq!(res.ranks, vec![2, 0]);
    assert!(res.ranks.iter().zip(&res.budget).all(|(k, r)| *k <= (*r as f64 * eva.rho).round() as usize));
    assert_eq!(res.ranks.iter().sum::<usize>(), res.budget.iter().sum::<usize>());
    // The full init drops site `b` (excluded) and gives `a` rank 2 with α_a/k_a = α/r.
    let mut calib2 = |i: usize| calib(i);
    let (tuner, _) = eva_init(&m, &cfg, &eva, "default", 0, &mut calib2, None).unwrap();
    let layers = tuner.layers();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].0.path(), "a");
    assert_eq!(layers[0].1.spec().r, 2);
    assert!((layers[0].1.spec().alpha / 2.0 - 4.0 / 1.0).abs() < 1e-12);
    assert!(m.1.adapters().is_empty());
}

#[test]
fn eva_is_identity_at_init_with_orthonormal_a_and_round_trips() {
    let model = Tiny::new(8, 2, 0);
    let y0 = y(&model);
    let eva = EvaConfig { tau: 0.999999, ..Default::default() };
    let cfg =
        EvaLoraConfig { eva, max_batches: None, ..EvaLoraConfig::new(LoraConfig::new(2, 8.0, ["query", "value"])) };
    let mut lm = calibrated(model, Box::new(cfg), 4).unwrap();
    assert_eq!(max_abs_diff(&y0, &y(&lm)), 0.0, "B = 0");
    let layers = lm.lora_layers("default").unwrap();
    let mut total = 0;
    for (_, l) in &layers {
        let a = l.lora_a().value().into_dimensionality::<Ix2>().unwrap().mapv(f64::from);
        let k = a.nrows();
        total += k;
        let aat = a.dot(&a.t());
        assert!((&aat - &Array2::<f64>::eye(k)).iter().all(|v| v.abs() < 1e-5), "A Aᵀ = I");
        assert!((l.spec().alpha / k as f64 - 8.0 / 2.0).abs() < 1e-12, "α_l/k_l = α/r");
        assert!(l.lora_b().value().iter().all(|&v| v == 0.0));
    }
    assert_eq!(total, 8, "budget Σ r_l = 4 sites × 2 conserved");
    // Train-like change; merge == unmerged.
    for (_, l) in &layers {
        l.lora_b().update(|b| b.mapv_inplace(|_| 0.05));
    }
    let y1 = y(&lm);
    lm.merge_adapter().unwrap();
    assert!(max_abs_diff(&y1, &y(&lm)) < 1e-5);
    lm.unmerge_adapter().unwrap();
    // save -> load -> save byte-identical (rank/alpha patterns and eva_config included).
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    lm.save_pretrained(d1.path()).unwrap();
    let text = std::fs::read_to_string(d1.path().join("adapter_config.json")).unwrap();
    assert!(text.contains("\"init_lora_weights\": \"eva\"") && text.contains("\"rho\": 2.0"), "{text}");
    let (back, report) = PeftModel::from_pretrained(Tiny::new(8, 2, 0), d1.path(), &crate::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(max_abs_diff(&y1, &y(&back)) < 1e-5);
    back.save_pretrained(d2.path()).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
    }
}

/// Audit item: whitening divided by `√λ_i`; PEFT divides by `√s_i` with `s_i` the singular value of the
/// centred calibration rows. Checked against an SVD of the rows themselves.
#[test]
fn whitening_divides_by_the_root_singular_value_of_the_centred_rows() {
    let m = two();
    let lam = [10.0, 5.0, 0.01, 0.01, 0.01, 0.01];
    let xs: Vec<Array2<f32>> = (0..3).map(|i| data(30 + i, 200, &lam).0).collect();
    let mut calib = |i: usize| -> Result<Option<Tensor>> {
        let Some(x) = xs.get(i) else { return Ok(None) };
        let ya = m.0.forward(&Tensor::new(x.clone().into_dyn()), &Ctx::eval())?;
        let yb = m.1.forward(&Tensor::new(x.clone().into_dyn()), &Ctx::eval())?;
        Ok(Some(ya.sum_all().add(&yb.sum_all())?))
    };
    let cfg = LoraConfig::new(1, 4.0, ["a"]);
    let eva = EvaConfig { whiten: true, tau: 0.999999, ..Default::default() };
    let (tuner, _) = eva_init(&m, &cfg, &eva, "default", 0, &mut calib, None).unwrap();
    let a = tuner.layers()[0].1.lora_a().value().into_dimensionality::<Ix2>().unwrap().mapv(f64::from);
    // All rows seen, centred, in f64: their singular values.
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let all = ndarray::concatenate(ndarray::Axis(0), &views).unwrap().mapv(f64::from);
    let centred = &all - &all.mean_axis(ndarray::Axis(0)).unwrap();
    let (_, s, _) = peft_core::linalg::svd(&centred).unwrap();
    for i in 0..a.nrows() {
        let norm = a.row(i).dot(&a.row(i)).sqrt();
        let want = 1.0 / s[i].sqrt();
        assert!((norm / want - 1.0).abs() < 1e-4, "row {i}: |a| = {norm}, 1/sqrt(s) = {want}");
        // (the old rule, 1/sqrt(lambda) = sqrt((n-1))/s, is far from it)
        assert!((norm * s[i] / (all.nrows() as f64 - 1.0).sqrt() - 1.0).abs() > 0.5);
    }
}

/// Audit item: `use_label_mask` was ignored. With token labels in the calibration context, rows labelled
/// `label_mask_value` are left out (the PCA equals the PCA of the other rows); without the flag they count.
#[test]
fn use_label_mask_leaves_out_masked_positions() {
    use peft_core::nn::TokenLabels;
    let m = two();
    let (clean, _) = data(40, 300, &[10.0, 5.0, 0.1, 0.1, 0.1, 0.1]);
    // 100 outlier rows along the last axis, labelled -100; the batch is [4, 100] tokens.
    let outliers = Array2::from_shape_fn((100, 6), |(i, j)| if j == 5 { 50.0 + i as f32 } else { 0.0 });
    let batch = ndarray::concatenate(ndarray::Axis(0), &[clean.view(), outliers.view()]).unwrap();
    let labels: Vec<i64> = (0..400).map(|i| if i < 300 { 1 } else { -100 }).collect();
    let run = |x: &Array2<f32>, labels: Option<&[i64]>, use_label_mask: bool| {
        let mut calib = |i: usize| -> Result<Option<Tensor>> {
            if i >= 1 {
                return Ok(None);
            }
            let mut ctx = peft_core::train::calibration_ctx(None);
            if let Some(l) = labels {
                ctx.insert(TokenLabels { labels: l.to_vec(), shape: [4, 100] });
            }
            let y = m.0.forward(&Tensor::new(x.clone().into_dyn()), &ctx)?;
            m.1.forward(&Tensor::new(x.clone().into_dyn()), &ctx)?;
            Ok(Some(y.sum_all()))
        };
        let eva = EvaConfig { use_label_mask, ..Default::default() };
        eva_calibrate(&m, &LoraConfig::new(1, 4.0, ["a", "b"]), &eva, &mut calib, None).unwrap()
    };
    let masked = run(&batch, Some(&labels), true);
    let reference = run(&clean, None, true);
    let unmasked = run(&batch, Some(&labels), false);
    for (p, q) in masked.pca[0].variance.iter().zip(&reference.pca[0].variance) {
        assert!((p / q - 1.0).abs() < 1e-9, "masked variance {p} vs clean-only {q}");
    }
    assert!(unmasked.pca[0].variance[0] > 10.0 * reference.pca[0].variance[0], "outliers count without the flag");
}

#[test]
fn eva_reports_typed_errors() {
    let model = Tiny::new(8, 1, 0);
    let cfg = LoraConfig::new(2, 8.0, ["query"]);
    let run = |cfg: &LoraConfig, eva: &EvaConfig, n: usize| {
        eva_init(&model, cfg, eva, "default", 0, &mut calib_batches(&model, 8, n), None).err().unwrap()
    };
    assert!(run(&cfg, &EvaConfig::default(), 0).to_string().contains("empty"));
    assert!(matches!(
        crate::LoraError::of_adapter(&run(&cfg, &EvaConfig { rho: 0.5, ..Default::default() }, 2)),
        Some(crate::LoraError::Field { method: "eva", field: "rho", .. })
    ));
    assert!(matches!(
        crate::LoraError::of_adapter(&run(&LoraConfig::new(9, 8.0, ["query"]), &EvaConfig::default(), 2)),
        Some(crate::LoraError::Rank { method: "eva", r: 9, .. })
    ));
    let mut nan = |i: usize| -> Result<Option<Tensor>> {
        if i > 1 {
            return Ok(None);
        }
        let x = Tensor::new(ArrayD::from_elem(ndarray::IxDyn(&[2, 8]), f32::NAN));
        Ok(Some(model.forward(&x, &Ctx::eval())?.sum_all()))
    };
    let e = eva_init(&model, &cfg, &EvaConfig::default(), "default", 0, &mut nan, None).err().unwrap();
    assert!(matches!(e, AdapterError::Core(Error::NonFinite { .. })), "{e}");
    assert!(model.layers[0][0].adapters().is_empty());
}
