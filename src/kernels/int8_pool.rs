//! Integer pooling and table lookups on packed codes (`shaders/int8_pool.wgsl`), bit-exact
//! with [`crate::reference::int8`]: max pooling with padding
//! ([`crate::reference::int8::max_pool2d_pad_int8`]), global average pooling with its
//! requantization ([`crate::reference::int8::global_avg_pool_int8`]) and 256-entry code
//! tables for elementwise activations such as HardSwish
//! ([`crate::reference::int8::lookup_int8`]). Codes are [`GpuInt8Tensor`]s (channel quads,
//! see [`super::int8`]); every launcher validates with the reference's shared checks
//! ([`crate::ops::Pool2d::output`], [`crate::ops::global_pool_extent`],
//! [`crate::quant::check_table`]), records its dispatch and returns without waiting.

use bytemuck::{Pod, Zeroable};

use super::int8::{int8_output, packed_dims, GpuInt8Tensor};
use super::{to_u32, WG_CONSTANTS, WORKGROUP_SIZE};
use crate::error::{Error, Result};
use crate::gpu::{Binding, GpuContext, Kernel, Launch, Shader};
use crate::ops::Pool2d;
use crate::quant::{Requant, RequantMode};

pub(super) static SHADER: Shader = Shader {
    name: "int8_pool",
    source: concat!(
        include_str!("../../shaders/lib/requant.wgsl"),
        include_str!("../../shaders/int8_pool.wgsl")
    ),
};

static MAX_POOL2D_PAD: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "max_pool2d_pad",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
    ],
};

static GLOBAL_AVG_POOL: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "global_avg_pool",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
    ],
};

static LOOKUP: Kernel = Kernel {
    shader: &SHADER,
    entry_point: "lookup",
    bindings: &[
        Binding::uniform(0),
        Binding::read(1),
        Binding::read_write(2),
        Binding::uniform(3),
    ],
};

/// The uniform of `int8_pool.wgsl` (same field order, 96 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
struct PoolParams {
    count: u32,
    c: u32,
    cq: u32,
    inner: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    x_zp: i32,
    mode: u32,
    scale: f32,
    mult: i32,
    shift: i32,
    out_zp: i32,
    lo: i32,
    hi: i32,
    _pad0: u32,
    _pad1: u32,
}

fn nchw(x: &GpuInt8Tensor, what: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(x.shape()).map_err(|_| {
        Error::invalid(format!(
            "{what} must be NCHW (rank 4), got shape {:?}",
            x.shape()
        ))
    })
}

/// Max pooling on codes with padding ([`crate::reference::int8::max_pool2d_pad_int8`]):
/// four channels per invocation, padded positions never win; the output keeps the input's
/// quantization.
///
/// Errors: those of [`Pool2d::output`], and [`Error::InvalidArgument`] for an input that is
/// not rank 4.
pub fn max_pool2d_pad_int8(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    pool: &Pool2d,
) -> Result<GpuInt8Tensor> {
    max_pool2d_pad_impl(ctx, x, pool, None)
}

/// [`max_pool2d_pad_int8`] writing into `out` (codes of the output shape with their own
/// buffer, see [`super::check_output`]).
pub fn max_pool2d_pad_int8_into(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    pool: &Pool2d,
    out: &GpuInt8Tensor,
) -> Result<()> {
    max_pool2d_pad_impl(ctx, x, pool, Some(out)).map(drop)
}

fn max_pool2d_pad_impl(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    pool: &Pool2d,
    given: Option<&GpuInt8Tensor>,
) -> Result<GpuInt8Tensor> {
    ctx.check_tensor("max pooling input", x.words())?;
    let [n, c, h, w] = nchw(x, "max pooling input")?;
    let (oh, ow) = pool.output(h, w)?;
    to_u32(x.words().len(), "max pooling input word count")?;
    let y = int8_output(
        ctx,
        "max pooling output",
        given,
        &[n, c, oh, ow],
        &[x.words()],
    )?;
    let words = y.words().len();
    if words == 0 {
        return Ok(y);
    }
    let u = |v: usize, what: &str| to_u32(v, what);
    let p = PoolParams {
        count: u(words, "max pooling output word count")?,
        h: u(h, "max pooling height")?,
        w: u(w, "max pooling width")?,
        oh: u(oh, "max pooling output height")?,
        ow: u(ow, "max pooling output width")?,
        kh: u(pool.kernel[0], "max pooling kernel")?,
        kw: u(pool.kernel[1], "max pooling kernel")?,
        sh: u(pool.stride[0], "max pooling stride")?,
        sw: u(pool.stride[1], "max pooling stride")?,
        ph: u(pool.padding[0], "max pooling padding")?,
        pw: u(pool.padding[1], "max pooling padding")?,
        ..PoolParams::default()
    };
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &MAX_POOL2D_PAD,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, x.words().buffer(), y.words().buffer()],
        workgroups: ctx.grid_1d(words, WORKGROUP_SIZE)?,
    }])?;
    Ok(y)
}

