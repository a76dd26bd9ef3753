#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

pub mod backend;
pub mod bench;
pub mod error;
pub mod gpu;
pub mod kernels;
pub mod limits;
pub mod ops;
pub mod quant;
pub mod reference;

pub use backend::{Backend, CpuBackend, GpuBackend, HostOps};
pub use error::{Error, Result};
/// The wgpu qfuse is built with (version 30): an engine passing its own device to
/// [`gpu::GpuContext::from_device`] must use this one (`qfuse::wgpu`), or the same major
/// version, so the types match.
pub use wgpu;
pub mod config;
pub mod conformance;
pub mod data;
pub mod deploy;
pub mod fold_state_dict;
pub mod fuse;
pub mod io;
pub mod model;
pub mod nn;
pub mod onnx;
pub mod optim;
pub mod qat;
pub mod train;

/// The golden case folders of the unit tests (the integration tests' helper, one home).
#[cfg(test)]
#[path = "../tests/common/golden.rs"]
pub(crate) mod test_golden;
