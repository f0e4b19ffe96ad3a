//! `cargo xtask bench --multitask`: MFTCoder-style multi-task fine-tuning on GLUE. One shared adapter (the
//! `--methods` entries, LoRA by default) over MiniLM with one classification head per task (`classifier_<task>`,
//! in `modules_to_save`), trained on batches that mix the tasks, with the loss balanced by peft-core's
//! [`mft_loss`]:
//!
//! - `case1`: every sample alike (MFTCoder's plain token mean; a classification sample is one token);
//! - `case3`: every task alike (the mean over the tasks in the batch of each task's mean; MFTCoder's default);
//! - `coba`: `case3` with CoBa's convergence-balanced task weights ([`Coba`]), from the per-task losses
//!   ([`task_token_means`]) of one held-out validation batch after every step: 64 training-file examples per task
//!   outside the training subset, 8 per task per batch, cycled. CoBa's warmup is a tenth of the steps and its
//!   history a quarter (the reference's 100 / 200 are for runs of thousands of steps).
//!
//! Data: the first task takes `--train-examples` (default 1,000) examples, each next one half the previous
//! (1,000 / 500 / 250 on SST-2 / CoLA / MRPC), so the modes differ: `case1` sees SST-2 four times as often as
//! MRPC, `case3` weights them alike. Scores are each task's dev metrics from its own head. Results are written in
//! the GLUE results format (method `<adapter>+<mode>`, one record per task, the run's cost repeated on each), so
//! the report has one row per mode.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::{MethodSpec, PeftModel};
use peft_core::nn::{named_params, Ctx, Linear, Module, Visitor, WeightSource};
use peft_core::train::mft::{mft_loss, task_token_means, Coba, MftBalance};
use peft_core::train::{Loss, TrainError, Trainer};
use peft_core::{Param, Tensor};
use peft_models::bert::{mean_pool, BertForSequenceClassification, BertModel, Pooling};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::bench::{glue_record, RunCost};
use crate::glue::data::{self, Example};
use crate::glue::tasks::Task;
use crate::model::TokBatch;
use crate::report::{Record, Results};
use crate::train::{self, collate_refs, length_batches, token_mask, Encoded, Split, TrainConfig};

/// Tasks when `--tasks` is not given.
pub const DEFAULT_TASKS: [Task; 3] = [Task::Sst2, Task::Cola, Task::Mrpc];

/// Held-out validation examples per task (CoBa's validation batches).
const VAL_PER_TASK: usize = 64;
/// Validation examples per task in one CoBa batch.
const VAL_BATCH_PER_TASK: usize = 8;
/// Seed of the validation draw (the training subset uses the bench's own).
const VAL_SEED: u64 = 4321;

/// A loss-balancing mode of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// MFTCoder `case1`.
    Case1,
    /// MFTCoder `case3`.
    Case3,
    /// `case3` with CoBa weights.
    Coba,
}

impl Mode {
    /// Every mode, in table order.
    pub const ALL: [Mode; 3] = [Mode::Case1, Mode::Case3, Mode::Coba];

    /// The name in method names and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Case1 => "case1",
            Mode::Case3 => "case3",
            Mode::Coba => "coba",
        }
    }

    fn balance(self) -> MftBalance {
        match self {
            Mode::Case1 => MftBalance::Plain,
            Mode::Case3 | Mode::Coba => MftBalance::TaskBalanced,
        }
    }
}

/// MiniLM with one head per task (mean pooling, dropout, `classifier_<task>`).
pub struct MultiHead {
    bert: BertModel,
    heads: Vec<Linear>,
    dropout: f64,
}

impl Module for MultiHead {
    fn visit(&self, v: &mut dyn Visitor) {
        self.bert.visit(v);
        for h in &self.heads {
            h.visit(v);
        }
    }
}

impl MultiHead {
    /// The backbone with a fresh head of `outputs[i]` classes for task `i`, drawn N(0, 0.02) from `seed + i`.
    ///
    /// # Errors
    /// Model errors.
    pub fn new(bert: BertModel, dropout: f64, outputs: &[(String, usize)], seed: u64) -> Result<Self> {
        let h = bert.hidden_size();
        let std = bert.cfg.initializer_range as f32;
        let mut heads = Vec::new();
        for (i, (name, n)) in outputs.iter().enumerate() {
            let path = format!("classifier_{name}");
            let w = peft_core::nn::RandomInit::new(seed.wrapping_add(i as u64), std)
                .get(&format!("{path}.weight"), &[*n, h])?;
            let lin = Linear::new(
                &path,
                Param::new(format!("{path}.weight"), w, true),
                Some(Param::new(format!("{path}.bias"), ArrayD::zeros(IxDyn(&[*n])), true)),
            )
            .as_output();
            heads.push(lin);
        }
        Ok(MultiHead { bert, heads, dropout })
    }

