//! `cargo xtask merge`: folds a PEFT LoRA adapter into a Hugging Face model folder and writes a plain model
//! folder (config.json + F32 model.safetensors with the checkpoint's own tensor names + tokenizer files).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use peft_core::adapter::{LoadReport, PeftModel};
use peft_core::nn::named_params;
use peft_core::Param;
use peft_models::registry::{self, Model};
use peft_quant::{Checkpoint, RawTensor};
use safetensors::Dtype;

use crate::outpath;

/// The weights file of a Hugging Face folder.
pub const WEIGHTS: &str = "model.safetensors";

/// `cargo xtask merge` options.
#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
Loads MODEL (config.json + model.safetensors: BERT/RoBERTa, LLaMA, DINOv2, Whisper encoder), attaches the PEFT
LoRA/DoRA adapter, merges it into the base weights and writes OUT: config.json and every other file of MODEL
(tokenizer and preprocessor files, sub-folders) copied, and model.safetensors with the same tensor names as the
input file, float tensors stored as F32 (integer buffers copied unchanged). Weights in other formats
(pytorch_model.bin, tf_model.h5, flax_model.msgpack, rust_model.ot, onnx/, openvino/, shards) are not copied,
since they would still hold the unmerged model; the command lists them. OUT must not be, contain or lie inside
MODEL or ADAPTER. OUT is built in a temporary folder next to it (.OUT.tmp-PID) and renamed into place (an
existing OUT is swapped with it in one atomic step on Linux, so a killed merge leaves the old or the new OUT); an
existing OUT is replaced only with --force, and only when an earlier merge wrote it. Temporary folders of killed
runs are removed, and an old OUT that a killed run had moved aside is restored.")]
pub struct MergeArgs {
    /// Hugging Face model folder (config.json + model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Refuse an adapter whose load report lists anything not applied (unexpected tensors, config keys this
    /// library ignores, settings reset on load).
    #[arg(long)]
    pub strict: bool,
}

/// Prints the load report's warnings (to stderr) and, under `--strict`, fails on any.
///
/// # Errors
/// `strict` with a report that is not clean.
pub fn check_report(dir: &Path, report: &LoadReport, strict: bool) -> Result<()> {
    for p in report.problems() {
        eprintln!("warning: adapter {}: {p}", dir.display());
    }
    if strict {
        if let Err(summary) = report.check_strict() {
            bail!("adapter {}: --strict: not everything was applied: {summary}", dir.display());
        }
    }
    Ok(())
}

