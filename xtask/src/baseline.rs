//! `--baseline pytorch`: runs `benches/baselines/torch_glue_lora.py` (transformers + peft) on the same data subset,
//! recipe and thread count, and reads the JSON it prints. When Python, torch, transformers or peft are missing
//! it says so and the bench continues.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::glue::tasks::Task;
use crate::report::BaselineRecord;
use crate::train::TrainConfig;

/// Script path relative to the workspace root.
pub const SCRIPT: &str = "benches/baselines/torch_glue_lora.py";

/// Whether `python3` can import torch, transformers and peft; `Err` says what is missing.
///
/// # Errors
/// The reason the baseline cannot run.
pub fn available() -> Result<()> {
    let out = Command::new("python3")
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .context("python3 not found")?;
    if !out.status.success() {
        bail!(
            "python3 cannot import torch/transformers/peft ({}); install with `pip install torch transformers peft`",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").trim()
        );
    }
    Ok(())
}

/// Arguments of one baseline run.
pub struct BaselineJob<'a> {
    /// Workspace root (the script's location is relative to it).
    pub root: &'a Path,
    /// Model folder.
    pub model_dir: &'a Path,
    /// GLUE folder.
    pub glue_dir: &'a Path,
    /// Task.
    pub task: Task,
    /// Training-row indices (the subsample the Rust runs used), written to a file for the script.
    pub indices: &'a [usize],
    /// Recipe.
    pub cfg: &'a TrainConfig,
    /// LoRA learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Threads.
    pub threads: usize,
    /// Scratch folder.
    pub work: &'a Path,
}

/// Runs the script and parses its JSON.
///
/// # Errors
/// Script failure (with its stderr tail) or unparsable output.
pub fn run(job: &BaselineJob<'_>) -> Result<BaselineRecord> {
    std::fs::create_dir_all(job.work)?;
    let idx_path = job.work.join(format!("{}-train-indices.json", job.task.name()));
    std::fs::write(&idx_path, serde_json::to_vec(job.indices)?)?;
    let c = job.cfg;
    let out = Command::new("python3")
        .arg(job.root.join(SCRIPT))
        .args(["--task", job.task.name(), "--glue-dir"])
        .arg(job.glue_dir)
        .arg("--model-dir")
        .arg(job.model_dir)
        .arg("--indices")
        .arg(&idx_path)
        .args(["--epochs", &c.epochs.to_string(), "--batch-size", &c.batch_size.to_string()])
        .args(["--lr", &job.lr.to_string(), "--warmup-frac", &c.warmup_frac.to_string()])
        .args(["--weight-decay", &c.weight_decay.to_string(), "--max-grad-norm", &c.max_grad_norm.to_string()])
        .args(["--max-len", &c.max_len.to_string(), "--seed", &job.seed.to_string()])
        .args(["--threads", &job.threads.to_string()])
        .env("OMP_NUM_THREADS", job.threads.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running python3")?;
    if !out.status.success() {
        bail!("{SCRIPT} failed with {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line in the output")?;
    let v: serde_json::Value = serde_json::from_str(line).context("parsing the baseline JSON")?;
    let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
    Ok(BaselineRecord {
        task: job.task.name().to_string(),
        seed: job.seed,
        info: v.get("info").and_then(|i| i.as_object()).map(|o| o.clone().into_iter().collect()).unwrap_or_default(),
        metrics: v
            .get("metrics")
            .and_then(|m| m.as_object())
            .map(|o| o.iter().filter_map(|(k, x)| x.as_f64().map(|x| (k.clone(), x))).collect())
            .unwrap_or_default(),
        samples_per_sec: f("samples_per_sec"),
        train_seconds: f("train_seconds"),
        trainable_params: v.get("trainable_params").and_then(serde_json::Value::as_u64).unwrap_or(0),
    })
}
