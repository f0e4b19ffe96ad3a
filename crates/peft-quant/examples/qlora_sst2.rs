//! QLoRA vs LoRA on SST-2 with MiniLM-L6 (a short run): both registry entries (`lora`, `qlora`) trained on the
//! same examples; reports dev accuracy, training time, the quantized base's bytes/param, and the dev accuracy
//! after each merge option (a: dequantize + ΔW -> dense f32; b: re-quantize, with its rounding error).
//!
//! ```text
//! cargo run --profile test -p peft-quant --example qlora_sst2 -- [train_examples=500]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use peft_core::adapter::PeftModel;
use peft_models::bert::BertForSequenceClassification;
use peft_models::tokenizer::TextTokenizer;
use peft_quant::block4::FloatDtype;
use peft_quant::qlora::{default_quant_spec, quantize_sites};
use peft_quant::{QloraExt, QuantFormat};
use rand::seq::SliceRandom;
use rand::SeedableRng;

mod sst2_common;
use sst2_common::{accuracy, load_model, prepare, read_tsv, train, Data, Res};

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let n_train: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(500);
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

    let lora = peft_lora::methods().into_iter().find(|m| m.name.0 == "lora").ok_or("no lora entry")?;
    let model = prepare(&lora, load_model(&mdir)?)?;
    let t = Instant::now();
    train(&model, model.trainable_params(), lora.lr, &data)?;
    println!("lora : trained in {:5.0}s, dev acc {:.2}", t.elapsed().as_secs_f64(), accuracy(&model, &data)?);

    let qm = peft_quant::methods().remove(0);
    println!("{}", qm.describe());
    let model = prepare(&qm, load_model(&mdir)?)?;
    let t = Instant::now();
    train(&model, model.trainable_params(), qm.lr, &data)?;
    let acc = accuracy(&model, &data)?;
    println!("qlora: trained in {:5.0}s, dev acc {acc:.2}", t.elapsed().as_secs_f64());
    let dir = std::env::temp_dir().join(format!("qlora_sst2_{}", std::process::id()));
    model.save_pretrained(&dir)?;
    drop(model);

    // Reload the adapter (and head) on a freshly quantized model, then try both merge options.
    let reload = |dir: &Path| -> Res<PeftModel<BertForSequenceClassification>> {
        let model = load_model(&mdir)?;
        quantize_sites(&model, &default_quant_spec()?, &QuantFormat::default())?;
        let (q, report) = PeftModel::from_pretrained(model, dir, &peft_lora::registry())?;
        if !report.is_clean() {
            println!("  load: {report}");
        }
        Ok(q)
    };
    let q = reload(&dir)?;
    let m = q.quant_memory();
    println!(
        "quantized base: {} linears, {} params, {} bytes = {:.4} bytes/param ({:.4} without code tables)",
        q.quantized_sites().len(),
        m.params,
        m.bytes(),
        m.bytes_per_param(),
        m.bytes_per_param_without_maps()
    );
    println!("reloaded qlora: dev acc {:.2}", accuracy(&q, &data)?);
    let (model, _) = q.merge_and_unload_dense(FloatDtype::F32)?;
    println!("merge (a) dequantize + dW -> dense f32: dev acc {:.2}", accuracy(&model, &data)?);
    let mut model = reload(&dir)?;
    let report = model.merge_requantized()?;
    let max = report.iter().map(|r| r.max_abs).fold(0f32, f32::max);
    let mean = report.iter().map(|r| r.mean_abs).sum::<f32>() / report.len() as f32;
    let rel = report.iter().map(|r| r.relative).sum::<f32>() / report.len() as f32;
    println!(
        "merge (b) re-quantized NF4-DQ: dev acc {:.2}; rounding error over {} sites: max {max:.3e}, mean {mean:.3e}, \
         relative {rel:.4}",
        accuracy(&model, &data)?,
        report.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
