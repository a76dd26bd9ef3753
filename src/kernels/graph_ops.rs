//! The float ops an imported ONNX graph needs beyond layers (`shaders/graph_ops.wgsl`), each
//! bit-exact with its CPU reference: pooling with ONNX's full window
//! ([`crate::reference::layers::pool2d`]), global average pooling
//! ([`crate::reference::layers::global_avg_pool2d`], ndarray's summation order), broadcasting
//! `Add` / `Mul` ([`crate::reference::layers::broadcast_binary`]), `Concat`
//! ([`crate::reference::layers::concat`]) and ONNX's QuantizeLinear → DequantizeLinear
//! ([`crate::reference::fake_quant::fake_quantize_onnx`]). Shapes are checked by the shared
//! checks of [`crate::ops`] ([`PoolWindow::output_shape`], [`crate::ops::global_pool_extent`],
//! [`crate::ops::broadcast_shape`], [`crate::ops::concat_shape`]) and
//! [`crate::quant::QParams::validate`].

use bytemuck::{Pod, Zeroable};

use super::{expect_f32, grid, output, to_u32, GpuQParams, WG_CONSTANTS};
use crate::error::{Error, Result};
use crate::gpu::{Binding, DType, GpuContext, GpuTensor, Kernel, Launch, Shader};
use crate::ops::{BinaryOp, PoolMode, PoolWindow, MAX_BROADCAST_RANK};
use crate::quant::QuantRange;

pub(super) static SHADER: Shader = Shader {
    name: "graph_ops",
    source: concat!(
        include_str!("../../shaders/lib/float_bits.wgsl"),
        include_str!("../../shaders/lib/exact_float.wgsl"),
        include_str!("../../shaders/graph_ops.wgsl")
    ),
};

const UNARY: &[Binding] = &[
    Binding::uniform(0),
    Binding::read(1),
    Binding::read_write(2),
];

static POOL2D: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "pool2d",
    bindings: UNARY,
};

static PAD2D: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "pad2d",
    bindings: UNARY,
};

static GLOBAL_AVG_POOL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "global_avg_pool",
    bindings: UNARY,
};

static BINARY: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "binary",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
        Binding::read(3),
    ],
};

static CONCAT_COPY: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "concat_copy",
    bindings: UNARY,
};

static FAKE_QUANT_ONNX: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "fake_quant_onnx",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
        Binding::read(4),
    ],
};

/// The uniform of `graph_ops.wgsl` (same field order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct Params {
    count: u32,
    mode: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    dh: u32,
    dw: u32,
    pt: u32,
    pl: u32,
    pb: u32,
    pr: u32,
    rank: u32,
    inner: u32,
    channels: u32,
    qmin: i32,
    qmax: i32,
    block_in: u32,
    block_out: u32,
    offset: u32,
    dims: [u32; MAX_BROADCAST_RANK],
    a_strides: [u32; MAX_BROADCAST_RANK],
    b_strides: [u32; MAX_BROADCAST_RANK],
}

/// One launch of `kernel` over `count` invocations (nothing when `count` is 0).
fn run(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    p: &Params,
    buffers: &[&wgpu::Buffer],
) -> Result<()> {
    if p.count == 0 {
        return Ok(());
    }
    let uniform = ctx.params(p)?;
    let mut all: Vec<&wgpu::Buffer> = vec![&uniform];
    all.extend_from_slice(buffers);
    ctx.run(&[Launch {
        kernel,
        constants: WG_CONSTANTS,
        buffers: &all,
        workgroups: grid(ctx, p.count as usize)?,
    }])?;
    Ok(())
}

/// 2-D pooling of an NCHW tensor with ONNX's full window ([`PoolWindow`], [`PoolMode`]),
/// bit-exact with [`crate::reference::layers::pool2d`].
///
/// Errors: those of [`PoolWindow::output_shape`]; an input that is not `f32` or of another
/// context.
pub fn pool2d(
    ctx: &GpuContext,
    x: &GpuTensor,
    window: &PoolWindow,
    mode: PoolMode,
) -> Result<GpuTensor> {
    pool2d_impl(ctx, x, window, mode, None)
}

