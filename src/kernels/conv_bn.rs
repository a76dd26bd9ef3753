//! Fused conv2d + BatchNorm2d (+ activation) on the GPU, matching
//! [`crate::reference::conv_bn`]: the eval forward with BN folded into the conv, the QAT
//! training step of `torch.ao.nn.intrinsic.qat.ConvBn2d` / `ConvBnReLU2d`
//! (`_forward_approximate`) forward and backward, and the unfused chains of both (each op its
//! own dispatch and intermediate buffer) for benchmarks. The QAT-specific kernels are in
//! `shaders/conv_bn.wgsl`; the rest reuses [`super::fold`], [`super::observer`],
//! [`super::fake_quant`], [`super::conv2d`], [`super::batch_norm`] and [`super::activation`].
//!
//! # Pass structure
//! - [`conv_bn_act_eval`]: fold (two dispatches) → **one** conv with the folded bias and the
//!   activation in its epilogue; returns the folded weight and bias too.
//! - [`conv_bn_act_eval_scaled`]: no weight fold: the per-channel `γ/σ` and folded bias (one
//!   `O(C)` dispatch) are the conv epilogue's multiplier and bias, then **one** conv.
//! - [`conv_bn_qat_forward`]: (a) partial invocations over runs of each output channel's
//!   weights write `W_s = W·s[o]` and partial min/max, then one invocation per channel
//!   `s = γ/sqrt(running_var + eps)`, `1/s` and the weight observer's min/max (plus a
//!   one-workgroup merge for per-tensor schemes); (b) the observer's qparams kernel;
//!   (c) fake quant `W_s → W_q` with its mask; (d) the conv with the divide-back and the conv
//!   bias in its epilogue (`out_scale = 1/s`, `bias = b`), giving the BatchNorm input;
//!   (e) batch statistics (partials and their per-channel combination, or one dispatch for
//!   few values per channel; one with `freeze_bn`) — for a depthwise conv that the
//!   depthwise kernel runs ([`super::conv2d::dw_ok`]) the conv writes the partials of its
//!   output as it stores it, so only the combination runs; (f) normalize + affine +
//!   activation (one pass, also writing the pre-activation output for LeakyReLU and
//!   Hardswish, whose gradients need it; ReLU and ReLU6 take their mask from `y`). No host
//!   round trip.
//! - [`conv_bn_qat_backward`]: BN backward with the activation's mask folded in (reduction +
//!   `dx` pass that writes `d conv_out = dBN_in / s` directly); the divide-back reductions
//!   (conv bias grad, the divide-back part of `dγ`; two dispatches); conv backward input and
//!   weight with `W_q`; the STE mask, `dW = dW_s·s` and the weight-scaling part of `dγ`
//!   (partials over runs of each channel's weights, then one invocation per channel). No
//!   reduction uses a workgroup barrier (see [`super::batch_norm::reduction_layout`]).
//!
//! # Exactness of `s`
//! A symmetric observer puts the extreme weight of each channel exactly on a rounding tie of
//! the fake quant, so one ulp of `s` changes `W_q` there. WGSL's `sqrt` and `/` are not
//! correctly rounded; `conv_bn.wgsl` computes `s` with correctly rounded integer-arithmetic
//! `sqrt_rn` and `div_rn`, in the reference's order (`γ / sqrt(rv + eps)`), so `s`, `W_s`, the
//! qparams, `W_q` and the mask are bit-exact with the CPU. The divide-back multiplies by
//! `1/s` where the reference divides by `s` (within the 1e-3 tolerance).

use bytemuck::{Pod, Zeroable};

use super::activation::{activation_backward, activation_into};
use super::batch_norm::{
    batch_norm2d_backward, batch_norm2d_backward_act, batch_norm2d_into,
    batch_norm2d_pre_reduced_into, check_training_size, normalize, partial_count, partial_grid,
    GpuBatchNormOutput, GpuBatchNormStats,
};
use super::conv2d::{
    conv2d, conv2d_dw_stats_into, conv2d_into, dw_ok, dw_stats_parts, ConvEpilogue,
};
use super::fake_quant::fake_quant_with_mask_into;
use super::fold::fold_conv_bn_into;
use super::observer::{calc_qparams_into, observe_into};
use super::train::{conv2d_input_grad_into, conv2d_weight_grad};
use super::{check_output, expect_f32, expect_shape, to_u32, GpuBatchNorm, GpuQParams};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, Shader};
use crate::ops::{Activation, QatConfig};

pub(super) static SHADER: Shader = Shader {
    name: "conv_bn",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/exact_float.wgsl"),
        include_str!("../../shaders/lib/partial_run.wgsl"),
        include_str!("../../shaders/conv_bn.wgsl")
    ),
};

/// Workgroup size of every entry point (`WGR` in the shader).
const WGR: u32 = 256;

static SCALE_WEIGHT_PARTIAL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "scale_weight_partial",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read(2),
        Binding::read_write(3),
        Binding::read_write(13),
    ],
};

static SCALE_WEIGHT_PARTIAL4: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "scale_weight_partial4",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(13),
        Binding::read(21),
        Binding::read_write(22),
    ],
};

static SCALE_WEIGHT_FINAL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "scale_weight_final",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(4),
        Binding::read_write(5),
        Binding::read_write(6),
        Binding::read_write(13),
    ],
};

static MINMAX_MERGE: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "minmax_merge",
    bindings: &[
        Binding::uniform(0),
        Binding::read_write(6),
        Binding::read_write(7),
    ],
};

static SCALE_FACTOR: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "scale_factor",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(4),
        Binding::read_write(5),
    ],
};

static CHANNEL_OP: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "channel_op",
    bindings: &[
        Binding::uniform(0),
        Binding::read(8),
        Binding::read(9),
        Binding::read(10),
        Binding::read_write(11),
    ],
};

static DIVIDE_BACK_PARTIAL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "divide_back_partial",
    bindings: &[
        Binding::uniform(0),
        Binding::read(8),
        Binding::read(10),
        Binding::read(12),
        Binding::read_write(13),
    ],
};

static DIVIDE_BACK_FINAL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "divide_back_final",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(4),
        Binding::read_write(13),
        Binding::read(14),
        Binding::read_write(15),
        Binding::read_write(16),
        Binding::read_write(17),
    ],
};

static WEIGHT_GRAD_PARTIAL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "weight_grad_partial",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read_write(4),
        Binding::read_write(13),
        Binding::read(18),
        Binding::read(19),
        Binding::read_write(20),
    ],
};

static WEIGHT_GRAD_PARTIAL4: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "weight_grad_partial4",
    bindings: &[
        Binding::uniform(0),
        Binding::read_write(4),
        Binding::read_write(13),
        Binding::read(21),
        Binding::read(23),
        Binding::read(24),
        Binding::read_write(25),
    ],
};

static WEIGHT_GRAD_FINAL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "weight_grad_final",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(4),
        Binding::read_write(13),
        Binding::read_write(16),
    ],
};

static EVAL_SCALE: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "eval_scale",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(4),
        Binding::read(10),
        Binding::read_write(11),
    ],
};

static SQRT_RN_TEST: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "sqrt_rn_test",
    bindings: &[
        Binding::uniform(0),
        Binding::read(8),
        Binding::read_write(11),
    ],
};

/// The uniform of `conv_bn.wgsl` (same field order).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    channels: u32,
    inner: u32,
    m: u32,
    groups: u32,
    op: u32,
    hw: u32,
    /// 1: `s = 1` where γ = 0 (the finite form); the backward finds those channels itself.
    finite_zero: u32,
    eps: f32,
    _pad: [u32; 3],
}

/// `channel_op` codes.
#[derive(Clone, Copy)]
enum ChannelOp {
    /// `x / a[c]`.
    Div = 0,
    /// `x + a[c]`.
    Add = 1,
    /// `x * a[c]`.
    Mul = 2,
    /// `(x − b[c]) * a[c]`.
    SubMul = 3,
    /// `1` (a mask of ones).
    One = 4,
}

/// A conv2d layer on the GPU, borrowing its tensors: weight `[O, C/groups, KH, KW]`,
/// optional bias `[O]`, settings. The one conv description, [`crate::ops::Conv2d`], over
/// `&GpuTensor`.
pub type GpuConv2d<'a> = crate::ops::Conv2d<&'a GpuTensor>;

/// The CPU reference's `check_conv_bn`: the conv's output channels, its bias and `bn` agree
/// (the BatchNorm was validated when uploaded). Also refuses a weight that is not rank 4 (with
/// [`crate::ops::Conv2dParams::output_shape`]'s message). Returns the output channel count.
fn check_conv_bn(conv: &GpuConv2d, bn: &GpuBatchNorm) -> Result<usize> {
    let ws = conv.weight.shape();
    if ws.len() != 4 {
        return Err(Error::invalid(format!(
            "conv2d weight must be OIHW (rank 4), got shape {ws:?}"
        )));
    }
    let o = ws[0];
    if bn.channels() != o {
        return Err(Error::ChannelMismatch {
            layer: "conv2d".to_string(),
            layer_channels: o,
            bn_channels: bn.channels(),
        });
    }
    if let Some(b) = conv.bias {
        if b.shape() != [o] {
            return Err(Error::shape("conv2d bias", &[o], b.shape()));
        }
        expect_f32("conv2d bias", b)?;
    }
    expect_f32("conv2d weight", conv.weight)?;
    Ok(o)
}

