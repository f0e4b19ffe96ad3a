//! Neural-network layers built from tensor ops. Every [`Linear`] and every [`ResidualSite`] is an adapter site
//! reachable by its checkpoint path, so method crates attach to models by pattern without editing model code.

pub mod attention;
pub mod block;
mod ctx;
pub mod layers;
mod linear;
mod module;
mod residual;
mod weights;

pub use attention::{KvCache, MultiHeadAttention, Rope};
pub use block::{DecoderConfig, DecoderLayer, EncoderConfig, EncoderLayer, EncoderNames, NormPlacement};
pub use ctx::Ctx;
pub use layers::{Activation, Embedding, LayerNorm, Mlp, RmsNorm, SwiGlu};
pub use linear::{Dense, Linear, LinearAdapter, LinearBase};
pub use module::{linear_sites, named_params, residual_sites, Module, Visitor};
pub use residual::{ResidualAdapter, ResidualSite};
pub use weights::{MapWeights, RandomInit, WeightSource};
