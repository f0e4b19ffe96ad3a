//! One entry point for every backbone: [`load`] picks the architecture from `config.json` (`model_type` /
//! `architectures`) or from GGUF metadata and returns a model whose parameters carry checkpoint names and whose
//! adapter sites are enumerable through [`peft_core::nn::Module`].

use std::path::Path;

use crate::bert::BertModel;
use crate::llama::Llama;
use crate::vit::Dinov2;
use crate::whisper::WhisperEncoder;
use peft_core::io::error::{IoError, IoResult};
use peft_core::io::hf_config::ArchConfig;
use peft_core::io::safetensors::SafeTensorsFile;
use peft_core::nn::Module;

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
    Ok(match cfg {
        ArchConfig::Bert(_) => Model::Bert(BertModel::load(path)?),
        ArchConfig::Llama(_) => Model::Llama(Llama::from_hf_dir(path)?),
        ArchConfig::Dinov2(c) => {
            let f = SafeTensorsFile::open(path.join("model.safetensors"))?;
            Model::Dinov2(Dinov2::load(&c, &f)?)
        }
        ArchConfig::Whisper(c) => {
            let f = SafeTensorsFile::open(path.join("model.safetensors"))?;
            Model::Whisper(WhisperEncoder::load(&c, &f)?)
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

#[cfg(test)]
mod tests {
    use super::*;

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