/// `Ok` when `x`, the conv's weight and bias and the BatchNorm were made on `ctx`.
fn check_context(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
) -> Result<()> {
    ctx.check_tensors(&[
        ("conv input", x),
        ("conv2d weight", conv.weight),
        ("batch_norm2d parameters", bn.tensor()),
    ])?;
    if let Some(b) = conv.bias {
        ctx.check_tensor("conv2d bias", b)?;
    }
    Ok(())
}

fn w_shape(conv: &GpuConv2d) -> [usize; 4] {
    let s = conv.weight.shape();
    [s[0], s[1], s[2], s[3]]
}

/// The conv bias, or zeros.
fn bias_or_zeros(ctx: &GpuContext, conv: &GpuConv2d, o: usize) -> Result<GpuTensor> {
    match conv.bias {
        Some(b) => Ok(b.clone()),
        None => GpuTensor::zeros(ctx, &[o], DType::F32),
    }
}

/// What [`conv_bn_act_eval`] returns.
#[derive(Debug, Clone)]
pub struct GpuConvBnEval {
    /// `act(conv2d(x, W', b'))`.
    pub y: GpuTensor,
    /// The folded weight `W'`.
    pub weight: GpuTensor,
    /// The folded bias `b'` (`[O]`).
    pub bias: GpuTensor,
}

/// Fused eval forward of conv2d + BatchNorm2d + activation
/// ([`crate::reference::conv_bn::conv_bn_act_eval`]): BN folded into the conv on the GPU
/// ([`super::fold::fold_conv_bn`]), then **one** conv dispatch with the folded bias and the
/// activation in its epilogue.
///
/// Errors (the CPU's): [`Error::ChannelMismatch`] (layer `conv2d`), [`Error::ShapeMismatch`]
/// for a conv bias of the wrong length, and every [`conv2d`] error.
pub fn conv_bn_act_eval(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    act: Activation,
) -> Result<GpuConvBnEval> {
    conv_bn_act_eval_impl(ctx, x, conv, bn, act, None)
}

/// [`conv_bn_act_eval`] writing into `out`: `y` of the conv's output shape, `weight` of the
/// conv weight's shape and `bias` `[O]`, `f32` tensors each with a buffer of its own. Every
/// output is checked ([`super::check_output`]) before anything is launched.
///
/// Errors: those of [`conv_bn_act_eval`]; [`Error::ContextMismatch`],
/// [`Error::ShapeMismatch`] or [`Error::InvalidArgument`] naming the unfit output
/// (`conv_bn_act_eval output y` / `weight` / `bias`).
pub fn conv_bn_act_eval_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    act: Activation,
    out: &GpuConvBnEval,
) -> Result<()> {
    conv_bn_act_eval_impl(ctx, x, conv, bn, act, Some(out)).map(drop)
}

/// The inputs of a conv + BatchNorm launcher, which no output may share a buffer with.
/// The checks every eval chain runs first (contexts, conv/BN channels, conv geometry):
/// the output channels and the conv's output shape.
fn check_eval(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
) -> Result<(usize, [usize; 4])> {
    check_context(ctx, x, conv, bn)?;
    let o = check_conv_bn(conv, bn)?;
    Ok((o, conv.params.output_shape(x.shape(), conv.weight.shape())?))
}

/// [`check_eval`], then the chain's one `f32` output `y` (the caller's, checked, or a new one).
fn eval_output(
    ctx: &GpuContext,
    what: &str,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    given: Option<&GpuTensor>,
) -> Result<(usize, GpuTensor)> {
    let (o, shape) = check_eval(ctx, x, conv, bn)?;
    let y = super::output(
        ctx,
        what,
        given,
        &shape,
        DType::F32,
        &conv_bn_inputs(x, conv, bn),
    )?;
    Ok((o, y))
}

fn conv_bn_inputs<'a>(
    x: &'a GpuTensor,
    conv: &'a GpuConv2d<'_>,
    bn: &'a GpuBatchNorm,
) -> Vec<&'a GpuTensor> {
    let mut v = vec![x, conv.weight, bn.tensor()];
    v.extend(conv.bias);
    v
}

/// An output of a launcher with several: the caller's (checked against every input and every
/// output taken before it, see [`super::check_output`]) or a new pooled one; added to
/// `taken`.
fn take_output(
    ctx: &GpuContext,
    what: &str,
    given: Option<&GpuTensor>,
    shape: &[usize],
    taken: &mut Vec<GpuTensor>,
) -> Result<GpuTensor> {
    let refs: Vec<&GpuTensor> = taken.iter().collect();
    let t = super::output(ctx, what, given, shape, DType::F32, &refs)?;
    taken.push(t.clone());
    Ok(t)
}

fn conv_bn_act_eval_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    act: Activation,
    given: Option<&GpuConvBnEval>,
) -> Result<GpuConvBnEval> {
    let (o, shape) = check_eval(ctx, x, conv, bn)?;
    let mut taken: Vec<GpuTensor> = conv_bn_inputs(x, conv, bn).into_iter().cloned().collect();
    let out = GpuConvBnEval {
        y: take_output(
            ctx,
            "conv_bn_act_eval output y",
            given.map(|g| &g.y),
            &shape,
            &mut taken,
        )?,
        weight: take_output(
            ctx,
            "conv_bn_act_eval output weight",
            given.map(|g| &g.weight),
            conv.weight.shape(),
            &mut taken,
        )?,
        bias: take_output(
            ctx,
            "conv_bn_act_eval output bias",
            given.map(|g| &g.bias),
            &[o],
            &mut taken,
        )?,
    };
    ctx.record(|| {
        fold_conv_bn_into(
            ctx,
            conv.weight,
            conv.bias,
            bn,
            false,
            &out.weight,
            &out.bias,
        )?;
        conv2d_into(
            ctx,
            x,
            &out.weight,
            &conv.params,
            &ConvEpilogue {
                out_scale: None,
                bias: Some(&out.bias),
                activation: act,
            },
            &out.y,
        )
    })?;
    Ok(out)
}

/// Fused eval forward of conv2d + BatchNorm2d + activation that leaves the weight as it is:
/// the BatchNorm's `γ/σ` is the conv epilogue's per-channel multiplier and the folded bias
/// its bias, `y = act(conv(x, W)·s + b')` with `s = γ/sqrt(running_var + eps)` and
/// `b' = (b − running_mean)·s + β` (computed per channel, one small dispatch), then **one**
/// conv; one submission. Nothing the size of the weight is refolded per call, so it costs
/// the conv alone plus an `O(C)` pass; equal to [`conv_bn_act_eval`]'s output up to rounding
/// (the product `acc·s` instead of `Σ x·(W·s)`).
///
/// Errors: those of [`conv_bn_act_eval`].
pub fn conv_bn_act_eval_scaled(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    act: Activation,
) -> Result<GpuTensor> {
    conv_bn_act_eval_scaled_impl(ctx, x, conv, bn, act, None)
}

/// [`conv_bn_act_eval_scaled`] writing `y` into `out` (an `f32` tensor of the conv's output
/// shape with a buffer of its own, checked by [`super::check_output`] before anything is
/// launched).
///
/// Errors: those of [`conv_bn_act_eval_scaled`]; [`Error::ContextMismatch`],
/// [`Error::ShapeMismatch`] or [`Error::InvalidArgument`] naming
/// `conv_bn_act_eval_scaled output` for an unfit `out`.
pub fn conv_bn_act_eval_scaled_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    act: Activation,
    out: &GpuTensor,
) -> Result<()> {
    conv_bn_act_eval_scaled_impl(ctx, x, conv, bn, act, Some(out)).map(drop)
}

fn conv_bn_act_eval_scaled_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    act: Activation,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    let (o, y) = eval_output(ctx, "conv_bn_act_eval_scaled output", x, conv, bn, given)?;
    ctx.record(|| {
        let p = Params {
            channels: to_u32(o, "conv output channels")?,
            eps: bn.eps(),
            ..Params::default()
        };
        let uniform = ctx.params(&p)?;
        let bias = bias_or_zeros(ctx, conv, o)?;
        let scale = GpuTensor::uninit(ctx, &[o], DType::F32)?;
        let folded_bias = GpuTensor::uninit(ctx, &[o], DType::F32)?;
        ctx.run(&[Launch {
            kernel: &EVAL_SCALE,
            constants: &[],
            buffers: &[
                &uniform,
                bn.tensor().buffer(),
                scale.buffer(),
                bias.buffer(),
                folded_bias.buffer(),
            ],
            workgroups: ctx.grid_1d(o, WGR)?,
        }])?;
        conv2d_into(
            ctx,
            x,
            conv.weight,
            &conv.params,
            &ConvEpilogue {
                out_scale: Some(&scale),
                bias: Some(&folded_bias),
                activation: act,
            },
            &y,
        )
    })?;
    Ok(y)
}

