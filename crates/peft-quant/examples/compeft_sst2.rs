//! ComPEFT on SST-2 with MiniLM-L6: train a LoRA adapter and a full fine-tune briefly, compress each update
//! (`τ` = LoRA A/B; full FT: trained − pretrained backbone, classifier head excluded as in ComPEFT) at a few
//! densities, and report the compression ratio and the dev accuracy before/after compression.
//!
//! ```text
//! cargo run --release -p peft-quant --example compeft_sst2 -- [train_examples=500] [densities=0.05,0.2,0.5]
//! ```
//!
//! Environment: `PEFT_ASSETS` (default `/work/shared/assets`) locates `models/all-MiniLM-L6-v2` and
//! `data/glue/SST-2/{train,dev}.tsv`. `PEFT_COMPEFT_SKIP_FULL=1` skips the full fine-tune.
//! Training: 1 epoch, batch 16, AdamW at the registry's default rates (LoRA 2.5e-3, full 1e-4), sequence length
//! 64, mean pooling; the classifier head trains in both runs and is never compressed.

use std::path::PathBuf;
use std::time::Instant;

use ndarray::ArrayD;
use peft_core::nn::named_params;
use peft_core::Param;
use peft_models::bert::BertForSequenceClassification;
use peft_models::tokenizer::TextTokenizer;
use peft_quant::{ComPeft, ComPeftConfig, ComPeftMode, Selection, TaskVector};
use rand::seq::SliceRandom;
use rand::SeedableRng;

mod sst2_common;
use sst2_common::{accuracy, load_model, prepare, read_tsv, train, Data, Res};

/// Compresses `tau` at each density, installs `base + τ̂` through `install`, measures accuracy, and restores.
fn sweep(
    what: &str,
    tv: &TaskVector,
    densities: &[f64],
    model: &BertForSequenceClassification,
    data: &Data,
    install: &dyn Fn(&[f32]) -> Res<()>,
) -> Res<()> {
    let tau = tv.values();
    let sigma = {
        let n = tau.len() as f64;
        let m = tau.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        (tau.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    };
    println!("{what}: |tau| = {} values, std {sigma:.3e}", tau.len());
    for &k in densities {
        let cfg =
            ComPeftConfig { density: k, mode: ComPeftMode::Ternary { alpha: 1.0 }, selection: Selection::Authors };
        let c = ComPeft::compress(tau, &cfg)?;
        let bytes = c.encode().len();
        let (r16, r32) = (c.compression_ratio(16), c.compression_ratio(32));
        install(&c.decompress())?;
        let acc = accuracy(model, data)?;
        println!(
            "  density {k:<5} nnz {:>9} encoded {:>10} B  ratio vs bf16 {r16:>7.1}x vs f32 {r32:>7.1}x  dev acc {acc:.2}",
            c.nnz(),
            bytes
        );
    }
    install(tau)?;
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let n_train: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(500);
    let densities: Vec<f64> = match args.get(2) {
        Some(s) => s.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![0.05, 0.2, 0.5],
    };
    let assets = std::env::var("PEFT_ASSETS").map(PathBuf::from).unwrap_or_else(|_| "/work/shared/assets".into());
    let mdir = assets.join("models/all-MiniLM-L6-v2");
    let gdir = assets.join("data/glue/SST-2");
    let mut tok = TextTokenizer::from_file(mdir.join("tokenizer.json"))?;
    tok.set_max_length(Some(64))?;
    let mut train_rows = read_tsv(&gdir.join("train.tsv"))?;
    train_rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(42));
    train_rows.truncate(n_train);
    let data = Data { tok, train: train_rows, dev: read_tsv(&gdir.join("dev.tsv"))? };
    println!("SST-2: {} train examples (1 epoch, batch 16), {} dev examples", data.train.len(), data.dev.len());

    // LoRA r=8 alpha=16 on query,value.
    let lora = peft_lora::methods().into_iter().find(|m| m.name.0 == "lora").ok_or("no lora entry")?;
    let model = prepare(&lora, load_model(&mdir)?)?;
    let t = Instant::now();
    train(&model, model.trainable_params(), lora.lr, &data)?;
    println!("LoRA trained in {:.0}s; dev acc {:.2}", t.elapsed().as_secs_f64(), accuracy(&model, &data)?);
    let adapter: Vec<Param> = model.adapter_params("default")?;
    let tv =
        TaskVector::from_tensors(adapter.iter().map(|p| (p.name().to_string(), p.value().to_owned())).collect(), 0.0);
    let install = |v: &[f32]| -> Res<()> {
        for (name, t) in tv.to_tensors(v, 0.0)? {
            let p = adapter.iter().find(|p| p.name() == name).ok_or("adapter param vanished")?;
            p.set(t)?;
        }
        Ok(())
    };
    sweep("LoRA (A and B ternarized)", &tv, &densities, &model, &data, &install)?;
    drop(model);

    if std::env::var("PEFT_COMPEFT_SKIP_FULL").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    // Full fine-tuning: tau = trained - pretrained over the backbone.
    let full = peft_core::adapter::methods().into_iter().find(|m| m.name.0 == "full").ok_or("no full entry")?;
    let model = load_model(&mdir)?;
    let backbone: Vec<Param> =
        named_params(&model).into_iter().filter(|p| !p.name().starts_with("classifier")).collect();
    let pre: Vec<ArrayD<f32>> = backbone.iter().map(|p| p.value().to_owned()).collect();
    let model = prepare(&full, model)?;
    let t = Instant::now();
    train(&model, model.trainable_params(), full.lr, &data)?;
    println!("Full FT trained in {:.0}s; dev acc {:.2}", t.elapsed().as_secs_f64(), accuracy(&model, &data)?);
    let tv = TaskVector::from_tensors(
        backbone.iter().zip(&pre).map(|(p, p0)| (p.name().to_string(), &p.value().to_owned() - p0)).collect(),
        0.0,
    );
    let install = |v: &[f32]| -> Res<()> {
        for (name, d) in tv.to_tensors(v, 0.0)? {
            let i = backbone.iter().position(|p| p.name() == name).ok_or("param vanished")?;
            backbone[i].set(&pre[i] + &d)?;
        }
        Ok(())
    };
    sweep("Full FT (backbone delta)", &tv, &densities, &model, &data, &install)?;
    Ok(())
}
