//! SquareHead in the VTAB suite, as in the GLUE one (`crate::squarehead`): the dense teacher is full fine-tuning
//! with `full`'s recipe (trained once per task and seed, shared by `squarehead-50/75/90`), the student starts from
//! the teacher's weights, prunes to the method's sparsity by two thirds of the steps (cubic schedule) and is
//! distilled from the teacher: `h_ce·CE + h_kl·KL(logits) + h_sq·Σ_l normalised MSE` over DINOv2's hidden states
//! (the embedding output and each layer's output, every token: images have no padding).

use std::collections::HashMap;

use anyhow::{Context, Result};
use ndarray::ArrayD;
use peft_core::adapter::{MethodSpec, PeftModel};
use peft_core::nn::{named_params, Ctx};
use peft_core::{no_grad, Tensor};
use peft_sparse::squarehead_tuner::SquareheadTuner;
use peft_sparse::SquareheadConfig;
use peft_vision::harness::{epoch_batches, evaluate, finetune, train_loop_loss, RecipeConfig, TrainOutcome};
use peft_vision::pipeline::PixelSet;
use peft_vision::vit::Dinov2Classifier;

/// A trained dense teacher: its parameter values and its test accuracy (scored as rebuilt from the values).
pub struct Teacher {
    values: Vec<(String, ArrayD<f32>)>,
    /// Test accuracy of the teacher.
    pub accuracy: f64,
    /// Seconds it trained.
    pub train_seconds: f64,
}

/// Teachers by task name and seed.
pub type Teachers = HashMap<(String, u64), Teacher>;

/// Writes `values` into the same-named parameters of `model` (every value must find its parameter).
///
/// # Errors
/// A name the model lacks; a shape mismatch.
fn copy_values(model: &Dinov2Classifier, values: &[(String, ArrayD<f32>)]) -> Result<()> {
    let params: HashMap<String, peft_core::Param> =
        named_params(model).into_iter().map(|p| (p.name().to_string(), p)).collect();
    for (name, v) in values {
        let p = params.get(name).with_context(|| format!("teacher parameter `{name}` is not in the student"))?;
        p.set(v.clone()).with_context(|| format!("copying teacher parameter `{name}`"))?;
    }
    Ok(())
}

/// `fresh()` holding the teacher's values, frozen.
///
/// # Errors
/// As `fresh` and [`copy_values`].
pub fn teacher_model(t: &Teacher, fresh: impl FnOnce() -> Result<Dinov2Classifier>) -> Result<Dinov2Classifier> {
    let m = fresh()?;
    copy_values(&m, &t.values)?;
    for p in named_params(&m) {
        p.set_trainable(false);
    }
    Ok(m)
}

/// The teacher of (`task`, `recipe.seed`), trained the first time it is asked for: `full` (its config, `recipe`
/// with `full_lr`) on a fresh classifier from `fresh`.
///
/// # Errors
/// Loading and training errors.
#[allow(clippy::too_many_arguments)]
pub fn teacher<'a>(
    teachers: &'a mut Teachers,
    task: &str,
    full: &MethodSpec,
    full_lr: f64,
    recipe: &RecipeConfig,
    train: &PixelSet,
    test: &PixelSet,
    fresh: &dyn Fn() -> Result<Dinov2Classifier>,
) -> Result<&'a Teacher> {
    use std::collections::hash_map::Entry;
    let slot = match teachers.entry((task.to_string(), recipe.seed)) {
        Entry::Occupied(o) => return Ok(o.into_mut()),
        Entry::Vacant(v) => v,
    };
    let trecipe = RecipeConfig { lr: full_lr, ..recipe.clone() };
    let pm = super::with_adapter(fresh()?, full, train, &trecipe)?;
    let out = finetune(&pm, train, &trecipe, &mut |_, _, _| {}).context("training the SquareHead teacher")?;
    let values = named_params(pm.model()).iter().map(|p| (p.name().to_string(), p.value().to_owned())).collect();
    let mut t = Teacher { values, accuracy: 0.0, train_seconds: out.train_seconds };
    t.accuracy = evaluate(&teacher_model(&t, fresh)?, test, 64)?;
    eprintln!("{task} / squarehead teacher (full fine-tuning) / seed {}: acc {:.1}", recipe.seed, 100.0 * t.accuracy);
    Ok(slot.insert(t))
}

/// The student of `sq`: `fresh()` with the teacher's weights, SquareHead injected (the head in `modules_to_save`,
/// pruning finished at two thirds of the run's steps), trained with the distillation loss against `teacher`.
/// Returns the trained model, the training outcome and the sparsity reached over the pruned matrices.
///
/// # Errors
/// Configuration, loading and training errors.
#[allow(clippy::too_many_arguments)]
pub fn student(
    spec: &MethodSpec,
    sq: &SquareheadConfig,
    t: &Teacher,
    teacher: &Dinov2Classifier,
    fresh: &dyn Fn() -> Result<Dinov2Classifier>,
    train: &PixelSet,
    recipe: &RecipeConfig,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<(PeftModel<Dinov2Classifier>, TrainOutcome, f64)> {
    let model = fresh()?;
    copy_values(&model, &t.values)?;
    let steps = epoch_batches(train.len(), recipe.batch_size, recipe.epochs, recipe.seed).len();
    let cfg = SquareheadConfig { prune_end_step: Some(2 * steps / 3), ..sq.clone() };
    let spec = MethodSpec::new(spec.name, cfg, recipe.lr);
    let pm = super::with_adapter(model, &spec, train, recipe)?;
    let loss_w = sq.loss();
    let loss = |x: &Tensor, y: &[i64], ctx: &Ctx| -> peft_core::Result<Tensor> {
        let (tl, th) = no_grad(|| teacher.forward_with_hidden_states(x, &Ctx::eval()))?;
        let (sl, sh) = pm.model().forward_with_hidden_states(x, ctx)?;
        let ce = sl.cross_entropy(y, None, 0.0)?;
        Ok(loss_w.total(&ce, &sl, &tl, &sh, &th, None)?)
    };
    let out =
        train_loop_loss(pm.trainable_params(), &pm, train.labels(), &|idx| train.batch(idx), &loss, recipe, progress)?;
    let tuner = pm.tuner("default")?.as_any().downcast_ref::<SquareheadTuner>().context("not a SquareHead tuner")?;
    let (zeros, total) = tuner
        .targets()
        .iter()
        .map(|p| (p.value().iter().filter(|&&v| v == 0.0).count(), p.numel()))
        .fold((0usize, 0usize), |a, b| (a.0 + b.0, a.1 + b.1));
    Ok((pm, out, zeros as f64 / total.max(1) as f64))
}