/// The unfused eval chain, for comparison with [`conv_bn_act_eval`]: conv2d (with the conv's
/// own bias, nothing else in the epilogue) → BatchNorm2d in eval mode (running statistics) →
/// the activation (skipped for [`Activation::None`]), each its own dispatch(es) and
/// intermediate buffer. Returns `y`.
///
/// Errors: as [`conv_bn_act_eval`].
pub fn conv_bn_act_eval_unfused(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    act: Activation,
) -> Result<GpuTensor> {
    conv_bn_act_eval_unfused_impl(ctx, x, conv, bn, act, None)
}

/// [`conv_bn_act_eval_unfused`] writing `y` into `out` (an `f32` tensor of the conv's
/// output shape with a buffer of its own, checked by [`super::check_output`] before anything
/// is launched).
///
/// Errors: those of [`conv_bn_act_eval`]; [`Error::ContextMismatch`],
/// [`Error::ShapeMismatch`] or [`Error::InvalidArgument`] naming
/// `conv_bn_act_eval_unfused output` for an unfit `out`.
pub fn conv_bn_act_eval_unfused_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    act: Activation,
    out: &GpuTensor,
) -> Result<()> {
    conv_bn_act_eval_unfused_impl(ctx, x, conv, bn, act, Some(out)).map(drop)
}

fn conv_bn_act_eval_unfused_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    act: Activation,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    let (o, y) = eval_output(ctx, "conv_bn_act_eval_unfused output", x, conv, bn, given)?;
    let z = conv2d(
        ctx,
        x,
        conv.weight,
        &conv.params,
        &ConvEpilogue {
            bias: conv.bias,
            ..ConvEpilogue::none()
        },
    )?;
    // The BatchNorm writes `y` itself when no activation follows.
    let bn_y = match act {
        Activation::None => y.clone(),
        _ => GpuTensor::uninit(ctx, y.shape(), DType::F32)?,
    };
    batch_norm2d_into(
        ctx,
        &z,
        bn,
        0.0,
        false,
        Activation::None,
        &GpuBatchNormOutput {
            y: bn_y.clone(),
            pre: None,
            stats: new_stats(ctx, o)?,
        },
    )?;
    if act != Activation::None {
        activation_into(ctx, &bn_y, act, &y)?;
    }
    Ok(y)
}

/// Pooled `[2, C]` statistics tensors for a BatchNorm pass.
fn new_stats(ctx: &GpuContext, c: usize) -> Result<GpuBatchNormStats> {
    Ok(GpuBatchNormStats {
        stats: GpuTensor::uninit(ctx, &[2, c], DType::F32)?,
        running: GpuTensor::uninit(ctx, &[2, c], DType::F32)?,
    })
}

/// What the QAT forward returns, all on the GPU (the GPU form of
/// [`crate::ops::QatForward`]).
#[derive(Debug, Clone)]
pub struct GpuQatForward {
    /// Output `act(bn_out)`.
    pub y: GpuTensor,
    /// BatchNorm output before the activation, where it is kept: the same tensor as `y` for
    /// [`Activation::None`]; its own tensor for LeakyReLU and Hardswish (their gradients
    /// need the activation's input) and in the unfused chain; `None` from the fused forward
    /// for ReLU and ReLU6, whose gradient mask `y` gives, so the forward writes one tensor
    /// fewer ([`qat_bn_out`] rebuilds it when wanted).
    pub bn_out: Option<GpuTensor>,
    /// BatchNorm input `conv_out / s + b`.
    pub bn_input: GpuTensor,
    /// `conv(x, W_q)` before the divide-back: kept by the unfused chain; the fused forward
    /// never materializes it (see [`qat_conv_out`]).
    pub conv_out: Option<GpuTensor>,
    /// `s = γ / sqrt(running_var + eps)` (`[O]`, bit-exact with the CPU).
    pub scale_factor: GpuTensor,
    /// `1/s` (`[O]`), the conv epilogue's multiplier.
    pub inv_scale_factor: GpuTensor,
    /// `W_s = W·s[o]`.
    pub weight_scaled: GpuTensor,
    /// `W_q = fake_quant(W_s)`.
    pub weight_q: GpuTensor,
    /// Straight-through mask of the weight fake quant.
    pub weight_mask: GpuTensor,
    /// The weight observer's qparams of `W_s`.
    pub weight_qparams: GpuQParams,
    /// Mean / invstd BN normalized with, and the running statistics after the step.
    pub stats: GpuBatchNormStats,
}

/// What [`conv_bn_qat_backward`] needs from the forward (see [`GpuQatForward::saved`]).
#[derive(Debug, Clone, Copy)]
pub struct GpuQatSaved<'a> {
    /// `s` (`[O]`).
    pub scale_factor: &'a GpuTensor,
    /// `W_q`.
    pub weight_q: &'a GpuTensor,
    /// The fake-quant mask of `W_s`.
    pub weight_mask: &'a GpuTensor,
    /// The BatchNorm input.
    pub bn_input: &'a GpuTensor,
    /// `[2, O]`: mean and invstd BN normalized with.
    pub stats: &'a GpuTensor,
    /// Where the activation's gradient is evaluated: the BatchNorm output (the activation's
    /// input), or, for ReLU / ReLU6 only, the forward output (the same mask); unused for
    /// [`Activation::None`].
    pub act_input: &'a GpuTensor,
}

impl GpuQatForward {
    /// The tensors [`conv_bn_qat_backward`] needs.
    pub fn saved(&self) -> GpuQatSaved<'_> {
        GpuQatSaved {
            scale_factor: &self.scale_factor,
            weight_q: &self.weight_q,
            weight_mask: &self.weight_mask,
            bn_input: &self.bn_input,
            stats: &self.stats.stats,
            // The activation's input where it is kept (LeakyReLU and Hardswish gradients need
            // it); else `y`, which gives ReLU / ReLU6 the same mask.
            act_input: self.bn_out.as_ref().unwrap_or(&self.y),
        }
    }
}

/// The checks of the CPU QAT forward, in its order, up to (and including) the BatchNorm's
/// training-size check. Returns `(O, output shape)`.
fn check_qat_forward(
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    cfg: &QatConfig,
) -> Result<(usize, [usize; 4])> {
    let o = check_conv_bn(conv, bn)?;
    let out = conv.params.output_shape(x.shape(), conv.weight.shape())?;
    expect_f32("conv2d input", x)?;
    let spec = &cfg.weight_observer;
    spec.validate()?;
    if spec.qscheme.is_per_channel() {
        spec.channel_axis(4)?;
    }
    if !cfg.freeze_bn {
        check_training_size(&out)?;
    }
    Ok((o, out))
}

fn params_weight(conv: &GpuConv2d, bn: &GpuBatchNorm, o: usize) -> Result<Params> {
    let inner = conv.weight.len().checked_div(o).unwrap_or(0);
    to_u32(conv.weight.len(), "conv weight elements")?;
    Ok(Params {
        n: to_u32(conv.weight.len(), "conv weight elements")?,
        channels: to_u32(o, "conv output channels")?,
        inner: to_u32(inner, "conv weight elements per output channel")?,
        eps: bn.eps(),
        ..Params::default()
    })
}

/// ConvBn2d / ConvBnReLU2d QAT forward in training mode
/// ([`crate::reference::conv_bn::conv_bn_qat_forward`]; see the module doc for the passes):
/// `s`, `W_s` and the weight observer's min/max in one dispatch, qparams, fake quant, one conv
/// with `1/s` and the conv bias in its epilogue, BatchNorm statistics (batch statistics and a
/// running update with `momentum`; the running statistics when `cfg.freeze_bn`), and one
/// normalize + affine + activation pass. Per-channel observers along an axis other than 0 use
/// the generic observer kernels on `W_s`.
///
/// Errors (the CPU's): [`Error::ChannelMismatch`] (layer `conv2d`), [`Error::ShapeMismatch`]
/// for a conv bias of the wrong length, [`crate::ops::Conv2dParams::output_shape`] errors,
/// [`Error::InvalidQuantRange`], [`Error::AxisOutOfRange`], and
/// [`Error::InvalidArgument`] for one value per channel in training.
pub fn conv_bn_qat_forward(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    momentum: f32,
    cfg: &QatConfig,
) -> Result<GpuQatForward> {
    conv_bn_qat_forward_impl(
        ctx,
        x,
        conv,
        bn,
        momentum,
        cfg,
        &GpuQatWeight::default(),
        None,
    )
}

