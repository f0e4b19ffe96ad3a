//! Issue 14: hostile and careless inputs to the CLI give one clear error and never crash, allocate without
//! bound, delete what the command did not create, or write a silently wrong result.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{xtask, xtask_fails};
use peft_core::adapter::PeftModel;
use peft_core::io::{write_safetensors, BertConfig};
use peft_core::nn::{named_params, RandomInit};
use peft_lora::{InitLoraWeights, LoraConfig};
use peft_models::bert::BertModel;

/// A process id that is never running (above Linux's `pid_max`).
const DEAD_PID: u32 = u32::MAX - 1;

/// A 2-layer BERT folder (`config.json`, `model.safetensors`, `tokenizer.json`) and a rank-4 LoRA adapter
/// for it, in `root/tiny` and `root/adapter`.
fn tiny_bert_and_adapter(root: &Path) -> (PathBuf, PathBuf) {
    let model_dir = root.join("tiny");
    std::fs::create_dir_all(&model_dir).unwrap();
    let cfg = BertConfig {
        vocab_size: 16,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 16,
        ..BertConfig::default()
    };
    let json = serde_json::json!({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 16, "hidden_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 12, "max_position_embeddings": 16,
        "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12
    });
    std::fs::write(model_dir.join("config.json"), json.to_string()).unwrap();
    std::fs::write(model_dir.join("tokenizer.json"), "{}").unwrap();
    let m = BertModel::from_source(&cfg, &RandomInit::new(1, 0.2)).unwrap();
    let ps = named_params(&m);
    let names: Vec<String> = ps.iter().map(|p| p.name().to_string()).collect();
    let vals: Vec<_> = ps.iter().map(|p| p.value().to_owned()).collect();
    write_safetensors(model_dir.join("model.safetensors"), names.iter().zip(vals.iter()), None).unwrap();
    let mut lc = LoraConfig::new(4, 8.0, ["query", "value"]);
    lc.init_lora_weights = InitLoraWeights::Bool(false);
    let adapter = root.join("adapter");
    PeftModel::new(&m, lc, "default", 3).unwrap().save_pretrained(&adapter).unwrap();
    (model_dir, adapter)
}

/// Sets `r` in the adapter's config.
fn set_rank(adapter: &Path, r: u64) {
    let p = adapter.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["r"] = serde_json::json!(r);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// Runs xtask and returns (success, stdout + stderr).
fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args.iter().map(|a| a.as_ref())).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Every file under `dir` (relative paths, sorted).
fn tree(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    fn walk(root: &Path, d: &Path, v: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, v);
            } else {
                v.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Item 1: `r` = 1,000,000 or 2^62 in `adapter_config.json` is checked against `lora_A`'s shape in the file
/// before anything is allocated (it used to allocate r x in, 4.7 GB, or panic in ndarray). Already fixed by the
/// loader's preflight; this is its regression test through `merge` and `embed`.
#[test]
fn huge_rank_in_adapter_config_is_refused_before_allocating() {
    let d = tempfile::tempdir().unwrap();
    let (model, adapter) = tiny_bert_and_adapter(d.path());
    let list = d.path().join("in.txt");
    std::fs::write(&list, "hello\n").unwrap();
    for r in [1_000_000u64, 1 << 62] {
        set_rank(&adapter, r);
        let out = d.path().join("merged");
        let e = xtask_fails(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &out]);
        assert!(e.contains("lora_A") && e.contains(&r.to_string()) && e.contains("[4, 8]"), "r={r}: {e}");
        assert!(!out.exists());
        let emb = d.path().join("e.safetensors");
        let e = xtask_fails(&[&"embed", &"--model", &model, &"--input", &list, &"--out", &emb, &"--adapter", &adapter]);
        assert!(e.contains("lora_A") && e.contains(&r.to_string()), "r={r}: {e}");
        assert_eq!(e.matches("error:").count(), 1, "printed once: {e}");
    }
}

