//! VTAB-1k datasets: the folder layout this project ships and the NOAH/VTAB file lists.
//!
//! Two layouts are read (see [`VtabDataset::open`]):
//!
//! 1. **The shipped layout** (`../shared/assets/data/vtab1k-*`): `index.csv` with the header `split,path,label`,
//!    `split` one of `train` (800), `val` (200) or `test`, `path` relative to the folder; `classes.txt` with one
//!    class per line (`name` or `name<TAB>display name`, label order).
//! 2. **NOAH's lists** (the 19 official tasks as NOAH's data preparation writes them): `train800.txt`,
//!    `val200.txt`, `train800val200.txt` and `test.txt`, one `relative/path label` per line (the label is the
//!    last whitespace-separated field, so paths may contain spaces). `train800val200.txt` may be absent, in which
//!    case it is `train800.txt` followed by `val200.txt`. The class count is `classes.txt`'s when present, else
//!    the largest label + 1.
//!
//! The protocol ([`VtabSplit`]): hyper-parameters are chosen by training on `train800` and scoring `val200`; the
//! reported model is trained on `train800val200` (all 1,000) and scored once on `test`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Result, VisionError};

/// One line of a NOAH list file: image path, label, line number.
type ListRow = (String, usize, usize);

/// The four VTAB-1k splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VtabSplit {
    /// 800 training examples (hyper-parameter search).
    Train800,
    /// 200 validation examples (hyper-parameter search).
    Val200,
    /// All 1,000 (`train800` then `val200`): the final model's training set.
    Train800Val200,
    /// The evaluation split.
    Test,
}

impl VtabSplit {
    /// Every split.
    pub const ALL: [VtabSplit; 4] =
        [VtabSplit::Train800, VtabSplit::Val200, VtabSplit::Train800Val200, VtabSplit::Test];

    /// The NOAH list file of the split.
    pub fn list_file(self) -> &'static str {
        match self {
            VtabSplit::Train800 => "train800.txt",
            VtabSplit::Val200 => "val200.txt",
            VtabSplit::Train800Val200 => "train800val200.txt",
            VtabSplit::Test => "test.txt",
        }
    }
}

/// One image and its label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The image file (absolute, or relative to the working directory when the root was).
    pub path: PathBuf,
    /// Class index.
    pub label: usize,
}

/// Which layout a dataset was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `index.csv` (+ `classes.txt`).
    IndexCsv,
    /// NOAH's `train800.txt` / `val200.txt` / `train800val200.txt` / `test.txt`.
    NoahLists,
}

/// A VTAB-1k task: its classes and the examples of each split.
#[derive(Clone, Debug)]
pub struct VtabDataset {
    /// Task name (the folder name unless given).
    pub name: String,
    /// The folder.
    pub root: PathBuf,
    /// Class names in label order (`class_<i>` when the folder has no `classes.txt`).
    pub classes: Vec<String>,
    /// The layout read.
    pub layout: Layout,
    splits: BTreeMap<VtabSplit, Vec<Example>>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| VisionError::Io { path: path.to_path_buf(), source })
}

/// Class names from `classes.txt` text: one class per non-empty line, `name` or `name<TAB>display`; the first
/// field is the name.
pub fn parse_classes(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').next().unwrap_or(l).trim().to_string())
        .collect()
}

/// Rows `(split, path, label, line)` of an `index.csv` text (header `split,path,label` required; `line` is
/// 1-based). `file` names the file in errors.
///
/// # Errors
/// [`VisionError::BadLine`] for a wrong header, a row without three fields, an unknown split or a label that is
/// not a whole number.
pub fn parse_index_csv(text: &str, file: &Path) -> Result<Vec<(VtabSplit, String, usize, usize)>> {
    let bad = |line: usize, reason: String| VisionError::BadLine { file: file.to_path_buf(), line, reason };
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim() == "split,path,label" => {}
        Some((_, h)) => return Err(bad(1, format!("header must be `split,path,label`, found `{}`", h.trim()))),
        None => return Err(bad(1, "the file is empty (no header)".into())),
    }
    let mut out = Vec::new();
    for (i, l) in lines {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.trim().split(',').collect();
        if f.len() != 3 {
            return Err(bad(line, format!("expected 3 comma-separated fields, found {}", f.len())));
        }
        let split = match f[0] {
            "train" => VtabSplit::Train800,
            "val" => VtabSplit::Val200,
            "test" => VtabSplit::Test,
            s => return Err(bad(line, format!("unknown split `{s}` (train, val or test)"))),
        };
        let label = f[2].parse::<usize>().map_err(|e| bad(line, format!("label `{}`: {e}", f[2])))?;
        if f[1].is_empty() {
            return Err(bad(line, "empty path".into()));
        }
        out.push((split, f[1].to_string(), label, line));
    }
    Ok(out)
}