/// [`conv_bn_qat_forward`] writing into `out`, for instance the result of a first call reused
/// step after step. Every tensor of `out` is checked ([`super::check_output`]: this context,
/// the shape [`conv_bn_qat_forward`] returns, `f32` — the qparams a `[3, C]` `u32` tensor with
/// the observer's axis — and a buffer of its own) before anything is launched, with two
/// rules for what the allocating form shares: `out.bn_out` is `Some(out.y)` itself (the same
/// buffer) for [`Activation::None`] and `None` for ReLU and ReLU6 (the fused forward does not
/// write it, see [`GpuQatForward::bn_out`]), and `out.conv_out` is `None` (the fused forward
/// never materializes it).
///
/// Errors: those of [`conv_bn_qat_forward`]; [`Error::ContextMismatch`],
/// [`Error::ShapeMismatch`] or [`Error::InvalidArgument`] naming the unfit output
/// (`conv_bn_qat_forward output y`, `... weight_q`, ...).
pub fn conv_bn_qat_forward_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    momentum: f32,
    cfg: &QatConfig,
    out: &GpuQatForward,
) -> Result<()> {
    conv_bn_qat_forward_impl(
        ctx,
        x,
        conv,
        bn,
        momentum,
        cfg,
        &GpuQatWeight::default(),
        Some(out),
    )
    .map(drop)
}

/// The weight fake quant of [`conv_bn_qat_forward_with`] (the GPU form of
/// [`crate::ops::QatWeightQuant`], plus the choice of the γ = 0 form).
#[derive(Debug, Clone, Copy)]
pub struct GpuQatWeight<'a> {
    /// `None`: observe `W_s` (as [`conv_bn_qat_forward`]); `Some`: fake-quantize `W_s` with
    /// these qparams.
    pub qparams: Option<&'a GpuQParams>,
    /// `false`: `W_q = W_s`, mask all ones.
    pub fake_quant_enabled: bool,
    /// `true`: the finite γ = 0 form of
    /// [`crate::reference::conv_bn::conv_bn_qat_forward_with`] (`s = 1` in the channels
    /// where γ is ±0, [`crate::reference::conv_bn::qat_scale_factor_finite`]), decided on the
    /// device; `false`: PyTorch's `s = γ / sqrt(running_var + eps)` everywhere (`s = 0`, NaN
    /// outputs, where γ = 0). [`conv_bn_qat_backward`] recognizes the finite channels from γ
    /// and the saved `s`, as the reference does.
    pub finite_zero_gamma: bool,
}

impl Default for GpuQatWeight<'_> {
    fn default() -> Self {
        Self {
            qparams: None,
            fake_quant_enabled: true,
            finite_zero_gamma: false,
        }
    }
}

/// [`conv_bn_qat_forward`] with the weight fake quant of `weight`: fixed qparams (the
/// observer pass is skipped), fake quant disabled (`W_q = W_s`, mask 1), and the finite
/// γ = 0 form (see [`GpuQatWeight`]); the GPU form of
/// [`crate::reference::conv_bn::conv_bn_qat_forward_with`] (with `finite_zero_gamma`).
/// With fixed qparams the result's `weight_qparams` is those qparams; with fake quant
/// disabled its `weight_q` is its `weight_scaled`.
///
/// Errors: those of [`conv_bn_qat_forward`]; fixed qparams that do not fit the weight or
/// the range.
pub fn conv_bn_qat_forward_with(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    momentum: f32,
    cfg: &QatConfig,
    weight: &GpuQatWeight,
) -> Result<GpuQatForward> {
    conv_bn_qat_forward_impl(ctx, x, conv, bn, momentum, cfg, weight, None)
}

/// [`conv_bn_qat_forward_with`] writing into `out`, checked as by
/// [`conv_bn_qat_forward_into`]; fixed qparams are copied into `out.weight_qparams` and,
/// with fake quant disabled, `W_s` into `out.weight_q` (each a buffer of its own).
///
/// Errors: those of [`conv_bn_qat_forward_with`] and [`conv_bn_qat_forward_into`].
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_qat_forward_with_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    momentum: f32,
    cfg: &QatConfig,
    weight: &GpuQatWeight,
    out: &GpuQatForward,
) -> Result<()> {
    conv_bn_qat_forward_impl(ctx, x, conv, bn, momentum, cfg, weight, Some(out)).map(drop)
}

/// How a QAT forward gets its weight qparams, which decides their `[3, C]` shape and axis.
enum QatQParams<'a> {
    /// Given (fixed).
    Fixed(&'a GpuQParams),
    /// Observed on `W_s`: `C` channels along `axis` (`None`, `C = 1`: per tensor).
    Observed {
        channels: usize,
        axis: Option<usize>,
    },
}

/// The outputs of a QAT forward (fused, or the unfused chain with `conv_out`): the caller's
/// (`given`, each checked against the inputs and the outputs before it) or new pooled
/// tensors. Shared only as the allocating form shares them: `bn_out` is `y` for
/// [`Activation::None`]; fixed qparams are returned as given and, with fake quant disabled,
/// `weight_q` is `weight_scaled`.
#[allow(clippy::too_many_arguments)]
fn qat_forward_outputs(
    ctx: &GpuContext,
    given: Option<&GpuQatForward>,
    inputs: Vec<&GpuTensor>,
    o: usize,
    ws: [usize; 4],
    out_shape: [usize; 4],
    act: Activation,
    qparams: &QatQParams,
    fake_quant_enabled: bool,
    unfused: bool,
) -> Result<GpuQatForward> {
    const W: &str = "conv_bn_qat_forward output";
    let mut taken: Vec<GpuTensor> = inputs.into_iter().cloned().collect();
    let mut take = |name: &str, g: Option<&GpuTensor>, shape: &[usize]| {
        take_output(ctx, &format!("{W} {name}"), g, shape, &mut taken)
    };
    let y = take("y", given.map(|g| &g.y), &out_shape)?;
    let given_bn_out = given.map(|g| g.bn_out.as_ref());
    let bn_out = match (act, given_bn_out) {
        (Activation::None, Some(b)) if b.map(GpuTensor::buffer) != Some(y.buffer()) => {
            return Err(Error::invalid(format!(
                "{W} bn_out must be Some(output y) itself (the same tensor) for \
                 Activation::None"
            )));
        }
        (Activation::None, _) => Some(y.clone()),
        (a, g) if !unfused && a.grad_from_output() => {
            if let Some(Some(_)) = g {
                return Err(Error::invalid(format!(
                    "{W} bn_out must be None for {}: the fused forward takes the \
                     activation's gradient mask from y and does not write it",
                    a.kind_name()
                )));
            }
            None
        }
        (_, Some(None)) => {
            return Err(Error::invalid(format!(
                "{W} bn_out is missing: {} keeps the BatchNorm output",
                if unfused {
                    "the unfused chain".to_string()
                } else {
                    format!("the fused forward with {}", act.kind_name())
                }
            )));
        }
        (_, g) => Some(take("bn_out", g.flatten(), &out_shape)?),
    };
    let bn_input = take("bn_input", given.map(|g| &g.bn_input), &out_shape)?;
    let conv_out = match (unfused, given.map(|g| g.conv_out.as_ref())) {
        (false, Some(Some(_))) => {
            return Err(Error::invalid(format!(
                "{W} conv_out must be None: the fused forward does not materialize it"
            )));
        }
        (false, _) => None,
        (true, Some(None)) => {
            return Err(Error::invalid(format!(
                "{W} conv_out is missing: the unfused chain writes it"
            )));
        }
        (true, g) => Some(take("conv_out", g.flatten(), &out_shape)?),
    };
    let scale_factor = take("scale_factor", given.map(|g| &g.scale_factor), &[o])?;
    let inv_scale_factor = take("inv_scale_factor", given.map(|g| &g.inv_scale_factor), &[o])?;
    let weight_scaled = take("weight_scaled", given.map(|g| &g.weight_scaled), &ws)?;
    let weight_q = match given {
        None if !fake_quant_enabled => weight_scaled.clone(),
        g => take("weight_q", g.map(|g| &g.weight_q), &ws)?,
    };
    // A caller's output that receives a device copy needs COPY_DST, checked here before
    // anything is launched.
    let copy_dst = |t: &GpuTensor| {
        crate::gpu::require_usage(t.buffer(), wgpu::BufferUsages::COPY_DST, "copy into it")
    };
    if given.is_some() && !fake_quant_enabled {
        copy_dst(&weight_q)?;
    }
    let weight_mask = take("weight_mask", given.map(|g| &g.weight_mask), &ws)?;
    let stats = GpuBatchNormStats {
        stats: take("stats", given.map(|g| &g.stats.stats), &[2, o])?,
        running: take("running stats", given.map(|g| &g.stats.running), &[2, o])?,
    };
    let (channels, axis) = match qparams {
        QatQParams::Fixed(q) => (q.channels(), q.axis()),
        QatQParams::Observed { channels, axis } => (*channels, *axis),
    };
    let weight_qparams = match (given, qparams) {
        (None, QatQParams::Fixed(q)) => (*q).clone(),
        (None, _) => {
            GpuQParams::from_tensor(GpuTensor::uninit(ctx, &[3, channels], DType::U32)?, axis)?
        }
        (Some(g), _) => {
            let what = format!("{W} weight_qparams");
            let refs: Vec<&GpuTensor> = taken.iter().collect();
            check_output(
                ctx,
                &what,
                g.weight_qparams.tensor(),
                &[3, channels],
                DType::U32,
                &refs,
            )?;
            if g.weight_qparams.axis() != axis {
                return Err(Error::invalid(format!(
                    "{what} must have axis {axis:?}, got {:?}",
                    g.weight_qparams.axis()
                )));
            }
            if let QatQParams::Fixed(_) = qparams {
                copy_dst(g.weight_qparams.tensor())?;
            }
            g.weight_qparams.clone()
        }
    };
    Ok(GpuQatForward {
        y,
        bn_out,
        bn_input,
        conv_out,
        scale_factor,
        inv_scale_factor,
        weight_scaled,
        weight_q,
        weight_mask,
        weight_qparams,
        stats,
    })
}

