//! `cargo xtask bench --suite audio`: spoken-digit classification on FSDD with the Whisper tiny.en encoder
//! (1 s log-mel windows, frame-mean pooling, linear head) under the PETL-AST method set of `peft_audio::methods`,
//! on two protocols: the shipped split (takes 5-49 train / 0-4 test, speakers shared) and a speaker hold-out
//! (every clip of one speaker is test data, the other five speakers train). Same output shape as the GLUE suite:
//! `target/bench/audio/<profile>/{results.json, report.md, *.png, adapters/}`.

mod plot;
mod report;

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::{Array3, Axis};
use peft_audio::dataset::{ClipSet, Partition};
use peft_audio::encoder::AudioClassifier;
use peft_audio::features::{FrontEnd, SpecAugment};
use peft_core::adapter::{duplicate_name, MethodSpec, PeftModel};
use peft_core::nn::{named_params, Ctx};
use peft_core::train::{Loss, TrainError, Trainer};
use peft_core::{no_grad, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::assets::{self, Need};
use crate::bench::{subsample, workspace_root};
use crate::cli::BenchArgs;
use crate::report::{Machine, Record, Results};
use crate::train::{peak_rss_bytes, progress_bar, reset_peak_rss, TrainConfig};

/// Asset-relative model folder.
pub const MODEL_DIR: &str = "models/whisper-tiny.en-encoder";
/// Asset-relative data folder.
pub const DATA_DIR: &str = "data/fsdd";
/// The speaker held out by the `fsdd-speaker` protocol (the alphabetically first of the six).
pub const HELD_OUT_SPEAKER: &str = "george";
/// Window length fed to the encoder (100 mel frames, 50 positions; 99.3% of FSDD clips are shorter).
pub const WINDOW_SECONDS: f64 = 1.0;

/// An evaluation protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AudioTask {
    /// The shipped split.
    Fsdd,
    /// Speaker hold-out.
    FsddSpeaker,
}

impl AudioTask {
    /// Both, in table order.
    pub const ALL: [AudioTask; 2] = [AudioTask::Fsdd, AudioTask::FsddSpeaker];

    /// Name in results.json and `--tasks`.
    pub fn name(self) -> &'static str {
        match self {
            AudioTask::Fsdd => "fsdd",
            AudioTask::FsddSpeaker => "fsdd-speaker",
        }
    }

    /// Column header.
    pub fn display(self) -> String {
        match self {
            AudioTask::Fsdd => "FSDD shipped split".into(),
            AudioTask::FsddSpeaker => format!("FSDD speaker `{HELD_OUT_SPEAKER}` held out"),
        }
    }

    /// Parses a `--tasks` entry.
    ///
    /// # Errors
    /// Unknown names.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s.trim())
            .with_context(|| format!("unknown audio task `{s}` (fsdd, fsdd-speaker)"))
    }

    fn partition(self, set: &ClipSet) -> Result<Partition> {
        Ok(match self {
            AudioTask::Fsdd => set.shipped("train", "test")?,
            AudioTask::FsddSpeaker => set.hold_out(&[HELD_OUT_SPEAKER])?,
        })
    }
}

/// A named recipe.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Run-folder name.
    pub name: String,
    /// Tasks when `--tasks` is absent.
    pub tasks: Vec<AudioTask>,
    /// Methods when `--methods` is absent.
    pub methods: Vec<&'static str>,
    /// Methods run on the speaker hold-out when `--methods` is absent (a subset, to keep the default run short).
    pub speaker_methods: Vec<&'static str>,
    /// Training recipe (`max_len` holds the window's mel frames).
    pub cfg: TrainConfig,
}

/// Every method the suite can run: the PETL-AST set and the budget sweep.
pub fn registry() -> Vec<MethodSpec> {
    let mut v = peft_audio::methods();
    v.extend(peft_audio::methods::budget_sweep());
    v
}

/// The default method list (every PETL-AST method).
pub const DEFAULT_METHODS: [&str; 11] = [
    "linear",
    "full",
    "bitfit",
    "lora",
    "pfeiffer",
    "houlsby",
    "pfeiffer-par",
    "houlsby-par",
    "prompt",
    "prefix",
    "conformer",
];

/// The methods the default profile also runs on the speaker hold-out.
pub const SPEAKER_METHODS: [&str; 4] = ["linear", "full", "lora", "conformer"];

