use ndarray::{Array2, Ix2};
use peft_core::adapter::{AdapterError, PeftModel};
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::{assert_grads, max_abs_diff};

use super::*;
use crate::testutil::{input, Tiny};
use crate::LoraModelExt;

/// Calibration batch `i` of `n` on `model` (width `d`), as `PeftModel::add_adapter_calibrated` calls it.
pub(crate) fn calib_batch(model: &Tiny, d: usize, n: usize, i: usize) -> Result<Option<Tensor>> {
    let targets: Vec<i64> = (0..6).map(|i| (i % 3) as i64).collect();
    if i >= n {
        return Ok(None);
    }
    let x = input(6, d, 50 + i as u64);
    Ok(Some(model.forward(&x, &Ctx::eval())?.cross_entropy(&targets, None, 0.0)?))
}

/// `model` with a calibrated adapter from `cfg` (`n` batches), active.
pub(crate) fn calibrated(
    model: Tiny,
    cfg: Box<dyn TunerConfig>,
    n: usize,
) -> std::result::Result<PeftModel<Tiny>, AdapterError> {
    let mut pm = PeftModel::wrap(model, 0);
    pm.add_adapter_calibrated("default", cfg, &mut |m: &Tiny, i| calib_batch(m, 8, n, i))?;
    pm.set_adapter("default")?;
    Ok(pm)
}

fn rand2(seed: u64, r: usize, c: usize) -> Array2<f64> {
    RandomInit::new(seed, 1.0).get("m", &[r, c]).unwrap().into_dimensionality::<Ix2>().unwrap().mapv(f64::from)
}

pub(crate) fn calib_batches(model: &Tiny, d: usize, n: usize) -> impl FnMut(usize) -> Result<Option<Tensor>> + '_ {
    move |i| calib_batch(model, d, n, i)
}

fn y(model: &Tiny, d: usize) -> Vec<f32> {
    model.forward(&input(5, d, 9), &Ctx::eval()).unwrap().to_vec()
}

#[test]
fn full_rank_factors_reconstruct_w_and_ipm_kpm_take_head_and_tail() {
    let w = rand2(1, 6, 5);
    let x = rand2(2, 20, 5);
    let cov = x.t().dot(&x) / 20.0;
    let f = corda_factors(&w, &cov, 5, 1.0, CordaMethod::Ipm).unwrap();
    let ba = f.b.dot(&f.a).mapv(f64::from);
    let rel = (&ba - &w).iter().map(|v| v * v).sum::<f64>().sqrt() / w.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(rel < 1e-5, "U Σ V̂ᵀ vs W: {rel}");
    assert_eq!(f.delta, 0.01);
    // ‖B[:, j]‖² = Σ_j / s: IPM takes the largest Σ, KPM the smallest.
    let s = 2.0;
    for (m, want) in [(CordaMethod::Ipm, [f.sigma[0], f.sigma[1]]), (CordaMethod::Kpm, [f.sigma[3], f.sigma[4]])] {
        let g = corda_factors(&w, &cov, 2, s, m).unwrap();
        for (j, want) in want.iter().enumerate() {
            let n2: f64 = g.b.column(j).iter().map(|&v| f64::from(v).powi(2)).sum();
            assert!((n2 - want / s).abs() < 1e-4 * want, "{m:?} {j}: {n2} vs {}", want / s);
        }
    }
}

#[test]
fn damping_loop_terminates_on_a_singular_covariance() {
    let w = rand2(3, 4, 6);
    let x = rand2(4, 2, 6); // rank 2 covariance in 6 dims
    let cov = x.t().dot(&x);
    let f = corda_factors(&w, &cov, 3, 1.0, CordaMethod::Kpm).unwrap();
    assert!(f.delta >= 0.01 && f.a.iter().chain(f.b.iter()).all(|v| v.is_finite()));
}