/// Runs `cargo xtask merge`.
///
/// # Errors
/// Missing folders, load errors, an adapter whose merged weights have no tensor in the checkpoint, IO errors.
pub fn run(args: &MergeArgs) -> Result<std::process::ExitCode> {
    if !args.model.join("config.json").is_file() || !args.model.join(WEIGHTS).is_file() {
        bail!("--model {} must be a folder with config.json and {WEIGHTS}", args.model.display());
    }
    if !args.adapter.is_dir() {
        bail!("--adapter {} is not a folder", args.adapter.display());
    }
    outpath::check_disjoint("--out", &args.out, &[("--model", &args.model), ("--adapter", &args.adapter)])?;
    // A merge killed while replacing OUT (between moving the old OUT aside and renaming the new one in, on
    // filesystems without an atomic exchange) left no OUT: put the old one back before looking at OUT.
    if let Some(from) = peft_core::io::restore_moved_aside(&args.out) {
        eprintln!("restored {} from {} (a merge was killed while replacing it)", args.out.display(), from.display());
    }
    if args.out.symlink_metadata().is_ok() {
        if !args.force {
            bail!("--out {} exists; pass --force to replace it", args.out.display());
        }
        check_replaceable(&args.out)?;
    }
    let model = registry::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let (lm, report) = PeftModel::from_pretrained(model.module(), &args.adapter, &peft_quant::registry())
        .with_context(|| format!("loading adapter {}", args.adapter.display()))?;
    check_report(&args.adapter, &report, args.strict)?;
    let merged_sites: Vec<String> =
        lm.tuner("default")?.wrapped_modules().iter().map(|s| format!("{s}.weight")).collect();
    lm.merge_and_unload()?;

    let src =
        Checkpoint::read(args.model.join(WEIGHTS)).with_context(|| format!("reading {}", args.model.display()))?;
    let (mut ckpt, written) = merged_checkpoint(&model, &src)?;
    let stamp = serde_json::json!({
        "model": args.model.display().to_string(),
        "adapter": args.adapter.display().to_string(),
    });
    ckpt.set_metadata(MERGE_KEY, stamp.to_string());
    let missing: Vec<&String> = merged_sites.iter().filter(|s| !written.contains(*s)).collect();
    if !missing.is_empty() {
        bail!("merged weights {missing:?} have no tensor in {} (tied or renamed weights)", args.model.display());
    }
    let dropped = write_folder(&args.model, &args.out, &ckpt)?;
    if !dropped.is_empty() {
        eprintln!(
            "note: not copied into {} (weights in other formats that would still hold the unmerged model): {}",
            args.out.display(),
            dropped.join(", ")
        );
    }
    println!(
        "merged {} sites of {} into {} ({} tensors)",
        merged_sites.len(),
        model.arch(),
        args.out.display(),
        ckpt.names().len()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// The checkpoint `src` with every float tensor replaced by the F32 value of the model parameter it loaded (or
/// its own value as F32 when no parameter holds it); returns it with the names of the parameters written.
fn merged_checkpoint(model: &Model, src: &Checkpoint) -> Result<(Checkpoint, BTreeSet<String>)> {
    let params: HashMap<String, Param> =
        named_params(model.module()).into_iter().map(|p| (p.name().into(), p)).collect();
    let prefix = match model {
        Model::Bert(b) => b.prefix.clone(),
        _ => String::new(),
    };
    let mut out = Checkpoint::new();
    if let Some(meta) = src.metadata() {
        for (k, v) in meta {
            out.set_metadata(k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string));
        }
    }
    let mut written = BTreeSet::new();
    for name in src.names() {
        let t = src.require(name)?;
        let is_float = matches!(t.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64);
        if !is_float {
            out.insert(name, t.clone());
            continue;
        }
        let pname = name.strip_prefix(prefix.as_str()).unwrap_or(name);
        let raw = match params.get(pname).filter(|p| p.shape() == t.shape()) {
            Some(p) => {
                written.insert(pname.to_string());
                let v = p.value();
                let v = v.as_standard_layout();
                RawTensor::from_f32(t.shape().to_vec(), v.as_slice().expect("peft-rs bug: standard layout"))?
            }
            None if t.dtype() == Dtype::F64 => {
                let v: Vec<f32> = t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect();
                RawTensor::from_f32(t.shape().to_vec(), &v)?
            }
            None => RawTensor::from_f32(t.shape().to_vec(), &t.to_f32(name)?)?,
        };
        out.insert(name, raw);
    }
    Ok((out, written))
}

/// The `__metadata__` key of a merged `model.safetensors`: marks the folder as one this command wrote, which
/// `--force` may replace.
pub const MERGE_KEY: &str = "peft_rs_merge";

/// Top-level entries of the model folder that are not copied: the weights (rewritten), and weights in other
/// formats, which would still hold the unmerged model next to the merged one.
const NOT_COPIED: &[&str] = &[
    WEIGHTS,
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
    "rust_model.ot",
    "model.onnx",
    "onnx",
    "openvino",
    "coreml",
];

/// Whether a top-level entry of the model folder is a weights file of another format (see [`NOT_COPIED`]), or
/// a shard of one.
fn is_other_weights(name: &str) -> bool {
    NOT_COPIED.contains(&name)
        || [".bin", ".h5", ".ot", ".msgpack", ".onnx", ".gguf", ".ckpt", ".pt", ".pth"]
            .iter()
            .any(|e| name.ends_with(e))
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// `--force` replaces only a folder an earlier `merge` wrote (its `model.safetensors` carries [`MERGE_KEY`]):
/// anything else at OUT (a file, an unrelated folder, a model) is left alone.
fn check_replaceable(out: &Path) -> Result<()> {
    let refuse = |why: &str| {
        anyhow::anyhow!(
            "--out {} exists and {why}; --force only replaces a folder written by `xtask merge`, so remove it \
             yourself or choose another --out",
            out.display()
        )
    };
    let meta = out.symlink_metadata().with_context(|| format!("inspecting {}", out.display()))?;
    if !meta.is_dir() {
        return Err(refuse("is not a folder"));
    }
    let weights = out.join(WEIGHTS);
    let ours = weights.is_file()
        && peft_core::io::SafeTensorsFile::open(&weights).is_ok_and(|f| f.metadata().contains_key(MERGE_KEY));
    if !ours {
        return Err(refuse("was not written by `xtask merge`"));
    }
    Ok(())
}

/// Copies `from` into `to` (created), skipping the top-level entries `skip_top` accepts (returned, sorted).
/// Symlinked files are copied as files; symlinked folders are skipped (they could loop).
fn copy_tree(from: &Path, to: &Path, skip_top: Option<&dyn Fn(&str) -> bool>) -> Result<Vec<String>> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut skipped = Vec::new();
    for e in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let e = e.with_context(|| format!("listing {}", from.display()))?;
        let name = e.file_name();
        let text = name.to_string_lossy();
        if skip_top.is_some_and(|f| f(&text)) {
            skipped.push(text.into_owned());
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        let ft = e.file_type().with_context(|| format!("inspecting {}", src.display()))?;
        if ft.is_dir() {
            copy_tree(&src, &dst, None)?;
        } else if ft.is_symlink() && src.is_dir() {
            eprintln!("warning: not copying {} (a symlink to a folder)", src.display());
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    skipped.sort();
    Ok(skipped)
}

/// Writes `ckpt` plus the non-weight files of `model_dir` into `out` via a temporary sibling folder
/// `.OUT.tmp-PID`, renamed into place. An existing OUT (already checked by [`check_replaceable`]) is swapped
/// with it atomically where the OS can ([`exchange`]) and then removed; elsewhere it is moved to `.OUT.old-PID`
/// first and removed after (moved back if the rename fails; restored by the next run if this one is killed
/// between the two renames). Temporaries of killed
/// earlier runs are removed first. Returns the weight files in other formats that were not copied.
fn write_folder(model_dir: &Path, out: &Path, ckpt: &Checkpoint) -> Result<Vec<String>> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out.file_name().context("--out has no folder name")?.to_string_lossy().to_string();
    for stale in peft_core::io::remove_stale_temps(out) {
        eprintln!("removed {} (left by a merge that was killed)", stale.display());
    }
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.symlink_metadata().is_ok() {
        bail!("{} exists (another merge in this process?); not touching it", tmp.display());
    }
    let res = (|| -> Result<Vec<String>> {
        let skip = |n: &str| is_other_weights(n);
        let mut dropped = copy_tree(model_dir, &tmp, Some(&skip))?;
        dropped.retain(|n| n != WEIGHTS);
        ckpt.write(tmp.join(WEIGHTS)).with_context(|| format!("writing {}", tmp.join(WEIGHTS).display()))?;
        if out.symlink_metadata().is_ok() {
            if exchange(&tmp, out).with_context(|| format!("swapping the new {} into place", out.display()))? {
                // `tmp` now holds the old OUT; a kill from here on leaves the new OUT and a stale `tmp`.
                if let Err(e) = std::fs::remove_dir_all(&tmp) {
                    eprintln!("warning: could not remove the old output (moved to {}): {e}", tmp.display());
                }
                return Ok(dropped);
            }
            // No atomic exchange here: two renames. A kill between them leaves `.OUT.old-PID` and no OUT, which
            // the next run restores (`restore_moved_aside`).
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(out, &old).with_context(|| format!("moving the old {} aside", out.display()))?;
            if let Err(e) = std::fs::rename(&tmp, out) {
                let _ = std::fs::rename(&old, out);
                return Err(e).with_context(|| format!("renaming into {}", out.display()));
            }
            std::fs::remove_dir_all(&old).with_context(|| format!("removing the old output {}", old.display()))?;
        } else {
            std::fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
        }
        Ok(dropped)
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// Swaps the folders `a` and `b` in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`), so `b` is at every
/// instant either its old or its new content. Ok(false) where the platform or filesystem has no such call.
///
/// # Errors
/// Any other failure of the call.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call; AT_FDCWD resolves relative paths as `rename` does.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Cmd};

    #[test]
    fn parses_merge_flags() {
        let c =
            Cli::try_parse_from(["xtask", "merge", "--model", "m", "--adapter", "a", "--out", "o", "--force"]).unwrap();
        let Cmd::Merge(m) = c.cmd else { panic!("not merge") };
        assert_eq!((m.model, m.adapter, m.out, m.force), ("m".into(), "a".into(), "o".into(), true));
        assert!(Cli::try_parse_from(["xtask", "merge", "--model", "m", "--out", "o"]).is_err());
    }

    #[test]
    fn refuses_existing_out_and_missing_inputs() {
        let d = tempfile::tempdir().unwrap();
        let args = MergeArgs {
            model: d.path().join("nope"),
            adapter: d.path().to_path_buf(),
            out: d.path().to_path_buf(),
            force: false,
            strict: false,
        };
        assert!(run(&args).unwrap_err().to_string().contains("config.json"));
    }
}