/// Global average pooling on codes `[N, C, H, W] → [N, C, 1, 1]`
/// ([`crate::reference::int8::global_avg_pool_int8`]): one invocation per output word sums
/// its four channels' codes in i32 and requantizes them with `requant` (one multiplier, in
/// its [`RequantMode`]).
///
/// Errors: those of [`crate::ops::global_pool_extent`] and [`Requant::validate`], and
/// [`Error::InvalidArgument`] for a requantization with more than one multiplier.
pub fn global_avg_pool_int8(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    requant: &Requant,
) -> Result<GpuInt8Tensor> {
    global_avg_pool_impl(ctx, x, x_zero_point, requant, None)
}

/// [`global_avg_pool_int8`] writing into `out` (codes `[N, C, 1, 1]` with their own buffer,
/// see [`super::check_output`]).
pub fn global_avg_pool_int8_into(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    requant: &Requant,
    out: &GpuInt8Tensor,
) -> Result<()> {
    global_avg_pool_impl(ctx, x, x_zero_point, requant, Some(out)).map(drop)
}

fn global_avg_pool_impl(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    x_zero_point: i32,
    requant: &Requant,
    given: Option<&GpuInt8Tensor>,
) -> Result<GpuInt8Tensor> {
    ctx.check_tensor("global average pooling input", x.words())?;
    let extent = crate::ops::global_pool_extent(x.shape())?;
    requant.validate(1)?;
    if requant.scales.len() != 1 {
        return Err(Error::invalid(
            "global average pooling takes one requantization multiplier",
        ));
    }
    if !(-128..=127).contains(&x_zero_point) {
        return Err(Error::invalid(format!(
            "input zero point {x_zero_point} is outside the int8 range [-128, 127]"
        )));
    }
    let [n, c, _, _] = nchw(x, "global average pooling input")?;
    to_u32(x.words().len(), "global average pooling input word count")?;
    let y = int8_output(
        ctx,
        "global average pooling output",
        given,
        &[n, c, 1, 1],
        &[x.words()],
    )?;
    let words = y.words().len();
    if words == 0 {
        return Ok(y);
    }
    let m = requant.multiplier(0);
    let p = PoolParams {
        count: to_u32(words, "global average pooling output word count")?,
        c: to_u32(c, "global average pooling channels")?,
        cq: to_u32(c.div_ceil(4), "global average pooling channel words")?,
        inner: to_u32(extent, "global average pooling extent")?,
        x_zp: x_zero_point,
        mode: match requant.mode {
            RequantMode::Float => 0,
            RequantMode::FixedPoint => 1,
        },
        scale: requant.scale(0),
        mult: m.multiplier,
        shift: m.shift,
        out_zp: requant.out_zero_point,
        lo: requant.clamp_min,
        hi: requant.clamp_max,
        ..PoolParams::default()
    };
    let uniform = ctx.params(&p)?;
    ctx.run(&[Launch {
        kernel: &GLOBAL_AVG_POOL,
        constants: WG_CONSTANTS,
        buffers: &[&uniform, x.words().buffer(), y.words().buffer()],
        workgroups: ctx.grid_1d(words, WORKGROUP_SIZE)?,
    }])?;
    Ok(y)
}

/// An elementwise op on codes by a 256-entry table ([`crate::reference::int8::lookup_int8`],
/// tables from [`crate::reference::int8::activation_table`]); the table travels in a
/// 256-byte uniform.
///
/// Errors: a table without 256 entries ([`crate::quant::check_table`]).
pub fn lookup_int8(ctx: &GpuContext, x: &GpuInt8Tensor, table: &[i8]) -> Result<GpuInt8Tensor> {
    lookup_impl(ctx, x, table, None)
}

/// [`lookup_int8`] writing into `out` (codes of `x`'s shape with their own buffer, see
/// [`super::check_output`]).
pub fn lookup_int8_into(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    table: &[i8],
    out: &GpuInt8Tensor,
) -> Result<()> {
    lookup_impl(ctx, x, table, Some(out)).map(drop)
}

fn lookup_impl(
    ctx: &GpuContext,
    x: &GpuInt8Tensor,
    table: &[i8],
    given: Option<&GpuInt8Tensor>,
) -> Result<GpuInt8Tensor> {
    ctx.check_tensor("code table input", x.words())?;
    crate::quant::check_table(table)?;
    let y = int8_output(ctx, "code table output", given, x.shape(), &[x.words()])?;
    let words = y.words().len();
    if words == 0 {
        return Ok(y);
    }
    let [_, c, inner] = packed_dims(x.shape());
    let p = PoolParams {
        count: to_u32(words, "code table word count")?,
        c: to_u32(c, "code table channels")?,
        cq: to_u32(c.div_ceil(4), "code table channel words")?,
        inner: to_u32(inner, "code table inner size")?,
        ..PoolParams::default()
    };
    let mut packed = [0u32; 64];
    for (k, &v) in table.iter().enumerate() {
        packed[k / 4] |= u32::from(v as u8) << (8 * (k % 4));
    }
    let uniform = ctx.params(&p)?;
    let table_uniform = ctx.params(&packed)?;
    ctx.run(&[Launch {
        kernel: &LOOKUP,
        constants: WG_CONSTANTS,
        buffers: &[
            &uniform,
            x.words().buffer(),
            y.words().buffer(),
            &table_uniform,
        ],
        workgroups: ctx.grid_1d(words, WORKGROUP_SIZE)?,
    }])?;
    Ok(y)
}
