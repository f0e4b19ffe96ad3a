use ndarray::{ArrayD, Axis, IxDyn};
use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::io::hf_config::Dinov2Config;
use peft_core::nn::{Ctx, RandomInit};
use peft_core::testing::max_abs_diff;
use peft_core::Tensor;
use peft_models::vit::{Dinov2, Dinov2Classifier, HeadInput};

use super::*;

const D: usize = 8;

fn tiny(seed: u64) -> Dinov2Classifier {
    let cfg = Dinov2Config {
        hidden_size: D,
        num_hidden_layers: 3,
        num_attention_heads: 2,
        image_size: 8,
        patch_size: 4,
        use_mask_token: false,
        ..Dinov2Config::default()
    };
    let b = Dinov2::load(&cfg, &RandomInit::new(seed, 0.3)).unwrap();
    Dinov2Classifier::new(b, 3, HeadInput::ClsAndPatchMean, 1).unwrap()
}

fn pixels() -> Tensor {
    Tensor::new(ArrayD::from_shape_fn(IxDyn(&[2, 3, 8, 8]), |ix| {
        ((ix[0] * 5 + ix[1] * 7 + ix[2] * 3 + ix[3]) % 11) as f32 * 0.2 - 1.0
    }))
}

type Model = PeftModel<Dinov2Classifier>;

fn model(cfg: VptConfig) -> Model {
    let mut cfg = cfg;
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    PeftModel::new(tiny(0), cfg, "default", 0).unwrap()
}

fn table(m: &Model) -> ArrayD<f32> {
    let t = m.tuner("default").unwrap().as_any().downcast_ref::<VptTuner>().unwrap();
    t.encoder().table().value().to_owned()
}

/// The VPT paper's forward written out: the prompt right after CLS (replaced before every layer for deep), the
/// prompt positions dropped after the last layer, then the final LayerNorm.
fn after_cls_by_hand(m: &Dinov2Classifier, table: &ArrayD<f32>, deep: bool) -> Vec<f32> {
    let ctx = Ctx::eval();
    let bb = &m.backbone;
    let x = bb.embeddings(&pixels()).unwrap();
    let (b, n1) = (x.shape()[0], x.shape()[1]);
    let p = table.shape()[1];
    let prompt = |i: usize| {
        Tensor::new(table.index_axis(Axis(0), i).to_owned()).unsqueeze(0).unwrap().broadcast_to(&[b, p, D]).unwrap()
    };
    let cat = |a: &Tensor, pr: &Tensor, rest: &Tensor| Tensor::concat(&[a, pr, rest], 1).unwrap();
    let mut h = cat(&x.narrow(1, 0, 1).unwrap(), &prompt(0), &x.narrow(1, 1, n1 - 1).unwrap());
    for (i, layer) in bb.layers.iter().enumerate() {
        if deep && i > 0 {
            h = cat(&h.narrow(1, 0, 1).unwrap(), &prompt(i), &h.narrow(1, 1 + p, n1 - 1).unwrap());
        }
        h = layer.forward(&h, None, &ctx).unwrap();
    }
    let h = Tensor::concat(&[&h.narrow(1, 0, 1).unwrap(), &h.narrow(1, 1 + p, n1 - 1).unwrap()], 1).unwrap();
    bb.layernorm.as_ref().unwrap().forward(&h).unwrap().to_vec()
}

#[test]
fn prompt_in_front_equals_prompt_after_cls() {
    for deep in [false, true] {
        let m = model(if deep { VptConfig::deep(2) } else { VptConfig::shallow(2) });
        let t = table(&m);
        assert_eq!(t.shape(), if deep { &[3, 2, D][..] } else { &[1, 2, D][..] });
        let got = m.backbone.forward(&pixels(), &Ctx::eval()).unwrap().last_hidden_state;
        assert_eq!(got.shape(), &[2, 5, D], "the prompt is stripped from the outputs");
        let want = after_cls_by_hand(&m, &t, deep);
        assert!(max_abs_diff(&got.to_vec(), &want) < 1e-5, "deep={deep}");
        let base = tiny(0).backbone.forward(&pixels(), &Ctx::eval()).unwrap().last_hidden_state;
        assert!(max_abs_diff(&got.to_vec(), &base.to_vec()) > 1e-3, "deep={deep}: the prompt changes the output");
    }
}

#[test]
fn disabled_it_is_the_base_model_and_only_prompts_and_head_train() {
    let mut m = model(VptConfig::deep(4));
    let base = tiny(0).forward(&pixels(), &Ctx::eval()).unwrap().to_vec();
    m.disable_adapters().unwrap();
    assert_eq!(m.forward(&pixels(), &Ctx::eval()).unwrap().to_vec(), base);
    m.enable_adapters().unwrap();
    assert_ne!(m.forward(&pixels(), &Ctx::eval()).unwrap().to_vec(), base);
    let (trainable, _) = m.param_counts();
    // 3 layers x 4 tokens x 8 + the head (3 x 16 + 3).
    assert_eq!(trainable, 3 * 4 * D + 3 * 2 * D + 3);
    let shallow = model(VptConfig::shallow(4));
    assert_eq!(shallow.param_counts().0, 4 * D + 3 * 2 * D + 3);
    // The init's bound: sqrt(6 / (3·14² + 8)).
    let v = (6.0f32 / (3.0 * 196.0 + 8.0)).sqrt();
    let t = table(&shallow);
    assert!(t.iter().all(|x| x.abs() <= v) && t.iter().any(|x| x.abs() > v / 2.0));
}

