//! LoRA inference overhead on MiniLM-L6 (all-MiniLM-L6-v2 when the asset is present, else random weights of the
//! same shapes), batch 32 x seq 32, LoRA r 8 on query/value:
//! - `unmerged_vs_merged`: forward of the base model, of the model with an unmerged adapter, and with it merged;
//! - `mixed_batch`: 8 adapters, one adapter name per row (row i -> adapter i % 8), against 8 separate passes over
//!   each adapter's 4-row sub-batch, and against all 8 adapters active on every row (the cost of a mixed batch that
//!   computes every adapter on every row).
//!
//! ```text
//! cargo bench -p peft-lora --bench overhead
//! ```

// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use peft_core::adapter::PeftModel;
use peft_core::io::BertConfig;
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::no_grad;
use peft_core::testing::require_asset;
use peft_lora::LoraConfig;
use peft_models::bert::BertModel;
use peft_models::tokenizer::Batch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const B: usize = 32;
const L: usize = 32;
const N_ADAPTERS: usize = 8;

fn model() -> BertModel {
    if let Some(dir) = require_asset("models/all-MiniLM-L6-v2") {
        if let Ok(m) = BertModel::load(&dir) {
            return m;
        }
    }
    let cfg = BertConfig {
        vocab_size: 30522,
        hidden_size: 384,
        num_hidden_layers: 6,
        num_attention_heads: 12,
        intermediate_size: 1536,
        ..BertConfig::default()
    };
    BertModel::from_source(&cfg, &RandomInit::new(0, 0.02)).expect("random MiniLM")
}

fn rows(n: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| (0..L).map(|_| rng.gen_range(1000..30000)).collect()).collect()
}

/// Adds adapter `name` (r 8 on query/value) with non-zero B.
fn add(lm: &mut PeftModel<BertModel>, name: &str, seed: u64) {
    lm.add_adapter(name, LoraConfig::new(8, 16.0, ["query", "value"])).unwrap();
    let init = RandomInit::new(seed, 0.01);
    for p in lm.adapter_params(name).unwrap() {
        if p.name().contains("lora_B") {
            p.set(init.get(p.name(), &p.shape()).unwrap()).unwrap();
        }
    }
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(4));
    g
}

fn unmerged_vs_merged(c: &mut Criterion) {
    let batch = Batch::from_rows(&rows(B, 3)).unwrap();
    let ctx = Ctx::eval();
    let mut lm = PeftModel::wrap(model(), 0);
    add(&mut lm, "a", 1);
    let mut g = group(c, "unmerged_vs_merged");
    lm.disable_adapters().unwrap();
    g.bench_function("base", |b| b.iter(|| no_grad(|| lm.forward(&batch, &ctx).unwrap())));
    lm.enable_adapters().unwrap();
    lm.set_adapter("a").unwrap();
    g.bench_function("lora_unmerged", |b| b.iter(|| no_grad(|| lm.forward(&batch, &ctx).unwrap())));
    lm.merge_adapter().unwrap();
    g.bench_function("lora_merged", |b| b.iter(|| no_grad(|| lm.forward(&batch, &ctx).unwrap())));
    g.finish();
}

fn mixed_batch(c: &mut Criterion) {
    let all_rows = rows(B, 4);
    let batch = Batch::from_rows(&all_rows).unwrap();
    let mut lm = PeftModel::wrap(model(), 0);
    let names: Vec<String> = (0..N_ADAPTERS).map(|i| format!("a{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        add(&mut lm, n, 10 + i as u64);
    }
    let per_row: Vec<String> = (0..B).map(|i| names[i % N_ADAPTERS].clone()).collect();
    let mixed_ctx = lm.mixed_batch(Ctx::eval(), per_row).unwrap();
    let subs: Vec<Batch> = (0..N_ADAPTERS)
        .map(|k| Batch::from_rows(&all_rows.iter().skip(k).step_by(N_ADAPTERS).cloned().collect::<Vec<_>>()).unwrap())
        .collect();
    let ctx = Ctx::eval();
    let mut g = group(c, "mixed_batch");
    g.bench_function("mixed_8_adapters", |b| b.iter(|| no_grad(|| lm.forward(&batch, &mixed_ctx).unwrap())));
    g.bench_function("separate_8_passes", |b| {
        b.iter(|| {
            for (n, sub) in names.iter().zip(&subs) {
                lm.set_adapter(n).unwrap();
                no_grad(|| lm.forward(sub, &ctx).unwrap());
            }
        })
    });
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    lm.set_adapters(&refs).unwrap();
    g.bench_function("all_8_on_every_row", |b| b.iter(|| no_grad(|| lm.forward(&batch, &ctx).unwrap())));
    g.finish();
}

criterion_group!(benches, unmerged_vs_merged, mixed_batch);
criterion_main!(benches);