/// The profile for `args`.
///
/// The default is sized for the 15-minute budget on a shared 2-core machine: 400 training clips (a fixed random
/// subset of the 2,700 / 2,500), one epoch at batch 16 (25 steps), every PETL-AST method on the shipped split and
/// linear / full / LoRA / Conformer on the speaker hold-out; `--full` trains on every training clip for 3 epochs
/// with every method on both protocols.
pub fn profile(args: &BenchArgs, frames: usize) -> Profile {
    let base = TrainConfig {
        epochs: 1,
        batch_size: 16,
        lr: 0.0,
        warmup_frac: 0.06,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        train_examples: Some(400),
        max_len: frames,
    };
    let mut p = if args.quick {
        Profile {
            name: "quick".into(),
            tasks: vec![AudioTask::Fsdd],
            methods: vec!["linear", "lora"],
            speaker_methods: vec!["linear"],
            cfg: TrainConfig { train_examples: Some(160), ..base },
        }
    } else if args.full {
        Profile {
            name: "full".into(),
            tasks: AudioTask::ALL.to_vec(),
            methods: DEFAULT_METHODS.to_vec(),
            speaker_methods: DEFAULT_METHODS.to_vec(),
            cfg: TrainConfig { epochs: 3, train_examples: None, ..base },
        }
    } else {
        Profile {
            name: "default".into(),
            tasks: AudioTask::ALL.to_vec(),
            methods: DEFAULT_METHODS.to_vec(),
            speaker_methods: SPEAKER_METHODS.to_vec(),
            cfg: base,
        }
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
    p
}

fn resolve(names: &[String]) -> Result<Vec<MethodSpec>> {
    let reg = registry();
    if let Some(d) = duplicate_name(&reg) {
        bail!("xtask bug: two audio methods are named `{d}`");
    }
    let mut out: Vec<MethodSpec> = Vec::new();
    for n in names {
        if out.iter().any(|m| m.name.0 == n) {
            bail!("method `{n}` is listed twice");
        }
        match reg.iter().find(|m| m.name.0 == n) {
            Some(m) => out.push(m.clone()),
            None => bail!(
                "method `{n}` is not an audio method (known: {})",
                reg.iter().map(|m| m.name.0).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    Ok(out)
}

fn needs() -> Vec<Need> {
    const M: &str = "the asset pack's Whisper tiny.en encoder (see <assets>/README.md)";
    const D: &str = "the Free Spoken Digit Dataset with the pack's split.csv (see <assets>/data/fsdd/README.md)";
    let mut v: Vec<Need> = ["config.json", "model.safetensors", "mel_filters.safetensors"]
        .iter()
        .map(|f| Need { rel: format!("{MODEL_DIR}/{f}"), source: M })
        .collect();
    v.push(Need { rel: format!("{DATA_DIR}/split.csv"), source: D });
    v
}

/// `cargo xtask assets --suite audio`: exit 0 when every file is present, 2 (with the list) otherwise.
pub fn assets_check() -> std::process::ExitCode {
    match assets::check(&needs()) {
        Ok(dir) => {
            println!("all audio-suite assets present in {}", dir.display());
            std::process::ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("{msg}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Features and labels of one side of a partition.
struct Split {
    feats: Array3<f32>,
    labels: Vec<usize>,
}

impl Split {
    fn of(all: &Array3<f32>, labels: &[usize], idx: &[usize]) -> Split {
        Split { feats: all.select(Axis(0), idx), labels: idx.iter().map(|&i| labels[i]).collect() }
    }
    fn batch(&self, idx: &[usize], aug: Option<(&SpecAugment, &mut StdRng)>) -> Tensor {
        let mut b = self.feats.select(Axis(0), idx);
        if let Some((a, rng)) = aug {
            for mut s in b.outer_iter_mut() {
                let mut m = s.to_owned();
                a.apply(&mut m, rng);
                s.assign(&m);
            }
        }
        Tensor::new(b.into_dyn())
    }
}

/// Runs the audio suite; returns the exit code.
///
/// # Errors
/// Anything that stops the bench.
pub fn run(args: &BenchArgs) -> Result<std::process::ExitCode> {
    let wall = Instant::now();
    let adir = match assets::check(&needs()) {
        Ok(d) => d,
        Err(msg) => {
            eprintln!("cargo xtask bench --suite audio: assets are missing, nothing was run.\n{msg}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    let (model_dir, data_dir) = (adir.join(MODEL_DIR), adir.join(DATA_DIR));
    let fe = FrontEnd::load(&model_dir, WINDOW_SECONDS)?;
    let prof = profile(args, fe.frames());
    let tasks: Vec<AudioTask> = match &args.tasks {
        Some(ts) => ts.iter().map(|t| AudioTask::parse(t)).collect::<Result<_>>()?,
        None => prof.tasks.clone(),
    };
    let names: Vec<String> =
        args.methods.clone().unwrap_or_else(|| prof.methods.iter().map(|s| s.to_string()).collect());
    let methods = resolve(&names)?;
    let set = ClipSet::fsdd(&data_dir)?;
    drop(AudioClassifier::load(&model_dir, set.num_classes(), fe.frames(), 0)?);
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let out_root = args.out.clone().unwrap_or_else(|| workspace_root().join("target/bench"));
    let run_dir = out_root.join("audio").join(&prof.name);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let results_path = run_dir.join("results.json");
    let mut res = Results::load(&results_path)?;
    res.profile = prof.name.clone();
    res.machine = Machine::detect(threads);
    eprintln!(
        "bench audio/{}: tasks {:?}, methods {:?}, seeds {}..{}, {} threads -> {}",
        prof.name,
        tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        names,
        args.seed,
        args.seed + args.seeds,
        threads,
        run_dir.display()
    );
    let t_feat = Instant::now();
    let paths: Vec<&Path> = set.clips.iter().map(|c| c.path.as_path()).collect();
    let all = fe.features_of_files(&paths)?;
    let labels = set.labels(&(0..set.clips.len()).collect::<Vec<_>>());
    eprintln!(
        "features: {} clips -> [{}, {}] log-mel each in {:.1} s",
        set.clips.len(),
        fe.n_mels(),
        fe.frames(),
        t_feat.elapsed().as_secs_f64()
    );
    let mut failures = Vec::new();
    for &task in &tasks {
        let part = task.partition(&set)?;
        let sub = subsample(part.train.len(), prof.cfg.train_examples);
        let train_idx: Vec<usize> = sub.iter().map(|&i| part.train[i]).collect();
        let train = Split::of(&all, &labels, &train_idx);
        let test = Split::of(&all, &labels, &part.test);
        for spec in &methods {
            if task == AudioTask::FsddSpeaker && args.methods.is_none() && !prof.speaker_methods.contains(&spec.name.0)
            {
                continue;
            }
            for seed in args.seed..args.seed + args.seeds {
                let m = spec.clone().with_seed(seed);
                let cfg = TrainConfig { lr: args.lr.unwrap_or(m.lr), ..prof.cfg.clone() };
                if !args.force && res.find(task.name(), m.name.0, seed, &cfg).is_some() {
                    eprintln!(
                        "{} / {} / seed {seed}: done already (in results.json; --force re-runs)",
                        task.name(),
                        m.name
                    );
                    continue;
                }
                match one_run(task, &m, &cfg, &model_dir, &run_dir, set.num_classes(), &train, &test) {
                    Ok(rec) => {
                        eprintln!(
                            "{} / {} / seed {seed}: acc {:.4}  {:.1} clips/s train, {:.0} s",
                            task.name(),
                            m.name,
                            rec.metrics["acc"],
                            rec.samples_per_sec,
                            rec.train_seconds
                        );
                        res.upsert(rec);
                        res.save(&results_path)?;
                    }
                    Err(e) => {
                        eprintln!("{} / {} / seed {seed}: FAILED: {e:#}", task.name(), m.name);
                        failures.push(format!("{}/{}/{seed}", task.name(), m.name));
                    }
                }
            }
        }
    }
    res.save(&results_path)?;
    let plots = match plot::write_all(&res, &run_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("warning: plots not written: {e:#}");
            Vec::new()
        }
    };
    let md = report::markdown(&res, &plots, wall.elapsed().as_secs_f64());
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

/// One task x method x seed run.
#[allow(clippy::too_many_arguments)]
fn one_run(
    task: AudioTask,
    method: &MethodSpec,
    cfg: &TrainConfig,
    model_dir: &Path,
    run_dir: &Path,
    classes: usize,
    train: &Split,
    test: &Split,
) -> Result<Record> {
    let seed = method.seed;
    reset_peak_rss();
    let model = AudioClassifier::load(model_dir, classes, cfg.max_len, seed)?;
    let total: u64 = named_params(&model).iter().map(|p| p.numel() as u64).sum();
    let mut config = method.config();
    config.set_modules_to_save(AudioClassifier::HEAD_MODULES.iter().map(|s| s.to_string()).collect())?;
    let mut pm = PeftModel::wrap(model, seed);
    pm.add_adapter_boxed("default", config)?;
    pm.set_adapter("default")?;
    let trainable: u64 = pm.trainable_params().iter().map(|p| p.numel() as u64).sum();
    let bar = progress_bar(format!("{} {} s{seed}", task.name(), method.name));
    let out = train_eval(&pm, cfg, seed, train, test, &bar);
    bar.finish_and_clear();
    let out = out?;
    let adapter_dir = run_dir.join("adapters").join(format!("{}-{}-s{seed}", task.name(), method.name));
    let adapter_bytes = pm.save_pretrained(&adapter_dir)?;
    Ok(Record {
        task: task.name().to_string(),
        method: method.name.to_string(),
        method_desc: method.describe(),
        seed,
        lr: cfg.lr,
        config: cfg.clone(),
        headline: "acc".into(),
        metrics: [("acc".to_string(), out.acc)].into_iter().collect(),
        trainable_params: trainable,
        total_params: total,
        trainable_pct: 100.0 * trainable as f64 / total.max(1) as f64,
        train_seconds: out.train_seconds,
        eval_seconds: out.eval_seconds,
        samples_per_sec: out.clips_per_sec,
        peak_rss_bytes: peak_rss_bytes(),
        adapter_bytes,
        // The trainer's AdamW state plus what the adapter steps itself (sparse methods).
        optimizer_state_bytes: Some(
            out.optimizer_state_bytes + pm.tuner("default").map_or(0, |t| t.state_bytes() as u64),
        ),
        steps: out.steps,
        skipped_steps: out.skipped,
        train_examples: train.labels.len(),
        dev_examples: test.labels.len(),
        losses: out.losses,
        sparse: None,
        quant_base: None,
    })
}

struct Outcome {
    acc: f64,
    losses: Vec<(usize, f64)>,
    train_seconds: f64,
    eval_seconds: f64,
    clips_per_sec: f64,
    steps: usize,
    skipped: usize,
    optimizer_state_bytes: u64,
}

/// Trains the active adapter (AdamW, linear warmup/decay, clipping, the method's hooks) and scores the test set.
fn train_eval(
    pm: &PeftModel<AudioClassifier>,
    cfg: &TrainConfig,
    seed: u64,
    train: &Split,
    test: &Split,
    bar: &indicatif::ProgressBar,
) -> Result<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = train.labels.len();
    let bs = cfg.batch_size.max(1);
    let epochs: Vec<Vec<Vec<usize>>> = (0..cfg.epochs)
        .map(|_| {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rng);
            idx.chunks(bs).map(<[usize]>::to_vec).collect()
        })
        .collect();
    let total: usize = epochs.iter().map(Vec::len).sum();
    let tcfg = cfg.trainer(cfg.lr, total, seed);
    let mut trainer = Trainer::new(pm.trainable_params(), pm, tcfg)?;
    bar.set_length(total as u64);
    let (mut losses, mut run_loss, mut run_n, mut skipped, mut clips) = (Vec::new(), 0.0, 0usize, 0usize, 0usize);
    let log_every = (total / 50).max(1);
    let t0 = Instant::now();
    for idx in epochs.iter().flatten() {
        let x = train.batch(idx, None);
        let y: Vec<i64> = idx.iter().map(|&i| train.labels[i] as i64).collect();
        let report = trainer.step(|ctx| Ok(Loss::Single(pm.logits(&x, ctx)?.cross_entropy(&y, None, 0.0)?)));
        let report = match report {
            Ok(r) => r,
            Err(e @ TrainError::Diverged { .. }) => bail!("{e}"),
            Err(e) => return Err(e).context("training step"),
        };
        if report.skipped {
            skipped += 1;
        } else {
            run_loss += report.loss;
            run_n += 1;
        }
        clips += idx.len();
        let step = trainer.steps_done();
        if (step % log_every == 0 || step == total) && run_n > 0 {
            losses.push((step, run_loss / run_n as f64));
            bar.set_message(format!("loss {:.4}", run_loss / run_n as f64));
            (run_loss, run_n) = (0.0, 0);
        }
        bar.set_position(step as u64);
    }
    let steps = trainer.steps_done();
    let optimizer_state_bytes = peft_sparse::memory::optimizer_state_bytes(trainer.optimizer()) as u64;
    drop(trainer);
    let train_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut correct = 0usize;
    no_grad(|| -> Result<()> {
        let idx: Vec<usize> = (0..test.labels.len()).collect();
        for chunk in idx.chunks(50) {
            let logits = pm.logits(&test.batch(chunk, None), &Ctx::eval())?;
            let c = logits.shape()[1];
            for (row, &i) in logits.as_slice().chunks(c).zip(chunk) {
                let pred = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(j, _)| j);
                correct += usize::from(pred == test.labels[i]);
            }
        }
        Ok(())
    })?;
    Ok(Outcome {
        optimizer_state_bytes,
        acc: correct as f64 / test.labels.len().max(1) as f64,
        losses,
        train_seconds,
        eval_seconds: t1.elapsed().as_secs_f64(),
        clips_per_sec: clips as f64 / train_seconds.max(1e-9),
        steps,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_resolvable() {
        assert_eq!(duplicate_name(&registry()), None);
        let got = resolve(&DEFAULT_METHODS.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        assert_eq!(got.len(), DEFAULT_METHODS.len());
        assert!(resolve(&["head".into()]).unwrap_err().to_string().contains("not an audio method"));
        assert!(resolve(&["lora".into(), "lora".into()]).unwrap_err().to_string().contains("twice"));
        assert_eq!(AudioTask::parse("fsdd-speaker").unwrap(), AudioTask::FsddSpeaker);
        assert!(AudioTask::parse("esc50").is_err());
    }
}
