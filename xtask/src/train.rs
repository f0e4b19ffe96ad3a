//! One fine-tuning run: tokenize, length-bucketed batches, the core trainer (`peft_core::train`: AdamW with linear
//! warmup/decay, gradient clipping, the method's hooks, a non-finite guard), evaluation on the whole dev set, and
//! the measurements the report needs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::adapter::PeftModel;
use peft_core::nn::{Ctx, TokenMask};
use peft_core::train::{calibration_ctx, Loss, NonFinitePolicy, ScheduleKind, TrainError, Trainer, TrainerConfig};
use peft_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

use crate::glue::data::{Example, Label};
use crate::glue::metrics;
use crate::glue::tasks::{Metric, Task};
use crate::model::{SeqClassifier, TokBatch};

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids incl. `[CLS]`/`[SEP]`.
    pub ids: Vec<usize>,
    /// Segment ids.
    pub types: Vec<usize>,
}

/// Loads `tokenizer.json` with the file's fixed padding removed and truncation to `max_len` (longest-first on
/// pairs, as transformers' `truncation=True`).
///
/// # Errors
/// Unreadable file or bad settings.
pub fn load_tokenizer(path: &Path, max_len: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        strategy: TruncationStrategy::LongestFirst,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("truncation: {e}"))?;
    Ok(tok)
}

/// Tokenizes examples (pairs as `[CLS] a [SEP] b [SEP]`).
///
/// # Errors
/// Tokenizer failures.
pub fn encode_all(tok: &Tokenizer, examples: &[Example]) -> Result<Vec<Encoded>> {
    let out = if examples.iter().any(|e| e.b.is_some()) {
        let inputs: Vec<tokenizers::EncodeInput> =
            examples.iter().map(|e| (e.a.as_str(), e.b.as_deref().unwrap_or("")).into()).collect::<Vec<_>>();
        tok.encode_batch(inputs, true)
    } else {
        tok.encode_batch(examples.iter().map(|e| e.a.as_str()).collect::<Vec<_>>(), true)
    }
    .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    Ok(out
        .iter()
        .map(|e| Encoded {
            ids: e.get_ids().iter().map(|&x| x as usize).collect(),
            types: e.get_type_ids().iter().map(|&x| x as usize).collect(),
        })
        .collect())
}

/// Right-pads the examples `idx` of `enc` into one batch (pad id 0, as BERT's `[PAD]`).
pub fn collate(enc: &[Encoded], idx: &[usize]) -> TokBatch {
    collate_refs(&idx.iter().map(|&i| &enc[i]).collect::<Vec<_>>())
}

/// Right-pads `rows` into one batch (pad id 0), in order; for batches drawn from several splits.
pub fn collate_refs(rows: &[&Encoded]) -> TokBatch {
    let l = rows.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut b = TokBatch { shape: [rows.len(), l], ..Default::default() };
    for e in rows {
        let pad = l - e.ids.len();
        b.input_ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
        b.token_type_ids.extend(e.types.iter().copied().chain(std::iter::repeat_n(0, pad)));
        b.attention_mask.extend(std::iter::repeat_n(1u8, e.ids.len()).chain(std::iter::repeat_n(0, pad)));
    }
    b
}

/// Batches of example indices with little padding.
///
/// Training (`rng` given): shuffle, cut into pools of 50 batches, sort each pool by length, cut into batches and
/// shuffle the batch order, so batches are length-homogeneous but their order stays random. Evaluation: sort
/// everything by length.
pub fn length_batches(lens: &[usize], batch_size: usize, rng: Option<&mut StdRng>) -> Vec<Vec<usize>> {
    let bs = batch_size.max(1);
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    match rng {
        Some(rng) => {
            idx.shuffle(rng);
            let mut out = Vec::new();
            for pool in idx.chunks_mut(bs * 50) {
                pool.sort_by_key(|&i| lens[i]);
                out.extend(pool.chunks(bs).map(<[usize]>::to_vec));
            }
            out.shuffle(rng);
            out
        }
        None => {
            idx.sort_by_key(|&i| lens[i]);
            idx.chunks(bs).map(<[usize]>::to_vec).collect()
        }
    }
}

