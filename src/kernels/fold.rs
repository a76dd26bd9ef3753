//! BatchNorm folding on the GPU (`shaders/fold.wgsl`), matching [`crate::reference::fold`]
//! to within 1e-5 (WGSL's `sqrt` and `/` are not correctly rounded): conv weights of any rank,
//! transposed conv weights (grouped and depthwise too), and linear layers.

use bytemuck::{Pod, Zeroable};

use super::{expect_f32, grid, to_u32, WG_CONSTANTS};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, Shader};
use crate::ops::BatchNorm;

static SHADER: Shader = Shader {
    name: "fold",
    source: include_str!("../../shaders/fold.wgsl"),
};

static FOLD_WEIGHT: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "fold_weight",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read(2),
        Binding::read_write(4),
    ],
};

static FOLD_BIAS: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "fold_bias",
    bindings: &[
        Binding::uniform(0),
        Binding::read(2),
        Binding::read(3),
        Binding::read_write(5),
    ],
};

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
    _pad: [u32; 3],
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

/// The rank check of [`crate::reference::fold::fuse_conv_bn_weights`] (it runs before the
/// BatchNorm is validated there).
pub fn check_conv_weight_rank(shape: &[usize]) -> Result<()> {
    if shape.len() < 3 {
        return Err(Error::invalid(format!(
            "conv weight must have rank >= 3 ([out, in/groups, k...]), got shape {shape:?}"
        )));
    }
    Ok(())
}

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
    params: Params,
) -> Result<(GpuTensor, GpuTensor)> {
    let uniform = ctx.uniform(&params)?;
    let w_out = GpuTensor::zeros(ctx, weight.shape(), DType::F32)?;
    let b_out = GpuTensor::zeros(ctx, &[params.bias_len as usize], DType::F32)?;
    ctx.run(&[
        Launch {
            kernel: &FOLD_WEIGHT,
            constants: WG_CONSTANTS,
            buffers: &[&uniform, weight.buffer(), bn.data.buffer(), w_out.buffer()],
            workgroups: grid(ctx, weight.len())?,
        },
        Launch {
            kernel: &FOLD_BIAS,
            constants: WG_CONSTANTS,
            buffers: &[&uniform, bn.data.buffer(), bias.buffer(), b_out.buffer()],
            workgroups: grid(ctx, params.bias_len as usize)?,
        },
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
    run(ctx, weight, &bias, bn, params)
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
    run(ctx, weight, &bias, bn, params)
}
