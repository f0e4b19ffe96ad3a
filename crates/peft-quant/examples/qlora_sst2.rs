//! QLoRA vs LoRA on SST-2 with MiniLM-L6 (a short run): both registry entries (`lora`, `qlora`) trained on the
//! same examples; reports dev accuracy, training time, the quantized base's bytes/param, and the dev accuracy
//! after each merge option (a: dequantize + ΔW -> dense f32; b: re-quantize, with its rounding error).
//!
//! ```text
//! cargo run --profile test -p peft-quant --example qlora_sst2 -- [train_examples=500]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use peft_core::adapter::Method;
use peft_core::models::bert::{BertForSequenceClassification, Pooling};
use peft_core::models::tokenizer::{Batch, TextTokenizer};
use peft_core::nn::Ctx;
use peft_core::{AdamW, Optimizer, Param};
use peft_lora::LoraMethod;
use peft_quant::block4::FloatDtype;
use peft_quant::qlora::{default_quant_spec, Qlora};
use peft_quant::{QloraMethod, QuantFormat};
use rand::seq::SliceRandom;
use rand::SeedableRng;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn read_tsv(path: &Path) -> Res<Vec<(String, i64)>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut f = line.split('\t');
        let (Some(s), Some(l)) = (f.next(), f.next()) else { continue };
        out.push((s.to_string(), l.trim().parse()?));
    }
    Ok(out)
}

struct Data {
    tok: TextTokenizer,
    train: Vec<(String, i64)>,
    dev: Vec<(String, i64)>,
}

impl Data {
    fn batch(&self, rows: &[(String, i64)]) -> Res<(Batch, Vec<i64>)> {
        let texts: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
        Ok((self.tok.batch(&texts)?, rows.iter().map(|(_, l)| *l).collect()))
    }
}

fn accuracy(model: &BertForSequenceClassification, data: &Data) -> Res<f64> {
    let _ng = peft_core::autograd::NoGradGuard::new();
    let mut dev: Vec<&(String, i64)> = data.dev.iter().collect();
    dev.sort_by_key(|(s, _)| s.len());
    let mut correct = 0usize;
    for chunk in dev.chunks(64) {
        let rows: Vec<(String, i64)> = chunk.iter().map(|r| (*r).clone()).collect();
        let (b, y) = data.batch(&rows)?;
        let logits = model.forward(&b, &Ctx::eval())?;
        let l = logits.as_slice();
        for (i, &yi) in y.iter().enumerate() {
            let pred = if l[2 * i + 1] > l[2 * i] { 1 } else { 0 };
            correct += usize::from(pred == yi);
        }
    }
    Ok(100.0 * correct as f64 / data.dev.len() as f64)
}

fn train(model: &BertForSequenceClassification, params: Vec<Param>, lr: f64, data: &Data) -> Res<()> {
    let mut opt = AdamW::with_lr(params, lr, 0.0)?;
    let mut rows = data.train.clone();
    rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0));
    let t = Instant::now();
    for (step, chunk) in rows.chunks(16).enumerate() {
        let (b, y) = data.batch(chunk)?;
        let loss = model.forward(&b, &Ctx::train(step as u64))?.cross_entropy(&y, None, 0.0)?;
        let g = loss.backward()?;
        let l = loss.item()?;
        drop(loss);
        opt.step(&g)?;
        if step % 8 == 0 {
            eprintln!("  step {step:3} loss {l:.4} ({:.0}s)", t.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

fn load_model(dir: &Path) -> Res<BertForSequenceClassification> {
    Ok(BertForSequenceClassification::load(dir, 2, Pooling::Mean, 0)?)
}

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

    let lora = LoraMethod::lora(["query", "value"]);
    let model = load_model(&mdir)?;
    let prep = lora.prepare(&model, &model.classifier.base().params())?;
    let t = Instant::now();
    train(&model, prep.trainable(), lora.default_lr(), &data)?;
    println!("lora : trained in {:5.0}s, dev acc {:.2}", t.elapsed().as_secs_f64(), accuracy(&model, &data)?);

    let qm = QloraMethod::new(["query", "value"]);
    println!("{}", qm.describe());
    let model = load_model(&mdir)?;
    let prep = qm.prepare(&model, &model.classifier.base().params())?;
    let t = Instant::now();
    train(&model, prep.trainable(), qm.default_lr(), &data)?;
    let acc = accuracy(&model, &data)?;
    println!("qlora: trained in {:5.0}s, dev acc {acc:.2}", t.elapsed().as_secs_f64());
    let dir = std::env::temp_dir().join(format!("qlora_sst2_{}", std::process::id()));
    prep.save(&dir)?;
    drop(prep);

    // Reload the adapter (and head) on a freshly quantized model, then try both merge options.
    let reload = |dir: &Path| -> Res<(BertForSequenceClassification, Qlora)> {
        let model = load_model(&mdir)?;
        let spec = default_quant_spec()?;
        let (q, warnings) = Qlora::load(&model, &spec, &QuantFormat::default(), dir, "default")?;
        if !warnings.is_empty() {
            println!("  load warnings: {warnings:?}");
        }
        Ok((model, q))
    };
    let (model, q) = reload(&dir)?;
    let m = q.memory();
    println!(
        "quantized base: {} linears, {} params, {} bytes = {:.4} bytes/param ({:.4} without code tables)",
        q.quantized_paths().len(),
        m.params,
        m.bytes(),
        m.bytes_per_param(),
        m.bytes_per_param_without_maps()
    );
    println!("reloaded qlora: dev acc {:.2}", accuracy(&model, &data)?);
    q.merge_and_unload_dense(FloatDtype::F32)?;
    println!("merge (a) dequantize + dW -> dense f32: dev acc {:.2}", accuracy(&model, &data)?);
    let (model, q) = reload(&dir)?;
    let report = q.merge_requantized()?;
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