    /// The head module paths (for `modules_to_save`).
    pub fn head_modules(&self) -> Vec<String> {
        self.heads.iter().map(|h| h.path().to_string()).collect()
    }

    /// Pooled features `[B, H]` (dropout in training).
    ///
    /// # Errors
    /// Model errors.
    pub fn pooled(&self, batch: &TokBatch, ctx: &Ctx) -> peft_core::Result<Tensor> {
        let h = self.bert.forward(batch, ctx)?;
        let p = mean_pool(&h, &batch.attention_mask)?;
        if ctx.train && self.dropout > 0.0 {
            ctx.with_rng(|rng| p.dropout(self.dropout, true, rng))
        } else {
            Ok(p)
        }
    }

    /// Logits of head `task` on pooled features.
    ///
    /// # Errors
    /// Shape errors; an unknown head.
    pub fn head_logits(&self, task: usize, pooled: &Tensor, ctx: &Ctx) -> peft_core::Result<Tensor> {
        let head =
            self.heads.get(task).ok_or_else(|| peft_core::Error::UnknownName { name: format!("head {task}") })?;
        head.forward(pooled, ctx)
    }
}

/// Per-sample cross-entropy `[n, 1]` of `logits [n, C]` against classes `y`.
///
/// # Errors
/// Shape or index errors.
pub fn per_sample_ce(logits: &Tensor, y: &[usize]) -> peft_core::Result<Tensor> {
    let idx = ArrayD::from_shape_vec(IxDyn(&[y.len(), 1]), y.to_vec()).map_err(|_| peft_core::Error::Shape {
        op: "per_sample_ce",
        lhs: logits.shape().to_vec(),
        rhs: vec![y.len()],
    })?;
    Ok(logits.log_softmax(1)?.gather(1, &idx)?.neg())
}

/// One mixed batch: rows `(task, example)`.
type Rows = Vec<(usize, usize)>;

/// Per-sample losses `[B, 1]` of a mixed batch and the task id of each loss row.
fn batch_losses(
    model: &MultiHead,
    splits: &[&Split],
    rows: &[(usize, usize)],
    ctx: &mut Ctx,
) -> peft_core::Result<(Tensor, Vec<usize>)> {
    // Collate in row order, then gather each task's rows for its head.
    let enc: Vec<&Encoded> = rows.iter().map(|&(t, i)| &splits[t].enc[i]).collect();
    let batch = collate_refs(&enc);
    ctx.insert(token_mask(&batch));
    let pooled = model.pooled(&batch, ctx)?;
    let mut parts = Vec::new();
    let mut ids = Vec::new();
    for (t, split) in splits.iter().enumerate() {
        let sel: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].0 == t).collect();
        if sel.is_empty() {
            continue;
        }
        let y: Vec<usize> = sel.iter().map(|&r| split.labels[rows[r].1].class()).collect();
        let logits = model.head_logits(t, &pooled.index_select(0, &sel)?, ctx)?;
        parts.push(per_sample_ce(&logits, &y)?);
        ids.extend(std::iter::repeat_n(t, sel.len()));
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    Ok((Tensor::concat(&refs, 0)?, ids))
}

/// Indices of `n` examples outside `taken`, drawn with `seed` (the CoBa validation set).
fn held_out(len: usize, taken: &[usize], n: usize, seed: u64) -> Vec<usize> {
    let mut free: Vec<usize> = (0..len).filter(|i| taken.binary_search(i).is_err()).collect();
    free.shuffle(&mut StdRng::seed_from_u64(seed));
    free.truncate(n);
    free.sort_unstable();
    free
}

/// The prepared data of one task.
pub struct TaskData {
    /// The task.
    pub task: Task,
    /// Training subset.
    pub train: Split,
    /// CoBa's held-out validation examples.
    pub val: Split,
    /// Dev set.
    pub dev: Split,
}

