//! `cargo xtask bench --suite coco`: image-text retrieval on COCO (COCO-mini from the asset pack by default).
//!
//! Frozen towers: DINOv2-small for images (CLS and patch-mean of the last layer, concatenated: 768 values) and
//! all-MiniLM-L6-v2 for captions (masked mean pooling + L2 norm, 384 values). Their features are computed once and
//! cached under `<out>/coco/cache/`. On top, per method (peft-vl's `retrieval`): `untrained` (random frozen
//! projections), `linear` (trainable projections), `vl-adapter` (projections + one bottleneck adapter shared by
//! both modalities) and `adapter-separate` (one adapter per modality), trained with symmetric InfoNCE on the train
//! captions and evaluated by Recall@1/5/10 in both directions on val. Seeds: 3 unless `--seeds N` (N > 1) is given.
//!
//! `PEFT_COCO_ROOT` points the suite at another COCO root in the official layout (`annotations/captions_*.json`,
//! `train2017/`, `val2017/`); `PEFT_COCO_KARPATHY` at a Karpathy split file, whose train (+restval) and test
//! splits then replace train2017/val2017.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::{concatenate, Array2, Axis};
use peft_core::io::{write_safetensors, SafeTensorsFile};
use peft_core::nn::Ctx;
use peft_core::{no_grad, Tensor};
use peft_models::bert::{l2_normalize, mean_pool, BertModel};
use peft_models::image_proc::Preprocess;
use peft_models::tokenizer::TextTokenizer;
use peft_models::vit::Dinov2;
use peft_vl::coco::{Coco, CocoSplit, KarpathySplit};
use peft_vl::retrieval::{self, HeadKind, Recall, RetrievalConfig, RetrievalHeads, TrainConfig};
use serde::Serialize;

use crate::assets::{self, Need};
use crate::bench::workspace_root;
use crate::cli::BenchArgs;
use crate::model::MINILM_DIR;
use crate::report::Machine;

const DINO_DIR: &str = "models/dinov2-small";
const COCO_MINI: &str = "data/coco-mini";
const KS: [usize; 3] = [1, 5, 10];
const METHODS: [&str; 4] = ["untrained", "linear", "vl-adapter", "adapter-separate"];

fn needs() -> Vec<Need> {
    let mut v: Vec<Need> = ["config.json", "model.safetensors", "preprocessor_config.json"]
        .iter()
        .map(|f| Need { rel: format!("{DINO_DIR}/{f}"), source: "the asset pack (models/dinov2-small)" })
        .collect();
    v.extend(
        ["config.json", "model.safetensors", "tokenizer.json"].iter().map(|f| Need {
            rel: format!("{MINILM_DIR}/{f}"),
            source: "the asset pack, or `cargo xtask assets --fetch`",
        }),
    );
    if std::env::var_os("PEFT_COCO_ROOT").is_none() {
        for s in ["train2017", "val2017"] {
            v.push(Need {
                rel: format!("{COCO_MINI}/annotations/captions_{s}.json"),
                source: "the asset pack (data/coco-mini), or set PEFT_COCO_ROOT to a COCO root",
            });
        }
    }
    v
}

/// The recipe of a profile.
#[derive(Clone, Copy, Debug, Serialize)]
struct Recipe {
    epochs: usize,
    batch_size: usize,
    lr: f64,
    weight_decay: f64,
    joint_dim: usize,
    bottleneck: usize,
    temperature: f64,
}

fn recipe(args: &BenchArgs) -> (String, Recipe) {
    let base = Recipe {
        epochs: 60,
        batch_size: 32,
        lr: 1e-3,
        weight_decay: 0.01,
        joint_dim: 256,
        bottleneck: 64,
        temperature: 0.05,
    };
    let (mut name, mut r) = if args.quick {
        ("quick".to_string(), Recipe { epochs: 10, ..base })
    } else if args.full {
        ("full".to_string(), Recipe { epochs: 200, ..base })
    } else {
        ("default".to_string(), base)
    };
    if let Some(e) = args.epochs {
        r.epochs = e;
        name = format!("{name}-e{e}");
    }
    if let Some(lr) = args.lr {
        r.lr = lr;
        name = format!("{name}-lr{lr:e}");
    }
    (name, r)
}

fn kind(method: &str, bottleneck: usize) -> Result<HeadKind> {
    Ok(match method {
        "untrained" => HeadKind::Untrained,
        "linear" => HeadKind::Linear,
        "vl-adapter" => HeadKind::Adapter { bottleneck, shared: true },
        "adapter-separate" => HeadKind::Adapter { bottleneck, shared: false },
        other => bail!("method `{other}` is not a coco retrieval method (known: {})", METHODS.join(", ")),
    })
}

