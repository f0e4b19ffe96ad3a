//! `cargo xtask quantize` / `dequantize`: convert the 2-D weights of a safetensors file to bitsandbytes' serialized
//! NF4 / FP4 / int8 layout ([`peft_quant::storage`]) and back to F32.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use peft_quant::{Checkpoint, FloatDtype, Int8Rows, Quant4, Quant4Config, QuantType, RawTensor};
use regex::Regex;
use safetensors::Dtype;

/// Target formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKind {
    /// 4-bit NormalFloat (bnb `Linear4bit`, `quant_type="nf4"`).
    Nf4,
    /// 4-bit float (bnb `Linear4bit`, `quant_type="fp4"`).
    Fp4,
    /// Row-wise absmax int8 (bnb `Linear8bitLt`: `weight` I8 + `SCB`).
    Int8,
}

/// `cargo xtask quantize` options.
#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
Quantizes every float tensor of rank 2 whose name ends in `weight` (and matches --include, a regex searched
anywhere in the name) and copies every other tensor and the file's metadata unchanged. A 4-bit weight `p.weight`
becomes bnb's `p.weight` (U8 packed), `p.weight.absmax`, `p.weight.quant_map`, `p.weight.quant_state.
bitsandbytes__nf4|fp4` (+ `nested_absmax` / `nested_quant_map` with --double-quant); an int8 weight becomes
`p.weight` (I8), `p.SCB` and `p.weight_format`. The quant state records the original dtype (F32/F16/BF16).
Embeddings are rank-2 `weight`s too: exclude them with --include if they should stay in float.")]
pub struct QuantizeArgs {
    /// Input `.safetensors`.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Output `.safetensors` (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Format.
    #[arg(long = "type", value_enum)]
    pub kind: QuantKind,
    /// 4-bit block size (32..4096, a power of two).
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Quantize the 4-bit block scales to 8 bits too (bnb `compress_statistics`).
    #[arg(long)]
    pub double_quant: bool,
    /// Only quantize weights whose name matches this regex.
    #[arg(long)]
    pub include: Option<String>,
}

/// `cargo xtask dequantize` options.
#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
Replaces every bnb 4-bit weight (found by its quant_state entry) and every int8 weight (I8 `p.weight` with a
`p.SCB`) by its F32 dequantisation under the original name and shape, dropping the auxiliary tensors; all other
tensors and the metadata are copied unchanged.")]
pub struct DequantizeArgs {
    /// Input `.safetensors` in bnb layout.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Output `.safetensors` (written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

fn float_dtype(d: Dtype) -> Option<FloatDtype> {
    match d {
        Dtype::F32 => Some(FloatDtype::F32),
        Dtype::F16 => Some(FloatDtype::F16),
        Dtype::BF16 => Some(FloatDtype::Bf16),
        _ => None,
    }
}

/// The module prefix of weight `name` (`a.b.weight` -> `a.b`, `weight` -> ``), if it is a weight.
fn module_prefix(name: &str) -> Option<&str> {
    if name == "weight" {
        Some("")
    } else {
        name.strip_suffix(".weight")
    }
}

/// Quantizes the selected weights of `src`; returns the new checkpoint and the names quantized.
///
/// # Errors
/// An invalid blocksize, non-finite weights.
pub fn quantize(src: &Checkpoint, args: &QuantizeArgs) -> Result<(Checkpoint, Vec<String>)> {
    let include = args.include.as_deref().map(Regex::new).transpose().context("--include is not a valid regex")?;
    if args.kind != QuantKind::Int8 {
        peft_quant::check_blocksize(args.blocksize)?;
    }
    let mut out = src.clone();
    let mut done = Vec::new();
    for name in src.names() {
        let t = src.require(name)?;
        let (Some(prefix), Some(fd)) = (module_prefix(name), float_dtype(t.dtype())) else { continue };
        if t.shape().len() != 2 || include.as_ref().is_some_and(|r| !r.is_match(name)) {
            continue;
        }
        let x = t.to_f32(name)?;
        let what = || format!("quantizing {name}");
        match args.kind {
            QuantKind::Nf4 | QuantKind::Fp4 => {
                let quant_type = if args.kind == QuantKind::Nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
                let cfg = Quant4Config { quant_type, blocksize: args.blocksize, double_quant: args.double_quant };
                let q = Quant4::quantize(&x, t.shape(), &cfg).with_context(what)?.with_dtype(fd);
                out.insert_quant4(prefix, &q)?;
            }
            QuantKind::Int8 => {
                let q = Int8Rows::quantize(&x, t.shape()[0], t.shape()[1]).with_context(what)?;
                out.insert_int8(prefix, &q)?;
            }
        }
        done.push(name.to_string());
    }
    Ok((out, done))
}

fn key(prefix: &str, leaf: &str) -> String {
    if prefix.is_empty() {
        leaf.to_string()
    } else {
        format!("{prefix}.{leaf}")
    }
}

/// Dequantizes every bnb 4-bit and int8 weight of `src`, and every LQ-LoRA NF-b weight (peft-quant's own keys), to
/// F32; returns the checkpoint and the weights restored.
///
/// # Errors
/// Malformed quant states.
pub fn dequantize(src: &Checkpoint) -> Result<(Checkpoint, Vec<String>)> {
    let mut out = src.clone();
    let mut done = Vec::new();
    // A 4-bit or NF-b weight: `<prefix>.weight` and its auxiliary `<prefix>.weight.*` tensors become one F32 tensor.
    let mut restore = |prefix: &str, shape: &[usize], values: Vec<f32>| -> Result<()> {
        let w = key(prefix, "weight");
        for name in src.names().into_iter().filter(|n| n.starts_with(&format!("{w}."))) {
            out.remove(name);
        }
        out.insert(w.clone(), RawTensor::from_f32(shape.to_vec(), &values)?);
        done.push(w);
        Ok(())
    };
    for prefix in src.quant4_modules() {
        let q = src.quant4(&prefix).with_context(|| format!("reading the 4-bit weight of `{prefix}`"))?;
        restore(&prefix, q.shape(), q.dequantize())?;
    }
    for prefix in src.nf_modules() {
        let q = src.nf(&prefix).with_context(|| format!("reading the NF-b weight of `{prefix}`"))?;
        restore(&prefix, q.shape(), q.dequantize())?;
    }
    let int8: Vec<String> = src
        .names()
        .into_iter()
        .filter_map(|n| if n == "SCB" { Some("") } else { n.strip_suffix(".SCB") })
        .filter(|p| src.get(&key(p, "weight")).is_some_and(|t| t.dtype() == Dtype::I8))
        .map(str::to_string)
        .collect();
    for prefix in int8 {
        let q = src.int8(&prefix).with_context(|| format!("reading the int8 weight of `{prefix}`"))?;
        out.remove(&key(&prefix, "SCB"));
        out.remove(&key(&prefix, "weight_format"));
        let w = key(&prefix, "weight");
        out.insert(w.clone(), RawTensor::from_f32(vec![q.rows(), q.cols()], &q.dequantize())?);
        done.push(w);
    }
    Ok((out, done))
}

fn read(path: &std::path::Path) -> Result<Checkpoint> {
    if !path.is_file() {
        bail!("--in {} does not exist", path.display());
    }
    Checkpoint::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Runs `cargo xtask quantize`.
///
/// # Errors
/// As [`quantize`], plus IO errors.
pub fn run_quantize(args: &QuantizeArgs) -> Result<std::process::ExitCode> {
    let (ckpt, done) = quantize(&read(&args.input)?, args)?;
    if done.is_empty() {
        eprintln!("warning: no rank-2 float `weight` tensor matched; the output is a copy");
    }
    ckpt.write(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!("quantized {} weights to {:?} -> {}", done.len(), args.kind, args.out.display());
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs `cargo xtask dequantize`.
///
/// # Errors
/// As [`dequantize`], plus IO errors.
pub fn run_dequantize(args: &DequantizeArgs) -> Result<std::process::ExitCode> {
    let (ckpt, done) = dequantize(&read(&args.input)?)?;
    ckpt.write(&args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!("dequantized {} weights -> {}", done.len(), args.out.display());
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::cli::{Cli, Cmd};

    fn qargs(kind: QuantKind, double_quant: bool, include: Option<&str>) -> QuantizeArgs {
        QuantizeArgs {
            input: "i".into(),
            out: "o".into(),
            kind,
            blocksize: 64,
            double_quant,
            include: include.map(str::to_string),
        }
    }

    /// A checkpoint with two linear layers (one F16), a bias, a norm weight, a 3-D weight and an int buffer.
    fn sample() -> Checkpoint {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut v = |n: usize| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>();
        let mut c = Checkpoint::new();
        c.set_metadata("format", "pt");
        c.insert("enc.q.weight", RawTensor::from_f32(vec![24, 40], &v(960)).unwrap());
        c.insert("enc.q.bias", RawTensor::from_f32(vec![24], &v(24)).unwrap());
        c.insert("enc.o.weight", RawTensor::from_f32_as(FloatDtype::F16, vec![8, 33], &v(264)).unwrap());
        c.insert("norm.weight", RawTensor::from_f32(vec![40], &v(40)).unwrap());
        c.insert("conv.weight", RawTensor::from_f32(vec![2, 3, 4], &v(24)).unwrap());
        c.insert(
            "ids",
            RawTensor::new(Dtype::I64, vec![3], [1i64, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect()).unwrap(),
        );
        c
    }

    #[test]
    fn parses_quantize_and_dequantize_flags() {
        let c = Cli::try_parse_from([
            "xtask",
            "quantize",
            "--in",
            "a.safetensors",
            "--out",
            "b.safetensors",
            "--type",
            "nf4",
            "--blocksize",
            "128",
            "--double-quant",
            "--include",
            "q_proj",
        ])
        .unwrap();
        let Cmd::Quantize(q) = c.cmd else { panic!("not quantize") };
        assert_eq!((q.kind, q.blocksize, q.double_quant), (QuantKind::Nf4, 128, true));
        assert_eq!(q.include.as_deref(), Some("q_proj"));
        assert!(Cli::try_parse_from(["xtask", "quantize", "--in", "a", "--out", "b", "--type", "q3"]).is_err());
        let c = Cli::try_parse_from(["xtask", "dequantize", "--in", "a", "--out", "b"]).unwrap();
        assert!(matches!(c.cmd, Cmd::Dequantize(_)));
    }

    #[test]
    fn round_trip_error_within_format_bound_and_other_tensors_unchanged() {
        let src = sample();
        for (kind, dq) in
            [(QuantKind::Nf4, false), (QuantKind::Nf4, true), (QuantKind::Fp4, true), (QuantKind::Int8, false)]
        {
            let (q, done) = quantize(&src, &qargs(kind, dq, None)).unwrap();
            assert_eq!(done, vec!["enc.o.weight", "enc.q.weight"], "{kind:?}");
            // through the file format
            let q = Checkpoint::from_bytes(&q.to_bytes()).unwrap();
            assert_ne!(q.get("enc.q.weight").unwrap().dtype(), Dtype::F32);
            let (back, restored) = dequantize(&q).unwrap();
            assert_eq!(restored.len(), 2);
            let mut names = back.names();
            names.sort();
            assert_eq!(names, src.names(), "{kind:?}: auxiliary tensors removed");
            for n in ["enc.q.bias", "norm.weight", "conv.weight", "ids"] {
                assert_eq!(back.get(n), src.get(n), "{n} passes through unchanged");
            }
            assert_eq!(back.metadata(), src.metadata());
            for (n, cols) in [("enc.q.weight", 40), ("enc.o.weight", 33)] {
                let (x, y) = (src.get(n).unwrap().to_f32(n).unwrap(), back.get(n).unwrap());
                assert_eq!((y.dtype(), y.shape()), (Dtype::F32, src.get(n).unwrap().shape()));
                let y = y.to_f32(n).unwrap();
                // per-element bound: half the largest gap of the code table times the block's (row's) absmax
                let (group, half_gap) = match kind {
                    QuantKind::Nf4 => (64, 0.152),
                    QuantKind::Fp4 => (64, 0.167),
                    QuantKind::Int8 => (cols, 0.5 / 127.0),
                };
                for (g, (xs, ys)) in x.chunks(group).zip(y.chunks(group)).enumerate() {
                    let absmax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // double quantisation adds the 8-bit error of the block scale (< 2% of absmax)
                    let bound = (half_gap + if dq { 0.02 } else { 0.0 }) * absmax * 1.001 + 1e-6;
                    for (a, b) in xs.iter().zip(ys) {
                        assert!((a - b).abs() <= bound, "{kind:?} {n} group {g}: |{a} - {b}| > {bound}");
                    }
                }
            }
        }
    }

    #[test]
    fn nf_weights_of_an_lq_lora_base_dequantize_to_their_values() {
        let src = sample();
        let mut q = src.clone();
        let x = src.get("enc.q.weight").unwrap().to_f32("x").unwrap();
        let shape = src.get("enc.q.weight").unwrap().shape().to_vec();
        let nf = peft_quant::NfPacked::quantize(&x, &shape, &peft_quant::NfQuant::new(3)).unwrap();
        q.insert_nf("enc.q", &nf).unwrap();
        let q = Checkpoint::from_bytes(&q.to_bytes()).unwrap();
        let (back, restored) = dequantize(&q).unwrap();
        assert_eq!(restored, ["enc.q.weight"]);
        let mut names = back.names();
        names.sort();
        assert_eq!(names, src.names(), "the NF-b parts are removed");
        let y = back.get("enc.q.weight").unwrap();
        assert_eq!((y.dtype(), y.shape()), (Dtype::F32, shape.as_slice()));
        assert_eq!(y.to_f32("y").unwrap(), nf.dequantize());
    }

    #[test]
    fn include_regex_selects_weights_and_bad_settings_are_errors() {
        let src = sample();
        let (q, done) = quantize(&src, &qargs(QuantKind::Nf4, false, Some(r"\.q\."))).unwrap();
        assert_eq!(done, vec!["enc.q.weight"]);
        assert_eq!(q.get("enc.o.weight"), src.get("enc.o.weight"));
        assert!(q.get("enc.q.weight.quant_state.bitsandbytes__nf4").is_some());
        assert!(quantize(&src, &qargs(QuantKind::Nf4, false, Some("("))).is_err());
        let mut a = qargs(QuantKind::Fp4, false, None);
        a.blocksize = 48;
        assert!(quantize(&src, &a).is_err());
    }

    #[test]
    fn cli_round_trip_through_files() {
        let d = tempfile::tempdir().unwrap();
        let (i, q, o) =
            (d.path().join("in.safetensors"), d.path().join("q.safetensors"), d.path().join("o.safetensors"));
        sample().write(&i).unwrap();
        let mut a = qargs(QuantKind::Int8, false, None);
        (a.input, a.out) = (i.clone(), q.clone());
        run_quantize(&a).unwrap();
        run_dequantize(&DequantizeArgs { input: q, out: o.clone() }).unwrap();
        assert_eq!(Checkpoint::read(&o).unwrap().names().len(), sample().names().len());
        assert!(run_dequantize(&DequantizeArgs { input: d.path().join("missing"), out: o }).is_err());
    }
}