/// The number of optimizer steps [`run`] takes on `examples` training examples: [`length_batches`] cuts every
/// epoch into `⌈examples / batch_size⌉` batches.
pub fn training_steps(examples: usize, cfg: &TrainConfig) -> usize {
    examples.div_ceil(cfg.batch_size.max(1)) * cfg.epochs
}

/// Hyper-parameters of one run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Epochs over the (possibly subsampled) training set.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of the steps spent in linear warmup.
    pub warmup_frac: f64,
    /// Decoupled weight decay (not applied to biases and norms).
    pub weight_decay: f64,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
    /// Training examples used (`None`: all).
    pub train_examples: Option<usize>,
    /// Token limit per example.
    pub max_len: usize,
}

/// The trainer settings every bench run shares: linear warm-up over `warmup_frac` of `total` steps then linear
/// decay, AdamW with `weight_decay`, gradient clipping at `max_grad_norm`, non-finite steps skipped (at most 20 in a
/// row and 10% overall).
pub fn linear_schedule(
    lr: f64,
    weight_decay: f64,
    max_grad_norm: f64,
    warmup_frac: f64,
    total: usize,
    seed: u64,
) -> TrainerConfig {
    TrainerConfig {
        lr,
        weight_decay,
        max_grad_norm: Some(max_grad_norm),
        warmup_steps: (warmup_frac * total as f64).round() as usize,
        total_steps: total,
        schedule: ScheduleKind::Linear,
        grad_accum: 1,
        seed,
        non_finite: NonFinitePolicy::Skip { max_in_a_row: 20, max_fraction: 0.1 },
        ..TrainerConfig::default()
    }
}

