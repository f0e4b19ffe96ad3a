//! peft-adapters: adapter methods that act on the residual stream and on attention rather than on single linear
//! layers, as peft-core tuners:
//!
//! - bottleneck adapters on the residual sites ([`bottleneck`]): Houlsby, Pfeiffer/SeqBn, parallel, AdaptFormer;
//! - IA3 on the linear sites ([`ia3`]), PEFT's `IA3`, mergeable;
//! - LLM-Adapters' series and parallel bottlenecks on the linear layers of a decoder ([`llm_adapter`]);
//! - NICE invertible adapters on the embedding output ([`invertible`]);
//! - prompt tuning ([`prompt`]), prefix tuning and P-tuning v2 ([`prefix`]) on the attention-prefix sites, PEFT's
//!   `PROMPT_TUNING` / `PREFIX_TUNING` ([`prompt_common`]: what they share);
//! - composition blocks over frozen source adapters ([`composition`]): AdapterFusion, output Average, ScaLearn
//!   (vector/scalar, per-layer or shared `ω`), BatchSplit and Parallel, as residual-site adapters of their own;
//! - the registry entries for trainers and `cargo xtask bench` ([`mod@methods`]) and the `peft_type`s this crate
//!   reads ([`mod@registry`]).
//!
//! Every method is a [`peft_core::adapter::TunerConfig`]: [`peft_core::adapter::PeftModel`] owns the model and its
//! adapters and saves and loads them.
//!
//! PEFT compatibility: IA3, prompt-tuning and prefix-tuning files are checked against PEFT 0.21.2 itself on
//! all-MiniLM-L6-v2 (`tests/peft_interop.rs`: PEFT-written files load and give PEFT's outputs within 4e-6, load ->
//! save is byte-identical, files written here give the same outputs in PEFT); each module lists what differs
//! (several IA3 adapters active on one layer add rather than multiply). The bottleneck adapters have no PEFT
//! counterpart: their own `peft_type` (`BOTTLENECK`) with AdapterHub's field names; AdapterHub's own folders are read
//! and written by [`adapterhub`] (checked against adapters 1.3.0 on MiniLM: its outputs within 4e-6, its files
//! written back byte for byte). Composition: two active bottleneck adapters stack in attach order (AdapterHub's `Stack`);
//! `Fuse`, `Average` and ScaLearn are [`composition`] blocks (their differences from AdapterHub are listed there);
//! `BatchSplit` and `Parallel` are [`composition`] blocks too; AdapterHub's `Split` (a split along the sequence) is not
//! implemented.
//!
//! ```
//! use peft_core::adapter::PeftModel;
//! use peft_core::io::BertConfig;
//! use peft_core::nn::{Ctx, RandomInit};
//! use peft_adapters::bottleneck::BottleneckConfig;
//! use peft_models::bert::BertModel;
//! use peft_models::tokenizer::Batch;
//!
//! let cfg = BertConfig { vocab_size: 10, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2,
//!     intermediate_size: 16, max_position_embeddings: 8, ..BertConfig::default() };
//! let bert = BertModel::from_source(&cfg, &RandomInit::new(0, 0.1))?;
//! let batch = Batch::from_rows(&[vec![1, 4, 2]])?;
//! let y0 = bert.forward(&batch, &Ctx::eval())?.to_vec();
//! // Houlsby: series adapters after attention and after the feed-forward block, up projection zero at init.
//! let model = PeftModel::new(bert, BottleneckConfig::houlsby(), "default", 0)?;
//! assert_eq!(model.forward(&batch, &Ctx::eval())?.to_vec(), y0);
//! // 2 sites x (down 8->1 + bias, up 1->8 + bias).
//! assert_eq!(model.param_counts().0, 2 * (8 + 1 + 8 + 8));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod adapterhub;
pub mod bottleneck;
pub mod common;
pub mod composition;
pub mod error;
pub mod ia3;
pub mod invertible;
pub mod llm_adapter;
pub mod methods;
pub mod prefix;
pub mod prompt;
pub mod prompt_common;
pub mod registry;
#[cfg(test)]
mod testutil;

pub use error::{AdaptersError, Result};
pub use methods::methods;
pub use registry::registry;
