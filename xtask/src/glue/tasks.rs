//! The GLUE tasks the bench knows: where their files are, how their columns map to text pairs and labels, and
//! which metrics score them (as in the GLUE paper and the LoRA paper's Table 2).

use std::fmt;

use anyhow::{bail, Result};

/// A GLUE task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// Stanford Sentiment Treebank, binary.
    Sst2,
    /// Microsoft Research Paraphrase Corpus, sentence pairs.
    Mrpc,
    /// Corpus of Linguistic Acceptability.
    Cola,
    /// Semantic Textual Similarity Benchmark, regression 0..5.
    Stsb,
    /// Recognizing Textual Entailment.
    Rte,
    /// Winograd NLI.
    Wnli,
    /// Question NLI (only dev is in the asset pack: no training set, so it cannot be benched).
    Qnli,
}

/// How the label column is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelKind {
    /// `0` / `1`.
    Binary,
    /// `entailment` (0) / `not_entailment` (1), HF's label order.
    Entailment,
    /// A float score (regression).
    Score,
}

/// Which columns hold the texts and the label: by header name, or by index for header-less files (CoLA).
#[derive(Clone, Copy, Debug)]
pub enum Columns {
    /// Files with a header row.
    Named { a: &'static str, b: Option<&'static str>, label: &'static str },
    /// Labelled files without a header (CoLA train/dev); the unlabelled test file has a header `index sentence`.
    Indexed { a: usize, label: usize },
}

/// A task's metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Accuracy.
    Accuracy,
    /// Binary F1 of class 1.
    F1,
    /// Matthews correlation coefficient.
    Matthews,
    /// Pearson correlation.
    Pearson,
    /// Spearman rank correlation.
    Spearman,
}

impl Metric {
    /// Short column name for tables.
    pub fn short(self) -> &'static str {
        match self {
            Metric::Accuracy => "acc",
            Metric::F1 => "f1",
            Metric::Matthews => "mcc",
            Metric::Pearson => "pearson",
            Metric::Spearman => "spearman",
        }
    }
}

impl Task {
    /// Every task, in GLUE order as the LoRA paper's table (minus MNLI/QQP, which are not in the asset pack).
    pub const ALL: [Task; 7] = [Task::Sst2, Task::Mrpc, Task::Cola, Task::Qnli, Task::Rte, Task::Stsb, Task::Wnli];

    /// The CLI / results name (`sst2`, `mrpc`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Task::Sst2 => "sst2",
            Task::Mrpc => "mrpc",
            Task::Cola => "cola",
            Task::Stsb => "stsb",
            Task::Rte => "rte",
            Task::Wnli => "wnli",
            Task::Qnli => "qnli",
        }
    }

    /// Table header as the GLUE paper spells it.
    pub fn display(self) -> &'static str {
        match self {
            Task::Sst2 => "SST-2",
            Task::Mrpc => "MRPC",
            Task::Cola => "CoLA",
            Task::Stsb => "STS-B",
            Task::Rte => "RTE",
            Task::Wnli => "WNLI",
            Task::Qnli => "QNLI",
        }
    }

    /// Parses a CLI name (case-insensitive; `sst-2` and `sst2` both work).
    ///
    /// # Errors
    /// Unknown names, listing the known ones.
    pub fn parse(s: &str) -> Result<Task> {
        let k = s.trim().to_ascii_lowercase().replace(['-', '_'], "");
        for t in Task::ALL {
            if t.name() == k {
                return Ok(t);
            }
        }
        let known: Vec<_> = Task::ALL.iter().map(|t| t.name()).collect();
        bail!("unknown GLUE task {s:?}; known: {}", known.join(", "))
    }

    /// Folder under `data/glue/` in the asset pack.
    pub fn dir(self) -> &'static str {
        self.display()
    }

    /// Whether the asset pack has a training split for this task.
    pub fn has_train(self) -> bool {
        self != Task::Qnli
    }

    /// Column layout of the labelled files.
    pub fn columns(self) -> Columns {
        match self {
            Task::Sst2 => Columns::Named { a: "sentence", b: None, label: "label" },
            Task::Mrpc => Columns::Named { a: "#1 String", b: Some("#2 String"), label: "Quality" },
            Task::Cola => Columns::Indexed { a: 3, label: 1 },
            Task::Stsb => Columns::Named { a: "sentence1", b: Some("sentence2"), label: "score" },
            Task::Rte | Task::Wnli => Columns::Named { a: "sentence1", b: Some("sentence2"), label: "label" },
            Task::Qnli => Columns::Named { a: "question", b: Some("sentence"), label: "label" },
        }
    }

    /// How labels are spelled.
    pub fn label_kind(self) -> LabelKind {
        match self {
            Task::Rte | Task::Qnli => LabelKind::Entailment,
            Task::Stsb => LabelKind::Score,
            _ => LabelKind::Binary,
        }
    }

    /// Number of model outputs: 1 for regression (STS-B), else the class count.
    pub fn num_outputs(self) -> usize {
        if self == Task::Stsb {
            1
        } else {
            2
        }
    }

    /// Metrics reported for this task; the first is the headline one (the LoRA paper's choice: MCC for CoLA,
    /// Pearson for STS-B, accuracy elsewhere).
    pub fn metrics(self) -> &'static [Metric] {
        match self {
            Task::Cola => &[Metric::Matthews],
            Task::Mrpc => &[Metric::Accuracy, Metric::F1],
            Task::Stsb => &[Metric::Pearson, Metric::Spearman],
            _ => &[Metric::Accuracy],
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_names_and_glue_spellings() {
        assert_eq!(Task::parse("SST-2").unwrap(), Task::Sst2);
        assert_eq!(Task::parse("sts_b").unwrap(), Task::Stsb);
        assert_eq!(Task::parse(" mrpc ").unwrap(), Task::Mrpc);
        let e = Task::parse("mnli").unwrap_err().to_string();
        assert!(e.contains("known: sst2, mrpc"), "{e}");
    }

    #[test]
    fn every_task_round_trips_its_name() {
        for t in Task::ALL {
            assert_eq!(Task::parse(t.name()).unwrap(), t);
            assert!(!t.metrics().is_empty());
        }
    }
}
