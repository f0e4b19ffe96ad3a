use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{linear_sites, Ctx};
use peft_core::testing::max_abs_diff;
use peft_models::bert::BertModel;

use super::*;
use crate::testutil::{fd_check, out, perturb, tiny, weighted_sum};

type Model = PeftModel<BertModel>;

fn tuner(m: &Model) -> &Ia3Tuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<Ia3Tuner>().unwrap()
}

/// Vectors around 1 (0.5..1.5), away from zero so unmerging is well conditioned.
fn perturb_all(m: &Model, seed: u64) {
    for (i, (_, a)) in tuner(m).layers().iter().enumerate() {
        perturb(a.vector(), seed + i as u64, 0.25);
        a.vector().update(|v| v.mapv_inplace(|x| 1.0 + x.clamp(-0.5, 0.5)));
    }
}

#[test]
fn ia3_is_identity_at_init_with_peft_shapes_and_feedforward_split() {
    let y0 = out(&tiny(0));
    let m = PeftModel::new(tiny(0), Ia3Config::bert(), "default", 0).unwrap();
    assert_eq!(out(&m), y0);
    let got: Vec<(String, bool, Vec<usize>)> = tuner(&m)
        .layers()
        .iter()
        .map(|(s, a)| (s.path().to_string(), a.is_feedforward(), a.vector().shape()))
        .collect();
    // Per layer: key, value (output side, [8, 1]); attention.output.dense and output.dense (suffix `output.dense`,
    // input side, [1, 8] and [1, 16]), as PEFT's suffix matching selects them.
    let l0: Vec<_> = got.iter().filter(|(p, ..)| p.starts_with("encoder.layer.0.")).cloned().collect();
    assert_eq!(
        l0,
        [
            ("encoder.layer.0.attention.self.key".to_string(), false, vec![8, 1]),
            ("encoder.layer.0.attention.self.value".to_string(), false, vec![8, 1]),
            ("encoder.layer.0.attention.output.dense".to_string(), true, vec![1, 8]),
            ("encoder.layer.0.output.dense".to_string(), true, vec![1, 16]),
        ]
    );
    assert_eq!(m.param_counts().0, 2 * (8 + 8 + 8 + 16));
}

#[test]
fn output_side_scales_output_and_bias_input_side_scales_the_input() {
    let m = PeftModel::new(tiny(0), Ia3Config::bert(), "default", 0).unwrap();
    perturb_all(&m, 3);
    let x =
        Tensor::new(ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[3, 16]), |ix| (ix[0] as f32 - ix[1] as f32) * 0.1));
    for (site, a) in tuner(&m).layers() {
        let n_in = site.in_features();
        let xi = x.narrow(1, 0, n_in).unwrap();
        let base = site.base();
        let l = a.vector().tensor().reshape(&[a.vector().numel()]).unwrap();
        let want = if a.is_feedforward() {
            base.forward(&xi.mul(&l).unwrap()).unwrap()
        } else {
            base.forward(&xi).unwrap().mul(&l).unwrap()
        };
        let got = site.forward(&xi, &Ctx::eval()).unwrap();
        assert!(max_abs_diff(got.as_slice(), want.as_slice()) < 1e-5, "{}", site.path());
    }
}

#[test]
fn merge_equals_unmerged_forward_and_unmerge_restores_weights_and_biases() {
    let mut m = PeftModel::new(tiny(0), Ia3Config::bert(), "default", 0).unwrap();
    perturb_all(&m, 5);
    let snapshot = |m: &Model| -> Vec<Vec<f32>> {
        linear_sites(m.model())
            .iter()
            .flat_map(|s| {
                let b = s.base();
                let mut v = vec![b.dense_weight().unwrap().iter().copied().collect::<Vec<f32>>()];
                v.extend(b.bias().map(|p| p.value().iter().copied().collect()));
                v
            })
            .collect()
    };
    let (w0, y_unmerged) = (snapshot(&m), out(&m));
    m.merge_adapter().unwrap();
    assert!(tuner(&m).is_merged());
    assert!(max_abs_diff(&out(&m), &y_unmerged) < 1e-5, "merged forward = unmerged forward");
    // The biases of key/value changed (output side), the feed-forward ones did not.
    let merged = snapshot(&m);
    assert_ne!(merged, w0);
    m.unmerge_adapter().unwrap();
    for (a, b) in snapshot(&m).iter().zip(&w0) {
        assert!(max_abs_diff(a, b) < 1e-6, "unmerge restores the base");
    }
    assert!(max_abs_diff(&out(&m), &y_unmerged) < 1e-6);
}

#[test]
fn unmerging_a_zero_vector_fails_cleanly() {
    let mut m = PeftModel::new(tiny(0), Ia3Config::bert(), "default", 0).unwrap();
    perturb_all(&m, 5);
    m.merge_adapter().unwrap();
    tuner(&m).layers()[0].1.vector().update(|v| v.fill(0.0));
    assert!(m.unmerge_adapter().is_err(), "dividing by zero would write non-finite weights");
}

#[test]
fn gradients_through_the_model_match_finite_differences() {
    let m = PeftModel::new(tiny(0), Ia3Config::bert(), "default", 0).unwrap();
    perturb_all(&m, 7);
    let params = tuner(&m).params();
    fd_check(&|| weighted_sum(&m, &Ctx::eval()), &params, 1e-2, 2e-2);
}

#[test]
fn random_init_is_not_identity() {
    let cfg = Ia3Config { init_ia3_weights: false, ..Ia3Config::bert() };
    let m = PeftModel::new(tiny(0), cfg, "default", 0).unwrap();
    assert!(max_abs_diff(&out(&m), &out(&tiny(0))) > 1e-3);
}

