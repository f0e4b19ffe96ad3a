//! Checkpoint tensors a model built from its config left unread: the sign of a config that describes less model
//! than the checkpoint holds (`num_hidden_layers` 2 for a 6-layer file, GGUF `block_count` 0), which would
//! otherwise load a silently truncated model.
//!
//! A checkpoint tensor counts as *unused* when no parameter consumed it but a consumed tensor has the same name
//! up to its numeric components (`encoder.layer.5.output.dense.weight` vs `encoder.layer.0.output.dense.weight`).
//! Tensors of parts the model never builds (a Whisper decoder next to the encoder, a pooler, an LM head the
//! backbone does not use) have no consumed sibling and are not reported.

use std::collections::BTreeSet;
use std::path::Path;

use super::error::{IoError, IoResult};

/// The name with every all-digit dot-separated component replaced by `#` (`blk.3.attn_q.weight` ->
/// `blk.#.attn_q.weight`).
fn family(name: &str) -> String {
    name.split('.')
        .map(|c| if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) { "#" } else { c })
        .collect::<Vec<_>>()
        .join(".")
}

/// The tensors of `names` that `used` rejects but whose [family](self) holds a tensor `used` accepts, sorted.
pub fn unused_layer_tensors<'a>(names: impl IntoIterator<Item = &'a str>, used: impl Fn(&str) -> bool) -> Vec<String> {
    let (consumed, rest): (Vec<&str>, Vec<&str>) = names.into_iter().partition(|n| used(n));
    let families: BTreeSet<String> = consumed.iter().map(|n| family(n)).collect();
    let mut out: Vec<String> = rest.into_iter().filter(|n| families.contains(&family(n))).map(str::to_string).collect();
    out.sort_unstable();
    out
}

/// Fails with [`IoError::UnusedTensors`] when [`unused_layer_tensors`] finds any; `hint` says which config value
/// to compare (e.g. `"num_hidden_layers = 2"`).
///
/// # Errors
/// [`IoError::UnusedTensors`] naming `path`, the count and the first unused tensor.
pub fn check_unused<'a>(
    path: &Path,
    names: impl IntoIterator<Item = &'a str>,
    used: impl Fn(&str) -> bool,
    hint: &str,
) -> IoResult<()> {
    let unused = unused_layer_tensors(names, used);
    match unused.first() {
        None => Ok(()),
        Some(first) => Err(IoError::UnusedTensors {
            path: path.to_path_buf(),
            count: unused.len(),
            first: first.clone(),
            hint: hint.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_layers_are_reported_and_unbuilt_parts_are_not() {
        let names = [
            "encoder.layer.0.attention.query.weight",
            "encoder.layer.1.attention.query.weight",
            "encoder.layer.2.attention.query.weight",
            "decoder.layers.0.fc1.weight",
            "pooler.dense.weight",
        ];
        let used = |n: &str| n.starts_with("encoder.layer.0.") || n.starts_with("encoder.layer.1.");
        assert_eq!(unused_layer_tensors(names, used), ["encoder.layer.2.attention.query.weight"]);
        let e = check_unused(Path::new("m.safetensors"), names, used, "num_hidden_layers = 2").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("m.safetensors") && msg.contains("encoder.layer.2.") && msg.contains("= 2"), "{msg}");
        assert!(check_unused(Path::new("m"), names, |n| n.starts_with("encoder"), "").is_ok());
    }
}