/// Rows `(path, label, line)` of a NOAH list text: `relative/path label` per non-empty line.
///
/// # Errors
/// [`VisionError::BadLine`] for a line without a path and a whole-number label.
pub fn parse_list(text: &str, file: &Path) -> Result<Vec<(String, usize, usize)>> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        let bad = |reason: String| VisionError::BadLine { file: file.to_path_buf(), line: i + 1, reason };
        let (path, label) = l.rsplit_once(char::is_whitespace).ok_or_else(|| bad("expected `path label`".into()))?;
        let label = label.parse::<usize>().map_err(|e| bad(format!("label `{label}`: {e}")))?;
        let path = path.trim();
        if path.is_empty() {
            return Err(bad("empty path".into()));
        }
        out.push((path.to_string(), label, i + 1));
    }
    Ok(out)
}

impl VtabDataset {
    /// Reads the task in `root`: `index.csv` when present, else NOAH's lists. The name is the folder's.
    ///
    /// # Errors
    /// [`VisionError::NotADataset`] when neither layout is there; the errors of
    /// [`VtabDataset::from_index_csv`] / [`VtabDataset::from_lists`].
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        if root.join("index.csv").is_file() {
            Self::from_index_csv(root)
        } else if root.join("test.txt").is_file() {
            Self::from_lists(root)
        } else {
            Err(VisionError::NotADataset {
                root: root.to_path_buf(),
                reason: "neither index.csv nor NOAH's test.txt / train800.txt / val200.txt is there".into(),
            })
        }
    }

    fn name_of(root: &Path) -> String {
        root.file_name().map_or_else(|| "vtab".into(), |n| n.to_string_lossy().into_owned())
    }

    fn classes_of(root: &Path, max_label: Option<usize>) -> Result<Vec<String>> {
        let f = root.join("classes.txt");
        if f.is_file() {
            Ok(parse_classes(&read(&f)?))
        } else {
            Ok((0..max_label.map_or(0, |m| m + 1)).map(|i| format!("class_{i}")).collect())
        }
    }

    fn check_labels(&self, file: &Path, rows: &[(usize, usize)]) -> Result<()> {
        let c = self.classes.len();
        for &(label, line) in rows {
            if label >= c {
                return Err(VisionError::LabelOutOfRange { file: file.to_path_buf(), line, label, classes: c });
            }
        }
        Ok(())
    }

    /// Reads the shipped layout (`index.csv` + `classes.txt`).
    ///
    /// # Errors
    /// Unreadable files, malformed rows, labels outside `classes.txt`, a missing `classes.txt`.
    pub fn from_index_csv(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let file = root.join("index.csv");
        let rows = parse_index_csv(&read(&file)?, &file)?;
        if !root.join("classes.txt").is_file() {
            return Err(VisionError::NotADataset { root: root.to_path_buf(), reason: "classes.txt is missing".into() });
        }
        let mut me = VtabDataset {
            name: Self::name_of(root),
            root: root.to_path_buf(),
            classes: Self::classes_of(root, None)?,
            layout: Layout::IndexCsv,
            splits: BTreeMap::new(),
        };
        me.check_labels(&file, &rows.iter().map(|r| (r.2, r.3)).collect::<Vec<_>>())?;
        for (split, path, label, _) in rows {
            me.splits.entry(split).or_default().push(Example { path: root.join(path), label });
        }
        me.fill_train800val200();
        Ok(me)
    }

    /// Reads NOAH's lists (`test.txt` required; `train800.txt` and `val200.txt` required unless
    /// `train800val200.txt` is there, which is then the only training list).
    ///
    /// # Errors
    /// Missing or unreadable lists, malformed lines, labels outside `classes.txt`.
    pub fn from_lists(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let mut lists: BTreeMap<VtabSplit, (PathBuf, Vec<ListRow>)> = BTreeMap::new();
        for s in VtabSplit::ALL {
            let f = root.join(s.list_file());
            if f.is_file() {
                let rows = parse_list(&read(&f)?, &f)?;
                lists.insert(s, (f, rows));
            }
        }
        let has = |s| lists.contains_key(&s);
        if !has(VtabSplit::Test)
            || !(has(VtabSplit::Train800Val200) || (has(VtabSplit::Train800) && has(VtabSplit::Val200)))
        {
            return Err(VisionError::NotADataset {
                root: root.to_path_buf(),
                reason: "NOAH's lists need test.txt and train800val200.txt (or train800.txt + val200.txt)".into(),
            });
        }
        let max_label = lists.values().flat_map(|(_, r)| r.iter().map(|x| x.1)).max();
        let mut me = VtabDataset {
            name: Self::name_of(root),
            root: root.to_path_buf(),
            classes: Self::classes_of(root, max_label)?,
            layout: Layout::NoahLists,
            splits: BTreeMap::new(),
        };
        for (s, (f, rows)) in lists {
            me.check_labels(&f, &rows.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>())?;
            me.splits.insert(s, rows.into_iter().map(|(p, label, _)| Example { path: root.join(p), label }).collect());
        }
        me.fill_train800val200();
        Ok(me)
    }

    fn fill_train800val200(&mut self) {
        if !self.splits.contains_key(&VtabSplit::Train800Val200) {
            let mut all = self.splits.get(&VtabSplit::Train800).cloned().unwrap_or_default();
            all.extend(self.splits.get(&VtabSplit::Val200).cloned().unwrap_or_default());
            self.splits.insert(VtabSplit::Train800Val200, all);
        }
    }

    /// The examples of a split (empty when the folder has none).
    pub fn split(&self, s: VtabSplit) -> &[Example] {
        self.splits.get(&s).map_or(&[], Vec::as_slice)
    }

    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}

