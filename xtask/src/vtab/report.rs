//! `results.json` and `report.md` of the VTAB-1k suite: a table shaped like the Hydra/SPT VTAB tables (methods x
//! tasks, top-1 test accuracy, trainable parameters), group means and means labelled by what they average, a cost
//! table, and the few-shot table of the training-free methods.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use peft_vision::harness::RecipeConfig;
use serde::{Deserialize, Serialize};

use super::tasks::{label_of, order_key, Group};
use crate::report::{human_bytes, human_params, Machine};

/// One finished fine-tuning run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VtabRecord {
    /// Task name.
    pub task: String,
    /// Its VTAB group.
    pub group: Group,
    /// Method name.
    pub method: String,
    /// Method description.
    pub method_desc: String,
    /// Seed.
    pub seed: u64,
    /// The recipe (lr included); a record whose recipe or resolution differs from the current one is re-run.
    pub recipe: RecipeConfig,
    /// Input resolution (pixels).
    pub resolution: usize,
    /// Top-1 accuracy on the evaluation split (0..1).
    pub accuracy: f64,
    /// Trainable parameters (method + head).
    pub trainable_params: u64,
    /// Parameters of the pretrained backbone + head.
    pub total_params: u64,
    /// 100 · trainable / total.
    pub trainable_pct: f64,
    /// Training seconds.
    pub train_seconds: f64,
    /// Evaluation seconds.
    pub eval_seconds: f64,
    /// Training images per second.
    pub samples_per_sec: f64,
    /// Peak RSS during the run.
    pub peak_rss_bytes: Option<u64>,
    /// Bytes of the saved adapter folder (0 for the linear probe, whose head is not saved).
    pub adapter_bytes: u64,
    /// Optimizer state at the end of training: the trainer's AdamW plus what the adapter steps itself (sparse
    /// methods' O(k) state); `None` in records written before it was measured.
    #[serde(default)]
    pub optimizer_state_bytes: Option<u64>,
    /// Optimizer steps.
    pub steps: usize,
    /// Skipped (non-finite) steps.
    pub skipped_steps: usize,
    /// Training images.
    pub train_examples: usize,
    /// Evaluation images.
    pub test_examples: usize,
    /// (step, mean loss) points.
    pub losses: Vec<(usize, f64)>,
    /// SquareHead runs: the sparsity reached and the dense teacher's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub squarehead: Option<SquareheadFigures>,
}

/// What a SquareHead run reports beyond the common record.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SquareheadFigures {
    /// Fraction of zeros over the pruned matrices after training.
    pub sparsity: f64,
    /// Test accuracy of the dense teacher the student was distilled from.
    pub teacher_accuracy: f64,
    /// Seconds the teacher trained (once per task and seed; not in the student's `train_seconds`).
    pub teacher_train_seconds: f64,
}

/// One few-shot result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FewShotRecord {
    /// Task name.
    pub task: String,
    /// Method name.
    pub method: String,
    /// Shots per class.
    pub shots: usize,
    /// Seed of the support draw.
    pub seed: u64,
    /// Test accuracy (0..1).
    pub accuracy: f64,
    /// Validation accuracy at the chosen hyper-parameters (training-free methods).
    pub val_accuracy: Option<f64>,
    /// Chosen hyper-parameters.
    pub hyper: BTreeMap<String, f64>,
}

/// The whole results file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VtabResults {
    /// Profile name.
    pub profile: String,
    /// Where it ran.
    pub machine: Machine,
    /// Wall seconds of the last invocation.
    #[serde(default)]
    pub wall_seconds: f64,
    /// Profile notes written into the report.
    #[serde(default)]
    pub notes: Vec<String>,
    /// Fine-tuning runs.
    pub runs: Vec<VtabRecord>,
    /// Few-shot runs.
    #[serde(default)]
    pub fewshot: Vec<FewShotRecord>,
}