#[test]
fn prompt_gradients_match_finite_differences() {
    let m = model(VptConfig::deep(2));
    let t = m.tuner("default").unwrap().as_any().downcast_ref::<VptTuner>().unwrap();
    let p = t.encoder().table().clone();
    let loss = || m.forward(&pixels(), &Ctx::eval()).unwrap().cross_entropy(&[0, 2], None, 0.0).unwrap();
    let g = loss().backward().unwrap();
    let an = g.get_id(p.id()).expect("the prompt gets a gradient").to_owned();
    let eps = 1e-2f32;
    let scalar = || f64::from(peft_core::no_grad(loss).item().unwrap());
    let mut num = Vec::new();
    for i in 0..p.numel() {
        let v0 = p.value().to_owned();
        let mut vp = v0.clone();
        vp.as_slice_mut().unwrap()[i] += eps;
        p.set(vp).unwrap();
        let lp = scalar();
        let mut vm = v0.clone();
        vm.as_slice_mut().unwrap()[i] -= eps;
        p.set(vm).unwrap();
        let lm = scalar();
        p.set(v0).unwrap();
        num.push((lp - lm) / (2.0 * f64::from(eps)));
    }
    // f32 forwards: central differences at eps 1e-2 carry ~1e-5 rounding / 2e-2 plus O(eps²) curvature terms.
    let scale = num.iter().fold(1e-3f64, |a, v| a.max(v.abs()));
    for (i, (a, n)) in an.iter().zip(&num).enumerate() {
        assert!((f64::from(*a) - n).abs() <= 2e-2 * scale, "[{i}]: analytic {a} vs numeric {n} (scale {scale})");
    }
    assert!(num.iter().any(|v| v.abs() > 1e-4), "the check saw no gradient");
}

#[test]
fn save_load_round_trip_is_exact_and_byte_identical() {
    let m = model(VptConfig::deep(3));
    // Move the prompts and head off their init so the round trip carries trained values.
    for q in m.trainable_params() {
        q.update(|v| v.mapv_inplace(|x| x * 1.5 + 0.01));
    }
    let want = m.forward(&pixels(), &Ctx::eval()).unwrap().to_vec();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    m.save_pretrained(&a).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join(CONFIG_NAME)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "VPT");
    assert_eq!(
        (cfg["deep"].as_bool(), cfg["num_layers"].as_u64(), cfg["token_dim"].as_u64()),
        (Some(true), Some(3), Some(D as u64))
    );
    let (back, report) = PeftModel::from_pretrained(tiny(0), &a, &crate::registry()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(back.forward(&pixels(), &Ctx::eval()).unwrap().to_vec(), want);
    let b = dir.path().join("b");
    back.save_pretrained(&b).unwrap();
    assert_eq!(std::fs::read(a.join(WEIGHTS_NAME)).unwrap(), std::fs::read(b.join(WEIGHTS_NAME)).unwrap());
    assert_eq!(std::fs::read(a.join(CONFIG_NAME)).unwrap(), std::fs::read(b.join(CONFIG_NAME)).unwrap());
}

#[test]
fn bad_configs_and_mismatched_files_are_typed_errors() {
    let e = PeftModel::new(tiny(0), VptConfig::shallow(0), "default", 0).err().unwrap();
    assert!(
        matches!(&e, peft_core::adapter::AdapterError::InvalidConfig { field, .. } if field == "num_tokens"),
        "{e}"
    );
    let e =
        PeftModel::new(tiny(0), VptConfig { num_layers: Some(12), ..VptConfig::deep(2) }, "default", 0).err().unwrap();
    assert!(
        matches!(&e, peft_core::adapter::AdapterError::InvalidConfig { field, .. } if field == "num_layers"),
        "{e}"
    );
    // A shallow file read as a deep adapter: the table has 1 row, not 3.
    let dir = tempfile::tempdir().unwrap();
    model(VptConfig::shallow(2)).save_pretrained(dir.path()).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_NAME)).unwrap()).unwrap();
    cfg["deep"] = serde_json::Value::Bool(true);
    std::fs::write(dir.path().join(CONFIG_NAME), cfg.to_string()).unwrap();
    let e = PeftModel::from_pretrained(tiny(0), dir.path(), &crate::registry()).err().unwrap();
    assert!(matches!(e, peft_core::adapter::AdapterError::TensorShape { .. }), "{e}");
}