/// [`pool2d`] writing into `out` (an `f32` tensor of the output shape with its own buffer,
/// see [`super::check_output`]).
pub fn pool2d_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    window: &PoolWindow,
    mode: PoolMode,
    out: &GpuTensor,
) -> Result<()> {
    pool2d_impl(ctx, x, window, mode, Some(out)).map(drop)
}

fn pool2d_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    window: &PoolWindow,
    mode: PoolMode,
    out: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensor("pool2d input", x)?;
    let shape = window.output_shape(x.shape())?;
    expect_f32("pool2d input", x)?;
    let (h, w) = (x.shape()[2], x.shape()[3]);
    let [pt, pl, pb, pr] = window.pads;
    // Every padded position (and one stride past it) indexes in u32.
    to_u32(x.len(), "pool2d input element count")?;
    to_u32(
        h + pt + pb + window.stride[0] + window.kernel[0] * window.dilation[0],
        "pool2d padded height",
    )?;
    to_u32(
        w + pl + pr + window.stride[1] + window.kernel[1] * window.dilation[1],
        "pool2d padded width",
    )?;
    let y = output(ctx, "pool2d output", out, &shape, DType::F32, &[x])?;
    let u = |v: usize, what: &str| to_u32(v, what);
    let p = Params {
        count: u(y.len(), "pool2d output element count")?,
        mode: match mode {
            PoolMode::Max => 0,
            PoolMode::Avg {
                count_include_pad: false,
            } => 1,
            PoolMode::Avg {
                count_include_pad: true,
            } => 2,
        },
        h: u(h, "pool2d height")?,
        w: u(w, "pool2d width")?,
        oh: u(shape[2], "pool2d output height")?,
        ow: u(shape[3], "pool2d output width")?,
        kh: u(window.kernel[0], "pool2d kernel")?,
        kw: u(window.kernel[1], "pool2d kernel")?,
        sh: u(window.stride[0], "pool2d stride")?,
        sw: u(window.stride[1], "pool2d stride")?,
        dh: u(window.dilation[0], "pool2d dilation")?,
        dw: u(window.dilation[1], "pool2d dilation")?,
        pt: u(pt, "pool2d pad")?,
        pl: u(pl, "pool2d pad")?,
        pb: u(pb, "pool2d pad")?,
        pr: u(pr, "pool2d pad")?,
        ..Params::default()
    };
    run(ctx, &POOL2D, &p, &[x.buffer(), y.buffer()])?;
    Ok(y)
}

/// Zero padding of an NCHW tensor by `[top, left, bottom, right]`, equal to
/// [`crate::reference::layers::zero_pad2d`].
///
/// Errors: those of [`crate::ops::pad2d_output_shape`]; an input that is not `f32` or of
/// another context.
pub fn pad2d(ctx: &GpuContext, x: &GpuTensor, pads: [usize; 4]) -> Result<GpuTensor> {
    pad2d_impl(ctx, x, pads, None)
}

/// [`pad2d`] writing into `out` (an `f32` tensor of the padded shape with its own buffer).
pub fn pad2d_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    pads: [usize; 4],
    out: &GpuTensor,
) -> Result<()> {
    pad2d_impl(ctx, x, pads, Some(out)).map(drop)
}

fn pad2d_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    pads: [usize; 4],
    out: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensor("pad2d input", x)?;
    let shape = crate::ops::pad2d_output_shape(x.shape(), pads)?;
    expect_f32("pad2d input", x)?;
    let y = output(ctx, "pad2d output", out, &shape, DType::F32, &[x])?;
    let p = Params {
        count: to_u32(y.len(), "pad2d output element count")?,
        h: to_u32(x.shape()[2], "pad2d height")?,
        w: to_u32(x.shape()[3], "pad2d width")?,
        oh: to_u32(shape[2], "pad2d output height")?,
        ow: to_u32(shape[3], "pad2d output width")?,
        pt: to_u32(pads[0], "pad2d pad")?,
        pl: to_u32(pads[1], "pad2d pad")?,
        ..Params::default()
    };
    run(ctx, &PAD2D, &p, &[x.buffer(), y.buffer()])?;
    Ok(y)
}

/// Global average pooling `[N, C, H, W] → [N, C, 1, 1]`, bit-exact with
/// [`crate::reference::layers::global_avg_pool2d`] (ndarray's `mean_axis` summation order).
///
/// Errors: those of [`crate::ops::global_pool_extent`]; an input that is not `f32` or of
/// another context.
pub fn global_avg_pool2d(ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
    global_avg_pool2d_impl(ctx, x, None)
}

