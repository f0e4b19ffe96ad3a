//! # peft-vl
//!
//! Vision-language parameter-efficient fine-tuning pieces for peft-rs:
//!
//! - [`coco`]: the COCO dataset in its official annotation layout (`captions_*.json`, `instances_*.json`, an
//!   optional Karpathy split file); the asset pack's COCO-mini uses the same layout.
//! - [`metrics`]: BLEU-1..4, ROUGE-L and CIDEr-D computed as the coco-caption toolkit (`pycocoevalcap` 1.2) does,
//!   checked against its numbers on a committed fixture (`tests/fixtures/caption_metrics.json`, generator
//!   script beside it). METEOR is not implemented.
//! - [`retrieval`]: image-text retrieval on frozen features: trainable projection heads, a VL-Adapter-style
//!   bottleneck adapter shared by both modalities, the symmetric InfoNCE loss and Recall@K in both directions.
//!
//! Errors are [`VlError`] variants; through peft-core traits they travel as `peft_core::Error::Method`.
//!
//! ```
//! use peft_vl::metrics::score_captions;
//! let cands = vec!["a dog runs on the grass".to_string()];
//! let refs = vec![vec!["A dog running on grass.".to_string(), "a brown dog runs".to_string()]];
//! let s = score_captions(&cands, &refs)?;
//! assert!(s.bleu[0] > 0.5 && s.rouge_l > 0.5);
//! # Ok::<(), peft_vl::VlError>(())
//! ```

pub mod coco;
pub mod error;
pub mod metrics;
pub mod retrieval;

pub use error::{Result, VlError};
