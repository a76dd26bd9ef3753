//! ONNX models in and out: import ([`OnnxModel::load`]) of the ops convnets use (opset 13 and
//! later) into a small graph IR ([`Graph`]), BatchNorm folding over the graph
//! ([`find_fusable`], [`fold_model`]) with the pattern table of
//! [`crate::fuse::fuse_modules`], and a float evaluator ([`DeviceGraph`], [`run`]) on any
//! [`Backend`](crate::backend::Backend)'s own tensors, and post-training quantization to QDQ
//! ([`quantize_model`]: QuantizeLinear / DequantizeLinear around each Conv, ConvTranspose,
//! Gemm and MatMul, int8 per-channel weights, int32 biases, calibrated activations).
//!
//! The protobuf messages come from the ONNX project's `onnx.proto` (vendored in `proto/`,
//! Apache-2.0), compiled by `build.rs` with `protox` and `prost-build` (no system `protoc`).
//!
//! ```no_run
//! use qfuse::onnx::{fold_model, run, OnnxModel};
//! use qfuse::CpuBackend;
//! # fn main() -> qfuse::Result<()> {
//! let model = OnnxModel::load("model.onnx".as_ref())?;
//! let folded = fold_model(&CpuBackend, &model)?;
//! for f in &folded.folds {
//!     println!("folded {} into {}", f.bn, f.head);
//! }
//! let x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 32, 32]));
//! let name = model.graph.inputs[0].name.clone();
//! let before = run(&CpuBackend, &model.graph, &[(name.clone(), x.clone())])?;
//! let after = run(&CpuBackend, &folded.model.graph, &[(name, x)])?;
//! # let _ = (before, after);
//! # Ok(())
//! # }
//! ```

mod budget;
mod deploy;
mod eval;
mod fold;
mod model;
pub mod proto;
mod quantize;

pub use deploy::{deploy_config_of, to_int_model, to_int_model_from, to_int_model_with, to_net};
pub use eval::{run, run_observed, DeviceGraph, Observed};
pub use fold::{
    find_fusable, fold_file, fold_model, state_dict_specs, FoldedModel, Fusable, OnnxFold,
};
pub use model::{
    tensor_from_proto, ConvAttrs, Graph, Node, OnnxModel, Op, PoolAttrs, Tensor, ValueInfo,
    MAX_ONNX_DECODE_OVERHEAD, MAX_ONNX_FILE_BYTES, MIN_OPSET, SUPPORTED_OPS,
};
pub use quantize::{
    quantize_model, quantize_model_with, ActivationObserver, QuantizeOptions, QuantizedModel,
    QuantizedOp, MOVING_AVERAGE_CONSTANT,
};