#[test]
fn config_keys_are_peft_names_and_invalid_configs_are_refused() {
    let v = Ia3Config::bert().to_json().unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    for k in
        ["peft_type", "target_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights", "inference_mode"]
    {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    assert_eq!(v["peft_type"], "IA3");
    // PEFT's file, as `IA3Config(target_modules=[...], feedforward_modules=[...]).to_dict()` writes it.
    let peft = serde_json::json!({
        "peft_type": "IA3", "task_type": "SEQ_CLS", "target_modules": ["key", "value", "output.dense"],
        "feedforward_modules": ["output.dense"], "fan_in_fan_out": false, "init_ia3_weights": true,
        "modules_to_save": null, "inference_mode": true, "base_model_name_or_path": "x", "revision": null,
        "auto_mapping": null, "exclude_modules": null
    });
    let (c, ignored) = Ia3Config::from_json(&peft).unwrap();
    assert_eq!(c.feedforward_modules, Some(ModulePattern::list(["output.dense"])));
    // PEFT's bookkeeping keys are kept for the round trip, not reported.
    assert!(ignored.is_empty(), "{ignored:?}");
    assert_eq!(c.extra["base_model_name_or_path"], "x");
    let unknown = serde_json::json!({"peft_type": "IA3", "target_modules": ["key"], "mystery": 1});
    assert_eq!(Ia3Config::from_json(&unknown).unwrap().1.len(), 1, "unknown keys are reported");
    let bad = Ia3Config::new(["key"], ["output.dense"]);
    assert!(matches!(bad.validate(), Err(AdaptersError::InvalidConfig { field: "feedforward_modules", .. })));
    let fifo = Ia3Config { fan_in_fan_out: true, ..Ia3Config::bert() };
    assert!(matches!(fifo.validate(), Err(AdaptersError::Unsupported { .. })));
    assert!(PeftModel::new(tiny(0), Ia3Config::new(["nope"], Vec::<String>::new()), "default", 0).is_err());
}

#[test]
fn save_load_save_is_byte_identical_with_peft_keys() {
    let m = PeftModel::new(tiny(0), Ia3Config::bert(), "default", 0).unwrap();
    perturb_all(&m, 9);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    m.save_pretrained(&a).unwrap();
    let keys: Vec<String> = m.state_dict("default").unwrap().into_keys().collect();
    assert!(keys.contains(&"base_model.model.encoder.layer.0.attention.self.key.ia3_l".to_string()), "{keys:?}");
    let (loaded, report) = PeftModel::from_pretrained(tiny(0), &a, &crate::registry()).unwrap();
    assert!(report.unexpected.is_empty() && report.ignored_config.is_empty(), "{report:?}");
    assert_eq!(out(&loaded), out(&m));
    loaded.save_pretrained(&b).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
}

mod random_shapes {
    use super::*;
    use peft_core::nn::{RandomInit, WeightSource};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(peft_core::testing::proptest_config(24))]
        /// On random layer sizes, either side, with or without bias: the adapted site is `W(x⊙l)+b` or
        /// `(Wx+b)⊙l`, merging gives the same outputs, unmerging gives back the base.
        #[test]
        fn site_forward_merge_and_unmerge_agree(
            (i, o, rows, seed) in (1usize..6, 1usize..6, 1usize..4, 0u64..1000),
            ff in any::<bool>(),
            bias in any::<bool>(),
        ) {
            let site = Linear::load("blk.proj", i, o, bias, &RandomInit::new(seed, 0.5)).unwrap();
            let w0 = site.base().dense_weight().unwrap();
            let b0 = site.base().bias().map(|b| b.value().to_owned());
            let a = Arc::new(Ia3Linear::new("blk.proj", "t", site.base().as_ref(), ff, true, &mut rand::thread_rng()));
            let l = RandomInit::new(seed + 1, 0.3).get("l", &a.vector().shape()).unwrap().mapv(|v| 1.0 + v.clamp(-0.6, 0.6));
            a.vector().set(l).unwrap();
            site.attach(a.clone()).unwrap();
            let x = Tensor::new(RandomInit::new(seed + 2, 1.0).get("x", &[rows, i]).unwrap());
            let lv = a.vector().tensor().reshape(&[a.vector().numel()]).unwrap();
            let base = site.base();
            let want = if ff { base.forward(&x.mul(&lv).unwrap()).unwrap() } else { base.forward(&x).unwrap().mul(&lv).unwrap() };
            let y = site.forward(&x, &Ctx::eval()).unwrap();
            prop_assert!(max_abs_diff(y.as_slice(), want.as_slice()) < 1e-5);
            site.merge("t").unwrap();
            a.merged.store(true, Ordering::SeqCst);
            let ym = site.forward(&x, &Ctx::eval()).unwrap();
            prop_assert!(max_abs_diff(ym.as_slice(), y.as_slice()) < 1e-5);
            site.unmerge("t").unwrap();
            a.merged.store(false, Ordering::SeqCst);
            let w1 = site.base().dense_weight().unwrap();
            prop_assert!(max_abs_diff(w1.as_slice().unwrap(), w0.as_slice().unwrap()) < 1e-6);
            if let (Some(b0), Some(b1)) = (b0, site.base().bias()) {
                prop_assert!(max_abs_diff(b1.value().as_slice().unwrap(), b0.as_slice().unwrap()) < 1e-6);
            }
        }
    }
}
