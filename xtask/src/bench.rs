//! `cargo xtask bench`: profiles, method registry, the task x method x seed loop, resume, reports.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use peft_core::adapter::FULL;
use peft_core::adapter::{duplicate_name, MethodSpec, PeftModel};
use peft_core::nn::named_params;
use peft_sparse::squarehead_tuner::SquareheadTuner;
use peft_sparse::SquareheadConfig;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::cli::{BenchArgs, Suite};
use crate::glue::data::{self, Example, Label};
use crate::glue::tasks::Task;
use crate::model::{load_minilm, MINILM_DIR};
use crate::report::{Machine, Record, Results};
use crate::train::{self, Split, TrainConfig};
use crate::{assets, baseline, plot, report, sources, squarehead};

/// Seed of the training-set subsample (fixed, so every method and seed sees the same examples).
const DATA_SEED: u64 = 1234;

/// Training batches data-driven inits (CorDA, EVA, LoRA-SB) see before training (the first batches of the training
/// subset in file order; 8 x 16 = 128 examples at the default batch size).
const CALIBRATION_BATCHES: usize = 8;

/// A named recipe.
#[derive(Clone, Debug)]
pub struct Profile {
    /// `quick`, `default` or `full`, plus `-n<N>` / `-e<N>` when `--train-examples` / `--epochs` override it.
    pub name: String,
    /// Tasks run when `--tasks` is not given.
    pub tasks: Vec<Task>,
    /// Training recipe.
    pub cfg: TrainConfig,
}

/// The default profile's recipe (the learning rate is the method's: 0 here).
pub fn default_config() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch_size: 16,
        lr: 0.0,
        warmup_frac: 0.06,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        train_examples: Some(1000),
        max_len: 128,
    }
}

/// The profile selected by `--quick` / `--full` (default otherwise).
///
/// The default profile is sized to finish in under 15 minutes on a 2-core machine: SST-2 and MRPC, 1,000
/// training examples each (a fixed random subset), one epoch at batch 16 (63 steps), full dev sets.
pub fn profile(args: &BenchArgs) -> Profile {
    let base = default_config();
    let mut p = if args.quick {
        Profile {
            name: "quick".into(),
            tasks: vec![Task::Sst2],
            cfg: TrainConfig { train_examples: Some(256), ..base },
        }
    } else if args.full {
        Profile {
            name: "full".into(),
            tasks: Task::ALL.iter().copied().filter(|t| t.has_train()).collect(),
            cfg: TrainConfig { epochs: 3, train_examples: None, ..base },
        }
    } else {
        Profile { name: "default".into(), tasks: vec![Task::Sst2, Task::Mrpc], cfg: base }
    };
    if let Some(n) = args.train_examples {
        p.cfg.train_examples = Some(n);
        p.name = format!("{}-n{n}", p.name);
    }
    if let Some(lr) = args.lr {
        p.name = format!("{}-lr{lr:e}", p.name);
    }
    if let Some(e) = args.epochs {
        p.cfg.epochs = e.max(1);
        p.name = format!("{}-e{}", p.name, e.max(1));
    }
    if let Some(ts) = &args.compose_from {
        p.name = format!("{}-from-{}", p.name, ts.join("+"));
    }
    p
}

/// Default methods, in table order.
pub const DEFAULT_METHODS: [&str; 4] = ["head", "bitfit", "lora", "full"];

/// Every method the registries provide: peft-core's baselines plus the method crates' (data: a tuner config, a
/// learning rate and a seed per method).
pub fn registry() -> Vec<MethodSpec> {
    let mut v = peft_core::adapter::methods();
    v.extend(peft_lora::methods());
    v.extend(peft_quant::methods());
    v.extend(peft_sparse::methods());
    v.extend(peft_adapters::methods());
    v
}

/// Resolves method names against the registry.
///
/// # Errors
/// A name no registry provides (naming the known ones), or a name given twice.
pub fn resolve_methods(names: &[String], reg: Vec<MethodSpec>) -> Result<Vec<MethodSpec>> {
    if let Some(d) = duplicate_name(&reg) {
        bail!("xtask bug: two registry methods are named `{d}`");
    }
    let known: Vec<String> = reg.iter().map(|m| m.name.to_string()).collect();
    let mut out: Vec<MethodSpec> = Vec::new();
    for n in names {
        if out.iter().any(|m| m.name.0 == n) {
            bail!("method `{n}` is listed twice");
        }
        match reg.iter().find(|m| m.name.0 == n) {
            Some(m) => out.push(m.clone()),
            None => bail!("method `{n}` is not in the registry (known: {})", known.join(", ")),
        }
    }
    Ok(out)
}

