//! `cargo xtask compose` on MiniLM and SST-2's dev set: adding a delta of zeros on the same entries changes no
//! prediction and every entry is reported as shared; adding a random delta on other entries changes the outputs.

mod common;

use common::xtask;
use peft_core::adapter::PeftModel;
use peft_core::testing::require_asset;
use peft_models::bert::{BertForSequenceClassification, Pooling};
use peft_sparse::{SparseFtConfig, SparseTuner};
use rand::{Rng, SeedableRng};

/// A sparse-ft adapter on MiniLM (mask from `seed`), its values drawn with `scale` (0: zeros), saved in `dir`;
/// returns k.
fn adapter(model: &std::path::Path, dir: &std::path::Path, seed: u64, scale: f32) -> usize {
    let m = BertForSequenceClassification::load(model, 2, Pooling::Mean, 0).unwrap();
    let mut c = SparseFtConfig::new(peft_sparse::ENCODER_WEIGHTS, 0.002);
    c.modules_to_save = Some(vec!["classifier".into()]);
    let pm = PeftModel::new(m, c, "default", seed).unwrap();
    let st = pm.tuner("default").unwrap().as_any().downcast_ref::<SparseTuner>().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
    let mut k = 0;
    for (_, d) in st.entries() {
        k += d.k();
        d.values().update(|v| v.mapv_inplace(|_| scale * rng.gen_range(-1.0f32..1.0)));
    }
    pm.save_pretrained(dir).unwrap();
    k
}

#[test]
fn zero_delta_on_the_same_entries_changes_nothing_and_overlaps_fully() {
    let (Some(model), Some(_)) = (require_asset("models/all-MiniLM-L6-v2"), require_asset("data/glue/SST-2/dev.tsv"))
    else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let (a, z, b) = (d.path().join("a"), d.path().join("z"), d.path().join("b"));
    let k = adapter(&model, &a, 1, 0.05);
    assert_eq!(adapter(&model, &z, 1, 0.0), k, "same seed, same mask");
    let out = xtask(&[&"compose", &"--task", &"sst2", &"--adapter", &a, &"--add", &z]);
    let row = out.lines().find(|l| l.starts_with("| metrics |")).expect("metrics row");
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(cells[2], cells[3], "a zero delta changed the scores: {out}");
    assert!(out.contains(&format!("| {k} | {k} + {k} ({k} shared with the task delta) |")), "{out}");
    // Another mask (seed 2) with large values: few shared entries and the scores move.
    adapter(&model, &b, 2, 0.5);
    let out = xtask(&[&"compose", &"--task", &"sst2", &"--adapter", &a, &"--add", &b]);
    let row = out.lines().find(|l| l.starts_with("| metrics |")).expect("metrics row");
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_ne!(cells[2], cells[3], "a large random delta left every score unchanged: {out}");
}
