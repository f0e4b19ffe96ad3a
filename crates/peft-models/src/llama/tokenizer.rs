//! The byte-level BPE tokenizer of LLaMA-family models, as a [`tokenizers::Tokenizer`]: read from a
//! `tokenizer.json`, or rebuilt from a GGUF file's `tokenizer.ggml.*` metadata (vocabulary, merges, token types)
//! the way llama.cpp's `gpt2` tokenizer model defines it. Neither adds a BOS token.

use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

#[cfg(feature = "gguf")]
use peft_core::io::{GgufFile, GgufValue};
use peft_core::io::{IoError, IoResult};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Reads a Hugging Face `tokenizer.json`.
///
/// # Errors
/// [`IoError::NotFound`] / [`IoError::Io`]; [`IoError::CorruptHeader`] when the tokenizers crate rejects it.
pub fn tokenizer_from_file(path: impl AsRef<Path>) -> IoResult<Tokenizer> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| IoError::io(path, e))?;
    Tokenizer::from_str(&text).map_err(|e| IoError::CorruptHeader { path: path.to_path_buf(), reason: e.to_string() })
}

/// Builds the tokenizer stored in a GGUF file's metadata: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with
/// `tokens`, `merges` and `token_type` (control tokens become special added tokens). The pre-tokenizer follows
/// `tokenizer.ggml.pre`: `smollm` splits digits individually before the GPT-2 byte-level split; `gpt2`,
/// `default` or absent use the GPT-2 split alone.
///
/// # Errors
/// [`IoError::MissingKey`] / [`IoError::MetadataType`] for absent or mistyped keys; [`IoError::InvalidConfig`]
/// for another tokenizer model or pre-tokenizer, or a vocabulary the tokenizers crate rejects.
#[cfg(feature = "gguf")]
pub fn tokenizer_from_gguf(f: &GgufFile) -> IoResult<Tokenizer> {
    let invalid = |field, reason: String| IoError::InvalidConfig { path: f.path().to_path_buf(), field, reason };
    let model = f.meta_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(invalid("tokenizer.ggml.model", format!("`{model}` (only `gpt2` byte-level BPE is supported)")));
    }
    let strings = |key: &str| -> IoResult<Vec<String>> {
        f.meta_array(key)?
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| IoError::MetadataType {
                    path: f.path().to_path_buf(),
                    key: key.to_string(),
                    expected: "an array of strings",
                    found: v.type_name(),
                })
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match f.meta("tokenizer.ggml.token_type") {
        Some(_) => f.meta_array("tokenizer.ggml.token_type")?.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => Vec::new(),
    };
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(invalid(
            "tokenizer.ggml.token_type",
            format!("{} entries for {} tokens (llama.cpp needs one per token)", types.len(), tokens.len()),
        ));
    }
    let digits = match f.meta("tokenizer.ggml.pre").and_then(GgufValue::as_str) {
        Some("smollm") => true,
        None | Some("gpt2" | "gpt-2" | "default") => false,
        Some(other) => {
            return Err(invalid("tokenizer.ggml.pre", format!("pre-tokenizer `{other}` is not supported")));
        }
    };
    let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": t == TOKEN_TYPE_CONTROL})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = if digits {
        json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
    } else {
        byte_level
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    Tokenizer::from_str(&spec.to_string()).map_err(|e| invalid("tokenizer.ggml.tokens", e.to_string()))
}
