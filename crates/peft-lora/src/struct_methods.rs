//! Registry entries for the structured LoRA variants that train on the bench's sequence classifier: `"hydra"`,
//! `"mos"`, `"mixlora"`, `"poly"`. Poly is registered single-task (`n_tasks = 1`, every row routed as task 0, as
//! a single-task trainer sets no task ids): it learns one soft mixture of its skills.
//!
//! Hyper-parameters: Hydra uses its NLU recipe (both branches on the FFN output dense, `r_p = 4`, `r_s = 8`,
//! scale 1); MoS uses rank 8, α = 16 on the given targets with a budget of 3 equivalent ranks (1 private) and
//! 4 shards per vector (8/3 times fewer trainable parameters than LoRA r = 8; the pool must hold the 28 distinct
//! shards one module draws, so at least 4 adapted modules are needed); MixLoRA uses the README example
//! (8 experts, top-2, r = 8, α = 16, router std 0.02) with LoRA on the given attention targets; Poly uses PEFT's
//! defaults (r = 8, 4 skills, 1 split, LoRA scaling 1/r) on the given targets. The learning rate is the bench's
//! LoRA rate (2.5e-3, see [`crate::methods::LoraMethod`]) for all four: not tuned per method. MixLoRA's
//! load-balancing loss reaches the trainer through [`Prepared::take_aux_loss`].

use std::path::Path;

use peft_core::adapter::{Method, ModulePattern, Prepared};
use peft_core::nn::{named_params, Module};
use peft_core::{Param, Result};

use crate::hydra::{HydraConfig, HydraModel};
use crate::mixlora::{MixLoraConfig, MixLoraModel};
use crate::mos::{MosConfig, MosModel};
use crate::poly::{PolyConfig, PolyModel};

/// The method and its config.
#[derive(Clone, Debug)]
pub enum StructKind {
    /// Hydra.
    Hydra(HydraConfig),
    /// MoS.
    Mos(MosConfig),
    /// MixLoRA.
    MixLora(MixLoraConfig),
    /// Poly (single task).
    Poly(PolyConfig),
}

/// A structured LoRA variant with fixed hyper-parameters.
#[derive(Clone, Debug)]
pub struct StructMethod {
    /// The method and config.
    pub kind: StructKind,
    lr: f64,
    /// Seed of the adapter initialisation.
    pub seed: u64,
}

impl StructMethod {
    /// `kind` at learning rate `lr`.
    pub fn new(kind: StructKind, lr: f64) -> Self {
        StructMethod { kind, lr, seed: 0 }
    }
}

fn targets(t: &ModulePattern) -> String {
    match t {
        ModulePattern::List(v) => v.join(","),
        ModulePattern::Regex(s) => s.clone(),
    }
}

impl Method for StructMethod {
    fn name(&self) -> &str {
        match self.kind {
            StructKind::Hydra(_) => "hydra",
            StructKind::Mos(_) => "mos",
            StructKind::MixLora(_) => "mixlora",
            StructKind::Poly(_) => "poly",
        }
    }

    fn describe(&self) -> String {
        match &self.kind {
            StructKind::Hydra(c) => {
                format!("Hydra r_p={} r_s={} scale={} on {}", c.r, c.sequential_r, c.scale, targets(&c.target_modules))
            }
            StructKind::Mos(c) => format!(
                "MoS r={} alpha={} budget={} private={} shards/vec={} on {}",
                c.r,
                c.lora_alpha,
                c.valid_param_lora_r,
                c.valid_param_private_r,
                c.num_chunk_per_vec,
                targets(&c.target_modules)
            ),
            StructKind::MixLora(c) => format!(
                "MixLoRA E={} top-{} r={} alpha={} on FFN + {}",
                c.num_experts,
                c.top_k,
                c.r,
                c.lora_alpha,
                c.target_modules.as_ref().map_or("-".into(), targets)
            ),
            StructKind::Poly(c) => format!(
                "Poly r={} skills={} splits={} tasks={} on {}",
                c.r,
                c.n_skills,
                c.n_splits,
                c.n_tasks,
                targets(&c.target_modules)
            ),
        }
    }

    fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }
    fn default_lr(&self) -> f64 {
        self.lr
    }

    fn prepare(&self, model: &dyn Module, head: &[Param]) -> Result<Box<dyn Prepared>> {
        for p in named_params(model) {
            p.set_trainable(false);
        }
        let model: Box<dyn Saves> = match &self.kind {
            StructKind::Hydra(c) => Box::new(HydraModel::new(model, c.clone(), "default", self.seed)?),
            StructKind::Mos(c) => Box::new(MosModel::new(model, c.clone(), "default", self.seed)?),
            StructKind::MixLora(c) => Box::new(MixLoraModel::new(model, c.clone(), "default", self.seed)?),
            StructKind::Poly(c) => Box::new(PolyModel::new(model, c.clone(), "default", self.seed)?),
        };
        let mut trainable = model.trainable();
        for h in head {
            h.set_trainable(true);
            if !trainable.iter().any(|p| p.id() == h.id()) {
                trainable.push(h.clone());
            }
        }
        Ok(Box::new(StructPrepared { model, head: head.to_vec(), trainable }))
    }
}

/// What [`StructPrepared`] needs from an adapted model.
trait Saves {
    fn trainable(&self) -> Vec<Param>;
    fn save(&self, dir: &Path) -> Result<u64>;
    fn take_aux_loss(&self) -> Result<Option<peft_core::Tensor>> {
        Ok(None)
    }
}

impl Saves for HydraModel {
    fn trainable(&self) -> Vec<Param> {
        self.trainable_params()
    }
    fn save(&self, dir: &Path) -> Result<u64> {
        self.save_pretrained(dir)
    }
}

impl Saves for MosModel {
    fn trainable(&self) -> Vec<Param> {
        self.trainable_params()
    }
    fn save(&self, dir: &Path) -> Result<u64> {
        self.save_pretrained(dir)
    }
}

impl Saves for PolyModel {
    fn trainable(&self) -> Vec<Param> {
        self.trainable_params()
    }
    fn save(&self, dir: &Path) -> Result<u64> {
        self.save_pretrained(dir)
    }
}

impl Saves for MixLoraModel {
    fn trainable(&self) -> Vec<Param> {
        self.trainable_params()
    }
    fn save(&self, dir: &Path) -> Result<u64> {
        self.save_pretrained(dir)
    }
    fn take_aux_loss(&self) -> Result<Option<peft_core::Tensor>> {
        MixLoraModel::take_aux_loss(self)
    }
}

/// A model prepared by a [`StructMethod`].
pub struct StructPrepared {
    model: Box<dyn Saves>,
    head: Vec<Param>,
    trainable: Vec<Param>,
}

impl Prepared for StructPrepared {
    fn trainable(&self) -> Vec<Param> {
        self.trainable.clone()
    }

    /// MixLoRA's load-balance loss (coefficient applied); none for Hydra and MoS.
    fn take_aux_loss(&self) -> Result<Option<peft_core::Tensor>> {
        self.model.take_aux_loss()
    }

    /// The adapter files plus `model.safetensors` with the head.
    fn save(&self, dir: &Path) -> Result<u64> {
        let mut bytes = self.model.save(dir)?;
        if !self.head.is_empty() {
            bytes += peft_core::adapter::method::save_params(&self.head, dir)?;
        }
        Ok(bytes)
    }
}

/// `"hydra"`, `"mos"` (on `targets`) and `"mixlora"` (LoRA on `targets`), for BERT-named encoders.
pub fn methods_for(targets: &[&str]) -> Vec<Box<dyn Method>> {
    let t = || targets.iter().map(|s| s.to_string());
    // The FFN output dense only (a list entry `output.dense` would also match `attention.output.dense`).
    let mut hydra = HydraConfig::new(4, 8, Vec::<String>::new());
    hydra.target_modules = ModulePattern::Regex(r".*\.\d+\.output\.dense".into());
    let mos = MosConfig::new(8, 16.0, 3, 1, 4, t());
    let mix = MixLoraConfig::bert(t());
    vec![
        Box::new(StructMethod::new(StructKind::Hydra(hydra), 2.5e-3)),
        Box::new(StructMethod::new(StructKind::Mos(mos), 2.5e-3)),
        Box::new(StructMethod::new(StructKind::MixLora(mix), 2.5e-3)),
        Box::new(StructMethod::new(StructKind::Poly(PolyConfig::new(8, 1, 4, 1, t())), 2.5e-3)),
    ]
}

#[cfg(test)]
mod tests {
    use ndarray::ArrayD;
    use peft_core::nn::{
        Activation, Ctx, EncoderConfig, EncoderLayer, EncoderNames, Linear, NormPlacement, RandomInit, Visitor,
        WeightSource,
    };
    use peft_core::{AdamW, Optimizer, Tensor};

    use super::*;

    /// Two BERT encoder layers (post-norm, GELU) on `[B, L, d]`, mean pooling, a 3-class classifier.
    struct Bert {
        layers: Vec<EncoderLayer>,
        classifier: Linear,
    }

