//! Issue 14 (Build, crash safety): `kill -9` of `xtask merge` and `xtask quantize` at random points leaves either
//! the old output or the complete new one, and the next run removes the temporaries the killed run left.
//!
//! Each test times one uninterrupted run, then starts the command again several times and SIGKILLs it after a
//! delay drawn uniformly from [0, 1.2 x that time] (seeded; the seed is printed, and `PEFT_KILL9_SEED` replays
//! it). Each attempt writes the other of two different outputs over the current one, so after every kill the
//! output must be byte-identical to one of the two complete versions. No assertion depends on where a kill
//! lands; the tests print how many kills left temporaries behind (hit a write in progress).

#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::xtask;
use peft_core::adapter::PeftModel;
use peft_core::io::{write_safetensors, BertConfig};
use peft_core::nn::{named_params, RandomInit};
use peft_lora::{InitLoraWeights, LoraConfig};
use peft_models::bert::BertModel;
use rand::{Rng, SeedableRng};

/// Kills per command.
const KILLS: usize = 6;

fn seed() -> u64 {
    std::env::var("PEFT_KILL9_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    })
}

/// A BERT folder large enough that writing it takes a while (4 layers, hidden 256: 21 MB of F32) and two
/// different rank-8 LoRA adapters for it.
fn model_and_adapters(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let model_dir = root.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let cfg = BertConfig {
        vocab_size: 8000,
        hidden_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 1024,
        max_position_embeddings: 64,
        ..BertConfig::default()
    };
    let json = serde_json::json!({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 8000, "hidden_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024, "max_position_embeddings": 64,
        "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12
    });
    std::fs::write(model_dir.join("config.json"), json.to_string()).unwrap();
    std::fs::write(model_dir.join("tokenizer.json"), "{}").unwrap();
    let m = BertModel::from_source(&cfg, &RandomInit::new(1, 0.02)).unwrap();
    let ps = named_params(&m);
    let names: Vec<String> = ps.iter().map(|p| p.name().to_string()).collect();
    let vals: Vec<_> = ps.iter().map(|p| p.value().to_owned()).collect();
    write_safetensors(model_dir.join("model.safetensors"), names.iter().zip(vals.iter()), None).unwrap();
    let adapter = |name: &str, seed: u64| {
        let mut lc = LoraConfig::new(8, 16.0, ["query", "value", "dense"]);
        lc.init_lora_weights = InitLoraWeights::Bool(false);
        let dir = root.join(name);
        // a fresh copy of the base per adapter (attaching marks the model's sites)
        let base = BertModel::from_source(&cfg, &RandomInit::new(1, 0.02)).unwrap();
        PeftModel::new(&base, lc, "default", seed).unwrap().save_pretrained(&dir).unwrap();
        dir
    };
    let (a, b) = (adapter("adapter_a", 3), adapter("adapter_b", 4));
    (model_dir, a, b)
}

/// Entries of `dir` that are temporaries of `name` (`.NAME.*`).
fn temporaries(dir: &Path, name: &str) -> Vec<String> {
    let prefix = format!(".{name}.");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    v.sort();
    v
}

/// Runs xtask with `args`, SIGKILLs it after `delay` (if still running); returns whether it had finished.
fn run_and_kill(args: &[&dyn AsRef<std::ffi::OsStr>], delay: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args.iter().map(|a| a.as_ref()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + delay;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the command failed before it was killed: {status}");
            return true;
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(2)));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    false
}

/// Kill delays: uniform over [0, 1.2 x `full`], seeded.
fn delays(full: Duration, seed: u64) -> Vec<Duration> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..KILLS).map(|_| full.mul_f64(rng.gen_range(0.0..1.2))).collect()
}

#[test]
fn merge_killed_at_random_points_leaves_old_or_complete_new_output() {
    let t = tempfile::tempdir().unwrap();
    let (model, a, b) = model_and_adapters(t.path());
    let out = t.path().join("merged");
    // The two complete outputs: merge A, then B over it (timed).
    xtask(&[&"merge", &"--model", &model, &"--adapter", &a, &"--out", &out]);
    let bytes_a = std::fs::read(out.join("model.safetensors")).unwrap();
    let start = Instant::now();
    xtask(&[&"merge", &"--model", &model, &"--adapter", &b, &"--out", &out, &"--force"]);
    let full = start.elapsed();
    let bytes_b = std::fs::read(out.join("model.safetensors")).unwrap();
    assert_ne!(bytes_a, bytes_b, "the two adapters give different merged models");
    assert!(temporaries(t.path(), "merged").is_empty());
    let seed = seed();
    eprintln!("merge: uninterrupted run {full:?}; kill seed {seed} (PEFT_KILL9_SEED)");
    let (mut current, mut mid_write) = (&bytes_b, 0);
    for (i, delay) in delays(full, seed).into_iter().enumerate() {
        let (adapter, target) = if current == &bytes_a { (&b, &bytes_b) } else { (&a, &bytes_a) };
        let finished =
            run_and_kill(&[&"merge", &"--model", &model, &"--adapter", adapter, &"--out", &out, &"--force"], delay);
        // OUT is always a complete folder: the old one or the new one (never missing, never torn).
        let got = std::fs::read(out.join("model.safetensors"))
            .unwrap_or_else(|e| panic!("kill {i} after {delay:?}: {} unreadable: {e}", out.display()));
        assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file(), "kill {i}: files missing");
        let is_old = &got == current;
        assert!(is_old || &got == target, "kill {i} after {delay:?}: output is neither the old nor the new model");
        if finished {
            assert!(&got == target, "a finished run wrote the new output");
        }
        let left = temporaries(t.path(), "merged");
        mid_write += usize::from(!left.is_empty());
        eprintln!(
            "kill {i} after {delay:?}: finished {finished}, output {}, left {left:?}",
            if is_old { "old" } else { "new" }
        );
        current = if is_old { current } else { target };
    }
    // The next run cleans up whatever the killed ones left.
    let adapter = if current == &bytes_a { &b } else { &a };
    xtask(&[&"merge", &"--model", &model, &"--adapter", adapter, &"--out", &out, &"--force"]);
    let left = temporaries(t.path(), "merged");
    assert!(left.is_empty(), "temporaries left after a complete run: {left:?}");
    let want = if current == &bytes_a { &bytes_b } else { &bytes_a };
    assert!(&std::fs::read(out.join("model.safetensors")).unwrap() == want);
    eprintln!("merge: {mid_write} of {KILLS} kills left temporaries (landed mid-write)");
}

