//! One entry point for every backbone: [`load`] picks the architecture from `config.json` (`model_type` /
//! `architectures`) or from GGUF metadata and returns a model whose parameters carry checkpoint names and whose
//! adapter sites are enumerable through [`peft_core::nn::Module`].

use std::collections::HashSet;
use std::path::Path;

use crate::bert::BertModel;
use crate::llama::Llama;
use crate::vit::Dinov2;
use crate::whisper::WhisperEncoder;
use peft_core::io::error::{IoError, IoResult};
use peft_core::io::hf_config::ArchConfig;
use peft_core::io::safetensors::SafeTensorsFile;
use peft_core::io::unused::check_unused;
use peft_core::nn::{named_params, Module};

/// A loaded backbone.
pub enum Model {
    /// BERT / RoBERTa layout (MiniLM).
    Bert(BertModel),
    /// DINOv2 ViT.
    Dinov2(Dinov2),
    /// Whisper encoder.
    Whisper(WhisperEncoder),
    /// LLaMA-style decoder (HF folder or GGUF file).
    Llama(Llama),
}

impl Model {
    /// The architecture's name (`"bert"`, `"dinov2"`, `"whisper"`, `"llama"`).
    pub fn arch(&self) -> &'static str {
        match self {
            Model::Bert(_) => "bert",
            Model::Dinov2(_) => "dinov2",
            Model::Whisper(_) => "whisper",
            Model::Llama(_) => "llama",
        }
    }

    /// The model as a [`Module`]: parameters and adapter sites by checkpoint name.
    pub fn module(&self) -> &dyn Module {
        match self {
            Model::Bert(m) => m,
            Model::Dinov2(m) => m,
            Model::Whisper(m) => m,
            Model::Llama(m) => m,
        }
    }
}

/// Loads the model at `path`: a `.gguf` file (LLaMA) or a Hugging Face folder with `config.json` and
/// `model.safetensors`.
///
/// # Errors
/// [`IoError::NotFound`] for a missing path, [`IoError::UnknownArchitecture`] for a `model_type` this crate does
/// not implement, and the loaders' errors (missing or mis-shaped tensors, corrupt files).
///
/// ```no_run
/// let m = peft_models::registry::load("../shared/assets/models/all-MiniLM-L6-v2")?;
/// assert_eq!(m.arch(), "bert");
/// let sites = peft_core::nn::linear_sites(m.module());
/// assert!(sites.iter().any(|s| s.path() == "encoder.layer.0.attention.self.query"));
/// # Ok::<(), peft_core::io::error::IoError>(())
/// ```
pub fn load(path: impl AsRef<Path>) -> IoResult<Model> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(IoError::NotFound { path: path.to_path_buf() });
    }
    if path.is_file() {
        #[cfg(feature = "gguf")]
        return Ok(Model::Llama(Llama::from_gguf(path)?));
        #[cfg(not(feature = "gguf"))]
        return Err(IoError::InvalidConfig {
            path: path.to_path_buf(),
            field: "gguf",
            reason: "GGUF files need the `gguf` feature of peft-models".into(),
        });
    }
    let cfg = ArchConfig::load(path.join("config.json"))?;
    let weights = path.join("model.safetensors");
    Ok(match cfg {
        ArchConfig::Bert(_) => {
            let m = BertModel::load(path)?;
            let hint = format!("num_hidden_layers = {}", m.layers.len());
            check_all_read(&m, &weights, &m.prefix, &hint)?;
            Model::Bert(m)
        }
        // checked by the loader itself
        ArchConfig::Llama(_) => Model::Llama(Llama::from_hf_dir(path)?),
        ArchConfig::Dinov2(c) => {
            let m = Dinov2::load(&c, &SafeTensorsFile::open(&weights)?)?;
            check_all_read(&m, &weights, "", &format!("num_hidden_layers = {}", c.num_hidden_layers))?;
            Model::Dinov2(m)
        }
        ArchConfig::Whisper(c) => {
            let m = WhisperEncoder::load(&c, &SafeTensorsFile::open(&weights)?)?;
            check_all_read(&m, &weights, &m.prefix, &format!("encoder_layers = {}", m.layers.len()))?;
            Model::Whisper(m)
        }
        // `ArchConfig` is non-exhaustive: an architecture peft-core learns to parse before this crate builds it.
        other => {
            return Err(IoError::UnknownArchitecture {
                path: path.join("config.json"),
                model_type: Some(format!("{other:?}").split('(').next().unwrap_or("?").to_lowercase()),
                architectures: Vec::new(),
            })
        }
    })
}

/// Fails when `weights` holds layers `model` (built from the config) did not read: see
/// [`peft_core::io::unused`]. Parameter names may carry the checkpoint's `prefix` or not.
fn check_all_read(model: &dyn Module, weights: &Path, prefix: &str, hint: &str) -> IoResult<()> {
    let params: HashSet<String> = named_params(model).iter().map(|p| p.name().to_string()).collect();
    let used = |n: &str| params.contains(n) || n.strip_prefix(prefix).is_some_and(|s| params.contains(s));
    let f = SafeTensorsFile::open(weights)?;
    check_unused(weights, f.names(), used, hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14 item 7: a config with fewer layers than the checkpoint used to load a silently truncated model.
    #[test]
    fn bert_config_with_fewer_layers_than_the_checkpoint_is_refused() {
        use peft_core::io::{write_safetensors, BertConfig};
        use peft_core::nn::RandomInit;
        let dir = tempfile::tempdir().unwrap();
        let cfg = BertConfig {
            vocab_size: 16,
            hidden_size: 8,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            intermediate_size: 12,
            max_position_embeddings: 16,
            ..BertConfig::default()
        };
        let m = BertModel::from_source(&cfg, &RandomInit::new(1, 0.2)).unwrap();
        let ps = named_params(&m);
        let names: Vec<String> = ps.iter().map(|p| format!("bert.{}", p.name())).collect();
        let vals: Vec<_> = ps.iter().map(|p| p.value().to_owned()).collect();
        write_safetensors(dir.path().join("model.safetensors"), names.iter().zip(vals.iter()), None).unwrap();
        let json = |layers: usize| {
            serde_json::json!({
                "model_type": "bert", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": layers,
                "num_attention_heads": 2, "intermediate_size": 12, "max_position_embeddings": 16,
                "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12
            })
            .to_string()
        };
        std::fs::write(dir.path().join("config.json"), json(3)).unwrap();
        assert!(load(dir.path()).is_ok());
        std::fs::write(dir.path().join("config.json"), json(2)).unwrap();
        match load(dir.path()) {
            Err(e @ IoError::UnusedTensors { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("bert.encoder.layer.2.") && msg.contains("num_hidden_layers = 2"), "{msg}");
            }
            Err(e) => panic!("expected UnusedTensors, got {e}"),
            Ok(_) => panic!("a 2-layer model was loaded from a 3-layer checkpoint"),
        }
    }

    #[test]
    fn missing_path_and_unknown_architecture_are_typed_errors() {
        assert!(matches!(load("/definitely/not/here"), Err(IoError::NotFound { .. })));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "mamba", "architectures": ["MambaModel"]}"#)
            .unwrap();
        match load(dir.path()) {
            Err(IoError::UnknownArchitecture { .. }) => {}
            Err(e) => panic!("expected UnknownArchitecture, got {e}"),
            Ok(m) => panic!("expected an error, loaded {}", m.arch()),
        }
    }
}
