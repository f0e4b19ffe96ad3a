//! What the SST-2 examples share: the TSV reader, tokenized batches, dev accuracy, a one-epoch AdamW loop and the
//! MiniLM classifier loader. Included with `mod sst2_common;` (not an example of its own).

use std::path::Path;
use std::time::Instant;

use peft_core::nn::Ctx;
use peft_core::{AdamW, Optimizer, Param};
use peft_models::bert::{BertForSequenceClassification, Pooling};
use peft_models::tokenizer::{Batch, TextTokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

pub fn read_tsv(path: &Path) -> Res<Vec<(String, i64)>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut f = line.split('\t');
        let (Some(s), Some(l)) = (f.next(), f.next()) else { continue };
        out.push((s.to_string(), l.trim().parse()?));
    }
    Ok(out)
}

pub struct Data {
    pub tok: TextTokenizer,
    pub train: Vec<(String, i64)>,
    pub dev: Vec<(String, i64)>,
}

impl Data {
    pub fn batch(&self, rows: &[(String, i64)]) -> Res<(Batch, Vec<i64>)> {
        let texts: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
        Ok((self.tok.batch(&texts)?, rows.iter().map(|(_, l)| *l).collect()))
    }
}

pub fn accuracy(model: &BertForSequenceClassification, data: &Data) -> Res<f64> {
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

pub fn train(model: &BertForSequenceClassification, params: Vec<Param>, lr: f64, data: &Data) -> Res<()> {
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

pub fn load_model(dir: &Path) -> Res<BertForSequenceClassification> {
    Ok(BertForSequenceClassification::load(dir, 2, Pooling::Mean, 0)?)
}

/// `spec`'s adapter on `model`, with the classifier head in `modules_to_save` (as the bench does).
pub fn prepare(
    spec: &peft_core::adapter::MethodSpec,
    model: BertForSequenceClassification,
) -> Res<peft_core::adapter::PeftModel<BertForSequenceClassification>> {
    let mut cfg = spec.config();
    cfg.set_modules_to_save(vec!["classifier".into()])?;
    let mut pm = peft_core::adapter::PeftModel::wrap(model, spec.seed);
    pm.add_adapter_boxed("default", cfg)?;
    pm.set_adapter("default")?;
    Ok(pm)
}