/// `W_q` and its mask in `out`: the fake quant of `W_s` with `qp`, or with fake quant
/// disabled `W_q = W_s` (a device copy unless `out.weight_q` is `out.weight_scaled`) and a
/// mask of ones.
fn qat_weight_q(
    ctx: &GpuContext,
    out: &GpuQatForward,
    qp: &GpuQParams,
    range: crate::quant::QuantRange,
    fake_quant_enabled: bool,
) -> Result<()> {
    if fake_quant_enabled {
        return fake_quant_with_mask_into(
            ctx,
            &out.weight_scaled,
            qp,
            range,
            &out.weight_q,
            &out.weight_mask,
        );
    }
    let ws = &out.weight_scaled;
    if out.weight_q.buffer() != ws.buffer() {
        ctx.copy_regions(
            "copying the scaled weight",
            &[(ws.buffer(), 0, out.weight_q.buffer(), 0, ws.size_bytes())],
        )?;
    }
    channel_op_into(
        ctx,
        ws,
        ChannelOp::One,
        1,
        &out.scale_factor,
        None,
        &out.weight_mask,
    )
}

/// The checks of [`conv_bn_qat_forward_with`] before anything is launched; returns `O`, the
/// output shape and how the qparams are made.
fn check_qat_forward_with<'a>(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    cfg: &QatConfig,
    weight: &GpuQatWeight<'a>,
) -> Result<(usize, [usize; 4], QatQParams<'a>)> {
    check_context(ctx, x, conv, bn)?;
    if let Some(q) = weight.qparams {
        ctx.check_tensor("weight qparams", q.tensor())?;
    }
    let (o, out_shape) = check_qat_forward(x, conv, bn, cfg)?;
    let spec = &cfg.weight_observer;
    let ws = w_shape(conv);
    let qparams = match weight.qparams {
        Some(q) => {
            if weight.fake_quant_enabled {
                q.validate(&ws, spec.range)?;
            }
            QatQParams::Fixed(q)
        }
        None if spec.qscheme.is_per_channel() => {
            let axis = spec.channel_axis(4)?;
            QatQParams::Observed {
                channels: ws[axis],
                axis: Some(axis),
            }
        }
        None => QatQParams::Observed {
            channels: 1,
            axis: None,
        },
    };
    Ok((o, out_shape, qparams))
}

#[allow(clippy::too_many_arguments)]
fn conv_bn_qat_forward_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    momentum: f32,
    cfg: &QatConfig,
    weight: &GpuQatWeight,
    given: Option<&GpuQatForward>,
) -> Result<GpuQatForward> {
    // One submission for every pass (and pooled intermediates returned after it).
    ctx.record(|| conv_bn_qat_forward_passes(ctx, x, conv, bn, momentum, cfg, weight, given))
}

#[allow(clippy::too_many_arguments)]
fn conv_bn_qat_forward_passes(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    momentum: f32,
    cfg: &QatConfig,
    weight: &GpuQatWeight,
    given: Option<&GpuQatForward>,
) -> Result<GpuQatForward> {
    let (o, out_shape, qparams) = check_qat_forward_with(ctx, x, conv, bn, cfg, weight)?;
    let spec = &cfg.weight_observer;
    let ws = w_shape(conv);
    let mut inputs = conv_bn_inputs(x, conv, bn);
    inputs.extend(weight.qparams.map(|q| q.tensor()));
    let out = qat_forward_outputs(
        ctx,
        given,
        inputs,
        o,
        ws,
        out_shape,
        cfg.activation,
        &qparams,
        weight.fake_quant_enabled,
        false,
    )?;

    // (a) s, 1/s, W_s and the per-output-channel min/max of W_s: partial min/max over runs
    // of each channel's weights, then per channel.
    let inner = conv.weight.len().checked_div(o).unwrap_or(0);
    let (vec4, groups) = weight_runs(inner, o);
    let p = Params {
        finite_zero: u32::from(weight.finite_zero_gamma),
        groups: to_u32(groups, "partial invocations per channel")?,
        ..params_weight(conv, bn, o)?
    };
    let uniform = ctx.params(&p)?;
    let partials = GpuTensor::uninit(ctx, &[2, o, groups], DType::F32)?;
    let minmax = GpuTensor::zeros(ctx, &[2, o], DType::F32)?;
    let minmax_t = GpuTensor::zeros(ctx, &[2, 1], DType::F32)?;
    let per_tensor = !spec.qscheme.is_per_channel();
    let partial_buffers = if vec4 {
        [
            &uniform,
            bn.tensor().buffer(),
            partials.buffer(),
            conv.weight.buffer(),
            out.weight_scaled.buffer(),
        ]
    } else {
        [
            &uniform,
            bn.tensor().buffer(),
            conv.weight.buffer(),
            out.weight_scaled.buffer(),
            partials.buffer(),
        ]
    };
    let final_buffers = [
        &uniform,
        bn.tensor().buffer(),
        out.scale_factor.buffer(),
        out.inv_scale_factor.buffer(),
        minmax.buffer(),
        partials.buffer(),
    ];
    let merge_buffers = [&uniform, minmax.buffer(), minmax_t.buffer()];
    let mut launches = vec![
        Launch {
            kernel: if vec4 {
                &SCALE_WEIGHT_PARTIAL4
            } else {
                &SCALE_WEIGHT_PARTIAL
            },
            constants: &[],
            buffers: &partial_buffers,
            workgroups: partial_grid(ctx, o, groups)?,
        },
        Launch {
            kernel: &SCALE_WEIGHT_FINAL,
            constants: &[],
            buffers: &final_buffers,
            workgroups: ctx.grid_1d(o, WGR)?,
        },
    ];
    if per_tensor && weight.qparams.is_none() {
        launches.push(Launch {
            kernel: &MINMAX_MERGE,
            constants: &[],
            buffers: &merge_buffers,
            workgroups: [1, 1, 1],
        });
    }
    ctx.run(&launches)?;

    // (b) qparams.
    let qt = out.weight_qparams.tensor();
    let qp = match weight.qparams {
        Some(q) => {
            if qt.buffer() != q.tensor().buffer() {
                ctx.copy_regions(
                    "copying the fixed weight qparams",
                    &[(
                        q.tensor().buffer(),
                        0,
                        qt.buffer(),
                        0,
                        q.tensor().size_bytes(),
                    )],
                )?;
            }
            q
        }
        None => {
            if per_tensor {
                calc_qparams_into(ctx, &minmax_t, spec, None, qt)?;
            } else if spec.channel_axis(4)? == 0 {
                calc_qparams_into(ctx, &minmax, spec, Some(0), qt)?;
            } else {
                observe_into(ctx, &out.weight_scaled, spec, qt)?;
            }
            &out.weight_qparams
        }
    };

    // (c) fake quant with the straight-through mask.
    qat_weight_q(ctx, &out, qp, spec.range, weight.fake_quant_enabled)?;

    // (d) conv with the divide-back and the conv bias in the epilogue; (e), (f) statistics,
    // normalize + affine + activation (+ running update). The pre-activation output where it
    // is kept (not for ReLU / ReLU6, not for None: y).
    let epilogue = ConvEpilogue {
        out_scale: Some(&out.inv_scale_factor),
        bias: conv.bias,
        activation: Activation::None,
    };
    let bn_out = GpuBatchNormOutput {
        y: out.y.clone(),
        pre: out
            .bn_out
            .clone()
            .filter(|_| cfg.activation != Activation::None),
        stats: out.stats.clone(),
    };
    let training = !cfg.freeze_bn;
    if training && dw_ok(&ws, &conv.params, out_shape) {
        // A depthwise conv writes the statistics partials of its output as it stores it
        // (its statistics epilogue): the BatchNorm combines them and normalizes, with no
        // statistics pass over bn_input. The conv is the depthwise kernel the tuner picks
        // for these convs; the pass it saves is not in a conv-only timing.
        let parts = dw_stats_parts(out_shape);
        let partials = GpuTensor::uninit(ctx, &[3, o, parts], DType::F32)?;
        conv2d_dw_stats_into(
            ctx,
            x,
            &out.weight_q,
            &conv.params,
            &epilogue,
            &out.bn_input,
            &partials,
        )?;
        batch_norm2d_pre_reduced_into(
            ctx,
            &out.bn_input,
            bn,
            momentum,
            cfg.activation,
            (&partials, parts),
            &bn_out,
        )?;
    } else {
        conv2d_into(
            ctx,
            x,
            &out.weight_q,
            &conv.params,
            &epilogue,
            &out.bn_input,
        )?;
        batch_norm2d_into(
            ctx,
            &out.bn_input,
            bn,
            momentum,
            training,
            cfg.activation,
            &bn_out,
        )?;
    }
    Ok(out)
}

