//! `cargo xtask bench --suite vtab`: VTAB-1k on DINOv2-S/14 with the visual PEFT methods.
//!
//! For each task: decode train800val200 and test once at the profile's resolution; frozen-backbone methods
//! (`linear`, the few-shot classifiers) read a feature cache computed once per task and resolution; every other
//! method is a registry method (`full`, `lora`, `adaptformer`, `vpt-shallow`, `vpt-deep`, ...) attached to a
//! fresh `Dinov2Classifier` with the head in `modules_to_save`, trained with the §7.1 recipe
//! (`peft_vision::harness`) and scored once on test. Results go to `target/bench/vtab/<profile>/`.

pub mod plot;
pub mod report;
pub mod squarehead;
pub mod tasks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use peft_core::adapter::{MethodSpec, PeftModel};
use peft_core::io::hf_config::Dinov2Config;
use peft_core::io::SafeTensorsFile;
use peft_core::nn::named_params;
use peft_core::train::calibration_ctx;
use peft_vision::data::{few_shot_indices, VtabDataset, VtabSplit};
use peft_vision::features::FeatureSet;
use peft_vision::fewshot::{Gda, PrototypePrior, TipAdapter, TipX};
use peft_vision::harness::{epoch_batches, evaluate, finetune, LinearProbe, RecipeConfig};
use peft_vision::pipeline::{vtab_preprocess, PixelSet};
use peft_vision::vit::{Dinov2, Dinov2Classifier, HeadInput};

use self::report::{FewShotRecord, VtabRecord, VtabResults};
use self::tasks::TaskRef;
use crate::bench::{resolve_methods, workspace_root};
use crate::cli::BenchArgs;
use crate::report::Machine;
use crate::{assets, train};
use peft_sparse::SquareheadConfig;

/// The backbone's folder under the asset directory.
pub const DINOV2_DIR: &str = "models/dinov2-small";

/// The linear probe on cached features (not a registry method: it never runs the backbone in training).
pub const LINEAR: &str = "linear";

/// Default methods, in table order.
pub const DEFAULT_METHODS: [&str; 6] = ["linear", "full", "lora", "adaptformer", "vpt-shallow", "vpt-deep"];

/// Shots of the few-shot table.
pub const SHOTS: [usize; 5] = [1, 2, 4, 8, 16];

/// A VTAB recipe.
#[derive(Clone, Debug)]
pub struct VtabProfile {
    /// `quick`, `default`, `full` (+ override suffixes).
    pub name: String,
    /// Shipped tasks run when neither `--tasks` nor `--data-root` is given.
    pub tasks: Vec<&'static str>,
    /// Input resolution.
    pub resolution: usize,
    /// Training recipe (the lr is per method unless `--lr`).
    pub recipe: RecipeConfig,
    /// Evaluation images per task (`None`: the whole test split).
    pub test_examples: Option<usize>,
    /// Notes for the report.
    pub notes: Vec<String>,
}

/// The profile for the flags.
///
/// The default is sized to finish in about 15 minutes on a 2-core machine (measured: see the report's wall time):
/// both shipped tasks at 56 px (a 4x4 patch grid; DINOv2's 37x37 position table is resized bicubically), 3 epochs
/// of batch 32 on the 1,000 training images, the whole 2,000-image test split.
pub fn profile(args: &BenchArgs) -> VtabProfile {
    let base = RecipeConfig {
        epochs: 3,
        batch_size: 32,
        lr: 0.0,
        weight_decay: 1e-4,
        warmup_frac: 0.1,
        max_grad_norm: Some(1.0),
        seed: 0,
    };
    let mut p = if args.quick {
        VtabProfile {
            name: "quick".into(),
            tasks: vec!["cifar10"],
            resolution: 28,
            recipe: RecipeConfig { epochs: 1, ..base },
            test_examples: Some(500),
            notes: vec!["quick profile: 28 px (a 2x2 patch grid), 1 epoch, 500 test images: a smoke test".into()],
        }
    } else if args.full {
        VtabProfile {
            name: "full".into(),
            tasks: vec!["cifar10", "fashion-mnist"],
            resolution: 224,
            recipe: RecipeConfig { lr: 0.0, max_grad_norm: None, ..RecipeConfig::paper() },
            test_examples: None,
            notes: vec!["full profile: the paper recipe (224 px direct resize, 100 epochs, batch 64, AdamW wd 1e-4, \
                         10 warmup epochs + cosine, no augmentation)"
                .into()],
        }
    } else {
        VtabProfile {
            name: "default".into(),
            tasks: vec!["cifar10", "fashion-mnist"],
            resolution: 56,
            recipe: base,
            test_examples: None,
            notes: vec!["default profile (CPU budget): 56 px direct resize (a 4x4 patch grid instead of 16x16; the \
                         position table is resized bicubically), 3 epochs of batch 32 (96 steps), AdamW wd 1e-4, \
                         10% warmup + cosine, grad-norm clip 1, no augmentation; `--full` runs the paper recipe"
                .into()],
        }
    };
    if let Some(r) = args.resolution {
        p.resolution = r;
        p.name = format!("{}-r{r}", p.name);
    }
    if let Some(e) = args.epochs {
        p.recipe.epochs = e;
        p.name = format!("{}-e{e}", p.name);
    }
    if let Some(lr) = args.lr {
        p.name = format!("{}-lr{lr:e}", p.name);
    }
    if let Some(n) = args.test_examples {
        p.test_examples = Some(n);
        p.name = format!("{}-t{n}", p.name);
    }
    p
}

