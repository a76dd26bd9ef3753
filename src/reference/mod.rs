//! The CPU reference on ndarray (f32): the spec every GPU kernel is checked against, itself
//! checked against PyTorch through the golden conformance cases. Each function's docs name
//! the PyTorch function it mirrors.

pub mod activation;
pub mod batch_norm;
pub mod conv2d;
pub mod conv_bn;
pub mod fake_quant;
pub mod fold;
pub mod int8;
pub mod layers;
pub mod observer;
pub mod train;