/// One method x seed.
#[derive(Clone, Debug, Serialize)]
struct RunRecord {
    method: String,
    seed: u64,
    trainable_params: usize,
    recall: Recall,
    train_seconds: f64,
    train_pairs_per_second: f64,
    first_loss: Option<f32>,
    last_loss: Option<f32>,
}

#[derive(Serialize)]
struct Report {
    suite: &'static str,
    profile: String,
    data: String,
    train_images: usize,
    train_captions: usize,
    val_images: usize,
    val_captions: usize,
    recipe: Recipe,
    machine: Machine,
    feature_seconds: f64,
    features_cached: bool,
    wall_seconds: f64,
    peak_rss_mib: Option<f64>,
    runs: Vec<RunRecord>,
}

fn load_data() -> Result<(String, CocoSplit, CocoSplit)> {
    let (root, label) = match std::env::var_os("PEFT_COCO_ROOT") {
        Some(r) => (PathBuf::from(r), "PEFT_COCO_ROOT"),
        None => {
            let dir = peft_core::io::assets::assets_dir().context("no asset directory")?;
            (dir.join(COCO_MINI), "COCO-mini")
        }
    };
    let coco = Coco::load(&root).with_context(|| format!("reading COCO at {}", root.display()))?;
    if let Some(k) = std::env::var_os("PEFT_COCO_KARPATHY") {
        let ks = KarpathySplit::load(&k)?;
        let s = coco.karpathy(&ks);
        eprintln!(
            "Karpathy split: {} train / {} test images ({} entries not in this root)",
            s.train.images.len(),
            s.test.images.len(),
            s.missing
        );
        return Ok((format!("{label} {} (Karpathy split)", root.display()), s.train, s.test));
    }
    Ok((format!("{label} {}", root.display()), coco.train, coco.val))
}

