//! BatchNorm folding on the GPU (`shaders/fold.wgsl`), matching [`crate::reference::fold`]:
//! conv weights of any rank, transposed conv weights (grouped and depthwise too), and linear
//! layers.
//!
//! One submission of two dispatches: the per-channel scale `γ / sqrt(var + eps)` and the
//! folded bias, once per output channel (correctly rounded `sqrt` and division, so the folded
//! weight is bit-exact with the CPU; the bias is within 1e-5, as a driver may contract its
//! mul-add), then the weight scaled by it: `vec4` loads and stores along each output channel's
//! contiguous row when its length is a multiple of 4 (four `vec4`s per invocation, the scale
//! read once), else four elements per invocation.

use bytemuck::{Pod, Zeroable};

use super::{expect_f32, grid, output, to_u32, WG_CONSTANTS};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, Shader};
use crate::ops::BatchNorm;

pub(super) static SHADER: Shader = Shader {
    name: "fold",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/exact_float.wgsl"),
        include_str!("../../shaders/fold.wgsl")
    ),
};

static FOLD_SCALE: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "fold_scale",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read(3),
        Binding::read_write(5),
        Binding::read_write(8),
    ],
};

static FOLD_ROWS4: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "fold_rows4",
    bindings: &[
        Binding::uniform(0),
        Binding::read(6),
        Binding::read_write(7),
        Binding::read_write(8),
    ],
};

static FOLD_WEIGHT: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "fold_weight",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(4),
        Binding::read_write(8),
    ],
};

/// Workgroups of `fold_weight`; `fold_rows4` sizes its workgroups to the row
/// ([`super::row_workgroup`]).
const FLAT_WG: super::RowWorkgroup = super::SMALL_ROW_WORKGROUP;
/// `vec4`s each `fold_rows4` invocation scales; elements each `fold_weight` invocation scales.
const PER_INVOCATION: usize = 4;
/// Shortest row (elements) for which `fold_rows4` is used: shorter rows would leave most of
/// each workgroup idle.
const MIN_ROW: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    inner: u32,
    d1: u32,
    cin_per_group: u32,
    transpose: u32,
    bias_len: u32,
    bn_channels: u32,
    linear: u32,
    eps: f32,
    rows: u32,
    _pad: [u32; 2],
}

/// A BatchNorm's parameters on the GPU: a `[4, C]` tensor of `γ`, `β`, running mean and
/// running variance (`γ = 1`, `β = 0` for `affine=False`), and `eps`.
#[derive(Debug, Clone)]
pub struct GpuBatchNorm {
    data: GpuTensor,
    eps: f32,
}

impl GpuBatchNorm {
    /// Validates ([`BatchNorm::validate`]) and uploads a BatchNorm.
    pub fn upload(ctx: &GpuContext, bn: &BatchNorm) -> Result<Self> {
        bn.validate()?;
        let c = bn.channels();
        let mut data = Vec::with_capacity(4 * c);
        match &bn.weight {
            Some(w) => data.extend(w.iter().copied()),
            None => data.extend(std::iter::repeat_n(1.0f32, c)),
        }
        match &bn.bias {
            Some(b) => data.extend(b.iter().copied()),
            None => data.extend(std::iter::repeat_n(0.0f32, c)),
        }
        data.extend(bn.running_mean.iter().copied());
        data.extend(bn.running_var.iter().copied());
        Ok(Self {
            data: GpuTensor::from_slice_f32(ctx, &data, &[4, c])?,
            eps: bn.eps,
        })
    }

    /// Wraps a `[4, C]` `f32` tensor in the layout above (rows `γ`, `β`, running mean,
    /// running variance), already on the device: no host round trip.
    ///
    /// Errors: [`Error::InvalidArgument`] for another shape or dtype, or a negative or NaN
    /// `eps` ([`BatchNorm::validate`]'s message).
    pub fn from_packed(data: GpuTensor, eps: f32) -> Result<Self> {
        if data.dtype() != DType::F32 || data.shape().len() != 2 || data.shape()[0] != 4 {
            return Err(Error::invalid(format!(
                "a GPU BatchNorm must be a [4, C] f32 tensor, got {:?} {:?}",
                data.dtype(),
                data.shape()
            )));
        }
        if eps.is_nan() || eps < 0.0 {
            return Err(Error::invalid(format!(
                "BatchNorm eps must be >= 0, got {eps}"
            )));
        }
        Ok(Self { data, eps })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.data.shape()[1]
    }

    /// `eps`.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// The `[4, C]` tensor (`γ`, `β`, running mean, running variance).
    pub fn tensor(&self) -> &GpuTensor {
        &self.data
    }
}

/// The rank check of BatchNorm folding into a conv weight (one home:
/// [`crate::ops::check_conv_weight_rank`]).
pub use crate::ops::check_conv_weight_rank;

