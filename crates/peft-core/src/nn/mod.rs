//! Neural-network layers built from tensor ops, with the six kinds of adapter site ([`Site`]): linear layers,
//! residual sites, attention-prefix sites, block-replacement sites, named parameters and embedding-output sites, each reachable by its
//! checkpoint path, so method crates attach to models by pattern without editing model code.

pub mod attention;
pub mod block;
mod block_site;
mod ctx;
mod embedding_site;
pub mod layers;
mod linear;
mod module;
mod prefix;
mod residual;
mod slots;
mod weights;

pub use attention::{KvCache, MultiHeadAttention, Rope};
pub use block::{DecoderConfig, DecoderLayer, EncoderConfig, EncoderLayer, EncoderNames, NormPlacement};
pub use block_site::{BlockAdapter, BlockSite, Ffn};
pub use ctx::{AdapterNames, Ctx, TaskIds, TokenLabels, TokenMask};
pub use embedding_site::{EmbeddingAdapter, EmbeddingSite};
pub use layers::{Activation, Embedding, LayerNorm, Mlp, RmsNorm, SwiGlu};
pub use linear::{Dense, Linear, LinearAdapter, LinearBase};
pub use module::{
    block_sites, embedding_sites, linear_sites, named_params, prefix_sites, residual_sites, site_counts, Module, Site,
    SiteCounts, Visitor,
};
pub use prefix::{Prefix, PrefixAdapter, PrefixSite, PromptedSeq};
pub use residual::{ResidualAdapter, ResidualBranch, ResidualSite};
pub use weights::{MapWeights, RandomInit, WeightSource};

#[cfg(test)]
mod sites_tests;
