//! `cargo xtask compose`: LT-SFT's composition `θ = θ⁰ + Δ_task + Δ_other` on a GLUE dev set. The task's sparse
//! adapter (LT-SFT, SpIEL, sparse-ft: anything saved as `<param>.indices` + `<param>.values`) is loaded with its
//! head; the deltas of the `--add` adapters are added to the base weights (their heads ignored); the dev metrics
//! are reported with the task delta alone and with the others added, beside the entries the deltas share.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use peft_core::adapter::PeftModel;
use peft_core::nn::named_params;
use peft_sparse::compose::{compose, SparseDiff};
use peft_sparse::SparseTuner;

use crate::bench::labelled;
use crate::glue::data;
use crate::glue::tasks::Task;
use crate::model::{load_minilm, SeqClassifier, MINILM_DIR};
use crate::train;

/// `cargo xtask compose` options.
#[derive(Args, Debug, Clone)]
pub struct ComposeArgs {
    /// GLUE task whose dev set is scored (`sst2`, `mrpc`, ...).
    #[arg(long)]
    pub task: String,
    /// The task's sparse adapter folder (its task head is used).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Sparse adapter folders whose deltas are added to the base weights (heads ignored); repeatable.
    #[arg(long = "add", required = true)]
    pub add: Vec<PathBuf>,
    /// Token limit per example (the bench's default).
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
}

type Model = PeftModel<Box<dyn SeqClassifier>>;

/// The sparse deltas of the adapter in `dir`, loaded onto a fresh MiniLM.
fn load(model_dir: &std::path::Path, task: Task, dir: &std::path::Path) -> Result<(Model, Vec<SparseDiff>)> {
    let base = load_minilm(model_dir, task.num_outputs(), 0)?;
    let (pm, report) = PeftModel::from_pretrained(base, dir, &peft_sparse::registry())
        .with_context(|| format!("loading the adapter in {}", dir.display()))?;
    for w in report.problems() {
        eprintln!("warning: {}: {w}", dir.display());
    }
    let Some(st) = pm.tuner("default")?.as_any().downcast_ref::<SparseTuner>() else {
        bail!("{} is not a sparse-delta adapter (LT-SFT, SpIEL, sparse-ft, SaRA)", dir.display());
    };
    let diffs = st.entries().iter().map(|(_, d)| SparseDiff::of(d)).collect();
    Ok((pm, diffs))
}

/// Runs the command.
///
/// # Errors
/// Missing assets, unreadable adapters, adapters that are not sparse deltas or address other shapes.
pub fn run(args: &ComposeArgs) -> Result<std::process::ExitCode> {
    let task = Task::parse(&args.task)?;
    let adir = match crate::assets::check(&crate::assets::glue_needs(&[task])) {
        Ok(d) => d,
        Err(msg) => {
            eprintln!("cargo xtask compose: assets are missing, nothing was run.\n{msg}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    let model_dir = adir.join(MINILM_DIR);
    let tok = train::load_tokenizer(&model_dir.join("tokenizer.json"), args.max_len)?;
    let (dev_ex, dev_y) = labelled(data::load(&adir.join("data/glue"), task, "dev")?, "dev")?;
    let dev = train::Split { enc: train::encode_all(&tok, &dev_ex)?, labels: dev_y };
    let score = |m: &Model| -> Result<std::collections::BTreeMap<String, f64>> {
        let out = train::predict(m.model().as_ref(), &dev.enc, 64)?;
        Ok(train::score(task, &out, &dev.labels))
    };
    let (pm, task_diffs) = load(&model_dir, task, &args.adapter)?;
    let alone = score(&pm)?;
    let mut others: Vec<SparseDiff> = Vec::new();
    for d in &args.add {
        others.extend(load(&model_dir, task, d)?.1);
    }
    // Entries the task delta shares with the others, tensor by tensor.
    let mut overlap = 0usize;
    for t in &task_diffs {
        let mut same: Vec<&SparseDiff> = vec![t];
        same.extend(others.iter().filter(|o| o.name == t.name));
        overlap += compose(&same)?.overlap;
    }
    let params = named_params(pm.model().as_ref());
    for o in &others {
        let Some(p) = params.iter().find(|p| p.name() == o.name) else {
            bail!("`{}` of an added delta is not a parameter of the model", o.name);
        };
        o.apply_to(p)?;
    }
    let together = score(&pm)?;
    let k = |ds: &[SparseDiff]| ds.iter().map(|d| d.values.len()).sum::<usize>();
    let fmt = |m: &std::collections::BTreeMap<String, f64>| {
        m.iter().map(|(n, v)| format!("{n} {:.1}", 100.0 * v)).collect::<Vec<_>>().join(", ")
    };
    println!("| {} dev | task delta alone | task delta + added |", task.display());
    println!("|---|---|---|");
    println!("| metrics | {} | {} |", fmt(&alone), fmt(&together));
    println!(
        "| entries | {} | {} + {} ({overlap} shared with the task delta) |",
        k(&task_diffs),
        k(&task_diffs),
        k(&others)
    );
    Ok(std::process::ExitCode::SUCCESS)
}