/// Item 4: `--out` equal to, above or inside an input folder is refused before anything is written or deleted
/// (`--force` used to delete the model, adapter and unrelated files with exit 0, and `--out MODEL/merged`
/// recursed ~230 levels).
#[test]
fn merge_refuses_outputs_overlapping_the_inputs() {
    let d = tempfile::tempdir().unwrap();
    let (model, adapter) = tiny_bert_and_adapter(d.path());
    std::fs::write(d.path().join("unrelated.txt"), "keep me").unwrap();
    let before = tree(d.path());
    let cases: [(PathBuf, &str); 6] = [
        (model.clone(), "is --model"),
        (d.path().to_path_buf(), "contains --model"),
        (model.join("merged"), "is inside --model"),
        (model.join("."), "is --model"),
        (adapter.clone(), "is --adapter"),
        (adapter.join("x/y"), "is inside --adapter"),
    ];
    for (out, says) in &cases {
        for force in [false, true] {
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
                vec![&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", out];
            if force {
                args.push(&"--force");
            }
            let e = xtask_fails(&args);
            assert!(e.contains(says) && e.contains("refusing"), "{}: {e}", out.display());
        }
    }
    assert_eq!(tree(d.path()), before, "nothing was written or deleted");
}

/// Item 4: `--force` replaces only a folder an earlier merge wrote; a file or any other folder at `--out` is
/// left alone (it used to be replaced, and then the command reported failure).
#[test]
fn merge_force_never_replaces_what_it_did_not_write() {
    let d = tempfile::tempdir().unwrap();
    let (model, adapter) = tiny_bert_and_adapter(d.path());
    let file = d.path().join("notes.txt");
    std::fs::write(&file, "precious").unwrap();
    let e = xtask_fails(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &file, &"--force"]);
    assert!(e.contains("is not a folder"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    let other = d.path().join("photos");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("a.jpg"), "x").unwrap();
    let e = xtask_fails(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &other, &"--force"]);
    assert!(e.contains("was not written by `xtask merge`"), "{e}");
    assert!(other.join("a.jpg").is_file());
    // ours: replaced with --force
    let out = d.path().join("merged");
    xtask(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &out]);
    std::fs::write(out.join("extra.txt"), "x").unwrap();
    xtask(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &out, &"--force"]);
    assert!(!out.join("extra.txt").exists() && out.join("model.safetensors").is_file());
    // IO errors name the path: an --out below a file
    let (ok, text) = run(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &file.join("sub")]);
    assert!(!ok && text.contains("notes.txt"), "{text}");
    assert_eq!(text.matches("error:").count(), 1, "printed once: {text}");
}

/// Item 7: weights in other formats would still hold the unmerged model: they are not copied, and the command
/// says so.
#[test]
fn merge_drops_weights_in_other_formats_and_says_so() {
    let d = tempfile::tempdir().unwrap();
    let (model, adapter) = tiny_bert_and_adapter(d.path());
    for f in
        ["tf_model.h5", "rust_model.ot", "pytorch_model.bin", "flax_model.msgpack", "onnx/model.onnx", "openvino/m.xml"]
    {
        let p = model.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "unmerged").unwrap();
    }
    std::fs::create_dir_all(model.join("1_Pooling")).unwrap();
    std::fs::write(model.join("1_Pooling/config.json"), "{}").unwrap();
    let out = d.path().join("merged");
    let text = xtask(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &out]);
    assert_eq!(
        tree(&out),
        ["1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json"],
        "only the merged weights and non-weight files"
    );
    for f in ["tf_model.h5", "rust_model.ot", "pytorch_model.bin", "flax_model.msgpack", "onnx", "openvino"] {
        assert!(text.contains(f), "{f} named in: {text}");
    }
}