fn bias_or_zeros(
    ctx: &GpuContext,
    layer: &str,
    bias: Option<&GpuTensor>,
    out: usize,
) -> Result<GpuTensor> {
    match bias {
        None => GpuTensor::zeros(ctx, &[out], DType::F32),
        Some(b) if b.shape() == [out] => {
            expect_f32(&format!("{layer} bias"), b)?;
            Ok(b.clone())
        }
        Some(b) => Err(Error::shape(format!("{layer} bias"), &[out], b.shape())),
    }
}

fn run(
    ctx: &GpuContext,
    weight: &GpuTensor,
    bias: &GpuTensor,
    bn: &GpuBatchNorm,
    mut params: Params,
    given: Option<(&GpuTensor, &GpuTensor)>,
) -> Result<(GpuTensor, GpuTensor)> {
    let n = weight.len();
    let inner = params.inner.max(1) as usize;
    let rows = n / inner;
    params.rows = to_u32(rows, "weight rows")?;
    let uniform = ctx.params(&params)?;
    let inputs = [weight, bias, &bn.data];
    let (given_w, given_b) = (given.map(|g| g.0), given.map(|g| g.1));
    let w_out = output(
        ctx,
        "folded weight",
        given_w,
        weight.shape(),
        DType::F32,
        &inputs,
    )?;
    let inputs = [weight, bias, &bn.data, &w_out];
    let bias_len = [params.bias_len as usize];
    let b_out = output(ctx, "folded bias", given_b, &bias_len, DType::F32, &inputs)?;
    let scale = GpuTensor::uninit(ctx, &bias_len, DType::F32)?;
    // fold_rows4: one row of workgroups per weight row, rows over y and z.
    let max = ctx.limits().max_compute_workgroups_per_dimension as usize;
    let invocations = (inner / 4).div_ceil(PER_INVOCATION);
    let rows_wg = super::row_workgroup(invocations);
    let gx = invocations.div_ceil(rows_wg.size as usize);
    let gy = rows.min(max);
    let gz = rows.div_ceil(gy.max(1));
    let rows4 = inner.is_multiple_of(4) && inner >= MIN_ROW && rows > 0 && gx <= max && gz <= max;
    let scale_buffers = [
        &uniform,
        bn.data.buffer(),
        bias.buffer(),
        b_out.buffer(),
        scale.buffer(),
    ];
    let weight_buffers = [&uniform, weight.buffer(), w_out.buffer(), scale.buffer()];
    let weight_launch = if rows4 {
        Launch {
            kernel: &FOLD_ROWS4,
            constants: rows_wg.constants,
            buffers: &weight_buffers,
            workgroups: [gx as u32, gy as u32, gz as u32],
        }
    } else {
        Launch {
            kernel: &FOLD_WEIGHT,
            constants: FLAT_WG.constants,
            buffers: &weight_buffers,
            workgroups: ctx.grid_1d(n.div_ceil(PER_INVOCATION), FLAT_WG.size)?,
        }
    };
    ctx.run(&[
        Launch {
            kernel: &FOLD_SCALE,
            constants: WG_CONSTANTS,
            buffers: &scale_buffers,
            workgroups: grid(ctx, params.bias_len as usize)?,
        },
        weight_launch,
    ])?;
    Ok((w_out, b_out))
}

/// Folds a BatchNorm into a conv weight of any rank (`[Cout, Cin/g, k...]`), or with
/// `transpose` into a ConvTranspose weight (`[Cin, Cout/g, k...]`, groups inferred as
/// `bn.channels() / weight.shape[1]`), like
/// [`crate::reference::fold::fuse_conv_bn_weights`]. Returns the folded weight (same shape)
/// and bias (`[Cout]`). A missing bias counts as zeros.
///
/// Errors (same as the CPU): [`Error::InvalidArgument`] for rank < 3 or groups not dividing
/// `Cin`, [`Error::ChannelMismatch`], [`Error::ShapeMismatch`] for a bias of the wrong length.
pub fn fold_conv_bn(
    ctx: &GpuContext,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
    bn: &GpuBatchNorm,
    transpose: bool,
) -> Result<(GpuTensor, GpuTensor)> {
    fold_conv_bn_impl(ctx, weight, bias, bn, transpose, None)
}

/// [`fold_conv_bn`] writing the folded weight into `w_out` (the weight's shape) and the
/// folded bias into `b_out` (`[Cout]`), `f32` tensors each with its own buffer (see
/// [`super::check_output`]).
pub fn fold_conv_bn_into(
    ctx: &GpuContext,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
    bn: &GpuBatchNorm,
    transpose: bool,
    w_out: &GpuTensor,
    b_out: &GpuTensor,
) -> Result<()> {
    fold_conv_bn_impl(ctx, weight, bias, bn, transpose, Some((w_out, b_out))).map(drop)
}

