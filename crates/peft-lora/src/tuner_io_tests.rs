use peft_core::adapter::{AdapterError, PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::io::safetensors::SafeTensorsFile;
use peft_core::nn::Ctx;
use peft_core::testing::max_abs_diff;

use super::*;
use crate::config::Bias;
use crate::testutil::{input, Tiny};

type Model = PeftModel<Tiny>;

fn trained(dora: bool) -> Model {
    let m = Tiny::new(6, 2, 1);
    let mut cfg = LoraConfig::new(2, 16.0, ["query", "value"]);
    cfg.use_dora = dora;
    cfg.bias = Bias::LoraOnly;
    cfg.lora_dropout = 0.05;
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    cfg.rank_pattern.insert("layer.1.attention.self.value".into(), 3.into());
    let lm = PeftModel::new(m, cfg, "default", 0).unwrap();
    for (i, p) in lm.trainable_params().iter().enumerate() {
        p.update(|v| v.mapv_inplace(|x| x + 0.01 * (i as f32 + 1.0)));
    }
    lm
}

fn load(m: Tiny, dir: &std::path::Path) -> (Model, peft_core::adapter::LoadReport) {
    PeftModel::from_pretrained(m, dir, &crate::registry()).unwrap()
}

#[test]
fn save_writes_peft_keys_and_config() {
    let lm = trained(true);
    let dir = tempfile::tempdir().unwrap();
    let bytes = lm.save_pretrained(dir.path()).unwrap();
    let f = SafeTensorsFile::open(dir.path().join(WEIGHTS_NAME)).unwrap();
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    let names: Vec<&str> = f.names().collect();
    assert!(names.contains(&"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"));
    assert!(names.contains(&"base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector"));
    // As PEFT 0.21 writes them (checked with bias="lora_only", modules_to_save=["classifier"]).
    assert!(names.contains(&"base_model.model.encoder.layer.0.attention.self.query.base_layer.bias"));
    assert!(names.contains(&"base_model.model.classifier.bias"));
    assert!(names.contains(&"base_model.model.classifier.weight"));
    assert!(!names.iter().any(|n| n.contains("output.dense")));
    assert_eq!(f.shape("base_model.model.encoder.layer.1.attention.self.value.lora_B.weight").unwrap(), &[6, 3]);
    // 4 sites × 3 tensors + 4 biases of adapted sites + classifier weight/bias.
    assert_eq!(f.len(), 4 * 3 + 4 + 2);
    let cfg = std::fs::read_to_string(dir.path().join(CONFIG_NAME)).unwrap();
    assert!(cfg.starts_with("{\n  \"alpha_pattern\": {},\n  \"auto_mapping\": null,\n"), "{cfg}");
    assert!(cfg.contains("\n  \"inference_mode\": true,\n"));
    assert!(cfg.contains("\n  \"lora_alpha\": 16,\n"));
    assert!(cfg.contains("\n  \"lora_dropout\": 0.05,\n"));
    assert!(cfg.ends_with("\n  \"use_rslora\": false\n}"));
    let total = std::fs::metadata(dir.path().join(CONFIG_NAME)).unwrap().len()
        + std::fs::metadata(dir.path().join(WEIGHTS_NAME)).unwrap().len();
    assert_eq!(bytes, total);
}

#[test]
fn save_load_save_is_byte_identical_and_outputs_match() {
    for dora in [false, true] {
        let lm = trained(dora);
        let x = input(3, 6, 5);
        let y = lm.forward(&x, &Ctx::eval()).unwrap().to_vec();
        let d1 = tempfile::tempdir().unwrap();
        lm.save_pretrained(d1.path()).unwrap();

        // A fresh copy of the base model (same seed) with the adapter loaded.
        let (lm2, report) = load(Tiny::new(6, 2, 1), d1.path());
        assert!(report.is_clean(), "{report}");
        let y2 = lm2.forward(&x, &Ctx::eval()).unwrap().to_vec();
        assert!(max_abs_diff(&y, &y2) < 1e-6, "dora={dora}");

        let d2 = tempfile::tempdir().unwrap();
        lm2.save_pretrained(d2.path()).unwrap();
        for f in [CONFIG_NAME, WEIGHTS_NAME] {
            assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
        }
    }
}

#[test]
fn named_adapters_go_to_subdirectories() {
    let mut lm = trained(false);
    lm.add_adapter("other", LoraConfig::new(2, 4.0, ["dense"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    lm.save_pretrained(dir.path()).unwrap();
    assert!(dir.path().join("other").join(CONFIG_NAME).exists());
    assert!(dir.path().join(WEIGHTS_NAME).exists());
}

#[test]
fn loading_a_mismatched_adapter_is_an_error_and_leaves_no_trace() {
    let lm = trained(false);
    let dir = tempfile::tempdir().unwrap();
    lm.save_pretrained(dir.path()).unwrap();
    let m2 = Tiny::new(8, 2, 1); // other width
    let mut lm2 = PeftModel::new(m2, LoraConfig::new(1, 1.0, ["dense"]), "scratch", 0).unwrap();
    let e = lm2.load_adapter(dir.path(), "x", &crate::registry()).unwrap_err();
    assert!(matches!(e, AdapterError::TensorShape { .. }), "{e}");
    assert!(lm2.config("x").is_err());
    assert!(lm2.layers[0][0].adapters().is_empty());
}

#[test]
fn pissa_adapter_converts_to_lora_for_the_original_model() {
    let m = Tiny::new(6, 1, 1);
    let mut cfg = LoraConfig::new(2, 4.0, ["query", "value"]);
    cfg.init_lora_weights = crate::config::InitLoraWeights::Named("pissa".into());
    let lm = PeftModel::new(m, cfg, "default", 0).unwrap();
    for p in lm.trainable_params() {
        p.update(|v| v.mapv_inplace(|x| x * 1.2 + 0.01));
    }
    let x = input(3, 6, 5);
    let y = lm.forward(&x, &Ctx::eval()).unwrap().to_vec();
    let dir = tempfile::tempdir().unwrap();
    lm.save_mutated_as_lora(dir.path(), "default").unwrap();
    let text = std::fs::read_to_string(dir.path().join(CONFIG_NAME)).unwrap();
    assert!(
        text.contains("\"r\": 4,")
            && text.contains("\"lora_alpha\": 8,")
            && text.contains("\"init_lora_weights\": true")
    );
    // The original (unmutated) model plus the converted adapter reproduces the trained PiSSA model.
    let mut lm0 = PeftModel::new(Tiny::new(6, 1, 1), LoraConfig::new(1, 1.0, ["dense"]), "scratch", 0).unwrap();
    lm0.load_adapter(dir.path(), "conv", &crate::registry()).unwrap();
    lm0.set_adapter("conv").unwrap();
    let y0 = lm0.forward(&x, &Ctx::eval()).unwrap().to_vec();
    assert!(max_abs_diff(&y, &y0) < 1e-5);
}

/// PEFT 0.21 fixtures from `tests/fixtures/gen_peft_fixture.py` (LoRA; DoRA + rsLoRA + dropout; LoRA with
/// bias = "lora_only" and modules_to_save = ["classifier"]; lora_bias = true, a bias on lora_B).
#[test]
fn peft_fixtures_load_match_outputs_and_save_back_identically() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for v in ["lora", "dora", "lora_bias", "lora_b_bias"] {
        let dir = root.join(v);
        let base = SafeTensorsFile::open(dir.join("base.safetensors")).unwrap();
        let io = SafeTensorsFile::open(dir.join("io.safetensors")).unwrap();
        let (mut lm, report) = load(Tiny::load(8, 2, &base), &dir.join("adapter"));
        assert_eq!(lm.lora_layers("default").unwrap().len(), 4);
        let x = io.tensor("x").unwrap();
        let y = lm.forward(&x, &Ctx::eval()).unwrap().to_vec();
        let want = io.get("y").unwrap();
        let err = max_abs_diff(&y, want.as_slice().unwrap());
        assert!(err < 1e-5, "{v}: max |Δy| = {err}");
        lm.merge_adapter().unwrap();
        let ym = lm.forward(&x, &Ctx::eval()).unwrap().to_vec();
        let err_m = max_abs_diff(&ym, io.get("y_merged").unwrap().as_slice().unwrap());
        assert!(err_m < 1e-5, "{v}: merged max |Δy| = {err_m}");
        lm.unmerge_adapter().unwrap();
        eprintln!("{v}: max |y - y_peft| = {err:e}, merged {err_m:e}; {report}");
        let out = tempfile::tempdir().unwrap();
        lm.save_pretrained(out.path()).unwrap();
        for f in [CONFIG_NAME, WEIGHTS_NAME] {
            let a = std::fs::read(dir.join("adapter").join(f)).unwrap();
            let b = std::fs::read(out.path().join(f)).unwrap();
            assert!(
                a == b,
                "{v}/{f} differs:\n{}\n---\n{}",
                String::from_utf8_lossy(&a[..a.len().min(600)]),
                String::from_utf8_lossy(&b[..b.len().min(600)])
            );
        }
    }
}

/// PiSSA and OLoRA rewrite the base as PEFT does: the residual `W − s·B·A` is independent of SVD/QR sign
/// conventions, so it is compared directly with PEFT's `base_layer.weight` after init.
#[test]
fn pissa_and_olora_residuals_match_peft() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for v in ["pissa", "olora"] {
        let dir = root.join(v);
        let base = SafeTensorsFile::open(dir.join("base.safetensors")).unwrap();
        let want = SafeTensorsFile::open(dir.join("residual.safetensors")).unwrap();
        let mut cfg = LoraConfig::new(2, 4.0, ["query", "value"]);
        cfg.init_lora_weights = crate::config::InitLoraWeights::Named(v.into());
        let lm = PeftModel::new(Tiny::load(8, 2, &base), cfg, "default", 0).unwrap();
        let mut worst = 0f32;
        for (site, _) in &lm.lora_layers("default").unwrap() {
            let got = site.base().dense_weight().unwrap();
            let w = want.get(&format!("{}.weight", site.path())).unwrap();
            worst = worst.max(max_abs_diff(got.as_slice().unwrap(), w.as_slice().unwrap()));
        }
        eprintln!("{v}: max |W_res - W_res_peft| = {worst:e}");
        assert!(worst < 1e-5, "{v}: {worst}");
    }
}

/// Audit item: a PiSSA/OLoRA adapter saved without conversion loaded onto the original base as `W + s·B·A`
/// instead of `W_res + s·B·A`. Loading now replays the init (as PEFT does), so the trained model comes back.
#[test]
fn pissa_adapter_saved_as_trained_replays_its_init_on_load() {
    for init in ["pissa", "olora"] {
        let mut cfg = LoraConfig::new(2, 4.0, ["query", "value"]);
        cfg.init_lora_weights = crate::config::InitLoraWeights::Named(init.into());
        let lm = PeftModel::new(Tiny::new(6, 1, 1), cfg, "default", 0).unwrap();
        for p in lm.trainable_params() {
            p.update(|v| v.mapv_inplace(|x| x * 1.2 + 0.01));
        }
        let x = input(3, 6, 5);
        let y = lm.forward(&x, &Ctx::eval()).unwrap().to_vec();
        let dir = tempfile::tempdir().unwrap();
        lm.save_pretrained(dir.path()).unwrap();
        let (back, report) = load(Tiny::new(6, 1, 1), dir.path());
        assert!(report.is_clean(), "{report}");
        let y2 = back.forward(&x, &Ctx::eval()).unwrap().to_vec();
        assert!(max_abs_diff(&y, &y2) < 1e-5, "{init}: {}", max_abs_diff(&y, &y2));
    }
}

/// A CorDA adapter saved as trained needs the calibration data to rebuild its base: refused, not loaded wrongly.
#[test]
fn corda_adapter_saved_as_trained_is_refused() {
    let lm = trained(false);
    let dir = tempfile::tempdir().unwrap();
    lm.save_pretrained(dir.path()).unwrap();
    let path = dir.path().join(CONFIG_NAME);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"init_lora_weights\": true", "\"init_lora_weights\": \"corda\"");
    std::fs::write(&path, text).unwrap();
    let mut m = PeftModel::wrap(Tiny::new(6, 2, 1), 0);
    let e = m.load_adapter(dir.path(), "c", &crate::registry()).unwrap_err();
    assert!(matches!(e, AdapterError::Unsupported { .. }), "{e}");
    assert!(m.layers[0][0].adapters().is_empty());
}

/// Issue 14, item 1: an `adapter_config.json` with `r` = 1,000,000 made the loader allocate `r x in` before any
/// tensor shape was checked. The config is now checked against the file first (nothing allocated).
#[test]
fn huge_rank_in_config_is_refused_before_allocating() {
    let lm = trained(false);
    let dir = tempfile::tempdir().unwrap();
    lm.save_pretrained(dir.path()).unwrap();
    let path = dir.path().join(CONFIG_NAME);
    for r in ["1000000", "4611686018427387904"] {
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text.find("\"r\": ").unwrap();
        let end = start + text[start..].find(',').unwrap();
        std::fs::write(&path, format!("{}\"r\": {r}{}", &text[..start], &text[end..])).unwrap();
        let mut m = PeftModel::wrap(Tiny::new(6, 2, 1), 0);
        let e = m.load_adapter(dir.path(), "x", &crate::registry()).unwrap_err();
        assert!(matches!(e, AdapterError::TensorShape { .. }), "r = {r}: {e}");
    }
}

/// Config keys peft-rs does not model are reported (and make a strict load fail) instead of being dropped.
#[test]
fn unknown_config_keys_are_reported_and_fail_strict() {
    let lm = trained(false);
    let dir = tempfile::tempdir().unwrap();
    lm.save_pretrained(dir.path()).unwrap();
    let path = dir.path().join(CONFIG_NAME);
    let text =
        std::fs::read_to_string(&path).unwrap().replacen("{\n", "{\n  \"trainable_token_indices\": [1, 2],\n", 1);
    std::fs::write(&path, text).unwrap();
    let (_, report) = load(Tiny::new(6, 2, 1), dir.path());
    assert!(report.ignored_config.iter().any(|w| w.contains("trainable_token_indices")), "{report}");
    assert!(report.check_strict().is_err());
}
