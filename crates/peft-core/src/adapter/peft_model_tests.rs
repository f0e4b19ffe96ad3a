//! PeftModel behaviour with peft-core's own tuners and a recording test tuner.

use std::sync::{Arc, Mutex};

use ndarray::{ArrayD, IxDyn};

use super::*;
use crate::adapter::ModulePattern;
use crate::adapter::{BaseTuneConfig, ConfigRegistry, DeltaConfig, InjectCx, Tuner, TunerConfig};
use crate::nn::{Ctx, Linear, Module, RandomInit, Visitor, WeightSource};
use crate::testing::max_abs_diff;
use crate::Tensor;

/// `head(tanh(body(x)))`.
struct Net {
    body: Linear,
    head: Linear,
}

impl Module for Net {
    fn visit(&self, v: &mut dyn Visitor) {
        self.body.visit(v);
        self.head.visit(v);
    }
}

impl Net {
    fn new(seed: u64) -> Self {
        let init = RandomInit::new(seed, 0.5);
        Net {
            body: Linear::load("body", 4, 5, true, &init).unwrap(),
            head: Linear::load("head", 5, 2, true, &init).unwrap().as_output(),
        }
    }
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Tensor {
        let h = self.body.forward(x, ctx).unwrap().tanh();
        self.head.forward(&h, ctx).unwrap()
    }
}

fn x() -> Tensor {
    Tensor::new(RandomInit::new(7, 1.0).get("x", &[3, 4]).unwrap())
}

fn set_all(ps: &[Param], v: f32) {
    for p in ps {
        p.update(|a| a.fill(v));
    }
}

#[test]
fn bitfit_delta_is_identity_at_init_and_merges_exactly() {
    let net = Net::new(0);
    let y0 = net.forward(&x(), &Ctx::eval()).to_vec();
    let mut m = get_peft_model(net, DeltaConfig::bitfit()).unwrap();
    assert_eq!(m.forward(&x(), &Ctx::eval()).to_vec(), y0);
    let tr = m.trainable_params();
    assert_eq!(
        tr.iter().map(|p| p.name().to_string()).collect::<Vec<_>>(),
        ["body.bias.delta.default", "head.bias.delta.default"]
    );
    assert!(m.base_params().iter().all(|p| !p.trainable()));
    set_all(&tr, 0.3);
    let y1 = m.forward(&x(), &Ctx::eval()).to_vec();
    assert!(max_abs_diff(&y0, &y1) > 1e-3);
    m.merge_adapter().unwrap();
    assert!(max_abs_diff(&m.forward(&x(), &Ctx::eval()).to_vec(), &y1) < 1e-6);
    m.unmerge_adapter().unwrap();
    assert!(max_abs_diff(&m.forward(&x(), &Ctx::eval()).to_vec(), &y1) < 1e-6);
    let net = m.merge_and_unload().unwrap();
    assert!(max_abs_diff(&net.forward(&x(), &Ctx::eval()).to_vec(), &y1) < 1e-6);
    assert!(net.body.base().params()[1].deltas().is_empty());
}

#[test]
fn dense_delta_gradient_matches_finite_differences() {
    let net = Net::new(1);
    let m = get_peft_model(net, DeltaConfig::new(ModulePattern::list(["body.weight", "head.bias"]))).unwrap();
    let tr = m.trainable_params();
    assert_eq!(tr.len(), 2);
    set_all(&tr, 0.1);
    let r = Tensor::new(RandomInit::new(3, 1.0).get("r", &[3, 2]).unwrap());
    let loss = || m.forward(&x(), &Ctx::eval()).mul(&r).unwrap().sum_all();
    let g = loss().backward().unwrap();
    for p in &tr {
        let an = g.get_id(p.id()).unwrap().clone();
        let v0 = p.value().to_owned();
        for i in 0..p.numel() {
            let mut vp = v0.clone();
            vp.as_slice_mut().unwrap()[i] += 1e-2;
            p.set(vp).unwrap();
            let lp = f64::from(crate::no_grad(loss).item().unwrap());
            let mut vm = v0.clone();
            vm.as_slice_mut().unwrap()[i] -= 1e-2;
            p.set(vm).unwrap();
            let lm = f64::from(crate::no_grad(loss).item().unwrap());
            p.set(v0.clone()).unwrap();
            let num = (lp - lm) / 2e-2;
            let a = f64::from(an.as_slice().unwrap()[i]);
            assert!((a - num).abs() < 2e-3 * (1.0 + num.abs()), "{}[{i}]: {a} vs {num}", p.name());
        }
    }
}