/// Loads and encodes every task's training subset (`n`, `n/2`, `n/4`, ...), validation draw and dev set.
///
/// # Errors
/// Data errors; a task without classes (regression) or without a training split.
pub fn prepare(glue_dir: &Path, tok: &tokenizers::Tokenizer, tasks: &[Task], n: usize) -> Result<Vec<TaskData>> {
    let mut out = Vec::new();
    for (k, &task) in tasks.iter().enumerate() {
        if !task.has_train() || task.num_outputs() < 2 {
            bail!("--multitask needs classification tasks with a training split; {task} is not one");
        }
        let (train_ex, train_y) = crate::bench::labelled(data::load(glue_dir, task, "train")?, "train")?;
        let (dev_ex, dev_y) = crate::bench::labelled(data::load(glue_dir, task, "dev")?, "dev")?;
        let size = (n >> k).max(16);
        let idx = crate::bench::subsample(train_ex.len(), Some(size));
        let val_idx = held_out(train_ex.len(), &idx, VAL_PER_TASK, VAL_SEED + k as u64);
        let pick = |ix: &[usize]| -> Result<Split> {
            let ex: Vec<Example> = ix.iter().map(|&i| train_ex[i].clone()).collect();
            Ok(Split { enc: train::encode_all(tok, &ex)?, labels: ix.iter().map(|&i| train_y[i]).collect() })
        };
        out.push(TaskData {
            task,
            train: pick(&idx)?,
            val: pick(&val_idx)?,
            dev: Split { enc: train::encode_all(tok, &dev_ex)?, labels: dev_y },
        });
    }
    Ok(out)
}

/// What one multi-task run measured.
pub struct MultiOutcome {
    /// Per task: dev metrics.
    pub metrics: Vec<BTreeMap<String, f64>>,
    /// The common part of the run's cost, as a record template.
    pub run: train::RunOutcome,
    /// Trainable parameters (shared adapter + every head).
    pub trainable: u64,
    /// Total parameters of the model before the adapter.
    pub total: u64,
    /// CoBa's final task weights (`coba` mode only).
    pub final_weights: Option<Vec<f64>>,
    /// Bytes of the saved adapter folder (the shared adapter and every head).
    pub adapter_bytes: u64,
}

