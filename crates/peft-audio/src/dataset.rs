//! Labelled clip datasets laid out as a folder of audio files plus an index: a CSV with a path and a label column
//! (optionally a group column such as the speaker or fold, and a split column), or Speech Commands' class folders
//! with `validation_list.txt` / `testing_list.txt`. One type ([`ClipSet`]) holds all of them, so the same harness
//! runs FSDD as shipped, ESC-50 and Speech Commands v2 unchanged.
//!
//! | dataset | index | label | group | split |
//! |---|---|---|---|---|
//! | FSDD ([`ClipSet::fsdd`]) | `split.csv` (`path,label,speaker,index,split,num_samples`) | `label` | `speaker` | `split` (`train` / `test`) |
//! | ESC-50 ([`ClipSet::esc50`]) | `meta/esc50.csv` (`filename,fold,target,category,...`), audio in `audio/` | `target` (named by `category`) | `fold` | — (use [`ClipSet::hold_out`] on folds) |
//! | Speech Commands v2 ([`ClipSet::speech_commands`]) | class folders + `validation_list.txt`, `testing_list.txt` | folder name | speaker hash (file name before `_nohash_`) | `validation` / `testing` / `train` (the rest) |
//!
//! Labels are mapped to class indices in numeric order when every label is an integer (FSDD digits, ESC-50
//! targets), otherwise in lexicographic order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::{AudioDataError, Result};

/// One labelled clip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clip {
    /// The audio file.
    pub path: PathBuf,
    /// Class index into [`ClipSet::classes`].
    pub label: usize,
    /// Group (speaker, fold); empty when the layout has none.
    pub group: String,
    /// Split name from the index, if the layout has one.
    pub split: Option<String>,
}

/// A labelled clip collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClipSet {
    /// The dataset root.
    pub root: PathBuf,
    /// The clips, in index order.
    pub clips: Vec<Clip>,
    /// Class names; `clips[i].label` indexes this.
    pub classes: Vec<String>,
}

/// Which CSV columns hold what (by header name), and where the audio lives.
#[derive(Clone, Debug)]
pub struct CsvLayout<'a> {
    /// Column with the file path (relative to `audio_dir`).
    pub path: &'a str,
    /// Column with the label.
    pub label: &'a str,
    /// Column with a display name for the label (ESC-50's `category`), if any.
    pub label_name: Option<&'a str>,
    /// Column with the group (speaker, fold), if any.
    pub group: Option<&'a str>,
    /// Column with the split name, if any.
    pub split: Option<&'a str>,
    /// Folder the paths are relative to, relative to the root.
    pub audio_dir: &'a str,
}

/// The train / test clip indices of one protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Training clip indices (into [`ClipSet::clips`]).
    pub train: Vec<usize>,
    /// Test clip indices.
    pub test: Vec<usize>,
}

/// Splits one CSV line into fields (double-quoted fields may hold commas; `""` is a literal quote).
fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| AudioDataError::Io { path: path.to_path_buf(), source })
}

/// Class names in the order the module doc states, and the index of each label.
fn class_order(labels: &BTreeSet<String>) -> Vec<String> {
    let mut v: Vec<String> = labels.iter().cloned().collect();
    if v.iter().all(|l| l.parse::<i64>().is_ok()) {
        v.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
    }
    v
}