/// Learning rate of a method in this suite: `--lr`, else the linear probe's 1e-2, else the registry's.
fn lr_of(args: &BenchArgs, spec: Option<&MethodSpec>) -> f64 {
    args.lr.unwrap_or_else(|| spec.map_or(1e-2, |s| s.lr))
}

/// Every method the VTAB suite can run on a backbone with `num_heads` attention heads: the bench registry (S²FT
/// with the backbone's head count; SquareHead with its teacher and distillation, [`squarehead`]) plus
/// peft-vision's.
pub fn registry(num_heads: usize) -> Vec<MethodSpec> {
    let mut v: Vec<MethodSpec> = crate::bench::registry()
        .into_iter()
        .map(|m| {
            if m.name == peft_sparse::S2FT {
                MethodSpec::new(peft_sparse::S2FT, peft_sparse::s2ft::S2ftConfig::bert(num_heads), m.lr)
            } else {
                m
            }
        })
        .collect();
    v.extend(peft_vision::methods());
    v
}

/// Calibration batches handed to data-driven inits (SPT's sensitivity), as in the GLUE suite.
const CALIBRATION_BATCHES: usize = 8;

struct Backbone {
    cfg: Dinov2Config,
    weights: SafeTensorsFile,
}

impl Backbone {
    fn open(dir: &Path) -> Result<Self> {
        let cfg = Dinov2Config::load(dir.join("config.json"))?;
        let weights = SafeTensorsFile::open(dir.join("model.safetensors"))?;
        Ok(Backbone { cfg, weights })
    }

    fn classifier(&self, classes: usize, seed: u64) -> Result<Dinov2Classifier> {
        let b = Dinov2::load(&self.cfg, &self.weights)?;
        Ok(Dinov2Classifier::new(b, classes, HeadInput::ClsAndPatchMean, seed)?)
    }
}

/// A fixed subset of `n` of `len` indices (all when `n` is `None` or large), sorted.
fn subset(len: usize, n: Option<usize>) -> Vec<usize> {
    crate::bench::subsample(len, n)
}

struct TaskData {
    train: PixelSet,
    test: PixelSet,
    classes: usize,
    train800: usize,
}

fn load_task(t: &TaskRef, prof: &VtabProfile) -> Result<TaskData> {
    let ds = VtabDataset::open(&t.dir)?;
    let pre = vtab_preprocess(prof.resolution);
    let tr = ds.split(VtabSplit::Train800Val200);
    let test_all = ds.split(VtabSplit::Test);
    let idx = subset(test_all.len(), prof.test_examples);
    let test: Vec<_> = idx.iter().map(|&i| test_all[i].clone()).collect();
    if tr.is_empty() || test.is_empty() {
        bail!("{}: empty train800val200 or test split", t.dir.display());
    }
    Ok(TaskData {
        train: PixelSet::load(tr, &pre)?,
        test: PixelSet::load(&test, &pre)?,
        classes: ds.num_classes(),
        train800: ds.split(VtabSplit::Train800).len(),
    })
}

/// Features of train800val200 and test, from the on-disk cache when it matches.
fn features(
    bb: &Backbone,
    t: &TaskRef,
    data: &TaskData,
    prof: &VtabProfile,
    cache_dir: &Path,
) -> Result<(FeatureSet, FeatureSet)> {
    std::fs::create_dir_all(cache_dir)?;
    let model = bb.classifier(data.classes, 0)?;
    let mut out = Vec::new();
    for (split, set) in [("train800val200", &data.train), ("test", &data.test)] {
        let meta: BTreeMap<String, String> = [
            ("model".to_string(), DINOV2_DIR.to_string()),
            ("task".to_string(), t.dir.display().to_string()),
            ("split".to_string(), split.to_string()),
            ("resolution".to_string(), prof.resolution.to_string()),
            ("images".to_string(), set.len().to_string()),
            ("head_input".to_string(), "cls+patch_mean".to_string()),
        ]
        .into();
        let path = cache_dir.join(format!("{}-{}-r{}.safetensors", t.name, split, prof.resolution));
        let f = match FeatureSet::load(&path, &meta)? {
            Some(f) if f.labels == set.labels() => f,
            _ => {
                let t0 = Instant::now();
                let f = FeatureSet::extract(&model, set, 64)?;
                eprintln!(
                    "  features {} / {split}: {} images in {:.1} s",
                    t.name,
                    set.len(),
                    t0.elapsed().as_secs_f64()
                );
                f.save(&path, &meta)?;
                f
            }
        };
        out.push(f);
    }
    let test = out.pop().context("xtask bug: test features")?;
    let train = out.pop().context("xtask bug: train features")?;
    Ok((train, test))
}

