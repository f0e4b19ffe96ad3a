//! Registry entries for the data-driven and structured inits: `"corda"`, `"eva"`, `"loldu"`, `"lora-sb"`.
//!
//! CorDA, EVA and LoRA-SB need calibration data ([`Method::needs_calibration`]); their [`Method::prepare`]
//! without data returns an error. Learning rates are starting points for the bench's short runs, **not tuned**:
//! CorDA starts from the principal (IPM) components like PiSSA and takes PiSSA's 1e-3; EVA trains as LoRA
//! (2.5e-3); LoLDU trains only `r` scalars per site and LoRA-SB only an `r × r` matrix per site, so both take a
//! higher 1e-2 / 5e-3 (LoRA-XS-style methods are trained at higher rates than LoRA).

use std::path::Path;

use peft_core::adapter::method::save_params;
use peft_core::adapter::{Method, Prepared};
use peft_core::nn::Module;
use peft_core::{Param, Result, Tensor};

use crate::config::LoraConfig;
use crate::corda::{corda_init, CordaConfig};
use crate::eva::{eva_init, EvaConfig};
use crate::loldu::{LolduConfig, LolduModel};
use crate::lora_sb::{LoraSbConfig, LoraSbModel};
use crate::methods::LoraPrepared;

/// Which data-driven LoRA init a [`DataInitMethod`] runs.
#[derive(Clone, Debug)]
pub enum DataInit {
    /// CorDA with its config.
    Corda(CordaConfig),
    /// EVA with its config.
    Eva(EvaConfig),
}

/// CorDA or EVA on a [`LoraConfig`].
#[derive(Clone, Debug)]
pub struct DataInitMethod {
    name: String,
    /// The LoRA config (targets, rank, alpha).
    pub config: LoraConfig,
    /// The init and its options.
    pub init: DataInit,
    lr: f64,
    /// Adapter init seed (A of untouched parts; unused by CorDA/EVA factors).
    pub seed: u64,
    /// At most this many calibration batches (`None`: all, EVA stops earlier once converged).
    pub max_batches: Option<usize>,
}

impl DataInitMethod {
    /// CorDA (IPM) r=8, alpha=8 on `targets`.
    pub fn corda<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> Self {
        DataInitMethod {
            name: "corda".into(),
            config: LoraConfig::new(8, 8.0, targets),
            init: DataInit::Corda(CordaConfig::default()),
            lr: 1e-3,
            seed: 0,
            max_batches: Some(32),
        }
    }

    /// EVA r=8, alpha=16, rho=2 on `targets`.
    pub fn eva<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> Self {
        DataInitMethod {
            name: "eva".into(),
            config: LoraConfig::new(8, 16.0, targets),
            init: DataInit::Eva(EvaConfig::default()),
            lr: 2.5e-3,
            seed: 0,
            max_batches: Some(32),
        }
    }
}

/// Makes the head trainable and saved: modules_to_save for heads inside the model, the rest returned.
fn with_head(cfg: &mut LoraConfig, head: &[Param]) {
    let mut mts = cfg.modules_to_save.take().unwrap_or_default();
    for h in head {
        let module = h.name().rsplit_once('.').map_or(h.name(), |(m, _)| m).to_string();
        if !mts.contains(&module) {
            mts.push(module);
        }
    }
    cfg.modules_to_save = (!mts.is_empty()).then_some(mts);
}

fn no_data(name: &str) -> peft_core::Error {
    peft_core::Error::Invalid { op: "prepare", msg: format!("{name} needs calibration data: use prepare_calibrated") }
}

