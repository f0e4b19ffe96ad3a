//! The caption metrics against pycocoevalcap 1.2 on a fixed candidate/reference set (79 COCO val images; the
//! rule that built it is in `fixtures/gen_caption_fixture.py`, which also records the toolkit's numbers).

use peft_vl::metrics::{score_captions, score_tokenized, tokenize};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/caption_metrics.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture file")).expect("fixture JSON")
}

fn words(s: &str) -> Vec<String> {
    s.split(' ').filter(|w| !w.is_empty()).map(String::from).collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().expect("array").iter().map(|s| s.as_str().expect("string").to_string()).collect()
}

/// pycocoevalcap's corpus and per-image scores, in the order BLEU-1..4, ROUGE-L, CIDEr.
fn expected(f: &Value) -> (Vec<f64>, Vec<Vec<f64>>) {
    let names = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"];
    let corpus = names.iter().map(|n| f["corpus"][n].as_f64().expect("score")).collect();
    let per = f["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|it| names.iter().map(|n| it["scores"][n].as_f64().expect("score")).collect())
        .collect();
    (corpus, per)
}

fn ours(s: &peft_vl::metrics::CaptionScores) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut corpus = s.bleu.to_vec();
    corpus.extend([s.rouge_l, s.cider_d]);
    let per = (0..s.per_rouge_l.len())
        .map(|i| {
            let mut v = s.per_bleu[i].to_vec();
            v.extend([s.per_rouge_l[i], s.per_cider_d[i]]);
            v
        })
        .collect();
    (corpus, per)
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{k}]: ours {g}, pycocoevalcap {w}");
    }
}

#[test]
fn scorers_match_pycocoevalcap_on_its_tokenization() {
    let f = fixture();
    let items = f["items"].as_array().expect("items");
    assert_eq!(items.len(), 79);
    let cands: Vec<Vec<String>> = items.iter().map(|it| words(it["candidate_tokenized"].as_str().unwrap())).collect();
    let refs: Vec<Vec<Vec<String>>> =
        items.iter().map(|it| strs(&it["references_tokenized"]).iter().map(|s| words(s)).collect()).collect();
    let s = score_tokenized(&cands, &refs).unwrap();
    let (want, want_per) = expected(&f);
    let (got, got_per) = ours(&s);
    assert_close("corpus", &got, &want, 1e-9);
    for (i, (g, w)) in got_per.iter().zip(&want_per).enumerate() {
        assert_close(&format!("image {i}"), g, w, 1e-9);
    }
}

#[test]
fn tokenizer_agrees_with_the_ptb_tokenizer_on_the_fixture_captions() {
    let f = fixture();
    let mut differ = Vec::new();
    let mut total = 0;
    for it in f["items"].as_array().unwrap() {
        let raw = std::iter::once(it["candidate"].as_str().unwrap().to_string()).chain(strs(&it["references"]));
        let tok = std::iter::once(it["candidate_tokenized"].as_str().unwrap().to_string())
            .chain(strs(&it["references_tokenized"]));
        for (r, t) in raw.zip(tok) {
            total += 1;
            if tokenize(&r) != words(&t) {
                differ.push(format!("{r:?}: ours {:?}, PTB {t:?}", tokenize(&r)));
            }
        }
    }
    assert_eq!(total, 79 + 79 * 4 + items_with_extra_refs(&f));
    assert!(differ.is_empty(), "{} of {total} captions tokenize differently:\n{}", differ.len(), differ.join("\n"));
}

fn items_with_extra_refs(f: &Value) -> usize {
    f["items"].as_array().unwrap().iter().map(|it| it["references"].as_array().unwrap().len() - 4).sum()
}

#[test]
fn end_to_end_from_raw_captions_matches_pycocoevalcap() {
    let f = fixture();
    let items = f["items"].as_array().unwrap();
    let cands: Vec<String> = items.iter().map(|it| it["candidate"].as_str().unwrap().to_string()).collect();
    let refs: Vec<Vec<String>> = items.iter().map(|it| strs(&it["references"])).collect();
    let s = score_captions(&cands, &refs).unwrap();
    let (want, _) = expected(&f);
    let (got, _) = ours(&s);
    assert_close("corpus (raw captions, our tokenizer)", &got, &want, 1e-9);
}