#[test]
fn corda_keeps_the_output_at_init_merges_exactly_and_round_trips() {
    for method in [CordaMethod::Ipm, CordaMethod::Kpm] {
        let model = Tiny::new(8, 2, 0);
        let y0 = y(&model, 8);
        let w0 = model.layers[0][0].base().dense_weight().unwrap();
        let corda = CordaConfig { corda_method: method, ..Default::default() };
        let cfg = CordaLoraConfig {
            corda,
            max_batches: None,
            ..CordaLoraConfig::new(LoraConfig::new(4, 8.0, ["query", "value"]))
        };
        let mut lm = calibrated(model, Box::new(cfg), 3).unwrap();
        assert!(max_abs_diff(&y0, &y(&lm, 8)) < 1e-5, "{method:?}: identity at init");
        assert!(
            max_abs_diff(w0.as_slice().unwrap(), lm.layers[0][0].base().dense_weight().unwrap().as_slice().unwrap())
                > 1e-3
        );
        assert_eq!(lm.trainable_params().len(), 8);
        // Train-like change, then merge == unmerged forward.
        for (_, l) in lm.lora_layers("default").unwrap() {
            l.lora_b().update(|b| b.mapv_inplace(|v| v * 1.5 + 0.01));
        }
        let y1 = y(&lm, 8);
        lm.merge_adapter().unwrap();
        assert!(max_abs_diff(&y1, &y(&lm, 8)) < 1e-5);
        lm.unmerge_adapter().unwrap();
        // Conversion to a plain LoRA delta for the original W: W0 + s·B'A' == W_res + s·B·A.
        let dir = tempfile::tempdir().unwrap();
        lm.save_mutated_as_lora(dir.path(), "default").unwrap();
        let (plain, _) = PeftModel::from_pretrained(Tiny::new(8, 2, 0), dir.path(), &crate::registry()).unwrap();
        assert!(max_abs_diff(&y1, &y(&plain, 8)) < 1e-4);
        // The saved config says what the adapter is; loading it without the data is refused (see tuner_io_tests).
        let d1 = tempfile::tempdir().unwrap();
        lm.save_pretrained(d1.path()).unwrap();
        let text = std::fs::read_to_string(d1.path().join("adapter_config.json")).unwrap();
        assert!(text.contains("\"init_lora_weights\": \"corda\"") && text.contains("\"corda_method\""), "{text}");
        assert!(PeftModel::from_pretrained(Tiny::new(8, 2, 1), d1.path(), &crate::registry()).is_err());
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    // CorDA trains plain LoRA factors: y = s·(x Aᵀ) Bᵀ.
    let x = rand2(5, 3, 4).into_dyn();
    let a = rand2(6, 2, 4).into_dyn();
    let b = rand2(7, 5, 2).into_dyn();
    assert_grads(|t| Ok(t[0].linear(&t[1], None)?.linear(&t[2], None)?.mul_scalar(0.5)), &[x, a, b]);
}

#[test]
fn corda_reports_typed_errors() {
    let model = Tiny::new(8, 1, 0);
    let corda = CordaConfig::default();
    let run = |cfg: &LoraConfig, n: usize| {
        corda_init(&model, cfg, &corda, "default", &mut calib_batches(&model, 8, n), None).err().unwrap()
    };
    let w0 = model.layers[0][0].base().dense_weight().unwrap();
    let e = run(&LoraConfig::new(9, 8.0, ["query"]), 2);
    assert!(
        matches!(crate::LoraError::of_adapter(&e), Some(crate::LoraError::Rank { method: "corda", r: 9, max: 8, site }) if site == "encoder.layer.0.attention.self.query"),
        "{e}"
    );
    assert!(run(&LoraConfig::new(2, 8.0, ["query"]), 0).to_string().contains("empty"));
    let mut dora = LoraConfig::new(2, 8.0, ["query"]);
    dora.use_dora = true;
    assert!(matches!(run(&dora, 2), AdapterError::InvalidConfig { .. }));
    // NaN activations.
    let mut nan = |i: usize| -> Result<Option<Tensor>> {
        if i > 0 {
            return Ok(None);
        }
        let x = Tensor::new(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2, 8]), f32::NAN));
        Ok(Some(model.forward(&x, &Ctx::eval())?.sum_all()))
    };
    let e = corda_init(&model, &LoraConfig::new(2, 8.0, ["query"]), &corda, "default", &mut nan, None).err().unwrap();
    assert!(matches!(e, AdapterError::Core(Error::NonFinite { .. })), "{e}");
    // Nothing was left attached or rewritten.
    assert!(model.layers[0][0].adapters().is_empty());
    assert_eq!(model.layers[0][0].base().dense_weight().unwrap(), w0);
    // The plain LoRA path refuses the data-driven init, and CorDA without data is refused too.
    let mut c = LoraConfig::new(2, 8.0, ["query"]);
    c.init_lora_weights = InitLoraWeights::Named("corda".into());
    assert!(PeftModel::new(Tiny::new(8, 1, 0), c, "default", 0).is_err());
    let e = PeftModel::new(Tiny::new(8, 1, 0), CordaLoraConfig::new(LoraConfig::new(2, 8.0, ["query"])), "default", 0);
    assert!(matches!(e, Err(AdapterError::Unsupported { .. })));
    let e = corda_factors(&Array2::zeros((3, 3)), &Array2::from_elem((3, 3), f64::NAN), 1, 1.0, CordaMethod::Ipm);
    assert!(matches!(e, Err(Error::NonFinite { .. })));
}