/// How the per-output-channel passes over a weight of `o` channels of `inner` values each
/// (the forward's scaling and min/max, the backward's STE) split it: on `vec4`s when `inner`
/// is a multiple of 4 (a `vec4` then stays in one channel), and the partial invocations per
/// channel ([`partial_count`] of the values or `vec4`s).
fn weight_runs(inner: usize, o: usize) -> (bool, usize) {
    let vec4 = inner.is_multiple_of(4);
    (vec4, partial_count(if vec4 { inner / 4 } else { inner }, o))
}

/// `out = op(x, a[c], b[c])` with `c = (i / inner) % C` (one dispatch); `out` is checked by
/// the caller (its shape is `x`'s).
fn channel_op_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    op: ChannelOp,
    inner: usize,
    a: &GpuTensor,
    b: Option<&GpuTensor>,
    out: &GpuTensor,
) -> Result<()> {
    let c = a.len();
    let p = Params {
        n: to_u32(x.len(), "channel_op element count")?,
        channels: to_u32(c, "channel_op channels")?,
        inner: to_u32(inner.max(1), "channel_op inner size")?,
        op: op as u32,
        ..Params::default()
    };
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &CHANNEL_OP,
        constants: &[],
        buffers: &[
            &uniform,
            x.buffer(),
            a.buffer(),
            b.unwrap_or(a).buffer(),
            out.buffer(),
        ],
        workgroups: if c == 0 {
            [0, 0, 0]
        } else {
            ctx.grid_1d(x.len(), WGR)?
        },
    }])
}

/// The unfused QAT chain, for comparison with [`conv_bn_qat_forward`] (same results, same
/// output struct, with `conv_out` kept): each op its own dispatch(es) and intermediate buffer —
/// scale factor, scale the weight, observe (min/max + qparams), fake quant, conv (no
/// epilogue), divide-back, add the conv bias, BatchNorm statistics, normalize, activation.
///
/// Errors: as [`conv_bn_qat_forward`].
pub fn conv_bn_qat_forward_unfused(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    momentum: f32,
    cfg: &QatConfig,
) -> Result<GpuQatForward> {
    conv_bn_qat_forward_unfused_impl(ctx, x, conv, bn, momentum, cfg, None)
}

/// [`conv_bn_qat_forward_unfused`] writing into `out`, checked as by
/// [`conv_bn_qat_forward_into`] except that `out.conv_out` is required (the chain writes
/// it).
///
/// Errors: those of [`conv_bn_qat_forward_into`].
pub fn conv_bn_qat_forward_unfused_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    momentum: f32,
    cfg: &QatConfig,
    out: &GpuQatForward,
) -> Result<()> {
    conv_bn_qat_forward_unfused_impl(ctx, x, conv, bn, momentum, cfg, Some(out)).map(drop)
}

fn conv_bn_qat_forward_unfused_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    momentum: f32,
    cfg: &QatConfig,
    given: Option<&GpuQatForward>,
) -> Result<GpuQatForward> {
    let (o, out_shape, qparams) =
        check_qat_forward_with(ctx, x, conv, bn, cfg, &GpuQatWeight::default())?;
    let spec = &cfg.weight_observer;
    let out = qat_forward_outputs(
        ctx,
        given,
        conv_bn_inputs(x, conv, bn),
        o,
        w_shape(conv),
        out_shape,
        cfg.activation,
        &qparams,
        true,
        true,
    )?;
    let p = params_weight(conv, bn, o)?;
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &SCALE_FACTOR,
        constants: &[],
        buffers: &[
            &uniform,
            bn.tensor().buffer(),
            out.scale_factor.buffer(),
            out.inv_scale_factor.buffer(),
        ],
        workgroups: ctx.grid_1d(o, WGR)?,
    }])?;
    channel_op_into(
        ctx,
        conv.weight,
        ChannelOp::Mul,
        p.inner as usize,
        &out.scale_factor,
        None,
        &out.weight_scaled,
    )?;
    observe_into(ctx, &out.weight_scaled, spec, out.weight_qparams.tensor())?;
    fake_quant_with_mask_into(
        ctx,
        &out.weight_scaled,
        &out.weight_qparams,
        spec.range,
        &out.weight_q,
        &out.weight_mask,
    )?;
    let conv_out = out
        .conv_out
        .as_ref()
        .ok_or_else(|| Error::invalid("internal: the unfused chain has no conv_out"))?;
    let bn_out = out
        .bn_out
        .clone()
        .ok_or_else(|| Error::invalid("internal: the unfused chain has no bn_out"))?;
    conv2d_into(
        ctx,
        x,
        &out.weight_q,
        &conv.params,
        &ConvEpilogue::none(),
        conv_out,
    )?;
    let hw = out_shape[2] * out_shape[3];
    match conv.bias {
        Some(b) => {
            let divided = GpuTensor::uninit(ctx, &out_shape, DType::F32)?;
            channel_op_into(
                ctx,
                conv_out,
                ChannelOp::Div,
                hw,
                &out.scale_factor,
                None,
                &divided,
            )?;
            channel_op_into(ctx, &divided, ChannelOp::Add, hw, b, None, &out.bn_input)?;
        }
        None => channel_op_into(
            ctx,
            conv_out,
            ChannelOp::Div,
            hw,
            &out.scale_factor,
            None,
            &out.bn_input,
        )?,
    }
    batch_norm2d_into(
        ctx,
        &out.bn_input,
        bn,
        momentum,
        !cfg.freeze_bn,
        Activation::None,
        &GpuBatchNormOutput {
            y: bn_out.clone(),
            pre: None,
            stats: out.stats.clone(),
        },
    )?;
    if cfg.activation != Activation::None {
        activation_into(ctx, &bn_out, cfg.activation, &out.y)?;
    }
    Ok(out)
}

/// The BatchNorm output before the activation: `fwd.bn_out` when the forward kept it, else
/// (the fused forward with ReLU or ReLU6) rebuilt from the saved BatchNorm input and
/// statistics as `(bn_input − mean)·invstd·γ + β` by the forward's own normalize pass (one
/// dispatch; the values the forward computed). `bn` must be the forward's BatchNorm, with the
/// γ and β it normalized with.
///
/// Errors: those of [`normalize`] for a `bn` that does not fit the forward.
pub fn qat_bn_out(ctx: &GpuContext, fwd: &GpuQatForward, bn: &GpuBatchNorm) -> Result<GpuTensor> {
    match &fwd.bn_out {
        Some(b) => Ok(b.clone()),
        None => qat_bn_out_of(ctx, &fwd.bn_input, &fwd.stats.stats, bn),
    }
}

/// [`qat_bn_out`] from the saved tensors it reads: the BatchNorm input and the `[2, C]`
/// statistics (mean, invstd) it was normalized with.
///
/// Errors: those of [`normalize`].
pub fn qat_bn_out_of(
    ctx: &GpuContext,
    bn_input: &GpuTensor,
    stats: &GpuTensor,
    bn: &GpuBatchNorm,
) -> Result<GpuTensor> {
    normalize(ctx, bn_input, bn, stats, Activation::None, false).map(|(y, _)| y)
}

/// The conv output before the divide-back: `fwd.conv_out` when the forward kept it, else
/// reconstructed from the BatchNorm input as `(bn_input − b)·s` (one dispatch; equal to the
/// reference's `conv_out` up to rounding). `conv` must be the forward's layer.
///
/// Errors: [`Error::ShapeMismatch`] for a conv bias that does not match the forward.
pub fn qat_conv_out(ctx: &GpuContext, fwd: &GpuQatForward, conv: &GpuConv2d) -> Result<GpuTensor> {
    qat_conv_out_impl(ctx, fwd, conv, None)
}

/// [`qat_conv_out`] writing into `out` (an `f32` tensor of the forward output's shape with a
/// buffer of its own, see [`super::check_output`]): a device copy of `fwd.conv_out` when the
/// forward kept it.
///
/// Errors: those of [`qat_conv_out`]; [`Error::ContextMismatch`], [`Error::ShapeMismatch`]
/// or [`Error::InvalidArgument`] naming `qat_conv_out output` for an unfit `out`.
pub fn qat_conv_out_into(
    ctx: &GpuContext,
    fwd: &GpuQatForward,
    conv: &GpuConv2d,
    out: &GpuTensor,
) -> Result<()> {
    qat_conv_out_impl(ctx, fwd, conv, Some(out)).map(drop)
}

