//! `results.json` (one record per task x method x seed, appended as runs finish, so an interrupted bench resumes)
//! and `report.md` (tables shaped like the LoRA paper's GLUE table).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::glue::tasks::Task;
use crate::train::TrainConfig;

/// One finished run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Task name (`sst2`).
    pub task: String,
    /// Method registry name.
    pub method: String,
    /// Method description.
    pub method_desc: String,
    /// Seed.
    pub seed: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Recipe (a record whose recipe differs from the current one is re-run).
    pub config: TrainConfig,
    /// Metric name -> dev value (0..1 scale).
    pub metrics: BTreeMap<String, f64>,
    /// The task's headline metric name.
    pub headline: String,
    /// Trainable parameters (method + head).
    pub trainable_params: u64,
    /// All parameters of the model (incl. adapters).
    pub total_params: u64,
    /// 100 * trainable / total.
    pub trainable_pct: f64,
    /// Training seconds (excluding evaluation).
    pub train_seconds: f64,
    /// Dev evaluation seconds.
    pub eval_seconds: f64,
    /// Training examples per second.
    pub samples_per_sec: f64,
    /// Peak resident set size during the run, bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Bytes written by `Prepared::save`.
    pub adapter_bytes: u64,
    /// Optimizer state held at the end of training: the trainer's AdamW state plus the state a sparse adapter
    /// keeps for the values it steps itself (LT-SFT, SpIEL, SaRA). `None` in results written before it was
    /// recorded.
    #[serde(default)]
    pub optimizer_state_bytes: Option<u64>,
    /// Optimizer steps.
    pub steps: usize,
    /// Steps skipped by the non-finite guard.
    pub skipped_steps: usize,
    /// Training / dev examples.
    pub train_examples: usize,
    /// Dev examples.
    pub dev_examples: usize,
    /// (step, mean loss) points.
    pub losses: Vec<(usize, f64)>,
    /// SquareHead runs: sparsity, the teacher's score, CSR size and GEMM times of the pruned matrices.
    #[serde(default)]
    pub sparse: Option<crate::squarehead::SparseInference>,
    /// Runs on a quantized base (QLoRA, LQ-LoRA): what its quantized linears encode and hold. `None` for a dense
    /// base and in results written before it was recorded.
    #[serde(default)]
    pub quant_base: Option<QuantBase>,
}

/// The quantized linears of a run's base model.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct QuantBase {
    /// Weight elements the quantized linears encode.
    pub params: u64,
    /// Bytes they hold: codes and (quantized) scales, the code tables bitsandbytes stores with every tensor
    /// excluded (peft-quant shares them as constants).
    pub bytes: u64,
}

impl QuantBase {
    /// Storage bits per encoded parameter.
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.bytes as f64 / self.params.max(1) as f64
    }
}

/// Runs on a quantized base: the bits per parameter its quantized linears hold, beside the score.
fn quant_base_section(s: &mut String, res: &Results) {
    let runs: Vec<(&Record, &QuantBase)> =
        res.runs.iter().filter_map(|r| r.quant_base.as_ref().map(|q| (r, q))).collect();
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## Quantized base\n");
    let _ = writeln!(
        s,
        "Bytes of the quantized linears (codes and scales; bitsandbytes' per-tensor code tables not counted) and \
         their bits per parameter; the rest of the model (embeddings, norms, the head) stays f32.\n"
    );
    let _ = writeln!(s, "| Task | Method | Seed | Metrics | Quantized params | Base bytes | Bits/param |");
    let _ = writeln!(s, "|---|---|---:|---|---:|---:|---:|");
    for (r, q) in runs {
        let mets: Vec<String> = r.metrics.iter().map(|(k, v)| format!("{k} {:.1}", 100.0 * v)).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.3} |",
            r.task,
            r.method,
            r.seed,
            mets.join(", "),
            q.params,
            human_bytes(q.bytes),
            q.bits_per_param()
        );
    }
}

