//! Peak memory of loading SmolLM2-135M with an NF4-DQ base, three ways. Run each under `/usr/bin/time -v` and read
//! "Maximum resident set size":
//!
//! ```text
//! G=$(scripts/fetch_smollm2.sh)
//! cargo build --release -p peft-quant --example load_rss
//! /usr/bin/time -v target/release/examples/load_rss dense     $G
//! /usr/bin/time -v target/release/examples/load_rss layerwise $G
//! target/release/examples/load_rss write-bnb $G /tmp/smollm2-nf4.safetensors
//! /usr/bin/time -v target/release/examples/load_rss bnb       $G /tmp/smollm2-nf4.safetensors
//! ```
//!
//! * `dense`: the dense f32 model ([`Llama::from_gguf`]), then [`quantize_linear_sites`] (the dense detour).
//! * `layerwise`: [`QuantizeOnLoad`] over the GGUF file: each linear is dequantised from the GGUF, quantized to
//!   NF4-DQ and dropped before the next is read.
//! * `bnb`: [`BnbWeights`] over a bitsandbytes safetensors checkpoint written by `write-bnb` (NF4-DQ linears,
//!   f32 embeddings and norms); the GGUF is opened for its metadata (the model's sizes) only.
//!
//! Each mode prints the quantized bytes, the bytes held by the remaining dense parameters and a checksum of the
//! logits of a fixed prompt (the three modes give the same logits).
//!
//! Measured 2026-12-06 (release build, 2-core AMD EPYC shared with other builds, SmolLM2-135M-Instruct Q4_1 GGUF;
//! 210 linears, 106.2 M params → 54.77 MB NF4-DQ = 4.127 bits/param; the f32 embedding, 113.4 MB, stays dense):
//!
//! | mode | max RSS | wall |
//! |---|---|---|
//! | `dense` (dense f32 model, then quantize) | 648,500 KiB | 2.06 s |
//! | `layerwise` (quantize each linear as it is read) | 316,628 KiB | 1.47 s |
//! | `bnb` (from the 168.6 MB bnb NF4-DQ safetensors) | 376,524 KiB | 0.62 s |
//!
//! The `bnb` figure counts the checkpoint's memory-mapped pages (168.6 MB, touched while reading) on top of the
//! heap copies the model makes (NF4 codes 54.8 MB, f32 embedding 113.4 MB); `layerwise` counts the touched pages
//! of the 98 MB GGUF the same way.

use std::time::Instant;

use peft_core::adapter::{ModulePattern, TargetSpec};
use peft_core::io::gguf::GgufFile;
use peft_core::nn::{named_params, Ctx};
use peft_models::llama::{GgufLlamaWeights, Llama, LlamaSpec};
use peft_quant::load::{bnb_checkpoint, BnbWeights, QuantizeOnLoad};
use peft_quant::qlora::{quant_memory, quantized_sites};
use peft_quant::{quantize_linear_sites, Checkpoint, QuantFormat, QuantLinear};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn report(m: &Llama, what: &str, t: Instant) -> Res<()> {
    let secs = t.elapsed().as_secs_f64();
    let sites = quantized_sites(m);
    let bases: Vec<_> = sites.iter().map(|s| s.base()).collect();
    let mem = quant_memory(bases.iter().filter_map(|b| b.as_any().downcast_ref::<QuantLinear>()));
    let dense: usize = named_params(m).iter().map(|p| 4 * p.numel()).sum();
    let ids: Vec<usize> = (0..16).map(|i| (i * 997 + 13) % m.spec.vocab).collect();
    let y = m.forward(&ids, [1, 16], None, &Ctx::eval())?;
    let sum: f64 = y.as_slice().iter().map(|&v| f64::from(v)).sum();
    let abs: f64 = y.as_slice().iter().map(|&v| f64::from(v).abs()).sum();
    println!(
        "{what}: {} quantized linears, {} params, {} quantized bytes ({:.3} bits/param without maps), {} dense \
         param bytes, load {secs:.2} s, logits sum {sum:.6} abs {abs:.6}",
        sites.len(),
        mem.params,
        mem.bytes_without_maps(),
        8.0 * mem.bytes_per_param_without_maps(),
        dense
    );
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: load_rss dense|layerwise|write-bnb|bnb GGUF [CHECKPOINT]";
    let (mode, gguf) = match (args.get(1), args.get(2)) {
        (Some(m), Some(g)) => (m.as_str(), g.as_str()),
        _ => return Err(usage.into()),
    };
    let fmt = QuantFormat::default();
    let t = Instant::now();
    match mode {
        "dense" => {
            let m = Llama::from_gguf(gguf)?;
            let spec = TargetSpec::new(&ModulePattern::Regex("all-linear".into()), None, None, None, &[])?;
            quantize_linear_sites(&m, &spec, &fmt)?;
            report(&m, "dense-then-quantize", t)?;
        }
        "layerwise" | "write-bnb" => {
            let f = GgufFile::open(gguf)?;
            let spec = LlamaSpec::from_gguf(&f)?;
            let dense = GgufLlamaWeights::new(&f, spec.clone());
            let m = Llama::load(&spec, &QuantizeOnLoad::new(&dense, fmt))?;
            report(&m, "layer-by-layer", t)?;
            if mode == "write-bnb" {
                let out = args.get(3).ok_or(usage)?;
                bnb_checkpoint(&m)?.write(out)?;
                println!("wrote {out}");
            }
        }
        "bnb" => {
            let path = args.get(3).ok_or(usage)?;
            let spec = LlamaSpec::from_gguf(&GgufFile::open(gguf)?)?;
            let ckpt = Checkpoint::read(path)?;
            let m = Llama::load(&spec, &BnbWeights::new(&ckpt, path.as_str()))?;
            report(&m, "from bnb 4-bit checkpoint", t)?;
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
