use peft_core::io::safetensors::SafeTensorsFile;
use peft_core::nn::Ctx;
use peft_core::testing::max_abs_diff;

use super::*;
use crate::config::Bias;
use crate::testutil::{input, Tiny};

fn trained(dora: bool) -> (Tiny, LoraModel) {
    let m = Tiny::new(6, 2, 1);
    let mut cfg = LoraConfig::new(2, 16.0, ["query", "value"]);
    cfg.use_dora = dora;
    cfg.bias = Bias::LoraOnly;
    cfg.lora_dropout = 0.05;
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    cfg.rank_pattern.insert("layer.1.attention.self.value".into(), 3.into());
    let lm = LoraModel::new(&m, cfg, "default", 0).unwrap();
    for (i, p) in lm.trainable_params().iter().enumerate() {
        p.update(|v| v.mapv_inplace(|x| x + 0.01 * (i as f32 + 1.0)));
    }
    (m, lm)
}

#[test]
fn save_writes_peft_keys_and_config() {
    let (_m, lm) = trained(true);
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
        let (m, lm) = trained(dora);
        let x = input(3, 6, 5);
        let y = m.forward(&x, &Ctx::eval()).unwrap().to_vec();
        let d1 = tempfile::tempdir().unwrap();
        lm.save_pretrained(d1.path()).unwrap();

        // A fresh copy of the base model (same seed) with the adapter loaded.
        let m2 = Tiny::new(6, 2, 1);
        let mut lm2 = LoraModel::wrap(&m2, 0);
        let warnings = lm2.load_adapter(d1.path(), "default").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        lm2.set_adapter("default").unwrap();
        let y2 = m2.forward(&x, &Ctx::eval()).unwrap().to_vec();
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
    let (m, mut lm) = trained(false);
    lm.add_adapter("other", LoraConfig::new(2, 4.0, ["dense"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    lm.save_pretrained(dir.path()).unwrap();
    assert!(dir.path().join("other").join(CONFIG_NAME).exists());
    assert!(dir.path().join(WEIGHTS_NAME).exists());
    drop(m);
}

#[test]
fn loading_a_mismatched_adapter_is_an_error_and_leaves_no_trace() {
    let (_m, lm) = trained(false);
    let dir = tempfile::tempdir().unwrap();
    lm.save_pretrained(dir.path()).unwrap();
    let m2 = Tiny::new(8, 2, 1); // other width
    let mut lm2 = LoraModel::new(&m2, LoraConfig::new(1, 1.0, ["dense"]), "scratch", 0).unwrap();
    assert!(lm2.load_adapter(dir.path(), "x").is_err());
    assert!(lm2.adapter("x").is_err());
    assert!(m2.layers[0][0].adapters().is_empty());
}

#[test]
fn pissa_adapter_converts_to_lora_for_the_original_model() {
    let m = Tiny::new(6, 1, 1);
    let mut cfg = LoraConfig::new(2, 4.0, ["query", "value"]);
    cfg.init_lora_weights = crate::config::InitLoraWeights::Named("pissa".into());
    let lm = LoraModel::new(&m, cfg, "default", 0).unwrap();
    for p in lm.trainable_params() {
        p.update(|v| v.mapv_inplace(|x| x * 1.2 + 0.01));
    }
    let x = input(3, 6, 5);
    let y = m.forward(&x, &Ctx::eval()).unwrap().to_vec();
    let dir = tempfile::tempdir().unwrap();
    lm.save_mutated_as_lora(dir.path(), "default").unwrap();
    let text = std::fs::read_to_string(dir.path().join(CONFIG_NAME)).unwrap();
    assert!(
        text.contains("\"r\": 4,")
            && text.contains("\"lora_alpha\": 8,")
            && text.contains("\"init_lora_weights\": true")
    );
    // The original (unmutated) model plus the converted adapter reproduces the trained PiSSA model.
    let m0 = Tiny::new(6, 1, 1);
    let mut lm0 = LoraModel::new(&m0, LoraConfig::new(1, 1.0, ["dense"]), "scratch", 0).unwrap();
    lm0.load_adapter(dir.path(), "conv").unwrap();
    lm0.set_adapter("conv").unwrap();
    let y0 = m0.forward(&x, &Ctx::eval()).unwrap().to_vec();
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
        let m = Tiny::load(8, 2, &base);
        let mut lm = LoraModel::wrap(&m, 0);
        let warnings = lm.load_adapter(&dir.join("adapter"), "default").unwrap();
        lm.set_adapter("default").unwrap();
        assert_eq!(lm.adapter("default").unwrap().layers.len(), 4);
        let x = io.tensor("x").unwrap();
        let y = m.forward(&x, &Ctx::eval()).unwrap().to_vec();
        let want = io.get("y").unwrap();
        let err = max_abs_diff(&y, want.as_slice().unwrap());
        assert!(err < 1e-5, "{v}: max |Δy| = {err}");
        lm.merge().unwrap();
        let ym = m.forward(&x, &Ctx::eval()).unwrap().to_vec();
        let err_m = max_abs_diff(&ym, io.get("y_merged").unwrap().as_slice().unwrap());
        assert!(err_m < 1e-5, "{v}: merged max |Δy| = {err_m}");
        lm.unmerge().unwrap();
        eprintln!("{v}: max |y - y_peft| = {err:e}, merged {err_m:e}; warnings: {warnings:?}");
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
        let m = Tiny::load(8, 2, &base);
        let mut cfg = LoraConfig::new(2, 4.0, ["query", "value"]);
        cfg.init_lora_weights = crate::config::InitLoraWeights::Named(v.into());
        let lm = LoraModel::new(&m, cfg, "default", 0).unwrap();
        let mut worst = 0f32;
        for (site, _) in &lm.adapter("default").unwrap().layers {
            let got = site.base().dense_weight().unwrap();
            let w = want.get(&format!("{}.weight", site.path())).unwrap();
            worst = worst.max(max_abs_diff(got.as_slice().unwrap(), w.as_slice().unwrap()));
        }
        eprintln!("{v}: max |W_res - W_res_peft| = {worst:e}");
        assert!(worst < 1e-5, "{v}: {worst}");
    }
}
