//! MiniLM (all-MiniLM-L6-v2) parity with transformers `BertModel`: token ids, last_hidden_state, sentence
//! embeddings and the padded batch, against `reference/minilm_l6_v2.{json,safetensors}`.

use peft_core::io::SafeTensorsFile;
use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_models::bert::{l2_normalize, mean_pool, BertModel};
use peft_models::tokenizer::{Batch, TextTokenizer};

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn ids(f: &SafeTensorsFile, name: &str) -> Vec<usize> {
    f.get_i64(name).unwrap().iter().map(|&x| x as usize).collect()
}

#[test]
fn minilm_matches_transformers() {
    let (Some(model_dir), Some(json), Some(st)) = (
        require_asset("models/all-MiniLM-L6-v2"),
        require_asset("reference/minilm_l6_v2.json"),
        require_asset("reference/minilm_l6_v2.safetensors"),
    ) else {
        return;
    };
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let texts: Vec<String> =
        meta["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(texts.len(), 3);
    let reference = SafeTensorsFile::open(st).unwrap();
    let tok = TextTokenizer::from_file(model_dir.join("tokenizer.json")).unwrap();
    let model = BertModel::load(&model_dir).unwrap();
    let ctx = Ctx::eval();
    let h = model.hidden_size();

    let mut lens = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let b = tok.batch(&[text]).unwrap();
        assert_eq!(b.input_ids, ids(&reference, &format!("s{i}.input_ids")), "token ids of sentence {i}");
        assert_eq!(b.token_type_ids, ids(&reference, &format!("s{i}.token_type_ids")));
        let mask: Vec<u8> = ids(&reference, &format!("s{i}.attention_mask")).iter().map(|&x| x as u8).collect();
        assert_eq!(b.attention_mask, mask);
        lens.push(b.seq_len());

        let out = model.forward(&b, &ctx).unwrap();
        let want = reference.get(&format!("s{i}.last_hidden_state")).unwrap();
        let err = max_abs(&out.to_vec(), want.as_slice().unwrap());
        let emb = l2_normalize(&mean_pool(&out, &b.attention_mask).unwrap()).unwrap();
        let want_emb = reference.get(&format!("s{i}.sentence_embedding")).unwrap();
        let err_emb = max_abs(&emb.to_vec(), want_emb.as_slice().unwrap());
        println!(
            "sentence {i} ({} tokens): last_hidden_state max|err| {err:.3e}, embedding {err_emb:.3e}",
            b.seq_len()
        );
        assert!(err <= 1e-4, "sentence {i}: last_hidden_state error {err}");
        assert!(err_emb <= 1e-4, "sentence {i}: embedding error {err_emb}");
    }

    // The padded batch: our tokenizer's batch equals the reference's, and real tokens match.
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let b = tok.batch(&refs).unwrap();
    assert_eq!(b.input_ids, ids(&reference, "batch.input_ids"));
    let want_mask: Vec<u8> = ids(&reference, "batch.attention_mask").iter().map(|&x| x as u8).collect();
    assert_eq!(b.attention_mask, want_mask);
    let want_b = Batch {
        input_ids: b.input_ids.clone(),
        token_type_ids: ids(&reference, "batch.token_type_ids"),
        attention_mask: want_mask,
        shape: b.shape,
    };
    assert_eq!(b, want_b);
    let out = model.forward(&b, &ctx).unwrap().to_vec();
    let want = reference.get("batch.last_hidden_state").unwrap();
    let want = want.as_slice().unwrap();
    let l = b.seq_len();
    let mut err: f32 = 0.0;
    for (i, &n) in lens.iter().enumerate() {
        let s = i * l * h;
        err = err.max(max_abs(&out[s..s + n * h], &want[s..s + n * h]));
    }
    let emb = model.sentence_embedding(&b, &ctx).unwrap();
    let err_emb = max_abs(&emb.to_vec(), reference.get("batch.sentence_embedding").unwrap().as_slice().unwrap());
    println!("padded batch [3, {l}]: real-token max|err| {err:.3e}, embeddings {err_emb:.3e}");
    assert!(err <= 1e-4 && err_emb <= 1e-4);
}

#[test]
fn pairs_get_segment_ids_and_truncation_is_longest_first() {
    let Some(dir) = require_asset("models/all-MiniLM-L6-v2") else {
        return;
    };
    let mut tok = TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let e = tok.encode_pair("a cat", "the dog runs").unwrap();
    assert_eq!(e.get_type_ids(), &[0, 0, 0, 0, 1, 1, 1, 1]);
    let b = tok.batch_pairs(&[("a cat", "the dog runs"), ("hi", "yo")]).unwrap();
    assert_eq!(b.shape, [2, 8]);
    assert_eq!(b.len_of(1), 5);
    assert_eq!(&b.input_ids[8 + 5..], &[tok.pad_id(); 3]);
    tok.set_max_length(Some(6)).unwrap();
    let e = tok.encode_pair("a cat", "the dog runs").unwrap();
    assert_eq!(e.len(), 6);
    // tokenizers' LongestFirst (as in transformers' fast tokenizers) shares the 3-token budget as 1 + 2.
    assert_eq!(e.get_type_ids(), &[0, 0, 0, 1, 1, 1]);
    let b = tok.batch(&["one two three four five six seven"]).unwrap();
    assert_eq!(b.shape, [1, 6]);
}
