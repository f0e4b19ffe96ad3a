//! Every backbone exposes the five per-layer kinds of adapter site, one of each per layer where the kind is per layer
//! (BERT also its embedding output, the sixth kind): a
//! wrapper that forwarded only some kinds (the tied LLaMA head did, before the visitor became one exhaustive
//! `Site` match) would change these counts.

use peft_core::nn::{site_counts, SiteCounts};
use peft_core::testing::{require_asset, require_smollm2_gguf};
use peft_models::registry::load;

fn counts(rel: &str) -> Option<SiteCounts> {
    let path = require_asset(rel)?;
    let m = load(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let c = site_counts(m.module());
    eprintln!("{rel}: {c:?}");
    Some(c)
}

#[test]
fn minilm_l6_sites() {
    // 6 layers x (q, k, v, o, fc1, fc2) + pooler dense; 2 residual, 1 prefix, 1 block per layer; the embedding
    // output; tensors: 5 in the
    // embeddings (word, position, token type, LayerNorm weight and bias) + 6 x 16 + pooler weight and bias.
    let Some(c) = counts("models/all-MiniLM-L6-v2") else { return };
    assert_eq!(c, SiteCounts { params: 103, linear: 37, residual: 12, prefix: 6, block: 6, embedding: 1 });
}

#[test]
fn dinov2_small_sites() {
    // 12 layers x 6 linear (no head); 2 residual, 1 prefix, 1 block per layer; tensors: cls token, position
    // embeddings, patch conv weight and bias + 12 x (16 + 2 layer scales) + final LayerNorm.
    let Some(c) = counts("models/dinov2-small") else { return };
    assert_eq!(c, SiteCounts { params: 222, linear: 72, residual: 24, prefix: 12, block: 12, embedding: 0 });
}

#[test]
fn whisper_tiny_encoder_sites() {
    // 4 layers x 6 linear; 2 residual, 1 prefix, 1 block per layer; tensors: 2 convs (weight, bias), positions +
    // 4 x 15 (the key projection has no bias) + final LayerNorm.
    let Some(c) = counts("models/whisper-tiny.en-encoder") else { return };
    assert_eq!(c, SiteCounts { params: 67, linear: 24, residual: 8, prefix: 4, block: 4, embedding: 0 });
}

#[test]
fn smollm2_sites() {
    let Some(path) = require_smollm2_gguf() else { return };
    let m = load(&path).unwrap();
    let c = site_counts(m.module());
    eprintln!("SmolLM2-135M: {c:?}");
    // 30 layers x (q, k, v, o, gate, up, down) + the tied lm_head site; 2 residual, 1 prefix, 1 block per layer;
    // tensors: embedding + 30 x 9 + final norm (the tied head weight is reported once).
    assert_eq!(c, SiteCounts { params: 272, linear: 211, residual: 60, prefix: 30, block: 30, embedding: 0 });
}