/// SquareHead runs: accuracy against sparsity beside the dense teacher, the pruned matrices' size in CSR, and
/// the time of `x · Wᵀ` over them with our dense GEMM and with the CSR kernel (best of 5, same run).
fn squarehead_section(s: &mut String, res: &Results) {
    let runs: Vec<(&Record, &crate::squarehead::SparseInference)> =
        res.runs.iter().filter_map(|r| r.sparse.as_ref().map(|x| (r, x))).collect();
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## SquareHead: sparsity, accuracy and CPU GEMM time of the pruned encoder matrices\n");
    let _ = writeln!(
        s,
        "Teacher: full fine-tuning with the same recipe (trained once per task and seed, its seconds not in the \
         student's). GEMM: `x · Wᵀ` over every pruned matrix, dense = peft-core's `linear`, CSR = \
         `peft_sparse::csr` (its AVX2 kernel from 4 rows on where the CPU has AVX2 + FMA; \
         portable: the same with AVX2 off); ratio = CSR / dense time, < 1 means the sparse kernel is faster.\n"
    );
    let _ = writeln!(
        s,
        "| Task | Method | Seed | Sparsity | Student | Dense teacher | Dense / CSR size | 1 row dense / CSR (ratio) | 128 rows dense / CSR (ratio) |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (r, x) in runs {
        let head = |m: &BTreeMap<String, f64>| m.get(&r.headline).map_or("–".into(), |v| format!("{:.1}", 100.0 * v));
        let t = |rows: usize| {
            x.timings.iter().find(|g| g.rows == rows).map_or("–".to_string(), |g| {
                format!(
                    "{:.3} / {:.3} ms ({:.2}x; portable {:.2}x)",
                    1e3 * g.dense_s,
                    1e3 * g.csr_s,
                    g.csr_s / g.dense_s,
                    g.csr_portable_s / g.dense_s
                )
            })
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1}% | {} | {} | {} / {} | {} | {} |",
            r.task,
            r.method,
            r.seed,
            100.0 * x.sparsity,
            head(&r.metrics),
            head(&x.teacher_metrics),
            human_bytes(x.dense_bytes),
            human_bytes(x.csr_bytes),
            t(1),
            t(128)
        );
    }
}

/// Machine and build the results were measured on.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Logical cores.
    pub cores: usize,
    /// Worker threads used.
    pub threads: usize,
    /// `os-arch`.
    pub os: String,
    /// `git rev-parse HEAD` (+ `-dirty`).
    pub git_commit: String,
}

impl Machine {
    /// Describes this machine.
    pub fn detect(threads: usize) -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let mut git_commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
            git_commit.push_str("-dirty");
        }
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            threads,
            os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            git_commit,
        }
    }
}

/// The PyTorch baseline's numbers for one task.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BaselineRecord {
    /// Task name.
    pub task: String,
    /// Seed.
    pub seed: u64,
    /// Library versions and settings the script reported.
    pub info: BTreeMap<String, serde_json::Value>,
    /// Metric name -> dev value.
    pub metrics: BTreeMap<String, f64>,
    /// Training examples per second.
    pub samples_per_sec: f64,
    /// Training seconds.
    pub train_seconds: f64,
    /// Trainable parameters.
    pub trainable_params: u64,
}

/// The whole results file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Results {
    /// Profile name (`default`, `quick`, `full`).
    pub profile: String,
    /// Where it ran (updated on every write).
    pub machine: Machine,
    /// Finished runs.
    pub runs: Vec<Record>,
    /// PyTorch baseline runs.
    #[serde(default)]
    pub baselines: Vec<BaselineRecord>,
}