fn qat_conv_out_impl(
    ctx: &GpuContext,
    fwd: &GpuQatForward,
    conv: &GpuConv2d,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[
        ("QAT forward scale factor", &fwd.scale_factor),
        ("conv2d weight", conv.weight),
    ])?;
    match (&fwd.conv_out, given) {
        (Some(c), None) => Ok(c.clone()),
        (Some(c), Some(out)) => {
            check_output(ctx, "qat_conv_out output", out, c.shape(), DType::F32, &[c])?;
            ctx.copy_regions(
                "copying the QAT conv output",
                &[(c.buffer(), 0, out.buffer(), 0, c.size_bytes())],
            )?;
            Ok(out.clone())
        }
        (None, _) => qat_conv_out_of_impl(ctx, &fwd.bn_input, &fwd.scale_factor, conv, given),
    }
}

/// [`qat_conv_out`] from the two saved tensors it reads: `(bn_input − b)·s` (one dispatch).
///
/// Errors: [`Error::ShapeMismatch`] for a conv bias that does not match `s`.
pub fn qat_conv_out_of(
    ctx: &GpuContext,
    bn_input: &GpuTensor,
    scale_factor: &GpuTensor,
    conv: &GpuConv2d,
) -> Result<GpuTensor> {
    qat_conv_out_of_impl(ctx, bn_input, scale_factor, conv, None)
}

/// [`qat_conv_out_of`] writing into `out` (an `f32` tensor of `bn_input`'s shape with a
/// buffer of its own, see [`super::check_output`]).
///
/// Errors: those of [`qat_conv_out_of`]; [`Error::ContextMismatch`],
/// [`Error::ShapeMismatch`] or [`Error::InvalidArgument`] naming `qat_conv_out output` for
/// an unfit `out`.
pub fn qat_conv_out_of_into(
    ctx: &GpuContext,
    bn_input: &GpuTensor,
    scale_factor: &GpuTensor,
    conv: &GpuConv2d,
    out: &GpuTensor,
) -> Result<()> {
    qat_conv_out_of_impl(ctx, bn_input, scale_factor, conv, Some(out)).map(drop)
}

fn qat_conv_out_of_impl(
    ctx: &GpuContext,
    bn_input: &GpuTensor,
    scale_factor: &GpuTensor,
    conv: &GpuConv2d,
    given: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[
        ("saved BatchNorm input", bn_input),
        ("saved scale factor", scale_factor),
    ])?;
    let o = scale_factor.len();
    let mut inputs = vec![bn_input, scale_factor];
    if let Some(b) = conv.bias {
        ctx.check_tensor("conv2d bias", b)?;
        expect_shape("conv2d bias", &[o], b)?;
        inputs.push(b);
    }
    let out = super::output(
        ctx,
        "qat_conv_out output",
        given,
        bn_input.shape(),
        DType::F32,
        &inputs,
    )?;
    let bias = bias_or_zeros(ctx, conv, o)?;
    let s = bn_input.shape();
    let hw = s.get(2..).map_or(1, |d| d.iter().product());
    channel_op_into(
        ctx,
        bn_input,
        ChannelOp::SubMul,
        hw,
        scale_factor,
        Some(&bias),
        &out,
    )?;
    Ok(out)
}

/// Gradients of the QAT step, on the GPU (the GPU form of [`crate::ops::QatGrads`]).
#[derive(Debug, Clone)]
pub struct GpuQatGrads {
    /// dL/dx.
    pub dx: GpuTensor,
    /// dL/dW.
    pub dweight: GpuTensor,
    /// dL/db (conv bias), `None` when the conv has no bias.
    pub dbias: Option<GpuTensor>,
    /// dL/dγ (BN affine + weight scaling + divide-back).
    pub dbn_weight: GpuTensor,
    /// dL/dβ.
    pub dbn_bias: GpuTensor,
}

/// Backward of [`conv_bn_qat_forward`] for upstream `dy`
/// ([`crate::reference::conv_bn::conv_bn_qat_backward`]; see the module doc for the passes):
///
/// * `dBN_in` = BatchNorm backward (training form, or eval form with `cfg.freeze_bn`) of the
///   activation's backward of `dy`, written directly as `g = d conv_out = dBN_in / s`;
/// * conv bias grad `= s·Σg` (`= ΣdBN_in`); divide-back part of `dγ`:
///   `−Σ g·(bn_input − b) / sqrt(rv + eps)` (`= −ΣdBN_in·conv_out/s² / sqrt(rv + eps)`);
/// * `dx`, `dW_q` from the conv backward with `W_q`; `dW_s = dW_q·mask`, `dW = dW_s·s`;
///   weight-scaling part of `dγ`: `Σ dW_s·W / sqrt(rv + eps)`;
/// * in a channel that the forward ran in the finite γ = 0 form (γ = ±0 and saved `s ≠ 0`,
///   see [`GpuQatWeight::finite_zero_gamma`]) `dγ` is the BatchNorm affine part only, as in
///   the reference.
///
/// Errors (the CPU's messages): as the forward's checks (without the training-size check);
/// [`Error::ShapeMismatch`] when `dy` is not the forward output shape or a saved tensor does
/// not fit `x`, `conv` and `bn`; [`Error::InvalidArgument`] for an empty input in training.
pub fn conv_bn_qat_backward(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    cfg: &QatConfig,
    saved: &GpuQatSaved,
) -> Result<GpuQatGrads> {
    conv_bn_qat_backward_impl(ctx, x, dy, conv, bn, cfg, saved, None, false)
}

/// The unfused QAT backward, for comparison with [`conv_bn_qat_backward`] (same results):
/// the activation's backward, the BatchNorm backward and the divide-back `dBN_in / s` each
/// their own dispatch and intermediate buffer; the rest (divide-back reductions, conv
/// backward, weight gradient) as in the fused backward.
///
/// Errors: as [`conv_bn_qat_backward`].
pub fn conv_bn_qat_backward_unfused(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    cfg: &QatConfig,
    saved: &GpuQatSaved,
) -> Result<GpuQatGrads> {
    conv_bn_qat_backward_impl(ctx, x, dy, conv, bn, cfg, saved, None, true)
}

/// [`conv_bn_qat_backward`] writing into `out`: `dx` of `x`'s shape, `dweight` of the conv
/// weight's, `dbn_weight` and `dbn_bias` `[O]`, and `dbias` `[O]` exactly when the conv has a
/// bias; `f32` tensors each with a buffer of its own, all checked
/// ([`super::check_output`]) before anything is launched.
///
/// Errors: those of [`conv_bn_qat_backward`]; [`Error::ContextMismatch`],
/// [`Error::ShapeMismatch`] or [`Error::InvalidArgument`] naming the unfit output
/// (`conv_bn_qat_backward output dx`, ...), or a `dbias` given for a conv without bias (or
/// missing for one with a bias).
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_qat_backward_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    cfg: &QatConfig,
    saved: &GpuQatSaved,
    out: &GpuQatGrads,
) -> Result<()> {
    conv_bn_qat_backward_impl(ctx, x, dy, conv, bn, cfg, saved, Some(out), false).map(drop)
}

#[allow(clippy::too_many_arguments)]
fn conv_bn_qat_backward_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    cfg: &QatConfig,
    saved: &GpuQatSaved,
    given: Option<&GpuQatGrads>,
    unfused: bool,
) -> Result<GpuQatGrads> {
    if unfused {
        return conv_bn_qat_backward_passes(ctx, x, dy, conv, bn, cfg, saved, given, true);
    }
    // One submission for every pass (and pooled intermediates returned after it).
    ctx.record(|| conv_bn_qat_backward_passes(ctx, x, dy, conv, bn, cfg, saved, given, false))
}