impl VtabResults {
    /// Reads `path`, or an empty set when it does not exist.
    ///
    /// # Errors
    /// An unreadable or malformed file.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&s).with_context(|| {
            format!("{} is not a VTAB results file (move it away or pass another --out)", path.display())
        })
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

    /// The finished run for this key, recipe and resolution.
    pub fn find(&self, task: &str, method: &str, seed: u64, recipe: &RecipeConfig, res: usize) -> Option<&VtabRecord> {
        self.runs.iter().find(|r| {
            r.task == task && r.method == method && r.seed == seed && &r.recipe == recipe && r.resolution == res
        })
    }

    /// Adds or replaces the record with the same key.
    pub fn upsert(&mut self, rec: VtabRecord) {
        self.runs.retain(|r| !(r.task == rec.task && r.method == rec.method && r.seed == rec.seed));
        self.runs.push(rec);
    }

    /// Adds or replaces a few-shot record.
    pub fn upsert_fewshot(&mut self, rec: FewShotRecord) {
        self.fewshot
            .retain(|r| !(r.task == rec.task && r.method == rec.method && r.shots == rec.shots && r.seed == rec.seed));
        self.fewshot.push(rec);
    }

    /// Tasks in table order.
    pub fn tasks(&self) -> Vec<(String, Group)> {
        let mut t: Vec<(String, Group)> = Vec::new();
        for r in &self.runs {
            if !t.iter().any(|x| x.0 == r.task) {
                t.push((r.task.clone(), r.group));
            }
        }
        t.sort_by_key(|x| order_key(&x.0));
        t
    }

    /// Methods in first-run order.
    pub fn methods(&self) -> Vec<String> {
        let mut m: Vec<String> = Vec::new();
        for r in &self.runs {
            if !m.contains(&r.method) {
                m.push(r.method.clone());
            }
        }
        m
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = mean(v);
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() as f64 - 1.0) } else { 0.0 };
    (m, var.sqrt())
}

