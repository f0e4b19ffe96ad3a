//! `cargo xtask language-sft`: LT-SFT's composition recipe with a **language** SFT trained by masked language
//! modelling, on one GLUE task.
//!
//! 1. Δ_lang: LT-SFT (full phase, top-k by |θ − θ⁰| at the task bench's density, reset, sparse phase) on the
//!    encoder weights with MLM ([`crate::mlm`]) on the sentences of an unlabelled split of the task (GLUE's test
//!    split by default: in-domain text no run trains or scores on). The asset pack holds English only, so this is
//!    a *domain* SFT standing in for the paper's target-language SFT; the recipe is the same.
//! 2. Per seed, two LT-SFT task deltas with the GLUE bench's recipe (`lt-sft`, default profile): one trained on
//!    the plain model, one trained with Δ_lang added to the base weights (the paper trains the task SFT on top of
//!    the source language's SFT).
//! 3. Dev scores of each task delta alone and with Δ_lang added, and Δ_lang's own held-out MLM loss and
//!    masked-token accuracy with the delta on and off.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use peft_core::adapter::PeftModel;
use peft_core::nn::{named_params, Ctx};
use peft_core::train::{Loss, Trainer};
use peft_models::bert::BertModel;
use peft_sparse::compose::SparseDiff;
use peft_sparse::{LtSftConfig, SparseTuner, ENCODER_WEIGHTS};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::bench::{default_config, labelled, registry, subsample, workspace_root};
use crate::glue::data;
use crate::glue::tasks::Task;
use crate::mlm::{mask_batch, MaskRule, Masked, MaskedLm};
use crate::model::{load_minilm, MINILM_DIR};
use crate::train::{self, Encoded, Split, TrainConfig};

