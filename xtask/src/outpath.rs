//! Where a command may write: output paths that cannot destroy the inputs, and model folders that `--force` may
//! replace because an earlier run of this tool made them.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `path` made absolute with symlinks resolved, also when it does not exist yet: its longest existing ancestor
/// is canonicalised and the remaining components appended (`..` in the remainder is refused, since it cannot be
/// resolved without the folders existing).
///
/// # Errors
/// An existing ancestor that cannot be canonicalised; `..` after the existing part.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else { break };
        rest.push(name.to_os_string());
        existing = parent;
    }
    let mut out = existing.canonicalize().with_context(|| format!("resolving {}", existing.display()))?;
    for name in rest.iter().rev() {
        if Path::new(name).components().any(|c| matches!(c, Component::ParentDir)) {
            bail!("{}: `..` after a folder that does not exist", path.display());
        }
        out.push(name);
    }
    Ok(out)
}

/// Refuses an output `out` that equals, contains or lies inside any of `inputs` (each given with the option it
/// came from): writing or replacing it would delete or recurse into an input.
///
/// # Errors
/// The first overlap, naming both options and paths.
pub fn check_disjoint(out_flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = resolve(out)?;
    for (flag, input) in inputs {
        let i = resolve(input)?;
        let relation = if o == i {
            "is"
        } else if i.starts_with(&o) {
            "contains"
        } else if o.starts_with(&i) {
            "is inside"
        } else {
            continue;
        };
        bail!(
            "{out_flag} {} {relation} {flag} {} ({} vs {}): refusing to write there, choose an output outside the \
             inputs",
            out.display(),
            input.display(),
            o.display(),
            i.display()
        );
    }
    Ok(())
}

/// Refuses an output file `out` that is one of the input files (the model's weights, the input list, an input):
/// the atomic replace would destroy the input.
///
/// # Errors
/// The input `out` resolves to.
pub fn check_not_input(out_flag: &str, out: &Path, inputs: &[(&str, PathBuf)]) -> Result<()> {
    let o = resolve(out)?;
    for (what, input) in inputs {
        if input.exists() && resolve(input)? == o {
            bail!("{out_flag} {} is the {what} {}: refusing to overwrite an input", out.display(), input.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_outputs_are_refused_in_every_direction() {
        let d = tempfile::tempdir().unwrap();
        let model = d.path().join("m");
        std::fs::create_dir_all(model.join("sub")).unwrap();
        let inputs = [("--model", model.as_path())];
        for bad in [model.clone(), d.path().to_path_buf(), model.join("merged"), model.join("sub/x/y"), model.join(".")]
        {
            let e = check_disjoint("--out", &bad, &inputs).unwrap_err().to_string();
            assert!(e.contains("--model") && e.contains("refusing"), "{}: {e}", bad.display());
        }
        check_disjoint("--out", &d.path().join("merged"), &inputs).unwrap();
        check_disjoint("--out", &d.path().join("mm"), &inputs).unwrap();
        // through a symlink to the input
        #[cfg(unix)]
        {
            let link = d.path().join("link");
            std::os::unix::fs::symlink(&model, &link).unwrap();
            assert!(check_disjoint("--out", &link.join("new"), &inputs).is_err());
        }
        assert!(resolve(&d.path().join("nope/../x")).is_err());
    }
}
