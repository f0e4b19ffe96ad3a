//! `cargo xtask assets --fetch` against a fake Hugging Face Hub and GitHub raw host on loopback: small fake files
//! at the real URL paths (pinned revisions), their checksums passed with `--checksums` (normal runs use the pinned
//! ones, which the fake files do not match). No traffic leaves 127.0.0.1.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

const HUB_PREFIX: &str = "/sentence-transformers/all-MiniLM-L6-v2/resolve/1110a243fdf4706b3f48f1d95db1a4f5529b4d41";
const SST2_PREFIX: &str = "/eyalbd2/Reproducing-AutoPrompt/6288fb5bec9c572f2492875ae0111df5b6daed11/glue_data/SST-2";
const MRPC_PREFIX: &str = "/Nstats/my_bert/733d79335044b1b7eabb5b47a0eae0cd621dadc0/data/MRPC";

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A minimal HTTP/1.1 server on 127.0.0.1 serving `files` by path (404 otherwise); counts requests.
struct FakeHost {
    base: String,
    requests: Arc<AtomicUsize>,
}

fn respond(mut s: TcpStream, files: &HashMap<String, Vec<u8>>) {
    let mut line = String::new();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    if reader.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, body) = match files.get(&path) {
        Some(b) => ("200 OK", b.as_slice()),
        None => ("404 Not Found", &b"not found"[..]),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

impl FakeHost {
    fn start(files: HashMap<String, Vec<u8>>) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                let files = files.clone();
                std::thread::spawn(move || respond(s, &files));
            }
        });
        FakeHost { base, requests }
    }
}

/// A Hub-like F32 checkpoint (prefixed names, the integer `position_ids` buffer) and the pack's F16 file from it.
fn fake_model() -> (Vec<u8>, Vec<u8>) {
    let w: Vec<f32> = vec![0.5, -1.25, 3.0e-3, 7.0, 0.1, -0.0];
    let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let pos: Vec<u8> = (0..4i64).flat_map(|i| i.to_le_bytes()).collect();
    let hub = safetensors::serialize(
        [
            ("bert.embeddings.word_embeddings.weight", TensorView::new(Dtype::F32, vec![2, 3], &wb).unwrap()),
            ("embeddings.position_ids", TensorView::new(Dtype::I64, vec![1, 4], &pos).unwrap()),
        ],
        None,
    )
    .unwrap();
    let hb: Vec<u8> = w.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let pack = safetensors::serialize(
        [("embeddings.word_embeddings.weight", TensorView::new(Dtype::F16, vec![2, 3], &hb).unwrap())],
        Some(meta),
    )
    .unwrap();
    (hub, pack)
}

/// The fake layout: (URL path, served bytes, asset path, expected written bytes).
fn fake_layout() -> Vec<(String, Vec<u8>, &'static str, Vec<u8>)> {
    let (hub_model, pack_model) = fake_model();
    let plain = |url: String, rel: &'static str, b: &[u8]| (url, b.to_vec(), rel, b.to_vec());
    let mrpc_train_out = b"Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta b\ta c\n".to_vec();
    let mrpc_train_served = [&b"\xef\xbb\xbf"[..], &mrpc_train_out].concat();
    vec![
        plain(format!("{HUB_PREFIX}/config.json"), "models/all-MiniLM-L6-v2/config.json", b"{\"fake\": true}\n"),
        plain(format!("{HUB_PREFIX}/tokenizer.json"), "models/all-MiniLM-L6-v2/tokenizer.json", b"{\"tok\": 1}\n"),
        (format!("{HUB_PREFIX}/model.safetensors"), hub_model, "models/all-MiniLM-L6-v2/model.safetensors", pack_model),
        plain(format!("{SST2_PREFIX}/train_full.tsv"), "data/glue/SST-2/train.tsv", b"sentence\tlabel\ngood \t1\n"),
        plain(format!("{SST2_PREFIX}/dev.tsv"), "data/glue/SST-2/dev.tsv", b"sentence\tlabel\nbad \t0\n"),
        (format!("{MRPC_PREFIX}/train.tsv"), mrpc_train_served, "data/glue/MRPC/train.tsv", mrpc_train_out),
        plain(format!("{MRPC_PREFIX}/dev.tsv"), "data/glue/MRPC/dev.tsv", b"Quality\t#1 ID\n0\t5\n"),
    ]
}