/// `Ok` when the weight, bias and BatchNorm were made on `ctx`.
fn check_context(
    ctx: &GpuContext,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
    bn: &GpuBatchNorm,
) -> Result<()> {
    ctx.check_tensors(&[("weight", weight), ("BatchNorm parameters", &bn.data)])?;
    if let Some(b) = bias {
        ctx.check_tensor("bias", b)?;
    }
    Ok(())
}

fn fold_conv_bn_impl(
    ctx: &GpuContext,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
    bn: &GpuBatchNorm,
    transpose: bool,
    given: Option<(&GpuTensor, &GpuTensor)>,
) -> Result<(GpuTensor, GpuTensor)> {
    check_context(ctx, weight, bias, bn)?;
    let shape = weight.shape();
    check_conv_weight_rank(shape)?;
    expect_f32("conv weight", weight)?;
    let cout = bn.channels();
    let layer = if transpose { "conv_transpose" } else { "conv" };
    let (d0, d1) = (shape[0], shape[1]);
    let kernel: usize = shape[2..].iter().product();
    let mut params = Params {
        n: to_u32(weight.len(), "conv weight elements")?,
        bias_len: to_u32(cout, "conv output channels")?,
        bn_channels: to_u32(cout, "BatchNorm channels")?,
        eps: bn.eps,
        ..Params::default()
    };
    if transpose {
        if d1 == 0 || !cout.is_multiple_of(d1) || cout / d1 == 0 {
            return Err(Error::ChannelMismatch {
                layer: layer.to_string(),
                layer_channels: d1,
                bn_channels: cout,
            });
        }
        let g = cout / d1;
        if !d0.is_multiple_of(g) {
            return Err(Error::invalid(format!(
                "conv_transpose weight {shape:?} with BatchNorm of {cout} channels implies \
                 groups = {g}, which does not divide the {d0} input channels"
            )));
        }
        params.transpose = 1;
        params.inner = to_u32(kernel.max(1), "conv kernel size")?;
        params.d1 = to_u32(d1, "conv_transpose weight dim 1")?;
        params.cin_per_group = to_u32((d0 / g).max(1), "conv_transpose Cin/groups")?;
    } else {
        if d0 != cout {
            return Err(Error::ChannelMismatch {
                layer: layer.to_string(),
                layer_channels: d0,
                bn_channels: cout,
            });
        }
        params.inner = to_u32((d1 * kernel).max(1), "conv weight elements per channel")?;
    }
    let bias = bias_or_zeros(ctx, layer, bias, cout)?;
    run(ctx, weight, &bias, bn, params, given)
}

/// Folds a BatchNorm1d into a linear layer (weight `[out, in]`), like
/// [`crate::reference::fold::fuse_linear_bn_weights`]: a one-channel BatchNorm broadcasts;
/// the folded bias always has `out` elements.
///
/// Errors (same as the CPU): [`Error::ChannelMismatch`] (layer `linear`),
/// [`Error::ShapeMismatch`] for a bias of the wrong length; [`Error::InvalidArgument`] for a
/// weight that is not 2-D.
pub fn fold_linear_bn(
    ctx: &GpuContext,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
    bn: &GpuBatchNorm,
) -> Result<(GpuTensor, GpuTensor)> {
    fold_linear_bn_impl(ctx, weight, bias, bn, None)
}

/// [`fold_linear_bn`] writing the folded weight into `w_out` (`[out, in]`) and the folded
/// bias into `b_out` (`[out]`), `f32` tensors each with its own buffer (see
/// [`super::check_output`]).
pub fn fold_linear_bn_into(
    ctx: &GpuContext,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
    bn: &GpuBatchNorm,
    w_out: &GpuTensor,
    b_out: &GpuTensor,
) -> Result<()> {
    fold_linear_bn_impl(ctx, weight, bias, bn, Some((w_out, b_out))).map(drop)
}

fn fold_linear_bn_impl(
    ctx: &GpuContext,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
    bn: &GpuBatchNorm,
    given: Option<(&GpuTensor, &GpuTensor)>,
) -> Result<(GpuTensor, GpuTensor)> {
    check_context(ctx, weight, bias, bn)?;
    let shape = weight.shape();
    if shape.len() != 2 {
        return Err(Error::invalid(format!(
            "linear weight must be [out, in], got shape {shape:?}"
        )));
    }
    expect_f32("linear weight", weight)?;
    let (out, inp) = (shape[0], shape[1]);
    let c = bn.channels();
    if c != out && c != 1 {
        return Err(Error::ChannelMismatch {
            layer: "linear".to_string(),
            layer_channels: out,
            bn_channels: c,
        });
    }
    let bias = bias_or_zeros(ctx, "linear", bias, out)?;
    let params = Params {
        n: to_u32(weight.len(), "linear weight elements")?,
        inner: to_u32(inp.max(1), "linear in_features")?,
        bias_len: to_u32(out, "linear out_features")?,
        bn_channels: to_u32(c, "BatchNorm channels")?,
        linear: 1,
        eps: bn.eps,
        ..Params::default()
    };
    run(ctx, weight, &bias, bn, params, given)
}
