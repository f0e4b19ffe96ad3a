//! `cargo xtask embed`: runs any backbone [`registry::load`] knows over a list of inputs and writes hidden states,
//! pooled embeddings and (LLaMA) final-position logits to one safetensors file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ndarray::{ArrayD, Axis, Ix2};
use peft_core::adapter::PeftModel;
use peft_core::io::{write_safetensors, SafeTensorsFile};
use peft_core::nn::Ctx;
use peft_core::{no_grad, Tensor};
use peft_models::audio::{read_wav_prefix, resample, LogMel};
use peft_models::bert::{l2_normalize, mean_pool, BertModel};
use peft_models::image_proc::Preprocess;
use peft_models::llama::{tokenizer_from_file, tokenizer_from_gguf, Llama};
use peft_models::registry::{self, Model};
use peft_models::tokenizer::TextTokenizer;
use peft_models::vit::Dinov2;
use peft_models::whisper::WhisperEncoder;

/// The `__metadata__` key holding the JSON description of the run.
pub const META_KEY: &str = "peft_rs_embed";

/// `cargo xtask embed` options.
#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
OUTPUT TENSORS (float32):
  hidden_states.<i>   per input i (0-based line order), unpadded:
                      BERT [tokens_i, H]; LLaMA [tokens_i, H] (after the final norm);
                      DINOv2 [1 + patches, H] (after the final layernorm, CLS first);
                      Whisper [1500, H] (encoder output of the 30 s window)
  pooled              [N, H] BERT: masked mean pooling + L2 normalisation (sentence-transformers);
                      Whisper: mean over all encoder frames
  cls, patch_mean     [N, H] DINOv2: the CLS token and the mean of the patch tokens
  logits              [N, vocab] LLaMA: next-token logits at each input's last position
METADATA:
  __metadata__.peft_rs_embed = JSON {\"model\", \"arch\", \"adapter\", \"inputs\": [lines as given],
  \"resolved\": [paths or texts used], \"tensors\": [names]}
INPUTS:
  one per line (blank lines skipped): texts for BERT and LLaMA (LLaMA: no BOS is added);
  image paths (PNG/JPEG) for DINOv2 (preprocessor_config.json of the model folder, else DINOv2's defaults);
  WAV paths for Whisper (resampled to 16 kHz; mel_filters.safetensors must be in the model folder).
  Relative paths are resolved against the folder of FILE.")]
pub struct EmbedArgs {
    /// Model: a Hugging Face folder (config.json + model.safetensors; BERT, DINOv2, Whisper encoder, LLaMA) or a
    /// LLaMA `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// Text file with one input per line (see INPUTS below).
    #[arg(long)]
    pub input: PathBuf,
    /// Output `.safetensors` file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// A PEFT-format LoRA adapter folder (adapter_config.json + adapter_model.safetensors), applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Inputs per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    /// Refuse an adapter whose load report lists anything not applied (unexpected tensors, config keys this
    /// library ignores, settings reset on load).
    #[arg(long)]
    pub strict: bool,
}

/// Errors in the input list, before any model runs.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The input list or the model path does not exist.
    #[error("{what} `{}` does not exist", path.display())]
    Missing {
        /// What the path was given as.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The input list has no non-blank line.
    #[error("input list `{}` has no inputs (one per line)", path.display())]
    NoInputs {
        /// The list.
        path: PathBuf,
    },
    /// A line that cannot be an input for this architecture.
    #[error("input line {line} `{input}`: {reason}")]
    Unsupported {
        /// 1-based line number.
        line: usize,
        /// The line as given.
        input: String,
        /// Why.
        reason: String,
    },
}

/// One input: its 1-based line number, the line and what it resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// 1-based line number in the list.
    pub line: usize,
    /// The line as written.
    pub raw: String,
    /// The path, for file inputs.
    pub path: Option<PathBuf>,
}

/// Reads the input list: non-blank lines; for file inputs (`files`), paths resolved against the list's folder and
/// checked to exist.
///
/// # Errors
/// [`EmbedError`] for a missing list, no inputs, or a file input that does not exist.
pub fn read_inputs(list: &Path, files: Option<&str>) -> Result<Vec<Input>> {
    if !list.is_file() {
        return Err(EmbedError::Missing { what: "input list", path: list.to_path_buf() }.into());
    }
    let text = std::fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    let base = list.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim_end_matches('\r');
        if l.trim().is_empty() {
            continue;
        }
        let path = match files {
            None => None,
            Some(kind) => {
                let p = Path::new(l.trim());
                let p = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
                if !p.is_file() {
                    return Err(EmbedError::Unsupported {
                        line: i + 1,
                        input: l.to_string(),
                        reason: format!("{} is not a file (this model takes {kind} paths)", p.display()),
                    }
                    .into());
                }
                Some(p)
            }
        };
        out.push(Input { line: i + 1, raw: l.to_string(), path });
    }
    if out.is_empty() {
        return Err(EmbedError::NoInputs { path: list.to_path_buf() }.into());
    }
    Ok(out)
}