/// Item 8: temporaries left by killed runs (`.OUT.tmp-PID/`, `.OUT.old-PID/`, `.FILE.PID.N.tmp`) are removed by
/// the next run when their process is gone; other entries stay.
#[cfg(target_os = "linux")]
#[test]
fn stale_temporaries_of_killed_runs_are_cleaned() {
    let d = tempfile::tempdir().unwrap();
    let (model, adapter) = tiny_bert_and_adapter(d.path());
    // A dead run's `.merged.old-PID` is not garbage but the previous output a merge killed between its two renames
    // moved aside: the next run restores it (kill9.rs `merge_killed_between_its_two_renames_gets_the_old_output_back`).
    let stale = [format!(".merged.tmp-{DEAD_PID}"), format!(".q.safetensors.{DEAD_PID}.0.tmp")];
    std::fs::create_dir_all(d.path().join(&stale[0]).join("sub")).unwrap();
    std::fs::write(d.path().join(&stale[0]).join("sub/model.safetensors"), "partial").unwrap();
    std::fs::write(d.path().join(&stale[1]), "partial").unwrap();
    let keep = [
        format!(".merged.tmp-{DEAD_PID}x"),
        format!(".mine.tmp-{DEAD_PID}"),
        format!(".merged.tmp-{}", std::process::id()),
    ];
    for k in &keep {
        std::fs::create_dir_all(d.path().join(k)).unwrap();
    }
    let out = d.path().join("merged");
    xtask(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &out]);
    xtask(&[
        &"quantize",
        &"--in",
        &model.join("model.safetensors"),
        &"--out",
        &d.path().join("q.safetensors"),
        &"--type",
        &"nf4",
    ]);
    for s in &stale {
        assert!(!d.path().join(s).exists(), "{s} removed");
    }
    for k in &keep {
        assert!(d.path().join(k).exists(), "{k} kept");
    }
}

/// `embed --out` naming one of its inputs (here the model's weights) is refused: the atomic replace would have
/// overwritten the model with the embeddings.
#[test]
fn embed_refuses_an_output_that_is_an_input() {
    let d = tempfile::tempdir().unwrap();
    let (model, _) = tiny_bert_and_adapter(d.path());
    let list = d.path().join("in.txt");
    std::fs::write(&list, "hello\n").unwrap();
    let weights = model.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    for out in [&weights, &list] {
        let e = xtask_fails(&[&"embed", &"--model", &model, &"--input", &list, &"--out", out]);
        assert!(e.contains("refusing to overwrite an input"), "{e}");
    }
    assert_eq!(std::fs::read(&weights).unwrap(), before);
}

/// Item 6: a quant_state shape of [2^32, 2^32] used to wrap to 0 elements and write a corrupt file with exit 0.
#[test]
fn dequantize_refuses_overflowing_quant_state_shapes() {
    use peft_quant::{Checkpoint, Quant4, Quant4Config, RawTensor};
    use safetensors::Dtype;
    let d = tempfile::tempdir().unwrap();
    let q = Quant4::quantize(&[0.5f32; 128], &[2, 64], &Quant4Config::default()).unwrap();
    let mut c = Checkpoint::new();
    c.insert_quant4("fc", &q).unwrap();
    let json = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4294967296, 4294967296]}"#;
    c.insert(
        "fc.weight.quant_state.bitsandbytes__nf4",
        RawTensor::new(Dtype::U8, vec![json.len()], json.into()).unwrap(),
    );
    c.insert("fc.weight", RawTensor::new(Dtype::U8, vec![0, 1], vec![]).unwrap());
    c.insert("fc.weight.absmax", RawTensor::from_f32(vec![0], &[]).unwrap());
    let src = d.path().join("q.safetensors");
    c.write(&src).unwrap();
    let out = d.path().join("dq.safetensors");
    let e = xtask_fails(&[&"dequantize", &"--in", &src, &"--out", &out]);
    assert!(e.contains("4294967296") && e.contains("more elements"), "{e}");
    assert!(!out.exists());
    // IO errors name the path
    let e = xtask_fails(&[&"dequantize", &"--in", &d.path().join("missing.safetensors"), &"--out", &out]);
    assert!(e.contains("missing.safetensors"), "{e}");
}

/// Item 9: bench refuses counts of 0 and bad learning rates up front, with one message naming the flag.
#[test]
fn bench_refuses_zero_counts_and_bad_learning_rates_once() {
    for (flag, value) in
        [("--train-examples", "0"), ("--seeds", "0"), ("--threads", "0"), ("--lr", "NaN"), ("--lr", "-1")]
    {
        let e = xtask_fails(&[&"bench", &flag, &value]);
        assert!(e.contains(flag), "{flag} {value}: {e}");
        assert_eq!(e.matches("error:").count(), 1, "printed once: {e}");
    }
    // refused before any work when the assets are present (else bench stops at the asset check first)
    let (ok, text) = run(&[&"bench", &"--methods", &"lora,lora", &"--tasks", &"rte"]);
    assert!(!ok && (text.contains("listed twice") || text.contains("assets are missing")), "{text}");
}