impl Method for DataInitMethod {
    fn name(&self) -> &str {
        &self.name
    }
    fn describe(&self) -> String {
        let kind = match &self.init {
            DataInit::Corda(c) => format!("CorDA-{:?}", c.corda_method).to_uppercase().replace("CORDA", "CorDA"),
            DataInit::Eva(e) => format!("EVA rho={}", e.rho),
        };
        format!("{kind} r={} alpha={}", self.config.r, self.config.alpha())
    }
    fn default_lr(&self) -> f64 {
        self.lr
    }
    fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }
    fn prepare(&self, _model: &dyn Module, _head: &[Param]) -> Result<Box<dyn Prepared>> {
        Err(no_data(&self.name))
    }
    fn needs_calibration(&self) -> bool {
        true
    }
    fn prepare_calibrated(
        &self,
        model: &dyn Module,
        head: &[Param],
        calib: &mut dyn FnMut(usize) -> Result<Option<Tensor>>,
    ) -> Result<Box<dyn Prepared>> {
        let mut cfg = self.config.clone();
        with_head(&mut cfg, head);
        let lm = match &self.init {
            DataInit::Corda(c) => corda_init(model, &cfg, c, "default", self.seed, calib, self.max_batches)?,
            DataInit::Eva(e) => eva_init(model, &cfg, e, "default", self.seed, calib, self.max_batches)?,
        };
        Ok(Box::new(LoraPrepared::new(lm, head)))
    }
}

/// LoLDU or LoRA-SB.
#[derive(Clone, Debug)]
pub enum StructuredMethod {
    /// LoLDU with its config and learning rate.
    Loldu(LolduConfig, f64),
    /// LoRA-SB with its config (whose `lr` is also the training rate).
    LoraSb(LoraSbConfig),
}

impl StructuredMethod {
    /// LoLDU r=8 (α = 1) on `targets`.
    pub fn loldu<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> Self {
        StructuredMethod::Loldu(LolduConfig::new(8, targets), 1e-2)
    }

    /// LoRA-SB r=8 on `targets`, lr 5e-3, η from a 200-step run with 2% warm-up, 8 calibration batches.
    pub fn lora_sb<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> Self {
        let mut c = LoraSbConfig::new(8, targets);
        c.lr = 5e-3;
        c.total_steps = 200;
        c.num_batches = 8;
        StructuredMethod::LoraSb(c)
    }
}

enum StructuredModel {
    Loldu(LolduModel),
    LoraSb(LoraSbModel),
}

/// A model prepared by a [`StructuredMethod`].
pub struct StructuredPrepared {
    model: StructuredModel,
    head: Vec<Param>,
}

impl Prepared for StructuredPrepared {
    fn trainable(&self) -> Vec<Param> {
        let mut v = match &self.model {
            StructuredModel::Loldu(m) => m.trainable_params(),
            StructuredModel::LoraSb(m) => m.trainable_params(),
        };
        v.extend(self.head.iter().cloned());
        v
    }
    fn save(&self, dir: &Path) -> Result<u64> {
        let mut bytes = match &self.model {
            StructuredModel::Loldu(m) => m.save_pretrained(dir)?,
            StructuredModel::LoraSb(m) => m.save_pretrained(dir)?,
        };
        if !self.head.is_empty() {
            bytes += save_params(&self.head, dir)?;
        }
        Ok(bytes)
    }
}

impl Method for StructuredMethod {
    fn name(&self) -> &str {
        match self {
            StructuredMethod::Loldu(..) => "loldu",
            StructuredMethod::LoraSb(..) => "lora-sb",
        }
    }
    fn describe(&self) -> String {
        match self {
            StructuredMethod::Loldu(c, _) => format!("LoLDU r={} alpha={}", c.r, c.alpha),
            StructuredMethod::LoraSb(c) => format!("LoRA-SB r={} ({} calibration batches)", c.r, c.num_batches),
        }
    }
    fn default_lr(&self) -> f64 {
        match self {
            StructuredMethod::Loldu(_, lr) => *lr,
            StructuredMethod::LoraSb(c) => c.lr,
        }
    }
    fn prepare(&self, model: &dyn Module, head: &[Param]) -> Result<Box<dyn Prepared>> {
        match self {
            StructuredMethod::Loldu(c, _) => {
                let m = LolduModel::new(model, c.clone(), "default")?;
                Ok(Box::new(StructuredPrepared { model: StructuredModel::Loldu(m), head: train_head(head) }))
            }
            StructuredMethod::LoraSb(_) => Err(no_data("lora-sb")),
        }
    }
    fn needs_calibration(&self) -> bool {
        matches!(self, StructuredMethod::LoraSb(_))
    }
    fn prepare_calibrated(
        &self,
        model: &dyn Module,
        head: &[Param],
        calib: &mut dyn FnMut(usize) -> Result<Option<Tensor>>,
    ) -> Result<Box<dyn Prepared>> {
        match self {
            StructuredMethod::Loldu(..) => self.prepare(model, head),
            StructuredMethod::LoraSb(c) => {
                let m = LoraSbModel::init(model, c.clone(), "default", calib)?;
                Ok(Box::new(StructuredPrepared { model: StructuredModel::LoraSb(m), head: train_head(head) }))
            }
        }
    }
}