impl Results {
    /// Reads `path`, or an empty set when it does not exist.
    ///
    /// # Errors
    /// An unreadable or malformed file (not silently overwritten).
    pub fn load(path: &Path) -> Result<Results> {
        if !path.exists() {
            return Ok(Results::default());
        }
        let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&s)
            .with_context(|| format!("{} is not a results file (move it away or pass another --out)", path.display()))
    }

    /// Writes atomically.
    ///
    /// # Errors
    /// IO errors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        peft_core::io::atomic::atomic_write(path, |w| w.write_all(&json))?;
        Ok(())
    }

    /// The finished run for this key and recipe, if any.
    pub fn find(&self, task: &str, method: &str, seed: u64, config: &TrainConfig) -> Option<&Record> {
        self.runs.iter().find(|r| r.task == task && r.method == method && r.seed == seed && &r.config == config)
    }

    /// Adds or replaces the record with the same key.
    pub fn upsert(&mut self, rec: Record) {
        self.runs.retain(|r| !(r.task == rec.task && r.method == rec.method && r.seed == rec.seed));
        self.runs.push(rec);
    }
}

/// Mean and sample standard deviation (0 for one value).
pub(crate) fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, var.sqrt())
}

/// Parameter count as the LoRA paper writes it (`22.7M`, `0.3M`, `37.6K`).
pub fn human_params(n: u64) -> String {
    if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else if n >= 1_000 {
        format!("{:.1}K", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}

/// Byte count in MB / KB.
pub fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

/// Renders report.md: the GLUE table (rows: methods with trainable parameters; columns: tasks with the headline
/// metric x100, mean±std over seeds; Avg.), a cost table, and the baseline comparison.
pub fn markdown(res: &Results, plots: &[String]) -> String {
    let mut s = String::new();
    let m = &res.machine;
    let _ = writeln!(s, "# GLUE benchmark ({} profile)\n", res.profile);
    let _ = writeln!(
        s,
        "Machine: {} ({} cores, {} threads), {}; commit `{}`. Model: sentence-transformers/all-MiniLM-L6-v2. \
         Dev-set scores x100 (MCC for CoLA, Pearson for STS-B, accuracy otherwise), mean±std over seeds.\n",
        m.cpu, m.cores, m.threads, m.os, m.git_commit
    );
    let tasks: Vec<Task> = Task::ALL.iter().copied().filter(|t| res.runs.iter().any(|r| r.task == t.name())).collect();
    let mut methods: Vec<String> = Vec::new();
    for r in &res.runs {
        if !methods.contains(&r.method) {
            methods.push(r.method.clone());
        }
    }
    let _ = write!(s, "| Method | # Trainable Parameters |");
    for t in &tasks {
        let _ = write!(s, " {} |", t.display());
    }
    let _ = writeln!(s, " Avg. |");
    let _ = writeln!(s, "|---|---:|{}---:|", "---:|".repeat(tasks.len()));
    for meth in &methods {
        let runs: Vec<&Record> = res.runs.iter().filter(|r| &r.method == meth).collect();
        let params = runs.iter().map(|r| r.trainable_params).max().unwrap_or(0);
        let pct = runs.iter().map(|r| r.trainable_pct).fold(0.0, f64::max);
        let _ = write!(s, "| {meth} | {} ({pct:.2}%) |", human_params(params));
        let mut means = Vec::new();
        for t in &tasks {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.task == t.name())
                .filter_map(|r| r.metrics.get(&r.headline).copied())
                .map(|x| 100.0 * x)
                .collect();
            if v.is_empty() {
                let _ = write!(s, " – |");
            } else {
                let (mu, sd) = mean_std(&v);
                means.push(mu);
                if v.len() > 1 {
                    let _ = write!(s, " {mu:.1}±{sd:.1} |");
                } else {
                    let _ = write!(s, " {mu:.1} |");
                }
            }
        }
        if means.len() == tasks.len() && !means.is_empty() {
            let _ = writeln!(s, " {:.1} |", means.iter().sum::<f64>() / means.len() as f64);
        } else {
            let _ = writeln!(s, " – |");
        }
    }
    let _ = writeln!(s, "\n## Cost per run\n");
    let _ = writeln!(
        s,
        "| Task | Method | Seed | Metrics | Trainable | Train examples | Steps | Train s | Samples/s | Peak RSS | Optimizer state | Adapter file |"
    );
    let _ = writeln!(s, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &res.runs {
        let mets: Vec<String> = r.metrics.iter().map(|(k, v)| format!("{k} {:.1}", 100.0 * v)).collect();
        let rss = r.peak_rss_bytes.map_or("–".into(), human_bytes);
        let opt = r.optimizer_state_bytes.map_or("–".into(), human_bytes);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} |",
            r.task,
            r.method,
            r.seed,
            mets.join(", "),
            r.trainable_params,
            r.train_examples,
            r.steps,
            r.train_seconds,
            r.samples_per_sec,
            rss,
            opt,
            human_bytes(r.adapter_bytes)
        );
    }
    squarehead_section(&mut s, res);
    quant_base_section(&mut s, res);
    if !res.baselines.is_empty() {
        let _ = writeln!(s, "\n## PyTorch baseline (transformers + peft, same LoRA recipe and threads)\n");
        let _ = writeln!(
            s,
            "| Task | Seed | peft-rs metrics | PyTorch metrics | peft-rs samples/s | PyTorch samples/s | ratio |"
        );
        let _ = writeln!(s, "|---|---:|---|---|---:|---:|---:|");
        for b in &res.baselines {
            let ours = res.runs.iter().find(|r| r.task == b.task && r.seed == b.seed && r.method == "lora");
            let fmt = |m: &BTreeMap<String, f64>| {
                m.iter().map(|(k, v)| format!("{k} {:.1}", 100.0 * v)).collect::<Vec<_>>().join(", ")
            };
            let (om, os) = ours.map_or(("–".to_string(), f64::NAN), |r| (fmt(&r.metrics), r.samples_per_sec));
            let _ = writeln!(
                s,
                "| {} | {} | {om} | {} | {os:.1} | {:.1} | {:.2}x |",
                b.task,
                b.seed,
                fmt(&b.metrics),
                b.samples_per_sec,
                os / b.samples_per_sec
            );
        }
    }
    if !plots.is_empty() {
        let _ = writeln!(s, "\n## Plots\n");
        for p in plots {
            let _ = writeln!(s, "![{p}]({p})");
        }
    }
    let descs: BTreeSet<(String, String)> =
        res.runs.iter().map(|r| (r.method.clone(), r.method_desc.clone())).collect();
    let _ = writeln!(s, "\n## Methods\n");
    for (n, d) in descs {
        let _ = writeln!(s, "- `{n}`: {d}");
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn cfg() -> TrainConfig {
        TrainConfig {
            epochs: 1,
            batch_size: 32,
            lr: 1e-3,
            warmup_frac: 0.06,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            train_examples: Some(2000),
            max_len: 128,
        }
    }

    pub(crate) fn rec(task: &str, method: &str, seed: u64, acc: f64) -> Record {
        Record {
            task: task.into(),
            method: method.into(),
            method_desc: format!("{method} desc"),
            seed,
            lr: 1e-3,
            config: cfg(),
            metrics: [("acc".to_string(), acc)].into_iter().collect(),
            headline: "acc".into(),
            trainable_params: 1234,
            total_params: 22_000_000,
            trainable_pct: 0.0056,
            train_seconds: 10.0,
            eval_seconds: 1.0,
            samples_per_sec: 200.0,
            peak_rss_bytes: Some(300 << 20),
            adapter_bytes: 5000,
            optimizer_state_bytes: Some(9876),
            steps: 63,
            skipped_steps: 0,
            train_examples: 2000,
            dev_examples: 872,
            losses: vec![(1, 0.7), (63, 0.3)],
            sparse: None,
            quant_base: None,
        }
    }

    #[test]
    fn results_round_trip_and_resume_key_includes_recipe() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("results.json");
        assert_eq!(Results::load(&p).unwrap(), Results::default());
        let mut r = Results { profile: "default".into(), ..Default::default() };
        r.upsert(rec("sst2", "head", 0, 0.8));
        r.upsert(rec("sst2", "head", 0, 0.9));
        assert_eq!(r.runs.len(), 1);
        r.save(&p).unwrap();
        let back = Results::load(&p).unwrap();
        assert_eq!(back, r);
        assert!(back.find("sst2", "head", 0, &cfg()).is_some());
        let other = TrainConfig { epochs: 2, ..cfg() };
        assert!(back.find("sst2", "head", 0, &other).is_none());
        assert!(back.find("sst2", "head", 1, &cfg()).is_none());
        std::fs::write(&p, "not json").unwrap();
        assert!(Results::load(&p).is_err());
    }

    #[test]
    fn markdown_table_has_methods_tasks_mean_std_and_avg() {
        let mut r = Results::default();
        r.upsert(rec("sst2", "head", 0, 0.80));
        r.upsert(rec("sst2", "head", 1, 0.82));
        r.upsert(rec("mrpc", "head", 0, 0.70));
        r.upsert(rec("sst2", "lora", 0, 0.90));
        let md = markdown(&r, &[]);
        assert!(md.contains("| Method | # Trainable Parameters | SST-2 | MRPC | Avg. |"), "{md}");
        assert!(md.contains("| head | 1.2K (0.01%) | 81.0±1.4 | 70.0 | 75.5 |"), "{md}");
        assert!(md.contains("| lora | 1.2K (0.01%) | 90.0 | – | – |"), "{md}");
    }

    #[test]
    fn squarehead_runs_get_their_sparsity_teacher_and_gemm_row() {
        let mut r = Results::default();
        let mut x = rec("sst2", "squarehead-75", 0, 0.77);
        x.sparse = Some(crate::squarehead::SparseInference {
            sparsity: 0.75,
            teacher_metrics: [("acc".to_string(), 0.79)].into_iter().collect(),
            teacher_train_seconds: 20.0,
            dense_bytes: 4 << 20,
            csr_bytes: 2 << 20,
            timings: vec![
                crate::squarehead::GemmTiming { rows: 1, dense_s: 0.002, csr_s: 0.001, csr_portable_s: 0.001 },
                crate::squarehead::GemmTiming { rows: 128, dense_s: 0.01, csr_s: 0.02, csr_portable_s: 0.04 },
            ],
        });
        r.upsert(x);
        r.upsert(rec("sst2", "lora", 0, 0.78));
        let md = markdown(&r, &[]);
        assert!(md.contains("## SquareHead"), "{md}");
        assert!(
            md.contains(
                "| sst2 | squarehead-75 | 0 | 75.0% | 77.0 | 79.0 | 4.0 MiB / 2.0 MiB | 2.000 / 1.000 ms (0.50x; portable 0.50x) | 10.000 / 20.000 ms (2.00x; portable 4.00x) |"
            ),
            "{md}"
        );
        // Runs without sparse figures get no section.
        let mut plain = Results::default();
        plain.upsert(rec("sst2", "lora", 0, 0.78));
        assert!(!markdown(&plain, &[]).contains("## SquareHead"));
    }

    #[test]
    fn quantized_bases_get_their_bits_per_param_row() {
        let mut r = Results::default();
        let mut x = rec("sst2", "lq-lora-2.75", 0, 0.74);
        // 1,000,000 parameters in 343,750 bytes: 2.75 bits each.
        x.quant_base = Some(QuantBase { params: 1_000_000, bytes: 343_750 });
        r.upsert(x);
        r.upsert(rec("sst2", "lora", 0, 0.78));
        let md = markdown(&r, &[]);
        assert!(md.contains("## Quantized base"), "{md}");
        assert!(md.contains("| sst2 | lq-lora-2.75 | 0 | acc 74.0 | 1000000 | 335.7 KiB | 2.750 |"), "{md}");
        let section = md.split("## Quantized base").nth(1).unwrap().split("\n## ").next().unwrap();
        assert_eq!(section.lines().filter(|l| l.starts_with("| sst2 |")).count(), 1, "a dense base gets no row");
        let mut plain = Results::default();
        plain.upsert(rec("sst2", "lora", 0, 0.78));
        assert!(!markdown(&plain, &[]).contains("## Quantized base"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_params(22_713_216), "22.71M");
        assert_eq!(human_params(37_632), "37.6K");
        assert_eq!(human_bytes(2048), "2.0 KiB");
    }
}
