//! GLUE TSV loaders.
//!
//! The files are read the way Hugging Face's GLUE processors (and `csv.reader(..., quoting=csv.QUOTE_NONE)`) read
//! them: split on tabs with **quoting off**, so a field that starts with `"` keeps its quotes (MRPC, SST-2 and
//! CoLA have such fields, some unbalanced). A leading UTF-8 byte-order mark is dropped, `\r\n` line ends are
//! accepted, and unlabelled files (the `test.tsv` splits) load with `label: None`.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::tasks::{Columns, LabelKind, Task};

/// A gold label.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Label {
    /// Class index.
    Class(usize),
    /// Regression target (STS-B similarity, 0..5).
    Score(f32),
}

impl Label {
    /// The class index (0 for a score, which never happens for a classification task).
    pub fn class(self) -> usize {
        match self {
            Label::Class(c) => c,
            Label::Score(_) => 0,
        }
    }

    /// The value as a float (class index or score).
    pub fn value(self) -> f64 {
        match self {
            Label::Class(c) => c as f64,
            Label::Score(s) => f64::from(s),
        }
    }
}

/// One example: a sentence or a sentence pair and its label (absent in test files).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// First (or only) sentence.
    pub a: String,
    /// Second sentence of a pair task.
    pub b: Option<String>,
    /// Gold label; `None` for unlabelled test rows.
    pub label: Option<Label>,
}

/// Reads `<glue_dir>/<TASK>/<split>.tsv` (`split` = `train`, `dev` or `test`).
///
/// # Errors
/// IO errors and malformed rows, with the file and line.
pub fn load(glue_dir: &Path, task: Task, split: &str) -> Result<Vec<Example>> {
    let path = glue_dir.join(task.dir()).join(format!("{split}.tsv"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text, task).with_context(|| format!("parsing {}", path.display()))
}

fn parse_label(kind: LabelKind, s: &str) -> Result<Label> {
    let s = s.trim();
    Ok(match (kind, s) {
        (LabelKind::Binary, "0") | (LabelKind::Entailment, "entailment") => Label::Class(0),
        (LabelKind::Binary, "1") | (LabelKind::Entailment, "not_entailment") => Label::Class(1),
        (LabelKind::Score, _) => {
            let v: f32 = s.parse().with_context(|| format!("score {s:?} is not a number"))?;
            if !v.is_finite() {
                bail!("score {s:?} is not finite");
            }
            Label::Score(v)
        }
        _ => bail!("unexpected label {s:?} for {kind:?} labels"),
    })
}

/// Parses the text of one GLUE TSV file of `task` (see the module docs for the dialect).
///
/// # Errors
/// A missing text column in the header, a row with too few fields, or an unreadable label (with the line number).
pub fn parse(text: &str, task: Task) -> Result<Vec<Example>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).enumerate().peekable();
    let first = lines.peek().map(|(_, l)| l.split('\t').collect::<Vec<_>>()).unwrap_or_default();
    // (text a, text b, label) column indices.
    let (ia, ib, il): (usize, Option<usize>, Option<usize>) = match task.columns() {
        Columns::Indexed { a, label } if first.first() != Some(&"index") => (a, None, Some(label)),
        cols => {
            let (a, b, label) = match cols {
                Columns::Named { a, b, label } => (a, b, label),
                // CoLA's unlabelled test file has the header `index sentence`.
                Columns::Indexed { .. } => ("sentence", None, "label"),
            };
            let find = |name: &str| first.iter().position(|h| h.trim() == name);
            let ia = find(a).with_context(|| format!("header {first:?} has no column {a:?}"))?;
            let ib = match b {
                Some(b) => Some(find(b).with_context(|| format!("header {first:?} has no column {b:?}"))?),
                None => None,
            };
            lines.next();
            (ia, ib, find(label))
        }
    };
    let need = 1 + ia.max(ib.unwrap_or(0)).max(il.unwrap_or(0));
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < need {
            bail!("line {}: expected at least {need} tab-separated fields, found {}", i + 1, f.len());
        }
        let label = match il {
            Some(il) => Some(parse_label(task.label_kind(), f[il]).with_context(|| format!("line {}", i + 1))?),
            None => None,
        };
        out.push(Example { a: f[ia].to_string(), b: ib.map(|ib| f[ib].to_string()), label });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sst2_keeps_quotes_literally() {
        let t = "sentence\tlabel\n\"a film \" that works \t1\nit 's dull \t0\n";
        let ex = parse(t, Task::Sst2).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].a, "\"a film \" that works ");
        assert_eq!(ex[0].label, Some(Label::Class(1)));
        assert_eq!(ex[1].b, None);
    }

    #[test]
    fn mrpc_strips_bom_and_reads_pairs_by_header_name() {
        let t = "\u{feff}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t11\t12\tHe said \"no.\tShe said no.\r\n";
        let ex = parse(t, Task::Mrpc).unwrap();
        assert_eq!(
            ex,
            vec![Example { a: "He said \"no.".into(), b: Some("She said no.".into()), label: Some(Label::Class(1)) }]
        );
    }

    #[test]
    fn test_files_without_label_column_load_unlabelled() {
        let t = "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA\tB\n";
        let ex = parse(t, Task::Mrpc).unwrap();
        assert_eq!(ex[0].label, None);
        assert_eq!(ex[0].b.as_deref(), Some("B"));
        let ex = parse("index\tsentence\n0\tA sentence .\n", Task::Sst2).unwrap();
        assert_eq!((ex[0].a.as_str(), ex[0].label), ("A sentence .", None));
    }

    #[test]
    fn cola_has_no_header_and_its_test_file_has_one() {
        let t = "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more does Bill smoke.\n";
        let ex = parse(t, Task::Cola).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[1].a, "The more does Bill smoke.");
        assert_eq!(ex[1].label, Some(Label::Class(0)));
        let ex = parse("index\tsentence\n0\tBill laughed.\n", Task::Cola).unwrap();
        assert_eq!((ex[0].a.as_str(), ex[0].label), ("Bill laughed.", None));
    }

    #[test]
    fn stsb_reads_scores_and_rte_reads_entailment_names() {
        let h = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n";
        let ex = parse(&format!("{h}0\tg\tf\t2012\t0\tnone\tnone\tA man.\tA guy.\t3.800\n"), Task::Stsb).unwrap();
        assert_eq!(ex[0].label, Some(Label::Score(3.8)));
        assert_eq!(ex[0].b.as_deref(), Some("A guy."));
        let t = "index\tsentence1\tsentence2\tlabel\n0\tA\tB\tnot_entailment\n1\tC\tD\tentailment\n";
        let ex = parse(t, Task::Rte).unwrap();
        assert_eq!(ex[0].label, Some(Label::Class(1)));
        assert_eq!(ex[1].label, Some(Label::Class(0)));
    }

    #[test]
    fn malformed_rows_are_errors_with_line_numbers() {
        let e = format!("{:#}", parse("sentence\tlabel\nok\t1\nno label here\n", Task::Sst2).unwrap_err());
        assert!(e.contains("line 3"), "{e}");
        let e = format!("{:#}", parse("sentence\tlabel\nok\tpositive\n", Task::Sst2).unwrap_err());
        assert!(e.contains("line 2") && e.contains("positive"), "{e}");
        let e = format!("{:#}", parse("text\tlabel\nok\t1\n", Task::Sst2).unwrap_err());
        assert!(e.contains("no column \"sentence\""), "{e}");
        assert!(parse("", Task::Sst2).is_err());
    }
}