/// The output tensors by name.
pub type Outputs = BTreeMap<String, ArrayD<f32>>;

/// Runs `cargo xtask embed`.
///
/// # Errors
/// Missing files, unsupported inputs, model and adapter load errors, write errors.
pub fn run(args: &EmbedArgs) -> Result<std::process::ExitCode> {
    if !args.model.exists() {
        return Err(EmbedError::Missing { what: "model", path: args.model.clone() }.into());
    }
    let model = registry::load(&args.model).with_context(|| format!("loading model {}", args.model.display()))?;
    let files = match &model {
        Model::Dinov2(_) => Some("image"),
        Model::Whisper(_) => Some("WAV"),
        Model::Bert(_) | Model::Llama(_) => None,
    };
    let inputs = read_inputs(&args.input, files)?;
    let mut sources = vec![
        ("model", args.model.clone()),
        ("model weights", args.model.join("model.safetensors")),
        ("input list", args.input.clone()),
    ];
    if let Some(a) = &args.adapter {
        sources.push(("adapter weights", a.join("adapter_model.safetensors")));
        sources.push(("adapter config", a.join("adapter_config.json")));
    }
    sources.extend(inputs.iter().filter_map(|i| i.path.clone().map(|p| ("input", p))));
    crate::outpath::check_not_input("--out", &args.out, &sources)?;
    let _lora = match &args.adapter {
        Some(dir) => {
            if !dir.is_dir() {
                return Err(EmbedError::Missing { what: "adapter folder", path: dir.clone() }.into());
            }
            let (lm, report) = PeftModel::from_pretrained(model.module(), dir, &peft_quant::registry())
                .with_context(|| format!("loading adapter {}", dir.display()))?;
            crate::merge::check_report(dir, &report, args.strict)?;
            Some(lm)
        }
        None => None,
    };
    let bs = args.batch as usize;
    let outputs = no_grad(|| match &model {
        Model::Bert(m) => embed_bert(m, &args.model, &inputs, bs),
        Model::Llama(m) => embed_llama(m, &args.model, &inputs, bs),
        Model::Dinov2(m) => embed_dinov2(m, &args.model, &inputs, bs),
        Model::Whisper(m) => embed_whisper(m, &args.model, &inputs, bs),
    })?;
    let meta = serde_json::json!({
        "model": args.model.display().to_string(),
        "arch": model.arch(),
        "adapter": args.adapter.as_ref().map(|p| p.display().to_string()),
        "inputs": inputs.iter().map(|i| i.raw.clone()).collect::<Vec<_>>(),
        "resolved": inputs.iter().map(|i| i.path.as_ref().map_or(i.raw.clone(), |p| p.display().to_string()))
            .collect::<Vec<_>>(),
        "tensors": outputs.keys().collect::<Vec<_>>(),
    });
    let meta = BTreeMap::from([(META_KEY.to_string(), meta.to_string())]);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_safetensors(&args.out, outputs.iter(), Some(&meta))
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}: {} inputs, {} tensors -> {}", model.arch(), inputs.len(), outputs.len(), args.out.display());
    Ok(std::process::ExitCode::SUCCESS)
}

fn rows(t: &Tensor) -> Result<ndarray::Array2<f32>> {
    Ok(t.data().to_owned().into_dimensionality::<Ix2>()?)
}

fn stack_rows(rows: &[ArrayD<f32>]) -> Result<ArrayD<f32>> {
    let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
    Ok(ndarray::stack(Axis(0), &views)?)
}

fn embed_bert(m: &BertModel, dir: &Path, inputs: &[Input], bs: usize) -> Result<Outputs> {
    let tok_path = dir.join("tokenizer.json");
    let mut tok = TextTokenizer::from_file(&tok_path).with_context(|| format!("tokenizer {}", tok_path.display()))?;
    tok.set_max_length(Some(m.cfg.max_position_embeddings))?;
    let ctx = Ctx::eval();
    let mut out = Outputs::new();
    let mut pooled = Vec::new();
    for (c, chunk) in inputs.chunks(bs).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(|i| i.raw.as_str()).collect();
        let batch = tok.batch(&texts)?;
        let h = m.forward(&batch, &ctx)?;
        let p = rows(&l2_normalize(&mean_pool(&h, &batch.attention_mask)?)?)?;
        let hd = h.data();
        for (j, _) in chunk.iter().enumerate() {
            let n = batch.len_of(j);
            let hj = hd.index_axis(Axis(0), j).slice_axis(Axis(0), (0..n).into()).to_owned();
            out.insert(format!("hidden_states.{}", c * bs + j), hj.into_dyn());
            pooled.push(p.row(j).to_owned().into_dyn());
        }
    }
    out.insert("pooled".into(), stack_rows(&pooled)?);
    Ok(out)
}

