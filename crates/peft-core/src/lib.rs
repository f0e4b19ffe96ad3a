//! # peft-core
//!
//! The shared core of peft-rs: an f32/f64 tensor on ndarray with reverse-mode autodiff, nn layers, optimizers,
//! checkpoint IO and the adapter abstraction that method crates (`peft-lora`, `peft-quant`, ...) plug into.
//!
//! ## Layout and conventions
//! - [`Tensor`] is a cheap handle over contiguous storage; ops live in `ops/` (one file per family, forward and
//!   backward side by side) and record a graph node only when an input tracks gradients.
//! - [`Param`]s carry their checkpoint names; frozen parameters enter the forward pass as constants, so no
//!   gradient (and no dW work) is computed for them.
//! - `backward()` returns a [`GradStore`] keyed by tensor id; gradients are never stored on tensors.
//! - GEMM goes through one function, [`backend::gemm`]; decompositions use faer.
//!
//! ```
//! use peft_core::Tensor;
//! let x = Tensor::var(ndarray::arr1(&[1.0f32, -2.0, 3.0]).into_dyn());
//! let y = x.square().sum_all();
//! let g = y.backward()?;
//! assert_eq!(g.get(&x).unwrap().as_slice().unwrap(), &[2.0, -4.0, 6.0]);
//! # Ok::<(), peft_core::Error>(())
//! ```

pub mod adapter;
pub mod autograd;
pub mod backend;
pub mod elem;
pub mod error;
pub mod io;
pub mod linalg;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod param;
pub mod tensor;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod train;

pub use autograd::{no_grad, GradStore, NoGradGuard};
pub use elem::Elem;
pub use error::{AdapterProblem, Error, Result, StateProblem};
pub use optim::{AdamW, GradAccumulator, LrSchedule, Optimizer, ParamGroup, Schedule, Sgd};
pub use param::{Param, ParamDelta};
pub use tensor::{Tensor, TensorId};
