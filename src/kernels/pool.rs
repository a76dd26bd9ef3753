//! Max pooling and `log_softmax` on the GPU (`shaders/pool.wgsl`), mirroring
//! [`crate::reference::layers::max_pool2d`] (bit-exact, NaN propagates) and
//! [`crate::reference::layers::log_softmax`] (up to summation order and `exp`/`ln` accuracy).

use bytemuck::{Pod, Zeroable};

use super::{expect_f32, output, to_u32, WG_CONSTANTS, WORKGROUP_SIZE};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, Shader};

pub(super) static SHADER: Shader = Shader {
    name: "pool",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/pool.wgsl")
    ),
};

const BINDINGS: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read_write(2),
];

static MAX_POOL2D: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "max_pool2d",
    bindings: BINDINGS,
};

static LOG_SOFTMAX: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "log_softmax",
    bindings: BINDINGS,
};

static LOG_SOFTMAX_ROW: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "log_softmax_row",
    bindings: BINDINGS,
};

/// Rows of at most this many columns run `log_softmax_row` (one invocation per row, no
/// barriers); longer rows a workgroup each (`log_softmax`). A class-score row (10 Mnist
/// digits, 1000 ImageNet classes) is short: 64 rows of 10 took 1.2 ms through the workgroup
/// kernel on lavapipe, whose 18 barriers per row dominate.
const LOG_SOFTMAX_ROW_MAX: usize = 1024;

/// The uniform of `pool.wgsl` (same field order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct Params {
    count: u32,
    c: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kernel: u32,
    stride: u32,
    cols: u32,
    _pad: [u32; 3],
}

/// 2-D max pooling of an NCHW tensor with a square `kernel` and `stride`, no padding, floor
/// mode: `[N, C, (H - k) / s + 1, (W - k) / s + 1]`, bit-exact with
/// [`crate::reference::layers::max_pool2d`] (a window containing NaN gives its first NaN).
///
/// Errors: the CPU reference's [`Error::InvalidArgument`]s (zero kernel or stride, kernel
/// larger than the input), and one for an input that is not a rank-4 `f32` tensor.
pub fn max_pool2d(
    ctx: &GpuContext,
    x: &GpuTensor,
    kernel: usize,
    stride: usize,
) -> Result<GpuTensor> {
    max_pool2d_impl(ctx, x, kernel, stride, None)
}

/// [`max_pool2d`] writing into `out` (an `f32` tensor of the output shape with its own
/// buffer, see [`super::check_output`]).
pub fn max_pool2d_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    kernel: usize,
    stride: usize,
    out: &GpuTensor,
) -> Result<()> {
    max_pool2d_impl(ctx, x, kernel, stride, Some(out)).map(drop)
}

fn max_pool2d_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    kernel: usize,
    stride: usize,
    out: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensor("max_pool2d input", x)?;
    let [n, c, h, w] = <[usize; 4]>::try_from(x.shape()).map_err(|_| {
        Error::invalid(format!(
            "max_pool2d input must be NCHW (rank 4), got shape {:?}",
            x.shape()
        ))
    })?;
    let (oh, ow) = crate::ops::max_pool2d_output(h, w, kernel, stride)?;
    expect_f32("max_pool2d input", x)?;
    to_u32(x.len(), "max_pool2d input element count")?;
    let y = output(
        ctx,
        "max_pool2d output",
        out,
        &[n, c, oh, ow],
        DType::F32,
        &[x],
    )?;
    let p = Params {
        count: to_u32(y.len(), "max_pool2d output element count")?,
        c: to_u32(c, "max_pool2d channels")?,
        h: to_u32(h, "max_pool2d height")?,
        w: to_u32(w, "max_pool2d width")?,
        oh: to_u32(oh, "max_pool2d output height")?,
        ow: to_u32(ow, "max_pool2d output width")?,
        kernel: to_u32(kernel, "max_pool2d kernel")?,
        stride: to_u32(stride, "max_pool2d stride")?,
        ..Params::default()
    };
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &MAX_POOL2D,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, x.buffer(), y.buffer()],
        workgroups: ctx.grid_1d(y.len(), WORKGROUP_SIZE)?,
    }])?;
    Ok(y)
}

/// `log_softmax` along dim 1 of `x` `[N, C]`, computed per row as
/// `(x - max) - ln(Σ exp(x - max))` like [`crate::reference::layers::log_softmax`]; a row
/// containing NaN or `+inf` (or only `-inf`) gives NaN.
///
/// Errors: [`Error::InvalidArgument`] unless `x` is a rank-2 `f32` tensor.
pub fn log_softmax(ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
    log_softmax_impl(ctx, x, None)
}

/// [`log_softmax`] writing into `out` (an `f32` tensor of `x`'s shape with its own buffer,
/// see [`super::check_output`]).
pub fn log_softmax_into(ctx: &GpuContext, x: &GpuTensor, out: &GpuTensor) -> Result<()> {
    log_softmax_impl(ctx, x, Some(out)).map(drop)
}

fn log_softmax_impl(ctx: &GpuContext, x: &GpuTensor, out: Option<&GpuTensor>) -> Result<GpuTensor> {
    ctx.check_tensor("log_softmax input", x)?;
    let [rows, cols] = <[usize; 2]>::try_from(x.shape()).map_err(|_| {
        Error::invalid(format!(
            "log_softmax input must be [N, C] (rank 2), got shape {:?}",
            x.shape()
        ))
    })?;
    expect_f32("log_softmax input", x)?;
    to_u32(x.len(), "log_softmax element count")?;
    let y = output(ctx, "log_softmax output", out, x.shape(), DType::F32, &[x])?;
    let p = Params {
        count: to_u32(rows, "log_softmax rows")?,
        cols: to_u32(cols, "log_softmax columns")?,
        ..Params::default()
    };
    let uniform = ctx.params(&p)?;
    let (kernel, constants, workgroups) = if cols <= LOG_SOFTMAX_ROW_MAX {
        (
            &LOG_SOFTMAX_ROW,
            WG_CONSTANTS,
            ctx.grid_1d(rows, WORKGROUP_SIZE)?,
        )
    } else {
        (&LOG_SOFTMAX, &[][..], ctx.grid_1d(rows, 1)?)
    };
    ctx.run(&[Launch {
        kernel,
        constants,
        buffers: &[&uniform, x.buffer(), y.buffer()],
        workgroups,
    }])?;
    Ok(y)
}