fn embed_llama(m: &Llama, path: &Path, inputs: &[Input], bs: usize) -> Result<Outputs> {
    let tok = if path.is_file() {
        tokenizer_from_gguf(&peft_core::io::GgufFile::open(path)?)?
    } else {
        tokenizer_from_file(path.join("tokenizer.json"))?
    };
    let ctx = Ctx::eval();
    let mut out = Outputs::new();
    let mut logits = Vec::new();
    for (c, chunk) in inputs.chunks(bs).enumerate() {
        let mut ids = Vec::new();
        for i in chunk {
            let enc =
                tok.encode(i.raw.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing line {}: {e}", i.line))?;
            let v: Vec<usize> = enc.get_ids().iter().map(|&x| x as usize).collect();
            if v.is_empty() {
                return Err(EmbedError::Unsupported {
                    line: i.line,
                    input: i.raw.clone(),
                    reason: "tokenizes to no tokens".into(),
                }
                .into());
            }
            ids.push(v);
        }
        // Right padding is exact under causal attention: real positions never attend to later (padded) ones.
        let l = ids.iter().map(Vec::len).max().unwrap_or(0);
        let flat: Vec<usize> =
            ids.iter().flat_map(|v| v.iter().copied().chain(std::iter::repeat_n(0, l - v.len()))).collect();
        let h = m.hidden_states(&flat, [ids.len(), l], None, &ctx)?;
        let hd = h.data();
        let mut last = Vec::new();
        for (j, v) in ids.iter().enumerate() {
            let hj = hd.index_axis(Axis(0), j).slice_axis(Axis(0), (0..v.len()).into()).to_owned();
            last.push(hj.index_axis(Axis(0), v.len() - 1).to_owned());
            out.insert(format!("hidden_states.{}", c * bs + j), hj.into_dyn());
        }
        let lg = m.lm_head.forward(&Tensor::new(stack_rows(&last)?), &ctx)?;
        logits.extend(rows(&lg)?.rows().into_iter().map(|r| r.to_owned().into_dyn()));
    }
    out.insert("logits".into(), stack_rows(&logits)?);
    Ok(out)
}

fn embed_dinov2(m: &Dinov2, dir: &Path, inputs: &[Input], bs: usize) -> Result<Outputs> {
    let pp = dir.join("preprocessor_config.json");
    let pre = if pp.is_file() { Preprocess::from_json(&pp)? } else { Preprocess::dinov2_default() };
    let ctx = Ctx::eval();
    let mut out = Outputs::new();
    let (mut cls, mut pm) = (Vec::new(), Vec::new());
    for (c, chunk) in inputs.chunks(bs).enumerate() {
        let mut px = Vec::new();
        for i in chunk {
            let p = i.path.as_ref().expect("xtask bug: DINOv2 inputs are resolved paths");
            px.push(Tensor::new(pre.load(p).map_err(|e| EmbedError::Unsupported {
                line: i.line,
                input: i.raw.clone(),
                reason: format!("not a readable image: {e}"),
            })?));
        }
        let x = Tensor::stack(&px.iter().collect::<Vec<_>>(), 0)?;
        let o = m.forward(&x, &ctx)?;
        let hd = o.last_hidden_state.data();
        for j in 0..chunk.len() {
            out.insert(format!("hidden_states.{}", c * bs + j), hd.index_axis(Axis(0), j).to_owned());
        }
        cls.extend(rows(&o.cls)?.rows().into_iter().map(|r| r.to_owned().into_dyn()));
        pm.extend(rows(&o.patch_mean)?.rows().into_iter().map(|r| r.to_owned().into_dyn()));
    }
    out.insert("cls".into(), stack_rows(&cls)?);
    out.insert("patch_mean".into(), stack_rows(&pm)?);
    Ok(out)
}

fn embed_whisper(m: &WhisperEncoder, dir: &Path, inputs: &[Input], bs: usize) -> Result<Outputs> {
    let fp = dir.join("mel_filters.safetensors");
    if !fp.is_file() {
        return Err(
            EmbedError::Missing { what: "mel filterbank (Whisper needs it next to the model)", path: fp }.into()
        );
    }
    let mel = LogMel::whisper(&SafeTensorsFile::open(&fp)?.get("mel_filters")?)?;
    let ctx = Ctx::eval();
    let mut out = Outputs::new();
    let mut pooled = Vec::new();
    for (c, chunk) in inputs.chunks(bs).enumerate() {
        let mut feats = Vec::new();
        for i in chunk {
            let p = i.path.as_ref().expect("xtask bug: Whisper inputs are resolved paths");
            let bad = |e: &dyn std::fmt::Display| EmbedError::Unsupported {
                line: i.line,
                input: i.raw.clone(),
                reason: format!("not usable audio: {e}"),
            };
            // Whisper sees the first 30 s; one more second keeps the resampler's filter edge identical to
            // resampling the whole file.
            let secs = (mel.n_samples as f64 / 16_000.0) + 1.0;
            let a = read_wav_prefix(p, Some(secs)).map_err(|e| bad(&e))?;
            let x = resample(&a.samples, a.sample_rate, 16_000).map_err(|e| bad(&e))?;
            feats.push(Tensor::new(mel.features(&x)));
        }
        let x = Tensor::stack(&feats.iter().collect::<Vec<_>>(), 0)?;
        let h = m.forward(&x, &ctx)?;
        let hd = h.data();
        for j in 0..chunk.len() {
            out.insert(format!("hidden_states.{}", c * bs + j), hd.index_axis(Axis(0), j).to_owned());
        }
        pooled.extend(rows(&h.mean(&[1], false)?)?.rows().into_iter().map(|r| r.to_owned().into_dyn()));
    }
    out.insert("pooled".into(), stack_rows(&pooled)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Cmd};

    #[test]
    fn parses_embed_flags() {
        let c = Cli::try_parse_from([
            "xtask",
            "embed",
            "--model",
            "m",
            "--input",
            "in.txt",
            "--out",
            "o.safetensors",
            "--adapter",
            "a",
            "--batch",
            "4",
        ])
        .unwrap();
        let Cmd::Embed(e) = c.cmd else { panic!("not embed") };
        assert_eq!(e.model, PathBuf::from("m"));
        assert_eq!(e.input, PathBuf::from("in.txt"));
        assert_eq!(e.out, PathBuf::from("o.safetensors"));
        assert_eq!(e.adapter, Some(PathBuf::from("a")));
        assert_eq!(e.batch, 4);
    }

    #[test]
    fn embed_requires_model_input_out_and_positive_batch() {
        assert!(Cli::try_parse_from(["xtask", "embed", "--model", "m", "--input", "i"]).is_err());
        let ok = ["xtask", "embed", "--model", "m", "--input", "i", "--out", "o"];
        let c = Cli::try_parse_from(ok).unwrap();
        let Cmd::Embed(e) = c.cmd else { panic!("not embed") };
        assert_eq!((e.batch, e.adapter), (8, None));
        assert!(Cli::try_parse_from(ok.iter().copied().chain(["--batch", "0"])).is_err());
    }

    #[test]
    fn input_list_resolves_relative_paths_and_reports_bad_lines() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.wav"), b"x").unwrap();
        let list = d.path().join("list.txt");
        std::fs::write(&list, "a.wav\n\n").unwrap();
        let v = read_inputs(&list, Some("WAV")).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].path.as_deref(), Some(d.path().join("a.wav").as_path()));
        std::fs::write(&list, "a.wav\nmissing.wav\n").unwrap();
        let e = read_inputs(&list, Some("WAV")).unwrap_err();
        assert!(matches!(e.downcast_ref::<EmbedError>(), Some(EmbedError::Unsupported { line: 2, .. })), "{e}");
        std::fs::write(&list, "\n  \n").unwrap();
        let e = read_inputs(&list, None).unwrap_err();
        assert!(matches!(e.downcast_ref::<EmbedError>(), Some(EmbedError::NoInputs { .. })));
        let e = read_inputs(&d.path().join("nope.txt"), None).unwrap_err();
        assert!(matches!(e.downcast_ref::<EmbedError>(), Some(EmbedError::Missing { .. })));
        // texts are taken verbatim
        std::fs::write(&list, "hello world\r\nsecond\n").unwrap();
        let v = read_inputs(&list, None).unwrap();
        assert_eq!((v[0].raw.as_str(), v[1].line, v[1].path.is_none()), ("hello world", 2, true));
    }
}