/// [`global_avg_pool2d`] writing into `out` (`f32` `[N, C, 1, 1]` with its own buffer).
pub fn global_avg_pool2d_into(ctx: &GpuContext, x: &GpuTensor, out: &GpuTensor) -> Result<()> {
    global_avg_pool2d_impl(ctx, x, Some(out)).map(drop)
}

fn global_avg_pool2d_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    out: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensor("global average pooling input", x)?;
    let extent = crate::ops::global_pool_extent(x.shape())?;
    expect_f32("global average pooling input", x)?;
    to_u32(x.len(), "global average pooling input element count")?;
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let y = output(
        ctx,
        "global average pooling output",
        out,
        &[n, c, 1, 1],
        DType::F32,
        &[x],
    )?;
    let p = Params {
        count: to_u32(n * c, "global average pooling planes")?,
        inner: to_u32(extent, "global average pooling extent")?,
        ..Params::default()
    };
    run(ctx, &GLOBAL_AVG_POOL, &p, &[x.buffer(), y.buffer()])?;
    Ok(y)
}

/// `a op b` with numpy broadcasting ([`crate::ops::broadcast_shape`]), bit-exact with
/// [`crate::reference::layers::broadcast_binary`].
///
/// Errors: those of [`crate::ops::broadcast_shape`]; operands that are not `f32` or of
/// another context.
pub fn binary(ctx: &GpuContext, a: &GpuTensor, b: &GpuTensor, op: BinaryOp) -> Result<GpuTensor> {
    binary_impl(ctx, a, b, op, None)
}

/// [`binary`] writing into `out` (an `f32` tensor of the broadcast shape with its own
/// buffer).
pub fn binary_into(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    op: BinaryOp,
    out: &GpuTensor,
) -> Result<()> {
    binary_impl(ctx, a, b, op, Some(out)).map(drop)
}

/// The element strides of `s` seen under the broadcast `shape` (0 on broadcast dims), in
/// `shape`'s rank.
fn broadcast_strides(s: &[usize], shape: &[usize]) -> Result<[u32; MAX_BROADCAST_RANK]> {
    let mut out = [0u32; MAX_BROADCAST_RANK];
    let off = shape.len() - s.len();
    let mut stride = 1usize;
    for i in (0..s.len()).rev() {
        if s[i] != 1 || shape[off + i] == 1 {
            out[off + i] = to_u32(stride, "broadcast stride")?;
        }
        stride = stride.saturating_mul(s[i]);
    }
    Ok(out)
}

fn binary_impl(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    op: BinaryOp,
    out: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("binary operand a", a), ("binary operand b", b)])?;
    let shape = crate::ops::broadcast_shape(a.shape(), b.shape())?;
    expect_f32("binary operand a", a)?;
    expect_f32("binary operand b", b)?;
    let y = output(ctx, "binary output", out, &shape, DType::F32, &[a, b])?;
    let mut dims = [1u32; MAX_BROADCAST_RANK];
    for (d, &s) in dims.iter_mut().zip(&shape) {
        *d = to_u32(s, "binary output dim")?;
    }
    let p = Params {
        count: to_u32(y.len(), "binary output element count")?,
        mode: match op {
            BinaryOp::Add => 0,
            BinaryOp::Mul => 1,
        },
        rank: shape.len() as u32,
        dims,
        a_strides: broadcast_strides(a.shape(), &shape)?,
        b_strides: broadcast_strides(b.shape(), &shape)?,
        ..Params::default()
    };
    run(ctx, &BINARY, &p, &[a.buffer(), y.buffer(), b.buffer()])?;
    Ok(y)
}

/// The parts concatenated along `axis` (negative: from the end), bit-exact with
/// [`crate::reference::layers::concat`]: one copy launch per part, one submission.
///
/// Errors: those of [`crate::ops::concat_shape`]; parts that are not `f32` or of another
/// context.
pub fn concat(ctx: &GpuContext, parts: &[&GpuTensor], axis: i64) -> Result<GpuTensor> {
    concat_impl(ctx, parts, axis, None)
}

