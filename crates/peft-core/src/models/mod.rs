//! Model architectures assembled from `nn` layers, loading Hugging Face checkpoint names.

pub mod image_proc;
pub mod vit;
