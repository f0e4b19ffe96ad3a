//! Replays every committed fuzz input through its target on the stable toolchain, without libFuzzer: the seed
//! corpora (`fuzz/corpus/<target>/`, valid files) and the crash reproducers of bugs the fuzzer found
//! (`fuzz/regressions/<target>/`, each fixed). A target panics on any bug (see `peft_fuzz::targets`), so this
//! test is the regression test of every fuzzer finding; it runs under the same 256 MiB allocation cap.

use std::path::Path;

use peft_fuzz::targets::{replay_dir, ALL};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_seed_and_regression_input_runs_clean() {
    let mut total = 0;
    for (name, _) in ALL {
        let seeds = replay_dir(name, &root().join("corpus").join(name));
        assert!(seeds > 0, "target {name} has no seed corpus in fuzz/corpus/{name}");
        total += seeds + replay_dir(name, &root().join("regressions").join(name));
    }
    eprintln!("replayed {total} inputs");
}

/// The seeds are accepted by their readers (so the fuzzer starts from inputs that reach the deep code): each
/// target's seeds are checked with the reader directly.
#[test]
fn seeds_are_valid_files() {
    let dir = |t: &str| {
        let mut v: Vec<_> = std::fs::read_dir(root().join("corpus").join(t))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seed-"))
            .collect();
        v.sort();
        v
    };
    for p in dir("safetensors") {
        safetensors::SafeTensors::deserialize(&std::fs::read(&p).unwrap()).unwrap();
        peft_core::io::SafeTensorsFile::open(&p).unwrap();
    }
    for p in dir("bnb") {
        let c = peft_quant::Checkpoint::read(&p).unwrap();
        assert!(!c.quant4_modules().is_empty() || !c.nf_modules().is_empty(), "{}", p.display());
        for m in c.nf_modules() {
            c.nf(&m).unwrap();
        }
    }
    for p in dir("gguf") {
        peft_core::io::gguf::GgufFile::open(&p).unwrap();
    }
    let llama = root().join("corpus/gguf/seed-llama");
    if let Err(e) = peft_models::registry::load(&llama) {
        panic!("{}: {e}", llama.display());
    }
    for p in dir("wav") {
        peft_models::audio::read_wav(&p).unwrap();
    }
    for p in dir("image") {
        peft_models::image_proc::read_rgb(&p).unwrap();
    }
    for p in dir("coco") {
        let data = std::fs::read(&p).unwrap();
        let (captions, rest) = peft_fuzz::split2(&data);
        let (instances, karpathy) = peft_fuzz::split2(rest);
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        let instances = (!instances.is_empty()).then(|| text(instances));
        let split = peft_vl::coco::CocoSplit::from_json_str("seed", "i", &text(captions), instances.as_deref())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(split.num_captions() > 0, "{}", p.display());
        peft_vl::coco::KarpathySplit::from_json_str("seed", &text(karpathy)).unwrap();
    }
    // The AdapterHub seed is read by the adapter target's AdapterHub path.
    use peft_adapters::adapterhub;
    let hub = std::fs::read(root().join("corpus/adapter/seed-adapterhub-seq-bn")).unwrap();
    let (cfg, w) = peft_fuzz::split2(&hub);
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(adapterhub::CONFIG_FILE), cfg).unwrap();
    std::fs::write(d.path().join(adapterhub::WEIGHTS_FILE), w).unwrap();
    let bert = peft_core::io::BertConfig {
        vocab_size: 20,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 16,
        ..Default::default()
    };
    let init = peft_core::nn::RandomInit::new(0, 0.1);
    let pooling = peft_models::bert::Pooling::Mean;
    let base = peft_models::bert::BertForSequenceClassification::from_source(&bert, &init, 2, pooling, 0).unwrap();
    let mut m = peft_core::adapter::PeftModel::wrap(base, 0);
    let (_, report) = adapterhub::load(&mut m, d.path(), "hub").unwrap();
    assert!(report.is_clean() && report.applied.len() == 8, "{report}");
}

#[test]
fn split2_inverts_join2_and_never_panics() {
    use peft_fuzz::{join2, split2};
    assert_eq!(split2(&join2(b"abc", b"de")), (&b"abc"[..], &b"de"[..]));
    assert_eq!(split2(b"\x01\0"), (&b""[..], &b""[..]));
    assert_eq!(split2(b"\xff\xff\xff\xffab"), (&b"ab"[..], &b""[..]));
}

/// The cap is enforced (a `try_reserve` over it fails instead of aborting) and freed memory is given back.
#[test]
fn allocations_over_the_cap_fail() {
    let mut v: Vec<u8> = Vec::new();
    assert!(v.try_reserve_exact(peft_fuzz::alloc::CAP + 1).is_err(), "an allocation over the cap must fail");
    v.try_reserve_exact(1 << 20).unwrap();
    assert!(peft_fuzz::alloc::peak() >= 1 << 20);
}

/// A GEMM workspace (page-aligned, sized from the CPU's L3, not from input) is not counted: a 300 MiB one, as
/// faer's x86 kernels reserve per thread where the CPU reports a 150 MiB L3, leaves the live count unchanged,
/// while a byte-aligned allocation of the same size fails.
#[test]
fn page_aligned_workspaces_are_not_counted() {
    use std::alloc::{alloc, dealloc, Layout};
    let size = 300 << 20;
    let page = Layout::from_size_align(size, peft_fuzz::alloc::WORKSPACE_ALIGN).unwrap();
    let before = peft_fuzz::alloc::live();
    // SAFETY: a non-zero size; freed below with the same layout.
    let p = unsafe { alloc(page) };
    assert!(!p.is_null(), "the page-aligned workspace was refused");
    let during = peft_fuzz::alloc::live();
    // SAFETY: `p` came from `alloc(page)`.
    unsafe { dealloc(p, page) };
    // Other tests run in parallel and move the count too, by far less than the workspace's 300 MiB.
    assert!(during < before + (128 << 20), "counted: {before} -> {during}");
    let mut v: Vec<u8> = Vec::new();
    assert!(v.try_reserve_exact(size).is_err(), "a byte-aligned 300 MiB allocation must still fail");
}