fn train_head(head: &[Param]) -> Vec<Param> {
    for h in head {
        h.set_trainable(true);
    }
    head.to_vec()
}

/// The four entries on the given targets.
pub fn init_methods_for(targets: &[&str]) -> Vec<Box<dyn Method>> {
    let t = || targets.iter().map(|s| s.to_string());
    vec![
        Box::new(DataInitMethod::corda(t())),
        Box::new(DataInitMethod::eva(t())),
        Box::new(StructuredMethod::loldu(t())),
        Box::new(StructuredMethod::lora_sb(t())),
    ]
}

#[cfg(test)]
mod tests {
    use peft_core::nn::Ctx;
    use peft_core::{AdamW, Optimizer};

    use super::*;
    use crate::testutil::{input, Tiny};

    fn batches(model: &Tiny, n: usize) -> impl FnMut(usize) -> Result<Option<Tensor>> + '_ {
        let targets: Vec<i64> = (0..6).map(|i| (i % 3) as i64).collect();
        move |i| {
            if i >= n {
                return Ok(None);
            }
            let x = input(6, 8, 100 + i as u64);
            Ok(Some(model.forward(&x, &Ctx::train(i as u64))?.cross_entropy(&targets, None, 0.0)?))
        }
    }

    /// Every entry prepares (with data where needed), trains its parameters and the head, leaves the frozen
    /// weights alone, reduces the loss and saves.
    #[test]
    fn init_methods_prepare_train_and_save() {
        let x = input(12, 8, 3);
        let targets: Vec<i64> = (0..12).map(|i| (i % 3) as i64).collect();
        for m in init_methods_for(&["query", "value"]) {
            let model = Tiny::new(8, 2, 0);
            let head = model.classifier.base().params();
            if m.needs_calibration() {
                assert!(m.prepare(&model, &head).is_err(), "{}", m.name());
            }
            let mut calib = batches(&model, 4);
            let prep = m.prepare_calibrated(&model, &head, &mut calib).unwrap();
            let frozen = model.layers[0][2].base().params()[0].value().to_owned();
            let tr = prep.trainable();
            assert!(tr.iter().any(|p| p.name() == "classifier.weight"), "{}", m.name());
            assert!(tr.iter().all(Param::trainable));
            let mut opt = AdamW::with_lr(tr, m.default_lr(), 0.0).unwrap();
            let mut losses = Vec::new();
            for step in 0..40 {
                let loss = model.forward(&x, &Ctx::train(step)).unwrap().cross_entropy(&targets, None, 0.0).unwrap();
                let g = loss.backward().unwrap();
                losses.push(loss.item().unwrap());
                drop(loss);
                opt.step(&g).unwrap();
            }
            assert!(losses[39] < 0.7 * losses[0], "{}: {} -> {}", m.name(), losses[0], losses[39]);
            assert_eq!(model.layers[0][2].base().params()[0].value().to_owned(), frozen, "{}", m.name());
            let dir = tempfile::tempdir().unwrap();
            assert!(prep.save(dir.path()).unwrap() > 0);
            assert!(dir.path().join("adapter_config.json").exists());
            assert!(m.describe().contains("r=8"), "{}", m.describe());
        }
    }

    #[test]
    fn data_driven_methods_reject_empty_calibration() {
        for m in init_methods_for(&["query"]).into_iter().filter(|m| m.needs_calibration()) {
            let model = Tiny::new(8, 1, 0);
            let e = m.prepare_calibrated(&model, &[], &mut |_| Ok(None)).err().unwrap();
            assert!(e.to_string().contains("empty"), "{}: {e}", m.name());
            assert!(model.layers[0][0].adapters().is_empty(), "{}", m.name());
        }
    }
}
