//! peft-vision: VTAB-1k on DINOv2 with the visual PEFT methods.
//!
//! - [`data`]: the VTAB-1k task type, reading the layout this project ships (`index.csv` + `classes.txt`) and
//!   NOAH's file lists (`train800.txt`, `val200.txt`, `train800val200.txt`, `test.txt`), and fixed k-shot subsets.
//! - [`pipeline`]: decode + resize + normalise once per split (peft-models' `Preprocess`, transformers'
//!   numerics) and cut batches from memory.
//! - [`features`]: the frozen-feature cache (one backbone pass per split, reused by every frozen-backbone method;
//!   optionally on disk).
//! - [`vpt`]: Visual Prompt Tuning, shallow and deep, on peft-core's attention-prefix site.
//! - [`harness`]: the recipe of the specs' §7.1 (AdamW, warmup + cosine, no augmentation, last-epoch model),
//!   fine-tuning through the backbone, linear probes on cached features, accuracy.
//! - [`fewshot`]: training-free classifiers on frozen features (GDA, Tip-Adapter, Tip-Adapter-F, TIP-X) behind
//!   a [`fewshot::TextPrior`] trait (no CLIP text tower here: the numbers use the image-only variants).
//!
//! The backbone is `peft_models::vit::Dinov2` / `Dinov2Classifier` (re-exported as [`vit`]); the other methods
//! of the VTAB table come from the method crates unchanged (LoRA from peft-lora, AdaptFormer from
//! peft-adapters, full fine-tuning and the head from peft-core), because DINOv2 exposes the same five adapter
//! sites as the text models. `cargo xtask bench --suite vtab` drives it all and writes the report.
//!
//! ```no_run
//! use peft_vision::data::{VtabDataset, VtabSplit};
//! use peft_vision::pipeline::{vtab_preprocess, PixelSet};
//! let task = VtabDataset::open("../shared/assets/data/vtab1k-cifar10")?;
//! let train = PixelSet::load(task.split(VtabSplit::Train800Val200), &vtab_preprocess(56))?;
//! assert_eq!(train.len(), 1000);
//! # Ok::<(), peft_vision::VisionError>(())
//! ```

pub mod data;
pub mod error;
pub mod features;
pub mod fewshot;
pub mod harness;
pub mod methods;
pub mod pipeline;
pub mod vpt;

pub use error::{Result, VisionError};
pub use methods::{methods, registry};
pub use peft_models::vit;
