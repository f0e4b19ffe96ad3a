//! The VTAB-1k training recipe (§7.1 of the specs): AdamW (decoupled weight decay off biases and norms), linear
//! warmup then a half cosine to zero, gradient clipping, no augmentation, shuffled batches every epoch, and
//! top-1 accuracy on a held-out split. One loop serves fine-tuning through the backbone ([`finetune`]) and the
//! linear probe on cached features ([`linear_probe`]).
//!
//! The reported model is the one at the end of training: there is no selection of the best epoch on the test
//! split (the optimistic practice several VTAB codebases follow).

use std::time::Instant;

use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::adapter::PeftModel;
use peft_core::nn::{named_params, Ctx, Linear, Module, RandomInit};
use peft_core::optim::Optimizer;
use peft_core::train::{Loss, NoHooks, NonFinitePolicy, ScheduleKind, TrainHooks, Trainer, TrainerConfig};
use peft_core::{no_grad, Param, Tensor};
use peft_models::vit::Dinov2Classifier;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Result, VisionError};
use crate::features::FeatureSet;
use crate::pipeline::PixelSet;

/// Hyper-parameters of one training run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecipeConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW's decoupled weight decay (not applied to biases and norms).
    pub weight_decay: f64,
    /// Fraction of the steps spent in linear warmup.
    pub warmup_frac: f64,
    /// Gradient-norm clip (`None`: none).
    pub max_grad_norm: Option<f64>,
    /// Seed of the batch order.
    pub seed: u64,
}

impl RecipeConfig {
    /// The paper recipe: 100 epochs, batch 64, lr 1e-3, weight decay 1e-4, 10 warmup epochs, no clipping.
    pub fn paper() -> Self {
        RecipeConfig {
            epochs: 100,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 1e-4,
            warmup_frac: 0.1,
            max_grad_norm: None,
            seed: 0,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |f, r: &str| Err(VisionError::config("RecipeConfig", f, r));
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.warmup_frac) {
            return bad("warmup_frac", "must be in [0, 1]");
        }
        Ok(())
    }
}

/// What a training run measured.
#[derive(Clone, Debug, Default)]
pub struct TrainOutcome {
    /// `(step, mean loss since the previous point)`, about 50 points.
    pub losses: Vec<(usize, f64)>,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Steps skipped by the non-finite guard.
    pub skipped_steps: usize,
    /// Seconds in the training loop.
    pub train_seconds: f64,
    /// Training images per second.
    pub samples_per_sec: f64,
    /// Bytes of the trainer's optimizer state at the end ([`peft_core::optim::Optimizer::state_bytes`]); state an
    /// adapter steps itself (sparse methods) is its tuner's `state_bytes`, not counted here.
    pub optimizer_state_bytes: u64,
}

/// Shuffled batches of `0..n` for every epoch (seeded; the last batch of an epoch keeps the remainder).
pub fn epoch_batches(n: usize, batch_size: usize, epochs: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..epochs {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.shuffle(&mut rng);
        out.extend(idx.chunks(batch_size.max(1)).map(<[usize]>::to_vec));
    }
    out
}

