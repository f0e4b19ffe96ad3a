//! VTAB-1k task names, their groups, and where their folders are.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// VTAB-1k's three task groups (plus tasks outside the benchmark, such as the shipped Fashion-MNIST stand-in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Group {
    /// CIFAR-100, Caltech101, DTD, Flowers102, Pets, SVHN, SUN397.
    Natural,
    /// Patch Camelyon, EuroSAT, RESISC45, Diabetic Retinopathy.
    Specialized,
    /// CLEVR count/dist, DMLab, KITTI-dist, dSprites loc/ori, SmallNORB azimuth/elevation.
    Structured,
    /// Not one of the 19 VTAB-1k tasks.
    Other,
}

impl Group {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Group::Natural => "Natural",
            Group::Specialized => "Specialized",
            Group::Structured => "Structured",
            Group::Other => "Other",
        }
    }
}

/// The 19 tasks by NOAH's folder names, in the order of the Hydra/SPT tables, with their groups and short labels.
pub const VTAB19: [(&str, Group, &str); 19] = [
    ("cifar", Group::Natural, "Cifar"),
    ("caltech101", Group::Natural, "Calt"),
    ("dtd", Group::Natural, "DTD"),
    ("oxford_flowers102", Group::Natural, "Flow"),
    ("oxford_iiit_pet", Group::Natural, "Pets"),
    ("svhn", Group::Natural, "SVHN"),
    ("sun397", Group::Natural, "Sun"),
    ("patch_camelyon", Group::Specialized, "Camel"),
    ("eurosat", Group::Specialized, "EuroS"),
    ("resisc45", Group::Specialized, "Resisc"),
    ("diabetic_retinopathy", Group::Specialized, "Retino"),
    ("clevr_count", Group::Structured, "C-Cnt"),
    ("clevr_dist", Group::Structured, "C-Dst"),
    ("dmlab", Group::Structured, "DMLab"),
    ("kitti", Group::Structured, "KITTI"),
    ("dsprites_loc", Group::Structured, "dS-Loc"),
    ("dsprites_ori", Group::Structured, "dS-Ori"),
    ("smallnorb_azi", Group::Structured, "sN-Azi"),
    ("smallnorb_ele", Group::Structured, "sN-Ele"),
];

/// The tasks shipped in the asset pack: (name, folder under the asset directory).
pub const SHIPPED: [(&str, &str); 2] =
    [("cifar10", "data/vtab1k-cifar10"), ("fashion-mnist", "data/vtab1k-fashion-mnist")];

/// A task to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRef {
    /// Name used in results (`cifar10`, or a NOAH folder name).
    pub name: String,
    /// Its folder.
    pub dir: PathBuf,
    /// Its group.
    pub group: Group,
}

/// The group of a task name (NOAH folder names; the shipped CIFAR-10 stand-in counts as Natural like CIFAR-100).
pub fn group_of(name: &str) -> Group {
    if name == "cifar10" {
        return Group::Natural;
    }
    VTAB19.iter().find(|(n, _, _)| *n == name).map_or(Group::Other, |t| t.1)
}

/// The column label of a task (`Cifar` ... for the 19, the name otherwise).
pub fn label_of(name: &str) -> String {
    match name {
        "cifar10" => "CIFAR-10*".into(),
        "fashion-mnist" => "F-MNIST*".into(),
        _ => VTAB19.iter().find(|(n, _, _)| *n == name).map_or_else(|| name.to_string(), |t| t.2.to_string()),
    }
}

/// Table order: the 19 in the papers' order, then the others by name.
pub fn order_key(name: &str) -> (usize, String) {
    let i = if name == "cifar10" { 0 } else { VTAB19.iter().position(|(n, _, _)| *n == name).map_or(100, |i| i + 1) };
    (i, name.to_string())
}

/// Resolves the tasks: with `root` (a folder of task folders, e.g. NOAH's `vtab-1k/`), its subfolders that hold
/// a VTAB-1k layout (`names` picks some); without, the shipped tasks under `assets` (`names` picks some).
///
/// # Errors
/// An unknown name; a root with no task folders.
pub fn resolve(root: Option<&Path>, assets: &Path, names: Option<&[String]>, default: &[&str]) -> Result<Vec<TaskRef>> {
    let mut out = Vec::new();
    match root {
        Some(root) => {
            let mut found: Vec<String> = std::fs::read_dir(root)?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("index.csv").is_file() || e.path().join("test.txt").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            found.sort_by_key(|n| order_key(n));
            if found.is_empty() {
                bail!("{}: no task folders (a task folder holds index.csv or NOAH's test.txt)", root.display());
            }
            let want: Vec<String> = names.map_or_else(|| found.clone(), <[String]>::to_vec);
            for n in want {
                if !found.contains(&n) {
                    bail!("task `{n}` is not a task folder of {} (found: {})", root.display(), found.join(", "));
                }
                out.push(TaskRef { dir: root.join(&n), group: group_of(&n), name: n });
            }
        }
        None => {
            let want: Vec<String> =
                names.map_or_else(|| default.iter().map(|s| s.to_string()).collect(), <[String]>::to_vec);
            for n in want {
                let Some((_, rel)) = SHIPPED.iter().find(|(s, _)| *s == n) else {
                    bail!(
                        "task `{n}` is not shipped (shipped: {}); pass --data-root DIR for other VTAB-1k folders",
                        SHIPPED.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
                    );
                };
                out.push(TaskRef { name: n.clone(), dir: assets.join(rel), group: group_of(&n) });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_labels_follow_the_papers() {
        assert_eq!(VTAB19.iter().filter(|t| t.1 == Group::Natural).count(), 7);
        assert_eq!(VTAB19.iter().filter(|t| t.1 == Group::Specialized).count(), 4);
        assert_eq!(VTAB19.iter().filter(|t| t.1 == Group::Structured).count(), 8);
        assert_eq!(group_of("eurosat"), Group::Specialized);
        assert_eq!(group_of("fashion-mnist"), Group::Other);
        assert_eq!(label_of("smallnorb_ele"), "sN-Ele");
        assert!(order_key("cifar10") < order_key("dtd") && order_key("dtd") < order_key("zzz"));
    }

    #[test]
    fn resolve_reads_a_root_of_noah_folders_and_refuses_unknown_names() {
        let t = tempfile::tempdir().unwrap();
        for d in ["dtd", "cifar", "not_a_task"] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        std::fs::write(t.path().join("dtd/test.txt"), "a.jpg 0\n").unwrap();
        std::fs::write(t.path().join("cifar/test.txt"), "a.jpg 0\n").unwrap();
        let got = resolve(Some(t.path()), t.path(), None, &[]).unwrap();
        assert_eq!(got.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["cifar", "dtd"]);
        assert!(resolve(Some(t.path()), t.path(), Some(&["svhn".into()]), &[]).is_err());
        let shipped = resolve(None, Path::new("/a"), None, &["cifar10"]).unwrap();
        assert_eq!(shipped[0].dir, Path::new("/a/data/vtab1k-cifar10"));
        assert!(resolve(None, Path::new("/a"), Some(&["dtd".into()]), &[]).is_err());
    }
}
