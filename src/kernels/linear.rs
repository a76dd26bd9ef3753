//! The linear layer on the GPU, `y = x · Wᵀ + b`, mirroring
//! [`crate::reference::layers::linear`] up to summation order.
//!
//! `x` `[N, in]` laid out row-major is exactly an NCHW tensor `[N, in, 1, 1]`, and `W`
//! `[out, in]` an OIHW weight `[out, in, 1, 1]`, so the layer runs as a 1×1 convolution
//! through the tiled implicit-GEMM kernel of [`crate::kernels::conv2d`] (64 outputs × 64 rows
//! per workgroup, 4×4 per invocation) with the bias in its epilogue; the buffers are only
//! re-viewed, never copied. On CPU adapters with subgroups (lavapipe) it runs the subgroup
//! matmul of `shaders/matmul_sg.wgsl` instead (16 rows of `x` × 4 outputs per invocation, the
//! rows loaded once per 8 lanes and shared by broadcast; bias and activation in its epilogue):
//! there workgroup-memory loads are per-lane loops, which the tiled kernel is made of.

use super::conv2d::{conv2d_impl, ConvAlgorithm, ConvEpilogue};
use super::{check_output, expect_f32};
use crate::error::{Error, Result};
use crate::gpu::{DType, GpuContext, GpuTensor};
use crate::ops::{Activation, Conv2dParams};

fn rank2(what: &str, t: &GpuTensor) -> Result<[usize; 2]> {
    <[usize; 2]>::try_from(t.shape()).map_err(|_| {
        Error::invalid(format!(
            "linear {what} must be rank 2, got shape {:?}",
            t.shape()
        ))
    })
}

/// `x · Wᵀ + b` for `x` `[N, in]`, weight `w` `[out, in]` and optional bias `[out]`, returning
/// `[N, out]` (`torch.nn.functional.linear`).
///
/// Errors: those of [`crate::ops::check_linear`], shared with the CPU reference
/// ([`Error::ShapeMismatch`]: in_features of `x` and `w` differ, bias not `[out]`;
/// [`Error::TooLarge`]: an output past the element limit), and [`Error::InvalidArgument`]
/// for tensors that are not rank-2 `f32` (rank 1 for the bias).
pub fn linear(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    bias: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    linear_act(ctx, x, w, bias, Activation::None)
}

/// [`linear`] followed by an activation, fused into the same kernel (`act(x · Wᵀ + b)`).
///
/// Errors: as [`linear`].
pub fn linear_act(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    bias: Option<&GpuTensor>,
    activation: Activation,
) -> Result<GpuTensor> {
    linear_impl(ctx, x, w, bias, activation, None)
}

/// [`linear_act`] writing into `y` (an `f32` tensor `[N, out]` with its own buffer, see
/// [`super::check_output`]); [`Activation::None`] for a plain [`linear`].
pub fn linear_act_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    bias: Option<&GpuTensor>,
    activation: Activation,
    y: &GpuTensor,
) -> Result<()> {
    linear_impl(ctx, x, w, bias, activation, Some(y)).map(drop)
}

fn linear_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    w: &GpuTensor,
    bias: Option<&GpuTensor>,
    activation: Activation,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("linear input", x), ("linear weight", w)])?;
    if let Some(b) = bias {
        ctx.check_tensor("linear bias", b)?;
    }
    let [n, inp, out] = crate::ops::check_linear(
        rank2("input", x)?,
        rank2("weight", w)?,
        bias.map(|b| b.shape()),
    )?;
    if let Some(b) = bias {
        expect_f32("linear bias", b)?;
    }
    expect_f32("linear input", x)?;
    expect_f32("linear weight", w)?;
    if ctx.has_subgroups() && super::conv2d::is_cpu_adapter(ctx) && n > 0 && out > 0 && inp > 0 {
        // CPU adapters: the subgroup matmul (rows of x shared by broadcast; no workgroup
        // memory, whose loads are per-lane loops there).
        let y = match given {
            Some(y) => {
                let mut inputs = vec![x, w];
                inputs.extend(bias);
                check_output(ctx, "linear output", y, &[n, out], DType::F32, &inputs)?;
                y.clone()
            }
            None => GpuTensor::uninit(ctx, &[n, out], DType::F32)?,
        };
        super::train::linear_sg_into(ctx, x, w, bias, activation, &y)?;
        return Ok(y);
    }
    let x4 = x.reshape(&[n, inp, 1, 1])?;
    let w4 = w.reshape(&[out, inp, 1, 1])?;
    let epilogue = ConvEpilogue {
        out_scale: None,
        bias,
        activation,
    };
    let y4 = match given {
        Some(y) => {
            let mut inputs = vec![x, w];
            inputs.extend(bias);
            check_output(ctx, "linear output", y, &[n, out], DType::F32, &inputs)?;
            Some(y.reshape(&[n, out, 1, 1])?)
        }
        None => None,
    };
    let y = conv2d_impl(
        ctx,
        &x4,
        &w4,
        &Conv2dParams::default(),
        &epilogue,
        ConvAlgorithm::ImplicitGemm,
        y4.as_ref(),
    )?;
    y.reshape(&[n, out])
}
