//! `report.md` of the audio suite: accuracy (mean±std over seeds) per protocol, trainable parameters, training
//! throughput (clips/s), then the per-run cost table (the GLUE report's shape).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::AudioTask;
use crate::report::{human_bytes, human_params, Record, Results};

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, var.sqrt())
}

/// The methods in first-run order.
pub fn methods(res: &Results) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in &res.runs {
        if !v.contains(&r.method) {
            v.push(r.method.clone());
        }
    }
    v
}

/// The tasks present, in table order.
pub fn tasks(res: &Results) -> Vec<AudioTask> {
    AudioTask::ALL.into_iter().filter(|t| res.runs.iter().any(|r| r.task == t.name())).collect()
}

/// Renders the report.
pub fn markdown(res: &Results, plots: &[String], wall_seconds: f64) -> String {
    let mut s = String::new();
    let m = &res.machine;
    let _ = writeln!(s, "# Audio benchmark: FSDD spoken digits, Whisper tiny.en encoder ({} profile)\n", res.profile);
    let _ = writeln!(
        s,
        "Machine: {} ({} cores, {} threads), {}; commit `{}`. Encoder input: 1 s log-mel windows (100 frames, the \
         first 50 positional embeddings), frame-mean pooling, linear head; the head and the final LayerNorm train \
         under every method. Test accuracy x100, mean±std over seeds; clips/s = training clips per second. \
         This invocation's wall time: {:.1} min.\n",
        m.cpu,
        m.cores,
        m.threads,
        m.os,
        m.git_commit,
        wall_seconds / 60.0
    );
    let ts = tasks(res);
    let _ = write!(s, "| Method | # Trainable Parameters |");
    for t in &ts {
        let _ = write!(s, " {} |", t.display());
    }
    let _ = writeln!(s, " Train clips/s | Seeds |");
    let _ = writeln!(s, "|---|---:|{}---:|---:|", "---:|".repeat(ts.len()));
    for meth in methods(res) {
        let runs: Vec<&Record> = res.runs.iter().filter(|r| r.method == meth).collect();
        let params = runs.iter().map(|r| r.trainable_params).max().unwrap_or(0);
        let pct = runs.iter().map(|r| r.trainable_pct).fold(0.0, f64::max);
        let _ = write!(s, "| {meth} | {} ({pct:.2}%) |", human_params(params));
        for t in &ts {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.task == t.name())
                .filter_map(|r| r.metrics.get("acc"))
                .map(|x| 100.0 * x)
                .collect();
            if v.is_empty() {
                let _ = write!(s, " – |");
            } else {
                let (mu, sd) = mean_std(&v);
                let _ = if v.len() > 1 { write!(s, " {mu:.1}±{sd:.1} |") } else { write!(s, " {mu:.1} |") };
            }
        }
        let cps: Vec<f64> = runs.iter().map(|r| r.samples_per_sec).collect();
        let seeds: BTreeSet<u64> = runs.iter().map(|r| r.seed).collect();
        let _ = writeln!(s, " {:.1} | {} |", mean_std(&cps).0, seeds.len());
    }
    let _ = writeln!(s, "\n## Cost per run\n");
    let _ = writeln!(
        s,
        "| Task | Method | Seed | Acc | Train clips | Steps | Train s | Clips/s | Eval s | Peak RSS | Adapter file |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &res.runs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} |",
            r.task,
            r.method,
            r.seed,
            100.0 * r.metrics.get("acc").copied().unwrap_or(f64::NAN),
            r.train_examples,
            r.steps,
            r.train_seconds,
            r.samples_per_sec,
            r.eval_seconds,
            r.peak_rss_bytes.map_or("–".into(), human_bytes),
            human_bytes(r.adapter_bytes)
        );
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
mod tests {
    use super::*;
    use crate::report::tests::rec;

    #[test]
    fn table_has_protocol_columns_mean_std_and_throughput() {
        let mut r = Results::default();
        r.upsert(rec("fsdd", "linear", 0, 0.90));
        r.upsert(rec("fsdd", "linear", 1, 0.92));
        r.upsert(rec("fsdd-speaker", "linear", 0, 0.70));
        r.upsert(rec("fsdd", "conformer", 0, 0.95));
        let md = markdown(&r, &[], 60.0);
        assert!(
            md.contains("| Method | # Trainable Parameters | FSDD shipped split | FSDD speaker `george` held out |"),
            "{md}"
        );
        assert!(md.contains("| linear | 1.2K (0.01%) | 91.0±1.4 | 70.0 | 200.0 | 2 |"), "{md}");
        assert!(md.contains("| conformer | 1.2K (0.01%) | 95.0 | – | 200.0 | 1 |"), "{md}");
        assert!(md.contains("wall time: 1.0 min"));
    }
}
