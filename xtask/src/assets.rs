//! `cargo xtask assets`: which files each suite needs, which are missing, and how to get them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use peft_core::io::assets::{assets_dir, ASSETS_ENV};

use crate::glue::tasks::Task;
use crate::model::MINILM_DIR;

/// One needed file, relative to the asset directory, and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// Path relative to the asset directory.
    pub rel: String,
    /// How to obtain it.
    pub source: &'static str,
}

const MINILM_SOURCE: &str = "Hugging Face Hub model sentence-transformers/all-MiniLM-L6-v2 \
     (`huggingface-cli download sentence-transformers/all-MiniLM-L6-v2 --local-dir <assets>/models/all-MiniLM-L6-v2`)";
pub(crate) const GLUE_SOURCE: &str =
    "GLUE TSVs in the original layout (Hugging Face Hub dataset nyu-mll/glue exported to TSV, \
     or the GLUE site's download script); formats in <assets>/data/glue/README.md";

/// The files the GLUE suite needs for `tasks`.
pub fn glue_needs(tasks: &[Task]) -> Vec<Need> {
    let mut v: Vec<Need> = ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .map(|f| Need { rel: format!("{MINILM_DIR}/{f}"), source: MINILM_SOURCE })
        .collect();
    for t in tasks {
        for split in ["train", "dev"] {
            if split == "train" && !t.has_train() {
                continue;
            }
            v.push(Need { rel: format!("data/glue/{}/{split}.tsv", t.dir()), source: GLUE_SOURCE });
        }
    }
    v
}

/// The needs missing under `dir` (all of them when there is no asset directory).
pub fn missing(dir: Option<&Path>, needs: &[Need]) -> Vec<Need> {
    needs.iter().filter(|n| dir.is_none_or(|d| !d.join(&n.rel).is_file())).cloned().collect()
}

/// The message printed for missing assets.
pub fn explain(dir: Option<&Path>, missing: &[Need]) -> String {
    let mut s = String::new();
    match dir {
        Some(d) => {
            let _ = writeln!(s, "asset directory: {}", d.display());
        }
        None => {
            let _ = writeln!(
                s,
                "no asset directory found: set {ASSETS_ENV} to the shared asset pack folder (the one holding \
                 models/ and data/), or put the pack at <workspace>/../shared/assets"
            );
        }
    }
    let _ = writeln!(s, "{} missing file(s):", missing.len());
    let mut last = "";
    for n in missing {
        let _ = writeln!(s, "  - {}", n.rel);
        if n.source != last {
            let _ = writeln!(s, "      get it from: {}", n.source);
            last = n.source;
        }
    }
    s
}

/// Checks the needs; `Ok(dir)` when all are present, else `Err(message)`.
///
/// # Errors
/// The human-readable list of what is missing and how to get it.
pub fn check(needs: &[Need]) -> Result<PathBuf, String> {
    let dir = assets_dir();
    let miss = missing(dir.as_deref(), needs);
    match dir {
        Some(d) if miss.is_empty() => Ok(d),
        d => Err(explain(d.as_deref(), &miss)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glue_needs_skip_missing_train_splits() {
        let n = glue_needs(&[Task::Sst2, Task::Qnli]);
        let rels: Vec<_> = n.iter().map(|n| n.rel.as_str()).collect();
        assert!(rels.contains(&"models/all-MiniLM-L6-v2/model.safetensors"));
        assert!(rels.contains(&"data/glue/SST-2/train.tsv"));
        assert!(rels.contains(&"data/glue/QNLI/dev.tsv"));
        assert!(!rels.contains(&"data/glue/QNLI/train.tsv"));
    }

    #[test]
    fn missing_lists_absent_files_and_explains_sources() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("data/glue/SST-2")).unwrap();
        std::fs::write(t.path().join("data/glue/SST-2/train.tsv"), "").unwrap();
        let needs = glue_needs(&[Task::Sst2]);
        let miss = missing(Some(t.path()), &needs);
        assert_eq!(miss.len(), needs.len() - 1);
        let msg = explain(Some(t.path()), &miss);
        assert!(msg.contains("data/glue/SST-2/dev.tsv"), "{msg}");
        assert!(msg.contains("sentence-transformers/all-MiniLM-L6-v2"), "{msg}");
        assert!(msg.contains("nyu-mll/glue"), "{msg}");
        assert_eq!(missing(None, &needs).len(), needs.len());
        assert!(explain(None, &needs).contains(ASSETS_ENV));
    }
}
