//! conv2d on the GPU (`shaders/conv2d.wgsl`): forward with a fused epilogue, backward input,
//! backward weight, and the per-channel sum used for the bias gradient.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::ops::{Activation, Conv2dParams};

/// What the conv applies to each output before storing it: y = act(acc * out_scale[o] + bias[o]).
#[derive(Debug, Clone, Copy)]
pub struct ConvEpilogue<'a> {
    /// Per-output-channel multiplier of the accumulator (the QAT divide-back uses 1/s); None = 1.
    pub out_scale: Option<&'a GpuTensor>,
    /// Per-output-channel bias added after the multiplier; None = 0.
    pub bias: Option<&'a GpuTensor>,
    /// Activation applied last.
    pub activation: Activation,
}

impl ConvEpilogue<'_> {
    /// The identity epilogue: no scale, no bias, no activation.
    pub fn none() -> Self {
        Self {
            out_scale: None,
            bias: None,
            activation: Activation::None,
        }
    }
}

/// conv2d forward (stub).
pub fn conv2d(
    _ctx: &GpuContext,
    _x: &GpuTensor,
    _w: &GpuTensor,
    _params: &Conv2dParams,
    _epilogue: &ConvEpilogue,
) -> Result<GpuTensor> {
    Err(Error::Gpu("conv2d: not yet implemented".into()))
}

/// conv2d backward input (stub).
pub fn conv2d_backward_input(
    _ctx: &GpuContext,
    _dy: &GpuTensor,
    _w: &GpuTensor,
    _params: &Conv2dParams,
    _x_shape: [usize; 4],
) -> Result<GpuTensor> {
    Err(Error::Gpu(
        "conv2d_backward_input: not yet implemented".into(),
    ))
}

/// conv2d backward weight (stub).
pub fn conv2d_backward_weight(
    _ctx: &GpuContext,
    _x: &GpuTensor,
    _dy: &GpuTensor,
    _params: &Conv2dParams,
    _w_shape: [usize; 4],
) -> Result<GpuTensor> {
    Err(Error::Gpu(
        "conv2d_backward_weight: not yet implemented".into(),
    ))
}

/// Sum over N, H, W per channel of an NCHW tensor (the conv bias gradient).
pub fn channel_sum(_ctx: &GpuContext, _t: &GpuTensor) -> Result<GpuTensor> {
    Err(Error::Gpu("channel_sum: not yet implemented".into()))
}