/// Audit item: each adapter keeps its own copy of a `modules_to_save` module; switching, disabling and deleting
/// restore the right values (before, the shared module was edited in place and the second adapter overwrote the
/// first).
#[test]
fn modules_to_save_copies_are_per_adapter_and_originals_come_back() {
    let net = Net::new(2);
    let head_w = net.head.base().params()[0].clone();
    let original = head_w.value().to_owned();
    let mut cfg = DeltaConfig::bitfit();
    cfg.modules_to_save = Some(vec!["head".into()]);
    let mut m = PeftModel::new(net, cfg.clone(), "a", 0).unwrap();
    m.add_adapter("b", cfg).unwrap();
    // Train adapter a's copy.
    assert!(head_w.trainable());
    head_w.update(|w| w.fill(1.0));
    m.set_adapter("b").unwrap();
    assert_eq!(head_w.value().to_owned(), original, "b starts from the original module");
    head_w.update(|w| w.fill(2.0));
    m.set_adapter("a").unwrap();
    assert!(head_w.value().iter().all(|&v| v == 1.0), "a's copy survived b's training");
    let sa = m.state_dict("a").unwrap();
    let sb = m.state_dict("b").unwrap();
    assert!(sa["base_model.model.head.weight"].iter().all(|&v| v == 1.0));
    assert!(sb["base_model.model.head.weight"].iter().all(|&v| v == 2.0));
    m.disable_adapters().unwrap();
    assert_eq!(head_w.value().to_owned(), original);
    assert!(!head_w.trainable());
    m.enable_adapters().unwrap();
    assert!(head_w.value().iter().all(|&v| v == 1.0));
    m.delete_adapter("a").unwrap();
    assert_eq!(head_w.value().to_owned(), original, "deleting the active adapter restores the original");
    assert!(m.set_adapters(&["b"]).is_ok());
    assert!(head_w.value().iter().all(|&v| v == 2.0));
    let net = m.into_base().unwrap();
    assert_eq!(net.head.base().params()[0].value().to_owned(), original);
}

#[test]
fn two_active_adapters_cannot_both_own_modules_to_save() {
    let mut cfg = DeltaConfig::bitfit();
    cfg.modules_to_save = Some(vec!["head".into()]);
    let mut m = PeftModel::new(Net::new(0), cfg.clone(), "a", 0).unwrap();
    m.add_adapter("b", cfg).unwrap();
    assert!(matches!(m.set_adapters(&["a", "b"]), Err(AdapterError::InvalidConfig { .. })));
    let mut bad = DeltaConfig::bitfit();
    bad.modules_to_save = Some(vec!["nope".into()]);
    assert!(matches!(m.add_adapter("c", bad), Err(AdapterError::InvalidConfig { .. })));
    assert!(matches!(m.add_adapter("a", DeltaConfig::bitfit()), Err(AdapterError::AdapterExists { .. })));
    assert!(matches!(m.set_adapter("zzz"), Err(AdapterError::UnknownAdapter { .. })));
}

#[test]
fn save_and_load_round_trip_with_report() {
    let net = Net::new(3);
    let mut cfg = DeltaConfig::bitfit();
    cfg.modules_to_save = Some(vec!["head".into()]);
    let m = get_peft_model(net, cfg).unwrap();
    set_all(&m.trainable_params(), 0.25);
    let y = m.forward(&x(), &Ctx::eval()).to_vec();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    assert!(text.contains("\"inference_mode\": true") && text.contains("\"peft_type\": \"PARAM_DELTA\""), "{text}");
    let reg = ConfigRegistry::new();
    let (m2, report) = PeftModel::from_pretrained(Net::new(3), dir.path(), &reg).unwrap();
    assert!(report.is_clean(), "{report}");
    // body.bias.delta (the head is in modules_to_save, so BitFit leaves its bias alone) + head weight and bias.
    assert_eq!(report.applied.len(), 3, "{report}");
    assert!(max_abs_diff(&m2.forward(&x(), &Ctx::eval()).to_vec(), &y) < 1e-6);
    assert!(m2.trainable_params().is_empty(), "a saved adapter loads in inference mode");
    // An extra tensor is reported, and refused under strict.
    let mut sd = m.state_dict("default").unwrap();
    sd.insert("base_model.model.body.lora_A.weight".into(), ArrayD::zeros(IxDyn(&[1, 4])));
    crate::adapter::files::write_adapter_files(dir.path(), &m.config("default").unwrap().to_json().unwrap(), &sd)
        .unwrap();
    let (_, report) = PeftModel::from_pretrained(Net::new(3), dir.path(), &reg).unwrap();
    assert_eq!(report.unexpected, ["base_model.model.body.lora_A.weight"]);
    assert!(report.check_strict().is_err());
}