impl TrainConfig {
    /// [`linear_schedule`] with this recipe's decay, clip and warm-up, at `lr`.
    pub fn trainer(&self, lr: f64, total: usize, seed: u64) -> TrainerConfig {
        linear_schedule(lr, self.weight_decay, self.max_grad_norm, self.warmup_frac, total, seed)
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct RunOutcome {
    /// Metric name -> dev value.
    pub metrics: BTreeMap<String, f64>,
    /// (step, mean training loss since the previous point).
    pub losses: Vec<(usize, f64)>,
    /// Seconds in the training loop (excluding evaluation).
    pub train_seconds: f64,
    /// Training examples per second.
    pub samples_per_sec: f64,
    /// Seconds evaluating the dev set.
    pub eval_seconds: f64,
    /// Steps skipped by the non-finite guard.
    pub skipped_steps: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Bytes of the trainer's AdamW state after training (two f32 moments per trainable entry it saw, plus a
    /// step counter per parameter).
    pub optimizer_state_bytes: u64,
}

/// Targets of a batch: class indices or scores.
fn targets(labels: &[Label], idx: &[usize]) -> (Vec<i64>, Vec<f32>) {
    let cls = idx.iter().map(|&i| labels[i].class() as i64).collect();
    let val = idx.iter().map(|&i| labels[i].value() as f32).collect();
    (cls, val)
}

fn loss_of(task: Task, logits: &Tensor, labels: &[Label], idx: &[usize]) -> peft_core::Result<Tensor> {
    let (cls, val) = targets(labels, idx);
    if task.num_outputs() == 1 {
        let t = Tensor::from_vec(val, &[idx.len(), 1])?;
        logits.mse_loss(&t)
    } else {
        logits.cross_entropy(&cls, None, 0.0)
    }
}

/// Scores dev predictions with the task's metrics.
pub fn score(task: Task, outputs: &[Vec<f32>], gold: &[Label]) -> BTreeMap<String, f64> {
    let argmax = |v: &Vec<f32>| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    let pred: Vec<usize> = outputs.iter().map(argmax).collect();
    let gold_c: Vec<usize> = gold.iter().map(|l| l.class()).collect();
    let pv: Vec<f64> = outputs.iter().map(|v| f64::from(v.first().copied().unwrap_or(0.0))).collect();
    let gv: Vec<f64> = gold.iter().map(|l| l.value()).collect();
    task.metrics()
        .iter()
        .map(|&m| {
            let v = match m {
                Metric::Accuracy => metrics::accuracy(&pred, &gold_c),
                Metric::F1 => metrics::f1(&pred, &gold_c),
                Metric::Matthews => metrics::matthews(&pred, &gold_c),
                Metric::Pearson => metrics::pearson(&pv, &gv),
                Metric::Spearman => metrics::spearman(&pv, &gv),
            };
            (m.short().to_string(), v)
        })
        .collect()
}

/// Runs the model over `enc` in length-sorted batches without recording a graph; outputs in input order.
///
/// # Errors
/// Model errors.
pub fn predict(model: &dyn SeqClassifier, enc: &[Encoded], batch_size: usize) -> Result<Vec<Vec<f32>>> {
    predict_with(enc, batch_size, |b, ctx| model.logits(b, ctx))
}

/// [`predict`] with any logits function (a multi-head model's head for one task).
///
/// # Errors
/// Errors of `logits`.
pub fn predict_with(
    enc: &[Encoded],
    batch_size: usize,
    logits: impl Fn(&TokBatch, &Ctx) -> peft_core::Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let lens: Vec<usize> = enc.iter().map(|e| e.ids.len()).collect();
    let mut out = vec![Vec::new(); enc.len()];
    let ctx = Ctx::eval();
    peft_core::no_grad(|| -> Result<()> {
        for idx in length_batches(&lens, batch_size, None) {
            let logits = logits(&collate(enc, &idx), &ctx)?;
            let c = logits.shape().last().copied().unwrap_or(1);
            for (row, &i) in logits.as_slice().chunks(c.max(1)).zip(&idx) {
                out[i] = row.to_vec();
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Data of one task split, tokenized.
pub struct Split {
    /// Tokenized examples.
    pub enc: Vec<Encoded>,
    /// Gold labels (same order).
    pub labels: Vec<Label>,
}

/// The calibration batches for data-driven inits: up to `n` consecutive batches of `batch_size` training examples
/// in file order (the subset is already a fixed random draw).
pub fn calibration_batches(train: &Split, batch_size: usize, n: usize) -> Vec<Vec<usize>> {
    let idx: Vec<usize> = (0..train.enc.len()).collect();
    idx.chunks(batch_size.max(1)).take(n).map(<[usize]>::to_vec).collect()
}

/// The token mask of a collated batch (padding false).
pub fn token_mask(batch: &TokBatch) -> TokenMask {
    TokenMask { valid: batch.attention_mask.iter().map(|&m| m != 0).collect(), shape: batch.shape }
}

/// Loss of calibration batch `i` (`None` past the last batch), for `PeftModel::add_adapter_calibrated`: in
/// evaluation mode (no dropout) with the batch's padding masked ([`peft_core::train::calibration_ctx`]).
pub fn calibration_loss(
    task: Task,
    model: &dyn SeqClassifier,
    train: &Split,
    batches: &[Vec<usize>],
    i: usize,
) -> peft_core::Result<Option<Tensor>> {
    let Some(idx) = batches.get(i) else { return Ok(None) };
    let batch = collate(&train.enc, idx);
    let ctx = calibration_ctx(Some(token_mask(&batch)));
    let logits = model.logits(&batch, &ctx)?;
    loss_of(task, &logits, &train.labels, idx).map(Some)
}

/// Layer-wise distillation from a frozen dense teacher (SquareHead): the student's loss becomes
/// `h_ce·task loss + h_kl·KL(student ‖ teacher logits) + h_sq·Σ_l normalised MSE(student h_l, teacher h_l)` over
/// the batch's real tokens, the teacher run without dropout and without a graph.
pub struct Distill<'a> {
    /// The teacher (its parameters are not in the optimizer).
    pub teacher: &'a dyn SeqClassifier,
    /// The loss weights.
    pub loss: peft_sparse::squarehead::SquareheadLoss,
}

impl Distill<'_> {
    /// The distillation loss of the student on `batch`, whose task loss is `task_loss(student logits)`.
    fn total(
        &self,
        student: &dyn SeqClassifier,
        batch: &TokBatch,
        ctx: &Ctx,
        task_loss: impl FnOnce(&Tensor) -> peft_core::Result<Tensor>,
    ) -> peft_core::Result<Tensor> {
        let (tl, th) = peft_core::no_grad(|| self.teacher.logits_and_hidden(batch, &Ctx::eval()))?;
        let (sl, sh) = student.logits_and_hidden(batch, ctx)?;
        let ce = task_loss(&sl)?;
        let tm = token_mask(batch);
        let l = tm.shape[1];
        let mask = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&tm.shape), |ix| tm.valid[ix[0] * l + ix[1]]);
        Ok(self.loss.total(&ce, &sl, &tl, &sh, &th, Some(&mask))?)
    }
}

/// Trains the trainable parameters of `model` (its active adapter, head included) on `train` with the core
/// trainer ([`Trainer`]: AdamW with decoupled weight decay off biases and norms, linear warmup and decay, gradient
/// clipping, the method's hooks, non-finite steps skipped), then scores `dev`.
///
/// # Errors
/// Model errors, and divergence: more than 10% of the steps (or 20 in a row) with a non-finite loss or gradient.
#[allow(clippy::too_many_arguments)]
pub fn run(
    task: Task,
    model: &PeftModel<Box<dyn SeqClassifier>>,
    cfg: &TrainConfig,
    lr: f64,
    seed: u64,
    train: &Split,
    dev: &Split,
    distill: Option<&Distill<'_>>,
    bar: &ProgressBar,
) -> Result<RunOutcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let lens: Vec<usize> = train.enc.iter().map(|e| e.ids.len()).collect();
    let epochs: Vec<Vec<Vec<usize>>> =
        (0..cfg.epochs).map(|_| length_batches(&lens, cfg.batch_size, Some(&mut rng))).collect();
    let total: usize = epochs.iter().map(Vec::len).sum();
    debug_assert_eq!(total, training_steps(lens.len(), cfg), "training_steps disagrees with length_batches");
    let tcfg = cfg.trainer(lr, total, seed);
    let mut trainer = Trainer::new(model.trainable_params(), model, tcfg)?;
    bar.set_length(total as u64);
    bar.set_position(0);
    let mut out = RunOutcome::default();
    let (mut run_loss, mut run_n, mut samples) = (0.0, 0usize, 0usize);
    let log_every = (total / 50).max(1);
    let t0 = Instant::now();
    for idx in epochs.iter().flatten() {
        let batch = collate(&train.enc, idx);
        let report = trainer.step(|ctx| {
            ctx.insert(token_mask(&batch));
            let task_loss = |logits: &Tensor| loss_of(task, logits, &train.labels, idx);
            match distill {
                Some(d) => Ok(Loss::Single(d.total(model.model().as_ref(), &batch, ctx, task_loss)?)),
                None => Ok(Loss::Single(task_loss(&model.logits(&batch, ctx)?)?)),
            }
        });
        let report = match report {
            Ok(r) => r,
            Err(e @ TrainError::Diverged { .. }) => bail!("{e}"),
            Err(e) => return Err(e).context("training step"),
        };
        if report.skipped {
            out.skipped_steps += 1;
            bar.println(format!("  step {}: non-finite loss or gradient, batch skipped", report.step));
        } else {
            run_loss += report.loss;
            run_n += 1;
        }
        samples += idx.len();
        let step = trainer.steps_done();
        if step % log_every == 0 || step == total {
            if run_n > 0 {
                out.losses.push((step, run_loss / run_n as f64));
            }
            let sps = samples as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            let shown = if run_n > 0 { run_loss / run_n as f64 } else { f64::NAN };
            bar.set_message(format!("loss {shown:.4}  {sps:.1} samples/s"));
            (run_loss, run_n) = (0.0, 0);
        }
        bar.set_position(step as u64);
    }
    out.steps = trainer.steps_done();
    out.optimizer_state_bytes = peft_sparse::memory::optimizer_state_bytes(trainer.optimizer()) as u64;
    out.train_seconds = t0.elapsed().as_secs_f64();
    out.samples_per_sec = samples as f64 / out.train_seconds.max(1e-9);
    bar.set_message("evaluating dev");
    let t1 = Instant::now();
    let outputs = predict(model.model().as_ref(), &dev.enc, cfg.batch_size.max(32))?;
    out.eval_seconds = t1.elapsed().as_secs_f64();
    out.metrics = score(task, &outputs, &dev.labels);
    Ok(out)
}

/// A progress bar for one run (hidden when stderr is not a terminal, so logs stay clean).
pub fn progress_bar(prefix: String) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:<28} {bar:24} {pos:>5}/{len:<5} {msg} [{elapsed_precise} ETA {eta}]")
            .expect("xtask bug: progress template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// Peak resident set size of this process in bytes (`VmHWM`), if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak-RSS counter (Linux `clear_refs` 5) so each run reports its own peak; false when unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::adapter::BaseTuneConfig;
    use peft_core::nn::{named_params, Linear, Module, RandomInit, Visitor};
    use peft_core::Param;

    /// Mean of a fixed random token embedding table, then a trainable linear head.
    struct Toy {
        emb: ndarray::Array2<f32>,
        head: Linear,
    }
    impl Module for Toy {
        fn visit(&self, v: &mut dyn Visitor) {
            self.head.visit(v);
        }
    }
    impl SeqClassifier for Toy {
        fn logits(&self, b: &TokBatch, ctx: &Ctx) -> peft_core::Result<Tensor> {
            let [n, l] = b.shape;
            let d = self.emb.ncols();
            let mut x = ndarray::Array2::<f32>::zeros((n, d));
            for r in 0..n {
                let k = b.attention_mask[r * l..(r + 1) * l].iter().filter(|&&m| m == 1).count().max(1);
                for t in 0..l {
                    if b.attention_mask[r * l + t] == 1 {
                        let row = self.emb.row(b.input_ids[r * l + t]).to_owned();
                        x.row_mut(r).scaled_add(1.0 / k as f32, &row);
                    }
                }
            }
            self.head.forward(&Tensor::new(x.into_dyn()), ctx)
        }
        fn head(&self) -> Vec<Param> {
            self.head.base().params()
        }
    }

    fn toy(outputs: usize) -> Toy {
        let mut emb = ndarray::Array2::<f32>::zeros((8, 4));
        for i in 0..8 {
            emb[[i, i % 4]] = 1.0;
        }
        Toy { emb, head: Linear::load("classifier", 4, outputs, true, &RandomInit::new(1, 0.02)).unwrap() }
    }

    /// The toy as the bench prepares it: head-only, the head in modules_to_save.
    fn prepared(t: Toy) -> PeftModel<Box<dyn SeqClassifier>> {
        let mut cfg = BaseTuneConfig::head_only();
        cfg.modules_to_save = Some(vec!["classifier".into()]);
        PeftModel::new(Box::new(t) as Box<dyn SeqClassifier>, cfg, "default", 0).unwrap()
    }

    /// Class 1 examples contain token 2, class 0 ones token 3.
    fn split(n: usize) -> Split {
        let enc = (0..n)
            .map(|i| {
                let t = if i % 2 == 0 { 2 } else { 3 };
                let len = 2 + i % 5;
                Encoded {
                    ids: std::iter::once(0).chain(std::iter::repeat_n(t, len)).collect(),
                    types: vec![0; len + 1],
                }
            })
            .collect();
        let labels = (0..n).map(|i| Label::Class(usize::from(i % 2 == 0))).collect();
        Split { enc, labels }
    }

    fn cfg() -> TrainConfig {
        TrainConfig {
            epochs: 3,
            batch_size: 8,
            lr: 0.1,
            warmup_frac: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            train_examples: None,
            max_len: 128,
        }
    }

    #[test]
    fn collate_pads_right_with_mask_and_types() {
        let enc = vec![
            Encoded { ids: vec![101, 7, 102], types: vec![0, 0, 0] },
            Encoded { ids: vec![101, 102], types: vec![0, 1] },
        ];
        let b = collate(&enc, &[1, 0]);
        assert_eq!(b.shape, [2, 3]);
        assert_eq!(b.input_ids, vec![101, 102, 0, 101, 7, 102]);
        assert_eq!(b.token_type_ids, vec![0, 1, 0, 0, 0, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 0, 1, 1, 1]);
    }

    #[test]
    fn training_steps_counts_the_batches_run_takes() {
        for (n, bs, epochs) in [(1000, 16, 1), (1000, 32, 3), (801, 32, 2), (5, 8, 4), (50 * 16 + 1, 16, 1)] {
            let cfg = TrainConfig { batch_size: bs, epochs, ..cfg() };
            let lens: Vec<usize> = (0..n).map(|i| 3 + i % 17).collect();
            let mut rng = StdRng::seed_from_u64(1);
            let got: usize = (0..epochs).map(|_| length_batches(&lens, bs, Some(&mut rng)).len()).sum();
            assert_eq!(training_steps(n, &cfg), got, "n {n} bs {bs} epochs {epochs}");
        }
    }

    #[test]
    fn length_batches_cover_every_index_once_and_are_seeded() {
        let lens: Vec<usize> = (0..103).map(|i| (i * 37) % 50).collect();
        let mut a = StdRng::seed_from_u64(3);
        let b1 = length_batches(&lens, 8, Some(&mut a));
        let mut flat: Vec<usize> = b1.concat();
        flat.sort_unstable();
        assert_eq!(flat, (0..103).collect::<Vec<_>>());
        assert!(b1.iter().all(|b| b.len() <= 8));
        let mut b = StdRng::seed_from_u64(3);
        assert_eq!(b1, length_batches(&lens, 8, Some(&mut b)));
        let eval = length_batches(&lens, 10, None);
        let sorted: Vec<usize> = eval.concat().iter().map(|&i| lens[i]).collect();
        assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn calibration_batches_are_the_first_batches_and_losses_end_with_none() {
        let sp = split(40);
        let b = calibration_batches(&sp, 16, 8);
        assert_eq!(b, vec![(0..16).collect::<Vec<_>>(), (16..32).collect(), (32..40).collect()]);
        assert_eq!(calibration_batches(&sp, 16, 2).len(), 2);
        let m = toy(2);
        for p in m.head() {
            p.set_trainable(true);
        }
        let l0 = calibration_loss(Task::Sst2, &m, &sp, &b, 0).unwrap().expect("batch 0 exists");
        assert!(l0.item().unwrap().is_finite() && l0.tracks(), "calibration loss must be differentiable");
        assert!(calibration_loss(Task::Sst2, &m, &sp, &b, 3).unwrap().is_none());
    }

    #[test]
    fn run_learns_a_separable_toy_task() {
        let m = prepared(toy(2));
        let out = run(Task::Sst2, &m, &cfg(), 0.1, 0, &split(64), &split(20), None, &ProgressBar::hidden()).unwrap();
        assert_eq!(out.metrics["acc"], 1.0);
        assert_eq!(out.steps, 24);
        assert!(out.losses.first().unwrap().1 > out.losses.last().unwrap().1);
        assert!(out.samples_per_sec > 0.0);
    }

    #[test]
    fn non_finite_losses_abort_the_run_with_divergence_error() {
        let t = toy(2);
        t.head.base().params()[0].update(|w| w.fill(f32::NAN));
        let m = prepared(t);
        let e = run(Task::Sst2, &m, &cfg(), 0.1, 0, &split(64), &split(8), None, &ProgressBar::hidden()).unwrap_err();
        assert!(e.to_string().contains("diverged"), "{e}");
    }

    /// A 2-layer BERT classifier with random weights (seeded).
    fn tiny_bert(seed: u64) -> peft_models::bert::BertForSequenceClassification {
        use peft_models::bert::{BertForSequenceClassification, BertModel, Pooling};
        let cfg = crate::model::tiny_bert_config();
        let bert = BertModel::from_source(&cfg, &RandomInit::new(seed, 0.2)).unwrap();
        BertForSequenceClassification::new(bert, 2, Pooling::Mean, seed).unwrap()
    }

    #[test]
    fn distillation_is_zero_against_itself_and_weights_its_terms() {
        use peft_sparse::squarehead::SquareheadLoss;
        let (teacher, student) = (tiny_bert(1), tiny_bert(1));
        let batch = TokBatch {
            input_ids: vec![1, 5, 6, 2, 1, 7, 2, 0],
            token_type_ids: vec![0; 8],
            attention_mask: vec![1, 1, 1, 1, 1, 1, 1, 0],
            shape: [2, 4],
        };
        let ctx = Ctx::eval();
        let ce = |l: &Tensor| l.cross_entropy(&[0, 1], None, 0.0);
        let only_sq = Distill { teacher: &teacher, loss: SquareheadLoss { h_ce: 0.0, ..SquareheadLoss::default() } };
        assert_eq!(only_sq.total(&student, &batch, &ctx, ce).unwrap().item().unwrap(), 0.0);
        let only_ce = Distill { teacher: &teacher, loss: SquareheadLoss { h_sq: 0.0, ..SquareheadLoss::default() } };
        let want = ce(&student.forward(&batch, &ctx).unwrap()).unwrap().item().unwrap();
        assert_eq!(only_ce.total(&student, &batch, &ctx, ce).unwrap().item().unwrap(), want);
        // A student that differs: positive layer term, gradients reach the student and not the teacher.
        let w = named_params(&student).into_iter().find(|p| p.name().ends_with("layer.1.output.dense.weight")).unwrap();
        w.update(|v| v.mapv_inplace(|x| 0.5 * x));
        w.set_trainable(true);
        let tw =
            named_params(&teacher).into_iter().find(|p| p.name().ends_with("layer.1.output.dense.weight")).unwrap();
        tw.set_trainable(true);
        let l = only_sq.total(&student, &batch, &ctx, ce).unwrap();
        assert!(l.item().unwrap() > 0.0);
        let g = l.backward().unwrap();
        assert!(g.get_id(w.id()).is_some_and(|g| g.iter().any(|v| *v != 0.0)));
        assert!(g.get_id(tw.id()).is_none(), "the teacher is a constant");
    }

    #[test]
    fn score_uses_task_metrics() {
        let outs = vec![vec![0.1, 0.9], vec![0.8, 0.2], vec![0.3, 0.7]];
        let gold = [Label::Class(1), Label::Class(1), Label::Class(1)];
        let s = score(Task::Mrpc, &outs, &gold);
        assert!((s["acc"] - 2.0 / 3.0).abs() < 1e-12);
        assert!((s["f1"] - 0.8).abs() < 1e-12);
        let s = score(
            Task::Stsb,
            &[vec![1.0], vec![2.0], vec![3.0]],
            &[Label::Score(0.5), Label::Score(1.0), Label::Score(4.0)],
        );
        assert!((s["spearman"] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
        }
    }
}
