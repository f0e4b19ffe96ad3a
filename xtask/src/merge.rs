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

/// The weights file of a Hugging Face folder.
pub const WEIGHTS: &str = "model.safetensors";

/// `cargo xtask merge` options.
#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
Loads MODEL (config.json + model.safetensors: BERT/RoBERTa, LLaMA, DINOv2, Whisper encoder), attaches the PEFT
LoRA/DoRA adapter, merges it into the base weights and writes OUT: config.json and every other file of MODEL
(tokenizer and preprocessor files, sub-folders) copied, and model.safetensors with the same tensor names as the
input file, float tensors stored as F32 (integer buffers copied unchanged). OUT is built in a temporary folder
next to it and renamed into place; an existing OUT is replaced only with --force.")]
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
    if args.out.exists() && !args.force {
        bail!("--out {} exists; pass --force to replace it", args.out.display());
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
    let (ckpt, written) = merged_checkpoint(&model, &src)?;
    let missing: Vec<&String> = merged_sites.iter().filter(|s| !written.contains(*s)).collect();
    if !missing.is_empty() {
        bail!("merged weights {missing:?} have no tensor in {} (tied or renamed weights)", args.model.display());
    }
    write_folder(&args.model, &args.out, &ckpt)?;
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

fn copy_tree(from: &Path, to: &Path, skip_top: &[&str]) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let e = e?;
        let name = e.file_name();
        if skip_top.iter().any(|s| name == *s) {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if e.file_type()?.is_dir() {
            copy_tree(&src, &dst, &[])?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// Writes `ckpt` plus the non-weight files of `model_dir` into `out` via a temporary sibling folder.
fn write_folder(model_dir: &Path, out: &Path, ckpt: &Checkpoint) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out.file_name().context("--out has no folder name")?.to_string_lossy().to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let res = (|| -> Result<()> {
        copy_tree(model_dir, &tmp, &[WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin"])?;
        ckpt.write(tmp.join(WEIGHTS))?;
        if out.exists() {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(out, &old).with_context(|| format!("moving the old {} aside", out.display()))?;
            std::fs::rename(&tmp, out)?;
            std::fs::remove_dir_all(&old)?;
        } else {
            std::fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
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
