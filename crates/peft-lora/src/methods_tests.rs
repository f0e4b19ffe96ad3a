use peft_core::adapter::{duplicate_name, MethodSpec, PeftModel};
use peft_core::nn::Ctx;
use peft_core::train::{Loss, Trainer, TrainerConfig};
use peft_core::Param;

use super::*;
use crate::testutil::{input, Tiny};

/// The bench's way to build a method: the head joins `modules_to_save`, the run's seed seeds the init.
fn prepare(spec: &MethodSpec, model: Tiny, seed: u64) -> PeftModel<Tiny> {
    let mut cfg = spec.config();
    cfg.set_modules_to_save(vec!["classifier".into()]).unwrap();
    let mut m = PeftModel::wrap(model, seed);
    m.add_adapter_boxed("default", cfg).unwrap();
    m.set_adapter("default").unwrap();
    m
}

#[test]
fn registry_names_are_unique_and_plain_methods_inject_train_and_save() {
    let all = methods();
    assert_eq!(duplicate_name(&all), None);
    let names: Vec<&str> = all.iter().map(|m| m.name.0).collect();
    assert_eq!(&names[..7], ["lora", "dora", "pissa", "lora-all", "allora", "corda", "eva"]);
    for spec in all.iter().take(3) {
        let m = prepare(spec, Tiny::new(16, 2, 0), 0);
        let tr = m.trainable_params();
        // 4 sites × r·(16+16) (+16 magnitude for DoRA) + head 3·16+3.
        let per = 8 * 32 + if spec.name == DORA { 16 } else { 0 };
        assert_eq!(tr.iter().map(Param::numel).sum::<usize>(), 4 * per + 51, "{}", spec.name);
        let dir = tempfile::tempdir().unwrap();
        assert!(m.save_pretrained(dir.path()).unwrap() > 0);
        let f =
            peft_core::io::safetensors::SafeTensorsFile::open(dir.path().join("adapter_model.safetensors")).unwrap();
        assert!(f.contains("base_model.model.classifier.weight"));
        assert!(spec.lr >= 1e-3 && spec.lr <= 2.5e-3);
        assert!(spec.describe().contains("r=8"), "{}", spec.describe());
    }
    assert!(all.iter().find(|s| s.name == CORDA).unwrap().config.needs_calibration());
}

/// `lora-all` adapts every linear site but the output layer: query, value and output.dense of both layers.
#[test]
fn lora_all_targets_every_linear_but_the_classifier() {
    let spec = methods().into_iter().find(|s| s.name == LORA_ALL).unwrap();
    let m = prepare(&spec, Tiny::new(16, 2, 0), 0);
    let n: usize = m.trainable_params().iter().map(Param::numel).sum();
    assert_eq!(n, 6 * 8 * 32 + 51);
    assert!(m.trainable_params().iter().all(|p| !p.name().starts_with("classifier.lora_")));
    assert!(spec.describe().contains("all-linear"), "{}", spec.describe());
}

#[test]
fn the_seed_changes_the_adapter_init_and_is_reproducible() {
    let spec = methods().into_iter().next().unwrap();
    let lora_a = |seed: u64| -> Vec<f32> {
        let m = prepare(&spec, Tiny::new(16, 2, 0), seed);
        m.trainable_params()
            .iter()
            .filter(|p| p.name().contains("lora_A"))
            .flat_map(|p| p.value().iter().copied().collect::<Vec<f32>>())
            .collect()
    };
    let a1 = lora_a(1);
    assert!(!a1.is_empty());
    assert_ne!(a1, lora_a(2), "two seeds gave the same LoRA init");
    assert_eq!(a1, lora_a(1));
}

/// Each plain registry method fits a small classification task with the core trainer at its rate (×2 for speed),
/// touching only its trainable parameters.
#[test]
fn each_method_reduces_the_loss_and_leaves_frozen_weights_alone() {
    let x = input(12, 8, 3);
    let targets: Vec<i64> = (0..12).map(|i| (i % 3) as i64).collect();
    for spec in methods().iter().filter(|s| !s.config.needs_calibration()) {
        let m = prepare(spec, Tiny::new(8, 2, 0), 0);
        let frozen = m.layers[0][2].base().params()[0].value().to_owned();
        let cfg = TrainerConfig { lr: spec.lr * 2.0, total_steps: 60, max_grad_norm: None, ..TrainerConfig::default() };
        let mut t = Trainer::new(m.trainable_params(), &m, cfg).unwrap();
        let mut losses = Vec::new();
        for _ in 0..60 {
            let r = t
                .step(|ctx: &mut Ctx| Ok(Loss::Single(m.forward(&x, ctx)?.cross_entropy(&targets, None, 0.0)?)))
                .unwrap();
            losses.push(r.loss);
        }
        assert!(losses[59] < 0.5 * losses[0], "{}: {} -> {}", spec.name, losses[0], losses[59]);
        assert_eq!(m.layers[0][2].base().params()[0].value().to_owned(), frozen, "{}", spec.name);
    }
}
