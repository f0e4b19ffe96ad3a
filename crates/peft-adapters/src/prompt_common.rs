//! What prompt tuning and prefix tuning share: PEFT's prompt-learning config fields (`num_virtual_tokens`,
//! `token_dim`, `num_transformer_submodules`, `num_attention_heads`, `num_layers`, filled from the model at
//! injection and recorded in the saved config), the `prompt_embeddings` file key, and [`PromptTuner`], the tuner
//! holding one shared prompt encoder and a layer on each attention-prefix site that reads it.

use std::any::Any;
use std::sync::Arc;

use peft_core::adapter::{AdapterError, AdapterResult, AdapterTensors, Tuner, TunerConfig};
use peft_core::nn::{PrefixAdapter, PrefixSite};
use peft_core::Param;

use crate::common::AdapterSite;

/// The single tensor key PEFT writes for prompt-learning adapters (no `base_model.model.` prefix).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// A prompt encoder shared by the layers of one adapter: its parameters and the table PEFT saves.
pub trait PromptEncoder: Send + Sync + 'static {
    /// Its trainable parameters.
    fn params(&self) -> Vec<Param>;
    /// The tensor saved as `prompt_embeddings` (a parameter, or a value computed from them).
    ///
    /// # Errors
    /// Shape errors while computing it.
    fn saved(&self) -> peft_core::Result<Param>;
    /// Sets the encoder from a saved `prompt_embeddings`.
    ///
    /// # Errors
    /// Missing or mis-shaped tensor; an encoder that cannot be set from the table.
    fn load(&self, src: &AdapterTensors) -> AdapterResult<()>;
}

/// One prompt-learning adapter: a shared encoder and a layer on each of its prefix sites. Not mergeable.
pub struct PromptTuner<E: PromptEncoder> {
    name: String,
    kind: &'static str,
    encoder: Arc<E>,
    sites: Vec<PrefixSite>,
    saved_config: Box<dyn TunerConfig>,
}

impl<E: PromptEncoder> PromptTuner<E> {
    /// Attaches `layers` (one per site, each reading `encoder`) under `name`; on error, detaches what was attached.
    ///
    /// # Errors
    /// A name taken on a site.
    pub fn attach(
        name: &str,
        kind: &'static str,
        encoder: Arc<E>,
        layers: Vec<(PrefixSite, Arc<dyn PrefixAdapter>)>,
        saved_config: Box<dyn TunerConfig>,
    ) -> AdapterResult<Self> {
        let mut me = PromptTuner { name: name.into(), kind, encoder, sites: Vec::new(), saved_config };
        for (site, layer) in layers {
            if let Err(e) = site.attach(layer) {
                let _ = me.detach(false);
                return Err(e.into());
            }
            me.sites.push(site);
        }
        Ok(me)
    }

    /// The shared encoder.
    pub fn encoder(&self) -> &E {
        &self.encoder
    }

    /// The sites the adapter acts on.
    pub fn sites(&self) -> &[PrefixSite] {
        &self.sites
    }
}

impl<E: PromptEncoder> Tuner for PromptTuner<E> {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &str {
        self.kind
    }
    fn params(&self) -> Vec<Param> {
        self.encoder.params()
    }
    fn state_dict(&self) -> Vec<(String, Param)> {
        match self.encoder.saved() {
            Ok(p) => vec![(PROMPT_EMBEDDINGS.into(), p)],
            // Computing the table only fails on an inconsistent encoder, which construction rules out.
            Err(_) => Vec::new(),
        }
    }
    fn saved_config(&self) -> Option<Box<dyn TunerConfig>> {
        Some(self.saved_config.clone_box())
    }
    fn load_state_dict(&self, src: &AdapterTensors) -> AdapterResult<()> {
        self.encoder.load(src)
    }
    fn set_active(&self, on: bool) {
        for s in &self.sites {
            s.activate_adapter(&self.name, on);
        }
    }
    fn detach(&self, _keep_merged: bool) -> AdapterResult<()> {
        for s in &self.sites {
            s.detach_adapter(&self.name)?;
        }
        Ok(())
    }
}

/// PEFT's `_prepare_prompt_learning_config` check: a field set in the config must agree with the model.
///
/// # Errors
/// [`AdapterError::InvalidConfig`] naming the field.
pub fn agree(method: &'static str, field: &'static str, set: Option<usize>, model: usize) -> AdapterResult<()> {
    match set {
        Some(v) if v != model => {
            Err(AdapterError::config(method, field, format!("the config says {v} but the model has {model}")))
        }
        _ => Ok(()),
    }
}