#[allow(clippy::too_many_arguments)]
fn conv_bn_qat_backward_passes(
    ctx: &GpuContext,
    x: &GpuTensor,
    dy: &GpuTensor,
    conv: &GpuConv2d,
    bn: &GpuBatchNorm,
    cfg: &QatConfig,
    saved: &GpuQatSaved,
    given: Option<&GpuQatGrads>,
    unfused: bool,
) -> Result<GpuQatGrads> {
    check_context(ctx, x, conv, bn)?;
    ctx.check_tensors(&[
        ("conv_bn_qat_backward dy", dy),
        ("saved scale factor", saved.scale_factor),
        ("saved quantized weight", saved.weight_q),
        ("saved weight mask", saved.weight_mask),
        ("saved BatchNorm input", saved.bn_input),
        ("saved stats", saved.stats),
        ("saved activation input", saved.act_input),
    ])?;
    let o = check_conv_bn(conv, bn)?;
    let out = conv.params.output_shape(x.shape(), conv.weight.shape())?;
    expect_f32("conv2d input", x)?;
    expect_shape("conv_bn_qat_backward dy (forward output shape)", &out, dy)?;
    expect_f32("conv_bn_qat_backward dy", dy)?;
    expect_shape("conv_bn_qat_backward saved bn_input", &out, saved.bn_input)?;
    if cfg.activation != Activation::None {
        expect_shape(
            "conv_bn_qat_backward saved activation input",
            &out,
            saved.act_input,
        )?;
    }
    let ws = w_shape(conv);
    expect_shape("conv_bn_qat_backward saved weight_q", &ws, saved.weight_q)?;
    expect_shape(
        "conv_bn_qat_backward saved weight_mask",
        &ws,
        saved.weight_mask,
    )?;
    expect_shape(
        "conv_bn_qat_backward saved scale_factor",
        &[o],
        saved.scale_factor,
    )?;
    for (what, t) in [
        ("conv_bn_qat_backward saved bn_input", saved.bn_input),
        ("conv_bn_qat_backward saved weight_q", saved.weight_q),
        ("conv_bn_qat_backward saved weight_mask", saved.weight_mask),
        (
            "conv_bn_qat_backward saved scale_factor",
            saved.scale_factor,
        ),
    ] {
        expect_f32(what, t)?;
    }

    // The outputs, before anything is launched.
    const W: &str = "conv_bn_qat_backward output";
    let x_shape = [out[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let mut taken: Vec<GpuTensor> = conv_bn_inputs(x, conv, bn).into_iter().cloned().collect();
    taken.extend(
        [
            dy,
            saved.scale_factor,
            saved.weight_q,
            saved.weight_mask,
            saved.bn_input,
            saved.stats,
            saved.act_input,
        ]
        .into_iter()
        .cloned(),
    );
    let mut take = |name: &str, g: Option<&GpuTensor>, shape: &[usize]| {
        take_output(ctx, &format!("{W} {name}"), g, shape, &mut taken)
    };
    let dx = take("dx", given.map(|g| &g.dx), &x_shape)?;
    let dweight = take("dweight", given.map(|g| &g.dweight), &ws)?;
    let dgamma = take("dbn_weight", given.map(|g| &g.dbn_weight), &[o])?;
    let dbeta = take("dbn_bias", given.map(|g| &g.dbn_bias), &[o])?;
    let dbias = match (conv.bias, given.map(|g| g.dbias.as_ref())) {
        (Some(_), Some(None)) => {
            return Err(Error::invalid(format!(
                "{W} dbias is missing: the conv has a bias"
            )));
        }
        (None, Some(Some(_))) => {
            return Err(Error::invalid(format!(
                "{W} dbias must be None: the conv has no bias"
            )));
        }
        (Some(_), g) => Some(take("dbias", g.flatten(), &[o])?),
        (None, _) => None,
    };

    // BatchNorm (with the activation's mask) → g = dBN_in / s.
    let (g, bn_grads) = if unfused {
        let d_pre = match cfg.activation {
            Activation::None => dy.clone(),
            act => activation_backward(ctx, saved.act_input, dy, act)?,
        };
        let grads =
            batch_norm2d_backward(ctx, saved.bn_input, &d_pre, bn, saved.stats, !cfg.freeze_bn)?;
        let g = GpuTensor::uninit(ctx, &out, DType::F32)?;
        channel_op_into(
            ctx,
            &grads.dx,
            ChannelOp::Div,
            out[2] * out[3],
            saved.scale_factor,
            None,
            &g,
        )?;
        (g, grads)
    } else {
        let grads = batch_norm2d_backward_act(
            ctx,
            saved.bn_input,
            dy,
            bn,
            saved.stats,
            !cfg.freeze_bn,
            cfg.activation,
            Some(saved.act_input),
            Some(saved.scale_factor),
        )?;
        (grads.dx.clone(), grads)
    };

    // Divide-back terms: conv bias grad, dβ, and dγ's BN-affine and divide-back parts.
    let m = out[0] * out[2] * out[3];
    let groups = partial_count(m, o);
    let p = Params {
        channels: to_u32(o, "conv output channels")?,
        inner: to_u32(
            ws[1] * ws[2] * ws[3],
            "conv weight elements per output channel",
        )?,
        m: to_u32(m, "values per channel")?,
        groups: groups as u32,
        hw: to_u32((out[2] * out[3]).max(1), "output plane size")?,
        eps: bn.eps(),
        ..Params::default()
    };
    to_u32(g.len(), "conv output element count")?;
    let uniform = ctx.params(&p)?;
    let bias = bias_or_zeros(ctx, conv, o)?;
    let partials = GpuTensor::zeros(ctx, &[2, o, groups], DType::F32)?;
    // The kernel writes the conv bias gradient also for a conv without bias.
    let dbias_buf = match &dbias {
        Some(d) => d.clone(),
        None => GpuTensor::uninit(ctx, &[o], DType::F32)?,
    };
    ctx.run(&[
        Launch {
            kernel: &DIVIDE_BACK_PARTIAL,
            constants: &[],
            buffers: &[
                &uniform,
                g.buffer(),
                bias.buffer(),
                saved.bn_input.buffer(),
                partials.buffer(),
            ],
            workgroups: partial_grid(ctx, o, groups)?,
        },
        Launch {
            kernel: &DIVIDE_BACK_FINAL,
            constants: &[],
            buffers: &[
                &uniform,
                bn.tensor().buffer(),
                saved.scale_factor.buffer(),
                partials.buffer(),
                bn_grads.dparams.buffer(),
                dbias_buf.buffer(),
                dgamma.buffer(),
                dbeta.buffer(),
            ],
            workgroups: ctx.grid_1d(o, WGR)?,
        },
    ])?;

    // Conv backward with W_q (as forward convolutions through the conv's fast kernels where
    // the settings allow, see `train::conv2d_input_grad`).
    conv2d_input_grad_into(ctx, &g, saved.weight_q, &conv.params, x_shape, &dx)?;
    let dw_q = conv2d_weight_grad(ctx, x, &g, &conv.params, ws)?;

    // STE mask, dW = dW_s·s, weight-scaling part of dγ: partial sums over runs of each
    // channel's weights, then per channel.
    let inner = ws[1] * ws[2] * ws[3];
    let (wvec4, wgroups) = weight_runs(inner, o);
    let wuniform = ctx.params(&Params {
        groups: to_u32(wgroups, "partial invocations per channel")?,
        ..p
    })?;
    let wpartials = GpuTensor::uninit(ctx, &[o, wgroups], DType::F32)?;
    let (w, s, part) = (
        conv.weight.buffer(),
        saved.scale_factor.buffer(),
        wpartials.buffer(),
    );
    let (dwq, mask, dwb) = (dw_q.buffer(), saved.weight_mask.buffer(), dweight.buffer());
    let partial_buffers = if wvec4 {
        [&wuniform, s, part, w, dwq, mask, dwb]
    } else {
        [&wuniform, w, s, part, dwq, mask, dwb]
    };
    ctx.run(&[
        Launch {
            kernel: if wvec4 {
                &WEIGHT_GRAD_PARTIAL4
            } else {
                &WEIGHT_GRAD_PARTIAL
            },
            constants: &[],
            buffers: &partial_buffers,
            workgroups: partial_grid(ctx, o, wgroups)?,
        },
        Launch {
            kernel: &WEIGHT_GRAD_FINAL,
            constants: &[],
            buffers: &[
                &wuniform,
                bn.tensor().buffer(),
                saved.scale_factor.buffer(),
                wpartials.buffer(),
                dgamma.buffer(),
            ],
            workgroups: ctx.grid_1d(o, WGR)?,
        },
    ])?;

    Ok(GpuQatGrads {
        dx,
        dweight,
        dbias,
        dbn_weight: dgamma,
        dbn_bias: dbeta,
    })
}

/// Elementwise `sqrt_rn(a)`: the shader's correctly rounded f32 square root (behind the
/// bit-exact scale factor `s`), exposed so tests can check it against Rust's `f32::sqrt`.
pub fn sqrt_rn(ctx: &GpuContext, a: &GpuTensor) -> Result<GpuTensor> {
    sqrt_rn_impl(ctx, a, None)
}

/// [`sqrt_rn`] writing into `out` (an `f32` tensor of `a`'s shape with a buffer of its own,
/// see [`super::check_output`]).
pub fn sqrt_rn_into(ctx: &GpuContext, a: &GpuTensor, out: &GpuTensor) -> Result<()> {
    sqrt_rn_impl(ctx, a, Some(out)).map(drop)
}

fn sqrt_rn_impl(ctx: &GpuContext, a: &GpuTensor, given: Option<&GpuTensor>) -> Result<GpuTensor> {
    ctx.check_tensor("sqrt_rn input", a)?;
    expect_f32("sqrt_rn input", a)?;
    let p = Params {
        n: to_u32(a.len(), "sqrt_rn element count")?,
        ..Params::default()
    };
    let uniform = ctx.params(&p)?;
    let out = super::output(ctx, "sqrt_rn output", given, a.shape(), DType::F32, &[a])?;
    ctx.run(&[Launch {
        kernel: &SQRT_RN_TEST,
        constants: &[],
        buffers: &[&uniform, a.buffer(), out.buffer()],
        workgroups: ctx.grid_1d(a.len(), WGR)?,
    }])?;
    Ok(out)
}