/// `cargo xtask language-sft` options.
#[derive(Args, Debug, Clone)]
pub struct LanguageSftArgs {
    /// GLUE task (`sst2`, `mrpc`, ...).
    #[arg(long, default_value = "sst2")]
    pub task: String,
    /// Split whose sentences are the unlabelled MLM text (labels, if present, are not read); not `dev`, which is
    /// scored.
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    pub text_split: String,
    /// MLM epochs over that text (the full phase takes the first half of the steps, as in the paper).
    #[arg(long, default_value_t = 3, value_parser = crate::cli::positive_usize)]
    pub mlm_epochs: usize,
    /// Sentences per MLM step.
    #[arg(long, default_value_t = 32, value_parser = crate::cli::positive_usize)]
    pub mlm_batch: usize,
    /// Peak learning rate of the fresh MLM head (the delta's rates are LT-SFT's own).
    #[arg(long, default_value_t = 1e-3, value_parser = crate::cli::positive_finite)]
    pub head_lr: f64,
    /// First seed (the language SFT uses this one).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Task seeds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub seeds: u64,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = crate::cli::positive_usize)]
    pub threads: Option<usize>,
    /// Output folder (default `target/bench/language-sft/<task>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Held-out MLM figures of the language SFT.
#[derive(Clone, Debug, Serialize)]
pub struct MlmScore {
    /// Mean cross-entropy over the masked tokens.
    pub loss: f64,
    /// Top-1 accuracy over the masked tokens.
    pub accuracy: f64,
    /// Masked tokens scored.
    pub tokens: usize,
}

/// One task seed's four dev scores.
#[derive(Clone, Debug, Serialize)]
pub struct TaskRow {
    /// Seed.
    pub seed: u64,
    /// Task delta trained on the plain model, scored alone.
    pub plain_alone: BTreeMap<String, f64>,
    /// The same, with Δ_lang added.
    pub plain_with_lang: BTreeMap<String, f64>,
    /// Task delta trained over Δ_lang, scored with it (the recipe).
    pub over_lang_with_lang: BTreeMap<String, f64>,
    /// The same without Δ_lang.
    pub over_lang_alone: BTreeMap<String, f64>,
}

/// What the command measured.
#[derive(Clone, Debug, Serialize)]
pub struct LanguageSftReport {
    /// Task.
    pub task: String,
    /// MLM text split, its sentence count and the steps run.
    pub text: (String, usize, usize),
    /// Training MLM loss: mean of the first and of the last 10 steps.
    pub mlm_loss_first_last: (f64, f64),
    /// The MLM head trained alone on the frozen encoder (same steps and masks): mean loss of its last 10 steps.
    pub head_only_loss_last: f64,
    /// Entries of Δ_lang.
    pub lang_entries: usize,
    /// Held-out (dev sentences) MLM figures with Δ_lang, and with it disabled (same head, same masks).
    pub heldout_with: MlmScore,
    /// See `heldout_with`.
    pub heldout_without: MlmScore,
    /// Held-out MLM figures of the head trained alone on the frozen encoder (Δ_lang's baseline).
    pub heldout_head_only: MlmScore,
    /// Seconds training Δ_lang.
    pub lang_seconds: f64,
    /// Per task seed.
    pub rows: Vec<TaskRow>,
}

/// BERT's masking rule for the tokenizer's vocabulary.
fn mask_rule(tok: &tokenizers::Tokenizer) -> Result<MaskRule> {
    let id = |t: &str| tok.token_to_id(t).map(|x| x as usize).with_context(|| format!("tokenizer has no {t}"));
    let special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().map(|t| id(t)).collect::<Result<Vec<_>>>()?;
    Ok(MaskRule { prob: 0.15, mask_id: id("[MASK]")?, special, vocab: tok.get_vocab_size(true) })
}

/// Mean loss and accuracy of `m` on pre-masked batches, without a graph.
fn mlm_score(m: &MaskedLm, batches: &[Masked]) -> Result<MlmScore> {
    let ctx = Ctx::eval();
    let (mut loss, mut hits, mut n) = (0.0f64, 0usize, 0usize);
    peft_core::no_grad(|| -> Result<()> {
        for b in batches {
            let logits = m.logits_at(&b.batch, &b.positions, &ctx)?;
            let v = logits.shape()[1];
            let l = logits.cross_entropy(&b.targets, None, 0.0)?.item()?;
            loss += f64::from(l) * b.targets.len() as f64;
            for (row, &t) in logits.as_slice().chunks(v).zip(&b.targets) {
                let arg = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
                hits += usize::from(arg as i64 == t);
            }
            n += b.targets.len();
        }
        Ok(())
    })?;
    Ok(MlmScore { loss: loss / n.max(1) as f64, accuracy: hits as f64 / n.max(1) as f64, tokens: n })
}

/// Runs MLM over `text` for `args.mlm_epochs` on `pm` (its trainable parameters plus the MLM head); returns the
/// training losses and the seconds taken.
fn mlm_train(
    args: &LanguageSftArgs,
    pm: &PeftModel<MaskedLm>,
    rule: &MaskRule,
    text: &[Encoded],
    epochs: &[Vec<Vec<usize>>],
    what: &str,
) -> Result<(Vec<f64>, f64)> {
    let total: usize = epochs.iter().map(Vec::len).sum();
    for p in pm.model().head() {
        p.set_trainable(true);
    }
    let tcfg = train::linear_schedule(args.head_lr, 0.01, 1.0, 0.06, total, args.seed);
    let mut trainer = Trainer::new(pm.trainable_params(), pm, tcfg)?;
    let bar = train::progress_bar(format!("{} {what}", args.task));
    bar.set_length(total as u64);
    // The same masks for every run with this seed.
    let mut mask_rng = StdRng::seed_from_u64(args.seed ^ 0x6d6c6d);
    let mut losses = Vec::with_capacity(total);
    let t0 = std::time::Instant::now();
    for idx in epochs.iter().flatten() {
        let masked = mask_batch(&train::collate(text, idx), rule, &mut mask_rng);
        if masked.positions.is_empty() {
            continue;
        }
        let r = trainer.step(|ctx| {
            ctx.insert(train::token_mask(&masked.batch));
            Ok(Loss::Single(pm.model().loss(&masked, ctx)?))
        })?;
        if !r.skipped {
            losses.push(r.loss);
        }
        bar.set_message(format!("MLM loss {:.3}", r.loss));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((losses, t0.elapsed().as_secs_f64()))
}

/// Trains Δ_lang (and, for comparison, the MLM head alone on the frozen model with the same steps and masks);
/// returns Δ_lang's diffs and the report's MLM fields, and saves Δ_lang in `out/language`.
fn train_language(
    args: &LanguageSftArgs,
    model_dir: &std::path::Path,
    rule: &MaskRule,
    text: &[Encoded],
    heldout: &[Encoded],
    out: &std::path::Path,
) -> Result<(Vec<SparseDiff>, LanguageSftReport)> {
    let bert = || BertModel::load(model_dir).with_context(|| format!("loading {}", model_dir.display()));
    let lens: Vec<usize> = text.iter().map(|e| e.ids.len()).collect();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let epochs: Vec<Vec<Vec<usize>>> =
        (0..args.mlm_epochs).map(|_| train::length_batches(&lens, args.mlm_batch, Some(&mut rng))).collect();
    let total: usize = epochs.iter().map(Vec::len).sum();
    let density = registry()
        .into_iter()
        .find(|m| m.name == peft_sparse::LT_SFT)
        .and_then(|m| m.config.as_any().downcast_ref::<LtSftConfig>().map(|c| c.density))
        .context("lt-sft is not in the registry")?;
    let mut lt = LtSftConfig::new(ENCODER_WEIGHTS, density);
    lt.full_steps = total / 2;
    lt.total_steps = Some(total);
    let mut pm = PeftModel::new(MaskedLm::new(bert()?, args.seed)?, lt, "default", args.seed)?;
    let (losses, lang_seconds) = mlm_train(args, &pm, rule, text, &epochs, "language SFT (MLM)")?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let first_last = (mean(&losses[..losses.len().min(10)]), mean(&losses[losses.len().saturating_sub(10)..]));
    // Held-out: the dev sentences, masked once with a fixed seed.
    let hl: Vec<usize> = heldout.iter().map(|e| e.ids.len()).collect();
    let mut hrng = StdRng::seed_from_u64(1234);
    let held: Vec<Masked> = train::length_batches(&hl, 64, None)
        .iter()
        .map(|idx| mask_batch(&train::collate(heldout, idx), rule, &mut hrng))
        .filter(|m| !m.positions.is_empty())
        .collect();
    let heldout_with = mlm_score(pm.model(), &held)?;
    pm.disable_adapters()?;
    let heldout_without = mlm_score(pm.model(), &held)?;
    pm.enable_adapters()?;
    // The head alone on the frozen encoder, same init, steps, rate and masks.
    let head_only = PeftModel::wrap(MaskedLm::new(bert()?, args.seed)?, args.seed);
    for p in head_only.base_params() {
        p.set_trainable(false);
    }
    let (head_losses, _) = mlm_train(args, &head_only, rule, text, &epochs, "MLM head alone")?;
    let heldout_head_only = mlm_score(head_only.model(), &held)?;
    let lang_dir = out.join("language");
    pm.save_pretrained(&lang_dir)?;
    let Some(st) = pm.tuner("default")?.as_any().downcast_ref::<SparseTuner>() else {
        bail!("LT-SFT's tuner is not a sparse-delta tuner");
    };
    let diffs: Vec<SparseDiff> = st.entries().iter().map(|(_, d)| SparseDiff::of(d)).collect();
    let report = LanguageSftReport {
        task: args.task.clone(),
        text: (args.text_split.clone(), text.len(), losses.len()),
        mlm_loss_first_last: first_last,
        head_only_loss_last: mean(&head_losses[head_losses.len().saturating_sub(10)..]),
        lang_entries: diffs.iter().map(|d| d.values.len()).sum(),
        heldout_with,
        heldout_without,
        heldout_head_only,
        lang_seconds,
        rows: Vec::new(),
    };
    Ok((diffs, report))
}

/// Adds (`sign` 1) or subtracts (-1) the diffs into the model's parameters of the same names.
fn add_diffs(model: &dyn peft_core::nn::Module, diffs: &[SparseDiff], sign: f32) -> Result<()> {
    let params = named_params(model);
    for d in diffs {
        let Some(p) = params.iter().find(|p| p.name() == d.name) else {
            bail!("`{}` of the language delta is not a parameter of the classifier", d.name);
        };
        if sign > 0.0 {
            d.apply_to(p)?;
        } else {
            d.revert_from(p)?;
        }
    }
    Ok(())
}

/// One task delta (the bench's `lt-sft` at `seed`), trained over `lang` when `over`; its dev scores alone and with
/// `lang` (in that order).
fn task_delta(
    task: Task,
    model_dir: &std::path::Path,
    (train_split, dev): (&Split, &Split),
    lang: &[SparseDiff],
    over: bool,
    seed: u64,
) -> Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
    let spec = registry()
        .into_iter()
        .find(|m| m.name == peft_sparse::LT_SFT)
        .context("lt-sft is not in the registry")?
        .with_seed(seed);
    let model = load_minilm(model_dir, task.num_outputs(), seed)?;
    if over {
        add_diffs(model.as_ref(), lang, 1.0)?;
    }
    let mut config = spec.config();
    config.set_modules_to_save(crate::squarehead::head_modules(model.as_ref()))?;
    let mut pm = PeftModel::wrap(model, seed);
    pm.add_adapter_boxed("default", config)?;
    pm.set_adapter("default")?;
    let cfg = TrainConfig { lr: spec.lr, ..default_config() };
    let bar = train::progress_bar(format!("{} lt-sft s{seed}{}", task.name(), if over { " over Δ_lang" } else { "" }));
    let out = train::run(task, &pm, &cfg, cfg.lr, seed, train_split, dev, None, &bar);
    bar.finish_and_clear();
    let trained = out?.metrics;
    let score = |pm: &PeftModel<Box<dyn crate::model::SeqClassifier>>| -> Result<BTreeMap<String, f64>> {
        Ok(train::score(task, &train::predict(pm.model().as_ref(), &dev.enc, 64)?, &dev.labels))
    };
    if over {
        add_diffs(pm.model().as_ref(), lang, -1.0)?;
        Ok((score(&pm)?, trained))
    } else {
        add_diffs(pm.model().as_ref(), lang, 1.0)?;
        Ok((trained, score(&pm)?))
    }
}

fn fmt(m: &BTreeMap<String, f64>) -> String {
    m.iter().map(|(n, v)| format!("{n} {:.1}", 100.0 * v)).collect::<Vec<_>>().join(", ")
}

/// Mean ± sample std of one metric over rows.
fn mean_std(rows: &[TaskRow], pick: impl Fn(&TaskRow) -> &BTreeMap<String, f64>, metric: &str) -> String {
    let v: Vec<f64> = rows.iter().filter_map(|r| pick(r).get(metric).copied()).map(|x| 100.0 * x).collect();
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let s = if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    format!("{m:.1}±{s:.1}")
}

/// The report as Markdown.
pub fn markdown(r: &LanguageSftReport, task: Task) -> String {
    let mut s = format!(
        "# LT-SFT with a language (domain) SFT trained by MLM: {}\n\nΔ_lang: {} entries, MLM on the {} sentences of \
         the `{}` split, {} steps ({:.0} s); training loss {:.2} (first 10 steps) -> {:.2} (last 10); the MLM head \
         trained alone on the frozen encoder (same steps and masks) ends at {:.2}.\n\n\
         | held-out MLM, dev sentences ({} masked tokens, same masks) | loss | masked-token accuracy |\n|---|---|---|\n\
         | encoder + Δ_lang, its head | {:.3} | {:.1}% |\n| the same head, Δ_lang removed | {:.3} | {:.1}% |\n\
         | frozen encoder, head trained alone | {:.3} | {:.1}% |\n\n",
        task.display(),
        r.lang_entries,
        r.text.1,
        r.text.0,
        r.text.2,
        r.lang_seconds,
        r.mlm_loss_first_last.0,
        r.mlm_loss_first_last.1,
        r.head_only_loss_last,
        r.heldout_with.tokens,
        r.heldout_with.loss,
        100.0 * r.heldout_with.accuracy,
        r.heldout_without.loss,
        100.0 * r.heldout_without.accuracy,
        r.heldout_head_only.loss,
        100.0 * r.heldout_head_only.accuracy,
    );
    s +=
        "| seed | task Δ alone | task Δ + Δ_lang | task Δ trained over Δ_lang, + Δ_lang | the same, Δ_lang removed |\n";
    s += "|---|---|---|---|---|\n";
    for row in &r.rows {
        s += &format!(
            "| {} | {} | {} | {} | {} |\n",
            row.seed,
            fmt(&row.plain_alone),
            fmt(&row.plain_with_lang),
            fmt(&row.over_lang_with_lang),
            fmt(&row.over_lang_alone)
        );
    }
    for m in task.metrics() {
        let k = m.short();
        s += &format!(
            "| mean±std {k} | {} | {} | {} | {} |\n",
            mean_std(&r.rows, |x| &x.plain_alone, k),
            mean_std(&r.rows, |x| &x.plain_with_lang, k),
            mean_std(&r.rows, |x| &x.over_lang_with_lang, k),
            mean_std(&r.rows, |x| &x.over_lang_alone, k)
        );
    }
    s
}

/// Runs the command.
///
/// # Errors
/// Unreadable data or model, training failures, an unwritable output folder.
pub fn run(args: &LanguageSftArgs) -> Result<std::process::ExitCode> {
    let task = Task::parse(&args.task)?;
    if !task.has_train() {
        bail!("{task} has no training split in the asset pack (only dev); it cannot be fine-tuned");
    }
    let mut needs = crate::assets::glue_needs(&[task]);
    let text_file = format!("data/glue/{}/{}.tsv", task.dir(), args.text_split);
    if !needs.iter().any(|n| n.rel == text_file) {
        needs.push(crate::assets::Need { rel: text_file, source: crate::assets::GLUE_SOURCE });
    }
    let adir = match crate::assets::check(&needs) {
        Ok(d) => d,
        Err(msg) => {
            eprintln!("cargo xtask language-sft: assets are missing, nothing was run.\n{msg}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let model_dir = adir.join(MINILM_DIR);
    let glue_dir = adir.join("data/glue");
    let cfg = default_config();
    let tok = train::load_tokenizer(&model_dir.join("tokenizer.json"), cfg.max_len)?;
    let rule = mask_rule(&tok)?;
    let text_ex = data::load(&glue_dir, task, &args.text_split)
        .with_context(|| format!("the unlabelled text: split `{}` of {task}", args.text_split))?;
    let text = train::encode_all(&tok, &text_ex)?;
    let (train_ex, train_y) = labelled(data::load(&glue_dir, task, "train")?, "train")?;
    let (dev_ex, dev_y) = labelled(data::load(&glue_dir, task, "dev")?, "dev")?;
    let idx = subsample(train_ex.len(), cfg.train_examples);
    let sub: Vec<data::Example> = idx.iter().map(|&i| train_ex[i].clone()).collect();
    let train_split = Split { enc: train::encode_all(&tok, &sub)?, labels: idx.iter().map(|&i| train_y[i]).collect() };
    let dev = Split { enc: train::encode_all(&tok, &dev_ex)?, labels: dev_y };
    let out = args.out.clone().unwrap_or_else(|| workspace_root().join("target/bench/language-sft").join(task.name()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "language SFT: MLM on {} `{}` sentences, {threads} threads -> {}",
        text.len(),
        args.text_split,
        out.display()
    );
    let (lang, mut report) = train_language(args, &model_dir, &rule, &text, &dev.enc, &out)?;
    eprintln!(
        "Δ_lang: {} entries; held-out MLM loss {:.3} with, {:.3} without",
        report.lang_entries, report.heldout_with.loss, report.heldout_without.loss
    );
    for seed in args.seed..args.seed + args.seeds {
        let (plain_alone, plain_with_lang) = task_delta(task, &model_dir, (&train_split, &dev), &lang, false, seed)?;
        let (over_lang_alone, over_lang_with_lang) =
            task_delta(task, &model_dir, (&train_split, &dev), &lang, true, seed)?;
        let row = TaskRow { seed, plain_alone, plain_with_lang, over_lang_with_lang, over_lang_alone };
        eprintln!(
            "seed {seed}: alone {} | + lang {} | over lang {} | over lang, removed {}",
            fmt(&row.plain_alone),
            fmt(&row.plain_with_lang),
            fmt(&row.over_lang_with_lang),
            fmt(&row.over_lang_alone)
        );
        report.rows.push(row);
    }
    let md = markdown(&report, task);
    let json = serde_json::to_vec_pretty(&report)?;
    for (name, bytes) in [("report.md", md.as_bytes()), ("results.json", json.as_slice())] {
        let path = out.join(name);
        peft_core::io::atomic::atomic_write(&path, |w| w.write_all(bytes))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{md}");
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::nn::RandomInit;

    fn args() -> LanguageSftArgs {
        LanguageSftArgs {
            task: "sst2".into(),
            text_split: "test".into(),
            mlm_epochs: 30,
            mlm_batch: 4,
            head_lr: 1e-2,
            seed: 0,
            seeds: 1,
            threads: None,
            out: None,
        }
    }

    fn tiny() -> MaskedLm {
        let cfg = peft_core::io::BertConfig {
            hidden_size: 16,
            intermediate_size: 32,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            ..crate::model::tiny_bert_config()
        };
        MaskedLm::new(BertModel::from_source(&cfg, &RandomInit::new(0, 0.2)).unwrap(), 1).unwrap()
    }

    /// MLM through LT-SFT learns a text whose tokens are predictable (each row repeats one token), the delta
    /// touches only the target weights, and the MLM head is not part of the saved adapter.
    #[test]
    fn language_sft_learns_a_predictable_text_and_saves_only_the_delta() {
        let text: Vec<Encoded> = (0..16)
            .map(|i| Encoded {
                ids: [1].into_iter().chain(std::iter::repeat_n(5 + i % 8, 6)).chain([2]).collect(),
                types: vec![0; 8],
            })
            .collect();
        let rule = MaskRule { prob: 0.15, mask_id: 3, special: vec![0, 1, 2, 3], vocab: 20 };
        let a = args();
        let lens: Vec<usize> = text.iter().map(|e| e.ids.len()).collect();
        let mut rng = StdRng::seed_from_u64(0);
        let epochs: Vec<Vec<Vec<usize>>> =
            (0..a.mlm_epochs).map(|_| train::length_batches(&lens, a.mlm_batch, Some(&mut rng))).collect();
        let mut lt = LtSftConfig::new(ENCODER_WEIGHTS, 0.2);
        (lt.full_steps, lt.total_steps, lt.full_lr, lt.lr) = (40, Some(120), 3e-3, 1e-2);
        let pm = PeftModel::new(tiny(), lt, "default", 0).unwrap();
        let (losses, _) = mlm_train(&a, &pm, &rule, &text, &epochs, "test").unwrap();
        assert_eq!(losses.len(), 120);
        let tail = |l: &[f64]| l[l.len() - 10..].iter().sum::<f64>() / 10.0;
        let (first, last) = (losses[..10].iter().sum::<f64>() / 10.0, tail(&losses));
        // The head alone on the frozen encoder, same steps and masks: the delta must add to what it learns.
        let head_only = PeftModel::wrap(tiny(), 0);
        head_only.base_params().iter().for_each(|p| p.set_trainable(false));
        let head = tail(&mlm_train(&a, &head_only, &rule, &text, &epochs, "test").unwrap().0);
        assert!(last < 0.5 * first && last < 0.8 * head, "MLM loss {first:.3} -> {last:.3}; head alone {head:.3}");
        let st = pm.tuner("default").unwrap().as_any().downcast_ref::<SparseTuner>().unwrap();
        let re = regex::Regex::new(&format!("^(?:{ENCODER_WEIGHTS})$")).unwrap();
        for (_, d) in st.entries() {
            assert!(re.is_match(d.param_name()), "{} is not a target", d.param_name());
        }
        assert!(st.entries().iter().any(|(_, d)| SparseDiff::of(d).values.iter().any(|&v| v != 0.0)));
        let dir = tempfile::tempdir().unwrap();
        pm.save_pretrained(dir.path()).unwrap();
        let file = peft_core::io::SafeTensorsFile::open(dir.path().join("adapter_model.safetensors")).unwrap();
        let names: Vec<String> = file.names().map(str::to_string).collect();
        assert!(!names.is_empty());
        assert!(names.iter().all(|n| !n.contains("cls.predictions")), "the MLM head was saved: {names:?}");
    }
}
