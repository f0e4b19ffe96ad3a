//! The one place the bench touches a concrete model: a sequence classifier over MiniLM (BERT architecture,
//! `sentence-transformers/all-MiniLM-L6-v2`) with a fresh task head. Everything else (training loop, methods,
//! reports) sees only [`SeqClassifier`].

use std::path::Path;

use anyhow::Result;
use peft_core::nn::{Ctx, Module};
use peft_core::{Param, Tensor};

/// Asset-relative folder of the model.
pub const MINILM_DIR: &str = "models/all-MiniLM-L6-v2";

/// A right-padded token batch, row-major `[batch, seq]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokBatch {
    /// Token ids.
    pub input_ids: Vec<usize>,
    /// Segment ids (1 on the second text of a pair).
    pub token_type_ids: Vec<usize>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
    /// `[batch, seq]`.
    pub shape: [usize; 2],
}

/// A model the bench can fine-tune: a backbone plus a task head.
pub trait SeqClassifier: Module {
    /// Logits `[batch, outputs]` (one output for regression).
    ///
    /// # Errors
    /// Shape errors from the model.
    fn logits(&self, batch: &TokBatch, ctx: &Ctx) -> peft_core::Result<Tensor>;
    /// The task-head parameters (trainable under every method).
    fn head(&self) -> Vec<Param>;
}

/// Loads MiniLM from `dir` with a randomly initialised `outputs`-way head (seeded).
///
/// # Errors
/// Until the BERT model lands in peft-core this always fails, naming what is missing: the bench does not fall
/// back to another model.
pub fn load_minilm(dir: &Path, outputs: usize, seed: u64) -> Result<Box<dyn SeqClassifier>> {
    let _ = (dir, outputs, seed);
    anyhow::bail!(
        "the BERT/MiniLM model (`peft_core::models::bert`, branch `bert`) is not in this build yet; \
         `cargo xtask bench` needs it to fine-tune {MINILM_DIR} and has no substitute model"
    )
}