impl ClipSet {
    /// Reads a CSV index `root/csv` with a header row, using `layout`'s columns.
    ///
    /// # Errors
    /// [`AudioDataError::Io`] for an unreadable file; [`AudioDataError::Index`] for a missing column, a short row
    /// or an empty path or label; [`AudioDataError::Split`] for an index with no rows.
    pub fn from_csv(root: impl AsRef<Path>, csv: &str, layout: &CsvLayout<'_>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let path = root.join(csv);
        let text = read_text(&path)?;
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let bad = |line: usize, reason: String| AudioDataError::Index { path: path.clone(), line, reason };
        let (_, header) = lines.next().ok_or_else(|| bad(0, "empty file (no header row)".into()))?;
        let header: Vec<String> =
            csv_fields(header.trim_start_matches('\u{feff}')).into_iter().map(|h| h.trim().to_string()).collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| bad(1, format!("no column `{name}` (header: {})", header.join(","))))
        };
        let (pc, lc) = (col(layout.path)?, col(layout.label)?);
        let nc = layout.label_name.map(col).transpose()?;
        let gc = layout.group.map(col).transpose()?;
        let sc = layout.split.map(col).transpose()?;
        let need = [Some(pc), Some(lc), nc, gc, sc].into_iter().flatten().max().unwrap_or(0);
        let mut rows = Vec::new();
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        for (i, line) in lines {
            let f = csv_fields(line);
            if f.len() <= need {
                return Err(bad(i + 1, format!("{} fields, the layout needs {}", f.len(), need + 1)));
            }
            let (p, l) = (f[pc].trim(), f[lc].trim());
            if p.is_empty() || l.is_empty() {
                return Err(bad(i + 1, "empty path or label".into()));
            }
            if let Some(nc) = nc {
                names.entry(l.to_string()).or_insert_with(|| f[nc].trim().to_string());
            }
            let group = gc.map(|c| f[c].trim().to_string()).unwrap_or_default();
            let split = sc.map(|c| f[c].trim().to_string());
            rows.push((root.join(layout.audio_dir).join(p), l.to_string(), group, split));
        }
        if rows.is_empty() {
            return Err(AudioDataError::Split {
                split: "<all>".into(),
                reason: format!("{} has no rows", path.display()),
            });
        }
        let labels: BTreeSet<String> = rows.iter().map(|r| r.1.clone()).collect();
        let order = class_order(&labels);
        let index: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
        let clips = rows
            .iter()
            .map(|(path, l, group, split)| Clip {
                path: path.clone(),
                label: index[l.as_str()],
                group: group.clone(),
                split: split.clone(),
            })
            .collect();
        let classes = order.iter().map(|l| names.get(l).cloned().unwrap_or_else(|| l.clone())).collect();
        Ok(ClipSet { root, clips, classes })
    }

    /// The Free Spoken Digit Dataset as shipped in the asset pack: `split.csv` (`path,label,speaker,...,split`),
    /// groups are speakers, splits `train` (takes 5-49) and `test` (takes 0-4).
    ///
    /// # Errors
    /// As [`ClipSet::from_csv`].
    pub fn fsdd(root: impl AsRef<Path>) -> Result<Self> {
        let layout = CsvLayout {
            path: "path",
            label: "label",
            label_name: None,
            group: Some("speaker"),
            split: Some("split"),
            audio_dir: "",
        };
        Self::from_csv(root, "split.csv", &layout)
    }

    /// ESC-50: `meta/esc50.csv`, audio in `audio/`, label `target` named by `category`, group `fold` (1-5).
    ///
    /// # Errors
    /// As [`ClipSet::from_csv`].
    pub fn esc50(root: impl AsRef<Path>) -> Result<Self> {
        let layout = CsvLayout {
            path: "filename",
            label: "target",
            label_name: Some("category"),
            group: Some("fold"),
            split: None,
            audio_dir: "audio",
        };
        Self::from_csv(root, "meta/esc50.csv", &layout)
    }

    /// Speech Commands (v2 layout): every `*.wav` in a class folder (folders starting with `_`, such as
    /// `_background_noise_`, are skipped); clips listed in `validation_list.txt` / `testing_list.txt` (paths
    /// relative to the root, `/`-separated) get splits `validation` / `testing`, the rest `train`; the group is
    /// the speaker hash before `_nohash_`.
    ///
    /// # Errors
    /// [`AudioDataError::Io`] for unreadable folders or lists; [`AudioDataError::Index`] for a listed file that is
    /// not in a class folder; [`AudioDataError::Split`] when no clip is found.
    pub fn speech_commands(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AudioDataError::Io { path, source }
        };
        let mut files: Vec<(String, String)> = Vec::new(); // (class, "class/file.wav")
        for e in std::fs::read_dir(&root).map_err(io(&root))? {
            let e = e.map_err(io(&root))?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('_') || name.starts_with('.') || !e.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(e.path()).map_err(io(&e.path()))? {
                let f = f.map_err(io(&e.path()))?;
                let fname = f.file_name().to_string_lossy().to_string();
                if fname.to_ascii_lowercase().ends_with(".wav") {
                    files.push((name.clone(), format!("{name}/{fname}")));
                }
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(AudioDataError::Split {
                split: "<all>".into(),
                reason: format!("no class folder with .wav files in {}", root.display()),
            });
        }
        let known: BTreeSet<&str> = files.iter().map(|f| f.1.as_str()).collect();
        let mut split_of: BTreeMap<String, &'static str> = BTreeMap::new();
        for (list, split) in [("validation_list.txt", "validation"), ("testing_list.txt", "testing")] {
            let p = root.join(list);
            let text = read_text(&p)?;
            for (i, l) in text.lines().enumerate() {
                let l = l.trim();
                if l.is_empty() {
                    continue;
                }
                if !known.contains(l) {
                    return Err(AudioDataError::Index {
                        path: p.clone(),
                        line: i + 1,
                        reason: format!("`{l}` is not a .wav in a class folder"),
                    });
                }
                split_of.insert(l.to_string(), split);
            }
        }
        let classes: Vec<String> = files.iter().map(|f| f.0.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let clips = files
            .iter()
            .map(|(class, rel)| {
                let fname = rel.rsplit('/').next().unwrap_or(rel);
                let group = fname.split_once("_nohash_").map_or("", |(g, _)| g).to_string();
                Clip {
                    path: root.join(rel),
                    label: classes.iter().position(|c| c == class).unwrap_or(0),
                    group,
                    split: Some(split_of.get(rel).copied().unwrap_or("train").to_string()),
                }
            })
            .collect();
        Ok(ClipSet { root, clips, classes })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The distinct groups (speakers, folds), sorted.
    pub fn groups(&self) -> Vec<String> {
        self.clips.iter().map(|c| c.group.clone()).collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// Indices of the clips whose split is `name`.
    ///
    /// # Errors
    /// [`AudioDataError::Split`] when no clip has that split.
    pub fn split(&self, name: &str) -> Result<Vec<usize>> {
        let v: Vec<usize> = (0..self.clips.len()).filter(|&i| self.clips[i].split.as_deref() == Some(name)).collect();
        if v.is_empty() {
            let have: BTreeSet<&str> = self.clips.iter().filter_map(|c| c.split.as_deref()).collect();
            return Err(AudioDataError::Split {
                split: name.into(),
                reason: format!("no clip has it (splits: {})", have.into_iter().collect::<Vec<_>>().join(", ")),
            });
        }
        Ok(v)
    }

    /// The index's own train / test split (`train_name`, `test_name`: FSDD `train`/`test`, Speech Commands
    /// `train`/`testing`).
    ///
    /// # Errors
    /// As [`ClipSet::split`].
    pub fn shipped(&self, train_name: &str, test_name: &str) -> Result<Partition> {
        Ok(Partition { train: self.split(train_name)?, test: self.split(test_name)? })
    }

    /// Group hold-out: test on every clip of `groups` (speakers, an ESC-50 fold), train on all others, whatever
    /// their split.
    ///
    /// # Errors
    /// [`AudioDataError::Split`] when a group is unknown or either side is empty.
    pub fn hold_out(&self, groups: &[&str]) -> Result<Partition> {
        let known = self.groups();
        let name = format!("hold-out {}", groups.join("+"));
        if let Some(g) = groups.iter().find(|g| !known.iter().any(|k| k == *g)) {
            return Err(AudioDataError::Split {
                split: name,
                reason: format!("unknown group `{g}` (groups: {})", known.join(", ")),
            });
        }
        let (test, train): (Vec<usize>, Vec<usize>) =
            (0..self.clips.len()).partition(|&i| groups.contains(&self.clips[i].group.as_str()));
        if test.is_empty() || train.is_empty() {
            return Err(AudioDataError::Split { split: name, reason: "leaves no training or no test clip".into() });
        }
        Ok(Partition { train, test })
    }

    /// Labels of the clips `idx`.
    pub fn labels(&self, idx: &[usize]) -> Vec<usize> {
        idx.iter().map(|&i| self.clips[i].label).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    #[test]
    fn fsdd_split_csv_gives_labels_speakers_and_both_protocols() -> Result<()> {
        let t = tempfile::tempdir().expect("tempdir");
        write(
            t.path(),
            "split.csv",
            "path,label,speaker,index,split,num_samples\n\
             recordings/0_george_0.wav,0,george,0,test,2384\n\
             recordings/10_x_5.wav,10,theo,5,train,100\n\
             recordings/2_theo_7.wav,2,theo,7,train,4000\n\
             recordings/2_george_9.wav,2,george,9,train,4000\n",
        );
        let s = ClipSet::fsdd(t.path())?;
        // numeric label order: "10" after "2"
        assert_eq!(s.classes, ["0", "2", "10"]);
        assert_eq!(s.clips.iter().map(|c| c.label).collect::<Vec<_>>(), [0, 2, 1, 1]);
        assert_eq!(s.clips[0].path, t.path().join("recordings/0_george_0.wav"));
        assert_eq!(s.groups(), ["george", "theo"]);
        assert_eq!(s.shipped("train", "test")?, Partition { train: vec![1, 2, 3], test: vec![0] });
        assert_eq!(s.hold_out(&["theo"])?, Partition { train: vec![0, 3], test: vec![1, 2] });
        assert!(matches!(s.hold_out(&["nobody"]), Err(AudioDataError::Split { .. })));
        assert!(matches!(s.split("validation"), Err(AudioDataError::Split { .. })));
        Ok(())
    }

    #[test]
    fn esc50_meta_reads_folds_targets_and_category_names() -> Result<()> {
        let t = tempfile::tempdir().expect("tempdir");
        write(
            t.path(),
            "meta/esc50.csv",
            "filename,fold,target,category,esc10,src_file,take\n\
             1-100032-A-0.wav,1,0,dog,True,100032,A\n\
             1-100038-A-14.wav,1,14,chirping_birds,False,100038,A\n\
             2-10003-A-1.wav,2,1,\"rooster, loud\",False,10003,A\n\
             5-9032-A-0.wav,5,0,dog,True,9032,A\n",
        );
        let s = ClipSet::esc50(t.path())?;
        assert_eq!(s.classes, ["dog", "rooster, loud", "chirping_birds"]);
        assert_eq!(s.clips.iter().map(|c| c.label).collect::<Vec<_>>(), [0, 2, 1, 0]);
        assert_eq!(s.clips[1].path, t.path().join("audio/1-100038-A-14.wav"));
        assert_eq!(s.groups(), ["1", "2", "5"]);
        // fold 5 as test, as in the 5-fold protocol
        assert_eq!(s.hold_out(&["5"])?, Partition { train: vec![0, 1, 2], test: vec![3] });
        Ok(())
    }

    #[test]
    fn speech_commands_lists_set_splits_and_speakers() -> Result<()> {
        let t = tempfile::tempdir().expect("tempdir");
        for f in ["yes/aa11_nohash_0.wav", "yes/bb22_nohash_1.wav", "no/aa11_nohash_2.wav", "no/cc33_nohash_0.wav"] {
            write(t.path(), f, "");
        }
        write(t.path(), "_background_noise_/white.wav", "");
        write(t.path(), "validation_list.txt", "yes/bb22_nohash_1.wav\n");
        write(t.path(), "testing_list.txt", "no/cc33_nohash_0.wav\n\n");
        let s = ClipSet::speech_commands(t.path())?;
        assert_eq!(s.classes, ["no", "yes"]);
        assert_eq!(s.clips.len(), 4, "the background-noise folder is skipped");
        let split: Vec<(&str, usize, &str)> =
            s.clips.iter().map(|c| (c.split.as_deref().unwrap_or(""), c.label, c.group.as_str())).collect();
        assert_eq!(
            split,
            [("train", 0, "aa11"), ("testing", 0, "cc33"), ("train", 1, "aa11"), ("validation", 1, "bb22")]
        );
        assert_eq!(s.shipped("train", "testing")?, Partition { train: vec![0, 2], test: vec![1] });
        // a listed file that does not exist is an index error with its line
        write(t.path(), "testing_list.txt", "no/cc33_nohash_0.wav\nmaybe/zz_nohash_0.wav\n");
        assert!(matches!(ClipSet::speech_commands(t.path()), Err(AudioDataError::Index { line: 2, .. })));
        Ok(())
    }

    #[test]
    fn malformed_indexes_are_typed_errors() {
        let t = tempfile::tempdir().expect("tempdir");
        write(t.path(), "split.csv", "path,label\na.wav,1\n");
        assert!(matches!(ClipSet::fsdd(t.path()), Err(AudioDataError::Index { line: 1, .. })), "missing columns");
        write(t.path(), "split.csv", "path,label,speaker,split\na.wav,1,x\n");
        assert!(matches!(ClipSet::fsdd(t.path()), Err(AudioDataError::Index { line: 2, .. })), "short row");
        write(t.path(), "split.csv", "path,label,speaker,split\n");
        assert!(matches!(ClipSet::fsdd(t.path()), Err(AudioDataError::Split { .. })), "no rows");
        write(t.path(), "split.csv", "");
        assert!(matches!(ClipSet::fsdd(t.path()), Err(AudioDataError::Index { line: 0, .. })), "empty");
        assert!(matches!(ClipSet::esc50(t.path()), Err(AudioDataError::Io { .. })));
        assert!(matches!(ClipSet::speech_commands(t.path().join("none")), Err(AudioDataError::Io { .. })));
    }

    #[test]
    fn csv_fields_handle_quotes() {
        assert_eq!(csv_fields(r#"a,"b,c","d""e",,"#), ["a", "b,c", "d\"e", "", ""]);
    }
}
