//! A user's own training loop trains the methods with special steps exactly as the bench's trainer does: MixLoRA
//! (router losses through `TrainHooks::aux_loss`) and ALLoRA (gradient rescaling through `transform_grads`). The
//! loop below is the pattern for users; the test checks it reaches bit-identical parameters to
//! `peft_core::train::Trainer` configured as `cargo xtask bench` configures it (same seed, same batches).

use peft_core::adapter::{MethodSpec, PeftModel};
use peft_core::nn::{
    Activation, Ctx, EncoderConfig, EncoderLayer, EncoderNames, Linear, Module, NormPlacement, RandomInit, Visitor,
    WeightSource,
};
use peft_core::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, Optimizer, ParamGroup, Schedule};
use peft_core::train::{Loss, NonFinitePolicy, ScheduleKind, TrainHooks, Trainer, TrainerConfig};
use peft_core::Tensor;

/// Two BERT-named encoder layers, mean pooling, a 3-way classifier.
struct Enc {
    layers: Vec<EncoderLayer>,
    classifier: Linear,
}

impl Enc {
    fn new() -> Self {
        let cfg = EncoderConfig {
            hidden: 16,
            heads: 2,
            intermediate: 32,
            act: Activation::Gelu,
            eps: 1e-12,
            norm: NormPlacement::Post,
            k_bias: true,
            dropout: 0.1,
        };
        let init = RandomInit::new(0, 0.3);
        let layers = (0..2)
            .map(|i| EncoderLayer::load(&format!("encoder.layer.{i}"), &EncoderNames::BERT, &cfg, &init).unwrap())
            .collect();
        Enc { layers, classifier: Linear::load("classifier", 16, 3, true, &init).unwrap().as_output() }
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h, None, ctx)?;
        }
        self.classifier.forward(&h.mean(&[1], false)?, ctx)
    }
}

impl Module for Enc {
    fn visit(&self, v: &mut dyn Visitor) {
        for l in &self.layers {
            l.visit(v);
        }
        self.classifier.visit(v);
    }
}

fn prepared(spec: &MethodSpec, seed: u64) -> PeftModel<Enc> {
    let mut cfg = spec.config();
    cfg.set_modules_to_save(vec!["classifier".into()]).unwrap();
    let mut m = PeftModel::wrap(Enc::new(), seed);
    m.add_adapter_boxed("default", cfg).unwrap();
    m.set_adapter("default").unwrap();
    m
}

fn batches() -> Vec<(Tensor, Vec<i64>)> {
    (0..12)
        .map(|i| {
            let x = Tensor::new(RandomInit::new(100 + i, 1.0).get("x", &[4, 5, 16]).unwrap());
            (x, (0..4).map(|r| ((r + i as usize) % 3) as i64).collect())
        })
        .collect()
}

const LR: f64 = 5e-3;
const WD: f64 = 0.01;
const SEED: u64 = 3;

/// The bench's recipe through the core trainer.
fn with_trainer(m: &PeftModel<Enc>) -> Vec<f64> {
    let data = batches();
    let cfg = TrainerConfig {
        lr: LR,
        weight_decay: WD,
        max_grad_norm: Some(1.0),
        warmup_steps: 1,
        total_steps: data.len(),
        schedule: ScheduleKind::Linear,
        seed: SEED,
        non_finite: NonFinitePolicy::Stop,
        ..TrainerConfig::default()
    };
    let mut t = Trainer::new(m.trainable_params(), m, cfg).unwrap();
    data.iter()
        .map(|(x, y)| t.step(|ctx| Ok(Loss::Single(m.forward(x, ctx)?.cross_entropy(y, None, 0.0)?))).unwrap().loss)
        .collect()
}

/// The same recipe as a user writes it, calling the model's hooks.
fn by_hand(m: &PeftModel<Enc>) -> Vec<f64> {
    let data = batches();
    let groups = ParamGroup::decay_split(m.trainable_params(), LR, WD);
    let mut opt = AdamW::new(groups, AdamWConfig::default()).unwrap();
    let sched = Schedule::linear(1, data.len());
    let mut losses = Vec::new();
    for (step, (x, y)) in data.iter().enumerate() {
        let ctx = Ctx::train(SEED.wrapping_mul(1_000_003).wrapping_add(step as u64));
        let mut loss = m.forward(x, &ctx).unwrap().cross_entropy(y, None, 0.0).unwrap();
        if let Some(aux) = m.aux_loss().unwrap() {
            loss = loss.add(&aux).unwrap();
        }
        losses.push(f64::from(loss.item().unwrap()));
        let mut grads = m.transform_grads(loss.backward().unwrap()).unwrap();
        drop(loss);
        clip_grad_norm(&mut grads, 1.0).unwrap();
        opt.set_lr_factor(sched.lr_factor(step));
        opt.step(&grads).unwrap();
        m.after_step(step).unwrap();
    }
    losses
}

fn values(m: &PeftModel<Enc>) -> Vec<Vec<f32>> {
    m.trainable_params().iter().map(|p| p.value().iter().copied().collect()).collect()
}

#[test]
fn user_loop_equals_the_trainer_for_methods_with_hooks() {
    let specs: Vec<MethodSpec> =
        peft_lora::methods().into_iter().filter(|s| ["allora", "mixlora"].contains(&s.name.0)).collect();
    let names: Vec<&str> = specs.iter().map(|s| s.name.0).collect();
    assert_eq!(names, ["allora", "mixlora"], "both methods with training hooks are covered");
    for spec in &specs {
        let (a, b) = (prepared(spec, SEED), prepared(spec, SEED));
        let init = values(&a);
        assert_eq!(init, values(&b), "{}: same seed, same init", spec.name);
        let la = with_trainer(&a);
        let lb = by_hand(&b);
        assert_eq!(la, lb, "{}: losses", spec.name);
        assert_eq!(values(&a), values(&b), "{}: parameters after training", spec.name);
        assert_ne!(values(&a), init, "{}: training moved the parameters", spec.name);
        println!(
            "{}: {} steps, loss {:.4} -> {:.4}, identical by hand and through the trainer",
            spec.name,
            la.len(),
            la[0],
            la[la.len() - 1]
        );
    }
}