/// Workspace root (the parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The training subset: all rows, or `n` rows drawn with [`DATA_SEED`] (indices into the file, sorted).
pub fn subsample(len: usize, n: Option<usize>) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    if let Some(n) = n.filter(|&n| n < len) {
        idx.shuffle(&mut StdRng::seed_from_u64(DATA_SEED));
        idx.truncate(n);
        idx.sort_unstable();
    }
    idx
}

pub(crate) fn labelled(ex: Vec<Example>, what: &str) -> Result<(Vec<Example>, Vec<Label>)> {
    let labels = ex
        .iter()
        .map(|e| e.label)
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("{what} has unlabelled rows"))?;
    Ok((ex, labels))
}

/// Runs the bench; returns the process exit code.
///
/// # Errors
/// Anything that stops the bench (printed by `main`).
pub fn run(args: &BenchArgs) -> Result<std::process::ExitCode> {
    let wall = Instant::now();
    match args.suite {
        Suite::Glue if args.multitask => return crate::multitask::run(args),
        Suite::Glue => {}
        Suite::Vtab => return crate::vtab::run(args),
        Suite::Audio => return crate::audio::run(args),
        Suite::Coco => return crate::coco::run(args),
        Suite::LlmAdapters => return crate::llm_adapters::run(args),
        Suite::All => {
            // Each suite in turn, with the same options; the first failing suite's status is returned.
            for suite in [Suite::Glue, Suite::Vtab, Suite::Audio, Suite::Coco, Suite::LlmAdapters] {
                let code = run(&BenchArgs { suite, ..args.clone() })?;
                if code != std::process::ExitCode::SUCCESS {
                    return Ok(code);
                }
            }
            return Ok(std::process::ExitCode::SUCCESS);
        }
    }
    let prof = profile(args);
    let tasks: Vec<Task> = match &args.tasks {
        Some(ts) => ts.iter().map(|t| Task::parse(t)).collect::<Result<_>>()?,
        None => prof.tasks.clone(),
    };
    if let Some(t) = tasks.iter().find(|t| !t.has_train()) {
        bail!("{t} has no training split in the asset pack (only dev); it cannot be fine-tuned");
    }
    // 1. Assets.
    let adir = match assets::check(&assets::glue_needs(&tasks)) {
        Ok(d) => d,
        Err(msg) => {
            eprintln!("cargo xtask bench: assets are missing, nothing was run.\n{msg}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    let model_dir = adir.join(MINILM_DIR);
    let glue_dir = adir.join("data/glue");
    // 2. Methods and model (fail before any work).
    let names: Vec<String> =
        args.methods.clone().unwrap_or_else(|| DEFAULT_METHODS.iter().map(|s| s.to_string()).collect());
    let methods = resolve_methods(&names, registry())?;
    drop(load_minilm(&model_dir, 2, 0)?);
    // 3. Threads.
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    // 4. Results.
    let out_root = args.out.clone().unwrap_or_else(|| workspace_root().join("target/bench"));
    let run_dir = out_root.join("glue").join(&prof.name);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let results_path = run_dir.join("results.json");
    let mut res = Results::load(&results_path)?;
    res.profile = prof.name.clone();
    res.machine = Machine::detect(threads);
    let tok = train::load_tokenizer(&model_dir.join("tokenizer.json"), prof.cfg.max_len)?;
    eprintln!(
        "bench glue/{}: tasks {:?}, methods {:?}, seeds {}..{}, {} threads -> {}",
        prof.name,
        tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        names,
        args.seed,
        args.seed + args.seeds,
        threads,
        run_dir.display()
    );
    let mut failures = Vec::new();
    let mut teachers = squarehead::Teachers::new();
    // Composition methods: their source tasks, and the SeqBn source adapters they need (trained first).
    let compose_from: Vec<Task> = match &args.compose_from {
        Some(ts) => ts.iter().map(|t| Task::parse(t)).collect::<Result<_>>()?,
        None => sources::DEFAULT_SOURCES.to_vec(),
    };
    if methods.iter().any(sources::is_composition) {
        if let Some(t) = compose_from.iter().find(|t| !t.has_train()) {
            bail!("--compose-from: {t} has no training split, so no source adapter can be trained on it");
        }
        let seqbn = resolve_methods(&[sources::SOURCE_METHOD.to_string()], registry())?.remove(0);
        for &src in &compose_from {
            let todo: Vec<u64> =
                (args.seed..args.seed + args.seeds).filter(|&s| !sources::trained(&run_dir, src, s)).collect();
            if todo.is_empty() {
                continue;
            }
            let (_, train_split, dev_split) = task_splits(&glue_dir, &tok, src, &prof.cfg)?;
            for seed in todo {
                let m = seqbn.clone().with_seed(seed);
                let cfg = TrainConfig { lr: m.lr, ..prof.cfg.clone() };
                eprintln!("{src} / {} / seed {seed}: training the source adapter of the composition methods", m.name);
                let rec = one_run(src, &m, &cfg, &model_dir, &run_dir, (&train_split, &dev_split), &mut teachers)
                    .with_context(|| format!("training the {src} source adapter (seed {seed})"))?;
                eprintln!("{src} / {} / seed {seed}: {:?}", m.name, rec.metrics);
                res.upsert(rec);
                res.save(&results_path)?;
            }
        }
    }
    for &task in &tasks {
        let (idx, train_split, dev_split) = task_splits(&glue_dir, &tok, task, &prof.cfg)?;
        for spec in &methods {
            for seed in args.seed..args.seed + args.seeds {
                let m = spec.clone().with_seed(seed);
                let cfg = TrainConfig { lr: args.lr.unwrap_or(m.lr), ..prof.cfg.clone() };
                if !args.force && res.find(task.name(), m.name.0, seed, &cfg).is_some() {
                    eprintln!("{} / {} / seed {seed}: done already (in results.json; --force re-runs)", task, m.name);
                    continue;
                }
                let split = (&train_split, &dev_split);
                let result = if sources::is_composition(&m) {
                    composition_run(task, &m, &cfg, (&model_dir, &run_dir), split, &compose_from)
                } else {
                    one_run(task, &m, &cfg, &model_dir, &run_dir, split, &mut teachers)
                };
                match result {
                    Ok(rec) => {
                        eprintln!(
                            "{} / {} / seed {seed}: {:?}  {:.1} samples/s, {:.0} s",
                            task, m.name, rec.metrics, rec.samples_per_sec, rec.train_seconds
                        );
                        res.upsert(rec);
                        res.save(&results_path)?;
                    }
                    Err(e) => {
                        eprintln!("{} / {} / seed {seed}: FAILED: {e:#}", task, m.name);
                        failures.push(format!("{task}/{}/{seed}", m.name));
                    }
                }
            }
        }
        if args.baseline.is_some() {
            run_baseline(&mut res, task, &idx, &prof.cfg, args, threads, &model_dir, &glue_dir, &run_dir);
            res.save(&results_path)?;
        }
    }
    res.save(&results_path)?;
    finish(&res, &run_dir, &results_path, wall, &failures)
}

/// The end of a GLUE-format run: plots, report.md (also printed), the summary line, and exit status 1 when a run
/// failed.
///
/// # Errors
/// IO errors writing report.md.
pub(crate) fn finish(
    res: &Results,
    run_dir: &Path,
    results_path: &Path,
    wall: Instant,
    failures: &[String],
) -> Result<std::process::ExitCode> {
    let plots = match plot::write_all(res, run_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("warning: plots not written: {e:#}");
            Vec::new()
        }
    };
    let md = report::markdown(res, &plots);
    std::fs::write(run_dir.join("report.md"), &md)?;
    println!("{md}");
    eprintln!("wrote {} and report.md ({:.1} min wall)", results_path.display(), wall.elapsed().as_secs_f64() / 60.0);
    if failures.is_empty() {
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        eprintln!("{} run(s) failed: {}", failures.len(), failures.join(", "));
        Ok(std::process::ExitCode::from(1))
    }
}

/// The training subset (indices into the train file, the fixed `DATA_SEED` subsample) and the encoded train and
/// dev splits of `task`.
fn task_splits(
    glue_dir: &Path,
    tok: &tokenizers::Tokenizer,
    task: Task,
    cfg: &TrainConfig,
) -> Result<(Vec<usize>, Split, Split)> {
    let (train_ex, train_y) = labelled(data::load(glue_dir, task, "train")?, "train")?;
    let (dev_ex, dev_y) = labelled(data::load(glue_dir, task, "dev")?, "dev")?;
    let idx = subsample(train_ex.len(), cfg.train_examples);
    let sub: Vec<Example> = idx.iter().map(|&i| train_ex[i].clone()).collect();
    let train_split = Split { enc: train::encode_all(tok, &sub)?, labels: idx.iter().map(|&i| train_y[i]).collect() };
    let dev_split = Split { enc: train::encode_all(tok, &dev_ex)?, labels: dev_y };
    Ok((idx, train_split, dev_split))
}

/// A composition method's run: the source adapters of `from` (this seed's) loaded without their heads, the block
/// over them with a fresh task head, the block and the head trained.
fn composition_run(
    task: Task,
    method: &MethodSpec,
    cfg: &TrainConfig,
    (model_dir, run_dir): (&Path, &Path),
    (train_split, dev_split): (&Split, &Split),
    from: &[Task],
) -> Result<Record> {
    let seed = method.seed;
    let Some(block) = method.config.as_any().downcast_ref::<peft_adapters::composition::CompositionConfig>() else {
        bail!("xtask bug: {} is not a composition method", method.name);
    };
    train::reset_peak_rss();
    let model = load_minilm(model_dir, task.num_outputs(), seed)?;
    let total: u64 = named_params(model.as_ref()).iter().map(|p| p.numel() as u64).sum();
    let head = squarehead::head_modules(model.as_ref());
    let mut pm = PeftModel::wrap(model, seed);
    let mut config = sources::attach(&mut pm, block, from, run_dir, seed)?;
    config.modules_to_save = Some(head);
    let desc = format!("{} (SeqBn sources, seed {seed})", peft_core::adapter::TunerConfig::describe(&config));
    pm.add_adapter("default", config)?;
    pm.set_adapter("default")?;
    let trainable: u64 = pm.trainable_params().iter().map(|p| p.numel() as u64).sum();
    let bar = train::progress_bar(format!("{} {} s{seed}", task.name(), method.name));
    let out = train::run(task, &pm, cfg, cfg.lr, seed, train_split, dev_split, None, &bar);
    bar.finish_and_clear();
    let out = out?;
    let adapter_dir = run_dir.join("adapters").join(format!("{}-{}-s{seed}", task.name(), method.name));
    let adapter_bytes = pm.save_pretrained(&adapter_dir)?;
    let cost = RunCost { trainable, total, adapter_bytes, own_state_bytes: 0 };
    Ok(glue_record(task, method.name.0, desc, seed, cfg, out, cost, (train_split.enc.len(), dev_split.enc.len())))
}

/// What a run cost beyond the trainer's outcome.
pub(crate) struct RunCost {
    /// Trainable parameters (adapter and head).
    pub trainable: u64,
    /// Parameters of the model before the adapter.
    pub total: u64,
    /// Bytes of the saved adapter folder.
    pub adapter_bytes: u64,
    /// Optimizer state the adapter keeps itself (sparse methods), added to the trainer's.
    pub own_state_bytes: u64,
}

/// The GLUE record of one run of `method` on `task` (no sparse-inference or quantized-base section); `sizes` are the
/// training and dev set sizes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn glue_record(
    task: Task,
    method: &str,
    desc: String,
    seed: u64,
    cfg: &TrainConfig,
    out: train::RunOutcome,
    cost: RunCost,
    sizes: (usize, usize),
) -> Record {
    Record {
        task: task.name().to_string(),
        method: method.to_string(),
        method_desc: desc,
        seed,
        lr: cfg.lr,
        config: cfg.clone(),
        headline: task.metrics()[0].short().to_string(),
        metrics: out.metrics,
        trainable_params: cost.trainable,
        total_params: cost.total,
        trainable_pct: 100.0 * cost.trainable as f64 / cost.total.max(1) as f64,
        train_seconds: out.train_seconds,
        eval_seconds: out.eval_seconds,
        samples_per_sec: out.samples_per_sec,
        peak_rss_bytes: train::peak_rss_bytes(),
        adapter_bytes: cost.adapter_bytes,
        optimizer_state_bytes: Some(out.optimizer_state_bytes + cost.own_state_bytes),
        steps: out.steps,
        skipped_steps: out.skipped_steps,
        train_examples: sizes.0,
        dev_examples: sizes.1,
        losses: out.losses,
        sparse: None,
        quant_base: None,
    }
}

/// One task x method x seed run: the method's adapter on a fresh model (the task head in `modules_to_save`,
/// calibration batches for data-driven inits), the core trainer, the adapter folder written.
///
/// SquareHead (`squarehead-*`): the dense teacher is trained first (once per task and seed, `full`'s recipe), the
/// student starts from its weights, prunes to the method's sparsity by two thirds of the steps and is distilled
/// from it; the record carries the teacher's score and the pruned matrices' CSR size and GEMM times.
fn one_run(
    task: Task,
    method: &MethodSpec,
    cfg: &TrainConfig,
    model_dir: &Path,
    run_dir: &Path,
    (train_split, dev_split): (&Split, &Split),
    teachers: &mut squarehead::Teachers,
) -> Result<Record> {
    let seed = method.seed;
    let sq = method.config.as_any().downcast_ref::<SquareheadConfig>().cloned();
    // The teacher first (its peak RSS is not the student's).
    let teacher = match &sq {
        Some(_) => {
            let full_lr = peft_core::adapter::methods().iter().find(|m| m.name == FULL).map_or(1e-4, |m| m.lr);
            let full_cfg = TrainConfig { lr: full_lr, ..cfg.clone() };
            let t = squarehead::teacher(teachers, task, seed, &full_cfg, full_lr, model_dir, train_split, dev_split)?;
            Some((t, squarehead::teacher_model(t, model_dir, task, seed)?))
        }
        None => None,
    };
    train::reset_peak_rss();
    let model = load_minilm(model_dir, task.num_outputs(), seed)?;
    // The pretrained model's size, counted before a method adds adapters or swaps weights for quantized storage
    // (QLoRA's NF4 weights are not parameters), so "trainable %" has the same denominator for every method.
    let total: u64 = named_params(model.as_ref()).iter().map(|p| p.numel() as u64).sum();
    let head = squarehead::head_modules(model.as_ref());
    let mut config = match (&sq, &teacher) {
        (Some(sq), Some((t, _))) => {
            squarehead::copy_values(model.as_ref(), t.values())?;
            let steps = train::training_steps(train_split.enc.len(), cfg);
            Box::new(SquareheadConfig { prune_end_step: Some(2 * steps / 3), ..sq.clone() })
        }
        _ => method.config(),
    };
    config.set_modules_to_save(head)?;
    let mut pm = PeftModel::wrap(model, seed);
    if config.needs_calibration() {
        let batches = train::calibration_batches(train_split, cfg.batch_size, CALIBRATION_BATCHES);
        // `PeftModel<M>` hands the callback `&M`, and `M` is the boxed classifier here.
        #[allow(clippy::borrowed_box)]
        let mut calib = |m: &Box<dyn crate::model::SeqClassifier>, i: usize| {
            train::calibration_loss(task, m.as_ref(), train_split, &batches, i)
        };
        pm.add_adapter_calibrated("default", config, &mut calib)?;
    } else {
        pm.add_adapter_boxed("default", config)?;
    }
    pm.set_adapter("default")?;
    let trainable: u64 = pm.trainable_params().iter().map(|p| p.numel() as u64).sum();
    let bar = train::progress_bar(format!("{} {} s{seed}", task.name(), method.name));
    let distill = match (&sq, &teacher) {
        (Some(sq), Some((_, tm))) => Some(train::Distill { teacher: tm.as_ref(), loss: sq.loss() }),
        _ => None,
    };
    let out = train::run(task, &pm, cfg, cfg.lr, seed, train_split, dev_split, distill.as_ref(), &bar);
    bar.finish_and_clear();
    let out = out?;
    let sparse = match (pm.tuner("default").ok().and_then(|t| t.as_any().downcast_ref::<SquareheadTuner>()), &teacher) {
        (Some(st), Some((t, _))) => {
            let (sparsity, dense_bytes, csr_bytes, timings) = squarehead::measure(st)?;
            Some(squarehead::SparseInference {
                sparsity,
                teacher_metrics: t.metrics.clone(),
                teacher_train_seconds: t.train_seconds,
                dense_bytes,
                csr_bytes,
                timings,
            })
        }
        _ => None,
    };
    let adapter_dir = run_dir.join("adapters").join(format!("{}-{}-s{seed}", task.name(), method.name));
    let adapter_bytes = pm.save_pretrained(&adapter_dir)?;
    // State the adapter keeps itself (LT-SFT, SpIEL, SaRA, SPT step their values with their own O(k) AdamW).
    let own_state = pm.tuner("default").map_or(0, |t| t.state_bytes() as u64);
    let quant_base = {
        use peft_quant::QloraExt;
        let q = pm.quant_memory();
        (q.params > 0).then(|| report::QuantBase { params: q.params as u64, bytes: q.bytes_without_maps() as u64 })
    };
    let cost = RunCost { trainable, total, adapter_bytes, own_state_bytes: own_state };
    let sizes = (train_split.enc.len(), dev_split.enc.len());
    let rec = glue_record(task, method.name.0, method.describe(), seed, cfg, out, cost, sizes);
    Ok(Record { sparse, quant_base, ..rec })
}

#[allow(clippy::too_many_arguments)]
fn run_baseline(
    res: &mut Results,
    task: Task,
    idx: &[usize],
    cfg: &TrainConfig,
    args: &BenchArgs,
    threads: usize,
    model_dir: &Path,
    glue_dir: &Path,
    run_dir: &Path,
) {
    if let Err(e) = baseline::available() {
        eprintln!("PyTorch baseline skipped: {e:#}");
        return;
    }
    let Some(lora) = registry().into_iter().find(|m| m.name.0 == "lora") else {
        eprintln!("PyTorch baseline skipped: it compares against our `lora` method, which is not in the registry");
        return;
    };
    for seed in args.seed..args.seed + args.seeds {
        eprintln!("{task} / pytorch lora / seed {seed}: running {}", baseline::SCRIPT);
        let job = baseline::BaselineJob {
            root: &workspace_root(),
            model_dir,
            glue_dir,
            task,
            indices: idx,
            cfg,
            lr: args.lr.unwrap_or(lora.lr),
            seed,
            threads,
            work: &run_dir.join("baseline"),
        };
        match baseline::run(&job) {
            Ok(b) => {
                res.baselines.retain(|x| !(x.task == b.task && x.seed == b.seed));
                res.baselines.push(b);
            }
            Err(e) => eprintln!("PyTorch baseline for {task} failed: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsample_is_fixed_sorted_and_bounded() {
        let a = subsample(100, Some(10));
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, subsample(100, Some(10)));
        assert_eq!(subsample(5, Some(10)), vec![0, 1, 2, 3, 4]);
        assert_eq!(subsample(3, None), vec![0, 1, 2]);
    }

    fn args(extra: &[&str]) -> BenchArgs {
        use clap::Parser;
        let mut v = vec!["xtask", "bench"];
        v.extend_from_slice(extra);
        let crate::cli::Cmd::Bench(b) = crate::cli::Cli::try_parse_from(v).unwrap().cmd else { panic!("not bench") };
        b
    }

    #[test]
    fn overrides_change_the_recipe_and_the_run_folder() {
        let p = profile(&args(&[]));
        assert_eq!((p.name.as_str(), p.cfg.train_examples, p.cfg.epochs), ("default", Some(1000), 1));
        let p = profile(&args(&["--train-examples", "8000", "--epochs", "2"]));
        assert_eq!((p.name.as_str(), p.cfg.train_examples, p.cfg.epochs), ("default-n8000-e2", Some(8000), 2));
        let p = profile(&args(&["--lr", "0.005", "--train-examples", "10"]));
        assert_eq!(p.name, "default-n10-lr5e-3");
        let p = profile(&args(&["--full", "--epochs", "1"]));
        assert_eq!((p.name.as_str(), p.cfg.train_examples, p.cfg.epochs), ("full-e1", None, 1));
    }

    #[test]
    fn resolve_methods_names_missing_ones() {
        let got = resolve_methods(&["bitfit".into(), "head".into()], registry()).unwrap();
        assert_eq!(got.iter().map(|m| m.name.0).collect::<Vec<_>>(), vec!["bitfit", "head"]);
        let Err(e) = resolve_methods(&["nope".into()], registry()) else { panic!("resolved an unknown method") };
        let e = e.to_string();
        assert!(e.contains("`nope`") && e.contains("known: full, head, bitfit, ln-tuning, lora"), "{e}");
        // Issue 14 item 9: `--methods lora,lora` said "not in the registry".
        let e = resolve_methods(&["lora".into(), "lora".into()], registry()).unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
    }

    /// Typed names: no two methods of all the registries (core, peft-lora, peft-quant) share one.
    #[test]
    fn no_two_registry_methods_share_a_name() {
        let all = registry();
        assert_eq!(duplicate_name(&all), None);
        assert!(all.len() >= 12, "{}", all.len());
    }
}
