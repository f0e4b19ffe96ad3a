//! Tensor ops, one file per family; each op's forward and backward sit together.
//!
//! Every op builds its output with [`crate::autograd::record`], which keeps the graph node only when an input
//! tracks gradients. Composite ops (e.g. `var`, `mse_loss`) are written in terms of primitives and have no
//! backward rule of their own.

pub mod attention;
pub mod broadcast;
pub mod conv;
pub mod dropout;
pub mod elementwise;
pub mod index;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub(crate) mod rows;
pub mod shape_ops;
pub mod softmax;