/// Runs the VTAB suite; returns the process exit code.
///
/// # Errors
/// Anything that stops the bench.
pub fn run(args: &BenchArgs) -> Result<std::process::ExitCode> {
    let wall = Instant::now();
    let prof = profile(args);
    let shipped: Vec<String> = if args.data_root.is_none() {
        args.tasks.clone().unwrap_or_else(|| prof.tasks.iter().map(|s| s.to_string()).collect())
    } else {
        Vec::new()
    };
    let needs = asset_needs(&shipped);
    let adir = match assets::check(&needs) {
        Ok(d) => d,
        Err(msg) => {
            eprintln!("cargo xtask bench --suite vtab: assets are missing, nothing was run.\n{msg}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    if args.train_examples.is_some() {
        bail!(
            "--train-examples applies to GLUE; VTAB-1k trains on its 1,000 images (use --test-examples to score fewer)"
        );
    }
    let task_refs = tasks::resolve(args.data_root.as_deref(), &adir, args.tasks.as_deref(), &prof.tasks)?;
    let names: Vec<String> =
        args.methods.clone().unwrap_or_else(|| DEFAULT_METHODS.iter().map(|s| s.to_string()).collect());
    let reg_names: Vec<String> = names.iter().filter(|n| *n != LINEAR).cloned().collect();
    let bb = Backbone::open(&adir.join(DINOV2_DIR))?;
    let specs = resolve_methods(&reg_names, registry(bb.cfg.num_attention_heads))?;
    let full = resolve_methods(&[peft_core::adapter::FULL.0.to_string()], registry(bb.cfg.num_attention_heads))?
        .pop()
        .context("`full` (SquareHead's teacher) is not in the registry")?;
    let mut teachers = squarehead::Teachers::new();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let out_root = args.out.clone().unwrap_or_else(|| workspace_root().join("target/bench"));
    let run_dir = out_root.join("vtab").join(&prof.name);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let results_path = run_dir.join("results.json");
    let mut res = VtabResults::load(&results_path)?;
    res.profile = prof.name.clone();
    res.machine = Machine::detect(threads);
    res.notes = prof.notes.clone();
    res.notes.push(format!(
        "learning rates: {} (per method from the registries unless --lr; not tuned on VTAB)",
        names
            .iter()
            .map(|n| format!("{n} {:e}", lr_of(args, specs.iter().find(|s| s.name.0 == n))))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    eprintln!(
        "bench vtab/{}: tasks {:?}, methods {:?}, {} px, seeds {}..{}, {} threads -> {}",
        prof.name,
        task_refs.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        names,
        prof.resolution,
        args.seed,
        args.seed + args.seeds,
        threads,
        run_dir.display()
    );
    let mut failures = Vec::new();
    for t in &task_refs {
        let t0 = Instant::now();
        let data = load_task(t, &prof)?;
        eprintln!(
            "{}: {} classes, {} train / {} test images decoded in {:.1} s",
            t.name,
            data.classes,
            data.train.len(),
            data.test.len(),
            t0.elapsed().as_secs_f64()
        );
        let mut feats: Option<(FeatureSet, FeatureSet)> = None;
        for n in &names {
            let spec = specs.iter().find(|s| s.name.0 == n);
            for seed in args.seed..args.seed + args.seeds {
                let recipe = RecipeConfig { lr: lr_of(args, spec), seed, ..prof.recipe.clone() };
                if !args.force && res.find(&t.name, n, seed, &recipe, prof.resolution).is_some() {
                    eprintln!("{} / {n} / seed {seed}: done already (in results.json; --force re-runs)", t.name);
                    continue;
                }
                let rec = if n == LINEAR {
                    if feats.is_none() {
                        feats = Some(features(&bb, t, &data, &prof, &out_root.join("vtab/cache"))?);
                    }
                    let (ftr, fte) = feats.as_ref().context("xtask bug: features")?;
                    linear_run(t, &bb, &data, ftr, fte, &recipe, &prof)
                } else {
                    let spec = spec.context("xtask bug: unresolved method")?;
                    match spec.config.as_any().downcast_ref::<SquareheadConfig>() {
                        Some(sq) => {
                            let teacher = Teacher { spec: &full, lr: lr_of(args, Some(&full)), all: &mut teachers };
                            squarehead_run(t, &bb, &data, (spec, sq), teacher, &recipe, &prof, &run_dir)
                        }
                        None => adapter_run(t, &bb, &data, spec, &recipe, &prof, &run_dir),
                    }
                };
                match rec {
                    Ok(rec) => {
                        eprintln!(
                            "{} / {n} / seed {seed}: acc {:.1}  {:.1} imgs/s, train {:.0} s, eval {:.0} s",
                            t.name,
                            100.0 * rec.accuracy,
                            rec.samples_per_sec,
                            rec.train_seconds,
                            rec.eval_seconds
                        );
                        res.upsert(rec);
                        res.save(&results_path)?;
                    }
                    Err(e) => {
                        eprintln!("{} / {n} / seed {seed}: FAILED: {e:#}", t.name);
                        failures.push(format!("{}/{n}/{seed}", t.name));
                    }
                }
            }
        }
        if args.fewshot {
            if feats.is_none() {
                feats = Some(features(&bb, t, &data, &prof, &out_root.join("vtab/cache"))?);
            }
            let (ftr, fte) = feats.as_ref().context("xtask bug: features")?;
            for seed in args.seed..args.seed + args.seeds {
                match fewshot_runs(t, &data, ftr, fte, &prof, seed) {
                    Ok(recs) => {
                        for r in recs {
                            res.upsert_fewshot(r);
                        }
                        res.save(&results_path)?;
                    }
                    Err(e) => {
                        eprintln!("{} / few-shot / seed {seed}: FAILED: {e:#}", t.name);
                        failures.push(format!("{}/fewshot/{seed}", t.name));
                    }
                }
            }
        }
    }
    res.wall_seconds = wall.elapsed().as_secs_f64();
    res.save(&results_path)?;
    let plots = match plot::write_all(&res, &run_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("warning: plots not written: {e:#}");
            Vec::new()
        }
    };
    let md = report::markdown(&res, &plots);
    std::fs::write(run_dir.join("report.md"), &md)?;
    println!("{md}");
    eprintln!("wrote {} and report.md ({:.1} min wall)", results_path.display(), res.wall_seconds / 60.0);
    if failures.is_empty() {
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        eprintln!("{} run(s) failed: {}", failures.len(), failures.join(", "));
        Ok(std::process::ExitCode::from(1))
    }
}

/// The files the suite needs: the backbone and the shipped tasks named in `shipped`.
pub fn asset_needs(shipped: &[String]) -> Vec<assets::Need> {
    let mut v: Vec<assets::Need> = ["config.json", "model.safetensors"]
        .iter()
        .map(|f| assets::Need { rel: format!("{DINOV2_DIR}/{f}"), source: DINOV2_SOURCE })
        .collect();
    for n in shipped {
        if let Some((_, rel)) = tasks::SHIPPED.iter().find(|s| s.0 == n.as_str()) {
            for f in ["index.csv", "classes.txt"] {
                v.push(assets::Need { rel: format!("{rel}/{f}"), source: VTAB_SOURCE });
            }
        }
    }
    v
}

const DINOV2_SOURCE: &str = "Hugging Face Hub model facebook/dinov2-small (config.json + model.safetensors)";
const VTAB_SOURCE: &str = "the asset pack's VTAB-1k-style folders (see <assets>/README.md); for the 19 official \
     tasks prepare NOAH's vtab-1k folders and pass --data-root";

fn base_record(t: &TaskRef, method: &str, desc: String, recipe: &RecipeConfig, prof: &VtabProfile) -> VtabRecord {
    VtabRecord {
        task: t.name.clone(),
        group: t.group,
        method: method.to_string(),
        method_desc: desc,
        seed: recipe.seed,
        recipe: recipe.clone(),
        resolution: prof.resolution,
        accuracy: 0.0,
        trainable_params: 0,
        total_params: 0,
        trainable_pct: 0.0,
        train_seconds: 0.0,
        eval_seconds: 0.0,
        samples_per_sec: 0.0,
        peak_rss_bytes: None,
        adapter_bytes: 0,
        optimizer_state_bytes: None,
        steps: 0,
        skipped_steps: 0,
        train_examples: 0,
        test_examples: 0,
        losses: Vec::new(),
        squarehead: None,
    }
}

fn linear_run(
    t: &TaskRef,
    bb: &Backbone,
    data: &TaskData,
    ftr: &FeatureSet,
    fte: &FeatureSet,
    recipe: &RecipeConfig,
    prof: &VtabProfile,
) -> Result<VtabRecord> {
    train::reset_peak_rss();
    let total = named_params(&bb.classifier(data.classes, 0)?).iter().map(|p| p.numel() as u64).sum::<u64>();
    let bar = train::progress_bar(format!("{} linear s{}", t.name, recipe.seed));
    let probe = LinearProbe::fit(ftr, data.classes, recipe, &mut |s, n, l| {
        bar.set_length(n as u64);
        bar.set_position(s as u64);
        bar.set_message(format!("loss {l:.4}"));
    });
    bar.finish_and_clear();
    let probe = probe?;
    let t1 = Instant::now();
    let acc = probe.accuracy(fte)?;
    let mut r =
        base_record(t, LINEAR, "linear probe on cached frozen features (CLS ‖ patch mean)".into(), recipe, prof);
    let p = probe.num_params() as u64;
    r.accuracy = acc;
    r.trainable_params = p;
    r.total_params = total;
    r.trainable_pct = 100.0 * p as f64 / total.max(1) as f64;
    r.train_seconds = probe.outcome.train_seconds;
    r.eval_seconds = t1.elapsed().as_secs_f64();
    r.samples_per_sec = probe.outcome.samples_per_sec;
    r.peak_rss_bytes = train::peak_rss_bytes();
    r.optimizer_state_bytes = Some(probe.outcome.optimizer_state_bytes);
    r.steps = probe.outcome.steps;
    r.skipped_steps = probe.outcome.skipped_steps;
    r.train_examples = ftr.len();
    r.test_examples = fte.len();
    r.losses = probe.outcome.losses;
    Ok(r)
}

fn adapter_run(
    t: &TaskRef,
    bb: &Backbone,
    data: &TaskData,
    spec: &MethodSpec,
    recipe: &RecipeConfig,
    prof: &VtabProfile,
    run_dir: &Path,
) -> Result<VtabRecord> {
    train::reset_peak_rss();
    let seed = recipe.seed;
    let model = bb.classifier(data.classes, seed)?;
    let total: u64 = named_params(&model).iter().map(|p| p.numel() as u64).sum();
    let pm = with_adapter(model, spec, &data.train, recipe)?;
    let bar = train::progress_bar(format!("{} {} s{seed}", t.name, spec.name));
    let out = finetune(&pm, &data.train, recipe, &mut |s, n, l| {
        bar.set_length(n as u64);
        bar.set_position(s as u64);
        bar.set_message(format!("loss {l:.4}"));
    });
    bar.finish_and_clear();
    let out = out?;
    scored_record(t, data, spec, recipe, prof, run_dir, &pm, out, total)
}

/// Scores a trained adapter run on the test split, saves its adapter and fills the record (the trainer's state plus
/// the state the adapter steps itself).
#[allow(clippy::too_many_arguments)]
fn scored_record(
    t: &TaskRef,
    data: &TaskData,
    spec: &MethodSpec,
    recipe: &RecipeConfig,
    prof: &VtabProfile,
    run_dir: &Path,
    pm: &PeftModel<Dinov2Classifier>,
    out: peft_vision::harness::TrainOutcome,
    total: u64,
) -> Result<VtabRecord> {
    let seed = recipe.seed;
    let trainable: u64 = pm.trainable_params().iter().map(|p| p.numel() as u64).sum();
    let t1 = Instant::now();
    let acc = evaluate(pm, &data.test, 64)?;
    let eval_seconds = t1.elapsed().as_secs_f64();
    let adapter_dir: PathBuf = run_dir.join("adapters").join(format!("{}-{}-s{seed}", t.name, spec.name));
    let adapter_bytes = pm.save_pretrained(&adapter_dir)?;
    let mut r = base_record(t, spec.name.0, spec.describe(), recipe, prof);
    r.accuracy = acc;
    r.trainable_params = trainable;
    r.total_params = total;
    r.trainable_pct = 100.0 * trainable as f64 / total.max(1) as f64;
    r.train_seconds = out.train_seconds;
    r.eval_seconds = eval_seconds;
    r.samples_per_sec = out.samples_per_sec;
    r.peak_rss_bytes = train::peak_rss_bytes();
    let own_state = pm.tuner("default").map_or(0, |t| t.state_bytes() as u64);
    r.optimizer_state_bytes = Some(out.optimizer_state_bytes + own_state);
    r.adapter_bytes = adapter_bytes;
    r.steps = out.steps;
    r.skipped_steps = out.skipped_steps;
    r.train_examples = data.train.len();
    r.test_examples = data.test.len();
    r.losses = out.losses;
    Ok(r)
}

/// SquareHead's teacher: the `full` method, its learning rate, and the teachers trained so far.
struct Teacher<'a> {
    spec: &'a MethodSpec,
    lr: f64,
    all: &'a mut squarehead::Teachers,
}

/// One SquareHead run: the task's teacher (trained once per seed), then the student distilled from it.
#[allow(clippy::too_many_arguments)]
fn squarehead_run(
    t: &TaskRef,
    bb: &Backbone,
    data: &TaskData,
    (spec, sq): (&MethodSpec, &SquareheadConfig),
    teacher: Teacher<'_>,
    recipe: &RecipeConfig,
    prof: &VtabProfile,
    run_dir: &Path,
) -> Result<VtabRecord> {
    let seed = recipe.seed;
    let fresh = || bb.classifier(data.classes, seed);
    let tch =
        squarehead::teacher(teacher.all, &t.name, teacher.spec, teacher.lr, recipe, &data.train, &data.test, &fresh)?;
    let tmodel = squarehead::teacher_model(tch, fresh)?;
    train::reset_peak_rss();
    let total: u64 = named_params(&tmodel).iter().map(|p| p.numel() as u64).sum();
    let bar = train::progress_bar(format!("{} {} s{seed}", t.name, spec.name));
    let out = squarehead::student(spec, sq, tch, &tmodel, &fresh, &data.train, recipe, &mut |s, n, l| {
        bar.set_length(n as u64);
        bar.set_position(s as u64);
        bar.set_message(format!("loss {l:.4}"));
    });
    bar.finish_and_clear();
    let (pm, out, sparsity) = out?;
    let mut r = scored_record(t, data, spec, recipe, prof, run_dir, &pm, out, total)?;
    r.squarehead = Some(report::SquareheadFigures {
        sparsity,
        teacher_accuracy: tch.accuracy,
        teacher_train_seconds: tch.train_seconds,
    });
    Ok(r)
}

/// `model` with `spec`'s adapter as `"default"` (the head trained in full), calibrated on
/// [`calibration_batches`] when the method asks for data, in evaluation mode.
fn with_adapter(
    model: Dinov2Classifier,
    spec: &MethodSpec,
    train: &PixelSet,
    recipe: &RecipeConfig,
) -> Result<PeftModel<Dinov2Classifier>> {
    let mut config = spec.config();
    config.set_modules_to_save(vec!["classifier".into()])?;
    let mut pm = PeftModel::wrap(model, recipe.seed);
    if config.needs_calibration() {
        let batches = calibration_batches(train.len(), recipe);
        let mut calib = |m: &Dinov2Classifier, i: usize| -> peft_core::Result<Option<peft_core::Tensor>> {
            let Some(b) = batches.get(i) else { return Ok(None) };
            let x = train.batch(b)?;
            let logits = m.forward(&x, &calibration_ctx(None))?;
            logits.cross_entropy(&train.batch_labels(b), None, 0.0).map(Some)
        };
        pm.add_adapter_calibrated("default", config, &mut calib)?;
    } else {
        pm.add_adapter_boxed("default", config)?;
    }
    pm.set_adapter("default")?;
    Ok(pm)
}

/// The calibration batches of a run: the first [`CALIBRATION_BATCHES`] batches of one epoch shuffled with the
/// run's seed. Not file order: the shipped `index.csv` files list the images class by class, so the first batches
/// would show a sensitivity (SPT) only the first few classes.
fn calibration_batches(n: usize, recipe: &RecipeConfig) -> Vec<Vec<usize>> {
    epoch_batches(n, recipe.batch_size, 1, recipe.seed).into_iter().take(CALIBRATION_BATCHES).collect()
}

/// The few-shot table for one seed: k-shot supports from train800, searches on val200, scores on test.
fn fewshot_runs(
    t: &TaskRef,
    data: &TaskData,
    ftr: &FeatureSet,
    fte: &FeatureSet,
    prof: &VtabProfile,
    seed: u64,
) -> Result<Vec<FewShotRecord>> {
    let n800 = data.train800.min(ftr.len());
    let train800 = ftr.select(&(0..n800).collect::<Vec<_>>());
    let val = ftr.select(&(n800..ftr.len()).collect::<Vec<_>>()).l2_normalized();
    let test = fte.l2_normalized();
    if val.is_empty() {
        bail!("{}: no val200 rows to search hyper-parameters on", t.name);
    }
    let classes = data.classes;
    let mut out = Vec::new();
    let rec = |method: &str, k: usize, acc: f64, val_acc: Option<f64>, hyper: &[(&str, f64)]| FewShotRecord {
        task: t.name.clone(),
        method: method.into(),
        shots: k,
        seed,
        accuracy: acc,
        val_accuracy: val_acc,
        hyper: hyper.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    };
    for k in SHOTS {
        let t0 = Instant::now();
        let pick = few_shot_indices(&train800.labels, classes, k, seed)?;
        let raw = train800.select(&pick);
        let sup = raw.l2_normalized();
        let prior = PrototypePrior::new(&sup, classes)?;
        // Linear probe on the k-shot features: the run's recipe with enough epochs for ~100 steps.
        let epochs = (100 * prof.recipe.batch_size).div_ceil(raw.len().max(1)).clamp(10, 300);
        let rcfg = RecipeConfig { epochs, lr: 1e-2, seed, ..prof.recipe.clone() };
        let probe = LinearProbe::fit(&raw, classes, &rcfg, &mut |_, _, _| {})?;
        out.push(rec(LINEAR, k, probe.accuracy(fte)?, None, &[("epochs", epochs as f64)]));
        let zs = TipAdapter { alpha: 0.0, ..TipAdapter::new(&sup, classes) };
        out.push(rec("prototype (zero-shot stand-in)", k, zs.accuracy(&test, &prior)?, None, &[]));
        let mut gda = Gda::fit(&sup, classes)?;
        let v = gda.search(&val, &prior)?;
        out.push(rec("gda", k, gda.accuracy(&test, &prior)?, Some(v), &[("alpha", f64::from(gda.alpha))]));
        let mut tip = TipAdapter::new(&sup, classes);
        let v = tip.search(&val, &prior, 7.0, 3.0)?;
        let hyper = [("alpha", f64::from(tip.alpha)), ("beta", f64::from(tip.beta))];
        out.push(rec("tip-adapter", k, tip.accuracy(&test, &prior)?, Some(v), &hyper));
        let mut tipf = tip.clone();
        tipf.fine_tune(&sup, &prior, 20, 32, 1e-3, seed)?;
        let vf = tipf.search(&val, &prior, 7.0, 3.0)?;
        let hyper = [("alpha", f64::from(tipf.alpha)), ("beta", f64::from(tipf.beta))];
        out.push(rec("tip-adapter-f", k, tipf.accuracy(&test, &prior)?, Some(vf), &hyper));
        let mut tipx = TipX::new(&sup, classes);
        let v = tipx.search(&val, &prior)?;
        let hyper = [
            ("alpha", f64::from(tipx.tip.alpha)),
            ("beta", f64::from(tipx.tip.beta)),
            ("gamma", f64::from(tipx.gamma)),
        ];
        out.push(rec("tip-x", k, tipx.accuracy(&test, &prior)?, Some(v), &hyper));
        eprintln!("{} / few-shot {k} / seed {seed}: {:.1} s", t.name, t0.elapsed().as_secs_f64());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> BenchArgs {
        use clap::Parser;
        let mut v = vec!["xtask", "bench", "--suite", "vtab"];
        v.extend_from_slice(extra);
        let crate::cli::Cmd::Bench(b) = crate::cli::Cli::try_parse_from(v).unwrap().cmd else { panic!("not bench") };
        b
    }

    #[test]
    fn profiles_and_overrides() {
        let p = profile(&args(&[]));
        assert_eq!((p.name.as_str(), p.resolution, p.recipe.epochs, p.test_examples), ("default", 56, 3, None));
        assert_eq!(p.tasks, ["cifar10", "fashion-mnist"]);
        let p = profile(&args(&["--full"]));
        assert_eq!((p.resolution, p.recipe.epochs, p.recipe.batch_size), (224, 100, 64));
        let p = profile(&args(&["--resolution", "112", "--epochs", "5"]));
        assert_eq!((p.name.as_str(), p.resolution, p.recipe.epochs), ("default-r112-e5", 112, 5));
    }

    #[test]
    fn every_default_method_resolves() {
        let names: Vec<String> = DEFAULT_METHODS.iter().filter(|n| **n != LINEAR).map(|s| s.to_string()).collect();
        let got = resolve_methods(&names, registry(6)).unwrap();
        assert_eq!(got.len(), 5);
        assert_eq!(peft_core::adapter::duplicate_name(&registry(6)), None);
    }

    #[test]
    fn calibration_batches_mix_the_classes_of_a_class_sorted_split() {
        // 1,000 images listed class by class (100 per class), as the shipped index.csv files are.
        let labels: Vec<usize> = (0..1000).map(|i| i / 100).collect();
        let recipe = RecipeConfig { batch_size: 32, seed: 3, ..RecipeConfig::paper() };
        let b = calibration_batches(labels.len(), &recipe);
        assert_eq!(b.len(), CALIBRATION_BATCHES);
        assert!(b.iter().all(|x| x.len() == 32));
        let mut seen: Vec<usize> = b.iter().flatten().map(|&i| labels[i]).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 10, "every class is in the calibration batches");
        assert_eq!(b, calibration_batches(labels.len(), &recipe), "seeded");
    }

    /// A 2-layer DINOv2 config (hidden 16, 4 heads, 8 px images) and 16 images of two classes (bright, dark).
    fn tiny_task() -> (Dinov2Config, PixelSet) {
        let dcfg = Dinov2Config {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 8,
            patch_size: 4,
            use_mask_token: false,
            ..Dinov2Config::default()
        };
        let ims: Vec<ndarray::ArrayD<f32>> = (0..16)
            .map(|i| {
                let v = if i % 2 == 1 { 1.0 } else { -1.0 };
                ndarray::ArrayD::from_elem(ndarray::IxDyn(&[3, 8, 8]), v) + (i as f32) * 0.01
            })
            .collect();
        (dcfg, PixelSet::from_arrays(&ims, (0..16).map(|i| i % 2).collect()).unwrap())
    }

    /// SquareHead in this suite: the teacher is trained once per task and seed (the second student reuses it), the
    /// student starts from the teacher, reaches the method's sparsity on the encoder matrices (pruning ends at two
    /// thirds of the steps) and the record carries the teacher's accuracy.
    #[test]
    fn squarehead_distils_a_pruned_student_from_a_shared_teacher() {
        let (dcfg, set) = tiny_task();
        let recipe = RecipeConfig { epochs: 3, batch_size: 4, lr: 1e-3, ..RecipeConfig::paper() };
        let reg = registry(dcfg.num_attention_heads);
        let full = reg.iter().find(|m| m.name == peft_core::adapter::FULL).unwrap();
        let fresh = || -> Result<Dinov2Classifier> {
            let b = Dinov2::load(&dcfg, &peft_core::nn::RandomInit::new(3, 0.3))?;
            Ok(Dinov2Classifier::new(b, 2, HeadInput::ClsAndPatchMean, 0)?)
        };
        let mut teachers = squarehead::Teachers::new();
        for (name, want) in [("squarehead-50", 0.5), ("squarehead-90", 0.9)] {
            let spec = reg.iter().find(|m| m.name.0 == name).unwrap();
            let sq = spec.config.as_any().downcast_ref::<SquareheadConfig>().unwrap();
            let tch = squarehead::teacher(&mut teachers, "toy", full, 1e-3, &recipe, &set, &set, &fresh).unwrap();
            let tmodel = squarehead::teacher_model(tch, fresh).unwrap();
            let (pm, out, sparsity) =
                squarehead::student(spec, sq, tch, &tmodel, &fresh, &set, &recipe, &mut |_, _, _| {}).unwrap();
            assert_eq!(out.steps, 12, "{name}");
            assert!((sparsity - want).abs() < 0.01, "{name}: sparsity {sparsity}");
            assert!(out.losses.iter().all(|l| l.1.is_finite()), "{name}");
            assert!((0.0..=1.0).contains(&evaluate(&pm, &set, 8).unwrap()));
            // The teacher is frozen and untouched by the student's training.
            for p in named_params(&tmodel) {
                assert!(!p.trainable(), "{}", p.name());
            }
        }
        assert_eq!(teachers.len(), 1, "one teacher per task and seed");
    }

    /// Every sparse method of the bench registry, as this suite builds it, finds its targets in a DINOv2 (its
    /// regexes cover DINOv2's names; S²FT gets the backbone's head count; SPT gets calibration batches), trains
    /// through the harness and reports optimizer state.
    #[test]
    fn sparse_methods_build_and_train_on_a_tiny_dinov2() {
        let (dcfg, set) = tiny_task();
        let recipe = RecipeConfig { epochs: 2, batch_size: 4, lr: 1e-3, ..RecipeConfig::paper() };
        let sparse = ["sparse-ft", "lt-sft", "spiel", "sara", "spt", "s2ft", "mosa", "r-amt"];
        let names: Vec<String> = sparse.iter().map(|s| s.to_string()).collect();
        for spec in resolve_methods(&names, registry(dcfg.num_attention_heads)).unwrap() {
            let b = Dinov2::load(&dcfg, &peft_core::nn::RandomInit::new(3, 0.3)).unwrap();
            let m = Dinov2Classifier::new(b, 2, HeadInput::ClsAndPatchMean, 0).unwrap();
            let pm = with_adapter(m, &spec, &set, &recipe).unwrap_or_else(|e| panic!("{}: {e:#}", spec.name));
            let tp = pm.trainable_params();
            let head: u64 = tp.iter().filter(|p| p.name().contains("classifier")).map(|p| p.numel() as u64).sum();
            let trainable: u64 = tp.iter().map(|p| p.numel() as u64).sum();
            let own = pm.tuner("default").map_or(0, |t| t.state_bytes());
            assert!(trainable > head || own > 0, "{}: nothing beyond the head trains", spec.name);
            let out = finetune(&pm, &set, &recipe, &mut |_, _, _| {}).unwrap();
            assert_eq!(out.steps, 8, "{}", spec.name);
            assert!(out.optimizer_state_bytes > 0, "{}", spec.name);
            let acc = evaluate(&pm, &set, 8).unwrap();
            assert!((0.0..=1.0).contains(&acc), "{}", spec.name);
        }
    }
}