/// [`concat()`] writing into `out` (an `f32` tensor of the output shape with its own buffer).
pub fn concat_into(
    ctx: &GpuContext,
    parts: &[&GpuTensor],
    axis: i64,
    out: &GpuTensor,
) -> Result<()> {
    concat_impl(ctx, parts, axis, Some(out)).map(drop)
}

fn concat_impl(
    ctx: &GpuContext,
    parts: &[&GpuTensor],
    axis: i64,
    out: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    for p in parts {
        ctx.check_tensor("Concat input", p)?;
        expect_f32("Concat input", p)?;
    }
    let shapes: Vec<&[usize]> = parts.iter().map(|p| p.shape()).collect();
    let (ax, shape) = crate::ops::concat_shape(&shapes, axis)?;
    let y = output(ctx, "Concat output", out, &shape, DType::F32, parts)?;
    to_u32(y.len(), "Concat output element count")?;
    let inner: usize = shape[ax + 1..].iter().product();
    let block_out = shape[ax] * inner;
    let mut offset = 0usize;
    let mut params = Vec::with_capacity(parts.len());
    for p in parts {
        let block_in = p.shape()[ax] * inner;
        if !p.is_empty() {
            params.push((
                ctx.params(&Params {
                    count: to_u32(p.len(), "Concat input element count")?,
                    block_in: to_u32(block_in, "Concat block")?,
                    block_out: to_u32(block_out, "Concat block")?,
                    offset: to_u32(offset, "Concat offset")?,
                    ..Params::default()
                })?,
                *p,
            ));
        }
        offset += block_in;
    }
    let buffers: Vec<[&wgpu::Buffer; 3]> = params
        .iter()
        .map(|(u, p)| [&**u, p.buffer(), y.buffer()])
        .collect();
    let launches = params
        .iter()
        .zip(&buffers)
        .map(|((_, p), b)| {
            Ok(Launch {
                kernel: &CONCAT_COPY,
                constants: WG_CONSTANTS,
                buffers: b,
                workgroups: grid(ctx, p.len())?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if !launches.is_empty() {
        ctx.run(&launches)?;
    }
    Ok(y)
}

/// ONNX QuantizeLinear followed by DequantizeLinear with the same qparams (per tensor or
/// per channel), bit-exact with [`crate::reference::fake_quant::fake_quantize_onnx`].
///
/// Errors: those of [`crate::quant::QParams::validate`] (through [`GpuQParams::validate`]);
/// an input that is not `f32` or of another context.
pub fn fake_quant_onnx(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
) -> Result<GpuTensor> {
    fake_quant_onnx_impl(ctx, x, qp, range, None)
}

/// [`fake_quant_onnx`] writing into `out` (an `f32` tensor of `x`'s shape with its own
/// buffer).
pub fn fake_quant_onnx_into(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
    out: &GpuTensor,
) -> Result<()> {
    fake_quant_onnx_impl(ctx, x, qp, range, Some(out)).map(drop)
}

fn fake_quant_onnx_impl(
    ctx: &GpuContext,
    x: &GpuTensor,
    qp: &GpuQParams,
    range: QuantRange,
    out: Option<&GpuTensor>,
) -> Result<GpuTensor> {
    ctx.check_tensors(&[("QuantizeLinear input", x), ("qparams", qp.tensor())])?;
    expect_f32("QuantizeLinear input", x)?;
    qp.validate(x.shape(), range)?;
    let y = output(
        ctx,
        "DequantizeLinear output",
        out,
        x.shape(),
        DType::F32,
        &[x, qp.tensor()],
    )?;
    let inner: usize = match qp.axis() {
        Some(axis) => x.shape()[axis + 1..].iter().product(),
        None => 1,
    };
    let p = Params {
        count: to_u32(x.len(), "QuantizeLinear element count")?,
        inner: to_u32(inner.max(1), "QuantizeLinear inner size")?,
        channels: to_u32(qp.channels(), "QuantizeLinear channels")?,
        qmin: range.quant_min,
        qmax: range.quant_max,
        ..Params::default()
    };
    if qp.channels() == 0 {
        return Err(Error::invalid("QuantizeLinear qparams with no channel"));
    }
    run(
        ctx,
        &FAKE_QUANT_ONNX,
        &p,
        &[x.buffer(), y.buffer(), qp.tensor().buffer()],
    )?;
    Ok(y)
}
