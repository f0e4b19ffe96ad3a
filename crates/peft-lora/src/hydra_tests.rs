use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::max_abs_diff;

use super::*;
use crate::structured::fdcheck;
use crate::testutil::{input, Tiny};

type Model = PeftModel<Tiny>;

fn hydra(model: &Model) -> &HydraTuner {
    model.tuner("default").unwrap().as_any().downcast_ref::<HydraTuner>().unwrap()
}

fn perturb(m: &Model, seed: u64) {
    for (i, (_, a)) in hydra(m).layers().iter().enumerate() {
        for (j, p) in a.factors().into_iter().enumerate() {
            p.set(RandomInit::new(seed + (10 * i + j) as u64, 0.3).get("p", &p.shape()).unwrap()).unwrap();
        }
    }
}

fn out(model: &Tiny, x: &Tensor) -> Vec<f32> {
    model.forward(x, &Ctx::eval()).unwrap().to_vec()
}

fn new(model: Tiny, cfg: HydraConfig) -> Model {
    PeftModel::new(model, cfg, "default", 0).unwrap()
}

#[test]
fn hydra_is_identity_at_init() {
    let model = Tiny::new(6, 2, 0);
    let x = input(4, 6, 1);
    let y0 = out(&model, &x);
    let hm = new(model, HydraConfig::new(2, 3, ["query", "dense"]));
    assert_eq!(hydra(&hm).layers().len(), 4);
    assert_eq!(out(&hm, &x), y0);
    // r_p·(in+out) + r_s·(out+out) per site.
    assert_eq!(hm.trainable_params().iter().map(Param::numel).sum::<usize>(), 4 * (2 * 12 + 3 * 12));
}

#[test]
fn hydra_forward_is_parallel_plus_sequential_branch() {
    let mut cfg = HydraConfig::new(2, 3, ["query"]);
    cfg.scale = 0.7;
    let hm = new(Tiny::new(4, 1, 0), cfg);
    perturb(&hm, 5);
    let (site, a) = &hydra(&hm).layers()[0];
    let x = input(3, 4, 2);
    let y = site.forward(&x, &Ctx::eval()).unwrap();
    let h = site.base().forward(&x).unwrap();
    let [ap, bp, a_s, b_s] = a.factors().map(|p| m2(p).unwrap());
    let x2 = x.data().to_owned().into_dimensionality::<Ix2>().unwrap();
    let h2 = h.data().to_owned().into_dimensionality::<Ix2>().unwrap();
    let want = &h2 + &(x2.dot(&ap.t()).dot(&bp.t()) + h2.dot(&a_s.t()).dot(&b_s.t())).mapv(|v| v * 0.7);
    assert!(max_abs_diff(y.as_slice(), want.as_slice().unwrap()) < 1e-5);
}

#[test]
fn hydra_merge_equals_unmerged_forward_and_unmerge_restores_weight_and_bias() {
    let mut hm = new(Tiny::new(6, 2, 0), HydraConfig::new(2, 3, ["query", "value", "dense"]));
    perturb(&hm, 9);
    let x = input(5, 6, 3);
    let site = hydra(&hm).layers()[0].0.clone();
    for (s, _) in hydra(&hm).layers() {
        let b = s.base().bias().unwrap();
        b.set(RandomInit::new(21, 0.5).get("b", &b.shape()).unwrap()).unwrap();
    }
    let y0 = out(&hm, &x);
    let (w0, b0) = (site.base().dense_weight().unwrap(), site.base().bias().unwrap().value().to_owned());
    hm.merge_adapter().unwrap();
    assert!(hydra(&hm).is_merged());
    assert!(max_abs_diff(&out(&hm, &x), &y0) < 1e-5);
    assert!(max_abs_diff(site.base().bias().unwrap().value().as_slice().unwrap(), b0.as_slice().unwrap()) > 1e-4);
    hm.unmerge_adapter().unwrap();
    assert!(max_abs_diff(&out(&hm, &x), &y0) < 1e-5);
    assert!(max_abs_diff(site.base().dense_weight().unwrap().as_slice().unwrap(), w0.as_slice().unwrap()) < 1e-5);
    assert_eq!(site.base().bias().unwrap().value().to_owned(), b0);
    assert!(hydra(&hm).layers()[0].0.unmerge("default").is_err());
    // merge_and_unload keeps the merged weight and bias.
    let tiny = hm.merge_and_unload().unwrap();
    assert!(max_abs_diff(&out(&tiny, &x), &y0) < 1e-5);
}