/// Renders report.md.
pub fn markdown(res: &VtabResults, plots: &[String]) -> String {
    let mut s = String::new();
    let m = &res.machine;
    let _ = writeln!(s, "# VTAB-1k benchmark ({} profile)\n", res.profile);
    let _ = writeln!(
        s,
        "Machine: {} ({} cores, {} threads), {}; commit `{}`. Backbone: facebook/dinov2-small (ViT-S/14, 22.1M \
         parameters), head on CLS ‖ patch mean. Top-1 **test** accuracy x100 of the model at the end of training, \
         mean±std over seeds. **No best-epoch selection on the test split**: each model is trained on \
         train800val200 and scored once on test. Wall time of this invocation: {:.1} min.\n",
        m.cpu,
        m.cores,
        m.threads,
        m.os,
        m.git_commit,
        res.wall_seconds / 60.0
    );
    for n in &res.notes {
        let _ = writeln!(s, "- {n}");
    }
    if !res.notes.is_empty() {
        let _ = writeln!(s);
    }
    let tasks = res.tasks();
    let methods = res.methods();
    let groups: Vec<Group> = [Group::Natural, Group::Specialized, Group::Structured]
        .into_iter()
        .filter(|g| tasks.iter().any(|t| t.1 == *g))
        .collect();
    let vtab_groups_complete = groups.len() == 3;
    if !tasks.is_empty() {
        let _ = write!(s, "| Method | Params (M) |");
        for (t, _) in &tasks {
            let _ = write!(s, " {} |", label_of(t));
        }
        for g in &groups {
            let _ = write!(s, " {} mean |", g.name());
        }
        if vtab_groups_complete {
            let _ = write!(s, " Avg. (mean of group means) |");
        }
        let _ = writeln!(s, " Mean of {} tasks |", tasks.len());
        let ncols = tasks.len() + groups.len() + usize::from(vtab_groups_complete) + 1;
        let _ = writeln!(s, "|---|---:|{}", "---:|".repeat(ncols));
        for meth in &methods {
            let runs: Vec<&VtabRecord> = res.runs.iter().filter(|r| &r.method == meth).collect();
            let params = runs.iter().map(|r| r.trainable_params).max().unwrap_or(0);
            let _ = write!(s, "| {meth} | {:.3} |", params as f64 / 1e6);
            let mut per_task: Vec<(Group, f64)> = Vec::new();
            for (t, g) in &tasks {
                let v: Vec<f64> = runs.iter().filter(|r| &r.task == t).map(|r| 100.0 * r.accuracy).collect();
                if v.is_empty() {
                    let _ = write!(s, " – |");
                } else {
                    let (mu, sd) = mean_std(&v);
                    per_task.push((*g, mu));
                    if v.len() > 1 {
                        let _ = write!(s, " {mu:.1}±{sd:.1} |");
                    } else {
                        let _ = write!(s, " {mu:.1} |");
                    }
                }
            }
            let complete = per_task.len() == tasks.len();
            let mut gmeans = Vec::new();
            for g in &groups {
                let v: Vec<f64> = per_task.iter().filter(|x| x.0 == *g).map(|x| x.1).collect();
                let n_g = tasks.iter().filter(|t| t.1 == *g).count();
                if v.len() == n_g {
                    gmeans.push(mean(&v));
                    let _ = write!(s, " {:.1} |", mean(&v));
                } else {
                    let _ = write!(s, " – |");
                }
            }
            if vtab_groups_complete {
                if gmeans.len() == 3 {
                    let _ = write!(s, " {:.1} |", mean(&gmeans));
                } else {
                    let _ = write!(s, " – |");
                }
            }
            if complete {
                let _ = writeln!(s, " {:.1} |", mean(&per_task.iter().map(|x| x.1).collect::<Vec<_>>()));
            } else {
                let _ = writeln!(s, " – |");
            }
        }
        let _ = writeln!(
            s,
            "\nColumns marked * are this project's VTAB-1k-style stand-ins (same 800/200 split sizes; CIFAR-10, not \
             VTAB's CIFAR-100; Fashion-MNIST is not a VTAB task and counts in group \"Other\"). Group means average \
             the tasks of a group present here; \"Avg. (mean of group means)\" is the Hydra/FacT/PETL-ViT \
             convention and appears only when all three groups are present; \"Mean of N tasks\" is the plain mean \
             over the columns (NOAH's convention on the 19 tasks)."
        );
        let _ = writeln!(s, "\n## Cost per run\n");
        let _ = writeln!(
            s,
            "| Task | Method | Seed | Acc. | Trainable | Train imgs | Test imgs | Steps | Train s | Imgs/s | Eval s | Peak RSS | Optimizer state | Adapter file |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut sorted: Vec<&VtabRecord> = res.runs.iter().collect();
        sorted.sort_by_key(|r| (order_key(&r.task), methods.iter().position(|m| m == &r.method), r.seed));
        for r in sorted {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {} ({:.2}%) | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                r.task,
                r.method,
                r.seed,
                100.0 * r.accuracy,
                human_params(r.trainable_params),
                r.trainable_pct,
                r.train_examples,
                r.test_examples,
                r.steps,
                r.train_seconds,
                r.samples_per_sec,
                r.eval_seconds,
                r.peak_rss_bytes.map_or("–".into(), human_bytes),
                r.optimizer_state_bytes.map_or("–".into(), human_bytes),
                if r.adapter_bytes == 0 { "–".into() } else { human_bytes(r.adapter_bytes) }
            );
        }
        let sq: Vec<&VtabRecord> = res.runs.iter().filter(|r| r.squarehead.is_some()).collect();
        if !sq.is_empty() {
            let _ = writeln!(s, "\n## SquareHead\n");
            let _ = writeln!(
                s,
                "The student starts from its dense teacher (full fine-tuning with `full`'s rate, trained once per task \
                 and seed), prunes the encoder matrices on the cubic schedule until two thirds of the steps and is \
                 distilled from the teacher (CE + KL on logits + normalised MSE on every hidden state).\n"
            );
            let _ = writeln!(s, "| Task | Method | Seed | Sparsity | Student acc. | Teacher acc. | Teacher train s |");
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
            for r in sq {
                if let Some(f) = &r.squarehead {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {:.1}% | {:.1} | {:.1} | {:.0} |",
                        r.task,
                        r.method,
                        r.seed,
                        100.0 * f.sparsity,
                        100.0 * r.accuracy,
                        100.0 * f.teacher_accuracy,
                        f.teacher_train_seconds
                    );
                }
            }
        }
    }
    if !res.fewshot.is_empty() {
        let _ = writeln!(s, "\n## Few-shot, training-free on frozen features\n");
        let _ = writeln!(
            s,
            "Support: k images per class drawn from train800; hyper-parameters searched on val200 (the papers' \
             grids); scored on the same test images. Image-only variants: no CLIP text tower exists here, so the \
             zero-shot term `100·f·W_txt` uses the L2-normalised class means of the support features as `W_txt` \
             (`PrototypePrior`; a nearest-class-mean classifier), and the cache keys are one view per image (no \
             augmentation). `linear` is a linear probe trained on the k-shot features with the run's recipe.\n"
        );
        let mut ftasks: Vec<String> = Vec::new();
        for r in &res.fewshot {
            if !ftasks.contains(&r.task) {
                ftasks.push(r.task.clone());
            }
        }
        ftasks.sort_by_key(|t| order_key(t));
        let shots: BTreeSet<usize> = res.fewshot.iter().map(|r| r.shots).collect();
        for t in &ftasks {
            let _ = writeln!(s, "**{}** (test accuracy x100, mean over seeds)\n", label_of(t));
            let _ = write!(s, "| Method |");
            for k in &shots {
                let _ = write!(s, " {k}-shot |");
            }
            let _ = writeln!(s);
            let _ = writeln!(s, "|---|{}", "---:|".repeat(shots.len()));
            let mut fm: Vec<String> = Vec::new();
            for r in res.fewshot.iter().filter(|r| &r.task == t) {
                if !fm.contains(&r.method) {
                    fm.push(r.method.clone());
                }
            }
            for meth in fm {
                let _ = write!(s, "| {meth} |");
                for k in &shots {
                    let v: Vec<f64> = res
                        .fewshot
                        .iter()
                        .filter(|r| &r.task == t && r.method == meth && r.shots == *k)
                        .map(|r| 100.0 * r.accuracy)
                        .collect();
                    if v.is_empty() {
                        let _ = write!(s, " – |");
                    } else {
                        let _ = write!(s, " {:.1} |", mean(&v));
                    }
                }
                let _ = writeln!(s);
            }
            let _ = writeln!(s);
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
    if !descs.is_empty() {
        let _ = writeln!(s, "\n## Methods\n");
        for (n, d) in descs {
            let _ = writeln!(s, "- `{n}`: {d}");
        }
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rec(task: &str, group: Group, method: &str, seed: u64, acc: f64) -> VtabRecord {
        VtabRecord {
            task: task.into(),
            group,
            method: method.into(),
            method_desc: format!("{method} desc"),
            seed,
            recipe: RecipeConfig::paper(),
            resolution: 56,
            accuracy: acc,
            trainable_params: 150_000,
            total_params: 22_000_000,
            trainable_pct: 0.68,
            train_seconds: 10.0,
            eval_seconds: 2.0,
            samples_per_sec: 100.0,
            peak_rss_bytes: Some(500 << 20),
            adapter_bytes: 4096,
            optimizer_state_bytes: Some(1_200_000),
            steps: 32,
            skipped_steps: 0,
            train_examples: 1000,
            test_examples: 2000,
            losses: vec![(1, 2.3), (32, 0.5)],
            squarehead: None,
        }
    }

    #[test]
    fn table_has_task_columns_group_means_and_a_labelled_mean() {
        let mut r = VtabResults { profile: "default".into(), ..Default::default() };
        r.upsert(rec("cifar10", Group::Natural, "lora", 0, 0.90));
        r.upsert(rec("cifar10", Group::Natural, "lora", 1, 0.92));
        r.upsert(rec("fashion-mnist", Group::Other, "lora", 0, 0.80));
        r.upsert(rec("cifar10", Group::Natural, "linear", 0, 0.85));
        let md = markdown(&r, &[]);
        assert!(md.contains("| Method | Params (M) | CIFAR-10* | F-MNIST* | Natural mean | Mean of 2 tasks |"), "{md}");
        assert!(md.contains("| lora | 0.150 | 91.0±1.4 | 80.0 | 91.0 | 85.5 |"), "{md}");
        assert!(md.contains("| linear | 0.150 | 85.0 | – | 85.0 | – |"), "{md}");
        assert!(md.contains("No best-epoch selection on the test split"), "{md}");
        assert!(md.contains("| 500.0 MiB | 1.1 MiB | 4.0 KiB |"), "cost row: RSS, optimizer state, adapter: {md}");
        assert!(!md.contains("mean of group means) |"), "only with all three groups: {md}");
    }

    #[test]
    fn all_three_groups_give_the_papers_average() {
        let mut r = VtabResults::default();
        for (t, g, a) in
            [("dtd", Group::Natural, 0.6), ("eurosat", Group::Specialized, 0.9), ("dmlab", Group::Structured, 0.3)]
        {
            r.upsert(rec(t, g, "lora", 0, a));
        }
        let md = markdown(&r, &[]);
        assert!(md.contains("| lora | 0.150 | 60.0 | 90.0 | 30.0 | 60.0 | 90.0 | 30.0 | 60.0 | 60.0 |"), "{md}");
    }

    #[test]
    fn results_round_trip_and_resume_key_includes_recipe_and_resolution() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("results.json");
        let mut r = VtabResults::default();
        r.upsert(rec("cifar10", Group::Natural, "lora", 0, 0.9));
        r.upsert_fewshot(FewShotRecord {
            task: "cifar10".into(),
            method: "gda".into(),
            shots: 4,
            seed: 0,
            accuracy: 0.7,
            val_accuracy: Some(0.72),
            hyper: [("alpha".to_string(), 1.0)].into(),
        });
        r.save(&p).unwrap();
        let back = VtabResults::load(&p).unwrap();
        assert_eq!(back, r);
        assert!(back.find("cifar10", "lora", 0, &RecipeConfig::paper(), 56).is_some());
        assert!(back.find("cifar10", "lora", 0, &RecipeConfig::paper(), 112).is_none());
        let other = RecipeConfig { epochs: 3, ..RecipeConfig::paper() };
        assert!(back.find("cifar10", "lora", 0, &other, 56).is_none());
        let md = markdown(&back, &[]);
        assert!(md.contains("| gda | 70.0 |"), "{md}");
    }
}