/// The loop: `params` trained by AdamW + warmup/cosine on the cross-entropy of `forward(input(batch))`.
/// `progress(step, total, loss)` is called after every step.
///
/// # Errors
/// Model errors, bad settings, divergence (more than 10% of the steps, or 20 in a row, non-finite).
#[allow(clippy::too_many_arguments)]
pub fn train_loop(
    params: Vec<Param>,
    hooks: &dyn TrainHooks,
    labels: &[usize],
    input: &dyn Fn(&[usize]) -> Result<Tensor>,
    forward: &dyn Fn(&Tensor, &Ctx) -> peft_core::Result<Tensor>,
    cfg: &RecipeConfig,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<TrainOutcome> {
    let ce = |x: &Tensor, y: &[i64], ctx: &Ctx| forward(x, ctx)?.cross_entropy(y, None, 0.0);
    train_loop_loss(params, hooks, labels, input, &ce, cfg, progress)
}

/// A batch loss for [`train_loop_loss`]: `(inputs, class labels, ctx) -> scalar`.
pub type BatchLoss<'a> = dyn Fn(&Tensor, &[i64], &Ctx) -> peft_core::Result<Tensor> + 'a;

/// [`train_loop`] with any loss: `loss(input(batch), labels of the batch, ctx)` (distillation, for one).
///
/// # Errors
/// As [`train_loop`].
#[allow(clippy::too_many_arguments)]
pub fn train_loop_loss(
    params: Vec<Param>,
    hooks: &dyn TrainHooks,
    labels: &[usize],
    input: &dyn Fn(&[usize]) -> Result<Tensor>,
    loss: &BatchLoss<'_>,
    cfg: &RecipeConfig,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<TrainOutcome> {
    cfg.check()?;
    if labels.is_empty() {
        return Err(VisionError::Empty { what: "the training set".into() });
    }
    let batches = epoch_batches(labels.len(), cfg.batch_size, cfg.epochs, cfg.seed);
    let total = batches.len();
    let tcfg = TrainerConfig {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        max_grad_norm: cfg.max_grad_norm,
        warmup_steps: (cfg.warmup_frac * total as f64).round() as usize,
        total_steps: total,
        schedule: ScheduleKind::Cosine,
        grad_accum: 1,
        seed: cfg.seed,
        non_finite: NonFinitePolicy::Skip { max_in_a_row: 20, max_fraction: 0.1 },
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(params, hooks, tcfg)?;
    let mut out = TrainOutcome::default();
    let (mut run_loss, mut run_n, mut samples) = (0.0, 0usize, 0usize);
    let log_every = (total / 50).max(1);
    let t0 = Instant::now();
    for idx in &batches {
        let x = input(idx)?;
        let y: Vec<i64> = idx.iter().map(|&i| labels[i] as i64).collect();
        let r = trainer.step(|ctx| Ok(Loss::Single(loss(&x, &y, ctx)?)))?;
        if r.skipped {
            out.skipped_steps += 1;
        } else {
            run_loss += r.loss;
            run_n += 1;
        }
        samples += idx.len();
        let step = trainer.steps_done();
        if (step % log_every == 0 || step == total) && run_n > 0 {
            out.losses.push((step, run_loss / run_n as f64));
            (run_loss, run_n) = (0.0, 0);
        }
        progress(step, total, r.loss);
    }
    out.steps = trainer.steps_done();
    out.optimizer_state_bytes = trainer.optimizer().state_bytes() as u64;
    out.train_seconds = t0.elapsed().as_secs_f64();
    out.samples_per_sec = samples as f64 / out.train_seconds.max(1e-9);
    Ok(out)
}

/// Fine-tunes the trainable parameters of `model` (its active adapter and head) on `train`.
///
/// # Errors
/// As [`train_loop`].
pub fn finetune(
    model: &PeftModel<Dinov2Classifier>,
    train: &PixelSet,
    cfg: &RecipeConfig,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<TrainOutcome> {
    train_loop(
        model.trainable_params(),
        model,
        train.labels(),
        &|idx| train.batch(idx),
        &|x, ctx| model.forward(x, ctx),
        cfg,
        progress,
    )
}

/// Predicted classes of `model` on `set` (evaluation mode, no graph, batches of `batch_size`).
///
/// # Errors
/// Model errors; `batch_size = 0`.
pub fn predict(
    model: &dyn Fn(&Tensor) -> peft_core::Result<Tensor>,
    n: usize,
    input: &dyn Fn(&[usize]) -> Result<Tensor>,
    batch_size: usize,
) -> Result<Vec<usize>> {
    if batch_size == 0 {
        return Err(VisionError::config("predict", "batch_size", "must be at least 1"));
    }
    let idx: Vec<usize> = (0..n).collect();
    let mut out = Vec::with_capacity(n);
    for chunk in idx.chunks(batch_size) {
        let x = input(chunk)?;
        let logits = no_grad(|| model(&x))?;
        out.extend(argmax_rows(
            &logits
                .data()
                .to_owned()
                .into_dimensionality()
                .map_err(|e| VisionError::mismatch("predict", format!("logits: {e}")))?,
        ));
    }
    Ok(out)
}

/// Row-wise argmax (first maximum on ties).
pub fn argmax_rows(x: &Array2<f32>) -> Vec<usize> {
    x.rows()
        .into_iter()
        .map(|r| r.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0)
        .collect()
}

/// Top-1 accuracy of `pred` against `gold` (0 for empty inputs).
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

/// Top-1 accuracy of a classifier on a pixel set.
///
/// # Errors
/// As [`predict`].
pub fn evaluate(model: &Dinov2Classifier, set: &PixelSet, batch_size: usize) -> Result<f64> {
    let ctx = Ctx::eval();
    let pred = predict(&|x| model.forward(x, &ctx), set.len(), &|idx| set.batch(idx), batch_size)?;
    Ok(accuracy(&pred, set.labels()))
}

/// A linear probe: a fresh `classifier` head (weight ~ N(0, 0.02), bias 0: transformers' init for DINOv2's head)
/// trained on cached features with the recipe.
pub struct LinearProbe {
    /// The trained head.
    pub head: Linear,
    /// What training measured.
    pub outcome: TrainOutcome,
}

impl LinearProbe {
    /// Trains a head on `train`.
    ///
    /// # Errors
    /// As [`train_loop`]; `num_classes = 0`.
    pub fn fit(
        train: &FeatureSet,
        num_classes: usize,
        cfg: &RecipeConfig,
        progress: &mut dyn FnMut(usize, usize, f64),
    ) -> Result<Self> {
        if num_classes == 0 {
            return Err(VisionError::config("LinearProbe", "num_classes", "must be at least 1"));
        }
        let head = Linear::load("classifier", train.dim(), num_classes, true, &RandomInit::new(cfg.seed, 0.02))?;
        for p in named_params(&head) {
            p.set_trainable(true);
        }
        let feats = &train.features;
        let input = |idx: &[usize]| -> Result<Tensor> {
            let sel = feats.select(ndarray::Axis(0), idx);
            Ok(Tensor::new(sel.into_dyn()))
        };
        let outcome = train_loop(
            named_params(&head),
            &NoHooks,
            &train.labels,
            &input,
            &|x, ctx| head.forward(x, ctx),
            cfg,
            progress,
        )?;
        Ok(LinearProbe { head, outcome })
    }

    /// Trainable parameters of the head.
    pub fn num_params(&self) -> usize {
        named_params(&self.head).iter().map(|p| p.numel()).sum()
    }

    /// Logits `[N, classes]` for features.
    ///
    /// # Errors
    /// Shape errors.
    pub fn logits(&self, x: &Array2<f32>) -> Result<Array2<f32>> {
        let t = no_grad(|| self.head.forward(&Tensor::new(x.clone().into_dyn()), &Ctx::eval()))?;
        let s = t.shape().to_vec();
        ArrayD::from_shape_vec(IxDyn(&s), t.to_vec())
            .and_then(|a| a.into_dimensionality())
            .map_err(|e| VisionError::mismatch("LinearProbe::logits", e.to_string()))
    }

    /// Top-1 accuracy on a feature set.
    ///
    /// # Errors
    /// Shape errors.
    pub fn accuracy(&self, set: &FeatureSet) -> Result<f64> {
        Ok(accuracy(&argmax_rows(&self.logits(&set.features)?), &set.labels))
    }
}

/// Counts the parameters of a module.
pub fn count_params(m: &dyn Module) -> usize {
    named_params(m).iter().map(|p| p.numel()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::io::hf_config::Dinov2Config;
    use peft_models::vit::{Dinov2, HeadInput};

    fn cfg(epochs: usize, lr: f64) -> RecipeConfig {
        RecipeConfig {
            epochs,
            batch_size: 8,
            lr,
            weight_decay: 0.0,
            warmup_frac: 0.1,
            max_grad_norm: Some(1.0),
            seed: 0,
        }
    }

    /// Three Gaussian blobs in 4-d, well separated.
    fn blobs(n: usize, seed: u64) -> FeatureSet {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(seed);
        let f = Array2::from_shape_fn((n, 4), |(i, j)| (if j == i % 3 { 3.0 } else { 0.0 }) + rng.gen_range(-0.5..0.5));
        FeatureSet::new(f, (0..n).map(|i| i % 3).collect()).unwrap()
    }

    #[test]
    fn epoch_batches_cover_every_index_once_per_epoch() {
        let b = epoch_batches(10, 4, 2, 3);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2, 4, 4, 2]);
        for e in 0..2 {
            let mut all: Vec<usize> = b[3 * e..3 * e + 3].concat();
            all.sort_unstable();
            assert_eq!(all, (0..10).collect::<Vec<_>>());
        }
        assert_eq!(b, epoch_batches(10, 4, 2, 3));
        assert_ne!(b, epoch_batches(10, 4, 2, 4));
    }

    #[test]
    fn linear_probe_learns_separable_features_and_loss_falls() {
        let p = LinearProbe::fit(&blobs(60, 0), 3, &cfg(10, 5e-2), &mut |_, _, _| {}).unwrap();
        assert_eq!(p.accuracy(&blobs(30, 1)).unwrap(), 1.0);
        assert_eq!(p.outcome.steps, 80);
        assert!(p.outcome.losses.last().unwrap().1 < 0.5 * p.outcome.losses[0].1, "{:?}", p.outcome.losses);
        assert_eq!(p.num_params(), 4 * 3 + 3);
        assert!(matches!(
            LinearProbe::fit(&blobs(6, 0), 3, &cfg(0, 1e-2), &mut |_, _, _| {}),
            Err(VisionError::Config { field: "epochs", .. })
        ));
    }

    #[test]
    fn finetune_trains_only_the_adapter_and_head_and_evaluate_scores() {
        let dcfg = Dinov2Config {
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 8,
            patch_size: 4,
            use_mask_token: false,
            ..Dinov2Config::default()
        };
        let b = Dinov2::load(&dcfg, &peft_core::nn::RandomInit::new(2, 0.3)).unwrap();
        let m = Dinov2Classifier::new(b, 2, HeadInput::Cls, 0).unwrap();
        let mut vcfg = crate::vpt::VptConfig::shallow(2);
        vcfg.modules_to_save = Some(vec!["classifier".into()]);
        let pm = PeftModel::new(m, vcfg, "default", 0).unwrap();
        // Class 1 images are bright, class 0 dark.
        let ims: Vec<ArrayD<f32>> = (0..16)
            .map(|i| ArrayD::from_elem(IxDyn(&[3, 8, 8]), if i % 2 == 1 { 1.0 } else { -1.0 }) + (i as f32) * 0.01)
            .collect();
        let set = PixelSet::from_arrays(&ims, (0..16).map(|i| i % 2).collect()).unwrap();
        let frozen: Vec<(String, Vec<f32>)> = pm
            .base_params()
            .iter()
            .filter(|p| !p.trainable())
            .map(|p| (p.name().to_string(), p.value().iter().copied().collect()))
            .collect();
        let mut calls = 0;
        let out = finetune(&pm, &set, &cfg(6, 5e-2), &mut |_, _, _| calls += 1).unwrap();
        assert_eq!((out.steps, calls), (12, 12));
        assert!(out.samples_per_sec > 0.0);
        // AdamW: two f32 moments per trainable entry and a step counter per trainable tensor.
        let tp = pm.trainable_params();
        let want: usize = tp.iter().map(|p| 8 + 8 * p.numel()).sum();
        assert_eq!(out.optimizer_state_bytes, want as u64);
        for (name, v) in frozen {
            let p = pm.base_params().iter().find(|p| p.name() == name).unwrap().clone();
            assert_eq!(p.value().iter().copied().collect::<Vec<_>>(), v, "{name} moved");
        }
        assert_eq!(evaluate(&pm, &set, 5).unwrap(), 1.0);
    }

    #[test]
    fn accuracy_and_argmax() {
        assert_eq!(argmax_rows(&ndarray::arr2(&[[0.1, 0.9, 0.9], [2.0, -1.0, 0.0]])), vec![1, 0]);
        assert_eq!(accuracy(&[1, 0, 2], &[1, 1, 2]), 2.0 / 3.0);
        assert_eq!(accuracy(&[], &[]), 0.0);
    }
}