/// Trains the shared adapter of `method` and the heads with mode `mode`, scores every task's dev set and saves the
/// adapter (heads in `modules_to_save`) under `adapters_dir/<method>+<mode>-s<seed>`.
///
/// # Errors
/// Model and training errors; divergence; IO errors.
pub fn run_one(
    model_dir: &Path,
    adapters_dir: &Path,
    data: &[TaskData],
    method: &MethodSpec,
    mode: Mode,
    cfg: &TrainConfig,
) -> Result<MultiOutcome> {
    let seed = method.seed;
    let outputs: Vec<(String, usize)> =
        data.iter().map(|d| (d.task.name().to_string(), d.task.num_outputs())).collect();
    let cls = BertForSequenceClassification::load(model_dir, 2, Pooling::Mean, seed)
        .with_context(|| format!("loading MiniLM from {}", model_dir.display()))?;
    let model = MultiHead::new(cls.bert, cls.dropout, &outputs, seed)?;
    let total: u64 = named_params(&model).iter().map(|p| p.numel() as u64).sum();
    let mut config = method.config();
    config.set_modules_to_save(model.head_modules())?;
    let mut pm = PeftModel::wrap(model, seed);
    pm.add_adapter_boxed("default", config)?;
    pm.set_adapter("default")?;
    let trainable: u64 = pm.trainable_params().iter().map(|p| p.numel() as u64).sum();
    let splits: Vec<&Split> = data.iter().map(|d| &d.train).collect();
    // Mixed batches: every (task, example) pair, shuffled into length-bucketed batches each epoch.
    let all: Rows = splits.iter().enumerate().flat_map(|(t, s)| (0..s.enc.len()).map(move |i| (t, i))).collect();
    let lens: Vec<usize> = all.iter().map(|&(t, i)| splits[t].enc[i].ids.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let batches: Vec<Rows> = (0..cfg.epochs)
        .flat_map(|_| length_batches(&lens, cfg.batch_size, Some(&mut rng)))
        .map(|b| b.into_iter().map(|k| all[k]).collect())
        .collect();
    let total_steps = batches.len();
    let tcfg = cfg.trainer(cfg.lr, total_steps, seed);
    let mut trainer = Trainer::new(pm.trainable_params(), &pm, tcfg)?;
    let n = data.len();
    let mut coba = Coba::with(n, (total_steps / 10).max(2), (total_steps / 4).max(2), 5.0);
    let vals: Vec<&Split> = data.iter().map(|d| &d.val).collect();
    let val_batches: Vec<Rows> = (0..VAL_PER_TASK / VAL_BATCH_PER_TASK)
        .map(|j| {
            (0..n)
                .flat_map(|t| {
                    let len = vals[t].enc.len();
                    (0..VAL_BATCH_PER_TASK).map(move |k| (t, (j * VAL_BATCH_PER_TASK + k) % len.max(1)))
                })
                .filter(|&(t, _)| !vals[t].enc.is_empty())
                .collect()
        })
        .collect();
    let bar = train::progress_bar(format!("multitask {} {} s{seed}", method.name, mode.name()));
    bar.set_length(total_steps as u64);
    let mut out = train::RunOutcome::default();
    let (mut run_loss, mut run_n, mut samples) = (0.0, 0usize, 0usize);
    let log_every = (total_steps / 50).max(1);
    let t0 = Instant::now();
    let model = pm.model();
    for (s, rows) in batches.iter().enumerate() {
        let weights: Option<Vec<f64>> = (mode == Mode::Coba).then(|| coba.weights().to_vec());
        let report = trainer.step(|ctx| {
            let (losses, ids) = batch_losses(model, &splits, rows, ctx)?;
            let mask = vec![1.0f32; ids.len()];
            Ok(Loss::Single(mft_loss(mode.balance(), &losses, &mask, &ids, weights.as_deref())?))
        });
        let report = match report {
            Ok(r) => r,
            Err(e @ TrainError::Diverged { .. }) => bail!("{e}"),
            Err(e) => return Err(e).context("training step"),
        };
        if mode == Mode::Coba && !val_batches.is_empty() {
            let vb = &val_batches[s % val_batches.len()];
            let means = peft_core::no_grad(|| -> peft_core::Result<Vec<Option<f64>>> {
                let (l, ids) = batch_losses(model, &vals, vb, &mut Ctx::eval())?;
                task_token_means(&l, &vec![1.0; ids.len()], &ids, n)
            })?;
            coba.observe(&means)?;
        }
        if report.skipped {
            out.skipped_steps += 1;
        } else {
            run_loss += report.loss;
            run_n += 1;
        }
        samples += rows.len();
        let step = trainer.steps_done();
        if (step % log_every == 0 || step == total_steps) && run_n > 0 {
            out.losses.push((step, run_loss / run_n as f64));
            (run_loss, run_n) = (0.0, 0);
        }
        bar.set_position(step as u64);
    }
    bar.finish_and_clear();
    out.steps = trainer.steps_done();
    out.optimizer_state_bytes = peft_sparse::memory::optimizer_state_bytes(trainer.optimizer()) as u64;
    out.train_seconds = t0.elapsed().as_secs_f64();
    out.samples_per_sec = samples as f64 / out.train_seconds.max(1e-9);
    let t1 = Instant::now();
    let mut metrics = Vec::new();
    for (t, d) in data.iter().enumerate() {
        let outputs = train::predict_with(&d.dev.enc, cfg.batch_size.max(32), |b, ctx| {
            model.head_logits(t, &model.pooled(b, ctx)?, ctx)
        })?;
        metrics.push(train::score(d.task, &outputs, &d.dev.labels));
    }
    out.eval_seconds = t1.elapsed().as_secs_f64();
    let final_weights = (mode == Mode::Coba).then(|| coba.weights().to_vec());
    let dir = adapters_dir.join(format!("{}+{}-s{seed}", method.name, mode.name()));
    let adapter_bytes = pm.save_pretrained(&dir)?;
    Ok(MultiOutcome { metrics, run: out, trainable, total, final_weights, adapter_bytes })
}

/// The records of one run: one per task, method `<adapter>+<mode>`.
pub fn records(data: &[TaskData], method: &MethodSpec, mode: Mode, cfg: &TrainConfig, o: MultiOutcome) -> Vec<Record> {
    let name = format!("{}+{}", method.name, mode.name());
    let sizes: Vec<String> = data.iter().map(|d| format!("{} {}", d.task.display(), d.train.enc.len())).collect();
    let mut desc = format!(
        "{} shared by {} heads; MFTCoder {} ({})",
        method.describe(),
        data.len(),
        mode.name(),
        sizes.join(", ")
    );
    if let Some(w) = &o.final_weights {
        let w: Vec<String> = w.iter().map(|v| format!("{v:.3}")).collect();
        desc.push_str(&format!("; CoBa's final weights [{}]", w.join(", ")));
    }
    data.iter()
        .zip(&o.metrics)
        .map(|(d, metrics)| {
            let out = train::RunOutcome { metrics: metrics.clone(), ..o.run.clone() };
            let cost =
                RunCost { trainable: o.trainable, total: o.total, adapter_bytes: o.adapter_bytes, own_state_bytes: 0 };
            let sizes = (d.train.enc.len(), d.dev.enc.len());
            glue_record(d.task, &name, desc.clone(), method.seed, cfg, out, cost, sizes)
        })
        .collect()
}

/// `cargo xtask bench --multitask`: every `--methods` entry (default `lora`) x seed x mode on `--tasks` (default
/// SST-2, CoLA, MRPC) trained jointly; results, report and plots in `<out>/glue-multitask/<profile>/`.
///
/// # Errors
/// Unknown methods or tasks, data and model errors. Missing assets print what is missing (exit code 2).
pub fn run(args: &crate::cli::BenchArgs) -> Result<std::process::ExitCode> {
    use crate::bench::{profile, registry, resolve_methods, workspace_root};
    let wall = Instant::now();
    let prof = profile(args);
    let tasks: Vec<Task> = match &args.tasks {
        Some(ts) => ts.iter().map(|t| Task::parse(t)).collect::<Result<_>>()?,
        None => DEFAULT_TASKS.to_vec(),
    };
    let adir = match crate::assets::check(&crate::assets::glue_needs(&tasks)) {
        Ok(d) => d,
        Err(msg) => {
            eprintln!("cargo xtask bench --multitask: assets are missing, nothing was run.\n{msg}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    let model_dir = adir.join(crate::model::MINILM_DIR);
    let names: Vec<String> = args.methods.clone().unwrap_or_else(|| vec!["lora".to_string()]);
    let methods = resolve_methods(&names, registry())?;
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let out_root = args.out.clone().unwrap_or_else(|| workspace_root().join("target/bench"));
    let run_dir = out_root.join("glue-multitask").join(&prof.name);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let results_path = run_dir.join("results.json");
    let mut res = Results::load(&results_path)?;
    res.profile = format!("{} multi-task", prof.name);
    res.machine = crate::report::Machine::detect(threads);
    let tok = train::load_tokenizer(&model_dir.join("tokenizer.json"), prof.cfg.max_len)?;
    let n = prof.cfg.train_examples.unwrap_or(1000);
    let data = prepare(&adir.join("data/glue"), &tok, &tasks, n)?;
    eprintln!(
        "bench glue-multitask/{}: tasks {:?} ({} training examples), methods {names:?}, seeds {}..{} -> {}",
        prof.name,
        tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        data.iter().map(|d| d.train.enc.len().to_string()).collect::<Vec<_>>().join("/"),
        args.seed,
        args.seed + args.seeds,
        run_dir.display()
    );
    let mut failures = Vec::new();
    for spec in &methods {
        for seed in args.seed..args.seed + args.seeds {
            for mode in Mode::ALL {
                let m = spec.clone().with_seed(seed);
                let cfg = TrainConfig { lr: args.lr.unwrap_or(m.lr), ..prof.cfg.clone() };
                if !args.force && done(&res, &data, &m, mode, &cfg) {
                    eprintln!("{} / {} / seed {seed}: done already (--force re-runs)", m.name, mode.name());
                    continue;
                }
                train::reset_peak_rss();
                match run_one(&model_dir, &run_dir.join("adapters"), &data, &m, mode, &cfg) {
                    Ok(o) => {
                        for r in records(&data, &m, mode, &cfg, o) {
                            eprintln!("{} / {}+{} / seed {seed}: {:?}", r.task, m.name, mode.name(), r.metrics);
                            res.upsert(r);
                        }
                        res.save(&results_path)?;
                    }
                    Err(e) => {
                        eprintln!("{} / {} / seed {seed}: FAILED: {e:#}", m.name, mode.name());
                        failures.push(format!("{}+{}/{seed}", m.name, mode.name()));
                    }
                }
            }
        }
    }
    crate::bench::finish(&res, &run_dir, &results_path, wall, &failures)
}

/// Whether `res` already holds every task's record of this run.
pub fn done(res: &Results, data: &[TaskData], method: &MethodSpec, mode: Mode, cfg: &TrainConfig) -> bool {
    let name = format!("{}+{}", method.name, mode.name());
    data.iter().all(|d| res.find(d.task.name(), &name, method.seed, cfg).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::glue::data::Label;
    use crate::train::collate;
    use peft_core::nn::RandomInit;

    #[test]
    fn per_sample_cross_entropy_matches_the_mean_loss() {
        let logits = Tensor::new(RandomInit::new(1, 1.0).get("l", &[4, 3]).unwrap());
        let y = [0usize, 2, 1, 2];
        let per = per_sample_ce(&logits, &y).unwrap();
        assert_eq!(per.shape(), &[4, 1]);
        let mean = logits.cross_entropy(&[0, 2, 1, 2], None, 0.0).unwrap().item().unwrap();
        let got: f32 = per.as_slice().iter().sum::<f32>() / 4.0;
        assert!((got - mean).abs() < 1e-6);
    }

    #[test]
    fn held_out_examples_avoid_the_training_subset_and_are_seeded() {
        let taken = [1usize, 3, 5, 7];
        let a = held_out(20, &taken, 6, 9);
        assert_eq!(a, held_out(20, &taken, 6, 9));
        assert_eq!(a.len(), 6);
        assert!(a.iter().all(|i| !taken.contains(i) && *i < 20));
        assert_eq!(held_out(6, &taken, 10, 1), [0, 2, 4]);
    }

    /// A tiny BERT with three heads: every sample's loss comes from its own task's head, and the three modes
    /// weight the tasks as documented.
    #[test]
    fn mixed_batches_route_samples_to_their_heads_and_modes_weight_tasks() {
        let bert = BertModel::from_source(&crate::model::tiny_bert_config(), &RandomInit::new(2, 0.2)).unwrap();
        let outs = [("a".to_string(), 2), ("b".to_string(), 3), ("c".to_string(), 2)];
        let m = MultiHead::new(bert, 0.0, &outs, 5).unwrap();
        assert_eq!(m.head_modules(), ["classifier_a", "classifier_b", "classifier_c"]);
        let enc = |ids: Vec<usize>| Encoded { types: vec![0; ids.len()], ids };
        let split = |labels: Vec<usize>| Split {
            enc: labels.iter().map(|&l| enc(vec![1, 4 + l, 2])).collect(),
            labels: labels.into_iter().map(Label::Class).collect(),
        };
        let splits = [split(vec![0, 1, 1]), split(vec![2, 0]), split(vec![1])];
        let rows: Rows = vec![(1, 0), (0, 2), (2, 0), (0, 0), (1, 1), (0, 1)];
        let mut ctx = Ctx::eval();
        let refs: Vec<&Split> = splits.iter().collect();
        let (l, ids) = batch_losses(&m, &refs, &rows, &mut ctx).unwrap();
        assert_eq!(ids, [0, 0, 0, 1, 1, 2]);
        // Each loss against the head of its task, computed alone.
        let one = |t: usize, i: usize| -> f32 {
            let b = collate(&splits[t].enc, &[i]);
            let lg = m.head_logits(t, &m.pooled(&b, &ctx).unwrap(), &ctx).unwrap();
            per_sample_ce(&lg, &[splits[t].labels[i].class()]).unwrap().item().unwrap()
        };
        // Task by task, each task's rows in batch order: task 0 holds examples 2, 0, 1.
        let want = [one(0, 2), one(0, 0), one(0, 1), one(1, 0), one(1, 1), one(2, 0)];
        for (g, w) in l.as_slice().iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        let mask = vec![1.0; 6];
        let c1 = mft_loss(MftBalance::Plain, &l, &mask, &ids, None).unwrap().item().unwrap();
        let c3 = mft_loss(MftBalance::TaskBalanced, &l, &mask, &ids, None).unwrap().item().unwrap();
        let task_mean = |r: std::ops::Range<usize>| want[r.clone()].iter().sum::<f32>() / r.len() as f32;
        assert!((c1 - want.iter().sum::<f32>() / 6.0).abs() < 1e-5);
        assert!((c3 - (task_mean(0..3) + task_mean(3..5) + task_mean(5..6)) / 3.0).abs() < 1e-5);
    }
}