#[test]
fn bad_adapter_files_are_typed_errors_and_leave_nothing_attached() {
    let dir = tempfile::tempdir().unwrap();
    let m = get_peft_model(Net::new(0), DeltaConfig::bitfit()).unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let reg = ConfigRegistry::new();
    // Unknown peft_type.
    let cfg_path = dir.path().join("adapter_config.json");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, good.replace("PARAM_DELTA", "LOHA")).unwrap();
    assert!(matches!(
        PeftModel::from_pretrained(Net::new(0), dir.path(), &reg),
        Err(AdapterError::UnknownPeftType { .. })
    ));
    std::fs::write(&cfg_path, "{not json").unwrap();
    assert!(matches!(PeftModel::from_pretrained(Net::new(0), dir.path(), &reg), Err(AdapterError::Json { .. })));
    // A tensor of the wrong shape: error, and the fresh model keeps no delta.
    std::fs::write(&cfg_path, &good).unwrap();
    let mut sd = m.state_dict("default").unwrap();
    sd.insert("base_model.model.body.bias.delta".into(), ArrayD::zeros(IxDyn(&[7])));
    crate::adapter::files::write_adapter_files(dir.path(), &m.config("default").unwrap().to_json().unwrap(), &sd)
        .unwrap();
    let mut fresh = PeftModel::wrap(Net::new(0), 0);
    let e = fresh.load_adapter(dir.path(), "x", &reg).unwrap_err();
    assert!(matches!(e, AdapterError::TensorShape { .. }), "{e}");
    assert!(fresh.adapter_names().is_empty());
    assert!(fresh.body.base().params()[1].deltas().is_empty());
}

#[test]
fn mixed_batches_refuse_unknown_names_and_merged_adapters() {
    let mut m = get_peft_model(Net::new(0), DeltaConfig::bitfit()).unwrap();
    assert!(m.mixed_batch(Ctx::eval(), vec!["default".into(), BASE_ROW.into()]).is_ok());
    let e = m.mixed_batch(Ctx::eval(), vec!["default".into(), "typo".into()]).unwrap_err();
    assert!(matches!(e, AdapterError::UnknownAdapter { .. }), "{e}");
    m.merge_adapter().unwrap();
    let e = m.mixed_batch(Ctx::eval(), vec!["default".into()]).unwrap_err();
    assert!(matches!(e, AdapterError::NotSupportedBy { .. }), "{e}");
}

/// A tuner that logs merges and unmerges.
#[derive(Debug, Clone)]
struct LogCfg(Arc<Mutex<Vec<String>>>);

struct LogTuner(String, Arc<Mutex<Vec<String>>>, Mutex<bool>);

impl TunerConfig for LogCfg {
    fn peft_type(&self) -> &str {
        "LOG"
    }
    fn describe(&self) -> String {
        "log".into()
    }
    fn to_json(&self) -> AdapterResult<serde_json::Value> {
        Ok(serde_json::json!({"peft_type": "LOG"}))
    }
    fn inference_mode(&self) -> bool {
        false
    }
    fn set_inference_mode(&mut self, _on: bool) {}
    fn inject(&self, _m: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        Ok(Box::new(LogTuner(cx.name.into(), self.0.clone(), Mutex::new(false))))
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Tuner for LogTuner {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn name(&self) -> &str {
        &self.0
    }
    fn kind(&self) -> &str {
        "LOG"
    }
    fn params(&self) -> Vec<Param> {
        Vec::new()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        Vec::new()
    }
    fn set_active(&self, _on: bool) {}
    fn merge(&self) -> AdapterResult<()> {
        self.1.lock().unwrap().push(format!("merge {}", self.0));
        *self.2.lock().unwrap() = true;
        Ok(())
    }
    fn unmerge(&self) -> AdapterResult<()> {
        self.1.lock().unwrap().push(format!("unmerge {}", self.0));
        *self.2.lock().unwrap() = false;
        Ok(())
    }
    fn is_merged(&self) -> bool {
        *self.2.lock().unwrap()
    }
    fn detach(&self, _keep: bool) -> AdapterResult<()> {
        Ok(())
    }
}

/// Audit item: unmerge goes in reverse *merge* order (it went in reverse creation order).
#[test]
fn unmerge_runs_in_reverse_merge_order() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut m = PeftModel::wrap(Net::new(0), 0);
    m.add_adapter("first", LogCfg(log.clone())).unwrap();
    m.add_adapter("second", LogCfg(log.clone())).unwrap();
    m.set_adapter("second").unwrap();
    m.merge_adapter().unwrap();
    m.set_adapter("first").unwrap();
    m.merge_adapter().unwrap();
    assert_eq!(m.merged_adapters(), ["second", "first"]);
    m.unmerge_adapter().unwrap();
    assert_eq!(*log.lock().unwrap(), ["merge second", "merge first", "unmerge first", "unmerge second"]);
}

#[test]
fn full_and_head_only_train_the_right_base_parameters() {
    let mut full = BaseTuneConfig::full();
    full.modules_to_save = Some(vec!["head".into()]);
    let m = get_peft_model(Net::new(0), full).unwrap();
    assert_eq!(m.trainable_params().len(), 4);
    let sd = m.state_dict("default").unwrap();
    assert_eq!(sd.keys().cloned().collect::<Vec<_>>(), ["body.bias", "body.weight", "head.bias", "head.weight"]);
    let mut head = BaseTuneConfig::head_only();
    head.modules_to_save = Some(vec!["head".into()]);
    let m = get_peft_model(Net::new(0), head).unwrap();
    let names: Vec<String> = m.trainable_params().iter().map(|p| p.name().to_string()).collect();
    assert_eq!(names, ["head.weight", "head.bias"]);
}