/// A fixed `k`-shot subset: for each class in label order, `k` of its examples drawn with `seed` (in their
/// original order within the class).
///
/// # Errors
/// [`VisionError::FewShot`] for `k = 0` or a class with fewer than `k` examples.
pub fn few_shot(examples: &[Example], num_classes: usize, k: usize, seed: u64) -> Result<Vec<Example>> {
    let labels: Vec<usize> = examples.iter().map(|e| e.label).collect();
    Ok(few_shot_indices(&labels, num_classes, k, seed)?.into_iter().map(|i| examples[i].clone()).collect())
}

/// The indices of [`few_shot`]'s subset for a label list.
///
/// # Errors
/// As [`few_shot`].
pub fn few_shot_indices(labels: &[usize], num_classes: usize, k: usize, seed: u64) -> Result<Vec<usize>> {
    if k == 0 {
        return Err(VisionError::FewShot { what: "0-shot subset".into(), reason: "k must be at least 1".into() });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(k * num_classes);
    for c in 0..num_classes {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        if idx.len() < k {
            return Err(VisionError::FewShot {
                what: format!("{k}-shot subset"),
                reason: format!("class {c} has {} examples", idx.len()),
            });
        }
        idx.shuffle(&mut rng);
        idx.truncate(k);
        idx.sort_unstable();
        out.extend(idx);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        if let Some(p) = dir.join(name).parent() {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn index_csv_layout_reads_splits_classes_and_joins_train_val() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "classes.txt", "cat\tCat\ndog\n\n");
        write(
            t.path(),
            "index.csv",
            "split,path,label\ntrain,a/1.png,0\ntrain,b/2.png,1\nval,a/3.png,0\ntest,x.png,1\n",
        );
        let d = VtabDataset::open(t.path()).unwrap();
        assert_eq!(d.layout, Layout::IndexCsv);
        assert_eq!(d.classes, ["cat", "dog"]);
        assert_eq!(d.split(VtabSplit::Train800).len(), 2);
        assert_eq!(d.split(VtabSplit::Val200), [Example { path: t.path().join("a/3.png"), label: 0 }]);
        let all: Vec<usize> = d.split(VtabSplit::Train800Val200).iter().map(|e| e.label).collect();
        assert_eq!(all, [0, 1, 0]);
        assert_eq!(d.split(VtabSplit::Test)[0].path, t.path().join("x.png"));
    }

    #[test]
    fn noah_lists_are_read_with_or_without_train800val200() {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "train800.txt", "images/a b.jpg 2\nimages/c.jpg 0\n");
        write(t.path(), "val200.txt", "images/d.jpg 1\n");
        write(t.path(), "test.txt", "images/e.jpg 2\n\n");
        let d = VtabDataset::open(t.path()).unwrap();
        assert_eq!(d.layout, Layout::NoahLists);
        assert_eq!(d.num_classes(), 3);
        assert_eq!(d.split(VtabSplit::Train800)[0].path, t.path().join("images/a b.jpg"));
        assert_eq!(d.split(VtabSplit::Train800Val200).len(), 3);
        // An explicit train800val200.txt wins over the concatenation.
        write(t.path(), "train800val200.txt", "images/c.jpg 0\n");
        let d = VtabDataset::open(t.path()).unwrap();
        assert_eq!(d.split(VtabSplit::Train800Val200).len(), 1);
    }

    #[test]
    fn malformed_inputs_are_typed_errors_with_line_numbers() {
        let f = Path::new("index.csv");
        let e = parse_index_csv("path,label\n", f).unwrap_err();
        assert!(matches!(e, VisionError::BadLine { line: 1, .. }), "{e}");
        let e = parse_index_csv("split,path,label\ntrain,a.png,0\nfoo,b.png,1\n", f).unwrap_err();
        assert!(matches!(e, VisionError::BadLine { line: 3, .. }), "{e}");
        let e = parse_index_csv("split,path,label\ntrain,a.png,-1\n", f).unwrap_err();
        assert!(matches!(e, VisionError::BadLine { line: 2, .. }), "{e}");
        let e = parse_list("ok.jpg 1\nnolabel\n", Path::new("t.txt")).unwrap_err();
        assert!(matches!(e, VisionError::BadLine { line: 2, .. }), "{e}");

        let t = tempfile::tempdir().unwrap();
        assert!(matches!(VtabDataset::open(t.path()), Err(VisionError::NotADataset { .. })));
        write(t.path(), "classes.txt", "a\nb\n");
        write(t.path(), "index.csv", "split,path,label\ntrain,a.png,0\ntest,b.png,2\n");
        let e = VtabDataset::open(t.path()).unwrap_err();
        assert!(matches!(e, VisionError::LabelOutOfRange { line: 3, label: 2, classes: 2, .. }), "{e}");
        let t = tempfile::tempdir().unwrap();
        write(t.path(), "test.txt", "a.jpg 0\n");
        assert!(matches!(VtabDataset::open(t.path()), Err(VisionError::NotADataset { .. })));
    }

    #[test]
    fn few_shot_takes_k_per_class_deterministically() {
        let ex: Vec<Example> =
            (0..30).map(|i| Example { path: PathBuf::from(format!("{i}.png")), label: i % 3 }).collect();
        let a = few_shot(&ex, 3, 4, 7).unwrap();
        assert_eq!(a.len(), 12);
        for c in 0..3 {
            assert_eq!(a.iter().filter(|e| e.label == c).count(), 4);
        }
        assert_eq!(a, few_shot(&ex, 3, 4, 7).unwrap());
        assert_ne!(a, few_shot(&ex, 3, 4, 8).unwrap());
        assert!(matches!(few_shot(&ex, 3, 11, 0), Err(VisionError::FewShot { .. })));
        assert!(matches!(few_shot(&ex, 3, 0, 0), Err(VisionError::FewShot { .. })));
    }
}