    fn bert(d: usize) -> Bert {
        let cfg = EncoderConfig {
            hidden: d,
            heads: 2,
            intermediate: 2 * d,
            act: Activation::Gelu,
            eps: 1e-12,
            norm: NormPlacement::Post,
            k_bias: true,
            dropout: 0.0,
        };
        let init = RandomInit::new(0, 0.3);
        let layers = (0..2)
            .map(|i| EncoderLayer::load(&format!("encoder.layer.{i}"), &EncoderNames::BERT, &cfg, &init).unwrap())
            .collect();
        Bert { layers, classifier: Linear::load("classifier", d, 3, true, &init).unwrap().as_output() }
    }

    impl Bert {
        fn forward(&self, x: &Tensor, ctx: &Ctx) -> Tensor {
            let mut h = x.clone();
            for l in &self.layers {
                h = l.forward(&h, None, ctx).unwrap();
            }
            self.classifier.forward(&h.mean(&[1], false).unwrap(), ctx).unwrap()
        }
    }

    impl Module for Bert {
        fn visit(&self, v: &mut dyn Visitor) {
            for l in &self.layers {
                l.visit(v);
            }
            self.classifier.visit(v);
        }
    }

    fn x(b: usize, d: usize) -> Tensor {
        Tensor::new(RandomInit::new(3, 1.0).get("x", &[b, 4, d]).unwrap())
    }

    #[test]
    fn structured_methods_are_identity_at_prepare_and_save() {
        let names: Vec<String> = methods_for(&["query", "value"]).iter().map(|m| m.name().to_string()).collect();
        assert_eq!(names, ["hydra", "mos", "mixlora", "poly"]);
        for m in methods_for(&["query", "value"]) {
            let model = bert(8);
            let xs = x(2, 8);
            let y0 = model.forward(&xs, &Ctx::eval()).to_vec();
            let prep = m.prepare(&model, &model.classifier.base().params()).unwrap();
            let y1 = model.forward(&xs, &Ctx::eval()).to_vec();
            assert!(peft_core::testing::max_abs_diff(&y0, &y1) < 1e-5, "{}", m.name());
            let n: usize = prep.trainable().iter().map(Param::numel).sum();
            let want = match m.name() {
                // 2 FFN output denses (16 → 8): 4·(16+8) + 8·(8+8).
                "hydra" => 2 * (4 * 24 + 8 * 16),
                // 4 sites of 8 → 8: budget 3 ranks · (8 + 8).
                "mos" => 4 * 3 * 16,
                // 4 sites of 8 → 8: 4 skills · r 8 · (8 + 8) + 4 router logits (one task).
                "poly" => 4 * (4 * 8 * 16 + 4),
                // Per layer: router 8·8 + 8 experts · 8·(8+16+16+8); attention 2 sites · 8·16.
                _ => 2 * (64 + 8 * 8 * 48 + 2 * 8 * 16),
            };
            assert_eq!(n, want + 27, "{}", m.name());
            let dir = tempfile::tempdir().unwrap();
            assert!(prep.save(dir.path()).unwrap() > 0);
            assert!(dir.path().join("adapter_config.json").exists() && dir.path().join("model.safetensors").exists());
            assert!(m.describe().contains("r"));
        }
    }

    /// Each method fits a small classification task with AdamW (rate ×2), leaving frozen weights alone.
    #[test]
    fn each_structured_method_reduces_the_loss_and_leaves_frozen_weights_alone() {
        let xs = x(12, 8);
        let targets: Vec<i64> = (0..12).map(|i| (i % 3) as i64).collect();
        for m in methods_for(&["query", "value"]) {
            let model = bert(8);
            let prep = m.prepare(&model, &model.classifier.base().params()).unwrap();
            let frozen: ArrayD<f32> = model.layers[0].mlp.fc2.base().params()[0].value().to_owned();
            let mut opt = AdamW::with_lr(prep.trainable(), m.default_lr() * 2.0, 0.0).unwrap();
            let mut losses = Vec::new();
            for step in 0..40 {
                let loss = model.forward(&xs, &Ctx::train(step)).cross_entropy(&targets, None, 0.0).unwrap();
                let g = loss.backward().unwrap();
                losses.push(loss.item().unwrap());
                drop(loss);
                opt.step(&g).unwrap();
            }
            assert!(losses[39] < 0.7 * losses[0], "{}: {} -> {}", m.name(), losses[0], losses[39]);
            assert_eq!(model.layers[0].mlp.fc2.base().params()[0].value().to_owned(), frozen, "{}", m.name());
        }
    }
}