/// The fallback of filesystems without an atomic exchange: a merge killed between moving the old OUT aside and
/// renaming the new one in leaves `.OUT.old-PID` (complete old output) and `.OUT.tmp-PID` (complete new one) and
/// no OUT; the next run restores the old OUT (so `--force` is needed again, and nothing is lost) and removes the
/// temporary.
#[test]
fn merge_killed_between_its_two_renames_gets_the_old_output_back() {
    const DEAD_PID: u32 = u32::MAX - 1;
    let t = tempfile::tempdir().unwrap();
    let (model, a, b) = model_and_adapters(t.path());
    let out = t.path().join("merged");
    xtask(&[&"merge", &"--model", &model, &"--adapter", &a, &"--out", &out]);
    let bytes_a = std::fs::read(out.join("model.safetensors")).unwrap();
    let aside = t.path().join(format!(".merged.old-{DEAD_PID}"));
    let new_tmp = t.path().join(format!(".merged.tmp-{DEAD_PID}"));
    std::fs::rename(&out, &aside).unwrap();
    std::fs::create_dir_all(&new_tmp).unwrap();
    std::fs::write(new_tmp.join("model.safetensors"), b"half-written").unwrap();
    // Without --force the restored OUT is not replaced.
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["merge", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(&b)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("restored") && err.contains("--force"), "{err}");
    assert!(std::fs::read(out.join("model.safetensors")).unwrap() == bytes_a, "the old output is back");
    let text = xtask(&[&"merge", &"--model", &model, &"--adapter", &b, &"--out", &out, &"--force"]);
    assert!(text.contains("merged"), "{text}");
    assert!(temporaries(t.path(), "merged").is_empty(), "{:?}", temporaries(t.path(), "merged"));
    assert!(std::fs::read(out.join("model.safetensors")).unwrap() != bytes_a);
}

#[test]
fn quantize_killed_at_random_points_leaves_old_or_complete_new_output() {
    let t = tempfile::tempdir().unwrap();
    let (model, _, _) = model_and_adapters(t.path());
    let input = model.join("model.safetensors");
    let out = t.path().join("q.safetensors");
    let args = |kind: &str| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = ["quantize", "--in"].map(Into::into).to_vec();
        v.extend([input.clone().into_os_string(), "--out".into(), out.clone().into_os_string(), "--type".into()]);
        v.push(kind.into());
        v
    };
    fn refs(v: &[std::ffi::OsString]) -> Vec<&dyn AsRef<std::ffi::OsStr>> {
        v.iter().map(|s| s as &dyn AsRef<std::ffi::OsStr>).collect()
    }
    xtask(&refs(&args("int8")));
    let bytes_int8 = std::fs::read(&out).unwrap();
    let start = Instant::now();
    xtask(&refs(&args("nf4")));
    let full = start.elapsed();
    let bytes_nf4 = std::fs::read(&out).unwrap();
    assert_ne!(bytes_int8, bytes_nf4);
    let seed = seed();
    eprintln!("quantize: uninterrupted run {full:?}; kill seed {seed} (PEFT_KILL9_SEED)");
    let (mut current, mut mid_write) = (&bytes_nf4, 0);
    for (i, delay) in delays(full, seed).into_iter().enumerate() {
        let (kind, target) = if current == &bytes_int8 { ("nf4", &bytes_nf4) } else { ("int8", &bytes_int8) };
        let finished = run_and_kill(&refs(&args(kind)), delay);
        let got = std::fs::read(&out).unwrap_or_else(|e| panic!("kill {i} after {delay:?}: output unreadable: {e}"));
        let is_old = &got == current;
        assert!(is_old || &got == target, "kill {i} after {delay:?}: output is neither the old nor the new file");
        if finished {
            assert!(&got == target, "a finished run wrote the new output");
        }
        let left = temporaries(t.path(), "q.safetensors");
        mid_write += usize::from(!left.is_empty());
        eprintln!(
            "kill {i} after {delay:?}: finished {finished}, output {}, left {left:?}",
            if is_old { "old" } else { "new" }
        );
        current = if is_old { current } else { target };
    }
    let kind = if current == &bytes_int8 { "nf4" } else { "int8" };
    xtask(&refs(&args(kind)));
    let left = temporaries(t.path(), "q.safetensors");
    assert!(left.is_empty(), "temporaries left after a complete run: {left:?}");
    eprintln!("quantize: {mid_write} of {KILLS} kills left temporaries (landed mid-write)");
}