/// Cached tower features of one split: images `[N, 768]`, captions `[M, 384]`.
fn features(
    split: &CocoSplit,
    adir: &Path,
    cache_dir: &Path,
    dino: &mut Option<Dinov2>,
    bert: &mut Option<(BertModel, TextTokenizer)>,
) -> Result<(Array2<f32>, Array2<f32>, bool)> {
    let (texts, _) = split.caption_pairs();
    let paths = split.image_paths();
    // The cache key: the split's images and captions and the two model files' sizes.
    let mut key = String::new();
    for p in &paths {
        writeln!(key, "{}", p.display())?;
    }
    for t in &texts {
        writeln!(key, "{t}")?;
    }
    for m in [DINO_DIR, MINILM_DIR] {
        let len = std::fs::metadata(adir.join(m).join("model.safetensors")).map(|m| m.len()).unwrap_or(0);
        writeln!(key, "{m} {len}")?;
    }
    let hash = fnv(&key);
    let file = cache_dir.join(format!("{}-{hash:016x}.safetensors", split.name));
    if file.is_file() {
        let f = SafeTensorsFile::open(&file)?;
        let img = f.get("image")?.into_dimensionality()?;
        let txt = f.get("text")?.into_dimensionality()?;
        return Ok((img, txt, true));
    }
    let ctx = Ctx::eval();
    if dino.is_none() {
        *dino = Some(match peft_models::registry::load(adir.join(DINO_DIR))? {
            peft_models::registry::Model::Dinov2(m) => m,
            _ => bail!("{DINO_DIR} is not a DINOv2 folder"),
        });
    }
    let d = dino.as_ref().context("dinov2")?;
    let pre = Preprocess::from_json(adir.join(DINO_DIR).join("preprocessor_config.json"))?;
    let mut img_rows = Vec::new();
    for chunk in paths.chunks(8) {
        let x = pre.load_batch(chunk)?;
        let o = no_grad(|| d.forward(&x, &ctx))?;
        let c = to2(&o.cls)?;
        let m = to2(&o.patch_mean)?;
        img_rows.push(concatenate(Axis(1), &[c.view(), m.view()])?);
    }
    if bert.is_none() {
        let dir = adir.join(MINILM_DIR);
        let m = BertModel::load(&dir)?;
        let mut tok = TextTokenizer::from_file(dir.join("tokenizer.json"))?;
        tok.set_max_length(Some(m.cfg.max_position_embeddings))?;
        *bert = Some((m, tok));
    }
    let (m, tok) = bert.as_ref().context("minilm")?;
    let mut txt_rows = Vec::new();
    for chunk in texts.chunks(64) {
        let b = tok.batch(chunk)?;
        let e = no_grad(|| -> peft_core::Result<Tensor> {
            l2_normalize(&mean_pool(&m.forward(&b, &ctx)?, &b.attention_mask)?)
        })?;
        txt_rows.push(to2(&e)?);
    }
    let img = concatenate(Axis(0), &img_rows.iter().map(|a| a.view()).collect::<Vec<_>>())?;
    let txt = concatenate(Axis(0), &txt_rows.iter().map(|a| a.view()).collect::<Vec<_>>())?;
    std::fs::create_dir_all(cache_dir)?;
    let meta: BTreeMap<String, String> = [("key".to_string(), format!("{hash:016x}"))].into();
    write_safetensors(&file, [("image", &img.clone().into_dyn()), ("text", &txt.clone().into_dyn())], Some(&meta))?;
    Ok((img, txt, false))
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn to2(t: &Tensor) -> Result<Array2<f32>> {
    Ok(t.data().to_owned().into_dimensionality()?)
}

/// Runs the suite.
///
/// # Errors
/// Anything that stops it (printed by `main`).
pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    let wall = Instant::now();
    let adir = match assets::check(&needs()) {
        Ok(d) => d,
        Err(msg) => {
            eprintln!("cargo xtask bench --suite coco: assets are missing, nothing was run.\n{msg}");
            return Ok(ExitCode::from(2));
        }
    };
    let methods: Vec<String> = args.methods.clone().unwrap_or_else(|| METHODS.iter().map(|s| s.to_string()).collect());
    let (profile, r) = recipe(args);
    for m in &methods {
        kind(m, r.bottleneck)?;
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let seeds = if args.seeds > 1 { args.seeds } else { 3 };
    let (data, train, val) = load_data()?;
    let out_root = args.out.clone().unwrap_or_else(|| workspace_root().join("target/bench"));
    let run_dir = out_root.join("coco").join(&profile);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    eprintln!(
        "bench coco/{profile}: {data}: {} train images / {} captions, {} val images / {} captions; methods {methods:?}, seeds {}..{}, {threads} threads",
        train.images.len(),
        train.num_captions(),
        val.images.len(),
        val.num_captions(),
        args.seed,
        args.seed + seeds
    );
    let t0 = Instant::now();
    let cache = out_root.join("coco").join("cache");
    let (mut dino, mut bert) = (None, None);
    let (tri, trt, c1) = features(&train, &adir, &cache, &mut dino, &mut bert)?;
    let (vi, vt, c2) = features(&val, &adir, &cache, &mut dino, &mut bert)?;
    drop((dino, bert));
    let feature_seconds = t0.elapsed().as_secs_f64();
    eprintln!("features: {:.1} s ({})", feature_seconds, if c1 && c2 { "cached" } else { "computed" });
    let (_, tr_owner) = train.caption_pairs();
    let (_, val_owner) = val.caption_pairs();
    let mut runs = Vec::new();
    for m in &methods {
        for seed in args.seed..args.seed + seeds {
            let cfg = RetrievalConfig {
                image_dim: tri.ncols(),
                text_dim: trt.ncols(),
                joint_dim: r.joint_dim,
                kind: kind(m, r.bottleneck)?,
                temperature: r.temperature,
            };
            let heads = RetrievalHeads::new(cfg, seed)?;
            let t = Instant::now();
            let losses = if cfg.kind == HeadKind::Untrained {
                Vec::new()
            } else {
                let tc = TrainConfig {
                    epochs: r.epochs,
                    batch_size: r.batch_size,
                    lr: r.lr,
                    weight_decay: r.weight_decay,
                    seed,
                };
                retrieval::train(&heads, &tri, &trt, &tr_owner, &tc)?
            };
            let train_seconds = t.elapsed().as_secs_f64();
            let sim = retrieval::similarity(&heads.embed_images(&vi)?, &heads.embed_texts(&vt)?);
            let recall = retrieval::recall_at_k(&sim, &val_owner, &KS)?;
            let pairs = (r.epochs * tri.nrows()) as f64;
            eprintln!(
                "  {m:<17} seed {seed}: i2t R@1/5/10 {:.1}/{:.1}/{:.1}  t2i {:.1}/{:.1}/{:.1}  ({train_seconds:.1} s)",
                100.0 * recall.i2t[0],
                100.0 * recall.i2t[1],
                100.0 * recall.i2t[2],
                100.0 * recall.t2i[0],
                100.0 * recall.t2i[1],
                100.0 * recall.t2i[2]
            );
            runs.push(RunRecord {
                method: m.clone(),
                seed,
                trainable_params: heads.num_trainable(),
                recall,
                train_seconds,
                train_pairs_per_second: if losses.is_empty() { 0.0 } else { pairs / train_seconds.max(1e-9) },
                first_loss: losses.first().copied(),
                last_loss: losses.last().copied(),
            });
        }
    }
    let report = Report {
        suite: "coco",
        profile: profile.clone(),
        data,
        train_images: train.images.len(),
        train_captions: train.num_captions(),
        val_images: val.images.len(),
        val_captions: val.num_captions(),
        recipe: r,
        machine: Machine::detect(threads),
        feature_seconds,
        features_cached: c1 && c2,
        wall_seconds: wall.elapsed().as_secs_f64(),
        peak_rss_mib: crate::train::peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        runs,
    };
    std::fs::write(run_dir.join("results.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(run_dir.join("report.md"), markdown(&report, &methods))?;
    eprintln!("wrote {} ({:.0} s)", run_dir.join("report.md").display(), report.wall_seconds);
    Ok(ExitCode::SUCCESS)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, var.sqrt())
}

fn markdown(r: &Report, methods: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# COCO image-text retrieval ({})\n", r.profile);
    let _ = writeln!(
        s,
        "**Small-sample warning**: {} has {} val images / {} captions; a single image moves i2t R@1 by {:.1} \
         points and the spread between seeds below is of the same order as many differences between methods. \
         These numbers check that the pipeline works; they are not comparable to COCO 5k results.\n",
        r.data,
        r.val_images,
        r.val_captions,
        100.0 / r.val_images.max(1) as f64
    );
    let _ = writeln!(
        s,
        "Frozen towers: DINOv2-small (CLS ‖ patch-mean, 768) and all-MiniLM-L6-v2 (mean pool, 384); features \
         {} in {:.1} s. Trained: symmetric InfoNCE (τ = {}), {} epochs over {} train images ({} captions), batch {}, \
         AdamW lr {} wd {}, joint dim {}, adapter bottleneck {}. Mean ± sample std over {} seeds; Recall in %.\n",
        if r.features_cached { "read from the cache" } else { "computed" },
        r.feature_seconds,
        r.recipe.temperature,
        r.recipe.epochs,
        r.train_images,
        r.train_captions,
        r.recipe.batch_size,
        r.recipe.lr,
        r.recipe.weight_decay,
        r.recipe.joint_dim,
        r.recipe.bottleneck,
        r.runs.iter().filter(|x| Some(&x.method) == methods.first()).count()
    );
    let _ = writeln!(
        s,
        "| method | trainable | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | train s | pairs/s |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in methods {
        let rs: Vec<&RunRecord> = r.runs.iter().filter(|x| &x.method == m).collect();
        if rs.is_empty() {
            continue;
        }
        let _ = write!(s, "| {m} | {} |", rs[0].trainable_params);
        for dir in 0..2 {
            for k in 0..KS.len() {
                let v: Vec<f64> =
                    rs.iter().map(|x| 100.0 * if dir == 0 { x.recall.i2t[k] } else { x.recall.t2i[k] }).collect();
                let (mu, sd) = mean_std(&v);
                let _ = write!(s, " {mu:.1} ± {sd:.1} |");
            }
        }
        let (ts, _) = mean_std(&rs.iter().map(|x| x.train_seconds).collect::<Vec<_>>());
        let (ps, _) = mean_std(&rs.iter().map(|x| x.train_pairs_per_second).collect::<Vec<_>>());
        let _ = writeln!(s, " {ts:.1} | {ps:.0} |");
    }
    let chance_i2t = 100.0 * 5.0 / r.val_captions.max(1) as f64;
    let chance_t2i = 100.0 / r.val_images.max(1) as f64;
    let _ =
        writeln!(s, "\nChance R@1: i2t ≈ {chance_i2t:.1} (5 captions of {}), t2i = {chance_t2i:.1}.\n", r.val_captions);
    let _ = writeln!(
        s,
        "Machine: {} ({} cores, {} threads), commit {}. Wall time of the whole run: {:.1} s; peak RSS {}.",
        r.machine.cpu,
        r.machine.cores,
        r.machine.threads,
        r.machine.git_commit,
        r.wall_seconds,
        r.peak_rss_mib.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
    );
    s
}
