//! Model families built from `nn` blocks, with Hugging Face checkpoint names, and their tokenizers.

pub mod bert;
pub mod tokenizer;
