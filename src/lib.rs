//! # qfuse
//!
//! GPU kernels (WGSL through wgpu) for quantization with module fusion, with a CPU reference
//! (ndarray) that the kernels are checked against, and both checked against PyTorch.
#![warn(missing_docs)]

pub mod backend;
pub mod error;
pub mod ops;
pub mod quant;
pub mod reference;

pub use backend::{Backend, CpuBackend};
pub use error::{Error, Result};