/// Audit: `delta_weight` used to write the merged bias into the base as a side effect, so a merge that failed
/// afterwards (or a caller only asking for the delta) left the bias corrupted.
#[test]
fn hydra_delta_weight_is_pure_and_a_failed_merge_changes_nothing() {
    let mut hm = new(Tiny::new(6, 1, 0), HydraConfig::new(2, 3, ["query", "value"]));
    perturb(&hm, 2);
    let x = input(3, 6, 4);
    let bias_of = |s: &Linear| s.base().bias().unwrap().value().to_owned();
    for (s, _) in hydra(&hm).layers() {
        let b = s.base().bias().unwrap();
        b.set(RandomInit::new(22, 0.5).get("b", &b.shape()).unwrap()).unwrap();
    }
    let (site, a) = hydra(&hm).layers()[0].clone();
    let (w0, b0) = (site.base().dense_weight().unwrap(), bias_of(&site));
    // Asking for the deltas writes nothing.
    let dw = a.delta_weight(site.base().as_ref()).unwrap().unwrap();
    let db = a.delta_bias().unwrap().unwrap();
    assert!(dw.iter().any(|v| v.abs() > 1e-4) && db.iter().any(|v| v.abs() > 1e-4));
    assert_eq!(bias_of(&site), b0);
    assert_eq!(site.base().dense_weight().unwrap(), w0);
    // The second site's merged weight overflows (its delta is finite): the merge fails on that site, and the
    // first site, merged before, is taken back; every weight and bias is as before.
    let (site2, _) = hydra(&hm).layers()[1].clone();
    let w = site2.base().dense_weight().unwrap().mapv(|v| if v >= 0.0 { 3.0e38 } else { -3.0e38 });
    site2.base().params()[0].set(w).unwrap();
    let (w2, b2) = (site2.base().dense_weight().unwrap(), bias_of(&site2));
    let y0 = out(&hm, &x);
    let err = hm.merge_adapter().unwrap_err();
    assert!(err.to_string().contains("non-finite") || err.to_string().contains("finite"), "{err}");
    assert!(!hydra(&hm).is_merged());
    assert_eq!((bias_of(&site), bias_of(&site2)), (b0, b2));
    assert_eq!(site2.base().dense_weight().unwrap(), w2);
    assert!(max_abs_diff(site.base().dense_weight().unwrap().as_slice().unwrap(), w0.as_slice().unwrap()) < 1e-5);
    let y1 = out(&hm, &x);
    assert_eq!(y1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), y0.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
}

#[test]
fn hydra_gradients_match_finite_differences() {
    let hm = new(Tiny::new(4, 1, 0), HydraConfig::new(2, 2, ["query", "dense"]));
    perturb(&hm, 3);
    let x = input(3, 4, 4);
    let r = input(3, 3, 5);
    let f = || hm.forward(&x, &Ctx::eval()).unwrap().mul(&r).unwrap().sum_all();
    fdcheck::check(&f, &hm.trainable_params(), 1e-2, 3e-3);
}