/// The `--checksums` file for the fake layout.
fn checksums(dir: &Path, layout: &[(String, Vec<u8>, &'static str, Vec<u8>)]) -> std::path::PathBuf {
    let map: serde_json::Map<String, serde_json::Value> = layout
        .iter()
        .map(|(_, served, rel, out)| {
            (rel.to_string(), serde_json::json!({ "sha256": hex(out), "source_sha256": hex(served) }))
        })
        .collect();
    let p = dir.join("checksums.json");
    std::fs::write(&p, serde_json::to_string_pretty(&map).unwrap()).unwrap();
    p
}

fn run(base: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args.iter().map(|a| a.as_ref()))
        .env("HF_ENDPOINT", base)
        .env("PEFT_GITHUB_RAW_ENDPOINT", base)
        .env_remove("PEFT_ASSETS")
        .env_remove("ALL_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .env_remove("https_proxy")
        .env_remove("http_proxy")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Every file name under `dir`, recursively (to spot temporaries).
fn all_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                walk(root, &e.path(), out);
            } else {
                out.push(e.path().strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn fetch_from_a_loopback_fake_hub_writes_the_pack_layout() {
    let layout = fake_layout();
    let host = FakeHost::start(layout.iter().map(|(u, b, _, _)| (u.clone(), b.clone())).collect());
    let t = tempfile::tempdir().unwrap();
    let sums = checksums(t.path(), &layout);
    let dest = t.path().join("assets");
    let o = run(&host.base, &[&"assets", &"--fetch", &"--dest", &dest, &"--checksums", &sums]);
    let out = text(&o);
    eprintln!("{out}");
    assert!(o.status.success(), "{out}");
    assert!(out.contains(&format!("PEFT_ASSETS={}", dest.display())), "{out}");
    for (_, _, rel, expected) in &layout {
        assert_eq!(&std::fs::read(dest.join(rel)).unwrap(), expected, "{rel}");
    }
    let mut files = all_files(&dest);
    files.sort();
    let mut rels: Vec<String> = layout.iter().map(|l| l.2.to_string()).collect();
    rels.sort();
    assert_eq!(files, rels, "exactly the pack layout, no temporaries");
    assert_eq!(host.requests.load(Ordering::SeqCst), layout.len());

    // A second run verifies what is there and downloads nothing.
    let o = run(&host.base, &[&"assets", &"--fetch", &"--dest", &dest, &"--checksums", &sums]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("(present, checksum verified)").count(), layout.len(), "{}", text(&o));
    assert_eq!(host.requests.load(Ordering::SeqCst), layout.len());

    // The bench finds them through PEFT_ASSETS (it gets past the asset check, then the fake model fails to load).
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench", "--train-examples", "4", "--out"])
        .arg(t.path().join("bench"))
        .env("PEFT_ASSETS", &dest)
        .output()
        .unwrap();
    let err = text(&o);
    assert!(!err.contains("assets are missing"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn corrupted_download_fails_its_checksum_and_leaves_no_file() {
    let layout = fake_layout();
    let mut served: HashMap<String, Vec<u8>> = layout.iter().map(|(u, b, _, _)| (u.clone(), b.clone())).collect();
    // SST-2 dev arrives with one byte flipped.
    let dev_url = format!("{SST2_PREFIX}/dev.tsv");
    served.get_mut(&dev_url).unwrap()[3] ^= 0x20;
    // The model arrives truncated: its download checksum fails before any conversion.
    let model_url = format!("{HUB_PREFIX}/model.safetensors");
    served.get_mut(&model_url).unwrap().truncate(40);
    let host = FakeHost::start(served);
    let t = tempfile::tempdir().unwrap();
    let sums = checksums(t.path(), &layout);
    let dest = t.path().join("assets");
    let o = run(&host.base, &[&"assets", &"--fetch", &"--dest", &dest, &"--checksums", &sums]);
    let out = text(&o);
    eprintln!("{out}");
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(out.contains("2 file(s) could not be fetched"), "{out}");
    assert!(out.contains(&format!("{}{dev_url}", host.base)), "the URL to fetch is named: {out}");
    assert!(out.contains("has SHA-256"), "{out}");
    assert!(!dest.join("data/glue/SST-2/dev.tsv").exists(), "no partial file");
    assert!(!dest.join("models/all-MiniLM-L6-v2/model.safetensors").exists(), "no partial file");
    let files = all_files(&dest);
    assert_eq!(files.len(), layout.len() - 2, "only the verified files, no temporaries: {files:?}");

    // Without --checksums the pinned checksums apply, which the fake files do not have: nothing is written.
    let dest2 = t.path().join("pinned");
    let o = run(&host.base, &[&"assets", &"--fetch", &"--dest", &dest2]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("7 file(s) could not be fetched"), "{}", text(&o));
    assert!(!dest2.exists() || all_files(&dest2).is_empty());
}

#[test]
fn offline_fetch_names_every_missing_file_and_its_url() {
    // A port with nothing listening: connection refused.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("assets");
    let o = run(&base, &[&"assets", &"--fetch", &"--dest", &dest]);
    let out = text(&o);
    eprintln!("{out}");
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(out.contains("7 file(s) could not be fetched"), "{out}");
    for (url, _, rel, _) in fake_layout() {
        assert!(out.contains(rel), "{rel}: {out}");
        assert!(out.contains(&format!("{base}{url}")), "{url}: {out}");
    }
    assert!(out.contains("cannot connect"), "{out}");
}