#[test]
fn hydra_save_load_save_is_byte_identical() {
    let hm = new(Tiny::new(6, 2, 0), HydraConfig::new(2, 3, ["dense"]));
    perturb(&hm, 4);
    let d1 = tempfile::tempdir().unwrap();
    hm.save_pretrained(d1.path()).unwrap();
    let (hm2, report) = PeftModel::from_pretrained(Tiny::new(6, 2, 0), d1.path(), &crate::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    let x = input(3, 6, 1);
    assert_eq!(out(&hm, &x), out(&hm2, &x));
    let d2 = tempfile::tempdir().unwrap();
    hm2.save_pretrained(d2.path()).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
    }
    let cfg = std::fs::read_to_string(d1.path().join(CONFIG_NAME)).unwrap();
    assert!(cfg.contains("\"peft_type\": \"HYDRA\""), "{cfg}");
    let f = peft_core::io::safetensors::SafeTensorsFile::open(d1.path().join(WEIGHTS_NAME)).unwrap();
    assert!(f.contains("base_model.model.encoder.layer.0.output.dense.hydra_seq_A.weight"));
    assert!(f.contains("base_model.model.encoder.layer.1.output.dense.lora_B.weight"));
}

#[test]
fn hydra_load_checks_shapes_before_allocating_and_reports_unknown_keys() {
    let hm = new(Tiny::new(6, 2, 0), HydraConfig::new(2, 3, ["dense"]));
    let d = tempfile::tempdir().unwrap();
    hm.save_pretrained(d.path()).unwrap();
    // A config whose sequential rank contradicts the file.
    let path = d.path().join(CONFIG_NAME);
    let text = std::fs::read_to_string(&path).unwrap().replace("\"sequential_r\": 3", "\"sequential_r\": 4");
    std::fs::write(&path, text.replace("\"scale\"", "\"hydra_extra\": 1,\n  \"scale\"")).unwrap();
    let mut m = PeftModel::wrap(Tiny::new(6, 2, 0), 0);
    let err = m.load_adapter(d.path(), "x", &crate::registry()).unwrap_err();
    assert!(matches!(err, AdapterError::TensorShape { .. }), "{err}");
    assert!(m.adapter_names().is_empty());
    assert!(m.layers[0][2].adapters().is_empty(), "nothing attached");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"sequential_r\": 4", "\"sequential_r\": 3");
    std::fs::write(&path, text).unwrap();
    let report = m.load_adapter(d.path(), "x", &crate::registry()).unwrap();
    assert!(report.ignored_config.iter().any(|l| l.contains("hydra_extra")), "{report}");
}

#[test]
fn hydra_bad_configs_are_typed_errors() {
    let bad = |c: HydraConfig| PeftModel::new(Tiny::new(4, 1, 0), c, "a", 0).err().unwrap();
    assert!(matches!(bad(HydraConfig::new(0, 2, ["query"])), AdapterError::InvalidConfig { .. }));
    assert!(matches!(bad(HydraConfig::new(2, 2, ["nope"])), AdapterError::Core(Error::NoTargetMatched { .. })));
    let mut c = HydraConfig::new(2, 2, ["query"]);
    c.scale = f64::NAN;
    assert!(matches!(bad(c), AdapterError::InvalidConfig { .. }));
}

#[test]
fn deleting_a_merged_hydra_adapter_restores_weight_and_bias() {
    let mut hm = new(Tiny::new(6, 1, 0), HydraConfig::new(2, 3, ["query", "dense"]));
    perturb(&hm, 6);
    for (s, _) in hydra(&hm).layers() {
        let b = s.base().bias().unwrap();
        b.set(RandomInit::new(23, 0.5).get("b", &b.shape()).unwrap()).unwrap();
    }
    let sites: Vec<Linear> = hydra(&hm).layers().iter().map(|(s, _)| s.clone()).collect();
    let before: Vec<_> =
        sites.iter().map(|s| (s.base().dense_weight().unwrap(), s.base().bias().unwrap().value().to_owned())).collect();
    hm.merge_adapter().unwrap();
    hm.delete_adapter("default").unwrap();
    for (s, (w0, b0)) in sites.iter().zip(&before) {
        assert!(s.adapters().is_empty());
        assert_eq!(&s.base().bias().unwrap().value().to_owned(), b0, "{}", s.path());
        let w = s.base().dense_weight().unwrap();
        assert!(max_abs_diff(w.as_slice().unwrap(), w0.as_slice().unwrap()) < 1e-5, "{}", s.path());
    }
}
